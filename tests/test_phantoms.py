"""Synthetic phantoms (SPEC 3.4): geometry, determinism, layouts, and the modality/region
separability that makes the BraTS-like phantom a meaningful multimodal task."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ciml_core.data.nifti import load_volume
from ciml_core.data.phantoms import (
    BRATS_MODALITIES,
    _overlapping_shapes,
    best_threshold_dice,
    brats_spacing,
    make_brats_phantom,
    make_petct_phantom,
    make_shape_composition,
    write_phantom_dataset,
)
from ciml_core.errors import ConfigError

SEEDS = (0, 1, 2)  # the cases `ciml-core phantom --kind brats --cases 3 --seed 0` writes


def regions(label: np.ndarray) -> dict[str, np.ndarray]:
    """BraTS 2020 labels -> the evaluated regions."""
    return {"WT": label > 0, "TC": (label == 1) | (label == 4), "ET": label == 4}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def brats_cases():
    return [make_brats_phantom(seed) for seed in SEEDS]


# ---------------------------------------------------------------------------------------------
# best_threshold_dice
# ---------------------------------------------------------------------------------------------


def test_best_threshold_dice_finds_exact_threshold_and_polarity():
    image = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert best_threshold_dice(image, image >= 3) == (1.0, 3.0, ">=")
    dice_low, threshold, polarity = best_threshold_dice(image, image < 2)
    assert (dice_low, threshold, polarity) == (1.0, 2.0, "<")
    # Imperfect: the mask is {1, 4}; the best single threshold is ">= 1" (Dice 2*2/(5+2)).
    dice_mixed, threshold, polarity = best_threshold_dice(image, np.isin(image, [1, 4]))
    assert dice_mixed == pytest.approx(4 / 7) and (threshold, polarity) == (1.0, ">=")


def test_best_threshold_dice_ignores_voxels_outside_within():
    image = np.array([5.0, 0.0, 1.0, 4.0])
    mask = np.array([False, False, False, True])
    within = np.array([False, True, True, True])  # the distracting 5.0 is outside
    assert best_threshold_dice(image, mask, within)[0] == 1.0
    assert best_threshold_dice(image, mask)[0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="empty"):
        best_threshold_dice(image, np.zeros(4, bool), within)


# ---------------------------------------------------------------------------------------------
# BraTS-like glioma phantom
# ---------------------------------------------------------------------------------------------


def test_brats_phantom_arrays_labels_and_affine(brats_cases):
    for seed, case in zip(SEEDS, brats_cases, strict=True):
        assert case.case_id == f"Phantom_{seed:05d}"
        assert sorted(case.images) == sorted(BRATS_MODALITIES)
        for image in case.images.values():
            assert image.shape == (96, 96, 64) and image.dtype == np.float32
            assert np.isfinite(image).all() and image.min() >= 0
            assert (image[~case.tissues["head"]] == 0).all()  # masked background, as in BraTS
            assert (image[case.tissues["head"]] > 0).mean() > 0.999
        assert case.label.dtype == np.uint8 and case.label.shape == (96, 96, 64)
        assert set(np.unique(case.label)) == {0, 1, 2, 4}
        for name, mask in regions(case.label).items():
            assert mask.sum() > 100, name
        assert not (case.label > 0)[~case.tissues["brain"]].any()  # the tumour is in the brain
        # LPS storage, 2 mm, volume centre at the world origin.
        np.testing.assert_allclose(np.diag(case.affine), [-2, -2, 2, 1])
        centre = case.affine @ np.array([47.5, 47.5, 31.5, 1.0])
        np.testing.assert_allclose(centre[:3], 0, atol=1e-9)


def test_brats_phantom_has_the_intended_anatomy(brats_cases):
    """Skull, CSF (with ventricles and sulci), GM and WM in plausible proportions, and the
    tumour is a few percent of the head."""
    for case in brats_cases:
        head = case.tissues["head"].sum()
        fractions = {t: case.tissues[t].sum() / head for t in ("skull", "csf", "gm", "wm")}
        assert 0.15 < fractions["skull"] < 0.3
        assert 0.1 < fractions["csf"] < 0.2
        assert 0.15 < fractions["gm"] < 0.35
        assert 0.25 < fractions["wm"] < 0.45
        assert 0.03 < (case.label > 0).sum() / head < 0.15
        # Lateral ventricles: CSF deep inside the brain, far from the skull.
        depth = ndimage.distance_transform_edt(case.tissues["head"])
        assert (case.tissues["csf"] & (depth > 15)).sum() > 300


def test_brats_regions_are_nested_like_a_glioma(brats_cases):
    """NCR inside an ET rim inside the oedema: ET lies on the outside of the tumour core, the
    necrosis deeper, and the core is wrapped in oedema."""
    for case in brats_cases:
        label = case.label
        tc, et, ncr = regions(label)["TC"], label == 4, label == 1
        depth_in_core = ndimage.distance_transform_edt(tc)
        assert depth_in_core[et].max() <= 3.5  # a rim, at most a few voxels thick
        assert depth_in_core[ncr].mean() > depth_in_core[et].mean() + 1
        shell = ndimage.binary_dilation(tc) & ~tc & case.tissues["brain"]
        assert (label[shell] == 2).mean() > 0.9  # the core is surrounded by oedema
        assert ndimage.label(tc)[1] == 1  # one tumour core


def test_brats_phantom_is_deterministic_per_seed():
    a, b, c = make_brats_phantom(5, (48, 48, 32)), make_brats_phantom(5, (48, 48, 32)), \
        make_brats_phantom(6, (48, 48, 32))
    for m in BRATS_MODALITIES:
        assert a.images[m].tobytes() == b.images[m].tobytes()
        assert not np.array_equal(a.images[m], c.images[m])
    assert a.label.tobytes() == b.label.tobytes()
    assert not np.array_equal(a.label, c.label)


def test_same_seed_gives_the_same_anatomy_at_any_grid():
    """Geometry lives in field-of-view units and the random fields do not depend on the voxel
    grid, so a coarse and a fine phantom of one seed show the same tumour."""
    coarse, fine = make_brats_phantom(3, (48, 48, 32)), make_brats_phantom(3, (96, 96, 64))
    for name in ("WT", "TC"):
        frac_coarse = regions(coarse.label)[name].mean()
        frac_fine = regions(fine.label)[name].mean()
        assert frac_coarse == pytest.approx(frac_fine, rel=0.15), name
    fine_downsampled = regions(fine.label)["WT"][::2, ::2, ::2]
    assert dice(fine_downsampled, regions(coarse.label)["WT"]) > 0.8


def test_every_tenth_seed_has_no_enhancing_tumour():
    case = make_brats_phantom(9, (48, 48, 32))
    assert not (case.label == 4).any()
    assert (case.label == 1).any() and (case.label == 2).any()
    assert all((make_brats_phantom(s, (48, 48, 32)).label == 4).any() for s in (10, 11, 18))


def test_default_spacing_gives_a_head_sized_field_of_view():
    assert brats_spacing((96, 96, 64)) == (2.0, 2.0, 2.0)
    assert brats_spacing((240, 240, 155)) == (1.0, 1.0, 1.0)  # the BraTS grid
    assert brats_spacing((64, 64, 48)) == (3.0, 3.0, 3.0)
    case = make_brats_phantom(0, (48, 48, 32), spacing=1.5)
    np.testing.assert_allclose(np.diag(case.affine)[:3], [-1.5, -1.5, 1.5])


# ---------------------------------------------------------------------------------------------
# Separability (SPEC 3.4): what each modality alone can and cannot segment
# ---------------------------------------------------------------------------------------------


def separability_table(cases) -> dict:
    """{(case index, region, modality): best single-threshold Dice inside the head}, for the
    regions each case has (a lower-grade case has no ET)."""
    table = {}
    for i, case in enumerate(cases):
        for name, mask in regions(case.label).items():
            if not mask.any():
                continue
            for modality in BRATS_MODALITIES:
                table[i, name, modality] = best_threshold_dice(
                    case.images[modality], mask, case.tissues["head"])[0]
    return table


@pytest.fixture(scope="module")
def single_modality_dice(brats_cases):
    return separability_table(brats_cases)


def two_modality_core(case) -> float:
    """Best Dice of a simple T1CE + FLAIR rule for the tumour core: enhancing (bright T1CE) or
    dark on T1CE (necrosis, CSF) but not dark on FLAIR (which rules CSF out)."""
    head, t1ce, flair = case.tissues["head"], case.images["t1ce"], case.images["flair"]
    tc = regions(case.label)["TC"]
    threshold_et = best_threshold_dice(t1ce, case.label == 4, head)[1]
    enhancing = head & (t1ce >= threshold_et)
    best = 0.0
    for t1ce_dark in np.quantile(t1ce[head], np.linspace(0.05, 0.5, 10)):
        dark = head & (t1ce < t1ce_dark) & ~enhancing
        if not (tc & dark).any():
            continue
        threshold_flair = best_threshold_dice(flair, tc, dark)[1]
        best = max(best, dice(enhancing | (dark & (flair >= threshold_flair)), tc))
    return best


# The separability statements, shared with the brain phantom's tests (test_brain_phantoms.py).


def check_whole_tumour_clearest_on_flair(table: dict, n: int) -> None:
    for i in range(n):
        scores = {m: table[i, "WT", m] for m in BRATS_MODALITIES}
        assert max(scores, key=scores.get) == "flair", scores
        assert scores["flair"] >= 0.85, scores
        assert scores["flair"] - scores["t2"] >= 0.25, scores  # on T2 it is confused with CSF


def check_t2_confuses_whole_tumour_with_csf(cases) -> None:
    for case in cases:
        t2 = case.images["t2"]
        assert np.median(t2[case.tissues["csf"]]) > np.median(t2[case.label == 2])
        # The best T2 threshold for WT takes in most of the CSF.
        _, threshold, polarity = best_threshold_dice(t2, case.label > 0, case.tissues["head"])
        assert polarity == ">=" and (t2[case.tissues["csf"]] >= threshold).mean() > 0.5


def check_enhancing_tumour_separable_only_on_t1ce(table: dict, n: int) -> None:
    for i in range(n):
        scores = {m: table[i, "ET", m] for m in BRATS_MODALITIES}
        assert scores["t1ce"] >= 0.9, scores
        assert all(scores[m] <= 0.4 for m in ("flair", "t1", "t2")), scores


def check_tumour_core_needs_t1ce_and_flair(cases, table: dict) -> None:
    for i, case in enumerate(cases):
        singles = {m: table[i, "TC", m] for m in BRATS_MODALITIES}
        assert max(singles.values()) < 0.6, singles
        combined = two_modality_core(case)
        assert combined >= 0.85, combined
        assert combined - max(singles.values()) >= 0.3, (combined, singles)


def test_whole_tumour_is_clearest_on_flair(single_modality_dice):
    check_whole_tumour_clearest_on_flair(single_modality_dice, len(SEEDS))


def test_t2_confuses_whole_tumour_with_csf(brats_cases):
    check_t2_confuses_whole_tumour_with_csf(brats_cases)


def test_enhancing_tumour_is_separable_only_on_t1ce(single_modality_dice):
    check_enhancing_tumour_separable_only_on_t1ce(single_modality_dice, len(SEEDS))


def test_tumour_core_needs_t1ce_and_flair(brats_cases, single_modality_dice):
    check_tumour_core_needs_t1ce_and_flair(brats_cases, single_modality_dice)


def check_necrosis_looks_like_csf_on_t1_and_t1ce_but_not_on_flair(cases) -> None:
    for case in cases:
        ncr, csf = case.label == 1, case.tissues["csf"]
        for modality in ("t1", "t1ce"):
            ratio = np.median(case.images[modality][ncr]) / np.median(case.images[modality][csf])
            assert 0.8 < ratio < 1.3, (modality, ratio)
        flair = case.images["flair"]
        assert np.median(flair[ncr]) > 3 * np.median(flair[csf])


def check_no_single_modality_solves_all_three_regions(table: dict, n: int) -> None:
    for i in range(n):
        for modality in BRATS_MODALITIES:
            worst = min(table[i, r, modality] for r in ("WT", "TC", "ET"))
            assert worst < 0.6, (i, modality, worst)


def test_necrosis_looks_like_csf_on_t1_and_t1ce_but_not_on_flair(brats_cases):
    check_necrosis_looks_like_csf_on_t1_and_t1ce_but_not_on_flair(brats_cases)


def test_no_single_modality_solves_all_three_regions(single_modality_dice):
    check_no_single_modality_solves_all_three_regions(single_modality_dice, len(SEEDS))


# ---------------------------------------------------------------------------------------------
# ShapeComposition
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_shapes_overlap_and_neither_contains_the_other(seed):
    triangle, ellipse = _overlapping_shapes(np.random.default_rng(seed), (64, 64))
    both = (triangle & ellipse).sum()
    assert both > 0
    assert (triangle & ~ellipse).sum() > 0 and (ellipse & ~triangle).sum() > 0


def test_shape_composition_images_and_union_target():
    for seed in range(5):
        primary, auxiliary, target = make_shape_composition(seed)
        assert primary.shape == auxiliary.shape == target.shape == (64, 64)
        assert primary.dtype == auxiliary.dtype == np.float32 and target.dtype == np.uint8
        triangle, ellipse = primary > 0.35, auxiliary > 0.35  # shapes are 0.7..1, noise 0.1
        assert set(np.unique(target)) == {0, 1}
        assert (target.astype(bool) == (triangle | ellipse)).mean() > 0.995
        # Each image shows only its own shape: the union needs both.
        union = target.astype(bool)
        assert dice(triangle, union) < 0.9 and dice(ellipse, union) < 0.9
    a, b = make_shape_composition(3), make_shape_composition(3)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
    assert make_shape_composition(0, (32, 48))[0].shape == (32, 48)


# ---------------------------------------------------------------------------------------------
# PET/CT
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def petct_cases():
    return [make_petct_phantom(seed) for seed in SEEDS]


def test_petct_arrays_and_labels(petct_cases):
    for seed, case in zip(SEEDS, petct_cases, strict=True):
        assert case.case_id == f"PETCT_{seed:05d}"
        assert sorted(case.images) == ["ct", "pet"]
        for image in case.images.values():
            assert image.shape == (96, 96, 96) and image.dtype == np.float32
        assert case.images["pet"].min() >= 0
        assert case.label.dtype == np.uint8 and set(np.unique(case.label)) == {0, 1}
        np.testing.assert_allclose(np.diag(case.affine)[:3], [-500 / 96, -500 / 96, 10.0])


def test_ct_has_air_fat_soft_tissue_and_bone(petct_cases):
    expected_hu = {"air": (-1024, -950), "lung": (-900, -700), "fat": (-150, -50),
                   "soft": (0, 80), "liver": (30, 90), "bone": (300, 1500)}
    for case in petct_cases:
        for tissue, (low, high) in expected_hu.items():
            median = np.median(case.images["ct"][case.tissues[tissue]])
            assert low <= median <= high, (tissue, median)


def test_lesions_and_physiological_uptake_are_hot_only_lesions_labelled(petct_cases):
    for case in petct_cases:
        pet, lesion = case.images["pet"], case.label.astype(bool)
        background = np.median(pet[case.tissues["soft"]])
        assert pet[lesion].mean() > 4 * background
        for organ in ("brain", "heart", "bladder"):
            assert pet[case.tissues[organ]].mean() > 4 * background, organ
            assert not lesion[case.tissues[organ]].any(), organ
        # PET alone cannot tell lesions from physiological uptake; with the organs that CT
        # anatomy identifies excluded, one PET threshold finds the lesions.
        body = case.tissues["body"]
        organs = case.tissues["brain"] | case.tissues["heart"] | case.tissues["bladder"]
        pet_alone = best_threshold_dice(pet, lesion, body)[0]
        pet_with_anatomy = best_threshold_dice(pet, lesion, body & ~organs)[0]
        assert pet_alone < 0.4, pet_alone
        assert pet_with_anatomy > max(0.6, pet_alone + 0.4), (pet_alone, pet_with_anatomy)
        # CT alone does not show lesions outside the lungs.
        assert best_threshold_dice(case.images["ct"], lesion, body)[0] < 0.2


def test_petct_is_deterministic_per_seed():
    a, b = make_petct_phantom(4, (48, 48, 48)), make_petct_phantom(4, (48, 48, 48))
    assert a.images["ct"].tobytes() == b.images["ct"].tobytes()
    assert a.images["pet"].tobytes() == b.images["pet"].tobytes()
    assert a.label.tobytes() == b.label.tobytes()


# ---------------------------------------------------------------------------------------------
# Writing datasets
# ---------------------------------------------------------------------------------------------


def load(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine, img


def test_write_brats_dataset_layout_values_and_affine(tmp_path):
    folders = write_phantom_dataset("brats", 3, tmp_path, seed=0)
    assert folders == [tmp_path / f"Phantom_{i:05d}" for i in range(3)]
    for seed, folder in enumerate(folders):
        case = make_brats_phantom(seed)
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(f"{folder.name}_{m}.nii.gz" for m in (*BRATS_MODALITIES, "seg"))
        for modality in BRATS_MODALITIES:
            data, affine, img = load(folder / f"{folder.name}_{modality}.nii.gz")
            assert img.get_data_dtype() == np.float32
            assert np.array_equal(data, case.images[modality])
            np.testing.assert_array_equal(affine, case.affine)
            assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        seg, affine, img = load(folder / f"{folder.name}_seg.nii.gz")
        assert img.get_data_dtype() == np.uint8 and np.array_equal(seg, case.label)
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        assert all(mask.any() for mask in regions(seg).values())
        # Through the project's loader: LPS storage -> canonical RAS flips the first two axes.
        volume = load_volume(folder / f"{folder.name}_flair.nii.gz")
        assert np.array_equal(volume.data, case.images["flair"][::-1, ::-1, :])
        assert volume.spacing == pytest.approx((2.0, 2.0, 2.0))


def test_cli_writes_three_brats_cases(tmp_path):
    from ciml_core.cli import main

    assert main(["phantom", "--kind", "brats", "--cases", "3", "--out", str(tmp_path)]) == 0
    segs = sorted(tmp_path.glob("*/*_seg.nii.gz"))
    assert [p.parent.name for p in segs] == ["Phantom_00000", "Phantom_00001", "Phantom_00002"]
    for path in segs:
        seg = np.asanyarray(nib.load(str(path)).dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        assert all(mask.any() for mask in regions(seg).values())


def test_write_shapes_and_petct_layouts(tmp_path):
    (shapes_folder,) = write_phantom_dataset("shapes", 1, tmp_path / "shapes", seed=7)
    assert shapes_folder.name == "Shapes_00007"
    primary, auxiliary, target = make_shape_composition(7)
    for name, expected in (("primary", primary), ("auxiliary", auxiliary), ("seg", target)):
        data, affine, _ = load(shapes_folder / f"Shapes_00007_{name}.nii.gz")
        assert data.shape == (64, 64, 1) and np.array_equal(data[..., 0], expected)
        np.testing.assert_allclose(np.diag(affine), [-1, -1, 1, 1])
    thick = write_phantom_dataset("shapes", 1, tmp_path / "thick", seed=7, shape=(32, 40, 3))
    data, _, _ = load(thick[0] / "Shapes_00007_seg.nii.gz")
    assert data.shape == (32, 40, 3) and (data == data[..., :1]).all()

    folders = write_phantom_dataset("petct", 2, tmp_path / "petct", seed=1, shape=(48, 48, 48))
    assert [f.name for f in folders] == ["PETCT_00001", "PETCT_00002"]
    assert sorted(p.name for p in folders[0].iterdir()) == ["CTres.nii.gz", "SEG.nii.gz",
                                                            "SUV.nii.gz"]
    case = make_petct_phantom(1, (48, 48, 48))
    ct, affine, _ = load(folders[0] / "CTres.nii.gz")
    seg, _, seg_img = load(folders[0] / "SEG.nii.gz")
    assert np.array_equal(ct, case.images["ct"]) and np.array_equal(seg, case.label)
    assert seg_img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(affine, case.affine)


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    write_phantom_dataset("shapes", 2, tmp_path)
    target = tmp_path / "Shapes_00001" / "Shapes_00001_primary.nii.gz"
    before = target.read_bytes()
    # Case 0 is gone, case 1 exists: nothing is written, and the error names the file.
    for path in (tmp_path / "Shapes_00000").iterdir():
        path.unlink()
    with pytest.raises(FileExistsError, match="Shapes_00001_primary.nii.gz"):
        write_phantom_dataset("shapes", 2, tmp_path)
    assert not any((tmp_path / "Shapes_00000").iterdir())
    assert target.read_bytes() == before
    write_phantom_dataset("shapes", 2, tmp_path, seed=0, overwrite=True)
    assert target.read_bytes() == before  # same seed, same bytes
    assert len(list((tmp_path / "Shapes_00000").iterdir())) == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "mri"}, "kind"),
        ({"cases": 0}, "cases"),
        ({"cases": -2}, "cases"),
        ({"seed": -1}, "seed"),
        ({"shape": (16, 16, 16)}, "shape"),
        ({"shape": (96, 96)}, "shape"),
        ({"kind": "petct", "shape": (96, 96, 8)}, "shape"),
        ({"kind": "shapes", "shape": (8, 64, 1)}, "shape"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_field(tmp_path, kwargs, field):
    arguments = {"kind": "brats", "cases": 1, "out": tmp_path, **kwargs}
    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        write_phantom_dataset(**arguments)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_brats_grid_case_is_written_in_under_30_seconds(tmp_path):
    start = time.perf_counter()
    (folder,) = write_phantom_dataset("brats", 1, tmp_path, shape=(240, 240, 155))
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"{elapsed:.1f} s for one 240x240x155 case"
    seg, affine, _ = load(folder / "Phantom_00000_seg.nii.gz")
    assert seg.shape == (240, 240, 155)
    np.testing.assert_allclose(np.diag(affine), [-1, -1, 1, 1])
    assert all(mask.any() for mask in regions(seg).values())


def test_write_phantom_dataset_takes_a_spacing_for_the_glioma_kind(tmp_path):
    (folder,) = write_phantom_dataset("brats", 1, tmp_path, seed=3, shape=(48, 48, 32),
                                      spacing=2.0)
    image = nib.load(str(folder / "Phantom_00003_t1.nii.gz"))
    assert image.shape == (48, 48, 32)
    assert nib.affines.voxel_sizes(image.affine) == pytest.approx((2.0, 2.0, 2.0))
    # the same case as the generator's, at that spacing
    expected = make_brats_phantom(3, (48, 48, 32), 2.0)
    assert np.array_equal(np.asarray(image.dataobj), expected.images["t1"])
    with pytest.raises(ConfigError, match="only the brats kind takes a spacing"):
        write_phantom_dataset("petct", 1, tmp_path / "p", spacing=2.0)
