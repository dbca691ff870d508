"""Training, top to bottom: data -> model -> optimiser -> epochs of patches -> validation ->
checkpoints. One code path for one CPU, one GPU and many GPUs (torchrun + DDP).

Run layout (``--out RUN``)::

    RUN/train_config.json   the settings of this run (what --resume continues)
    RUN/splits.json         5-fold cross-validation split
    RUN/cache/              preprocessed cases (.npz)
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
from collections.abc import Iterator
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
from ciml_core.data.layouts import DEFAULT_LABEL_CONVENTION, discover_cases
from ciml_core.data.patches import PatchDataset, PreparedCase, prepare_cases
from ciml_core.data.splits import fold_cases, load_or_make_splits
from ciml_core.distributed import DistContext, barrier, cleanup, setup_distributed
from ciml_core.errors import ConfigError, InputDataError
from ciml_core.infer import sliding_window_predict
from ciml_core.metrics import dice as dice_score
from ciml_core.model import CIMLLoss, ModelConfig, TaskDecomposition, build_model
from ciml_core.model import probabilities_to_region_masks as to_masks

#: Settings that define the schedule; --resume refuses to change them.
SCHEDULE_KEYS = ("epochs", "iters_per_epoch", "patch", "batch", "width", "variant", "beta",
                 "norm", "seed", "fold", "lr", "weight_decay", "decomposition")


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
    device: str = "auto"
    seed: int = 0
    val_every: int = 5
    workers: int = 2
    augment: bool = True
    compile: bool = False
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
    """nnU-Net's poly schedule (paper eq. 13), as a factor of the initial learning rate."""
    return (1 - epoch / epochs) ** exponent


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
            (data / "done").write_text("ok\n")
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
    prepared: dict[str, PreparedCase] = {}
    if ctx.is_main:  # one process preprocesses, the others read the cache
        prepared = {p.case_id: p for p in prepare_cases(
            list(by_id.values()), decomposition.modalities, decomposition.regions, convention,
            cfg.out / "cache", progress=True)}
    barrier(ctx)
    if not ctx.is_main:
        prepared = {p.case_id: p for p in prepare_cases(
            list(by_id.values()), decomposition.modalities, decomposition.regions, convention,
            cfg.out / "cache")}
    return (decomposition, convention, [prepared[i] for i in train_ids],
            [prepared[i] for i in val_ids], str(data))


def validate(loaded: LoadedModel, cases: list[PreparedCase], device: torch.device) -> dict[str, float]:
    """Mean Dice per region over whole validation cases (sliding window, no mirroring)."""
    scores: dict[str, list[float]] = {r: [] for r in loaded.regions}
    for case in cases:
        image, regions, _ = case.load()
        probs = sliding_window_predict(loaded, image, overlap=0.5, device=device)
        masks = to_masks(torch.from_numpy(probs)[None], loaded.regions)[0].numpy()
        for i, region in enumerate(loaded.regions):
            scores[region].append(dice_score(masks[i], regions[i] > 0))
    return {r: float(np.mean(v)) for r, v in scores.items()}


def _check_resume(cfg: TrainConfig) -> TrainConfig:
    """On --resume, continue the stored run: its schedule wins; differences are errors."""
    stored_path = cfg.out / "train_config.json"
    if not stored_path.is_file():
        raise ConfigError(f"--resume: {stored_path} not found; nothing to resume in {cfg.out}")
    stored = json.loads(stored_path.read_text())
    given = cfg.to_dict()
    changed = [k for k in SCHEDULE_KEYS if k in stored and given[k] != stored[k]
               and given[k] != TrainConfig.__dataclass_fields__[k].default]
    if changed:
        raise ConfigError(f"--resume: {changed} differ from the run being resumed "
                          f"({ {k: stored[k] for k in changed} }); resume with the same settings")
    merged = {**stored, "resume": True, "device": cfg.device, "workers": cfg.workers}
    merged["out"] = Path(merged["out"])
    merged["data"] = Path(merged["data"]) if merged["data"] else None
    return TrainConfig(**merged)


@dataclass
class TrainResult:
    run_dir: Path
    model: torch.nn.Module  # the trained network (this rank's copy)
    epochs_completed: int


def train(cfg: TrainConfig) -> TrainResult:
    """Train a model. See the module docstring for what it writes into ``cfg.out``."""
    cfg.out = Path(cfg.out)
    if cfg.resume:
        cfg = _check_resume(cfg)
    elif (cfg.out / "latest").exists():
        raise ConfigError(f"{cfg.out} already holds a run; use --resume to continue it or "
                          "choose another --out")
    if cfg.patch % 16:
        raise ConfigError(f"--patch {cfg.patch}: must be a multiple of 16")
    ctx = setup_distributed(cfg.device)
    previous = _interrupt_on_sigterm()
    try:
        return _train(cfg, ctx)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        cleanup(ctx)


def _interrupt_on_sigterm():
    """Treat SIGTERM (schedulers, `kill`) like Ctrl-C: save `latest` and stop.

    Returns the previous handler, or None when not in the main thread (signals cannot be set).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _train(cfg: TrainConfig, ctx: DistContext) -> TrainResult:
    torch.manual_seed(cfg.seed)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if ctx.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    # ---- data
    decomposition, convention, train_cases, val_cases, data_desc = _prepare_data(cfg, ctx)
    patch = (cfg.patch,) * 3
    dataset = PatchDataset(
        train_cases, patch, length=cfg.iters_per_epoch * cfg.batch * ctx.world_size,
        augment=nnunet_augmentations(3) if cfg.augment else None, seed=cfg.seed)

    # ---- model, loss, optimiser, schedule
    model_config = ModelConfig(decomposition=decomposition, width=cfg.width, norm=cfg.norm,
                               variant=cfg.variant, patch_size=patch)
    model = build_model(model_config).to(ctx.device)
    loss_fn = CIMLLoss(decomposition, beta=cfg.beta)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: poly_lr(e, cfg.epochs))
    start_epoch, start_step, best = 0, 0, -math.inf
    if cfg.resume:
        read_checkpoint_config(cfg.out / "latest")  # verifies the weights' hash
        load_weights(model, load_file(str(cfg.out / "latest" / WEIGHTS)), cfg.out / "latest")
        state = load_training_state(cfg.out / "latest")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_step, best = state["epoch"], state["step"], state["best"]
        torch.set_rng_state(state["torch_rng"])
    net = DistributedDataParallel(model) if ctx.enabled else model
    if cfg.compile:
        net = torch.compile(net)
    info = CheckpointInfo(label_convention=convention,
                          training={"config": cfg.to_dict(), "data": data_desc,
                                    "train_cases": [c.case_id for c in train_cases],
                                    "val_cases": [c.case_id for c in val_cases],
                                    "world_size": ctx.world_size})
    runner = LoadedModel(model, model_config, info, cfg.out, "")

    def save(name: str, epoch: int, step: int) -> None:
        state = {"epoch": epoch, "step": step, "best": best, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        info.training.update(epochs_completed=epoch, seconds=round(time.time() - t_start, 1))
        save_checkpoint(cfg.out / name, model, model_config, info,
                        training_state=state if name == "latest" else None)

    # ---- epochs
    t_start = time.time()
    log_path = cfg.out / "metrics.jsonl"
    epoch, done = start_epoch, start_step  # done: optimiser steps completed in this epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler = DistributedSampler(dataset, shuffle=False) if ctx.enabled else range(len(dataset))
            if ctx.enabled:
                sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            skip = start_step * cfg.batch if epoch == start_epoch else 0
            loader = DataLoader(dataset, batch_size=cfg.batch,
                                sampler=_SkipSampler(sampler, skip) if skip else sampler,
                                num_workers=cfg.workers, pin_memory=ctx.device.type == "cuda",
                                drop_last=True)
            net.train()
            sums: dict[str, float] = {}
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
                       disable=not ctx.is_main, initial=skip // cfg.batch,
                       total=cfg.iters_per_epoch, dynamic_ncols=True)
            done = skip // cfg.batch
            for x, y in bar:
                x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16,
                                    enabled=ctx.device.type == "cuda"):
                    output = net(x)
                loss, parts = loss_fn(output, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{parts['total']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            n = max(cfg.iters_per_epoch - (skip // cfg.batch), 1)
            record = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0],
                      **{k: v / n for k, v in sums.items()}, "time": round(time.time() - t_start, 1)}
            scheduler.step()
            if ctx.is_main and val_cases and ((epoch + 1) % cfg.val_every == 0
                                              or epoch + 1 == cfg.epochs):
                val = validate(runner, val_cases, ctx.device)
                record["val_dice"] = val
                record["val_mean_dice"] = float(np.mean(list(val.values())))
                info.metrics = {"val_dice": val, "epoch": epoch + 1}
                if record["val_mean_dice"] > best:
                    best = record["val_mean_dice"]
                    save("best", epoch + 1, 0)
            if ctx.is_main:
                with log_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                save("latest", epoch + 1, 0)
                remaining = (cfg.epochs - epoch - 1) * (time.time() - t_start) / (epoch + 1 - start_epoch)
                tqdm.write(f"epoch {epoch + 1}: loss {record.get('total', float('nan')):.4f}"
                           + (f", val Dice {record['val_dice']}" if "val_dice" in record else "")
                           + f", ETA {remaining / 60:.1f} min")
            barrier(ctx)
    except KeyboardInterrupt:
        if ctx.is_main:
            save("latest", epoch, done)
            tqdm.write(f"interrupted: saved {cfg.out / 'latest'} at epoch {epoch + 1}, step "
                       f"{done}; continue with --resume")
        raise
    if ctx.is_main and not val_cases:  # fold -1: the final model is the best we have
        save("best", cfg.epochs, 0)
    return TrainResult(cfg.out, model, cfg.epochs)


def train_environment() -> dict[str, str]:
    """For logs: the torchrun variables this process sees."""
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
