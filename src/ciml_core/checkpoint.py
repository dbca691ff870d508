"""Model checkpoints: ``model.safetensors`` + ``config.json``, and a separate resumable state.

A checkpoint is a folder::

    model.safetensors   the weights (safetensors: no pickle, nothing executes on load)
    config.json         network config, modalities, regions, label convention, normalisation,
                        patch size, package version, training metadata and metrics, and the
                        sha256 of model.safetensors
    training_state.pt   optional: optimiser, scheduler, epoch, RNG states (for --resume); tensors
                        only, read with ``torch.load(weights_only=True)``

Folders are written next to the target and renamed into place, so a reader (or a killed run)
never sees a half-written checkpoint. Loading checks the hash, the keys and every tensor shape
and refuses an edited or mismatched file with :class:`~ciml_core.errors.CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ciml_core import __version__
from ciml_core.errors import CheckpointError, ConfigError
from ciml_core.model import ModelConfig, build_model

FORMAT = "ciml-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINING_STATE = "training_state.pt"
DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo"
REQUIRED_KEYS = ("format", "format_version", "model", "label_convention", "weights_sha256")


@dataclass
class CheckpointInfo:
    """What config.json says besides the network: how to feed the model and what it produced."""

    label_convention: str
    normalisation: dict[str, Any] = field(default_factory=lambda: {"pet_method": "log"})
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A network rebuilt from a checkpoint, with everything needed to run it on a case."""

    model: nn.Module
    config: ModelConfig
    info: CheckpointInfo
    path: Path
    weights_sha256: str

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.decomposition.modalities

    @property
    def regions(self) -> tuple[str, ...]:
        return self.config.decomposition.regions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_checkpoint(model: str | os.PathLike) -> Path:
    """``"demo"`` -> the bundled demo model; otherwise a checkpoint folder or its config.json."""
    if str(model) == "demo":
        return DEMO_CHECKPOINT
    path = Path(model)
    if path.is_file() and path.name in (CONFIG, WEIGHTS):
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint folder (expected a folder with {WEIGHTS} "
                              f"and {CONFIG}, or 'demo')")
    return path


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the second and later names of a shared tensor.

    MONAI's DynUNet reaches the same layers under two names (``net.skip_layers...`` and
    ``net.downsamples...``); safetensors refuses to store aliases, and one copy is enough:
    :func:`load_weights` fills the other names because they share storage. DDP /
    torch.compile wrappers are unwrapped so that the plain module's names are stored.
    """
    module = getattr(model, "module", model)
    module = getattr(module, "_orig_mod", module)
    seen: set[tuple] = set()
    unique = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        unique[name] = tensor
    return unique


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``weights`` (as written by :func:`save_checkpoint`) into ``model``, or raise a
    :class:`CheckpointError` naming ``source`` and the first missing / unexpected / misshapen
    tensors."""
    expected = unique_state_dict(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected tensors {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        for k in wrong[:3]:
            details.append(f"{k} has shape {tuple(weights[k].shape)}, the config needs "
                           f"{tuple(expected[k].shape)}")
        raise CheckpointError(f"{source} does not match its config.json: " + "; ".join(details))
    # Only aliases of stored tensors are left out; they share storage, so they load too.
    model.load_state_dict(weights, strict=False)


def _state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in unique_state_dict(model).items()}


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing an older checkpoint there."""
    # mkdtemp makes a private folder; a checkpoint is meant to be shared like any other output.
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: ModelConfig,
    info: CheckpointInfo,
    *,
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (replacing an existing one at ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(_state_dict_for_saving(model), str(tmp / WEIGHTS))
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "model": config.to_dict(),
            "modalities": list(config.decomposition.modalities),
            "regions": list(config.decomposition.regions),
            "label_convention": info.label_convention,
            "normalisation": info.normalisation,
            "patch_size": list(config.patch_size),
            "training": info.training,
            "metrics": info.metrics,
            "weights_sha256": sha256_file(tmp / WEIGHTS),
        }
        (tmp / CONFIG).write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint_config(path: str | os.PathLike, *, verify_hash: bool = True) -> dict[str, Any]:
    """Read and check ``config.json`` of a checkpoint (keys, format, and the weights' hash)."""
    folder = resolve_checkpoint(path)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for required in (config_path, weights_path):
        if not required.is_file():
            raise CheckpointError(f"{folder}: {required.name} is missing")
    try:
        document = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(document, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in document]
    if missing:
        raise CheckpointError(f"{config_path}: missing key(s) {missing}")
    if document["format"] != FORMAT or document["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format {document['format']!r} v{document['format_version']} is not "
            f"a {FORMAT} v{FORMAT_VERSION} checkpoint"
        )
    if verify_hash:
        actual = sha256_file(weights_path)
        if actual != document["weights_sha256"]:
            raise CheckpointError(
                f"{weights_path}: sha256 {actual[:12]}... does not match config.json "
                f"({str(document['weights_sha256'])[:12]}...); the weights were changed after saving"
            )
    return document


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network of a checkpoint and load its weights (eval mode, on ``device``)."""
    folder = resolve_checkpoint(path)
    document = read_checkpoint_config(folder)
    try:
        config = ModelConfig.from_dict(document["model"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{folder / CONFIG}: invalid 'model' section ({err})") from err
    model = build_model(config)
    try:
        weights = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{folder / WEIGHTS}: unreadable safetensors file ({err})") from err
    load_weights(model, weights, folder / WEIGHTS)
    model.to(device).eval()
    info = CheckpointInfo(
        label_convention=document["label_convention"],
        normalisation=document.get("normalisation", {"pet_method": "log"}),
        training=document.get("training", {}),
        metrics=document.get("metrics", {}),
    )
    return LoadedModel(model, config, info, folder, document["weights_sha256"])


def export_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, half: bool = True
) -> Path:
    """Copy a checkpoint without its training state, optionally storing floats as float16.

    float16 halves the file (the bundled demo model ships this way); loading converts the
    weights back to the network's float32 parameters, so nothing else changes.
    """
    document = read_checkpoint_config(src)
    weights = load_file(str(resolve_checkpoint(src) / WEIGHTS))
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        save_file(weights, str(tmp / WEIGHTS))
        document = {**document, "weights_dtype": "float16" if half else "float32",
                    "weights_sha256": sha256_file(tmp / WEIGHTS)}
        (tmp / CONFIG).write_text(json.dumps(document, indent=2) + "\n")
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """The resumable state saved beside a checkpoint (tensors and plain values only)."""
    state_path = Path(path) / TRAINING_STATE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: no resumable training state (cannot --resume)")
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal is a bad state file
        raise CheckpointError(f"{state_path}: unreadable training state ({err})") from err
