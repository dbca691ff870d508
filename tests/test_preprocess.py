"""Cropping, per-modality normalisation and resampling."""

import numpy as np
import pytest

from ciml_core.data.preprocess import (
    crop,
    nonzero_bbox,
    normalize_ct,
    normalize_pet,
    preprocess_image,
    resample_to_grid,
    resample_to_spacing,
    uncrop,
)
from ciml_core.errors import InputDataError


def test_bbox_is_union_over_modalities_and_uncrop_restores():
    image = np.zeros((2, 10, 12, 8), np.float32)
    image[0, 2:5, 3:4, 1:2] = 1
    image[1, 4:7, 6:9, 5:7] = 2
    box = nonzero_bbox(image)
    assert box.slices == (slice(2, 7), slice(3, 9), slice(1, 7))
    assert box.shape == (5, 6, 6) and box.full_shape == (10, 12, 8)
    assert np.array_equal(uncrop(crop(image, box), box), image)
    assert uncrop(crop(image[0], box), box, fill=-1)[0, 0, 0] == -1


def test_empty_image_has_no_bbox():
    with pytest.raises(InputDataError, match="every voxel of every modality is zero"):
        nonzero_bbox(np.zeros((2, 4, 4, 4)))


def test_mri_zscore_inside_mask_zero_outside():
    image = np.zeros((2, 6, 6, 6), np.float32)
    image[:, 1:5, 1:5, 1:5] = np.random.default_rng(0).normal(100, 15, size=(2, 4, 4, 4))
    image[1, 1, 1, 1] = 0  # a zero voxel inside the union mask stays inside the mask
    out = preprocess_image(image, ["flair", "t2"])
    assert out.image.shape == (2, 4, 4, 4)
    for ch in out.image:
        assert abs(ch.mean()) < 1e-5 and abs(ch.std() - 1) < 1e-4
    bordered = image.copy()
    bordered[0, 0, 0, 0] = 5.0  # extends the box by one voxel; zero elsewhere on that border
    out = preprocess_image(bordered, ["flair", "t2"])
    assert out.image.shape == (2, 5, 5, 5)
    inside = np.any(crop(bordered, out.box) != 0, axis=0)
    # The mask is the union over modalities: a zero of channel 1 where channel 0 is nonzero is
    # brain, so it is z-scored with channel 1's statistics instead of being left at 0.
    t2 = crop(bordered, out.box)[1][inside]
    assert out.image[1, 0, 0, 0] == pytest.approx((0 - t2.mean()) / t2.std(), rel=1e-5)
    assert np.all(out.image[:, ~inside] == 0)


def test_ct_clip_and_zscore():
    rng = np.random.default_rng(0)
    ct = np.full((20, 20, 20), -1000.0)
    ct[5:15, 5:15, 5:15] = rng.normal(40, 10, size=(10, 10, 10))
    ct[10, 10, 10] = 3000  # a metal artefact must not set the scale
    out = normalize_ct(ct)
    body = ct > -500
    assert abs(out[body].mean()) < 1e-4 and abs(out[body].std() - 1) < 1e-3
    lo, hi = np.percentile(ct[body], [0.5, 99.5])
    assert out[10, 10, 10] == pytest.approx(out[body].max())
    expected = (hi - np.clip(ct, lo, hi)[body].mean()) / np.clip(ct, lo, hi)[body].std()
    assert out[10, 10, 10] == pytest.approx(expected, rel=1e-4)


def test_pet_log_and_zscore():
    suv = np.abs(np.random.default_rng(0).normal(1, 0.5, size=(8, 8, 8)))
    out = normalize_pet(suv, "log")
    ref = np.log1p(suv)
    assert np.allclose(out, (ref - ref.mean()) / ref.std(), atol=1e-5)
    z = normalize_pet(suv, "zscore")
    assert np.allclose(z, (suv - suv.mean()) / suv.std(), atol=1e-5)


def test_resample_identity_and_shift():
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    assert np.allclose(resample_to_grid(data, affine, affine, data.shape), data, atol=1e-6)
    shifted = affine.copy()
    shifted[0, 3] = 2.0  # destination voxel i is source voxel i + 1
    out = resample_to_grid(data, affine, shifted, (5, 7, 8), order=0)
    assert np.array_equal(out, data[1:])


def test_resample_to_spacing_halves_grid():
    data = np.ones((8, 8, 8), np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    out, new_affine = resample_to_spacing(data, affine, (2.0, 2.0, 2.0))
    assert out.shape == (4, 4, 4)
    assert np.allclose(np.diag(new_affine)[:3], 2.0)
    # field-of-view centre kept: voxel centre (3.5,3.5,3.5) of the old grid = (1.5,1.5,1.5) new
    assert np.allclose(new_affine @ [1.5, 1.5, 1.5, 1], affine @ [3.5, 3.5, 3.5, 1])
    assert np.allclose(out[1:3, 1:3, 1:3], 1.0)
