"""End to end from the command line: phantoms -> train -> predict -> evaluate; resume, Ctrl-C,
DDP with two gloo processes, and the bad inputs predict must refuse."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ciml_core.cli import main
from ciml_core.model import ModelConfig, TaskDecomposition, build_model
from conftest import run_torchrun

TINY = ["--epochs", "2", "--iters-per-epoch", "2", "--patch", "32", "--width", "2",
        "--batch", "1", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    assert main(["phantom", "--kind", "brats", "--cases", "4", "--out", str(root / "data"),
                 "--shape", "48", "48", "32", "--seed", "7"]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def trained_run(phantoms, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(phantoms), "--out", str(run), "--val-every", "1", *TINY]) == 0
    return run


def test_train_writes_run_folder(trained_run):
    lines = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all(np.isfinite(r["total"]) for r in lines)
    assert set(lines[-1]["val_dice"]) == {"WT", "TC", "ET"}
    # the default schedule: 4-epoch linear warm-up times poly decay (train.lr_factor)
    from ciml_core.train import lr_factor
    assert [r["lr"] for r in lines] == pytest.approx([1e-4 * lr_factor(e, 2, 4) for e in (0, 1)])
    splits = json.loads((trained_run / "splits.json").read_text())
    assert len(splits) == 5 and all(len(s["val"]) >= 1 for s in splits)
    for name in ("latest", "best"):
        assert (trained_run / name / "model.safetensors").is_file()
    doc = json.loads((trained_run / "latest" / "config.json").read_text())
    assert doc["training"]["epochs_completed"] == 2


def test_predict_and_evaluate(trained_run, phantoms, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", str(phantoms), "--out", str(out), "--model",
                 str(trained_run / "best"), "--device", "cpu", "--probabilities"]) == 0
    preds = sorted(p.name for p in out.glob("Phantom_*.nii.gz") if "_prob_" not in p.name)
    assert preds == [f"Phantom_{i:05d}.nii.gz" for i in range(7, 11)]
    for name in preds:
        img = nib.load(out / name)
        ref = nib.load(phantoms / name[:-7] / f"{name[:-7]}_flair.nii.gz")
        assert img.get_data_dtype() == np.uint8 and img.shape == ref.shape
        assert np.array_equal(img.affine, ref.affine)
        assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2, 4}
        prob = np.asarray(nib.load(out / name.replace(".nii.gz", "_prob_WT.nii.gz")).dataobj)
        assert prob.min() >= 0 and prob.max() <= 1
    report = tmp_path / "report.csv"
    assert main(["evaluate", str(out), str(phantoms), "--out", str(report)]) == 0
    rows = list(csv.DictReader(report.open()))
    cases = [r for r in rows if r["case_id"].startswith("Phantom_")]
    assert len(cases) == 4
    for r in cases:
        for region in ("WT", "TC", "ET"):
            assert 0 <= float(r[f"{region}_dice"]) <= 1 and np.isfinite(float(r[f"{region}_hd95"]))
    # refuses to overwrite existing outputs
    assert main(["predict", str(phantoms / "Phantom_00007"), "--out", str(out), "--model",
                 str(trained_run / "best"), "--device", "cpu"]) == 2


def test_predict_refuses_output_inside_input(trained_run, phantoms):
    code = main(["predict", str(phantoms / "Phantom_00008"), "--out",
                 str(phantoms / "Phantom_00008" / "pred"), "--model", str(trained_run / "best")])
    assert code == 2
    assert not (phantoms / "Phantom_00008" / "pred").exists()


def test_predict_small_anisotropic_4d_input_given_as_files(trained_run, tmp_path, capsys):
    # 20x24x12 voxels (smaller than the 32^3 patch), 1.2 x 0.9 x 3 mm, LAS, trailing singleton axis
    rng = np.random.default_rng(0)
    affine = np.diag([-1.2, 0.9, 3.0, 1.0])
    files = []
    for name in ("flair", "t1", "t1ce", "t2"):
        data = np.zeros((20, 24, 12, 1), np.float32)
        data[2:-2, 2:-2, 1:-1] = rng.uniform(0.5, 1.5, size=(16, 20, 10, 1))
        path = tmp_path / "in" / f"small_{name}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), path)
        files.append(f"{name}={path}")
    out = tmp_path / "out"
    assert main(["predict", *files, "--out", str(out), "--model", str(trained_run / "best"),
                 "--case-id", "small", "--tta"]) == 0
    img = nib.load(out / "small.nii.gz")
    assert img.shape == (20, 24, 12)
    # the same case with bf16 windows on the CPU: same grid, labels from the same set
    assert main(["predict", *files, "--out", str(tmp_path / "bf16"), "--model",
                 str(trained_run / "best"), "--case-id", "small", "--bf16"]) == 0
    half = nib.load(tmp_path / "bf16" / "small.nii.gz")
    assert half.shape == (20, 24, 12) and set(np.unique(half.dataobj)) <= {0, 1, 2, 4}
    assert np.array_equal(img.affine, nib.load(tmp_path / "in" / "small_flair.nii.gz").affine)


def test_predict_refuses_model_for_other_modalities(tmp_path, phantoms):
    from ciml_core.checkpoint import CheckpointInfo, save_checkpoint

    config = ModelConfig(decomposition=TaskDecomposition.petct(), width=2, norm="instance",
                         patch_size=(16, 16, 16))
    ckpt = save_checkpoint(tmp_path / "petct", build_model(config), config,
                           CheckpointInfo(label_convention="binary"))
    code = main(["predict", str(phantoms / "Phantom_00007"), "--out", str(tmp_path / "o"),
                 "--model", str(ckpt)])
    assert code == 2
    assert not (tmp_path / "o").exists()


def test_train_with_a_custom_task_decomposition(phantoms, tmp_path, capsys):
    # Table 6's worst row: FLAIR -> TC, T1 -> TC+ET, T2 -> WT, T1CE -> TC.
    worst = {"modalities": ["flair", "t1", "t1ce", "t2"], "regions": ["WT", "TC", "ET"],
             "tasks": [{"primary": ["flair"], "regions": ["TC"]},
                       {"primary": ["t1"], "regions": ["TC", "ET"]},
                       {"primary": ["t2"], "regions": ["WT"]},
                       {"primary": ["t1ce"], "regions": ["TC"]}]}
    path = tmp_path / "worst.json"
    path.write_text(json.dumps(worst))
    run = tmp_path / "run"
    args = ["train", str(phantoms), "--out", str(run), "--fold", "-1", *TINY]
    assert main([*args, "--decomposition", str(path)]) == 0
    doc = json.loads((run / "best" / "config.json").read_text())
    assert doc["model"]["decomposition"] == worst
    model_weights = load_file(str(run / "best" / "model.safetensors"))
    # segmentor 1 (T1) predicts two regions, segmentor 3 (T1CE) one
    assert model_weights["segmentors.1.decoder.head.weight"].shape[0] == 2
    assert model_weights["segmentors.3.decoder.head.weight"].shape[0] == 1

    # a decomposition over other modalities and an unreadable file are refused by name
    petct = tmp_path / "petct.json"
    petct.write_text(json.dumps(TaskDecomposition.petct().to_dict()))
    assert main([*args[:3], str(tmp_path / "r2"), *args[4:], "--decomposition", str(petct)]) == 2
    assert "are not the dataset's" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main([*args[:3], str(tmp_path / "r3"), *args[4:], "--decomposition", str(bad)]) == 2
    assert f"--decomposition {bad}" in capsys.readouterr().err


def test_resume_after_interrupt_reaches_same_epochs(phantoms, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ciml_core.cli", "train", str(phantoms), "--out", str(run),
           "--epochs", "3", "--iters-per-epoch", "6", "--patch", "32", "--width", "2",
           "--batch", "1", "--workers", "0", "--device", "cpu", "--val-every", "100"]
    # A shell that starts pytest in the background passes SIGINT on as ignored, and Python then
    # never raises KeyboardInterrupt; give the child the default disposition, as a terminal does.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (run / "latest" / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C after the first epoch's checkpoint
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    # stopped at the next step boundary (or right after the epoch's checkpoint), latest saved
    assert "interrupted" in output and "continue with --resume" in output
    state = torch.load(run / "latest" / "training_state.pt", weights_only=True)
    assert state["epoch"] < 3
    # Resuming with a different schedule is refused; the same settings continue.
    assert main(["train", str(phantoms), "--out", str(run), "--resume", "--epochs", "5"]) == 2
    assert main(["train", "--out", str(run), "--resume", "--device", "cpu", "--workers", "0"]) == 0
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1] == 3 and sorted(set(epochs)) == [1, 2, 3]
    doc = json.loads((run / "latest" / "config.json").read_text())
    assert doc["training"]["epochs_completed"] == 3
    # a second plain `train` into the same folder is refused rather than overwriting it
    assert main(["train", str(phantoms), "--out", str(run), *TINY]) == 2


def test_ddp_two_gloo_processes_end_with_identical_weights(phantoms, tmp_path):
    run = tmp_path / "ddp"
    script = Path(__file__).parent / "helpers" / "ddp_train.py"
    run_torchrun([str(script), str(phantoms), str(run)], port=29517)
    rank0, rank1 = (load_file(str(run / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 100
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    torch.manual_seed(0)
    fresh = build_model(ModelConfig(width=2, patch_size=(32, 32, 32))).state_dict()
    changed = [k for k in rank0 if not torch.equal(rank0[k], fresh[k])]
    assert len(changed) > len(rank0) // 2  # the ranks trained (together), not merely started equal
    # rank 0 alone wrote the checkpoint and the log
    assert (run / "latest" / "model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_predict_under_torchrun_shards_cases(trained_run, phantoms, tmp_path):
    out = tmp_path / "pred"
    result = run_torchrun(["-m", "ciml_core.cli", "predict", str(phantoms), "--out", str(out),
                           "--model", str(trained_run / "best"), "--device", "cpu"], port=29518)
    assert sorted(p.name for p in out.iterdir()) == [f"Phantom_{i:05d}.nii.gz" for i in range(7, 11)]
    # each rank reported its own share: two "wrote 2 file(s)" lines
    assert result.stdout.count("wrote 2 file(s)") == 2
