"""Checkpoints: safetensors + config.json, atomic, refused when edited or mismatched."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ciml_core.checkpoint import (
    CheckpointInfo,
    load_checkpoint,
    load_training_state,
    read_checkpoint_config,
    save_checkpoint,
    seal_config,
)
from ciml_core.cli import main
from ciml_core.errors import CheckpointError
from ciml_core.model import ModelConfig, build_model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    config = ModelConfig(width=2, patch_size=(16, 16, 16))
    torch.manual_seed(0)
    model = build_model(config)
    info = CheckpointInfo(label_convention="brats2020", metrics={"val_dice": {"WT": 0.5}})
    state = {"epoch": 3, "step": 0, "optimizer": {"lr": torch.tensor(1e-4)}}
    path = save_checkpoint(tmp_path / "ckpt", model, config, info, training_state=state)
    return path, model, config


def test_round_trip_restores_identical_outputs(tiny_checkpoint):
    path, model, config = tiny_checkpoint
    loaded = load_checkpoint(path)
    assert loaded.config == config
    assert loaded.modalities == ("flair", "t1", "t1ce", "t2")
    assert loaded.info.label_convention == "brats2020"
    x = torch.randn(1, 4, 16, 16, 16)
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(x).logits, loaded.model(x).logits, strict=True):
            assert torch.equal(a, b)
    assert load_training_state(path)["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temp folders left


def test_config_json_contents(tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    doc = json.loads((path / "config.json").read_text())
    assert doc["format"] == "ciml-checkpoint" and doc["package_version"] == "0.1.0"
    assert doc["modalities"] == ["flair", "t1", "t1ce", "t2"]
    assert doc["regions"] == ["WT", "TC", "ET"] and doc["patch_size"] == [16, 16, 16]
    assert doc["model"]["decomposition"]["tasks"][3] == {"primary": ["t1ce"], "regions": ["TC", "ET"]}
    assert len(doc["weights_sha256"]) == 64


def test_edited_weights_are_refused(tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    weights = load_file(str(path / "model.safetensors"))
    key = next(iter(weights))
    weights[key] = weights[key] + 1
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        load_checkpoint(path)


def test_missing_key_and_wrong_shape_are_refused(tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    doc = json.loads((path / "config.json").read_text())
    del doc["label_convention"]
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['label_convention'\]"):
        read_checkpoint_config(path)
    doc["label_convention"] = "brats2020"
    doc["model"]["width"] = 3  # the tensors were saved for width 2
    (path / "config.json").write_text(json.dumps(doc))
    # the config hash sees the edit first ...
    with pytest.raises(CheckpointError, match="config_sha256 .* does not match its content"):
        load_checkpoint(path)
    # ... and a re-sealed (consistent but wrong) config is refused by the tensor shapes, read
    # from the safetensors header before the network is built
    (path / "config.json").write_text(json.dumps(seal_config(doc)))
    with pytest.raises(CheckpointError, match="does not match its config.json: .* has shape"):
        load_checkpoint(path)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "empty")


def test_info_command(tiny_checkpoint, capsys):
    path, _, _ = tiny_checkpoint
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "flair -> WT" in out and "t1ce -> TC, ET" in out
    assert "variant         full (width C=2" in out
    sha = json.loads((path / "config.json").read_text())["weights_sha256"]
    assert f"weights sha256  {sha}" in out
    (path / "model.safetensors").write_bytes(b"garbage")
    assert main(["info", str(path)]) == 2
    assert "does not match" in capsys.readouterr().err


def test_export_half_precision_keeps_outputs(tiny_checkpoint, tmp_path):
    from ciml_core.checkpoint import export_checkpoint

    path, model, _ = tiny_checkpoint
    exported = export_checkpoint(path, tmp_path / "half")
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    weights = load_file(str(exported / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    size = (exported / "model.safetensors").stat().st_size
    assert size < 0.6 * (path / "model.safetensors").stat().st_size
    loaded = load_checkpoint(exported)
    assert next(loaded.model.parameters()).dtype == torch.float32
    x = torch.randn(1, 4, 16, 16, 16)
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(x).logits, loaded.model(x).logits, strict=True):
            assert torch.allclose(a, b, atol=1e-2)


def test_dynunet_with_shared_layers_round_trips(tmp_path):
    # MONAI's DynUNet reaches the same layers under two names; one copy is stored.
    config = ModelConfig(width=2, variant="dynunet", norm="instance", patch_size=(32, 32, 32))
    torch.manual_seed(0)
    model = build_model(config).eval()
    names = set(model.state_dict())
    path = save_checkpoint(tmp_path / "dyn", model, config, CheckpointInfo("brats2020"))
    stored = load_file(str(path / "model.safetensors"))
    assert set(stored) < names
    assert not any(k.startswith("net.skip_layers.") for k in stored)
    loaded = load_checkpoint(path)
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        expected = model(x).logits[0]
        got = loaded.model(x).logits[0]
    assert torch.equal(expected, got)
    # the alias names point at the loaded tensors
    state = loaded.model.state_dict()
    alias = next(k for k in names if k.startswith("net.skip_layers.") and k.endswith("conv.weight"))
    assert any(torch.equal(state[alias], v) for v in stored.values())
