"""Model checkpoints: ``model.safetensors`` + ``config.json``, and a separate resumable state.

A checkpoint is a folder::

    model.safetensors   the weights (safetensors: no pickle, nothing executes on load)
    config.json         network config, modalities, regions, label convention, normalisation,
                        patch size, target spacing (optional), package version, training
                        metadata and metrics, the
                        sha256 of model.safetensors and (format 2) ``config_sha256``, the sha256
                        of the canonical JSON of everything else in config.json, so that an
                        edited field (a label convention, swapped task primaries) is refused
                        like edited weights
    training_state.pt   optional: optimiser, scheduler, epoch, RNG states (for --resume); tensors
                        only, read with ``torch.load(weights_only=True)``

Folders are written next to the target and renamed into place, so a reader (or a killed run)
never sees a half-written checkpoint. Loading checks both hashes, every field of config.json,
and the names and shapes of the stored tensors against the network the config describes
*before* building it (on PyTorch's meta device, which allocates nothing, so a config claiming a
huge width cannot exhaust memory); an edited or mismatched checkpoint is refused with
:class:`~ciml_core.errors.CheckpointError`. Format 1 checkpoints (no ``config_sha256``) still
load, with their fields validated.

The hashes detect edits and corruption; they are not a signature (anyone who can edit the file
can recompute them). See docs/threat-model.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from ciml_core import __version__
from ciml_core import io as _io
from ciml_core.errors import CheckpointError, ConfigError
from ciml_core.model import ModelConfig, build_model

FORMAT = "ciml-checkpoint"
#: 2: config.json carries ``config_sha256``; 1: without it (still read).
FORMAT_VERSION = 2
CONFIG_HASH_KEY = "config_sha256"
#: Largest sliding-window patch a checkpoint may ask for (voxels): 256^3, far above any real one.
MAX_PATCH_VOXELS = 256**3
PET_METHODS = ("log", "zscore")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINING_STATE = "training_state.pt"
DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo"
REQUIRED_KEYS = ("format", "format_version", "model", "label_convention", "weights_sha256")


#: config.json key of the spacing (mm per canonical RAS+ voxel axis) the model runs at.
SPACING_KEY = "target_spacing"


@dataclass
class CheckpointInfo:
    """What config.json says besides the network: how to feed the model and what it produced.

    ``spacing``: the voxel size (mm, per canonical RAS+ voxel axis, as ``LoadedCase.spacing``)
    the model was trained at and runs at (config.json ``"target_spacing"``): inference resamples
    a case of another spacing to it (:mod:`ciml_core.infer`). None (checkpoints written before
    it was recorded): every case runs at its own, native spacing.
    """

    label_convention: str
    normalisation: dict[str, Any] = field(default_factory=lambda: {"pet_method": "log"})
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.spacing is not None:
            value = self.spacing
            value = value.tolist() if hasattr(value, "tolist") else value  # a numpy array
            self.spacing = check_spacing(list(value) if isinstance(value, tuple) else value,
                                         "CheckpointInfo.spacing")


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


def check_spacing(value: Any, what: str = SPACING_KEY) -> tuple[float, float, float]:
    """``value`` as three positive, finite voxel sizes in mm, else a :class:`CheckpointError`
    naming ``what``."""
    ok = (isinstance(value, list | tuple) and len(value) == 3
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                  and math.isfinite(v) and v > 0 for v in value))
    if not ok:
        raise CheckpointError(f"{what} = {json.dumps(value, default=str)[:80]}; expected three "
                              "positive voxel sizes in mm (canonical RAS+ axis order) or null")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


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


def config_digest(document: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``document`` without its
    ``config_sha256`` field: what format 2 stores in that field."""
    body = {k: v for k, v in document.items() if k != CONFIG_HASH_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal_config(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` as a current-format config.json: ``format_version`` set to
    :data:`FORMAT_VERSION` and ``config_sha256`` to :func:`config_digest` of the rest."""
    sealed = {k: v for k, v in document.items() if k != CONFIG_HASH_KEY}
    sealed["format_version"] = FORMAT_VERSION
    sealed[CONFIG_HASH_KEY] = config_digest(sealed)
    return sealed


def _config_text(document: dict[str, Any]) -> str:
    return json.dumps(seal_config(document), indent=2) + "\n"


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
    # Built beside ``path``, then swapped in whole (ciml_core.io: modes 0755/0644, never a
    # half-replaced folder).
    with _io.dir_output(path) as tmp:
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
        if info.spacing is not None:
            document[SPACING_KEY] = list(info.spacing)
        (tmp / CONFIG).write_text(_config_text(document))
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE)
    return path


def read_checkpoint_config(path: str | os.PathLike, *, verify_hash: bool = True) -> dict[str, Any]:
    """Read and check ``config.json`` of a checkpoint (keys, format, and the weights' hash)."""
    folder = resolve_checkpoint(path)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for required in (config_path, weights_path):
        if not required.is_file():
            raise CheckpointError(f"{folder}: {required.name} is missing")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(document, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in document]
    if missing:
        raise CheckpointError(f"{config_path}: missing key(s) {missing}")
    version = document["format_version"]
    if document["format"] != FORMAT or not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format {document['format']!r} version {version!r} is not a {FORMAT} "
            f"checkpoint of version 1..{FORMAT_VERSION} (an integer)"
        )
    if version >= 2:
        stored = document.get(CONFIG_HASH_KEY)
        if not isinstance(stored, str):
            raise CheckpointError(f"{config_path}: missing key(s) ['{CONFIG_HASH_KEY}'] (format "
                                  f"version {version} stores the hash of its fields)")
        actual = config_digest(document)
        if actual != stored:
            raise CheckpointError(
                f"{config_path}: {CONFIG_HASH_KEY} {stored[:12]}... does not match its content "
                f"({actual[:12]}...); config.json was edited after saving (a changed label "
                "convention, task or region would write wrong labels)"
            )
    if verify_hash:
        if not isinstance(document["weights_sha256"], str):
            raise CheckpointError(f"{config_path}: 'weights_sha256' must be a hex string, got "
                                  f"{document['weights_sha256']!r}")
        actual = sha256_file(weights_path)
        if actual != document["weights_sha256"]:
            raise CheckpointError(
                f"{weights_path}: sha256 {actual[:12]}... does not match config.json "
                f"({str(document['weights_sha256'])[:12]}...); the weights were changed after saving"
            )
    _check_fields(document, config_path)
    return document


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(document: dict[str, Any], config_path: Path) -> None:
    """Every field a loader reads has the type and values it needs (errors name the field)."""
    from ciml_core.data.labels import LABEL_CONVENTIONS

    def bad(field_name: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{config_path}: field {field_name!r} = "
                               f"{json.dumps(document.get(field_name))[:80]}; expected {expected}")

    if not isinstance(document["model"], dict):
        raise bad("model", "an object (the network config)")
    convention = document["label_convention"]
    if not isinstance(convention, str) or convention not in LABEL_CONVENTIONS:
        raise bad("label_convention", f"one of {sorted(LABEL_CONVENTIONS)}")
    normalisation = document.get("normalisation", {"pet_method": "log"})
    if not isinstance(normalisation, dict):
        raise bad("normalisation", "an object such as {\"pet_method\": \"log\"}")
    if normalisation.get("pet_method", "log") not in PET_METHODS:
        raise CheckpointError(f"{config_path}: field 'normalisation.pet_method' = "
                              f"{normalisation.get('pet_method')!r}; expected one of "
                              f"{list(PET_METHODS)}")
    for name in ("training", "metrics"):
        if not isinstance(document.get(name, {}), dict):
            raise bad(name, "an object")
    for name in ("modalities", "regions", "patch_size"):
        value = document.get(name)
        if value is not None and not isinstance(value, list):
            raise bad(name, "a list")
    if document.get(SPACING_KEY) is not None:
        try:
            check_spacing(document[SPACING_KEY])
        except CheckpointError:
            raise bad(SPACING_KEY, "three positive voxel sizes in mm (canonical RAS+ axis "
                      "order), or null") from None


def _check_model(document: dict[str, Any], config: ModelConfig, folder: Path) -> None:
    """The config's summary fields agree with its network section, the label convention's
    regions are the model's, and the patch is of a plausible size."""
    from ciml_core.data.labels import get_convention

    config_path = folder / CONFIG
    if math.prod(config.patch_size) > MAX_PATCH_VOXELS:
        raise CheckpointError(f"{config_path}: field 'model.patch_size' = "
                              f"{list(config.patch_size)} is larger than any supported window "
                              f"(at most {MAX_PATCH_VOXELS:,} voxels)")
    summary = {"modalities": list(config.decomposition.modalities),
               "regions": list(config.decomposition.regions),
               "patch_size": list(config.patch_size)}
    for name, expected in summary.items():
        if name in document and document[name] != expected:
            raise CheckpointError(f"{config_path}: field {name!r} = {document[name]} disagrees "
                                  f"with the network section ('model': {expected})")
    regions = get_convention(document["label_convention"]).region_names
    if config.variant != "shapecomposition" and not set(regions) <= set(summary["regions"]):
        raise CheckpointError(
            f"{config_path}: field 'label_convention' = {document['label_convention']!r} needs "
            f"regions {list(regions)}, the model predicts {summary['regions']}")


class _NoInitOnMeta(TorchFunctionMode):
    """Skip the random initialisation of meta tensors (it computes nothing there, and on the meta
    device it runs through slow Python decompositions): halves the cost of the meta build."""

    _INIT = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._INIT and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _build_checked(config: ModelConfig, weights_path: Path) -> nn.Module:
    """The network of ``config``, after checking that ``weights_path`` fits it.

    The network is first built on the meta device (shapes only, no memory) and compared with the
    stored tensors' names and shapes (read from the safetensors header, no data): a config
    claiming a huge width is refused before anything is allocated. Then it gets real, empty
    storage (every tensor is about to be overwritten by the weights, so the random
    initialisation is skipped), unless some state lives outside ``state_dict`` (a non-persistent
    buffer), in which case it is built normally.
    """
    with torch.device("meta"), _NoInitOnMeta():
        meta = build_model(config)
    _check_weights_fit(meta, config, weights_path)
    stored = {id(t) for t in meta.state_dict(keep_vars=True).values()}
    every = [*meta.parameters(), *meta.buffers()]
    if all(id(t) in stored for t in every):
        return meta.to_empty(device="cpu")
    return build_model(config)


def _check_weights_fit(meta: nn.Module, config: ModelConfig, weights_path: Path) -> None:
    """Raise CheckpointError unless the tensors in ``weights_path`` are exactly those of
    ``meta`` (the network on the meta device): names, shapes and total size."""
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    needed = sum(t.numel() for t in {id(t): t for t in
                                     meta.state_dict(keep_vars=True).values()}.values())
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            stored = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({err})") from err
    held = sum(math.prod(s) for s in stored.values())
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in stored if k in expected and stored[k] != expected[k])
    details = []
    if unexpected:
        details.append(f"unexpected tensors {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k in wrong[:3]:
        details.append(f"{k} has shape {stored[k]}, the config needs {expected[k]}")
    if not details and needed != held:
        details.append(f"the config describes a network of {needed:,} values (width "
                       f"{config.width}), the file holds {held:,}")
    if details:
        raise CheckpointError(f"{weights_path} does not match its config.json: "
                              + "; ".join(details))


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network of a checkpoint and load its weights (eval mode, on ``device``)."""
    folder = resolve_checkpoint(path)
    document = read_checkpoint_config(folder)
    try:
        config = ModelConfig.from_dict(document["model"])
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG}: invalid 'model' section ({err})") from err
    _check_model(document, config, folder)
    model = _build_checked(config, folder / WEIGHTS)  # checked before anything is allocated
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
        spacing=document_spacing(document),
    )
    return LoadedModel(model, config, info, folder, document["weights_sha256"])


def document_spacing(document: dict[str, Any]) -> tuple[float, float, float] | None:
    """The target spacing a (checked) config.json records, None when it records none."""
    value = document.get(SPACING_KEY)
    return None if value is None else check_spacing(value)


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
    with _io.dir_output(dst) as tmp:
        save_file(weights, str(tmp / WEIGHTS))
        document = {**document, "weights_dtype": "float16" if half else "float32",
                    "weights_sha256": sha256_file(tmp / WEIGHTS)}
        (tmp / CONFIG).write_text(_config_text(document))
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


@dataclass(frozen=True)
class CheckpointSummary:
    """What a person wants to know about a checkpoint, read from its ``config.json`` (the
    ``model`` section is the one source of the architecture; the top-level ``modalities``,
    ``regions`` and ``patch_size`` keys only mirror it for readers of the file)."""

    folder: Path
    is_demo: bool  # the bundled demo model
    config: ModelConfig
    parameters: int | None
    label_convention: str
    training: dict[str, Any]
    metrics: dict[str, Any]
    weights_sha256: str
    package_version: str
    spacing: tuple[float, float, float] | None = None

    def spacing_text(self) -> str:
        """What the model does about voxel spacing, in one phrase."""
        from ciml_core.data.preprocess import format_spacing

        if self.spacing is None:
            return "not recorded: cases run at their native spacing"
        return (f"{format_spacing(self.spacing)} (cases of another spacing are resampled to it "
                "unless native spacing is asked for)")

    def lines(self, *, brief: bool = False) -> list[str]:
        """``ciml-core info``'s text, or (``brief``) the few lines the Segment widget shows."""
        c = self.config
        d = c.decomposition
        patch = "x".join(str(p) for p in c.patch_size)
        cfg = self.training.get("config", {}) or {}
        epochs = self.training.get("epochs_completed")
        dice = self.metrics.get("val_dice")
        if brief:
            trained = (f"{epochs}/{cfg.get('epochs', '?')} epochs" if epochs is not None
                       else "training record absent")
            lines = ["bundled demo" if self.is_demo else str(self.folder),
                     f"variant {c.variant}, C={c.width}, patch {patch}",
                     f"spacing {self.spacing_text()}",
                     f"{', '.join(d.modalities)} -> {', '.join(d.regions)} "
                     f"({self.label_convention})",
                     f"{trained}; sha256 {self.weights_sha256[:12]}"]
            if isinstance(dice, dict):
                lines.append("val Dice " + ", ".join(f"{k} {v:.2f}" for k, v in dice.items()))
            return lines
        parameters = f", {self.parameters:,} parameters" if self.parameters is not None else ""
        lines = [f"checkpoint      {self.folder}",
                 f"package         napari-ciml {self.package_version}",
                 f"variant         {c.variant} (width C={c.width}, norm {c.norm}, patch "
                 f"{list(c.patch_size)}{parameters})",
                 f"modalities      {', '.join(d.modalities)}",
                 f"regions         {', '.join(d.regions)} (labels: {self.label_convention})",
                 f"spacing         {self.spacing_text()}",
                 "decomposition"]
        lines += [f"  {task.name:>12} -> {', '.join(task.regions)}" for task in d.tasks]
        if cfg:
            lines.append(f"training        {self.training.get('epochs_completed', '?')}/"
                         f"{cfg.get('epochs')} epochs x {cfg.get('iters_per_epoch')} iterations, "
                         f"batch {cfg.get('batch')}, seed {cfg.get('seed')}, "
                         f"{self.training.get('seconds', '?')} s, data "
                         f"{self.training.get('data')}")
        if self.metrics:
            lines.append(f"metrics         {json.dumps(self.metrics)}")
        lines.append(f"weights sha256  {self.weights_sha256}")
        return lines


def describe(model: str | os.PathLike | LoadedModel) -> CheckpointSummary:
    """A :class:`CheckpointSummary` of a checkpoint (``"demo"``, a folder, or a loaded model;
    a folder is checked as :func:`read_checkpoint_config` does, its weights are not loaded)."""
    from ciml_core.model import count_parameters

    if isinstance(model, LoadedModel):
        folder, parameters = model.path, count_parameters(model.model)
    else:
        folder, parameters = resolve_checkpoint(model), None
    document = read_checkpoint_config(folder)
    try:
        config = ModelConfig.from_dict(document["model"])
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG}: invalid 'model' section ({err})") from err
    return CheckpointSummary(
        folder=Path(folder), is_demo=Path(folder).resolve() == DEMO_CHECKPOINT.resolve(),
        config=config, parameters=parameters,
        label_convention=document["label_convention"], training=document.get("training", {}),
        metrics=document.get("metrics", {}), weights_sha256=document["weights_sha256"],
        package_version=document.get("package_version", "?"), spacing=document_spacing(document))
