"""The batched, on-device augmentations (data/batch_augment.py): each transform against its
definition, labels moving with the image, seeding, and the probabilities of the nnU-Net recipe."""

import math

import pytest
import torch
from monai import transforms as T

from ciml_core.data import batch_augment as ba
from ciml_core.data.batch_augment import BatchAugment


def _blob(shape=(20, 24, 28), centre=(6, 8, 10), radius=4.0) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape),
                                      indexing="ij"))
    dist = ((grid - torch.tensor(centre, dtype=torch.float32)[:, None, None, None]) ** 2).sum(0)
    return (dist <= radius**2).float()


def test_identity_affine_leaves_the_patch_unchanged():
    x = torch.rand(1, 2, 9, 10, 11)
    theta = ba.affine_theta(torch.zeros(1, 3), torch.ones(1), x.shape[2:])
    grid = torch.nn.functional.affine_grid(theta, [1, 2, 9, 10, 11], align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    assert torch.allclose(out, x, atol=1e-5)


def test_rotation_is_rigid_in_voxels_on_a_non_cubic_patch():
    # a 90 degree turn in the (H, W) plane of an 8 x 12 x 20 patch moves a blob at
    # (H, W) offset (0.5, 3.5) from the centre (5.5, 9.5) to offset (+-3.5, -+0.5): the same
    # distance in voxels, although H and W differ (normalised coordinates would stretch it)
    blob = _blob((8, 12, 20), centre=(4, 6, 13), radius=1.5)
    # affine_grid's axes are (W, H, D): about its third axis is in the (H, W) plane
    angles = torch.tensor([[0.0, 0.0, math.pi / 2]])
    theta = ba.affine_theta(angles, torch.ones(1), blob.shape)
    grid = torch.nn.functional.affine_grid(theta, [1, 1, *blob.shape], align_corners=False)
    out = torch.nn.functional.grid_sample(blob[None, None], grid, mode="nearest",
                                          align_corners=False)[0, 0]
    assert out.sum() == blob.sum()  # nothing cut, nothing stretched
    coords = out.nonzero().float().mean(0)
    assert coords[0].item() == pytest.approx(4.0, abs=1e-6)
    offset = (coords[1].item() - 5.5, coords[2].item() - 9.5)
    assert offset in (pytest.approx((3.5, -0.5), abs=0.01), pytest.approx((-3.5, 0.5), abs=0.01))


def test_zoom_enlarges_the_content_by_the_factor():
    blob = _blob((32, 32, 32), centre=(16, 16, 16), radius=5.0)
    theta = ba.affine_theta(torch.zeros(1, 3), torch.tensor([1.4]), blob.shape)
    grid = torch.nn.functional.affine_grid(theta, [1, 1, 32, 32, 32], align_corners=False)
    out = torch.nn.functional.grid_sample(blob[None, None], grid, mode="nearest",
                                          align_corners=False)
    assert out.sum().item() / blob.sum().item() == pytest.approx(1.4**3, rel=0.12)


def test_gaussian_blur_matches_monai():
    x = torch.rand(2, 12, 13, 14)
    ours = ba.gaussian_blur(x, [0.6, 0.8, 1.0])
    theirs = T.GaussianSmooth(sigma=(0.6, 0.8, 1.0))(x)
    assert torch.allclose(ours, torch.as_tensor(theirs), atol=1e-5)


def test_gamma_matches_monai_and_keeps_mean_and_std():
    x = torch.randn(2, 8, 8, 8)
    for invert in (False, True):
        ours = ba.adjust_gamma(x, 1.3, invert=invert)
        theirs = T.AdjustContrast(1.3, invert_image=invert, retain_stats=True)(x)
        assert torch.allclose(ours, torch.as_tensor(theirs), atol=1e-5)
        assert ours.mean().item() == pytest.approx(x.mean().item(), abs=1e-5)
        assert ours.std().item() == pytest.approx(x.std().item(), rel=1e-4)


def test_contrast_matches_monai_and_keeps_the_range():
    x = torch.randn(2, 6, 6, 6)
    ours = ba.scale_around_mean(x, 1.2)
    theirs = T.ScaleIntensityFixedMean(factor=0.2, preserve_range=True, fixed_mean=True)(x)
    assert torch.allclose(ours, torch.as_tensor(theirs), atol=1e-5)
    assert ours.min() >= x.min() and ours.max() <= x.max()


def test_low_resolution_matches_monai():
    x = torch.rand(2, 10, 12, 14)
    ours = ba.simulate_low_resolution(x, 0.5)
    theirs = T.RandSimulateLowResolution(prob=1.0, zoom_range=(0.5, 0.5))(x)
    assert torch.allclose(ours, torch.as_tensor(theirs), atol=1e-5)


def test_labels_move_with_the_image_and_stay_binary():
    # image channel = the label: after any augmentation draw the label is 0/1 and agrees with
    # the (bilinear) image wherever the image is clearly in or out
    blob = _blob((24, 24, 24), centre=(12, 10, 14), radius=6.0)
    image = blob[None, None].repeat(8, 1, 1, 1, 1)
    label = blob[None, None].repeat(8, 1, 1, 1, 1)
    augment = BatchAugment(3)
    moved = 0
    for seed in range(6):
        img, lab = augment.spatial(image, label, torch.Generator().manual_seed(seed))
        img, lab = augment.flip(img, lab, torch.Generator().manual_seed(seed))
        assert set(lab.unique().tolist()) <= {0.0, 1.0}
        clear_in, clear_out = img > 0.9, img < 0.1
        assert (lab[clear_in] == 1).all() and (lab[clear_out] == 0).all()
        moved += int((lab != label).flatten(1).any(1).sum())
    assert moved > 0


def test_same_seed_same_batch_and_inputs_untouched():
    image, label = torch.randn(4, 4, 16, 16, 16), (torch.rand(4, 3, 16, 16, 16) > 0.7).float()
    keep = image.clone(), label.clone()
    augment = BatchAugment(3)
    a = augment(image, label, seed=(0, 3, 7, 0))
    b = augment(image, label, seed=(0, 3, 7, 0))
    c = augment(image, label, seed=(0, 3, 8, 0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(image, keep[0]) and torch.equal(label, keep[1])
    assert a[0].shape == image.shape and a[1].shape == label.shape


def test_each_transform_fires_at_its_nnunet_probability():
    # the probabilities are those of the MONAI pipeline the loader workers run (data/augment.py)
    from ciml_core.data.augment import nnunet_augmentations

    monai = {type(t).__name__: t.prob for t in nnunet_augmentations(3).transforms}
    assert ba.ROTATE[0] == monai["RandRotated"] and ba.ZOOM[0] == monai["RandZoomd"]
    assert ba.NOISE[0] == monai["RandGaussianNoised"]
    assert ba.BLUR[0] == monai["RandGaussianSmoothd"]
    assert ba.BRIGHTNESS[0] == monai["RandScaleIntensityd"]
    assert ba.CONTRAST[0] == monai["RandScaleIntensityFixedMeand"]
    assert ba.LOW_RESOLUTION[0] == monai["RandSimulateLowResolutiond"]
    gammas = sorted(t.prob for t in nnunet_augmentations(3).transforms
                    if type(t).__name__ == "RandAdjustContrastd")
    assert [ba.GAMMA_INVERTED[0], ba.GAMMA[0]] == gammas
    assert ba.FLIP == monai["RandFlipd"]
    # and end to end: the fraction of flipped-or-moved samples is 1 - 0.5^3 (mirroring) or more
    x = torch.zeros(64, 1, 8, 8, 8)
    x[:, :, :2, :3, :4] = 1  # an asymmetric corner block: every flip moves it
    _, lab = BatchAugment(3)(x, x.clone(), seed=1)
    changed = (lab != x).flatten(1).any(1).float().mean().item()
    assert changed >= 1 - 0.5**3 - 0.1


def test_2d_batches():
    image, label = torch.randn(3, 2, 20, 20), (torch.rand(3, 1, 20, 20) > 0.5).float()
    out_image, out_label = BatchAugment(2)(image, label, seed=4)
    assert out_image.shape == image.shape and out_label.shape == label.shape
    assert set(out_label.unique().tolist()) <= {0.0, 1.0}
