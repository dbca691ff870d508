"""NIfTI volumes in one canonical voxel order, and writing results back in the input's own.

Internally every volume is held in RAS+ voxel order (the closest canonical orientation, as
nibabel defines it: voxel axes 0, 1, 2 run towards Right, Anterior, Superior), so that patches,
flips and metrics mean the same thing for every file. :class:`NiftiSource` remembers the original affine,
header, shape and orientation, and :func:`write_like` undoes the reorientation, so an output opens
on top of its input in any viewer with exactly the input's affine.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from ciml_core.errors import GeometryError, InputDataError
from ciml_core.io import write_file

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CANONICAL_ORNT = axcodes2ornt(("R", "A", "S"))
#: Largest difference (mm) tolerated between the affines of the modalities of one case.
AFFINE_TOLERANCE_MM = 1e-3
#: Deflate cannot compress better than about 1032:1, so a .nii.gz file of n bytes holds at most
#: this many times n bytes of voxel data (with margin); a header claiming more is corrupt.
GZIP_MAX_RATIO = 1100
#: Bytes per voxel a loaded volume may take in memory at once (scaled float64 data, the
#: reoriented copy and the float32 channel): the claimed size is checked against this first.
_BYTES_PER_VOXEL_IN_MEMORY = 20


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when the file name ends in .nii or .nii.gz (case-insensitive)."""
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


@dataclass(frozen=True)
class NiftiSource:
    """Where a volume came from: enough to write any same-grid array back in its own voxel order."""

    path: Path
    affine: np.ndarray  # the file's own affine
    header: nib.Nifti1Header
    shape: tuple[int, ...]  # the file's spatial shape (3 axes) in its own voxel order
    ornt: np.ndarray  # the file's orientation (nibabel ornt array)

    @classmethod
    def from_affine(
        cls,
        shape: Sequence[int],
        affine: np.ndarray,
        path: str | os.PathLike,
        *,
        header: nib.Nifti1Header | None = None,
        dtype: np.dtype | type = np.uint8,
    ) -> NiftiSource:
        """The source of a volume stored with ``affine`` and (the first 3 axes of) ``shape``, in
        its own voxel order.

        ``header``: the file's header (copied); without one, the header nibabel writes for such
        an image (:func:`nifti_image`: sform and qform = ``affine``, mm, data type ``dtype``), so
        that a volume that exists only in memory is written back (:func:`write_like`) as an
        ordinary, correctly placed NIfTI file. ``path`` is used in messages (it need not exist).
        """
        affine = np.asarray(affine, dtype=np.float64)
        shape = tuple(int(s) for s in shape[:3])
        if header is None:
            header = nifti_image(np.zeros(shape, dtype), affine).header
        return cls(path=Path(path), affine=affine, header=header.copy(), shape=shape,
                   ornt=io_orientation(affine))

    @property
    def to_canonical(self) -> np.ndarray:
        return ornt_transform(self.ornt, CANONICAL_ORNT)

    @property
    def from_canonical(self) -> np.ndarray:
        return ornt_transform(CANONICAL_ORNT, self.ornt)

    @property
    def canonical_affine(self) -> np.ndarray:
        return self.affine @ inv_ornt_aff(self.to_canonical, self.shape)

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return tuple(int(self.shape[int(ax)]) for ax in self.to_canonical[:, 0].argsort())

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along the canonical axes."""
        return tuple(float(s) for s in np.sqrt((self.canonical_affine[:3, :3] ** 2).sum(axis=0)))


@dataclass
class Volume:
    """A 3-D volume in canonical (RAS+) voxel order plus the source it can be written back to."""

    data: np.ndarray
    source: NiftiSource

    @property
    def affine(self) -> np.ndarray:
        """The affine of ``data`` (canonical voxel order)."""
        return self.source.canonical_affine

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.source.spacing


def _squeeze_to_3d(data: np.ndarray, path: Path) -> np.ndarray:
    """Accept 3-D data, or 4-D/5-D data whose trailing axes are singletons (a common export)."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise GeometryError(
            f"{path}: expected a 3-D volume (or a 4-D file with one frame), got shape {data.shape}"
        )
    return data


def load_volume(path: str | os.PathLike, *, allow_empty: bool = True) -> Volume:
    """Load a NIfTI file into canonical voxel order, validating it.

    Raises:
        InputDataError: missing file, not a NIfTI file, truncated/corrupt data, NaN/Inf voxels,
            or (``allow_empty=False``) an all-zero volume.
        GeometryError: not 3-D (a trailing singleton axis is squeezed, not refused).
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: file not found")
    if not is_nifti_path(path):
        raise InputDataError(f"{path}: not a NIfTI file (expected a .nii or .nii.gz file)")
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise InputDataError(f"{path}: not a NIfTI-1/2 image (got {type(img).__name__})")
        stored = img.get_data_dtype()
        if stored.kind not in "biuf":
            raise InputDataError(f"{path}: voxel type {stored} is not a real number type; "
                                 "expected integer or floating-point intensities")
        check_claimed_size(path, img)  # before allocating anything the header asks for
        raw = np.asanyarray(img.dataobj)
    except InputDataError:
        raise
    except (nib.filebasedimages.ImageFileError, gzip.BadGzipFile, zlib.error,
            nib.spatialimages.HeaderDataError, nib.spatialimages.ImageDataError) as err:
        raise InputDataError(f"{path}: not a readable NIfTI file ({err})") from err
    except (EOFError, OSError, ValueError) as err:
        raise InputDataError(f"{path}: file is truncated or corrupt ({err})") from err
    except MemoryError as err:
        raise InputDataError(f"{path}: the volume its header describes ({img.shape}) does not "
                             "fit in memory") from err

    raw = _squeeze_to_3d(raw, path)
    if np.issubdtype(raw.dtype, np.floating):
        bad = ~np.isfinite(raw)
        if bad.any():
            raise InputDataError(
                f"{path}: {int(bad.sum())} voxel(s) are NaN or Inf; expected finite intensities"
            )
        peak = float(np.abs(raw).max()) if raw.size else 0.0
        if peak > float(np.finfo(np.float32).max):
            slope, _ = img.header.get_slope_inter()
            raise InputDataError(
                f"{path}: intensities reach {peak:.3g} (header scl_slope {slope}), beyond the "
                f"float32 range ({np.finfo(np.float32).max:.3g}) the model computes in; expected "
                "a plausible scale slope / intensity range"
            )
    if not allow_empty and not np.any(raw):
        raise InputDataError(f"{path}: every voxel is zero; expected a non-empty image")

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise GeometryError(
            f"{path}: the affine (sform/qform) {affine[:3].tolist()} is "
            f"{'not finite' if not np.all(np.isfinite(affine)) else 'singular'}; expected a "
            "voxel-to-world transform with non-zero voxel sizes"
        )
    source = NiftiSource.from_affine(raw.shape, affine, path, header=img.header)
    data = apply_orientation(raw, source.to_canonical)
    return Volume(data=np.ascontiguousarray(data), source=source)


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_claimed_size(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse a header whose claimed volume the file cannot hold, or memory cannot take, before
    anything is allocated (a 100-byte file may claim a 4000^3 volume).

    Raises:
        InputDataError: naming the file, the claimed shape and the limit.
    """
    shape = tuple(int(s) for s in img.header.get_data_shape())
    if any(s < 0 for s in shape):
        raise InputDataError(f"{path}: header claims a negative dimension {shape}")
    voxels = math.prod(shape)
    itemsize = img.header.get_data_dtype().itemsize
    claimed = voxels * itemsize
    size = path.stat().st_size
    if str(path).lower().endswith(".gz"):
        if claimed > size * GZIP_MAX_RATIO + (1 << 20):
            raise InputDataError(
                f"{path}: header claims a {'x'.join(map(str, shape))} volume ({claimed:,} bytes), "
                f"more than a {size:,}-byte gzip file can hold; the file is truncated or corrupt"
            )
    else:
        offset = int(img.header.get("vox_offset", 0) or 0)
        if offset + claimed > size:
            raise InputDataError(
                f"{path}: header claims a {'x'.join(map(str, shape))} volume ({claimed:,} bytes "
                f"from offset {offset}) but the file holds {size:,} bytes; the file is truncated "
                "or corrupt"
            )
    available = _available_memory()
    needed = voxels * max(itemsize, _BYTES_PER_VOXEL_IN_MEMORY)
    if available is not None and needed > available:
        raise InputDataError(
            f"{path}: header claims a {'x'.join(map(str, shape))} volume, which would need about "
            f"{needed / 2**30:.1f} GiB of memory; {available / 2**30:.1f} GiB are available"
        )


def grid_mismatch(
    a: NiftiSource,
    b: NiftiSource,
    *,
    what: tuple[str, str] = ("", ""),
    canonical: bool = True,
    context: str = "",
    hint: str = "they must lie on one voxel grid",
) -> str | None:
    """Why ``a`` and ``b`` do not lie on one voxel grid (shape, then affine within
    :data:`AFFINE_TOLERANCE_MM`), naming both files; None when they do.

    Args:
        what: what each one is, put before its path in the message (e.g. "prediction").
        canonical: compare in canonical (RAS+) voxel order, the order arrays are compared in, so
            the same grid stored in another axis order or flip matches; False compares the
            files' own voxel order and affines.
        context: put before the message (e.g. ``"case C1: "``).
        hint: put after it, saying what is expected.
    """
    def name(i: int, source: NiftiSource) -> str:
        return f"{what[i]} {source.path}" if what[i] else str(source.path)

    if canonical:
        shapes = a.canonical_shape, b.canonical_shape
        diff = float(np.abs(a.canonical_affine - b.canonical_affine).max())
    else:
        shapes = tuple(a.shape), tuple(b.shape)
        diff = float(np.abs(a.affine - b.affine).max())
    if shapes[0] != shapes[1]:
        order = " (canonical order)" if canonical else ""
        return (f"{context}{name(0, a)} has shape {shapes[0]} but {name(1, b)} has shape "
                f"{shapes[1]}{order}; {hint}")
    if diff > AFFINE_TOLERANCE_MM:
        return (f"{context}{name(0, a)} and {name(1, b)} have affines that differ by up to "
                f"{diff:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm); {hint}")
    return None


def check_grid(a: NiftiSource, b: NiftiSource, **how: Any) -> None:
    """Raise GeometryError with :func:`grid_mismatch`'s message unless ``a`` and ``b`` lie on one
    voxel grid (``how``: its keyword arguments)."""
    problem = grid_mismatch(a, b, **how)
    if problem:
        raise GeometryError(problem)


def check_same_grid(volumes: dict[str, Volume]) -> None:
    """Raise GeometryError naming both files when the modalities' shapes or affines (in their
    own voxel order, tolerance :data:`AFFINE_TOLERANCE_MM`) differ."""
    items = list(volumes.items())
    name0, ref = items[0]
    for name, vol in items[1:]:
        check_grid(vol.source, ref.source, what=(name, name0), canonical=False,
                   hint="all modalities of a case must share one grid (resample them onto one "
                   "grid first)")


def nifti_image(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image of ``array`` (its own voxel order) with ``affine`` as both sform and qform
    (scanner space) and mm units: how every volume made from scratch is stored."""
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def atomic_save(img: nib.Nifti1Image, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``img`` to ``path`` atomically (:func:`ciml_core.io.write_file`): a reader never sees
    a half-written file, and an existing file is only replaced when asked; without
    ``overwrite`` the refusal is atomic even against a concurrent writer (FileExistsError)."""
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    return write_file(path, lambda tmp: nib.save(img, str(tmp)), overwrite=overwrite, suffix=suffix)


def write_like(
    data: np.ndarray,
    source: NiftiSource,
    path: str | os.PathLike,
    *,
    dtype: np.dtype | type | None = None,
    overwrite: bool = False,
) -> Path:
    """Write canonical-order ``data`` (3-D, or 4-D with trailing channels) in ``source``'s voxel
    order, with its affine and a copy of its header (data type updated to ``dtype``)."""
    data = np.asarray(data)
    if tuple(data.shape[:3]) != source.canonical_shape:
        raise GeometryError(
            f"cannot write {path}: array shape {data.shape[:3]} does not match the grid of "
            f"{source.path} {source.canonical_shape} (canonical order)"
        )
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    native = apply_orientation(data, source.from_canonical)
    header = source.header.copy()
    header.set_data_dtype(native.dtype)
    img = nib.Nifti1Image(np.ascontiguousarray(native), source.affine, header=header)
    # Keep the reader-visible affine identical to the input's: both sform and qform.
    img.set_sform(source.affine, code=int(source.header["sform_code"]) or 1)
    img.set_qform(source.affine, code=int(source.header["qform_code"]) or 1)
    if np.issubdtype(native.dtype, np.integer):
        img.header.set_slope_inter(1.0, 0.0)
    return atomic_save(img, path, overwrite=overwrite)
