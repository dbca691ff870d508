"""Preprocessing with nnU-Net conventions: crop to the imaged region, normalise per modality,
and resample when grids differ.

The crop box is kept (:class:`CropBox`) so that predictions can be put back on the full grid.
"""

from __future__ import annotations

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
