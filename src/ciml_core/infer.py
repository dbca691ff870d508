"""Whole-case inference: sliding windows with Gaussian weighting, optional mirroring, un-cropping,
labels in the dataset's convention written with the input's affine and header.

How windows run (overlap, mirroring, device, fusion, bf16, native spacing) is one
:class:`InferenceSettings`.

Spacing (nnU-Net): a model that records a target spacing (``CheckpointInfo.spacing``) runs on
every case at that spacing. :func:`predict_case` crops and normalises the case on its own grid,
resamples the image to the model's spacing (cubic) when the case's spacing differs by more than
:data:`~ciml_core.data.preprocess.SPACING_TOLERANCE`, runs the windows there, and resamples the
*probabilities* (linear) back onto the cropped input grid before thresholding, nesting and
un-cropping, so that labels and probabilities lie exactly on the case's own grid. A case already
at the model's spacing is not resampled at all; ``InferenceSettings(native_spacing=True)`` never
resamples.

The volume and the accumulators stay on the CPU while each window runs on the settings' device
(the GPU when there is one), so a 240x240x155 case fits any card. ``progress`` is called after
every window; raising :class:`~ciml_core.errors.Cancelled` from it stops the run cleanly, which
is how the napari plugin's Cancel button works.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ciml_core.checkpoint import LoadedModel
from ciml_core.data.dataset import LoadedCase
from ciml_core.data.labels import LABEL_CONVENTIONS, get_convention, regions_to_labels
from ciml_core.data.nifti import write_like
from ciml_core.data.preprocess import (
    SpacingPlan,
    nonzero_bbox,
    plan_spacing,
    preprocess_image,
    uncrop,
)
from ciml_core.errors import ConfigError, InputDataError
from ciml_core.io import output_path, refuse_existing
from ciml_core.model import (
    CIMLNetwork,
    ensemble_region_probabilities,
    probabilities_to_region_masks,
)
from ciml_core.model.grouped import GroupedCIMLNetwork
from ciml_core.postprocess import remove_lone_enhancement
from ciml_core.runtime import resolve_device

ProgressFn = Callable[[int, int], None]


def check_overlap(value: float) -> float:
    """``value`` if it is a sliding-window overlap in [0, 1), else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"overlap: expected a fraction in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class InferenceSettings:
    """How a network runs over a whole case: the one place the inference defaults live.

    Taken by :func:`predict_case`, :func:`sliding_window_predict`,
    :func:`ciml_core.explain.explain_case`, validation during training, the CLI and the plugin.

    Attributes:
        overlap: fraction of a window shared with its neighbours (MONAI's ``overlap``).
        mirror: average over the 2^d mirrored copies of every window (test-time augmentation).
        device: ``"auto"`` (CUDA when there is one), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...;
            windows run there while the volume and the accumulators stay on the CPU.
        fused: run a CIML network's segmentors as grouped convolutions (same outputs, faster:
            ``benchmarks/speed.py``).
        bf16: bfloat16 autocast for the windows; None: on CUDA only (on a CPU with AVX512-BF16
            it is faster too, at a small accuracy cost, docs/training.md).
        native_spacing: run every case at its own voxel spacing even when the model records
            the spacing it was trained at (default False: a case of another spacing is
            resampled to the model's and the outputs back, see :func:`predict_case`).
        postprocess: remove predicted enhancing-tumour components with no predicted tumour
            around them (vessels, dura: :func:`ciml_core.postprocess.remove_lone_enhancement`);
            only for models that predict WT and ET. The probabilities are left as predicted.
    """

    overlap: float = 0.5
    mirror: bool = False
    device: str | torch.device = "auto"
    fused: bool = True
    bf16: bool | None = None
    native_spacing: bool = False
    postprocess: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "overlap", check_overlap(self.overlap))

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def replace(self, **changes) -> InferenceSettings:
        return dataclasses.replace(self, **changes)


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """How many windows ``sliding_window_inference`` visits for one image of ``shape``."""
    n = 1
    for s, p in zip(shape, patch, strict=True):
        s = max(s, p)
        step = max(int(p * (1 - overlap)), 1)
        n *= int(np.ceil((s - p) / step)) + 1 if s > p else 1
    return n


def mirror_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """All 2^d subsets of spatial axes (tensor dims 2..) to flip for mirroring TTA."""
    dims = range(2, 2 + spatial_dims)
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(dims, r)]


def inference_network(model: torch.nn.Module, *, fused: bool = True) -> torch.nn.Module:
    """The network to run windows through: a CIML network's segmentors fused into grouped
    convolutions (same outputs, faster: ``benchmarks/speed.py``) unless ``fused`` is False;
    any other network as it is. Puts ``model`` in eval mode."""
    model.eval()
    if fused and isinstance(model, CIMLNetwork):
        return GroupedCIMLNetwork.from_network(model)
    return model


@torch.inference_mode()
def sliding_window_predict(
    network: torch.nn.Module,
    image: np.ndarray,
    patch: Sequence[int],
    settings: InferenceSettings | None = None,
    *,
    progress: ProgressFn | None = None,
    per_head: bool = False,
) -> np.ndarray:
    """Per-region probabilities ``(R, *spatial)`` of a preprocessed image ``(M, *spatial)``,
    regions in ``network.config.decomposition.regions`` order, windows of size ``patch``.

    ``per_head``: instead, every output head's own probabilities, heads in task order and each
    head's regions in its order (``sum_h R_h`` channels), before the ensemble averages them.
    ``progress(done, total)`` is called after every window; an exception raised in it (e.g.
    :class:`~ciml_core.errors.Cancelled`) stops the run.
    """
    settings = settings or InferenceSettings()
    decomposition = network.config.decomposition
    dev = settings.resolved_device()
    model = inference_network(network.to(dev), fused=settings.fused)
    use_bf16 = dev.type == "cuda" if settings.bf16 is None else settings.bf16
    patch = tuple(patch)
    flips = mirror_axes(len(patch)) if settings.mirror else [()]
    total = count_windows(image.shape[1:], patch, settings.overlap)
    done = 0

    def predictor(window: torch.Tensor) -> torch.Tensor:
        nonlocal done
        probs = 0
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            for axes in flips:
                x = window.flip(axes) if axes else window
                out = model(x)
                p = (torch.cat([torch.sigmoid(logits) for logits in out.logits], dim=1)
                     if per_head else ensemble_region_probabilities(out, decomposition)).float()
                probs = probs + (p.flip(axes) if axes else p)
                if progress is not None and len(flips) > 1:
                    progress(done, total)  # lets a Cancel act between mirrored passes
        done += window.shape[0]
        if progress is not None:
            progress(done, total)
        return probs / len(flips)

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    probs = sliding_window_inference(
        x, roi_size=patch, sw_batch_size=1, predictor=predictor, overlap=settings.overlap,
        mode="gaussian", sw_device=dev, device=torch.device("cpu"),
    )
    return probs[0].numpy()


#: Below this many imaged voxels along an axis the network's four 2x downsamplings leave less
#: than one voxel: nothing like the volumes a model is trained on.
MIN_TYPICAL_VOXELS = 16
#: Voxel anisotropy (largest / smallest spacing) beyond which slices are unusually thick.
MAX_TYPICAL_ANISOTROPY = 4.0


def input_warnings(case: LoadedCase, loaded: LoadedModel | None = None) -> list[str]:
    """Reasons to distrust a prediction on ``case``: inputs far outside what a segmentation model
    is trained on (a tiny or one-voxel-thick imaged region, very anisotropic voxels). Each is one
    line naming the case; an empty list when the input looks ordinary. The prediction still runs.
    """
    warnings = []
    extent = nonzero_bbox(case.image).shape
    patch = f" (the model's patch is {'x'.join(map(str, loaded.config.patch_size))})" \
        if loaded is not None else ""
    thin = [n for n in extent if n < MIN_TYPICAL_VOXELS]
    if thin:
        warnings.append(
            f"case {case.case_id}: the imaged region is {'x'.join(map(str, extent))} voxels, "
            f"{min(thin)} along its thinnest axis (< {MIN_TYPICAL_VOXELS}){patch}; this is far "
            "outside the volumes the model was trained on, expect an unreliable segmentation")
    spacing = tuple(float(s) for s in case.spacing)
    if min(spacing) > 0 and max(spacing) / min(spacing) > MAX_TYPICAL_ANISOTROPY:
        warnings.append(
            f"case {case.case_id}: voxels of {' x '.join(f'{s:g}' for s in spacing)} mm are very "
            f"anisotropic (ratio {max(spacing) / min(spacing):.1f} > {MAX_TYPICAL_ANISOTROPY:g}); "
            "the model was trained on near-isotropic volumes, expect an unreliable segmentation")
    return warnings


@dataclass
class CasePrediction:
    """Full-grid results of one case, canonical voxel order (``label`` and ``probabilities``
    always on the case's own grid; ``spacing`` says the voxel size the network ran at)."""

    case_id: str
    label: np.ndarray  # uint8, dataset convention
    probabilities: np.ndarray  # (R, *spatial) float32
    regions: tuple[str, ...]
    spacing: SpacingPlan | None = None  # how the case met the model's spacing


def spacing_plan(loaded: LoadedModel, case: LoadedCase, cropped_shape: Sequence[int],
                 settings: InferenceSettings | None = None) -> SpacingPlan:
    """How ``case`` (cropped to ``cropped_shape``) meets ``loaded``'s target spacing: resampled
    to it unless the model records none, ``settings.native_spacing`` is set or the case is
    already at it (within :data:`~ciml_core.data.preprocess.SPACING_TOLERANCE`)."""
    settings = settings or InferenceSettings()
    target = None if settings.native_spacing else loaded.info.spacing
    return plan_spacing(cropped_shape, case.spacing, target)


def fitting_convention(name: str | None, regions: Sequence[str]) -> str | None:
    """``name`` when it is a known label convention whose regions are exactly ``regions`` (a
    dataset's convention a model can paint in), else None."""
    conv = LABEL_CONVENTIONS.get(name) if name else None
    return name if conv is not None and set(conv.region_names) == set(regions) else None


def output_convention(loaded: LoadedModel, name: str | None = None):
    """The :class:`~ciml_core.data.labels.LabelConvention` to write ``loaded``'s predictions in:
    ``name``, or the model's own; a convention whose regions are not the model's is refused."""
    conv = get_convention(name or loaded.info.label_convention)
    if fitting_convention(conv.name, loaded.regions) is None:
        raise ConfigError(
            f"label convention {conv.name!r} has the regions {list(conv.region_names)}, the model "
            f"{loaded.path} predicts {list(loaded.regions)}; choose a convention with the "
            f"model's regions (e.g. {loaded.info.label_convention!r})")
    return conv


def predict_case(
    loaded: LoadedModel,
    case: LoadedCase,
    settings: InferenceSettings | None = None,
    *,
    progress: ProgressFn | None = None,
    nesting: str = "union",
    label_convention: str | None = None,
) -> CasePrediction:
    """Preprocess, predict, threshold, nest (ET in TC in WT, by ``nesting``: see
    :func:`~ciml_core.model.probabilities_to_region_masks`), map to labels and un-crop one case.

    Spacing: the case is cropped and normalised on its own grid (normalising first, as nnU-Net
    v2 does, keeps the z-score statistics and the zero background exactly those of the scan;
    resampled zeros would blur the brain mask), then resampled (cubic) to the model's target
    spacing when it records one that the case's differs from (:func:`spacing_plan`); the
    windows run there and the per-region *probabilities* are resampled back (linear) onto the
    cropped input grid before they are thresholded and nested. Thresholding interpolated
    probabilities gives smooth, sub-voxel-accurate boundaries where nearest-neighbour upsampling
    of a coarse label map would give staircases and lose thin structures (the enhancing rim),
    and it is what nnU-Net does. The outputs are always on the case's own grid.

    Post-processing (``settings.postprocess``, on by default): enhancing-tumour components with
    no predicted tumour around them are removed (:mod:`ciml_core.postprocess`).

    ``label_convention``: the labels to write (e.g. the dataset's: BraTS 2023 paints ET as 3,
    BraTS 2020 as 4); None: the convention the model was trained with. It must name the
    model's regions (:func:`output_convention`)."""
    settings = settings or InferenceSettings()
    conv = output_convention(loaded, label_convention)
    if tuple(case.modalities) != tuple(loaded.modalities):
        raise InputDataError(
            f"case {case.case_id}: the model {loaded.path} expects modalities "
            f"{list(loaded.modalities)} in that order, the case provides {list(case.modalities)}"
        )
    pre = preprocess_image(case.image, case.modalities,
                           pet_method=loaded.info.normalisation.get("pet_method", "log"))
    plan = spacing_plan(loaded, case, pre.box.shape, settings)
    probs = sliding_window_predict(loaded.model, plan.to_model(pre.image),
                                   loaded.config.patch_size, settings, progress=progress)
    probs = np.clip(plan.to_input(probs), 0.0, 1.0) if plan.resampled else probs
    masks = probabilities_to_region_masks(torch.from_numpy(probs)[None], loaded.regions,
                                          nesting=nesting)[0].numpy()
    if settings.postprocess:
        masks, _ = remove_lone_enhancement(masks, loaded.regions, case.spacing)
    order = [loaded.regions.index(r) for r in conv.region_names]
    label = regions_to_labels(masks[order], conv)
    return CasePrediction(
        case_id=case.case_id,
        label=uncrop(label, pre.box, fill=0),
        probabilities=uncrop(probs.astype(np.float32), pre.box, fill=0.0),
        regions=loaded.regions,
        spacing=plan,
    )


def write_prediction(
    prediction: CasePrediction,
    case: LoadedCase,
    out_dir: Path,
    *,
    probabilities: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``<case>.nii.gz`` (uint8 labels) and optionally ``<case>_prob_<region>.nii.gz``."""
    # output_path: a case id can never place a file outside out_dir (e.g. "../x").
    targets = [(output_path(out_dir, f"{prediction.case_id}.nii.gz"), prediction.label, np.uint8)]
    if probabilities:
        for i, region in enumerate(prediction.regions):
            targets.append((output_path(out_dir, f"{prediction.case_id}_prob_{region}.nii.gz"),
                            prediction.probabilities[i], np.float32))
    refuse_existing([p for p, _, _ in targets], overwrite)  # early; each write refuses atomically
    return [write_like(data, case.reference, path, dtype=dtype, overwrite=overwrite)
            for path, data, dtype in targets]
