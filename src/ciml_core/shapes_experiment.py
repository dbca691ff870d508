"""The ShapeComposition experiment (paper 4.3, Fig. 13): does the KL bottleneck filter out what
the primary modality already holds?

Data: 2-D pairs from :func:`ciml_core.data.phantoms.make_shape_composition` (a noisy triangle as
the primary image, a noisy overlapping ellipse as the auxiliary image, their union as the target).
Network: :class:`ciml_core.model.ShapeCompositionNet` (two encoders; the complementary path sees
the *detached* primary features and the auxiliary features and outputs a one-channel
complementary map sampled with mu/sigma; the predictor sees the primary features and that map).
Loss: :class:`ciml_core.model.CIMLLoss` (Dice + BCE + beta * KL); ``beta = 0`` is "without KL".

Redundancy-filtering ratio, measured on held-out pairs with the model in eval mode (map = mu)::

    ratio = mean |complementary map| over (ellipse AND NOT triangle)
            / mean |complementary map| over (ellipse AND triangle)

pooled over the voxels of all held-out pairs. A ratio well above 1 means the map carries the
auxiliary information the primary image lacks and little of what it already has (the paper's
claim); about 1 means the auxiliary shape is copied whole. The clean shape masks come from the
generator itself (same seed), not from thresholding the noisy images.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ciml_core.data import phantoms
from ciml_core.errors import ConfigError
from ciml_core.model import CIMLLoss, ModelConfig, TaskDecomposition, build_model
from ciml_core.model.config import check_spatial_size
from ciml_core.runtime import resolve_device

#: Default number of optimiser steps: about a minute on 2 CPU cores at 64x64, width 4.
DEFAULT_STEPS = 600
FIGURE_NAME = "shapes_fig13.png"
RESULT_NAME = "shapes_result.json"
#: Seeds of the generated pairs: experiment seed S uses S * SEED_STRIDE + i for training pair i
#: and S * SEED_STRIDE + HELD_OUT_OFFSET + j for held-out pair j, so no pair is in both sets.
SEED_STRIDE = 10_000_000
HELD_OUT_OFFSET = 5_000_000


@dataclass(frozen=True)
class ShapesConfig:
    """Settings of one ShapeComposition run (defaults: one to two minutes on 2 CPU cores).

    ``train_pairs`` follows the paper's 1000 image sets; ``lr``, ``batch`` and ``width`` are the
    tiny-run settings of docs/method.md (the paper's demonstration network has "fewer filters").
    """

    steps: int = DEFAULT_STEPS
    beta: float = 0.5
    seed: int = 0
    size: int = 64
    width: int = 4
    batch: int = 8
    lr: float = 3e-3
    train_pairs: int = 1000
    eval_pairs: int = 100
    figure_rows: int = 4
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "width", "batch", "train_pairs", "eval_pairs", "figure_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"shapes: {name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"shapes: seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise ConfigError(f"shapes: size must be an integer, got {self.size!r}")
        check_spatial_size((self.size, self.size), 2, what="shapes: size")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"shapes: beta must be a finite number >= 0, got {self.beta!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"shapes: lr must be > 0, got {self.lr!r}")


@dataclass
class ShapesResult:
    """What a run measured (``to_dict`` is the JSON written next to the figure)."""

    config: ShapesConfig
    ratio: float
    region_means: dict[str, float]
    dice: float
    loss_first: float
    loss_last: float
    seconds: float
    examples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": "ShapeComposition (paper 4.3)",
            "config": asdict(self.config),
            "kl": self.config.beta > 0,
            "ratio": self.ratio,
            "ratio_definition": "mean |complementary map| over (auxiliary AND NOT primary) / "
                                "mean |complementary map| over (auxiliary AND primary), pooled "
                                "over the held-out pairs, eval mode (map = mu)",
            "region_means_abs": self.region_means,
            # Scale-free context for the ratio: how far the map stands out of the background.
            "auxiliary_only_over_background": self.region_means["auxiliary_only"]
            / max(self.region_means["background"], 1e-12),
            "dice": self.dice,
            "loss_first": self.loss_first,
            "loss_last": self.loss_last,
            "seconds": self.seconds,
        }


def shape_pair(seed: int, size: int) -> dict[str, np.ndarray]:
    """One pair: images, target and the clean triangle / ellipse masks.

    The masks are re-drawn from the same generator state as ``make_shape_composition`` (which
    returns only the images and the union); the union is checked against its target so that a
    change in the generator cannot silently desynchronise them.
    """
    primary, auxiliary, target = phantoms.make_shape_composition(seed, (size, size))
    triangle, ellipse = phantoms._overlapping_shapes(np.random.default_rng(seed), (size, size))
    if not np.array_equal(triangle | ellipse, target.astype(bool)):  # pragma: no cover
        raise RuntimeError("ShapeComposition generator changed: masks no longer match the target")
    return {"primary": primary, "auxiliary": auxiliary, "target": target,
            "triangle": triangle, "ellipse": ellipse}


def _stack(pairs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([p[k] for p in pairs]) for k in pairs[0]}


def model_config(cfg: ShapesConfig) -> ModelConfig:
    """The ShapeComposition network of a run: 2-D, instance norm, width ``cfg.width``."""
    return ModelConfig(decomposition=TaskDecomposition.shapes(), variant="shapecomposition",
                       spatial_dims=2, patch_size=(cfg.size, cfg.size), norm="instance",
                       width=cfg.width)


def redundancy_ratio(complementary: np.ndarray, triangle: np.ndarray,
                     ellipse: np.ndarray) -> tuple[float, dict[str, float]]:
    """The ratio and the mean |map| per region (auxiliary_only, overlap, primary_only,
    background), pooled over every pair given (arrays ``[n, H, W]``)."""
    magnitude = np.abs(np.asarray(complementary, dtype=np.float64))
    regions = {
        "auxiliary_only": ellipse & ~triangle,
        "overlap": ellipse & triangle,
        "primary_only": triangle & ~ellipse,
        "background": ~(ellipse | triangle),
    }
    means = {k: float(magnitude[m].mean()) if m.any() else float("nan")
             for k, m in regions.items()}
    ratio = means["auxiliary_only"] / max(means["overlap"], 1e-12)
    return ratio, means


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-pair Dice (both empty counts as 1)."""
    scores = []
    for p, t in zip(prediction, truth, strict=True):
        denominator = p.sum() + t.sum()
        scores.append(1.0 if denominator == 0 else 2.0 * (p & t).sum() / denominator)
    return float(np.mean(scores))


def run_shapes_experiment(
    cfg: ShapesConfig | None = None,
    *,
    progress: Callable[[int, int, float], None] | None = None,
) -> ShapesResult:
    """Train the ShapeComposition network and measure redundancy filtering on held-out pairs.

    ``progress(step, steps, loss)`` is called after every optimiser step (exceptions propagate,
    which cancels the run).
    """
    cfg = cfg or ShapesConfig()
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    base = cfg.seed * SEED_STRIDE
    train = _stack([shape_pair(base + i, cfg.size) for i in range(cfg.train_pairs)])
    held = _stack([shape_pair(base + HELD_OUT_OFFSET + j, cfg.size)
                   for j in range(cfg.eval_pairs)])
    x_train = torch.from_numpy(np.stack([train["primary"], train["auxiliary"]], axis=1))
    y_train = torch.from_numpy(train["target"][:, None].astype(np.float32))

    mc = model_config(cfg)
    model = build_model(mc).to(device)
    loss_fn = CIMLLoss(mc.decomposition, beta=cfg.beta)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    for step in range(cfg.steps):
        index = torch.randint(0, cfg.train_pairs, (cfg.batch,), generator=generator)
        output = model(x_train[index].to(device))
        loss, _ = loss_fn(output, y_train[index].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, cfg.steps, losses[-1])

    model.eval()
    x_held = torch.from_numpy(np.stack([held["primary"], held["auxiliary"]], axis=1))
    maps, predictions = [], []
    with torch.no_grad():
        for chunk in torch.split(x_held, 32):
            output = model(chunk.to(device))
            maps.append(output.complementary[:, 0].float().cpu().numpy())
            predictions.append((torch.sigmoid(output.logits[0][:, 0]) > 0.5).cpu().numpy())
    complementary = np.concatenate(maps)
    prediction = np.concatenate(predictions)
    ratio, means = redundancy_ratio(complementary, held["triangle"], held["ellipse"])
    window = max(1, min(20, len(losses) // 5))
    rows = slice(0, min(cfg.figure_rows, cfg.eval_pairs))
    return ShapesResult(
        config=cfg,
        ratio=float(ratio),
        region_means=means,
        dice=_dice(prediction, held["target"].astype(bool)),
        loss_first=float(np.mean(losses[:window])),
        loss_last=float(np.mean(losses[-window:])),
        seconds=time.perf_counter() - start,
        examples={"primary": held["primary"][rows], "auxiliary": held["auxiliary"][rows],
                  "prediction": prediction[rows], "truth": held["target"][rows],
                  "complementary": complementary[rows], "triangle": held["triangle"][rows],
                  "ellipse": held["ellipse"][rows]},
    )


def shapes_output_paths(out_dir: Path) -> list[Path]:
    """The files :func:`write_shapes_outputs` writes."""
    return [Path(out_dir) / FIGURE_NAME, Path(out_dir) / RESULT_NAME]


def write_shapes_outputs(
    result: ShapesResult, out_dir: Path, *, overwrite: bool = False
) -> list[Path]:
    """Write the Fig. 13-like PNG and the JSON of ``result``; refuse to replace files unless
    ``overwrite``."""
    from ciml_core.figures import save_figure, shape_composition_figure
    from ciml_core.io import atomic_write_text, refuse_existing

    figure_path, json_path = shapes_output_paths(out_dir)
    refuse_existing((figure_path, json_path), overwrite)  # before drawing; writes refuse too
    ex = result.examples
    kl = f"beta = {result.config.beta:g}" + ("" if result.config.beta > 0 else " (without KL)")
    fig = shape_composition_figure(
        ex["primary"], ex["auxiliary"], ex["prediction"], ex["truth"], ex["complementary"],
        primary_masks=ex["triangle"], auxiliary_masks=ex["ellipse"],
        title=f"ShapeComposition, {kl}: ratio {result.ratio:.2f}, Dice {result.dice:.3f}",
    )
    written = [save_figure(fig, figure_path, overwrite=overwrite)]
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    written.append(atomic_write_text(json_path, text, overwrite=overwrite))
    return written
