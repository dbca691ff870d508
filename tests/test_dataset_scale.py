"""Dataset scale (issue 14): the memory-mapped preprocessed cache, its key and resumption,
parallel preprocessing, the loader's bounded set of open cases, and under torchrun: one rank
preprocesses and validation is split across ranks."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ciml_core.cli import main
from ciml_core.data.cache import (
    PreparedCase,
    PreprocessSettings,
    prepare_cases,
    region_targets,
    wait_for_cases,
)
from ciml_core.data.dataset import load_case
from ciml_core.data.layouts import discover_cases
from ciml_core.data.patches import PatchDataset, extract_patch
from ciml_core.data.preprocess import crop, preprocess_image
from ciml_core.errors import InputDataError
from conftest import run_torchrun

MODALITIES = ("flair", "t1", "t1ce", "t2")
REGIONS = ("WT", "TC", "ET")
SETTINGS = PreprocessSettings(MODALITIES, REGIONS, "brats2020")
N = 10  # 5-fold: two validation cases in fold 0, one per rank


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale") / "data"
    assert main(["phantom", "--kind", "brats", "--cases", str(N), "--out", str(root),
                 "--shape", "48", "48", "32", "--seed", "7"]) == 0
    return root


def test_cache_holds_memory_mappable_arrays_equal_to_preprocessing(phantoms, tmp_path):
    cases = discover_cases(phantoms)
    prepared, report = prepare_cases(cases, SETTINGS, tmp_path)
    assert (report.built, report.reused) == (N, 0) and len(report.seconds) == N
    assert report.folder == tmp_path / SETTINGS.key()
    assert [p.case_id for p in prepared] == [c.case_id for c in cases]
    image, regions, coords = prepared[0].load()
    assert isinstance(image, np.memmap) and isinstance(regions, np.memmap)
    assert image.dtype == np.float32 and regions.dtype == np.uint8
    loaded = load_case(cases[0], MODALITIES, label_convention="brats2020")
    pre = preprocess_image(loaded.image, MODALITIES)
    np.testing.assert_array_equal(image, pre.image)
    expected = crop(region_targets(loaded.label, "brats2020", REGIONS), pre.box)
    np.testing.assert_array_equal(regions, expected)
    for i, c in enumerate(coords):  # foreground samples lie in their region
        assert len(c) == min(int(expected[i].sum()), 10_000) and expected[i][tuple(c.T)].all()
    meta = json.loads((prepared[0].path / "meta.json").read_text())
    assert meta["shape"] == list(pre.image.shape) and meta["rank"] == 0


def test_cache_is_keyed_by_settings_and_resumes_missing_cases(phantoms, tmp_path):
    cases = discover_cases(phantoms)
    prepare_cases(cases, SETTINGS, tmp_path)
    _, again = prepare_cases(cases, SETTINGS, tmp_path)
    assert (again.built, again.reused) == (0, N)
    # an interrupted preparation leaves whole cases: the missing ones are built, no others
    import shutil

    shutil.rmtree(tmp_path / SETTINGS.key() / cases[2].case_id)
    _, resumed = prepare_cases(cases, SETTINGS, tmp_path)
    assert (resumed.built, resumed.reused) == (1, N - 1)
    # any setting that changes the arrays gives another cache folder, built from scratch
    for changed in (PreprocessSettings(MODALITIES, REGIONS, "brats2020", pet_method="zscore"),
                    PreprocessSettings(MODALITIES, ("WT", "TC"), "brats2020"),
                    PreprocessSettings(MODALITIES, REGIONS, "brats2020", spacing=(1.0, 1.0, 1.0))):
        assert changed.key() != SETTINGS.key()
        _, fresh = prepare_cases(cases[:1], changed, tmp_path)
        assert fresh.built == 1
    settings_doc = json.loads((tmp_path / SETTINGS.key() / "settings.json").read_text())
    assert settings_doc["convention"] == "brats2020" and settings_doc["format"] == 2


def test_cache_resamples_to_a_target_spacing(phantoms, tmp_path):
    cases = discover_cases(phantoms)
    native = load_case(cases[0], MODALITIES)
    target = tuple(2 * s for s in native.spacing)  # half the voxels along each axis
    prepared, _ = prepare_cases(cases[:1], PreprocessSettings(MODALITIES, REGIONS, "brats2020",
                                                              spacing=target), tmp_path)
    image, regions, _ = prepared[0].load()
    full, _, _ = prepare_cases(cases[:1], SETTINGS, tmp_path)[0][0].load()
    assert all(abs(a - b / 2) <= 1 for a, b in zip(image.shape[1:], full.shape[1:], strict=True))
    assert set(np.unique(regions)) <= {0, 1}
    meta = json.loads((prepared[0].path / "meta.json").read_text())
    assert meta["spacing"] == list(target)


def test_parallel_preprocessing_writes_the_same_arrays(phantoms, tmp_path):
    cases = discover_cases(phantoms)
    serial, _ = prepare_cases(cases, SETTINGS, tmp_path / "serial")
    parallel, report = prepare_cases(cases, SETTINGS, tmp_path / "parallel", workers=2)
    assert report.built == N
    pids = {json.loads((p.path / "meta.json").read_text())["pid"] for p in parallel}
    assert os.getpid() not in pids  # built by the worker processes
    for a, b in zip(serial, parallel, strict=True):
        for x, y in zip(a.load()[:2], b.load()[:2], strict=True):
            np.testing.assert_array_equal(x, y)


def test_a_bad_case_is_named_and_the_cases_built_before_it_stay(phantoms, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantoms, data)
    bad = sorted(data.iterdir())[-1]
    (bad / f"{bad.name}_t1.nii.gz").write_bytes(b"not a nifti file")
    cases = discover_cases(data)
    with pytest.raises(InputDataError, match=f"{bad.name}_t1"):
        prepare_cases(cases, SETTINGS, tmp_path / "cache")
    built = sorted(p.name for p in (tmp_path / "cache" / SETTINGS.key()).iterdir() if p.is_dir())
    assert built == [c.case_id for c in cases[:-1]]
    assert not (tmp_path / "cache" / SETTINGS.key() / "complete.json").exists()


def test_waiting_ranks_read_the_completion_marker_or_time_out(phantoms, tmp_path):
    cases = discover_cases(phantoms)
    ids = [c.case_id for c in cases]
    with pytest.raises(InputDataError, match="still incomplete after 0 s"):
        wait_for_cases(ids, SETTINGS, tmp_path, timeout=0, poll=0.01)
    prepare_cases(cases[:2], SETTINGS, tmp_path)
    with pytest.raises(InputDataError, match=f"{N - 2} case"):  # the marker must list every case
        wait_for_cases(ids, SETTINGS, tmp_path, timeout=0, poll=0.01)
    prepare_cases(cases, SETTINGS, tmp_path)
    got = wait_for_cases(ids, SETTINGS, tmp_path, timeout=0)
    assert [p.case_id for p in got] == ids and all(isinstance(p, PreparedCase) for p in got)


def test_patch_dataset_keeps_at_most_open_cases_maps(phantoms, tmp_path):
    prepared, _ = prepare_cases(discover_cases(phantoms), SETTINGS, tmp_path)
    ds = PatchDataset(prepared, (16, 16, 16), length=80, seed=3, open_cases=2)
    eager = {p.case_id: p.load(mmap=False) for p in prepared}
    seen = set()
    for i in range(len(ds)):
        x, y = ds[i]
        assert len(ds._open) <= 2
        seen |= set(ds._open)
        # the patch equals the one cut from the fully loaded arrays with the same draw
        rng = np.random.default_rng([ds.seed, ds.epoch, i])
        case = prepared[int(rng.integers(len(prepared)))]
        assert x.shape == (4, 16, 16, 16) and y.shape == (3, 16, 16, 16)
        assert np.isin(x.numpy(), eager[case.case_id][0]).all() or not x.numpy().any()
    assert seen == set(range(N))  # every case was opened at some point, never more than 2 at once
    image = eager[prepared[0].case_id][0]
    np.testing.assert_array_equal(extract_patch(prepared[0].load()[0], np.array([2, 3, 4]),
                                                (8, 8, 8)), image[:, 2:10, 3:11, 4:12])


def test_ddp_one_rank_preprocesses_and_validation_is_split(phantoms, tmp_path):
    run = tmp_path / "ddp"
    script = Path(__file__).parent / "helpers" / "ddp_validate.py"
    run_torchrun([str(script), str(phantoms), str(run)], port=29521)
    rank0, rank1 = (json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (rank0["built"], rank0["reused"]) == (N, 0)  # rank 0 built every case...
    assert rank1["built"] is None  # ...rank 1 only waited for the marker
    builders = {json.loads(p.read_text())["rank"]
                for p in (run / "cache").glob("*/*/meta.json")}
    assert builders == {0} and len(list((run / "cache").glob("*/*/meta.json"))) == N
    assert len(rank0["val_cases"]) >= 2  # both ranks had a case to validate
    for region, value in rank0["single_rank_val"].items():
        assert rank0["distributed_val"][region] == pytest.approx(value, abs=1e-12)


def test_train_resamples_to_the_median_spacing_or_the_given_one_and_records_it(phantoms,
                                                                              tmp_path):
    tiny = ["--epochs", "1", "--iters-per-epoch", "1", "--patch", "32", "--batch", "1",
            "--width", "2", "--workers", "0", "--device", "cpu", "--fold", "-1",
            "--bn-recalibration", "0"]
    native = load_case(discover_cases(phantoms)[0], MODALITIES).spacing  # 4 mm at 48x48x32
    assert main(["train", str(phantoms), "--out", str(tmp_path / "median"), *tiny]) == 0
    doc = json.loads((tmp_path / "median" / "best" / "config.json").read_text())
    assert doc["target_spacing"] == list(native)
    assert main(["train", str(phantoms), "--out", str(tmp_path / "coarse"), *tiny,
                 "--spacing", *(str(2 * s) for s in native)]) == 0
    doc = json.loads((tmp_path / "coarse" / "best" / "config.json").read_text())
    assert doc["target_spacing"] == [2 * s for s in native]
    metas = [json.loads(p.read_text()) for p in (tmp_path / "coarse").glob("cache/*/*/meta.json")]
    fine = [json.loads(p.read_text()) for p in (tmp_path / "median").glob("cache/*/*/meta.json")]
    assert len(metas) == N and all(m["spacing"] == [2 * s for s in native] for m in metas)
    by_id = {m["case_id"]: m["shape"] for m in fine}
    for m in metas:  # half the voxels along each axis (the field of view kept)
        assert all(abs(a - b / 2) <= 1 for a, b in zip(m["shape"][1:], by_id[m["case_id"]][1:],
                                                       strict=True))
