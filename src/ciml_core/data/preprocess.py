"""Preprocessing with nnU-Net conventions: crop to the imaged region, normalise per modality,
and resample when grids differ.

The crop box is kept (:class:`CropBox`) so that predictions can be put back on the full grid.

Target spacing (nnU-Net): a model records the voxel spacing it was trained at
(:func:`target_spacing` of its training cases); a case of another spacing is cropped,
normalised and then resampled to it (:func:`resample_image`, cubic), and the outputs come back to
the case's own cropped grid (:class:`SpacingPlan`). All spacings are in mm along the canonical
(RAS+) voxel axes, the order of ``LoadedCase.spacing``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ciml_core.errors import ConfigError, InputDataError

#: How each canonical modality is normalised. Anything not listed is treated as MRI-like.
MODALITY_KIND = {"flair": "mri", "t1": "mri", "t1ce": "mri", "t2": "mri", "ct": "ct", "pet": "pet"}
#: HU above which a CT voxel counts as body (foreground) for the percentile clip.
CT_BODY_HU = -500.0


@dataclass(frozen=True)
class CropBox:
    """A bounding box inside a full grid: ``slices`` index the spatial axes of ``full_shape``."""

    slices: tuple[slice, ...]
    full_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.slices)


def nonzero_bbox(image: np.ndarray) -> CropBox:
    """Bounding box of the union of nonzero voxels over all channels of ``image`` ``(M, *spatial)``.

    An image with no nonzero voxel is an error: there is nothing to segment.
    """
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        raise InputDataError("every voxel of every modality is zero; expected a non-empty image")
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return CropBox(tuple(slices), tuple(mask.shape))


def crop(array: np.ndarray, box: CropBox) -> np.ndarray:
    """Crop the trailing spatial axes of ``array`` (any leading channel axes are kept)."""
    lead = (slice(None),) * (array.ndim - len(box.slices))
    return array[lead + box.slices]


def uncrop(array: np.ndarray, box: CropBox, fill: float = 0) -> np.ndarray:
    """Put a cropped array back on the full grid, ``fill`` outside the box."""
    lead_shape = array.shape[: array.ndim - len(box.slices)]
    if tuple(array.shape[len(lead_shape):]) != box.shape:
        raise ConfigError(f"cannot uncrop an array of spatial shape {array.shape[len(lead_shape):]} "
                          f"into a box of shape {box.shape}")
    out = np.full(lead_shape + box.full_shape, fill, dtype=array.dtype)
    out[(slice(None),) * len(lead_shape) + box.slices] = array
    return out


def _zscore(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # Statistics in float64: the squares of float32 intensities above ~1e19 overflow float32
    # (an int16 file with a large scl_slope), which made every voxel NaN and the mask empty.
    values = x[mask].astype(np.float64)
    if values.size == 0:
        return np.zeros_like(x, dtype=np.float32)
    mean = float(values.mean())
    std = float(values.std())
    if not (np.isfinite(mean) and np.isfinite(std)):
        raise InputDataError(f"intensity statistics are not finite (mean {mean}, std {std}); "
                             "expected intensities within the float32 range")
    return ((x.astype(np.float64) - mean) / max(std, 1e-8)).astype(np.float32)


def normalize_mri(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """z-score inside ``mask`` (the union-nonzero brain), 0 outside, as nnU-Net does for MRI."""
    return np.where(mask, _zscore(x, mask), 0).astype(np.float32)


def normalize_ct(x: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Clip to the 0.5/99.5 percentiles of the body (HU > -500), then z-score with body statistics.

    nnU-Net takes these statistics over the labelled foreground of the whole training set; a tool
    that segments one unseen case has no labels, so the body of the case itself stands in.
    """
    body = x > CT_BODY_HU
    if not body.any():
        body = np.ones_like(x, dtype=bool)
    lo, hi = np.percentile(x[body], [lower, upper])
    clipped = np.clip(x, lo, hi)
    return _zscore(clipped, body)


def normalize_pet(x: np.ndarray, method: str = "log") -> np.ndarray:
    """PET SUV: ``log`` = log(1 + SUV) then z-score over the whole volume (default: compresses the
    long tail of hot lesions, so one bladder does not set the scale); ``zscore`` = plain z-score."""
    if method == "log":
        x = np.log1p(np.clip(x, 0, None))
    elif method != "zscore":
        raise ConfigError(f"PET normalisation {method!r} is unknown; expected 'log' or 'zscore'")
    return _zscore(x, np.ones_like(x, dtype=bool))


@dataclass
class PreprocessedImage:
    """Cropped, normalised channels ``(M, *box.shape)`` and the box that undoes the crop."""

    image: np.ndarray
    box: CropBox


def preprocess_image(
    image: np.ndarray, modalities: Sequence[str], *, pet_method: str = "log"
) -> PreprocessedImage:
    """Crop ``image`` ``(M, *spatial)`` to the union-nonzero box and normalise each modality."""
    if image.shape[0] != len(modalities):
        raise ConfigError(f"image has {image.shape[0]} channels but {len(modalities)} modalities "
                          f"were named {list(modalities)}")
    box = nonzero_bbox(image)
    cropped = crop(image.astype(np.float32, copy=False), box)
    mask = np.any(cropped != 0, axis=0)
    channels = []
    for x, name in zip(cropped, modalities, strict=True):
        kind = MODALITY_KIND.get(name, "mri")
        if kind == "ct":
            channels.append(normalize_ct(x))
        elif kind == "pet":
            channels.append(normalize_pet(x, pet_method))
        else:
            channels.append(normalize_mri(x, mask))
    return PreprocessedImage(np.stack(channels), box)


def resample_to_grid(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    *,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Resample a 3-D volume onto another grid (world coordinates from the two affines).

    Use ``order=0`` for labels, 1 (trilinear) or 3 for images. E.g. put a PET volume on its CT grid.
    """
    # Maps a destination voxel index to the source voxel index: src^-1 @ dst.
    vox_map = np.linalg.inv(src_affine) @ dst_affine
    out = ndimage.affine_transform(
        data.astype(np.float32) if order > 0 else data,
        vox_map[:3, :3],
        offset=vox_map[:3, 3],
        output_shape=tuple(int(s) for s in dst_shape),
        order=order,
        mode="constant",
        cval=cval,
    )
    return out


def resample_to_spacing(
    data: np.ndarray, affine: np.ndarray, spacing: Sequence[float], *, order: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a 3-D volume to a new voxel spacing (mm) over the same field of view.

    Returns the resampled data and its affine.
    """
    old = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    new = np.asarray(spacing, dtype=np.float64)
    shape = np.maximum(1, np.round(np.asarray(data.shape) * old / new)).astype(int)
    dst_affine = affine.copy()
    dst_affine[:3, :3] = affine[:3, :3] / old * new
    # Keep the centre of the field of view fixed.
    centre_old = affine @ np.r_[(np.asarray(data.shape) - 1) / 2.0, 1]
    centre_new = dst_affine @ np.r_[(shape - 1) / 2.0, 1]
    dst_affine[:3, 3] += (centre_old - centre_new)[:3]
    return resample_to_grid(data, affine, dst_affine, shape, order=order), dst_affine


# --------------------------------------------------------------------------------------------
# Target spacing (nnU-Net): choosing it, resampling to it and back
# --------------------------------------------------------------------------------------------

#: A case is resampled to the model's spacing only when some axis differs by more than this
#: fraction. Below it the field of view changes by under 2% (3 voxels over 155): far inside the
#: 0.7-1.4 scaling augmentation a model is trained with, while resampling would blur the image by
#: interpolation for nothing. A case at the model's own spacing is never resampled.
SPACING_TOLERANCE = 0.02
#: nnU-Net's anisotropy threshold: an axis whose median spacing is more than this many times the
#: finest other axis is treated as the "thick-slice" axis by :func:`target_spacing`.
ANISOTROPY_THRESHOLD = 3.0
#: Interpolation orders: images cubic (nnU-Net's ``order=3``), probabilities / heatmaps linear
#: (stay in [0, 1] / >= 0, no overshoot), labels per value linear then > 0.5 (nnU-Net's
#: ``resize_segmentation``; smoother than nearest neighbour, values stay in the label set).
IMAGE_ORDER, PROBABILITY_ORDER, LABEL_ORDER = 3, 1, 1


def _as_spacing(spacing: Sequence[float], what: str, ndim: int | None = None) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        values = ()
    if not values or (ndim is not None and len(values) != ndim) or not all(
            math.isfinite(v) and v > 0 for v in values):
        count = f"{ndim} " if ndim is not None else ""
        raise ConfigError(f"{what}: expected {count}positive voxel sizes in mm, got {spacing!r}")
    return values


def target_spacing(
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]] | None = None,
    *,
    anisotropy: float = ANISOTROPY_THRESHOLD,
) -> tuple[float, float, float]:
    """The spacing (mm per canonical axis) a model is trained and run at, chosen from the
    spacings of its training cases as nnU-Net does (``determine_fullres_target_spacing``).

    Per axis, the median of the cases' spacings: a typical case is then barely resampled, and
    the median is robust to a few outlier scans. Spacings must be in canonical (RAS+) voxel-axis
    order (``LoadedCase.spacing``), so that each axis compares one anatomical direction whatever
    the files' own orientation.

    Strongly anisotropic data (thick slices): when the median of the coarsest axis exceeds
    ``anisotropy`` (3) times the finest other axis, and (if ``shapes`` are given) that axis also
    has fewer than a third as many voxels as the others, its target is lowered to the 10th
    percentile of its spacings (but not below the coarsest other axis): the median would
    throw away the resolution of the thinner-sliced scans, and upsampling the few thick ones is
    cheap. Without ``shapes`` only the spacing condition is checked. Isotropic data (BraTS: 1 mm
    everywhere) is unaffected.

    Raises:
        ConfigError: no spacings, or one that is not three positive numbers.
    """
    if spacings is None or len(spacings) == 0:
        raise ConfigError("target spacing: no case spacings given")
    table = np.array([_as_spacing(s, "case spacing", 3) for s in spacings], dtype=np.float64)
    target = np.median(table, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > anisotropy * min(target[a] for a in others)
    aniso_voxels = True
    if shapes is not None:
        sizes = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
        aniso_voxels = sizes[worst] * anisotropy < min(sizes[a] for a in others)
    if aniso_spacing and aniso_voxels:
        lowered = float(np.percentile(table[:, worst], 10))
        target[worst] = max(lowered, max(target[a] for a in others) + 1e-5)
    return tuple(float(t) for t in target)  # type: ignore[return-value]


def spacing_differs(
    spacing: Sequence[float], target: Sequence[float], tolerance: float = SPACING_TOLERANCE
) -> bool:
    """True when some axis of ``spacing`` differs from ``target`` by more than ``tolerance``
    (relative to the target): the case must be resampled to run at the target spacing."""
    spacing = _as_spacing(spacing, "spacing")
    target = _as_spacing(target, "target spacing", len(spacing))
    return any(abs(s - t) > tolerance * t for s, t in zip(spacing, target, strict=True))


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, ...]:
    """The grid that covers the field of view of ``shape`` voxels of ``spacing`` with voxels of
    ``target`` (rounded, at least 1 voxel per axis), as :func:`resample_to_spacing` makes it."""
    spacing = _as_spacing(spacing, "spacing", len(shape))
    target = _as_spacing(target, "target spacing", len(shape))
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target,
                                                                 strict=True))


def _zoom(data: np.ndarray, spacing: tuple[float, ...], target: tuple[float, ...],
          shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample the trailing axes of ``data`` (voxels of ``spacing``) onto ``shape`` voxels of
    ``target``, both grids centred on one field-of-view centre (the geometry of
    :func:`resample_to_spacing`); edges are extended (``mode="nearest"``)."""
    spatial = len(spacing)
    src_shape = data.shape[-spatial:]
    # destination voxel i lies at source coordinate c_src + (i - c_dst) * target / spacing
    scale = np.array([t / s for s, t in zip(spacing, target, strict=True)])
    offset = np.array([(n - 1) / 2 - (m - 1) / 2 * k
                       for n, m, k in zip(src_shape, shape, scale, strict=True)])
    lead = data.shape[:-spatial]
    flat = data.reshape((-1, *src_shape))
    out = np.empty((flat.shape[0], *shape), dtype=flat.dtype)
    for c in range(flat.shape[0]):
        ndimage.affine_transform(flat[c], scale, offset=offset, output_shape=shape,
                                 output=out[c], order=order, mode="nearest", prefilter=order > 1)
    return out.reshape((*lead, *shape))


def resample_image(
    image: np.ndarray,
    spacing: Sequence[float],
    target: Sequence[float],
    *,
    order: int = IMAGE_ORDER,
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample a float volume ``(..., X, Y, Z)`` (any leading channel axes, e.g. ``(M, X, Y,
    Z)`` images or ``(R, X, Y, Z)`` probabilities) from voxels of ``spacing`` to voxels of
    ``target`` (mm, canonical axis order) over the same field of view.

    The new grid has :func:`resampled_shape` voxels (or ``shape``: the way back onto a known
    grid, e.g. a prediction onto the case's cropped grid), centred on the old field of view's
    centre, so that voxel sizes are exactly ``target``. ``order``: 3 (cubic, nnU-Net's choice for
    images; the default) or 1 (linear: probabilities and heatmaps stay within their range).
    Returns float32.
    """
    image = np.asarray(image, dtype=np.float32)
    spacing = _as_spacing(spacing, "spacing")
    target = _as_spacing(target, "target spacing", len(spacing))
    if image.ndim < len(spacing):
        raise ConfigError(f"cannot resample an array of shape {image.shape} with a "
                          f"{len(spacing)}-axis spacing")
    src_shape = image.shape[-len(spacing):]
    shape = (resampled_shape(src_shape, spacing, target) if shape is None
             else tuple(int(n) for n in shape))
    if len(shape) != len(spacing):
        raise ConfigError(f"shape {shape}: expected {len(spacing)} axes")
    if shape == tuple(src_shape) and spacing == target:
        return image.copy()
    return _zoom(np.ascontiguousarray(image), spacing, target, shape, order)


def resample_labels(
    labels: np.ndarray,
    spacing: Sequence[float],
    target: Sequence[float],
    *,
    order: int = LABEL_ORDER,
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample an integer label volume ``(..., X, Y, Z)`` (or 0/1 region masks ``(R, X, Y,
    Z)``, each channel on its own) like :func:`resample_image`; the result keeps the input's
    dtype and holds only values the input holds.

    ``order=1`` (default): the one-hot mask of every value present (background included) is
    resampled linearly and each voxel takes the value of the largest, so boundaries are smooth
    rather than staircased (nnU-Net's ``resize_segmentation`` thresholds each value's mask at
    0.5 instead, which can leave background holes where three values meet; the arg-max cannot).
    On 0/1 region masks it is "linear, then > 0.5". ``order=0``: nearest neighbour.
    """
    labels = np.asarray(labels)
    spacing = _as_spacing(spacing, "spacing")
    target = _as_spacing(target, "target spacing", len(spacing))
    src_shape = labels.shape[-len(spacing):]
    shape = (resampled_shape(src_shape, spacing, target) if shape is None
             else tuple(int(n) for n in shape))
    if order == 0:
        return _zoom(np.ascontiguousarray(labels), spacing, target, shape, 0)
    values = np.unique(labels)
    out = np.full((*labels.shape[:-len(spacing)], *shape), values[0], dtype=labels.dtype)
    best = np.zeros(out.shape, dtype=np.float32)
    for i, value in enumerate(values):
        weight = _zoom((labels == value).astype(np.float32), spacing, target, shape, order)
        if i == 0:
            best = weight
            continue
        wins = weight > best
        out[wins] = value
        best = np.maximum(best, weight)
    return out


@dataclass(frozen=True)
class SpacingPlan:
    """How a cropped case meets a model's spacing: ``to_model`` puts arrays of the case's
    cropped grid onto the grid the model runs on, ``to_input`` brings outputs back exactly onto
    the cropped grid. When ``resampled`` is False (no target spacing, native spacing asked for,
    or the case already at the target within :data:`SPACING_TOLERANCE`) both are the identity and
    return their input unchanged.

    Attributes:
        shape: the case's cropped grid.
        spacing: the case's voxel size (mm, canonical axes).
        target: the spacing the model runs at (``spacing`` itself when not resampled).
        model_shape: the grid the model runs on.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    target: tuple[float, ...]
    model_shape: tuple[int, ...]

    @property
    def resampled(self) -> bool:
        return self.target != self.spacing

    def to_model(self, data: np.ndarray, *, order: int = IMAGE_ORDER) -> np.ndarray:
        """``data (..., *shape)`` on the model's grid (float32); unchanged when not resampled."""
        if not self.resampled:
            return data
        return resample_image(data, self.spacing, self.target, order=order,
                              shape=self.model_shape)

    def to_input(self, data: np.ndarray, *, order: int = PROBABILITY_ORDER) -> np.ndarray:
        """``data (..., *model_shape)`` back on the case's cropped grid (float32); unchanged when
        not resampled. Linear by default: probabilities stay in [0, 1], heatmaps >= 0."""
        if not self.resampled:
            return data
        return resample_image(data, self.target, self.spacing, order=order, shape=self.shape)

    def describe(self) -> str:
        """``"1 x 1 x 1 mm -> 2 x 2 x 2 mm"`` or ``"at 1 x 1 x 1 mm (native)"``."""
        if not self.resampled:
            return f"at {format_spacing(self.spacing)} (native)"
        return f"{format_spacing(self.spacing)} -> {format_spacing(self.target)}"


def format_spacing(spacing: Sequence[float] | None) -> str:
    """``"2 x 2 x 2 mm"`` (``"native"`` for None)."""
    if spacing is None:
        return "native"
    return " x ".join(f"{float(s):.4g}" for s in spacing) + " mm"


def plan_spacing(
    shape: Sequence[int],
    spacing: Sequence[float],
    target: Sequence[float] | None,
    *,
    tolerance: float = SPACING_TOLERANCE,
) -> SpacingPlan:
    """The :class:`SpacingPlan` of a cropped grid ``shape`` of voxels ``spacing`` for a model
    that runs at ``target`` (None: at every case's native spacing). Resampled only when
    :func:`spacing_differs` beyond ``tolerance``."""
    shape = tuple(int(n) for n in shape)
    spacing = _as_spacing(spacing, "spacing", len(shape))
    if target is None or not spacing_differs(spacing, target, tolerance):
        return SpacingPlan(shape, spacing, spacing, shape)
    target = _as_spacing(target, "target spacing", len(shape))
    return SpacingPlan(shape, spacing, target, resampled_shape(shape, spacing, target))
