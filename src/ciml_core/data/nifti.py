"""NIfTI volumes in one canonical voxel order, and writing results back in the input's own.

Internally every volume is held in RAS+ voxel order (the closest canonical orientation, as
nibabel defines it: voxel axes 0, 1, 2 run towards Right, Anterior, Superior), so that patches,
flips and metrics mean the same thing for every file. :class:`NiftiSource` remembers the original affine,
header, shape and orientation, and :func:`write_like` undoes the reorientation, so an output opens
on top of its input in any viewer with exactly the input's affine.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

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

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CANONICAL_ORNT = axcodes2ornt(("R", "A", "S"))
#: Largest difference (mm) tolerated between the affines of the modalities of one case.
AFFINE_TOLERANCE_MM = 1e-3


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
        raw = np.asanyarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, gzip.BadGzipFile, zlib.error) as err:
        raise InputDataError(f"{path}: not a readable NIfTI file ({err})") from err
    except (EOFError, OSError, ValueError) as err:
        raise InputDataError(f"{path}: file is truncated or corrupt ({err})") from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputDataError(f"{path}: not a NIfTI-1/2 image (got {type(img).__name__})")

    raw = _squeeze_to_3d(raw, path)
    if np.issubdtype(raw.dtype, np.floating):
        bad = ~np.isfinite(raw)
        if bad.any():
            raise InputDataError(
                f"{path}: {int(bad.sum())} voxel(s) are NaN or Inf; expected finite intensities"
            )
    if not allow_empty and not np.any(raw):
        raise InputDataError(f"{path}: every voxel is zero; expected a non-empty image")

    affine = np.asarray(img.affine, dtype=np.float64)
    source = NiftiSource(
        path=path,
        affine=affine,
        header=img.header.copy(),
        shape=tuple(int(s) for s in raw.shape),
        ornt=io_orientation(affine),
    )
    data = apply_orientation(raw, source.to_canonical)
    return Volume(data=np.ascontiguousarray(data), source=source)


def check_same_grid(volumes: dict[str, Volume]) -> None:
    """Raise GeometryError naming both files when shapes or affines (tolerance 1e-3 mm) differ."""
    items = list(volumes.items())
    name0, ref = items[0]
    for name, vol in items[1:]:
        if vol.source.shape != ref.source.shape:
            raise GeometryError(
                f"{vol.source.path} ({name}) has shape {vol.source.shape} but "
                f"{ref.source.path} ({name0}) has shape {ref.source.shape}; "
                "all modalities of a case must share one grid"
            )
        diff = float(np.abs(vol.source.affine - ref.source.affine).max())
        if diff > AFFINE_TOLERANCE_MM:
            raise GeometryError(
                f"{vol.source.path} ({name}) and {ref.source.path} ({name0}) have affines that "
                f"differ by up to {diff:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm); resample "
                "them onto one grid first"
            )


def atomic_save(img: nib.Nifti1Image, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``img`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file, and an existing file is only replaced when asked.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; an output is an ordinary shared file
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
