"""Training patches: cases preprocessed once to a cache, then random patches drawn from them.

``prepare_cases`` crops and normalises each case (nnU-Net style) and stores ``<case>.npz`` in
the run's cache with a sample of foreground voxel coordinates per region, so workers only
memory-load arrays. :class:`PatchDataset` draws ``length`` patches per epoch; a third (by
default) are centred on a foreground voxel of a randomly chosen region (nnU-Net's
oversampling; regions drawn uniformly or by ``region_weights``), the rest anywhere in the volume. Each patch's randomness is seeded by
(seed, epoch, index), so runs and resumes are reproducible and DDP ranks draw different patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ciml_core.data.dataset import load_case
from ciml_core.data.labels import get_convention, labels_to_regions
from ciml_core.data.layouts import CaseFiles
from ciml_core.data.preprocess import crop, preprocess_image
from ciml_core.errors import ConfigError
from ciml_core.io import atomic_write, make_dirs

MAX_FOREGROUND_SAMPLES = 10_000


@dataclass(frozen=True)
class PreparedCase:
    """A cached, preprocessed case: ``image`` (M, *box) float32, ``regions`` (R, *box) uint8."""

    case_id: str
    path: Path

    def load(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        with np.load(self.path) as data:
            image, regions = data["image"], data["regions"]
            coords = [data[f"fg{i}"] for i in range(regions.shape[0])]
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


def prepare_cases(
    cases: Sequence[CaseFiles],
    modalities: Sequence[str],
    regions: Sequence[str],
    convention: str,
    cache_dir: Path,
    *,
    pet_method: str = "log",
    progress: bool = False,
) -> list[PreparedCase]:
    """Preprocess each labelled case once into ``cache_dir/<case>.npz`` (reused when present)."""
    from tqdm.auto import tqdm

    make_dirs(cache_dir)
    prepared = []
    for case in tqdm(cases, desc="preprocess", unit="case", disable=not progress):
        path = cache_dir / f"{case.case_id}.npz"
        if not path.is_file():
            loaded = load_case(case, modalities, label_convention=convention, require_label=True)
            pre = preprocess_image(loaded.image, modalities, pet_method=pet_method)
            masks = crop(region_targets(loaded.label, convention, regions), pre.box)
            rng = np.random.default_rng(0)
            fg = {}
            for i, mask in enumerate(masks):
                coords = np.argwhere(mask)
                if len(coords) > MAX_FOREGROUND_SAMPLES:
                    coords = coords[rng.choice(len(coords), MAX_FOREGROUND_SAMPLES, replace=False)]
                fg[f"fg{i}"] = coords.astype(np.int32)
            # Atomic (ciml_core.io): a worker, or a run killed meanwhile, never sees half a
            # file; two runs preparing one cache write the same content, the last one wins.
            atomic_write(path, partial(np.savez, image=pre.image, regions=masks, **fg),
                         binary=True, overwrite=True)
        prepared.append(PreparedCase(case.case_id, path))
    return prepared


def _patch_start(rng: np.random.Generator, shape: Sequence[int], patch: Sequence[int],
                 centre: np.ndarray | None) -> np.ndarray:
    shape, patch = np.asarray(shape), np.asarray(patch)
    if centre is None:
        # Anywhere, allowing the patch to stick out by up to half its size (nnU-Net does too),
        # so that borders are seen as often as the middle.
        low = -(patch // 2)
        high = np.maximum(shape - patch + patch // 2, low)
        return np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high, strict=True)])
    return centre - patch // 2


def extract_patch(array: np.ndarray, start: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Crop ``array[..., start:start+patch]``, zero-padding what lies outside the volume."""
    spatial = array.shape[-len(patch):]
    out = np.zeros(array.shape[: -len(patch)] + tuple(patch), dtype=array.dtype)
    src, dst = [], []
    for s, p, n in zip(start, patch, spatial, strict=True):
        lo, hi = max(int(s), 0), min(int(s) + p, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    lead = (slice(None),) * (array.ndim - len(patch))
    out[lead + tuple(dst)] = array[lead + tuple(src)]
    return out


class PatchDataset(Dataset):
    """``length`` random (image, target) patches per epoch from prepared cases."""

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        patch_size: Sequence[int],
        length: int,
        *,
        foreground_fraction: float = 1 / 3,
        region_weights: Sequence[float] | None = None,
        augment=None,
        seed: int = 0,
    ) -> None:
        if not cases:
            raise ConfigError("no training case to draw patches from")
        if region_weights is not None and (any(w < 0 for w in region_weights)
                                           or sum(region_weights) <= 0):
            raise ConfigError(f"region weights {list(region_weights)}: must be >= 0, not all 0")
        self.region_weights = None if region_weights is None else [float(w) for w in region_weights]
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.length = int(length)
        self.foreground_fraction = foreground_fraction
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, tuple] = {}

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (like ``DistributedSampler.set_epoch``) to draw new patches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _case(self, i: int) -> tuple:
        if i not in self._cache:
            self._cache[i] = self.cases[i].load()
        return self._cache[i]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, regions, coords = self._case(int(rng.integers(len(self.cases))))
        centre = None
        if rng.random() < self.foreground_fraction:
            present = [i for i, c in enumerate(coords) if len(c)]
            if self.region_weights is not None:
                if len(self.region_weights) != len(coords):
                    raise ConfigError(f"{len(self.region_weights)} region weights for "
                                      f"{len(coords)} regions")
                present = [i for i in present if self.region_weights[i] > 0]
            if present:
                if self.region_weights is None:  # uniform over the regions the case has
                    pick = present[int(rng.integers(len(present)))]
                else:
                    w = np.array([self.region_weights[i] for i in present])
                    pick = present[int(rng.choice(len(present), p=w / w.sum()))]
                pool = coords[pick]
                centre = pool[int(rng.integers(len(pool)))]
        start = _patch_start(rng, image.shape[1:], self.patch_size, centre)
        x = extract_patch(image, start, self.patch_size)
        y = extract_patch(regions, start, self.patch_size)
        if self.augment is not None:
            self.augment.set_random_state(seed=int(rng.integers(2**31)))
            out = self.augment({"image": torch.from_numpy(x), "label": torch.from_numpy(y).float()})
            x, y = out["image"], out["label"]
            x = x.as_tensor() if hasattr(x, "as_tensor") else x
            y = y.as_tensor() if hasattr(y, "as_tensor") else y
            return x.float().contiguous(), (y > 0.5).float().contiguous()
        return torch.from_numpy(x).float(), torch.from_numpy(y).float()
