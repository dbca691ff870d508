"""Interpretability (paper 4.6, SPEC 7): per-pair Grad-CAM of the complementary representations
and the complementary-information weights.

A *pair* is (segmentor i, target region k) for every region segmentor i predicts; with the BraTS
decomposition that gives six pairs (FLAIR:WT, T1:TC, T2:WT, T2:TC, T1CE:TC, T1CE:ET). Segmentor i
receives K = T - 1 messages; message m comes from segmentor ``model.message_sources(i)[m]`` and is
named after that segmentor's primary modality ("auxiliary modality" of the pair).

For each pair and auxiliary message m (Eq. 14-15):

- A_m = z_m, the information representation of message m at the *shallowest* CIG of segmentor i
  (level 1: P/2 per axis, C channels), read through ``gate.representation_taps[m]`` with a
  forward hook; in eval mode z = mu, so maps are deterministic;
- y^k = sum of segmentor i's logit for region k over the target voxels: the region the model
  predicts (ensembled sigmoid > 0.5 with ET ⊂ TC ⊂ WT, i.e. exactly the mask the segmentation
  shows; Seg-Grad-CAM) or a user ROI;
- alpha_c = mean over the N voxels of dy^k / dA_m^c; heatmap = ReLU(sum_c alpha_c A_m^c);
- the P/2 map is upsampled (trilinear, ``align_corners=False``) to the window, placed on the
  cropped grid and un-cropped onto the full input grid (canonical voxel order, as
  ``LoadedCase.image``); :func:`write_explanations` writes it back in the input's own voxel order.

Weights (Eq. 16-17): w_m = sum_n heat_m / sum_j sum_n heat_j over the pair's auxiliary modalities,
computed on the raw (not min-max normalised) image-grid maps; all-zero maps give equal weights.

Whole volumes (``mode``):

- ``"roi"`` (default): one window of the model's patch size centred on the predicted tumour
  (centre of mass of the pair's target mask; if that is empty, of the predicted WT, then of any
  predicted region, then the centre of the imaged box), zero-padded where the image is smaller.
  One forward pass per distinct window (pairs of one region share it) and one backward pass per
  pair. The maps are zero outside the window.
- ``"sliding"``: Grad-CAM in every sliding window (the settings' overlap, as the prediction), each with its
  own alpha, stitched with MONAI's Gaussian weighting exactly like the prediction. Slower (one
  forward and one backward per pair per window) but covers the whole volume.

Spacing: like :func:`ciml_core.infer.predict_case`, a case whose spacing differs from the
model's target spacing is explained on the model's grid (cropped, normalised, resampled cubic;
the targets are the prediction there, or the user ROI resampled linearly and > 0.5) and the
heatmaps come back to the cropped input grid by linear interpolation (maps >= 0 stay >= 0); the
reported targets, windows and centres are then on the input grid (a predicted target is the
input-grid prediction, exactly the mask ``predict_case`` paints), the dilated-target binding and
the weights are computed there. ``level_maps`` stay on the CIG grid of the model's window.
``InferenceSettings(native_spacing=True)`` explains at the case's own spacing.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import Tensor, nn

from ciml_core import io as _io
from ciml_core.checkpoint import LoadedModel
from ciml_core.data.dataset import LoadedCase
from ciml_core.data.nifti import write_like
from ciml_core.data.patches import extract_patch
from ciml_core.data.preprocess import SpacingPlan, crop, preprocess_image, uncrop
from ciml_core.errors import ConfigError, InputDataError
from ciml_core.infer import (
    InferenceSettings,
    ProgressFn,
    count_windows,
    sliding_window_predict,
    spacing_plan,
)
from ciml_core.model import TaskDecomposition, probabilities_to_region_masks
from ciml_core.model.config import check_spatial_size

#: Ways of covering a whole volume.
MODES = ("roi", "sliding")
#: Attribution maps: "gradcam" (paper Eq. 14-15: one alpha per channel, the mean gradient) or
#: "hirescam" (element-wise gradient x activation, Draelos & Carin 2020: heat only where the
#: target's gradient reaches, i.e. each z_k's own first-order contribution to y^k).
METHODS = ("gradcam", "hirescam")
#: ``explain_case``'s method. HiResCAM, not the paper's Grad-CAM: on the demo its maps keep
#: 0.95-0.99 of each pair's heat inside the dilated target at every window size (Grad-CAM
#: 0.05-0.68, falling as the window grows), so its weights describe the target and do not depend
#: on the window or the binding (docs/interpretability.md, "Window-size sensitivity").
DEFAULT_METHOD = "hirescam"
#: Where heat counts: "target" (the target dilated by ``margin_mm``; the default) or "window"
#: (every voxel the maps cover, as the paper).
EXTENTS = ("target", "window")
#: Default dilation of the target for ``extent="target"``, in mm.
TARGET_MARGIN_MM = 8.0
#: CIG level whose representations are explained (paper 4.6: the shallowest, P/2, C channels).
EXPLAINED_LEVEL = 1
WEIGHTS_CSV = "weights.csv"
WEIGHTS_JSON = "weights.json"


@dataclass
class PairExplanation:
    """Grad-CAM heatmaps and complementary-information weights of one (segmentor, region) pair.

    Attributes:
        segmentor: index of the segmentor (task) in the decomposition.
        primary: its primary modality name(s) joined by "+", e.g. "t1".
        region: the target region, e.g. "TC".
        auxiliary: names of the K auxiliary modalities (each message's source segmentor's primary
            modality name(s) joined by "+"), in message order.
        heatmaps: auxiliary name -> heatmap on the full input grid, canonical (RAS+) voxel order
            like ``LoadedCase.image``; raw (not normalised), float32, >= 0.
        weights: auxiliary name -> w (Eq. 16-17), summing to 1.
        heat_sums: auxiliary name -> sum of the heatmap over the grid (Eq. 17, zeta bar).
        level_maps: auxiliary name -> the raw map at the CIG grid (P/2 of the window) before
            upsampling; ``mode="roi"`` only (one window), empty for ``"sliding"``.
        target: boolean mask (full grid, canonical order) of the voxels whose logits were summed
            into y^k (inside the explained window(s)).
        target_source: "prediction" (the model's predicted region) or "mask" (user ROI).
        mode: "roi" or "sliding".
        window: ``mode="roi"``: (start, stop) per canonical axis of the explained window in
            full-grid voxel coordinates (it may reach past the grid where the image was padded).
        centre: canonical voxel index (full grid) the window was centred on, for ``"roi"``; the
            target's centre of mass for ``"sliding"`` (None when the target is empty).
        inside_fraction: auxiliary name -> the fraction of the map's heat (before it is bound to
            the target) that lies inside the target dilated by ``margin_mm`` (nan: no heat).
        method: "gradcam" or "hirescam" (:data:`METHODS`).
        extent: "target" (maps and weights bound to the dilated target) or "window".
        margin_mm: the target's dilation.
    """

    segmentor: int
    primary: str
    region: str
    auxiliary: tuple[str, ...]
    heatmaps: dict[str, np.ndarray]
    weights: dict[str, float]
    heat_sums: dict[str, float] = field(default_factory=dict)
    level_maps: dict[str, np.ndarray] = field(default_factory=dict)
    target: np.ndarray | None = None
    target_source: str = "prediction"
    mode: str = "roi"
    window: tuple[tuple[int, int], ...] | None = None
    centre: tuple[int, ...] | None = None
    inside_fraction: dict[str, float] = field(default_factory=dict)
    method: str = "gradcam"
    extent: str = "window"
    margin_mm: float = TARGET_MARGIN_MM

    @property
    def name(self) -> str:
        """``"T1:TC"`` style: upper-case primary modality, region as the decomposition spells it."""
        return f"{self.primary.upper()}:{self.region}"

    @property
    def target_voxels(self) -> int:
        """Number of voxels in the Grad-CAM target (0: nothing predicted, all maps zero)."""
        return 0 if self.target is None else int(np.count_nonzero(self.target))


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------


def _decomposition_of(obj: Any) -> TaskDecomposition:
    """Accept a TaskDecomposition, a ModelConfig or a LoadedModel (the GUI has the latter)."""
    if isinstance(obj, TaskDecomposition):
        return obj
    config = getattr(obj, "config", obj)
    decomposition = getattr(config, "decomposition", None)
    if not isinstance(decomposition, TaskDecomposition):
        raise ConfigError(f"expected a task decomposition (or a model), got {type(obj).__name__}")
    return decomposition


def pair_name(decomposition: TaskDecomposition, segmentor: int, region: str) -> str:
    """The pair's display / CLI name, e.g. ``"T1CE:ET"``."""
    return f"{decomposition.tasks[segmentor].name.upper()}:{region}"


def list_pairs(decomposition: TaskDecomposition) -> list[tuple[int, str]]:
    """Every (segmentor, region) pair, in task order then the task's region order.

    The BraTS default gives 6 pairs: (0, WT), (1, TC), (2, WT), (2, TC), (3, TC), (3, ET).
    """
    decomposition = _decomposition_of(decomposition)
    return [(i, region) for i, task in enumerate(decomposition.tasks) for region in task.regions]


def parse_pairs(spec: str, decomposition: TaskDecomposition) -> list[tuple[int, str]]:
    """``"all"`` or a comma-separated list such as ``"FLAIR:WT,T1CE:ET"`` -> pairs.

    Names are matched case-insensitively; duplicates are dropped (first occurrence kept).

    Raises:
        ConfigError: naming the item that is not a pair and listing the valid names.
    """
    decomposition = _decomposition_of(decomposition)
    pairs = list_pairs(decomposition)
    by_name = {pair_name(decomposition, i, r).lower(): (i, r) for i, r in pairs}
    valid = ", ".join(pair_name(decomposition, i, r) for i, r in pairs)
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"pairs: expected 'all' or a list such as {valid!r}, got {spec!r}")
    if spec.strip().lower() == "all":
        return pairs
    chosen: list[tuple[int, str]] = []
    for item in spec.split(","):
        key = re.sub(r"\s+", "", item).lower()
        if key not in by_name:
            raise ConfigError(
                f"pairs: {item.strip()!r} is not a (primary modality : region) pair of this "
                f"model; valid pairs: {valid} (or 'all')"
            )
        if by_name[key] not in chosen:
            chosen.append(by_name[key])
    return chosen


def auxiliary_names(
    model: nn.Module, decomposition: TaskDecomposition, segmentor: int
) -> tuple[str, ...]:
    """Names of the messages segmentor ``segmentor`` receives, in message order."""
    sources_of = getattr(model, "message_sources", None)
    sources = (
        sources_of(segmentor)
        if callable(sources_of)
        else [j for j in range(decomposition.num_tasks) if j != segmentor]
    )
    return tuple(decomposition.tasks[j].name for j in sources)


# --------------------------------------------------------------------------------------------
# Weights (Eq. 16-17)
# --------------------------------------------------------------------------------------------


def heat_sums(heatmaps: dict[str, np.ndarray]) -> dict[str, float]:
    """Eq. 17: the sum of each raw heatmap over its grid (float64 accumulation)."""
    if not heatmaps:
        raise ConfigError("complementary weights need at least one heatmap")
    shapes = {name: np.shape(m) for name, m in heatmaps.items()}
    if len(set(shapes.values())) > 1:
        raise InputDataError(f"heatmaps of one pair must share one grid; got shapes {shapes}")
    sums = {}
    for name, heat in heatmaps.items():
        heat = np.asarray(heat, dtype=np.float64)
        if not np.all(np.isfinite(heat)) or (heat.size and heat.min() < 0):
            raise InputDataError(
                f"heatmap {name!r} must be finite and >= 0 (a ReLU'd Grad-CAM map); "
                f"found min {np.nanmin(heat) if heat.size else 0:.3g}"
            )
        sums[name] = float(heat.sum())
    return sums


def complementary_weights(heatmaps: dict[str, np.ndarray]) -> dict[str, float]:
    """Eq. 16-17 on raw maps: w_m = sum_n heat_m / sum_j sum_n heat_j.

    All maps zero (nothing to explain, e.g. an empty target) gives equal weights 1/K, never NaN.
    """
    sums = heat_sums(heatmaps)
    total = sum(sums.values())
    if not total > 0:
        return {name: 1.0 / len(sums) for name in sums}
    return {name: value / total for name, value in sums.items()}


# --------------------------------------------------------------------------------------------
# Grad-CAM on one window
# --------------------------------------------------------------------------------------------


def _gates(model: nn.Module, segmentor: int) -> nn.Module:
    """The CIG whose taps are explained, with a clear error for networks without messages."""
    segmentors = getattr(model, "segmentors", None)
    gates = getattr(segmentors[segmentor], "gates", None) if segmentors is not None else None
    if gates is None:
        variant = getattr(getattr(model, "config", None), "variant", type(model).__name__)
        raise ConfigError(
            f"Grad-CAM explains the complementary representations of the CIG modules; the "
            f"model (variant {variant!r}) has none. Use a CIML variant that passes messages "
            f"(full, vi, attention, message)."
        )
    return gates[EXPLAINED_LEVEL - 1]


class _TapRecorder:
    """Forward hooks on the level-1 ``representation_taps`` of some segmentors: records z_m."""

    def __init__(self, model: nn.Module, segmentors: Sequence[int]) -> None:
        self.outputs: dict[tuple[int, int], Tensor] = {}
        self._handles = []
        for i in segmentors:
            for m, tap in enumerate(_gates(model, i).representation_taps):
                self._handles.append(tap.register_forward_hook(self._hook(i, m)))

    def _hook(self, i: int, m: int):
        def hook(_module: nn.Module, _args: Any, output: Tensor) -> None:
            # Keep the graph node itself: autograd.grad(y, A) then gives dy/dA (and nothing else
            # accumulates in .grad of the parameters).
            self.outputs[(i, m)] = output

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> _TapRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _upsample(cam: Tensor, size: Sequence[int]) -> Tensor:
    """``[1, 1, *low]`` -> ``[1, 1, *size]``, (bi/tri)linear with ``align_corners=False`` (as
    MONAI's Grad-CAM upsampler)."""
    mode = "trilinear" if len(size) == 3 else "bilinear"
    return F.interpolate(cam, size=tuple(size), mode=mode, align_corners=False)


def gradcam_window(
    model: nn.Module,
    window: Tensor,
    targets: Tensor,
    pairs: Sequence[tuple[int, str]],
    target_channels: Sequence[int],
    *,
    num_messages: int,
    on_backward: Callable[[], None] | None = None,
    method: str = "gradcam",
) -> tuple[Tensor, Tensor]:
    """Grad-CAM of every pair on one window: one forward pass, one backward pass per pair.

    Args:
        model: a CIML network in eval mode (``segmentors[i].gates[0].representation_taps``).
        window: ``[1, M, *P]`` network input.
        targets: ``[1, T, *P]`` target masks (0/1); pair p uses channel ``target_channels[p]``.
        pairs: (segmentor, region) pairs.
        num_messages: K.
        on_backward: called after each backward pass (progress / cancellation).
        method: "gradcam" (alpha_c = mean gradient, Eq. 15) or "hirescam" (the gradient at each
            voxel times the activation there, summed over channels).

    Returns:
        ``(image_maps [n_pairs, K, *P], level_maps [n_pairs, K, *P/2])``, float32, >= 0.
    """
    size = tuple(window.shape[2:])
    # Grad-CAM needs autograd even when called from inference code (a GUI worker may run under
    # torch.inference_mode); the clone makes the input a normal tensor there.
    with torch.inference_mode(False), torch.enable_grad(), _TapRecorder(
            model, sorted({i for i, _ in pairs})) as taps:
        # The input requires grad so that the graph exists even if the parameters are frozen.
        x = window.detach().float().clone().requires_grad_(True)
        output = model(x)
        image_maps, level_maps = [], []
        for p, (i, region) in enumerate(pairs):
            channel = output.task_regions[i].index(region)
            mask = targets[:, target_channels[p]].to(output.logits[i].dtype)
            y = (output.logits[i][:, channel] * mask).sum()
            activations = [taps.outputs[(i, m)] for m in range(num_messages)]
            if bool(mask.any()):
                grads = torch.autograd.grad(y, activations, retain_graph=True, allow_unused=True)
            else:  # empty target: y is constant 0, every gradient is 0
                grads = (None,) * num_messages
            pair_image, pair_level = [], []
            for a, g in zip(activations, grads, strict=True):
                a = a.detach().float()
                g = torch.zeros_like(a) if g is None else g.float()
                spatial = tuple(range(2, a.dim()))
                # Eq. 15 (alpha: mean over the N voxels), or the voxel's own gradient.
                alpha = g.mean(dim=spatial, keepdim=True) if method == "gradcam" else g
                cam = torch.relu((alpha * a).sum(dim=1, keepdim=True))  # Eq. 14
                pair_level.append(cam[0, 0])
                # ReLU before upsampling: (bi/tri)linear interpolation of a map >= 0 stays >= 0.
                pair_image.append(_upsample(cam, size)[0, 0])
            image_maps.append(torch.stack(pair_image))
            level_maps.append(torch.stack(pair_level))
            if on_backward is not None:
                on_backward()
    return torch.stack(image_maps), torch.stack(level_maps)


# --------------------------------------------------------------------------------------------
# Whole cases
# --------------------------------------------------------------------------------------------


def _centre_of_mass(mask: np.ndarray) -> tuple[float, ...] | None:
    if not mask.any():
        return None
    return tuple(float(c) for c in ndimage.center_of_mass(mask))


def _roi_window(
    centre: Sequence[float], shape: Sequence[int], patch: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """A patch-sized window (start, stop) per axis centred on ``centre`` (cropped-grid
    coordinates), shifted to lie inside the grid where the grid is large enough, else centred on
    the grid (the caller zero-pads)."""
    window = []
    for c, n, p in zip(centre, shape, patch, strict=True):
        if n >= p:
            start = int(np.clip(round(c - p / 2), 0, n - p))
        else:
            start = -((p - n) // 2)
        window.append((start, start + p))
    return tuple(window)


def _extract(array: np.ndarray, window: Sequence[tuple[int, int]]) -> np.ndarray:
    """``array[..., window]`` with zeros where the window reaches past the grid."""
    return extract_patch(array, [a for a, _ in window], [b - a for a, b in window])


def _paste(values: np.ndarray, window: Sequence[tuple[int, int]], shape: Sequence[int]) -> np.ndarray:
    """Put window-sized ``values [..., *P]`` onto a zero grid of ``shape`` (inverse of _extract)."""
    out = np.zeros(values.shape[: -len(window)] + tuple(shape), values.dtype)
    src, dst = [], []
    for (a, b), n in zip(window, shape, strict=True):
        lo, hi = max(a, 0), min(b, n)
        dst.append(slice(lo, hi))
        src.append(slice(lo - a, hi - a))
    lead = (slice(None),) * (values.ndim - len(window))
    out[lead + tuple(dst)] = values[lead + tuple(src)]
    return out


class _Counter:
    """One progress bar over the prediction windows and the Grad-CAM passes."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            # Exceptions (ciml_core.errors.Cancelled) propagate: that is how a run is cancelled.
            self.progress(self.done, self.total)


def _check_inputs(loaded: LoadedModel, case: LoadedCase, mode: str,
                  target_mask: np.ndarray | None, prediction: np.ndarray | None) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if tuple(case.modalities) != tuple(loaded.modalities):
        raise InputDataError(
            f"case {case.case_id}: the model {loaded.path} expects modalities "
            f"{list(loaded.modalities)} in that order, the case provides {list(case.modalities)}"
        )
    grid = tuple(case.image.shape[1:])
    if target_mask is not None:
        if tuple(np.shape(target_mask)) != grid:
            raise InputDataError(
                f"case {case.case_id}: target mask has shape {tuple(np.shape(target_mask))}; "
                f"expected the image grid {grid} (canonical voxel order)"
            )
        if not np.any(target_mask):
            raise InputDataError(f"case {case.case_id}: the target mask (ROI) is empty")
    if prediction is not None and tuple(np.shape(prediction)) != (len(loaded.regions), *grid):
        raise InputDataError(
            f"case {case.case_id}: prediction has shape {tuple(np.shape(prediction))}; expected "
            f"per-region probabilities {(len(loaded.regions), *grid)} ({list(loaded.regions)})"
        )


def _check_options(method: str, extent: str, margin_mm: float, roi_size: int | None,
                   spatial_dims: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {list(METHODS)}, got {method!r}")
    if extent not in EXTENTS:
        raise ConfigError(f"extent: expected one of {list(EXTENTS)}, got {extent!r}")
    if not margin_mm >= 0:
        raise ConfigError(f"margin: expected a distance >= 0 mm, got {margin_mm!r}")
    if roi_size is not None:
        check_spatial_size((roi_size,) * spatial_dims, spatial_dims, what="roi_size")


def resolve_pairs(model: nn.Module, decomposition: TaskDecomposition,
                  pairs: Sequence[tuple[int, str]] | str | None) -> list[tuple[int, str]]:
    """``pairs`` as a checked list: None -> every pair, a string -> :func:`parse_pairs`; each must
    be a pair of ``decomposition`` whose segmentor has complementary-information gates."""
    if pairs is None:
        pairs = list_pairs(decomposition)
    elif isinstance(pairs, str):
        pairs = parse_pairs(pairs, decomposition)
    pairs = list(pairs)
    valid = list_pairs(decomposition)
    for pair in pairs:
        if tuple(pair) not in valid:
            raise ConfigError(f"pair {pair!r} is not a (segmentor, region) pair of this model; "
                              f"valid: {valid}")
    if not pairs:
        raise ConfigError("no pair to explain")
    for i in {i for i, _ in pairs}:
        _gates(model, i)  # fail early, before predicting, on a model without CIGs
    return pairs


@dataclass
class _Targets:
    """What each pair's y^k sums over, on the grid the model runs on (the cropped grid, or the
    cropped grid resampled to the model's spacing)."""

    masks: np.ndarray  # (channels, *model grid) bool
    channels: list[int]  # per pair, its channel in ``masks``
    source: str  # "mask" (a user ROI) or "prediction"
    input_masks: np.ndarray | None = None  # the same on the cropped input grid, when resampled


def _region_masks(loaded: LoadedModel, probs: np.ndarray) -> np.ndarray:
    return probabilities_to_region_masks(torch.from_numpy(np.ascontiguousarray(probs))[None],
                                         loaded.regions)[0].numpy()


def _targets(loaded: LoadedModel, image: np.ndarray, box, pairs: list[tuple[int, str]],
             target_mask: np.ndarray | None, prediction: np.ndarray | None,
             settings: InferenceSettings, counter: _Counter,
             plan: SpacingPlan | None = None) -> _Targets:
    """The user ROI (one channel for every pair), else each pair's predicted region: from
    ``prediction`` when given, else predicted here (counted on ``counter``). ``image`` is on the
    model's grid; ``plan`` maps the cropped input grid onto it (None: the same grid)."""
    resampled = plan is not None and plan.resampled
    if target_mask is not None:
        masks = crop(np.asarray(target_mask, dtype=bool), box)[None]
        if not resampled:
            return _Targets(masks, [0] * len(pairs), "mask")
        weight = plan.to_model(masks.astype(np.float32), order=1)
        # A ROI thinner than the model's voxels keeps every voxel it overlaps.
        model_masks = weight > 0.5 if (weight > 0.5).any() else weight > 0
        return _Targets(model_masks, [0] * len(pairs), "mask", input_masks=masks)
    decomposition = loaded.config.decomposition
    channels = [decomposition.region_index(r) for _, r in pairs]
    if prediction is None:
        probs = sliding_window_predict(loaded.model, image, loaded.config.patch_size, settings,
                                       progress=lambda done, total: counter.step())
        if not resampled:
            return _Targets(_region_masks(loaded, probs), channels, "prediction")
        # The input-grid target is what predict_case paints: probabilities back, then > 0.5.
        input_probs = np.clip(plan.to_input(probs), 0.0, 1.0)
        return _Targets(_region_masks(loaded, probs), channels, "prediction",
                        input_masks=_region_masks(loaded, input_probs))
    probs = crop(np.asarray(prediction, dtype=np.float32), box)
    if not resampled:
        return _Targets(_region_masks(loaded, probs), channels, "prediction")
    model_probs = np.clip(plan.to_model(probs, order=1), 0.0, 1.0)
    return _Targets(_region_masks(loaded, model_probs), channels, "prediction",
                    input_masks=_region_masks(loaded, probs))


def _window_to_input(plan: SpacingPlan, window: Sequence[tuple[int, int]]
                     ) -> tuple[tuple[int, int], ...]:
    """A (start, stop) window of the model's grid as voxel edges of the cropped input grid."""
    out = []
    for (a, b), n, m, s, t in zip(window, plan.shape, plan.model_shape, plan.spacing,
                                  plan.target, strict=True):
        k = t / s  # input voxels per model voxel; both grids share their centre

        def edge(e: int, n=n, m=m, k=k) -> int:
            return int(round((n - 1) / 2 + 0.5 + (e - 0.5 - (m - 1) / 2) * k))

        out.append((edge(a), edge(b)))
    return tuple(out)


def _centre_to_input(plan: SpacingPlan, centre: Sequence[float]) -> tuple[float, ...]:
    return tuple((n - 1) / 2 + (c - (m - 1) / 2) * t / s
                 for c, n, m, s, t in zip(centre, plan.shape, plan.model_shape, plan.spacing,
                                          plan.target, strict=True))


def _to_input_grid(plan: SpacingPlan, targets: _Targets, maps: list[_PairMaps]
                   ) -> tuple[_Targets, list[_PairMaps]]:
    """The maps and targets of a run on the model's grid, back on the cropped input grid."""
    masks = targets.input_masks
    back = []
    for channel, pm in zip(targets.channels, maps, strict=True):
        heat = np.clip(plan.to_input(pm.image_maps, order=1), 0.0, None)
        window = _window_to_input(plan, pm.window) if pm.window is not None else None
        target = (_paste(_extract(masks[channel], window), window, plan.shape)
                  if window is not None else masks[channel])
        centre = _centre_to_input(plan, pm.centre) if pm.centre is not None else None
        back.append(_PairMaps(heat, pm.level_maps, window, centre, target))
    return _Targets(masks, targets.channels, targets.source), back


@dataclass
class _PairMaps:
    """What one explaining pass yields for one pair, on the cropped grid."""

    image_maps: np.ndarray  # (auxiliaries, *grid) heat per auxiliary modality
    level_maps: np.ndarray | None  # (auxiliaries, *level grid), ``roi`` mode only
    window: tuple[tuple[int, int], ...] | None  # the explained window (``roi`` mode)
    centre: tuple[float, ...] | None
    target: np.ndarray  # the pair's target as the pass saw it (bool)


def explain_case(
    loaded: LoadedModel,
    case: LoadedCase,
    pairs: Sequence[tuple[int, str]] | str | None = None,
    settings: InferenceSettings | None = None,
    *,
    target_mask: np.ndarray | None = None,
    mode: str = "roi",
    progress: ProgressFn | None = None,
    prediction: np.ndarray | None = None,
    method: str = DEFAULT_METHOD,
    extent: str = "target",
    margin_mm: float = TARGET_MARGIN_MM,
    roi_size: int | None = None,
) -> list[PairExplanation]:
    """Grad-CAM heatmaps and complementary-information weights of ``pairs`` on one case.

    Args:
        loaded: a CIML checkpoint (``load_checkpoint``).
        case: the case (``load_case`` with ``loaded.modalities``).
        pairs: (segmentor, region) pairs, a ``parse_pairs`` string, or None for every pair.
        settings: where the windows run (the volume stays on the CPU) and the sliding-window
            overlap of ``mode="sliding"`` and of the prediction; ``mirror`` is not used and the
            explained network is never fused (Grad-CAM needs each segmentor's gates);
            ``native_spacing`` as for the prediction (see the module docstring, "Spacing").
        target_mask: a user ROI (boolean, the image grid in canonical order): y^k sums the region
            logit over it instead of over the predicted region.
        mode: ``"roi"`` (one window centred on the tumour) or ``"sliding"`` (every window,
            Gaussian-stitched); see the module docstring.
        progress: ``progress(done, total)`` after each prediction window and each backward pass
            (``"roi"``) or Grad-CAM window (``"sliding"``); an exception raised in it (e.g.
            :class:`ciml_core.errors.Cancelled`) stops the run and propagates.
        prediction: per-region probabilities ``(R, *grid)`` already computed for this case
            (``CasePrediction.probabilities``); saves predicting again when no ``target_mask``.
        method: :data:`METHODS` (default :data:`DEFAULT_METHOD`; ``"gradcam"`` is the paper's).
        extent: "target": heatmaps and weights count only the heat inside the target dilated by
            ``margin_mm`` (what the pair's region is about); "window": all of it (the paper).
            ``inside_fraction`` is reported either way.
        margin_mm: the target's dilation for ``extent`` and ``inside_fraction``.
        roi_size: ``mode="roi"``: the explained window's size per axis (a multiple of 16) instead
            of the model's patch size (the sensitivity study of docs/interpretability.md).

    Returns:
        One :class:`PairExplanation` per pair, in the order given.
    """
    settings = settings or InferenceSettings()
    _check_inputs(loaded, case, mode, target_mask, prediction)
    _check_options(method, extent, margin_mm, roi_size, loaded.config.spatial_dims)
    decomposition = loaded.config.decomposition
    model = loaded.model
    pairs = resolve_pairs(model, decomposition, pairs)
    dev = settings.resolved_device()
    model.to(dev).eval()
    patch = tuple(loaded.config.patch_size)
    pre = preprocess_image(case.image, case.modalities,
                           pet_method=loaded.info.normalisation.get("pet_method", "log"))
    # The model's spacing: the same plan as predict_case (identity at the model's own spacing).
    plan = spacing_plan(loaded, case, pre.box.shape, settings)
    image = plan.to_model(pre.image)
    model_shape = image.shape[1:]

    need_prediction = target_mask is None and prediction is None
    n_pred = count_windows(model_shape, patch, settings.overlap) if need_prediction else 0
    n_cam = len(pairs) if mode == "roi" else count_windows(model_shape, patch, settings.overlap)
    counter = _Counter(n_pred + n_cam, progress)
    targets = _targets(loaded, image, pre.box, pairs, target_mask, prediction, settings,
                       counter, plan)

    num_messages = decomposition.num_tasks - 1
    if mode == "roi":
        window = patch if roi_size is None else (roi_size,) * len(patch)
        maps = _explain_roi(model, image, targets, pairs, window, dev, num_messages, counter,
                            decomposition, method)
    else:
        maps = _explain_sliding(model, image, targets, pairs, patch, dev, num_messages,
                                counter, settings.overlap, method)
    if plan.resampled:
        targets, maps = _to_input_grid(plan, targets, maps)
    return _assemble(model, decomposition, case, pre.box, pairs, targets, maps, mode=mode,
                     method=method, extent=extent, margin_mm=margin_mm)


def _assemble(model: nn.Module, decomposition: TaskDecomposition, case: LoadedCase, box,
              pairs: list[tuple[int, str]], targets: _Targets, maps: list[_PairMaps], *,
              mode: str, method: str, extent: str, margin_mm: float) -> list[PairExplanation]:
    """Bound the maps to the dilated targets, weigh them and put them back on the image grid."""
    bounds = {channel: dilate_mm(targets.masks[channel], case.spacing, margin_mm)
              for channel in set(targets.channels)}
    shift = [s.start for s in box.slices]
    explanations = []
    for (i, region), channel, pair_maps in zip(pairs, targets.channels, maps, strict=True):
        names = auxiliary_names(model, decomposition, i)
        bound = bounds[channel]
        image_maps = pair_maps.image_maps
        inside = {name: inside_fraction(image_maps[m], bound) for m, name in enumerate(names)}
        if extent == "target":
            image_maps = image_maps * bound
        heatmaps = {name: uncrop(image_maps[m].astype(np.float32), box, fill=0.0)
                    for m, name in enumerate(names)}
        window, centre = pair_maps.window, pair_maps.centre
        explanations.append(PairExplanation(
            segmentor=i,
            primary=decomposition.tasks[i].name,
            region=region,
            auxiliary=names,
            heatmaps=heatmaps,
            weights=complementary_weights(heatmaps),
            heat_sums=heat_sums(heatmaps),
            level_maps=({name: pair_maps.level_maps[m] for m, name in enumerate(names)}
                        if pair_maps.level_maps is not None else {}),
            target=uncrop(pair_maps.target, box, fill=False),
            target_source=targets.source,
            mode=mode,
            window=(tuple((a + o, b + o) for (a, b), o in zip(window, shift, strict=True))
                    if window is not None else None),
            centre=(tuple(int(round(c + o)) for c, o in zip(centre, shift, strict=True))
                    if centre is not None else None),
            inside_fraction=inside, method=method, extent=extent, margin_mm=float(margin_mm),
        ))
    return explanations


def dilate_mm(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """Voxels within ``margin_mm`` (Euclidean, in mm with the voxel ``spacing``) of ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or margin_mm <= 0:
        return mask.copy()
    # Only the bounding box grown by the margin can be reached: the distance transform runs there.
    reach = [int(np.ceil(margin_mm / s)) for s in spacing]
    coords = np.argwhere(mask)
    lo = np.maximum(coords.min(0) - reach, 0)
    hi = np.minimum(coords.max(0) + np.array(reach) + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    out = np.zeros_like(mask)
    out[box] = ndimage.distance_transform_edt(~mask[box], sampling=spacing) <= margin_mm
    return out


def inside_fraction(heat: np.ndarray, bound: np.ndarray) -> float:
    """Share of ``heat``'s sum that lies inside ``bound`` (nan when the map holds no heat)."""
    total = float(np.sum(heat, dtype=np.float64))
    if not total > 0:
        return float("nan")
    return float(np.sum(heat[bound], dtype=np.float64)) / total


def _roi_centre(targets: np.ndarray, channel: int, decomposition: TaskDecomposition,
                source_is_mask: bool) -> tuple[float, ...]:
    """Where to centre the window: the pair's target, else WT, else any region, else the box."""
    candidates = [targets[channel]]
    if not source_is_mask:
        if "WT" in decomposition.regions:
            candidates.append(targets[decomposition.region_index("WT")])
        candidates.append(targets.any(axis=0))
    for mask in candidates:
        centre = _centre_of_mass(mask)
        if centre is not None:
            return centre
    return tuple((n - 1) / 2 for n in targets.shape[1:])


def _explain_roi(model, image, targets: _Targets, pairs, patch, dev, num_messages, counter,
                 decomposition, method) -> list[_PairMaps]:
    shape = image.shape[1:]
    # Group the pairs by window so that pairs sharing a target share the forward pass.
    windows: dict[tuple[tuple[int, int], ...], list[int]] = {}
    centres = []
    for channel in targets.channels:
        centre = _roi_centre(targets.masks, channel, decomposition, targets.source == "mask")
        centres.append(centre)
        windows.setdefault(_roi_window(centre, shape, patch), []).append(len(centres) - 1)
    results: list[Any] = [None] * len(pairs)
    for window, members in windows.items():
        x = torch.from_numpy(_extract(image, window))[None].to(dev)
        t = torch.from_numpy(_extract(targets.masks, window))[None].to(dev)
        image_maps, level_maps = gradcam_window(
            model, x, t, [pairs[p] for p in members], [targets.channels[p] for p in members],
            num_messages=num_messages, on_backward=counter.step, method=method,
        )
        image_maps, level_maps = image_maps.cpu().numpy(), level_maps.cpu().numpy()
        for j, p in enumerate(members):
            target = _paste(_extract(targets.masks[targets.channels[p]], window), window, shape)
            results[p] = _PairMaps(_paste(image_maps[j], window, shape), level_maps[j], window,
                                   centres[p], target)
    return results


def _explain_sliding(model, image, targets: _Targets, pairs, patch, dev, num_messages, counter,
                     overlap, method) -> list[_PairMaps]:
    n_channels = image.shape[0]
    # The target masks ride along as extra input channels, so that MONAI cuts (and pads) them
    # exactly like the image and the stitching is the prediction's own.
    stacked = np.concatenate([image, targets.masks.astype(np.float32)])

    def predictor(window: Tensor) -> Tensor:
        maps, _ = gradcam_window(model, window[:, :n_channels], window[:, n_channels:] > 0.5,
                                 pairs, targets.channels, num_messages=num_messages,
                                 method=method)
        counter.step()
        return maps.reshape(1, len(pairs) * num_messages, *maps.shape[2:]).detach()

    x = torch.from_numpy(np.ascontiguousarray(stacked))[None]
    stitched = sliding_window_inference(
        x, roi_size=patch, sw_batch_size=1, predictor=predictor, overlap=overlap,
        mode="gaussian", sw_device=dev, device=torch.device("cpu"),
    )
    maps = stitched[0].reshape(len(pairs), num_messages, *image.shape[1:]).numpy()
    # Gaussian blending of maps >= 0 stays >= 0 up to rounding; clip the rounding.
    maps = np.clip(maps, 0, None)
    return [_PairMaps(maps[p], None, None, _centre_of_mass(targets.masks[channel]),
                      targets.masks[channel])
            for p, channel in enumerate(targets.channels)]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _tag(name: str) -> str:
    """A file-name-safe tag: ':' -> '-', anything odd -> '_'."""
    return re.sub(r"[^A-Za-z0-9+._-]", "_", name.replace(":", "-"))


def heatmap_filename(case_id: str, explanation: PairExplanation | str, auxiliary: str) -> str:
    """``<case>_heatmap_T1-TC_from_T1CE.nii.gz`` (``explanation``: a pair or its name)."""
    name = explanation if isinstance(explanation, str) else explanation.name
    return f"{case_id}_heatmap_{_tag(name)}_from_{_tag(auxiliary.upper())}.nii.gz"


def planned_paths(loaded: LoadedModel, case_id: str, pairs: Sequence[tuple[int, str]],
                  out_dir: Path) -> list[Path]:
    """The files :func:`write_explanations` will write for ``pairs`` (check them before a long
    run instead of failing after it)."""
    decomposition = loaded.config.decomposition
    paths = [Path(out_dir) / heatmap_filename(case_id, pair_name(decomposition, i, r), aux)
             for i, r in pairs for aux in auxiliary_names(loaded.model, decomposition, i)]
    return paths + [Path(out_dir) / WEIGHTS_CSV, Path(out_dir) / WEIGHTS_JSON]


def weights_table(explanations: Sequence[PairExplanation], case_id: str) -> list[dict[str, Any]]:
    """One row per pair and auxiliary modality (what weights.csv holds)."""
    rows = []
    for e in explanations:
        for aux in e.auxiliary:
            rows.append({
                "case": case_id, "pair": e.name, "segmentor": e.segmentor, "primary": e.primary,
                "region": e.region, "auxiliary": aux, "weight": e.weights[aux],
                "heat_sum": e.heat_sums.get(aux, float(np.sum(e.heatmaps[aux], dtype=np.float64))),
                "inside_fraction": e.inside_fraction.get(aux, float("nan")),
                "target_voxels": e.target_voxels, "target_source": e.target_source,
                "mode": e.mode, "method": e.method, "extent": e.extent, "margin_mm": e.margin_mm,
            })
    return rows


def write_explanations(
    explanations: Sequence[PairExplanation],
    case: LoadedCase,
    out_dir: Path,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write every heatmap as NIfTI (the input's affine, header and voxel order), ``weights.csv``
    and ``weights.json`` into ``out_dir``; return the paths written.

    Nothing is written when any target exists and ``overwrite`` is False (FileExistsError).
    """
    out_dir = Path(out_dir)
    # output_path: a case id cannot lead outside out_dir.
    nifti = [(_io.output_path(out_dir, heatmap_filename(case.case_id, e, aux)), e.heatmaps[aux])
             for e in explanations for aux in e.auxiliary]
    targets = [p for p, _ in nifti] + [out_dir / WEIGHTS_CSV, out_dir / WEIGHTS_JSON]
    _io.refuse_existing(targets, overwrite)  # early; each write refuses atomically too
    written = [write_like(heat, case.reference, path, dtype=np.float32, overwrite=overwrite)
               for path, heat in nifti]

    rows = weights_table(explanations, case.case_id)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["case"])
    writer.writeheader()
    writer.writerows(rows)
    written.append(_io.atomic_write_text(out_dir / WEIGHTS_CSV, buffer.getvalue(),
                                         overwrite=overwrite))
    document = {
        "case": case.case_id,
        "definition": "w = sum of the raw heatmap of an auxiliary modality / sum over the pair's "
                      "auxiliary modalities (paper Eq. 16-17); with extent 'target' only the heat "
                      "inside the target dilated by margin_mm counts; inside_fraction = the share "
                      "of the unbound map's heat inside that dilated target",
        "pairs": [{
            "pair": e.name, "segmentor": e.segmentor, "primary": e.primary, "region": e.region,
            "auxiliary": list(e.auxiliary), "weights": e.weights, "heat_sums": e.heat_sums,
            "inside_fraction": {a: (None if not np.isfinite(v) else v)
                                for a, v in e.inside_fraction.items()},
            "method": e.method, "extent": e.extent, "margin_mm": e.margin_mm,
            "target_voxels": e.target_voxels, "target_source": e.target_source, "mode": e.mode,
            "window": [list(w) for w in e.window] if e.window is not None else None,
            "centre": list(e.centre) if e.centre is not None else None,
            "files": {aux: heatmap_filename(case.case_id, e, aux) for aux in e.auxiliary},
        } for e in explanations],
    }
    written.append(_io.atomic_write_text(out_dir / WEIGHTS_JSON,
                                         json.dumps(document, indent=2) + "\n",
                                         overwrite=overwrite))
    return written


__all__ = [
    "EXTENTS",
    "DEFAULT_METHOD",
    "METHODS",
    "MODES",
    "PairExplanation",
    "complementary_weights",
    "dilate_mm",
    "explain_case",
    "gradcam_window",
    "heat_sums",
    "inside_fraction",
    "list_pairs",
    "parse_pairs",
    "planned_paths",
    "write_explanations",
]
