"""The nnU-Net augmentations of :mod:`ciml_core.data.augment`, run on a whole batch on its
device (GPU) with torch ops, for when the CPU loader workers cannot keep up with the GPU.

Same transforms, probabilities and ranges as :func:`~ciml_core.data.augment.nnunet_augmentations`
(MONAI's semantics: rotation +-30 deg per axis and scaling 0.7-1.4 as one affine resampling,
Gaussian noise with std drawn in [0, 0.1], Gaussian blur sigma 0.5-1, brightness x U(0.75, 1.25),
contrast around the mean with the value range kept, low-resolution simulation (nearest down,
trilinear up), gamma 0.7-1.5 with mean and std kept (also on the inverted image), mirroring).
Each sample draws its own parameters; samples a transform skips are left untouched. The random
numbers come from one ``torch.Generator`` seeded by the caller, so a step's augmentation is the
same on every run and after a resume. The label volume (regions, 0/1) moves with the image by
nearest-neighbour resampling.

``ciml-core train --augment-on-device`` uses it; docs/performance.md has the throughput.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# (probability, range) of each transform, nnU-Net's defaults as in data/augment.py
ROTATE = (0.2, math.radians(30))
ZOOM = (0.2, (0.7, 1.4))
NOISE = (0.1, 0.1)
BLUR = (0.2, (0.5, 1.0))
BRIGHTNESS = (0.15, 0.25)
CONTRAST = (0.15, 0.25)
LOW_RESOLUTION = (0.25, (0.5, 1.0))
GAMMA_INVERTED = (0.1, (0.7, 1.5))
GAMMA = (0.3, (0.7, 1.5))
FLIP = 0.5


class BatchAugment:
    """Augment ``(image [B, M, *P], label [B, R, *P])`` on their device; see the module docstring.

    ``augment(image, label, seed)`` returns new tensors (the inputs are not modified).
    """

    def __init__(self, spatial_dims: int = 3) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims

    def __call__(self, image: Tensor, label: Tensor, seed: int | Sequence[int]) -> tuple[
            Tensor, Tensor]:
        if image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[2:]:
            raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)}: "
                             "expected the same batch size and spatial shape")
        gen = torch.Generator().manual_seed(_seed_int(seed))  # parameters: drawn on the CPU
        noise_gen = torch.Generator(device=image.device).manual_seed(
            int(torch.randint(2**62, (1,), generator=gen)))
        image, label = image.float(), label.float()
        image, label = self.spatial(image, label, gen)
        image = self.intensity(image, gen, noise_gen)
        image, label = self.flip(image, label, gen)
        return image.contiguous(), label.contiguous()

    # -- spatial --------------------------------------------------------------------------------

    def spatial(self, image: Tensor, label: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Rotation and scaling as one affine resampling of the samples that draw either."""
        b, d = image.shape[0], self.spatial_dims
        rotate = _draw(b, ROTATE[0], gen)
        zoom = _draw(b, ZOOM[0], gen)
        n_angles = 1 if d == 2 else 3
        angles = (torch.rand(b, n_angles, generator=gen) * 2 - 1) * ROTATE[1] * rotate[:, None]
        lo, hi = ZOOM[1]
        factors = torch.where(zoom, lo + torch.rand(b, generator=gen) * (hi - lo), torch.ones(b))
        moved = rotate | zoom
        if not moved.any():
            return image, label
        idx = moved.nonzero().flatten().to(image.device)
        theta = affine_theta(angles[moved], factors[moved], image.shape[2:]).to(image.device)
        grid = F.affine_grid(theta, [len(idx), 1, *image.shape[2:]], align_corners=False)
        image, label = image.clone(), label.clone()
        image[idx] = F.grid_sample(image[idx], grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=False)
        label[idx] = F.grid_sample(label[idx], grid, mode="nearest", padding_mode="zeros",
                                   align_corners=False)
        return image, label

    def flip(self, image: Tensor, label: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        b = image.shape[0]
        flips = torch.rand(b, self.spatial_dims, generator=gen) < FLIP
        image, label = image.clone(), label.clone()
        for i in range(b):
            dims = [1 + a for a in range(self.spatial_dims) if flips[i, a]]  # of one sample
            if dims:
                image[i] = image[i].flip(dims)
                label[i] = label[i].flip(dims)
        return image, label

    # -- intensity ------------------------------------------------------------------------------

    def intensity(self, image: Tensor, gen: torch.Generator, noise_gen: torch.Generator) -> Tensor:
        b = image.shape[0]
        image = image.clone()
        for i in _draw(b, NOISE[0], gen).nonzero().flatten().tolist():
            std = float(torch.rand(1, generator=gen)) * NOISE[1]
            image[i] += torch.randn(image[i].shape, generator=noise_gen,
                                    device=image.device) * std
        for i in _draw(b, BLUR[0], gen).nonzero().flatten().tolist():
            lo, hi = BLUR[1]
            sigmas = (lo + torch.rand(self.spatial_dims, generator=gen) * (hi - lo)).tolist()
            image[i] = gaussian_blur(image[i], sigmas)
        for i in _draw(b, BRIGHTNESS[0], gen).nonzero().flatten().tolist():
            image[i] *= 1 + (float(torch.rand(1, generator=gen)) * 2 - 1) * BRIGHTNESS[1]
        for i in _draw(b, CONTRAST[0], gen).nonzero().flatten().tolist():
            factor = 1 + (float(torch.rand(1, generator=gen)) * 2 - 1) * CONTRAST[1]
            image[i] = scale_around_mean(image[i], factor)
        if self.spatial_dims == 3:
            for i in _draw(b, LOW_RESOLUTION[0], gen).nonzero().flatten().tolist():
                lo, hi = LOW_RESOLUTION[1]
                image[i] = simulate_low_resolution(image[i], lo + float(
                    torch.rand(1, generator=gen)) * (hi - lo))
        for (p, (lo, hi)), invert in ((GAMMA_INVERTED, True), (GAMMA, False)):
            for i in _draw(b, p, gen).nonzero().flatten().tolist():
                gamma = lo + float(torch.rand(1, generator=gen)) * (hi - lo)
                image[i] = adjust_gamma(image[i], gamma, invert=invert)
        return image


def _seed_int(seed: int | Sequence[int]) -> int:
    """One 64-bit seed from the parts, mixed as PatchDataset's (seed, epoch, index) are."""
    parts = [seed] if isinstance(seed, int) else [int(s) for s in seed]
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0])


def _draw(n: int, probability: float, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen) < probability


def affine_theta(angles: Tensor, factors: Tensor, shape: Sequence[int]) -> Tensor:
    """``affine_grid`` matrices [N, d, d+1] that rotate by ``angles`` (radians; [N, 1] in 2-D,
    [N, 3] about the three axes in 3-D) and scale the content by ``factors`` [N] (> 1 enlarges)
    about the patch centre, isotropic in voxels whatever the patch's shape."""
    d = len(shape)
    n = angles.shape[0]
    if d == 2:
        c, s = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    else:
        rot = torch.eye(3).repeat(n, 1, 1)
        for axis in range(3):
            c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
            a, b = [k for k in range(3) if k != axis]
            r = torch.eye(3).repeat(n, 1, 1)
            r[:, a, a], r[:, a, b], r[:, b, a], r[:, b, b] = c, -s, s, c
            rot = r @ rot
    # affine_grid's coordinates run over the last dimension first and are normalised to
    # [-1, 1] per axis: go to voxels and back so that non-cubic patches rotate rigidly.
    half = torch.tensor([float(n_) / 2 for n_ in reversed(list(shape))])
    to_voxels, to_normalised = torch.diag(half), torch.diag(1 / half)
    # output -> input coordinates: the inverse of "rotate then scale the content"
    inverse = rot.transpose(1, 2) / factors[:, None, None]
    matrix = to_normalised @ inverse @ to_voxels
    return torch.cat([matrix, torch.zeros(n, d, 1)], dim=2)


def gaussian_blur(image: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Separable Gaussian smoothing of ``image [M, *S]`` (sigma per spatial axis, in voxels;
    the erf kernel truncated at 4 sigma, zero padding: MONAI's ``GaussianSmooth``)."""
    out = image[None]
    d = len(sigmas)
    conv = F.conv3d if d == 3 else F.conv2d
    channels = image.shape[0]
    for axis, sigma in enumerate(sigmas):
        radius = int(max(4 * sigma, 0.5) + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
        t = 0.70710678 / sigma  # MONAI's default "erf" kernel, not renormalised
        kernel = (0.5 * (torch.erf(t * (x + 0.5)) - torch.erf(t * (x - 0.5)))).clamp(min=0)
        shape = [1] * d
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).repeat(channels, 1, *([1] * d))
        padding = [0] * d
        padding[axis] = radius
        out = conv(out, weight, padding=tuple(padding), groups=channels)
    return out[0]


def scale_around_mean(image: Tensor, factor: float) -> Tensor:
    """Contrast: ``(x - mean) * factor + mean`` over the whole sample, clipped to its original
    value range (MONAI's ``ScaleIntensityFixedMean(preserve_range=True)``, not channel-wise)."""
    mean, lo, hi = image.mean(), image.min(), image.max()
    return ((image - mean) * factor + mean).clamp(lo, hi)


def simulate_low_resolution(image: Tensor, zoom: float) -> Tensor:
    """Down-sample ``image [M, *S]`` by ``zoom`` (nearest) and back up (trilinear)."""
    size = image.shape[1:]
    small = [max(int(round(s * zoom)), 1) for s in size]
    low = F.interpolate(image[None], size=small, mode="nearest")
    return F.interpolate(low, size=list(size), mode="trilinear", align_corners=False)[0]


def adjust_gamma(image: Tensor, gamma: float, invert: bool = False) -> Tensor:
    """``x -> x^gamma`` on the image rescaled to [0, 1] (on ``-x`` when ``invert``), then the
    original mean and standard deviation restored (MONAI's ``AdjustContrast(retain_stats=True)``
    over the whole sample)."""
    x = -image if invert else image
    mean, std = x.mean(), x.std()
    lo = x.min()
    span = x.max() - lo
    eps = 1e-7
    y = ((x - lo) / (span + eps)).pow(gamma) * span + lo
    y = (y - y.mean()) / (y.std() + 1e-8) * std + mean
    return -y if invert else y
