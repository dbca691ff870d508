"""evaluate_folders (ciml_core.evaluate) on generated NIfTI trees: pairing, grids, label checks,
numeric CSV / JSON contents, and refusing to overwrite."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ciml_core.errors import ConfigError, GeometryError, InputDataError, LabelError
from ciml_core.evaluate import EvaluationReport, evaluate_folders
from ciml_core.metrics import HD95_EMPTY
from conftest import write_nifti

SHAPE = (10, 9, 8)
# LPS storage (as BraTS files are), anisotropic 1.5 x 1.5 x 2.5 mm, with an origin.
AFFINE = np.array([
    [-1.5, 0.0, 0.0, 90.0],
    [0.0, -1.5, 0.0, 120.0],
    [0.0, 0.0, 2.5, -60.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _tumour() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[2:8, 2:7, 1:7] = 2
    label[3:6, 3:6, 2:5] = 1
    label[4, 4, 3] = 4
    return label


def _cube_at(z0: int) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[2:4, 2:4, z0:z0 + 2] = 1  # a 2x2x2 necrosis cube: WT and TC, no ET
    return label


def _pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """case_id -> (prediction, reference), in storage (LPS) voxel order."""
    tumour = _tumour()
    return {
        "Case_A": (tumour, tumour),  # perfect
        "Case_B": (np.where(tumour == 4, 1, tumour).astype(np.uint8), tumour),  # ET missed
        # 2x2x2 cubes 3 voxels apart along the 2.5 mm axis: Dice 0, HD95 3 * 2.5 mm.
        "Case_C": (_cube_at(4), _cube_at(1)),
    }


# case -> region -> (dice, hd95 in mm), computed by hand (see _pairs).
EXPECTED = {
    "Case_A": {"WT": (1.0, 0.0), "TC": (1.0, 0.0), "ET": (1.0, 0.0)},
    "Case_B": {"WT": (1.0, 0.0), "TC": (1.0, 0.0), "ET": (0.0, HD95_EMPTY)},
    "Case_C": {"WT": (0.0, 7.5), "TC": (0.0, 7.5), "ET": (1.0, 0.0)},
}


def _write_tree(tmp_path: Path, *, flat_refs: bool = False, to_2023: bool = False,
                cases: tuple[str, ...] = ("Case_A", "Case_B", "Case_C")) -> tuple[Path, Path]:
    """Predictions as <case>.nii.gz; references as a BraTS 2020 dataset (or flat label files)."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir(exist_ok=True)
    for case_id, (pred, ref) in _pairs().items():
        if case_id not in cases:
            continue
        if to_2023:
            pred, ref = (np.where(x == 4, 3, x).astype(np.uint8) for x in (pred, ref))
        write_nifti(pred_dir / f"{case_id}.nii.gz", pred, AFFINE)
        if flat_refs:
            write_nifti(ref_dir / f"{case_id}.nii.gz", ref, AFFINE)
        else:
            write_nifti(ref_dir / case_id / f"{case_id}_flair.nii.gz",
                        np.ones(SHAPE, np.float32), AFFINE)
            write_nifti(ref_dir / case_id / f"{case_id}_seg.nii.gz", ref, AFFINE)
    return pred_dir, ref_dir


def _check_cases(report: EvaluationReport) -> None:
    assert [c.case_id for c in report.cases] == list(EXPECTED)
    for case in report.cases:
        assert case.spacing == pytest.approx((1.5, 1.5, 2.5))
        for region, (d, h) in EXPECTED[case.case_id].items():
            assert case.metrics[region]["dice"] == pytest.approx(d, abs=1e-9), (case, region)
            assert case.metrics[region]["hd95"] == pytest.approx(h, rel=1e-6), (case, region)


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)),
            "median": float(np.median(values)), "min": min(values), "max": max(values),
            "n": len(values)}


def test_evaluate_brats2020_dataset_writes_csv_and_json(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path)
    out = tmp_path / "reports" / "report.csv"
    report = evaluate_folders(pred_dir, ref_dir, labels="brats2020", out=out)

    _check_cases(report)
    assert report.regions == ("WT", "TC", "ET")
    assert report.missing_predictions == []
    assert report.outputs == (out, out.with_suffix(".json"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.csv", "report.json"]

    # Summary: WT dice [1, 1, 0], WT hd95 [0, 0, 7.5], ET hd95 [0, 373.13, 0].
    summary = report.summary
    assert summary["WT"]["dice"]["mean"] == pytest.approx(2 / 3)
    assert summary["WT"]["dice"]["std"] == pytest.approx(math.sqrt(2 / 9))
    assert summary["WT"]["hd95"]["std"] == pytest.approx(math.sqrt(12.5))
    assert summary["ET"]["hd95"]["mean"] == pytest.approx(HD95_EMPTY / 3)
    assert summary["ET"]["hd95"]["median"] == 0.0

    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["case_id", "WT_dice", "WT_hd95", "TC_dice", "TC_hd95",
                             "ET_dice", "ET_hd95"]
    assert [r["case_id"] for r in rows] == [*EXPECTED, "mean", "std", "median"]
    for row in rows[:3]:
        for region, (d, h) in EXPECTED[row["case_id"]].items():
            assert float(row[f"{region}_dice"]) == pytest.approx(d, abs=1e-6)
            assert float(row[f"{region}_hd95"]) == pytest.approx(h, abs=1e-5)
    by_stat = {r["case_id"]: r for r in rows[3:]}
    for region in ("WT", "TC", "ET"):
        for metric, col in ((0, "dice"), (1, "hd95")):
            expected = _stats([EXPECTED[c][region][metric] for c in EXPECTED])
            for stat in ("mean", "std", "median"):
                assert float(by_stat[stat][f"{region}_{col}"]) == pytest.approx(
                    expected[stat], abs=1e-5), (region, col, stat)

    data = json.loads(out.with_suffix(".json").read_text())
    assert data["label_convention"] == "brats2020"
    assert data["hd95_empty_mm"] == HD95_EMPTY
    assert [c["case_id"] for c in data["cases"]] == list(EXPECTED)
    for case in data["cases"]:
        assert case["reference"].endswith(f"{case['case_id']}_seg.nii.gz")
        assert case["prediction"].endswith(f"{case['case_id']}.nii.gz")
        for region, (d, h) in EXPECTED[case["case_id"]].items():
            assert case["metrics"][region]["dice"] == pytest.approx(d)
            assert case["metrics"][region]["hd95"] == pytest.approx(h, rel=1e-6)
    for region in ("WT", "TC", "ET"):
        for metric, name in ((0, "dice"), (1, "hd95")):
            expected = _stats([EXPECTED[c][region][metric] for c in EXPECTED])
            assert data["summary"][region][name] == pytest.approx(expected, rel=1e-6)

    table = report.summary_table()
    assert "WT" in table and "ET" in table and "0.6667" in table and "124.38" in table


def test_flat_references_and_brats2023_labels(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path, flat_refs=True, to_2023=True)
    report = evaluate_folders(pred_dir, ref_dir, labels="brats2023")
    _check_cases(report)
    assert report.cases[0].reference == ref_dir / "Case_A.nii.gz"
    assert report.outputs == ()


def test_probability_maps_beside_predictions_are_skipped(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path, flat_refs=True, cases=("Case_A",))
    for region in ("WT", "TC", "ET"):  # what `ciml-core predict --probabilities` adds
        write_nifti(pred_dir / f"Case_A_prob_{region}.nii.gz", np.full(SHAPE, 0.5, np.float32),
                    AFFINE)
    report = evaluate_folders(pred_dir, ref_dir)
    assert [c.case_id for c in report.cases] == ["Case_A"]
    assert report.cases[0].metrics["WT"] == {"dice": 1.0, "hd95": 0.0}


def test_binary_convention(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    write_nifti(pred_dir / "p1.nii.gz", _cube_at(4), AFFINE)
    write_nifti(ref_dir / "p1.nii.gz", _cube_at(1), AFFINE)
    write_nifti(pred_dir / "p2.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE)
    write_nifti(ref_dir / "p2.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE)
    report = evaluate_folders(pred_dir, ref_dir, labels="binary")
    assert report.regions == ("lesion",)
    assert report.cases[0].metrics["lesion"] == pytest.approx({"dice": 0.0, "hd95": 7.5})
    assert report.cases[1].metrics["lesion"] == {"dice": 1.0, "hd95": 0.0}  # both empty


def test_prediction_stored_in_another_orientation_of_the_same_grid(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path, flat_refs=True, cases=("Case_A",))
    ras = nib.as_closest_canonical(nib.load(str(pred_dir / "Case_A.nii.gz")))
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    nib.save(ras, str(pred_dir / "Case_A.nii.gz"))
    report = evaluate_folders(pred_dir, ref_dir)
    assert report.cases[0].metrics == {r: {"dice": 1.0, "hd95": 0.0} for r in ("WT", "TC", "ET")}


# -- errors ---------------------------------------------------------------------------------------


def test_mismatched_shape_names_both_files(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path, flat_refs=True, cases=("Case_A",))
    write_nifti(pred_dir / "Case_A.nii.gz", np.zeros((10, 9, 7), np.uint8), AFFINE)
    with pytest.raises(GeometryError, match=r"pred.Case_A\.nii\.gz.*\(10, 9, 7\).*ref.Case_A"):
        evaluate_folders(pred_dir, ref_dir)


def test_mismatched_affine_names_both_files(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path, flat_refs=True, cases=("Case_A",))
    moved = AFFINE.copy()
    moved[0, 3] += 5.0
    write_nifti(pred_dir / "Case_A.nii.gz", _tumour(), moved)
    with pytest.raises(GeometryError, match=r"pred.Case_A\.nii\.gz.*ref.Case_A.*differ by up to 5"):
        evaluate_folders(pred_dir, ref_dir)


def test_missing_prediction_is_an_error_listing_the_case(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path)
    (pred_dir / "Case_B.nii.gz").unlink()
    with pytest.raises(InputDataError, match=r"1 reference case\(s\) have no prediction.*Case_B"):
        evaluate_folders(pred_dir, ref_dir, out=tmp_path / "report.csv")
    assert not (tmp_path / "report.csv").exists()


def test_allow_missing_scores_an_empty_prediction(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path)
    (pred_dir / "Case_C.nii.gz").unlink()
    report = evaluate_folders(pred_dir, ref_dir, out=tmp_path / "r.csv", allow_missing=True)
    case_c = report.cases[2]
    assert case_c.case_id == "Case_C" and case_c.missing_prediction
    # Reference WT and TC are not empty -> Dice 0 / HD95 373.13; ET is empty in both -> 1 / 0.
    assert case_c.metrics == {"WT": {"dice": 0.0, "hd95": HD95_EMPTY},
                              "TC": {"dice": 0.0, "hd95": HD95_EMPTY},
                              "ET": {"dice": 1.0, "hd95": 0.0}}
    assert report.missing_predictions == ["Case_C"]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["missing_predictions"] == ["Case_C"]
    assert data["cases"][2]["prediction"] is None
    assert "Case_C" in report.summary_table()


def test_prediction_without_reference_is_an_error(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path, flat_refs=True)
    write_nifti(pred_dir / "Stray_01.nii.gz", _tumour(), AFFINE)
    with pytest.raises(InputDataError, match=r"1 prediction\(s\) have no reference.*Stray_01"):
        evaluate_folders(pred_dir, ref_dir)


def test_bad_label_values_name_the_file(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path, flat_refs=True, cases=("Case_A",))
    bad = _tumour()
    bad[0, 0, 0] = 3  # a BraTS 2023 ET value in a 2020 evaluation
    write_nifti(pred_dir / "Case_A.nii.gz", bad, AFFINE)
    with pytest.raises(LabelError, match=r"pred.Case_A\.nii\.gz.*\[3\]"):
        evaluate_folders(pred_dir, ref_dir, labels="brats2020")
    # The 2020 reference read as 2023 has a 4.
    write_nifti(pred_dir / "Case_A.nii.gz", _tumour(), AFFINE)
    with pytest.raises(LabelError, match=r"ref.Case_A\.nii\.gz.*\[4\]"):
        evaluate_folders(pred_dir, ref_dir, labels="brats2023")


def test_empty_or_missing_folders(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path, flat_refs=True, cases=("Case_A",))
    with pytest.raises(InputDataError, match="nowhere"):
        evaluate_folders(tmp_path / "nowhere", ref_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no reference labels found"):
        evaluate_folders(pred_dir, tmp_path / "empty")
    with pytest.raises(InputDataError, match="have no prediction.*Case_A"):
        evaluate_folders(tmp_path / "empty", ref_dir)


def test_refuses_to_overwrite_reports(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path, flat_refs=True, cases=("Case_A", "Case_C"))
    out = tmp_path / "report.csv"
    out.with_suffix(".json").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"report\.json"):
        evaluate_folders(pred_dir, ref_dir, out=out)
    assert not out.exists()
    assert out.with_suffix(".json").read_text() == "keep me"

    evaluate_folders(pred_dir, ref_dir, out=out, overwrite=True)
    assert json.loads(out.with_suffix(".json").read_text())["n_cases"] == 2
    assert len(out.read_text().splitlines()) == 1 + 2 + 3
    with pytest.raises(FileExistsError, match=r"report\.csv"):
        evaluate_folders(pred_dir, ref_dir, out=out)


def test_json_out_path_and_unknown_convention_are_refused(tmp_path):
    pred_dir, ref_dir = _write_tree(tmp_path, flat_refs=True, cases=("Case_A",))
    with pytest.raises(ConfigError, match="CSV"):
        evaluate_folders(pred_dir, ref_dir, out=tmp_path / "report.json")
    with pytest.raises(ConfigError, match="brats2019"):
        evaluate_folders(pred_dir, ref_dir, labels="brats2019")


def test_score_model_in_memory_equals_evaluating_the_written_predictions(tmp_path):
    from ciml_core.checkpoint import load_checkpoint
    from ciml_core.data.dataset import load_case
    from ciml_core.data.layouts import discover_cases
    from ciml_core.data.phantoms import write_phantom_dataset
    from ciml_core.evaluate import evaluate_folders, score_model
    from ciml_core.infer import InferenceSettings, predict_case, write_prediction

    write_phantom_dataset("brats", 2, tmp_path / "ref", seed=5000, shape=(64, 64, 48), spacing=2.0)
    cases = discover_cases(tmp_path / "ref")
    demo = load_checkpoint("demo")
    per_case, mean = score_model(demo, cases, "brats2020", InferenceSettings(device="cpu"))
    for files in cases:
        case = load_case(files, demo.modalities, label_convention="brats2020")
        write_prediction(predict_case(demo, case, InferenceSettings(device="cpu")), case, tmp_path / "pred")
    report = evaluate_folders(tmp_path / "pred", tmp_path / "ref", "brats2020")
    assert sorted(per_case) == [c.case_id for c in report.cases]
    for result in report.cases:
        for region in ("WT", "TC", "ET"):
            for metric in ("dice", "hd95"):
                assert per_case[result.case_id][region][metric] == pytest.approx(
                    result.metrics[region][metric])
    assert mean["WT"]["dice"] == pytest.approx(report.values("WT", "dice").mean())
    assert mean["WT"]["dice"] > 0.5  # the demo segments these phantoms
