"""Training, top to bottom: data -> model -> optimiser -> epochs of patches -> validation ->
checkpoints. One code path for one CPU, one GPU and many GPUs (torchrun + DDP).

Run layout (``--out RUN``)::

    RUN/train_config.json   the settings of this run (what --resume continues)
    RUN/splits.json         5-fold cross-validation split
    RUN/cache/<key>/        preprocessed cases, memory-mappable (ciml_core.data.cache)
    RUN/metrics.jsonl       one line per epoch: losses, learning rate, validation Dice
    RUN/latest/             checkpoint + training_state.pt, written every epoch and on Ctrl-C
    RUN/best/               checkpoint with the best mean validation Dice
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm.auto import tqdm

from ciml_core.checkpoint import (
    WEIGHTS,
    CheckpointInfo,
    LoadedModel,
    load_training_state,
    load_weights,
    read_checkpoint_config,
    save_checkpoint,
)
from ciml_core.data.augment import nnunet_augmentations
from ciml_core.data.batch_augment import BatchAugment
from ciml_core.data.cache import (
    CacheReport,
    PreparedCase,
    PreprocessSettings,
    case_spacing,
    prepare_cases,
    wait_for_cases,
)
from ciml_core.data.layouts import DEFAULT_LABEL_CONVENTION, discover_cases
from ciml_core.data.patches import PatchDataset
from ciml_core.data.preprocess import target_spacing
from ciml_core.data.splits import fold_cases, load_or_make_splits
from ciml_core.errors import ConfigError, InputDataError
from ciml_core.infer import InferenceSettings, sliding_window_predict
from ciml_core.io import append_bytes, atomic_write_text
from ciml_core.metrics import dice as dice_score
from ciml_core.model import (
    CIMLLoss,
    ModelConfig,
    TaskDecomposition,
    build_model,
    recalibrate_batch_norm,
)
from ciml_core.model import probabilities_to_region_masks as to_masks
from ciml_core.model.config import GATE_SWITCHES, check_spatial_size
from ciml_core.model.fused import training_network
from ciml_core.runtime import DistContext, barrier, cleanup, setup_distributed, shard

#: Settings that define the schedule; --resume refuses to change them.
SCHEDULE_KEYS = ("epochs", "iters_per_epoch", "patch", "batch", "width", "variant", "beta",
                 "norm", "seed", "fold", "lr", "weight_decay", "decomposition",
                 "region_weighting", "message_dropout", "warmup_epochs", "beta_ramp_epochs",
                 "et_oversampling", "region_sampling", "bn_recalibration", "augment", "init",
                 "spacing")


@dataclass
class TrainConfig:
    """Everything ``ciml-core train`` accepts. Defaults follow the paper (4.2) where it says."""

    out: Path
    data: Path | None = None  # None: generate phantoms (demo)
    layout: str = "auto"
    labels: str | None = None  # label convention; default from the layout
    fold: int = 0  # -1: train on all cases, no validation
    epochs: int = 50
    iters_per_epoch: int = 100
    patch: int = 64
    batch: int = 2
    width: int = 16
    variant: str = "full"
    decomposition: dict[str, Any] | None = None  # TaskDecomposition.to_dict(); None: the default
    beta: float = 0.5
    norm: str = "batch"
    lr: float = 1e-4
    weight_decay: float = 3e-5
    # Additions to the paper against the ET collapse (docs/method.md, "Training additions");
    # the paper's recipe is region_weighting "head", 0, 0, 0, et_oversampling 1, 0.
    region_weighting: str = "region"  # CIMLLoss: "region" (each region weighs 1) or "head"
    message_dropout: float = 0.3  # probability of zeroing a sample's c_s in a segmentor
    warmup_epochs: int = 4  # linear learning-rate warm-up before the poly decay
    beta_ramp_epochs: int = 10  # beta grows linearly from 0 over these epochs
    et_oversampling: float = 3.0  # weight of ET (vs 1 for the others) among foreground centres
    region_sampling: list[float] | None = None  # explicit weight per region (overrides the above)
    bn_recalibration: int = 16  # batches to recompute batch-norm statistics (z = mu) with
    init: str | None = None  # start from this checkpoint's weights (fine-tuning)
    spacing: list[float] | None = None  # target spacing (mm); None: median of the cases (nnU-Net)
    device: str = "auto"
    seed: int = 0
    val_every: int = 5
    workers: int = 2
    preprocess_workers: int = 1  # processes that build the preprocessed cache
    augment: bool = True
    compile: bool = False
    augment_on_device: bool = False  # augment whole batches on the training device (GPU)
    # Run the segmentors as grouped layers (model/fused.py): same gradients; on the 2-core CPU
    # x0.72 the step time of the unfused network in fp32 (docs/performance.md).
    fused: bool = True
    demo_cases: int = 16
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["data"] = str(self.data) if self.data is not None else None
        return d


def training_decomposition(cfg: TrainConfig, modalities: tuple[str, ...]) -> TaskDecomposition:
    """``cfg.decomposition`` checked against the dataset's modalities, or the default for them."""
    if cfg.decomposition is None:
        return default_decomposition(modalities)
    decomposition = TaskDecomposition.from_dict(cfg.decomposition)
    if set(decomposition.modalities) != set(modalities):
        raise ConfigError(f"task decomposition: its modalities {list(decomposition.modalities)} "
                          f"are not the dataset's {list(modalities)}")
    return decomposition


def default_decomposition(modalities: tuple[str, ...]) -> TaskDecomposition:
    """The paper's decomposition for the modalities a dataset has."""
    for candidate in (TaskDecomposition.brats(), TaskDecomposition.petct()):
        if set(candidate.modalities) == set(modalities):
            return candidate
    raise ConfigError(f"no default task decomposition for modalities {list(modalities)}; "
                      "known: BraTS (flair, t1, t1ce, t2) and PET/CT (ct, pet)")


def poly_lr(epoch: int, epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly schedule (paper eq. 13), as a factor of the initial learning rate; 0 from
    ``epochs`` on (never negative or complex, whatever epoch a resumed scheduler reaches)."""
    return max(1 - epoch / epochs, 0.0) ** exponent


def lr_factor(epoch: int, epochs: int, warmup_epochs: int = 0) -> float:
    """Learning-rate factor of ``epoch``: a linear warm-up over ``warmup_epochs`` (epoch 0 gets
    1 / (warmup_epochs + 1)), times :func:`poly_lr`."""
    warmup = min((epoch + 1) / (warmup_epochs + 1), 1.0) if warmup_epochs > 0 else 1.0
    return warmup * poly_lr(epoch, epochs)


def beta_factor(epoch: int, ramp_epochs: int) -> float:
    """Factor of beta in ``epoch``: 0 at epoch 0, growing linearly to 1 at ``ramp_epochs``."""
    return min(epoch / ramp_epochs, 1.0) if ramp_epochs > 0 else 1.0


class _SkipSampler(Sampler):
    """Yield an inner sampler's indices after the first ``skip`` (resuming mid-epoch)."""

    def __init__(self, inner: Sampler, skip: int) -> None:
        self.inner, self.skip = inner, skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.inner)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)


def _prepare_data(cfg: TrainConfig, ctx: DistContext) -> tuple:
    """Discover cases, split, preprocess to the cache. Returns the pieces the loop needs."""
    data = cfg.data
    if data is None:  # demo: the project's own phantoms, generated once into the run folder
        from ciml_core.data.phantoms import write_phantom_dataset

        data = cfg.out / "phantoms"
        if ctx.is_main and not (data / "done").exists():
            write_phantom_dataset("brats", cfg.demo_cases, data, seed=1000, overwrite=True)
            atomic_write_text(data / "done", "ok\n", overwrite=True)
        barrier(ctx)
    cases = discover_cases(data, cfg.layout)
    layout = cases[0].layout
    convention = cfg.labels or DEFAULT_LABEL_CONVENTION[layout]
    unlabelled = [c.case_id for c in cases if c.label is None]
    if unlabelled:
        raise InputDataError(f"{data}: training needs labels; cases without one: {unlabelled[:5]}")
    decomposition = training_decomposition(cfg, cases[0].modalities)
    splits = load_or_make_splits(cfg.out / "splits.json", [c.case_id for c in cases])
    train_ids, val_ids = fold_cases(splits, cfg.fold)
    by_id = {c.case_id: c for c in cases}
    # nnU-Net: every case is resampled to one target spacing (the cases' median unless given),
    # which the checkpoint records so that inference resamples to it too.
    spacing = (tuple(float(v) for v in cfg.spacing) if cfg.spacing is not None
               else target_spacing([case_spacing(by_id[i]) for i in train_ids or list(by_id)]))
    settings = PreprocessSettings(decomposition.modalities, decomposition.regions, convention,
                                  spacing=spacing)
    if ctx.is_main:  # one process preprocesses; the others poll for its completion marker
        cases_prepared, report = prepare_cases(list(by_id.values()), settings, cfg.out / "cache",
                                               workers=cfg.preprocess_workers, progress=True)
    else:
        cases_prepared = wait_for_cases(list(by_id), settings, cfg.out / "cache")
        report = None
    prepared = {p.case_id: p for p in cases_prepared}
    return (decomposition, convention, [prepared[i] for i in train_ids],
            [prepared[i] for i in val_ids], str(data), report, spacing)


def foreground_region_weights(cfg: TrainConfig, regions: tuple[str, ...]) -> list[float] | None:
    """Weights of the regions among foreground patch centres: ``cfg.region_sampling`` when
    given, else ET weighted ``cfg.et_oversampling`` against 1 for every other region (None:
    uniform)."""
    if cfg.region_sampling is not None:
        if len(cfg.region_sampling) != len(regions):
            raise ConfigError(f"--region-sampling: {len(cfg.region_sampling)} weights for the "
                              f"{len(regions)} regions {list(regions)}")
        return [float(w) for w in cfg.region_sampling]
    if "ET" not in regions or cfg.et_oversampling == 1:
        return None
    return [float(cfg.et_oversampling) if r == "ET" else 1.0 for r in regions]


def recalibration_batches(cfg: TrainConfig, cases: list[PreparedCase], device: torch.device,
                          count: int, regions_weights: list[float] | None = None
                          ) -> Iterator[torch.Tensor]:
    """``count`` training-distribution image batches (augmented patches, a seed of their own so
    that training's patch stream is untouched) for :func:`recalibrate_batch_norm`."""
    dataset = PatchDataset(cases, (cfg.patch,) * 3, length=count * cfg.batch,
                           augment=nnunet_augmentations(3) if cfg.augment else None,
                           region_weights=regions_weights, seed=cfg.seed + 7919)
    for start in range(0, count * cfg.batch, cfg.batch):
        yield torch.stack([dataset[i][0] for i in range(start, start + cfg.batch)]).to(device)


def validate(loaded: LoadedModel, cases: list[PreparedCase],
             settings: InferenceSettings | None = None,
             ctx: DistContext | None = None) -> dict[str, float]:
    """Mean Dice per region over whole validation cases (sliding window, as ``predict``).

    Under torchrun (``ctx`` with several ranks) each rank scores its share of the cases
    (:func:`~ciml_core.runtime.shard`) and every rank gets the mean over all of them."""
    distributed = ctx is not None and ctx.enabled
    if distributed:
        # DDP broadcasts buffers at the start of a forward, so after the last step each rank
        # holds the batch-norm statistics of its own batch: score with rank 0's (what is saved).
        for buffer in loaded.model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    mine = shard(cases, ctx) if distributed else cases
    per_case: list[dict[str, float]] = []
    for case in mine:
        image, regions, _ = case.load(mmap=False)  # the whole case is read anyway
        probs = sliding_window_predict(loaded.model, image, loaded.config.patch_size, settings)
        masks = to_masks(torch.from_numpy(probs)[None], loaded.regions)[0].numpy()
        per_case.append({region: dice_score(masks[i], regions[i] > 0)
                         for i, region in enumerate(loaded.regions)})
    if distributed:
        gathered: list[list[dict[str, float]]] = [[] for _ in range(ctx.world_size)]
        torch.distributed.all_gather_object(gathered, per_case)
        per_case = [score for part in gathered for score in part]
    return {r: float(np.mean([score[r] for score in per_case])) for r in loaded.regions}


#: Settings a resumed run may change: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = ("device", "workers", "preprocess_workers")


def _stored_config(out: Path) -> dict[str, Any]:
    path = out / "train_config.json"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} not found; nothing to resume in {out}")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--resume: {path} is not readable JSON ({err})") from err
    if not isinstance(stored, dict):
        raise ConfigError(f"--resume: {path}: expected a JSON object of the run's settings")
    return stored


def _compare_with_stored(out: Path, stored: dict[str, Any], given: dict[str, Any]) -> None:
    """Refuse every given setting that differs from the run being resumed."""
    comparable = {k: v for k, v in given.items()
                  if k not in RESUMABLE_CHANGES + ("out", "resume", "extra", "compile")}
    changed = {k: (stored.get(k), v) for k, v in comparable.items() if stored.get(k) != v}
    if "data" in changed and None not in changed["data"] \
            and Path(changed["data"][0]).resolve() == Path(changed["data"][1]).resolve():
        del changed["data"]  # the same folder, named relative once and absolute once
    if "data" in changed and changed["data"][1] is not None:
        changed["data"] = (changed["data"][0], str(changed["data"][1]))
    if changed:
        detail = "; ".join(f"{k}: run has {old!r}, given {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(f"--resume {out}: settings differ from the run being resumed ({detail}); "
                          f"only {list(RESUMABLE_CHANGES)} may change on resume")


def resume_config(out: str | os.PathLike, **given: Any) -> TrainConfig:
    """The settings of the run in ``out`` to continue, with ``given`` settings checked against it.

    Settings not given are the run's; a given one must equal the run's, except
    :data:`RESUMABLE_CHANGES`. The run continues in ``out`` even when it was started elsewhere
    (a copied or moved run folder), never in the folder its ``train_config.json`` names.
    """
    out = Path(out)
    stored = _stored_config(out)
    _compare_with_stored(out, stored, given)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {k: v for k, v in stored.items() if k in known}
    merged.update({k: v for k, v in given.items() if k in RESUMABLE_CHANGES})
    merged.update(out=out, resume=True)
    merged["data"] = Path(merged["data"]) if merged.get("data") else None
    try:
        return TrainConfig(**merged)
    except TypeError as err:
        raise ConfigError(f"--resume: {out / 'train_config.json'}: {err}") from err


def _check_resume(cfg: TrainConfig) -> TrainConfig:
    """``TrainConfig(resume=True, ...)``: every setting must equal the stored run's (use
    :func:`resume_config` to give only some)."""
    given = cfg.to_dict()
    given["data"] = cfg.data
    del given["out"]
    return resume_config(cfg.out, **given)


def _load_initial_weights(model: torch.nn.Module, config: ModelConfig, init: str) -> None:
    """Fine-tuning: load a checkpoint's weights into ``model``, refusing another architecture."""
    from ciml_core.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(init)
    stored = read_checkpoint_config(path)  # verifies the weights' hash
    theirs = ModelConfig.from_dict(stored["model"])
    fields = ("decomposition", "width", "variant", "norm", "spatial_dims", "dilation")
    differ = [f for f in fields if getattr(theirs, f) != getattr(config, f)]
    if differ:
        raise ConfigError(
            f"--init {init}: the checkpoint's {differ} differ from this run's "
            f"({ {f: str(getattr(theirs, f)) for f in differ} } vs "
            f"{ {f: str(getattr(config, f)) for f in differ} }); fine-tune with the same settings")
    load_weights(model, load_file(str(path / WEIGHTS)), path)


@dataclass
class TrainResult:
    run_dir: Path
    model: torch.nn.Module  # the trained network (this rank's copy)
    epochs_completed: int
    cache_report: CacheReport | None = None  # what this rank preprocessed (None: it waited)


def train(cfg: TrainConfig, *, hook: Callable[[str, int, int], None] | None = None) -> TrainResult:
    """Train a model. See the module docstring for what it writes into ``cfg.out``.

    ``hook(event, epoch, step)`` (tests, tools) is called after each optimiser step
    (``"step"``), before validation (``"validate"``) and after the epoch's checkpoint
    (``"saved"``). Ctrl-C and SIGTERM stop the run at the next step boundary after saving
    ``latest``; :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is then raised.
    """
    cfg.out = Path(cfg.out)
    if cfg.resume:
        cfg = _check_resume(cfg)
    elif (cfg.out / "latest").exists():
        raise ConfigError(f"{cfg.out} already holds a run; use --resume to continue it or "
                          "choose another --out")
    check_spatial_size((cfg.patch,) * 3, 3, what="--patch")
    ctx = setup_distributed(cfg.device)
    stop = StopRequest.install()
    try:
        return _train(cfg, ctx, stop, hook)
    finally:
        stop.uninstall()
        cleanup(ctx)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving ``latest``; ``--resume`` continues it."""


class StopRequest:
    """SIGINT / SIGTERM set a flag that the loop checks between optimiser steps, so that a
    signal never lands inside a step, a validation or a checkpoint write (resuming then
    continues exactly where the run stopped). A second signal aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls) -> StopRequest:
        request = cls()
        if threading.current_thread() is threading.main_thread():  # else signals cannot be set
            for signum in cls.SIGNALS:
                request._previous[signum] = signal.signal(signum, request._handle)
        return request

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.signum = signum
        tqdm.write(f"signal {signum}: stopping after this step (again to abort without saving)")

    def __bool__(self) -> bool:
        return self.signum is not None

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


@dataclass
class _Run:
    """One training run between its epochs: what :func:`_setup` builds and the loop updates."""

    cfg: TrainConfig
    ctx: DistContext
    decomposition: TaskDecomposition
    train_cases: list[PreparedCase]
    val_cases: list[PreparedCase]
    dataset: PatchDataset
    model: torch.nn.Module  # this rank's network
    net: torch.nn.Module  # what the steps run: the model, wrapped in DDP / compiled when asked
    model_config: ModelConfig
    loss_fn: CIMLLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    info: CheckpointInfo
    start_epoch: int = 0
    start_step: int = 0  # optimiser steps already done in ``start_epoch`` (mid-epoch resume)
    best: float = -math.inf
    cache_report: CacheReport | None = None  # what this rank preprocessed (None: it waited)
    batch_augment: BatchAugment | None = None  # augmentations on the device (else in the loader)
    t_start: float = field(default_factory=time.time)

    def save(self, name: str, epoch: int, step: int) -> None:
        state = {"epoch": epoch, "step": step, "best": self.best,
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        self.info.training.update(epochs_completed=epoch,
                                  seconds=round(time.time() - self.t_start, 1))
        save_checkpoint(self.cfg.out / name, self.model, self.model_config, self.info,
                        training_state=state if name == "latest" else None)

    def recalibrate(self) -> None:
        if self.cfg.bn_recalibration > 0:
            recalibrate_batch_norm(self.model, recalibration_batches(
                self.cfg, self.train_cases, self.ctx.device, self.cfg.bn_recalibration,
                foreground_region_weights(self.cfg, self.decomposition.regions)))

    def validate(self) -> dict[str, float]:
        loaded = LoadedModel(self.model, self.model_config, self.info, self.cfg.out, "")
        return validate(loaded, self.val_cases, InferenceSettings(device=self.ctx.device),
                        self.ctx)


def _setup(cfg: TrainConfig, ctx: DistContext) -> _Run:
    """Data, model, loss, optimiser and schedule; from ``latest`` when resuming."""
    torch.manual_seed(cfg.seed)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if ctx.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n",
                          overwrite=True)

    (decomposition, convention, train_cases, val_cases, data_desc, report,
     spacing) = _prepare_data(cfg, ctx)
    patch = (cfg.patch,) * 3
    on_device = cfg.augment and cfg.augment_on_device
    dataset = PatchDataset(
        train_cases, patch, length=cfg.iters_per_epoch * cfg.batch * ctx.world_size,
        augment=nnunet_augmentations(3) if cfg.augment and not on_device else None,
        region_weights=foreground_region_weights(cfg, decomposition.regions), seed=cfg.seed)

    dropout = cfg.message_dropout if cfg.variant in GATE_SWITCHES else 0.0
    model_config = ModelConfig(decomposition=decomposition, width=cfg.width, norm=cfg.norm,
                               variant=cfg.variant, patch_size=patch, message_dropout=dropout)
    model = build_model(model_config).to(ctx.device)
    if cfg.init and not cfg.resume:
        _load_initial_weights(model, model_config, cfg.init)
    loss_fn = CIMLLoss(decomposition, beta=cfg.beta, weighting=cfg.region_weighting)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, cfg.epochs, cfg.warmup_epochs))
    start_epoch, start_step, best = 0, 0, -math.inf
    if cfg.resume:
        read_checkpoint_config(cfg.out / "latest")  # verifies the weights' hash
        load_weights(model, load_file(str(cfg.out / "latest" / WEIGHTS)), cfg.out / "latest")
        state = load_training_state(cfg.out / "latest")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_step, best = state["epoch"], state["step"], state["best"]
        torch.set_rng_state(state["torch_rng"])
    # The steps run the fused view of the same parameters (model/fused.py); the optimiser,
    # checkpoints, validation and batch-norm recalibration use ``model`` itself.
    net = training_network(model, fused=cfg.fused)
    net = DistributedDataParallel(net) if ctx.enabled else net
    if cfg.compile:
        net = torch.compile(net)
    info = CheckpointInfo(label_convention=convention, spacing=spacing,
                          training={"config": cfg.to_dict(), "data": data_desc,
                                    "train_cases": [c.case_id for c in train_cases],
                                    "val_cases": [c.case_id for c in val_cases],
                                    "world_size": ctx.world_size})
    return _Run(cfg, ctx, decomposition, train_cases, val_cases, dataset, model, net,
                model_config, loss_fn, optimizer, scheduler, info, start_epoch, start_step, best,
                cache_report=report, batch_augment=BatchAugment(3) if on_device else None)


def _stop_requested(run: _Run, stop: StopRequest) -> bool:
    """Whether any rank got a signal (all ranks must stop at the same step)."""
    if not run.ctx.enabled:
        return bool(stop)
    flag = torch.tensor([float(bool(stop))], device=run.ctx.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _interrupted(run: _Run, stop: StopRequest, epoch: int, step: int) -> TrainingInterrupted:
    """Save ``latest`` at this step and say how to continue."""
    if run.ctx.is_main:
        run.save("latest", epoch, step)
        tqdm.write(f"interrupted: saved {run.cfg.out / 'latest'} at epoch {epoch + 1}, step "
                   f"{step}; continue with --resume")
    return TrainingInterrupted(f"signal {stop.signum}")


def _epoch_loader(run: _Run, epoch: int, skip: int) -> DataLoader:
    """The epoch's patches, the first ``skip`` samples left out (a mid-epoch resume)."""
    cfg, ctx = run.cfg, run.ctx
    sampler = (DistributedSampler(run.dataset, shuffle=False) if ctx.enabled
               else range(len(run.dataset)))
    if ctx.enabled:
        sampler.set_epoch(epoch)
    run.dataset.set_epoch(epoch)
    # A generator of its own: the loader's seed draw must not advance the global RNG that the
    # CIG sampling and message dropout use, or a resumed epoch would sample differently.
    return DataLoader(run.dataset, batch_size=cfg.batch,
                      sampler=_SkipSampler(sampler, skip) if skip else sampler,
                      num_workers=cfg.workers, pin_memory=ctx.device.type == "cuda",
                      drop_last=True,
                      generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))


def _train_epoch(run: _Run, epoch: int, stop: StopRequest, notify: Callable[[str, int, int], None]
                 ) -> dict[str, Any]:
    """The optimiser steps of one epoch; returns the epoch's log record (mean losses, lr).
    Raises :class:`TrainingInterrupted` (after saving ``latest``) on a signal."""
    cfg, ctx = run.cfg, run.ctx
    skip = run.start_step * cfg.batch if epoch == run.start_epoch else 0
    loader = _epoch_loader(run, epoch, skip)
    run.net.train()
    run.loss_fn.beta = cfg.beta * beta_factor(epoch, cfg.beta_ramp_epochs)
    sums: dict[str, float] = {}
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
               disable=not ctx.is_main, initial=skip // cfg.batch,
               total=cfg.iters_per_epoch, dynamic_ncols=True)
    done = skip // cfg.batch  # optimiser steps completed in this epoch
    if done < cfg.iters_per_epoch and _stop_requested(run, stop):
        raise _interrupted(run, stop, epoch, done)
    for x, y in bar:
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        if run.batch_augment is not None:  # seeded by the step: same on a resume
            x, y = run.batch_augment(x, y, seed=(cfg.seed, epoch, done, ctx.rank))
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16,
                            enabled=ctx.device.type == "cuda"):
            output = run.net(x)
        loss, parts = run.loss_fn(output, y)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        done += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{parts['total']:.3f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
        notify("step", epoch, done)
        if done < cfg.iters_per_epoch and _stop_requested(run, stop):
            bar.close()
            raise _interrupted(run, stop, epoch, done)
    n = max(cfg.iters_per_epoch - (skip // cfg.batch), 1)
    return {"epoch": epoch + 1, "lr": run.scheduler.get_last_lr()[0],
            **{k: v / n for k, v in sums.items()}, "time": round(time.time() - run.t_start, 1)}


def _end_epoch(run: _Run, epoch: int, record: dict[str, Any],
               notify: Callable[[str, int, int], None]) -> None:
    """Every rank: validate when due (each rank its share of the cases); rank 0: keep ``best``,
    log the epoch and save ``latest``."""
    cfg = run.cfg
    if run.val_cases and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
        notify("validate", epoch, cfg.iters_per_epoch)
        run.recalibrate()  # the same batches on every rank: the same statistics
        val = run.validate()
        record["val_dice"] = val
        record["val_mean_dice"] = float(np.mean(list(val.values())))
        run.info.metrics = {"val_dice": val, "epoch": epoch + 1}
        if record["val_mean_dice"] > run.best:
            run.best = record["val_mean_dice"]
            if run.ctx.is_main:
                run.save("best", epoch + 1, 0)
    if not run.ctx.is_main:
        return
    append_bytes(cfg.out / "metrics.jsonl", (json.dumps(record) + "\n").encode())
    run.save("latest", epoch + 1, 0)
    notify("saved", epoch + 1, 0)
    remaining = ((cfg.epochs - epoch - 1) * (time.time() - run.t_start)
                 / (epoch + 1 - run.start_epoch))
    tqdm.write(f"epoch {epoch + 1}: loss {record.get('total', float('nan')):.4f}"
               + (f", val Dice {record['val_dice']}" if "val_dice" in record else "")
               + f", ETA {remaining / 60:.1f} min")


def _train(cfg: TrainConfig, ctx: DistContext, stop: StopRequest,
           hook: Callable[[str, int, int], None] | None) -> TrainResult:
    def notify(event: str, epoch: int, step: int) -> None:
        if hook is not None:
            hook(event, epoch, step)

    run = _setup(cfg, ctx)
    for epoch in range(run.start_epoch, cfg.epochs):
        record = _train_epoch(run, epoch, stop, notify)
        run.scheduler.step()
        _end_epoch(run, epoch, record, notify)
        barrier(ctx)
        if epoch + 1 < cfg.epochs and _stop_requested(run, stop):  # latest holds this epoch
            tqdm.write(f"interrupted after epoch {epoch + 1}: {cfg.out / 'latest'} saved; "
                       "continue with --resume")
            raise TrainingInterrupted(f"signal {stop.signum}")
    if ctx.is_main and not run.val_cases:  # fold -1: the final model is the best we have
        run.recalibrate()
        run.save("best", cfg.epochs, 0)
    return TrainResult(cfg.out, run.model, cfg.epochs, run.cache_report)


def train_environment() -> dict[str, str]:
    """For logs: the torchrun variables this process sees."""
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
