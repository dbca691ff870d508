"""Training augmentations following the nnU-Net v2 defaults, built from MONAI transforms.

Probabilities and ranges are nnU-Net's (rotation +-30 deg, scaling 0.7-1.4, Gaussian noise,
Gaussian blur, brightness, contrast, low-resolution simulation, gamma (also inverted), mirroring;
no elastic deformation). They act on one patch ``{"image": (M, *P), "label": (R, *P)}``; the
spatial ones move image and label together (label with nearest-neighbour interpolation).
"""

from __future__ import annotations

import math

from monai import transforms as T


def nnunet_augmentations(spatial_dims: int = 3) -> T.Compose:
    """The augmentation pipeline for one training patch (call ``set_random_state`` to seed it)."""
    keys = ("image", "label")
    angle = math.radians(30)
    rotate_ranges = {"range_x": angle} if spatial_dims == 2 else {
        "range_x": angle, "range_y": angle, "range_z": angle}
    interp = "bilinear" if spatial_dims == 2 else "trilinear"
    steps = [
        T.RandRotated(keys, prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros",
                      **rotate_ranges),
        T.RandZoomd(keys, prob=0.2, min_zoom=0.7, max_zoom=1.4, mode=(interp, "nearest"),
                    padding_mode="constant", keep_size=True),
        T.RandGaussianNoised("image", prob=0.1, std=0.1),
        T.RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                              sigma_z=(0.5, 1.0)),
        # brightness: multiply by U(0.75, 1.25)
        T.RandScaleIntensityd("image", prob=0.15, factors=0.25),
        # contrast: scale around the mean, keep the original value range
        T.RandScaleIntensityFixedMeand("image", prob=0.15, factors=0.25, preserve_range=True),
    ]
    if spatial_dims == 3:
        steps.append(T.RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0)))
    steps += [
        T.RandAdjustContrastd("image", prob=0.1, gamma=(0.7, 1.5), invert_image=True,
                              retain_stats=True),
        T.RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
    ]
    steps += [T.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    return T.Compose(steps)
