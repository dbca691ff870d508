"""The preprocessed-case cache that training reads: one folder of memory-mappable arrays per case.

``prepare_cases`` crops, normalises (and, with a target spacing, resamples) each labelled case
once, in parallel processes, into ``<cache>/<key>/<case>/``::

    image.npy        (M, *box) float32   memory-mapped by the loader (np.load(mmap_mode="r"))
    regions.npy      (R, *box) uint8     the model's region masks
    foreground.npz   fg0..fg{R-1}        up to MAX_FOREGROUND_SAMPLES voxel coordinates per region
    meta.json        shape, seconds, which process built it

``<key>`` is a hash of :class:`PreprocessSettings` (modalities, regions, label convention, PET
normalisation, target spacing, cache format), so changing any of them builds a new cache beside
the old one instead of reading stale arrays. A case folder appears atomically (built in a
temporary folder, then renamed), so an interrupted run leaves only whole cases behind and the next
run continues with the missing ones. ``complete.json`` lists the cases of the last finished
preparation: under torchrun rank 0 builds the cache and the other ranks poll for it
(:func:`wait_for_cases`) instead of waiting in a collective barrier whose timeout (30 min for
NCCL) a large dataset can exceed.

Why memory maps: a loader worker that kept every case it touched held the whole preprocessed
dataset after one epoch (~50 MB per BraTS case, ~60 GB per worker for BraTS 2021). A memory map
costs only the pages a patch touches, and they are released when the map is closed, so
:class:`~ciml_core.data.patches.PatchDataset` keeps a small LRU of open maps and its memory does
not grow with the number of cases (docs/performance.md, "Dataset scale").
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ciml_core.data.dataset import load_case
from ciml_core.data.labels import get_convention, labels_to_regions
from ciml_core.data.layouts import CaseFiles
from ciml_core.data.preprocess import crop, plan_spacing, preprocess_image, resample_labels
from ciml_core.errors import ConfigError, InputDataError
from ciml_core.io import atomic_write_text, dir_output, make_dirs

#: Bumped when the files of a cached case change meaning; part of the cache key.
CACHE_FORMAT = 2
MAX_FOREGROUND_SAMPLES = 10_000
COMPLETE = "complete.json"


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that decides the content of a cached case (and so the cache's key)."""

    modalities: tuple[str, ...]
    regions: tuple[str, ...]
    convention: str
    pet_method: str = "log"
    spacing: tuple[float, ...] | None = None  # target spacing (mm); None: each case's own

    def key(self) -> str:
        doc = {**asdict(self), "format": CACHE_FORMAT}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def folder(self, cache_dir: str | os.PathLike) -> Path:
        return Path(cache_dir) / self.key()


@dataclass(frozen=True)
class PreparedCase:
    """A cached, preprocessed case: ``path`` is its folder."""

    case_id: str
    path: Path

    def load(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """``(image (M, *box) float32, regions (R, *box) uint8, foreground coordinates per
        region)``; the two volumes memory-mapped read-only unless ``mmap`` is False."""
        mode = "r" if mmap else None
        image = np.load(self.path / "image.npy", mmap_mode=mode)
        regions = np.load(self.path / "regions.npy", mmap_mode=mode)
        with np.load(self.path / "foreground.npz") as fg:
            coords = [fg[f"fg{i}"] for i in range(regions.shape[0])]
        return image, regions, coords


def region_targets(label: np.ndarray, convention: str, regions: Sequence[str]) -> np.ndarray:
    """Label volume -> ``(R, ...)`` uint8 masks in the *model's* region order."""
    conv = get_convention(convention)
    missing = [r for r in regions if r not in conv.region_names]
    if missing:
        raise ConfigError(f"regions {missing} are not defined by label convention {conv.name!r} "
                          f"(it defines {list(conv.region_names)})")
    masks = labels_to_regions(label, conv)
    return masks[[conv.region_names.index(r) for r in regions]].astype(np.uint8)


def case_spacing(case: CaseFiles) -> tuple[float, ...]:
    """A case's voxel size (mm, canonical RAS+ axes) from its first image's header; no voxel data
    is read, so the spacings of a whole dataset cost seconds (for :func:`target_spacing`)."""
    import nibabel as nib

    from ciml_core.data.nifti import NiftiSource

    path = next(iter(case.images.values()))
    try:
        img = nib.load(str(path))
        return NiftiSource.from_affine(img.shape, img.affine, path).spacing
    except Exception as err:  # noqa: BLE001 - any unreadable header, named with its file
        raise InputDataError(f"{path}: cannot read the NIfTI header ({err})") from err


def _build_case(case: CaseFiles, settings: PreprocessSettings, folder: Path) -> float:
    """Preprocess one case into ``folder/<case>`` (atomically); returns the seconds it took.
    Module-level so that worker processes can run it."""
    t0 = time.perf_counter()
    loaded = load_case(case, settings.modalities, label_convention=settings.convention,
                       require_label=True)
    masks = region_targets(loaded.label, settings.convention, settings.regions)
    # The order predict_case uses: crop, normalise (the brain mask from the native voxels), then
    # resample to the target spacing (images cubic, region masks one-hot linear).
    pre = preprocess_image(loaded.image, settings.modalities, pet_method=settings.pet_method)
    masks = crop(masks, pre.box)
    plan = plan_spacing(pre.box.shape, loaded.spacing, settings.spacing)
    image = plan.to_model(pre.image)
    if plan.resampled:
        masks = resample_labels(masks, plan.spacing, plan.target, shape=plan.model_shape)
    masks = np.ascontiguousarray(masks)
    rng = np.random.default_rng(0)
    fg = {}
    for i, mask in enumerate(masks):
        coords = np.argwhere(mask)
        if len(coords) > MAX_FOREGROUND_SAMPLES:
            coords = coords[rng.choice(len(coords), MAX_FOREGROUND_SAMPLES, replace=False)]
        fg[f"fg{i}"] = coords.astype(np.int32)
    with dir_output(folder / case.case_id, overwrite=True) as tmp:
        np.save(tmp / "image.npy", np.ascontiguousarray(image, dtype=np.float32))
        np.save(tmp / "regions.npy", masks)
        np.savez(tmp / "foreground.npz", **fg)
        seconds = time.perf_counter() - t0
        (tmp / "meta.json").write_text(json.dumps(
            {"case_id": case.case_id, "shape": list(image.shape), "seconds": round(seconds, 3),
             "spacing": list(map(float, plan.target)),
             "pid": os.getpid(), "rank": int(os.environ.get("RANK", "0"))}) + "\n")
    return seconds


def _is_built(folder: Path, case_id: str) -> bool:
    return (folder / case_id / "meta.json").is_file()


@dataclass
class CacheReport:
    """What :func:`prepare_cases` did: cases built now, found built, and seconds per built case."""

    built: int
    reused: int
    seconds: list[float]
    folder: Path


def prepare_cases(
    cases: Sequence[CaseFiles],
    settings: PreprocessSettings,
    cache_dir: str | os.PathLike,
    *,
    workers: int = 1,
    progress: bool = False,
) -> tuple[list[PreparedCase], CacheReport]:
    """Preprocess every case not yet in the cache, ``workers`` processes at a time, and mark the
    cache complete. Returns the cases in the given order and a :class:`CacheReport`.

    Raises:
        InputDataError, GeometryError, LabelError: a case cannot be read (named in the message);
            the cases built before it stay in the cache.
    """
    from tqdm.auto import tqdm

    folder = make_dirs(settings.folder(cache_dir))
    if not (folder / "settings.json").is_file():
        atomic_write_text(folder / "settings.json",
                          json.dumps({**asdict(settings), "format": CACHE_FORMAT}, indent=2) + "\n",
                          overwrite=True)
    todo = [c for c in cases if not _is_built(folder, c.case_id)]
    seconds: list[float] = []
    bar = tqdm(total=len(todo), desc="preprocess", unit="case", disable=not progress or not todo)
    if workers <= 1 or len(todo) <= 1:
        for case in todo:
            seconds.append(_build_case(case, settings, folder))
            bar.update()
    else:
        import multiprocessing

        # fork where there is one (as torch's DataLoader does): spawn and forkserver re-run the
        # caller's __main__ in every worker, which breaks scripts without a __main__ guard.
        # The workers run numpy/scipy/nibabel only, no torch (no OpenMP pool to inherit).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=workers,
                                 mp_context=multiprocessing.get_context(method)) as pool:
            futures = {pool.submit(_build_case, c, settings, folder): c for c in todo}
            for future in as_completed(futures):
                try:
                    seconds.append(future.result())
                except BaseException:
                    for other in futures:
                        other.cancel()
                    raise
                bar.update()
    bar.close()
    ids = [c.case_id for c in cases]
    atomic_write_text(folder / COMPLETE, json.dumps({"cases": sorted(ids)}) + "\n", overwrite=True)
    return ([PreparedCase(i, folder / i) for i in ids],
            CacheReport(len(todo), len(cases) - len(todo), seconds, folder))


def wait_for_cases(
    case_ids: Sequence[str],
    settings: PreprocessSettings,
    cache_dir: str | os.PathLike,
    *,
    timeout: float = 24 * 3600.0,
    poll: float = 2.0,
) -> list[PreparedCase]:
    """For the ranks that do not preprocess: wait until ``complete.json`` of this settings' cache
    lists every one of ``case_ids`` (rank 0 writes it after the last case), then return them.

    Raises:
        InputDataError: ``timeout`` seconds passed first.
    """
    folder = settings.folder(cache_dir)
    wanted = set(case_ids)
    deadline = time.monotonic() + timeout
    while True:
        try:
            listed = set(json.loads((folder / COMPLETE).read_text(encoding="utf-8"))["cases"])
        except (OSError, ValueError, KeyError, TypeError):
            listed = set()
        if wanted <= listed:
            return [PreparedCase(i, folder / i) for i in case_ids]
        if time.monotonic() > deadline:
            raise InputDataError(f"{folder}: the preprocessed cache is still incomplete after "
                                 f"{timeout:.0f} s ({len(wanted - listed)} case(s) missing); "
                                 "did rank 0 fail?")
        time.sleep(poll)
