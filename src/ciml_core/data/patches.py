"""Training patches: random patches drawn from the preprocessed cases of the cache
(:mod:`ciml_core.data.cache`).

:class:`PatchDataset` draws ``length`` patches per epoch; a third (by default) are centred on
a foreground voxel of a randomly chosen region (nnU-Net's oversampling; regions drawn uniformly or
by ``region_weights``), the rest anywhere in the volume. Each patch's randomness is seeded by
(seed, epoch, index), so runs and resumes are reproducible and DDP ranks draw different patches.
The cases are memory-mapped and at most ``open_cases`` maps are kept open per process (an LRU),
so a loader worker's memory does not grow with the size of the dataset.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ciml_core.data.cache import PreparedCase
from ciml_core.errors import ConfigError


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
        open_cases: int = 4,
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
        self.open_cases = max(int(open_cases), 1)
        self._open: OrderedDict[int, tuple] = OrderedDict()

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (like ``DistributedSampler.set_epoch``) to draw new patches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _case(self, i: int) -> tuple:
        if i in self._open:
            self._open.move_to_end(i)
        else:
            # Closing a map (dropping the last reference) returns its pages: the process keeps
            # at most ``open_cases`` cases' touched pages, whatever the dataset's size.
            while len(self._open) >= self.open_cases:
                self._open.popitem(last=False)
            self._open[i] = self.cases[i].load()
        return self._open[i]

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
