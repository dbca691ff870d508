"""Dice and HD95 (ciml_core.metrics): hand-computed values, BraTS empty-mask rules, and
cross-checks against MONAI's metric functions and an independent scipy implementation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage

from ciml_core.errors import ConfigError, GeometryError
from ciml_core.metrics import HD95_EMPTY, dice, hd95, mask_metrics, region_metrics

SPACING = (2.0, 1.0, 3.0)  # anisotropic, mm


def _cube(shape, lo, size) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + size) for a in lo)] = True
    return m


# -- independent reference implementation --------------------------------------------------------


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels removed by one erosion with the face-connected element (outside = background)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _directed_surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    return ndimage.distance_transform_edt(~_surface(b), sampling=spacing)[_surface(a)]


def scipy_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """max of the two directed 95th percentiles (linear interpolation), like MONAI."""
    return max(
        float(np.percentile(_directed_surface_distances(a, b, spacing), 95)),
        float(np.percentile(_directed_surface_distances(b, a, spacing), 95)),
    )


def scipy_hd95_pooled(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """The other definition in use: the 95th percentile of both directions pooled together."""
    both = np.concatenate([_directed_surface_distances(a, b, spacing),
                           _directed_surface_distances(b, a, spacing)])
    return float(np.percentile(both, 95))


def _random_blob(rng: np.random.Generator, shape, threshold: float) -> np.ndarray:
    """An irregular mask: smoothed noise above a threshold."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    return field > threshold * field.std()


# -- Dice ------------------------------------------------------------------------------------------


def test_dice_hand_computed():
    a = _cube((6, 6, 6), (1, 1, 1), 2)  # 8 voxels
    b = np.zeros_like(a)
    b[1:3, 1:3, 1] = True  # 4 voxels, all inside a
    assert dice(a, b) == pytest.approx(2 * 4 / (8 + 4))
    c = _cube((6, 6, 6), (2, 1, 1), 2)  # overlaps a on one 2x2 face layer: 4 voxels
    assert dice(a, c) == pytest.approx(2 * 4 / 16)
    assert dice(a, a) == 1.0
    assert dice(a, _cube((6, 6, 6), (4, 4, 4), 2)) == 0.0


def test_dice_accepts_label_values_as_masks():
    a = np.zeros((4, 4, 4), np.uint8)
    a[0, 0, :2] = 4  # nonzero = inside, whatever the value
    assert dice(a, a.astype(bool)) == 1.0


# -- HD95: hand-computed -------------------------------------------------------------------------


@pytest.mark.parametrize("axis, expected", [(0, 3 * 2.0), (1, 3 * 1.0), (2, 3 * 3.0)])
def test_hd95_two_cubes_offset_anisotropic(axis, expected):
    # 2x2x2 cubes (every voxel is surface) offset by 3 voxels along one axis: half of each cube's
    # voxels are 2 voxels from the other cube, half 3 voxels; the 95th percentile is 3 voxels.
    lo_b = [2, 2, 2]
    lo_b[axis] += 3
    a = _cube((10, 10, 10), (2, 2, 2), 2)
    b = _cube((10, 10, 10), lo_b, 2)
    assert hd95(a, b, SPACING) == pytest.approx(expected, rel=1e-6)
    assert hd95(b, a, SPACING) == pytest.approx(expected, rel=1e-6)


def test_hd95_single_voxels_is_their_distance_in_mm():
    a = np.zeros((8, 8, 8), bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = True
    b[3, 2, 4] = True  # offset (2, 1, 3) voxels = (4, 1, 9) mm
    assert hd95(a, b, SPACING) == pytest.approx(math.sqrt(4**2 + 1**2 + 9**2), rel=1e-6)
    assert dice(a, b) == 0.0


def test_hd95_identical_masks_is_zero():
    m = _random_blob(np.random.default_rng(3), (16, 16, 12), 0.3)
    assert hd95(m, m, SPACING) == 0.0
    assert mask_metrics(m, m, SPACING) == {"dice": 1.0, "hd95": 0.0}


def test_hd95_is_max_of_directed_percentiles_with_linear_interpolation():
    # ref: a 2x2x2 cube; pred: the same cube plus one stray voxel 8 voxels (24 mm) above it.
    # pred -> ref distances: eight 0s and one 24 -> q95 at rank 0.95 * 8 = 7.6 -> 0.6 * 24 = 14.4;
    # ref -> pred: all 0. HD95 = max = 14.4 mm. Pooling both sets (17 values, rank 15.2) would
    # give 0.2 * 24 = 4.8 mm instead: MONAI, and therefore we, use the max of the two.
    ref = _cube((6, 6, 14), (2, 2, 2), 2)
    pred = ref.copy()
    pred[2, 2, 11] = True
    assert hd95(pred, ref, SPACING) == pytest.approx(14.4, rel=1e-6)
    assert scipy_hd95(pred, ref, SPACING) == pytest.approx(14.4)
    assert scipy_hd95_pooled(pred, ref, SPACING) == pytest.approx(4.8)


def test_hd95_scalar_and_default_spacing():
    a = _cube((10, 10, 10), (2, 2, 2), 2)
    b = _cube((10, 10, 10), (5, 2, 2), 2)
    assert hd95(a, b) == pytest.approx(3.0, rel=1e-6)  # None = 1 mm
    assert hd95(a, b, 0.5) == pytest.approx(1.5, rel=1e-6)  # isotropic


def test_hd95_2d():
    a = np.zeros((8, 8), bool)
    b = np.zeros_like(a)
    a[1, 1] = True
    b[4, 5] = True
    assert hd95(a, b, (1.0, 0.75)) == pytest.approx(math.hypot(3, 3), rel=1e-6)


# -- BraTS empty-mask rules ----------------------------------------------------------------------


def test_both_empty_gives_dice_1_hd95_0_without_warnings():
    e = np.zeros((6, 6, 6), bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI warns on empty masks; we must not reach it
        assert mask_metrics(e, e, SPACING) == {"dice": 1.0, "hd95": 0.0}


@pytest.mark.parametrize("pred_empty", [True, False])
def test_exactly_one_empty_gives_dice_0_hd95_373(pred_empty):
    e = np.zeros((6, 6, 6), bool)
    m = _cube((6, 6, 6), (1, 1, 1), 3)
    pred, ref = (e, m) if pred_empty else (m, e)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mask_metrics(pred, ref, SPACING) == {"dice": 0.0, "hd95": HD95_EMPTY}
    assert HD95_EMPTY == 373.13


# -- cross-checks on random masks ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_monai_and_scipy_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (20, 18, 14)
    spacing = tuple(rng.uniform(0.5, 3.0, size=3))
    pred = _random_blob(rng, shape, 0.4)
    ref = _random_blob(rng, shape, 0.2)
    if seed % 2:  # masks away from the array border: exercises hd95's crop to the union
        pad = ((3, 9), (0, 6), (5, 1))
        pred, ref = np.pad(pred, pad), np.pad(ref, pad)
    assert pred.any() and ref.any()

    t_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    t_ref = torch.from_numpy(ref[None, None].astype(np.float32))
    monai_dice = float(compute_dice(t_pred, t_ref, include_background=True)[0, 0])
    monai_hd = float(compute_hausdorff_distance(
        t_pred, t_ref, include_background=True, percentile=95, spacing=list(spacing))[0, 0])

    d, h = dice(pred, ref), hd95(pred, ref, spacing)
    assert d == pytest.approx(monai_dice, abs=1e-6)
    assert h == pytest.approx(monai_hd, abs=1e-6)
    # MONAI computes distances in float32: agreement with float64 scipy to 1e-6 relative.
    assert h == pytest.approx(scipy_hd95(pred, ref, spacing), rel=1e-6)
    inter = np.count_nonzero(pred & ref)
    assert d == pytest.approx(2 * inter / (pred.sum() + ref.sum()), abs=1e-12)
    assert 0.0 < d < 1.0 and h > 0.0


# -- label conventions ----------------------------------------------------------------------------


def _brats2020_reference() -> np.ndarray:
    ref = np.zeros((12, 12, 10), np.uint8)
    ref[2:10, 2:10, 2:8] = 2  # oedema
    ref[4:8, 4:8, 3:7] = 1  # necrosis
    ref[5:7, 5:7, 4:6] = 4  # enhancing
    return ref


def test_region_metrics_brats2020_hand_computed():
    ref = _brats2020_reference()
    pred = np.where(ref == 4, 1, ref).astype(np.uint8)  # ET missed, but still inside TC
    result = region_metrics(pred, ref, "brats2020", SPACING)
    assert list(result) == ["WT", "TC", "ET"]
    assert result["WT"] == {"dice": 1.0, "hd95": 0.0}
    assert result["TC"] == {"dice": 1.0, "hd95": 0.0}
    assert result["ET"] == {"dice": 0.0, "hd95": HD95_EMPTY}

    # Shrink TC by removing one x-layer of necrosis (now oedema): |TC_ref| = 64, |TC_pred| = 48.
    pred2 = ref.copy()
    pred2[4, 4:8, 3:7] = 2
    r2 = region_metrics(pred2, ref, "brats2020", SPACING)
    assert r2["TC"]["dice"] == pytest.approx(2 * 48 / (64 + 48))
    assert r2["TC"]["hd95"] == pytest.approx(
        scipy_hd95(np.isin(pred2, (1, 4)), np.isin(ref, (1, 4)), SPACING), rel=1e-6)
    assert r2["WT"] == {"dice": 1.0, "hd95": 0.0}
    assert r2["ET"] == {"dice": 1.0, "hd95": 0.0}


def test_region_metrics_brats2023_matches_2020_after_relabelling():
    ref20 = _brats2020_reference()
    pred20 = ref20.copy()
    pred20[4, 4:8, 3:7] = 2
    pred20[9, 9, 7] = 4  # a stray ET voxel outside the reference ET
    to23 = lambda x: np.where(x == 4, 3, x).astype(np.uint8)  # noqa: E731
    r20 = region_metrics(pred20, ref20, "brats2020", SPACING)
    r23 = region_metrics(to23(pred20), to23(ref20), "brats2023", SPACING)
    assert r23 == r20
    # Under the 2020 convention label 3 belongs to no region: a 2023 file read as 2020 loses ET.
    assert region_metrics(to23(pred20), to23(ref20), "brats2020", SPACING)["ET"]["dice"] == 1.0


def test_region_metrics_binary_and_empty_regions():
    ref = np.zeros((8, 8, 8), np.uint8)
    pred = np.zeros_like(ref)
    assert region_metrics(pred, ref, "binary", SPACING) == {"lesion": {"dice": 1.0, "hd95": 0.0}}
    ref[1, 1, 1] = 1
    pred[3, 2, 4] = 1
    result = region_metrics(pred, ref, "binary", SPACING)
    assert result["lesion"]["dice"] == 0.0
    assert result["lesion"]["hd95"] == pytest.approx(math.sqrt(4**2 + 1**2 + 9**2), rel=1e-6)


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [
    lambda a, b: dice(a, b),
    lambda a, b: hd95(a, b, SPACING),
    lambda a, b: region_metrics(a, b, "brats2020", SPACING),
])
def test_shape_mismatch_names_both_shapes(fn):
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros((4, 4, 5), np.uint8)
    with pytest.raises(GeometryError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        fn(a, b)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0), -1.0])
def test_bad_spacing_is_refused(spacing):
    a = _cube((6, 6, 6), (1, 1, 1), 2)
    with pytest.raises(ConfigError, match="spacing"):
        hd95(a, a, spacing)


def test_unknown_convention_is_refused():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ConfigError, match="brats2019"):
        region_metrics(a, a, "brats2019", SPACING)
