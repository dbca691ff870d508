"""ciml_core.review sessions without a GUI: worklist, decisions, resume, drafts, bad input,
atomic saves, summary and export (issue 13; the review items of issue 12)."""

from __future__ import annotations

import csv
import hashlib
import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ciml_core.cli import main
from ciml_core.data.layouts import discover_cases
from ciml_core.data.nifti import load_volume, write_like
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.errors import ConfigError, InputDataError
from ciml_core.review import (
    REVIEW_LOG,
    AlreadyReviewedError,
    ReviewSession,
    read_reviews,
    save_review,
)
from ciml_core.review import record as record_module
from ciml_core.review.export import review_export
from ciml_core.review.summary import INTER_READER_CSV, SUMMARY_CSV, SUMMARY_MD, SUMMARY_PNG

SHAPE = (48, 48, 32)
REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}


def write_predictions(data: Path, out: Path, drop=(), shift_z: int = 0) -> Path:
    """Stand-in model outputs: each case's label with ET relabelled NCR (so a reviewer has
    something to correct), on the images' grid."""
    for case in discover_cases(data):
        if case.case_id in drop:
            continue
        volume = load_volume(case.label)
        pred = volume.data.astype(np.uint8)
        pred[pred == 4] = 1
        if shift_z:
            pred = np.roll(pred, shift_z, axis=2)
        write_like(pred, volume.source, out / f"{case.case_id}.nii.gz", dtype=np.uint8)
    return out


def tree_hash(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def paint(label: np.ndarray, n: int, value: int = 2, skip: int = 0) -> np.ndarray:
    """``n`` background voxels next to the tumour painted ``value``."""
    edited = label.copy()
    centre = np.argwhere(label > 0).mean(axis=0)
    background = np.argwhere(label == 0)
    order = np.argsort(((background - centre) ** 2).sum(axis=1))
    chosen = background[order[skip:skip + n]]
    edited[tuple(chosen.T)] = value
    return edited


def region_dice(a: np.ndarray, b: np.ndarray, values) -> float:
    """Dice written out independently of ciml_core.metrics (BraTS rule: both empty -> 1)."""
    x, y = np.isin(a, values), np.isin(b, values)
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(x, y).sum() / total)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    write_phantom_dataset("brats", 5, root / "data", seed=300, shape=SHAPE, spacing=2.0)
    write_predictions(root / "data", root / "pred")
    return root / "data", root / "pred"


def open_session(tmp_path, dataset, name="session", reviewer="Dr A", **kwargs):
    data, pred = dataset
    kwargs.setdefault("predictions", pred)
    return ReviewSession.open(tmp_path / name, data, reviewer=reviewer, **kwargs)


def decide_all(session: ReviewSession) -> dict[str, int]:
    """accept 2, correct 2, reject 1; returns the changed voxels of the corrections."""
    ids = session.case_ids
    changed = {}
    for i, case_id in enumerate(ids):
        assert session.resume_case() == case_id
        case = session.load(case_id)
        session.begin(case_id)
        if i < 2:
            session.decide(case, "accepted")
        elif i < 4:
            edited = paint(case.model_label, 40 + 10 * i)
            changed[case_id] = int(np.count_nonzero(edited != case.model_label))
            session.decide(case, "corrected", label=edited, note=f"edit {i}")
        else:
            session.decide(case_id, "rejected", reason="artefact")
    return changed


def test_session_end_to_end_resume_and_inputs_untouched(tmp_path, dataset):
    data, pred = dataset
    before = tree_hash(data, pred)
    session = open_session(tmp_path, dataset)
    meta = json.loads((tmp_path / "session" / "session.json").read_text())
    assert meta["dataset"] == str(data.resolve()) and meta["predictions"] == str(pred.resolve())
    assert meta["reviewer"] == "Dr A" and meta["model"] is None and meta["model_sha256"] is None
    assert meta["layout"] == "brats2020" and meta["label_convention"] == "brats2020"
    assert meta["cases"] == [f"Phantom_{i:05d}" for i in range(300, 305)] and meta["created"]
    assert session.progress_text() == "0 / 5 reviewed" and session.warnings == []
    assert all(c.origin == "predictions" and c.problem is None for c in session.cases)

    case = session.load(session.case_ids[0])
    assert case.images.shape == (4, *SHAPE) and case.modalities == ("flair", "t1", "t1ce", "t2")
    assert case.model_label.dtype == np.uint8 and case.draft is None
    session.begin(case.case_id)
    time.sleep(0.05)
    assert session.elapsed(case.case_id) >= 0.05
    changed = decide_all(session)
    assert session.progress() == (5, 5) and session.resume_case() is None

    records = read_reviews(tmp_path / "session" / REVIEW_LOG)
    assert [r["decision"] for r in records] == ["accepted"] * 2 + ["corrected"] * 2 + ["rejected"]
    assert [r["case_id"] for r in records] == session.case_ids
    assert [r["changed_voxels"] for r in records] == [0, 0, *changed.values(), None]
    assert records[0]["seconds"] >= 0.05 and all(r["seconds"] is not None for r in records)
    assert records[4]["reason"] == "artefact" and records[4]["output"] == ""
    assert records[2]["dice_vs_model"]["WT"] < 1.0 and records[0]["dice_vs_model"]["WT"] == 1.0
    assert all(r["reviewer"] == "Dr A" for r in records)
    for r in records[:4]:
        saved = nib.load(r["output"])
        flair = nib.load(data / r["case_id"] / f"{r['case_id']}_flair.nii.gz")
        assert np.array_equal(saved.affine, flair.affine) and saved.shape == flair.shape
    assert not (tmp_path / "session" / f"{session.case_ids[4]}.nii.gz").exists()

    again = ReviewSession.open(tmp_path / "session")  # only the folder
    assert again.progress_text() == "5 / 5 reviewed" and again.resume_case() is None
    assert [c.status for c in again.cases] == ["accepted"] * 2 + ["corrected"] * 2 + ["rejected"]
    assert tree_hash(data, pred) == before  # the inputs were only read


def test_skip_resume_and_replacing_a_decision(tmp_path, dataset):
    session = open_session(tmp_path, dataset)
    first, second = session.case_ids[:2]
    loaded = session.load(first)
    session.save_draft(loaded, paint(loaded.model_label, 12))
    session.decide(first, "skipped")
    assert session.status(first) == "skipped" and session.resume_case() == second
    assert session.read_draft(first).changed_voxels == 12  # kept for when it comes back
    assert session.progress() == (0, 5)
    for case_id in session.case_ids[1:]:
        session.decide(session.load(case_id), "accepted")
    assert ReviewSession.open(tmp_path / "session").resume_case() == first  # skipped: later

    case = session.load(second)
    edited = paint(case.model_label, 25)
    with pytest.raises(AlreadyReviewedError, match=f"case {second} is already accepted"):
        session.decide(case, "corrected", label=edited)
    session.decide(case, "corrected", label=edited, replace=True)
    superseded = list((tmp_path / "session" / "superseded").glob(f"{second}.*.nii.gz"))
    assert len(superseded) == 1
    assert np.array_equal(load_volume(superseded[0]).data, case.model_label)
    assert np.array_equal(load_volume(session.mask_path(second)).data, edited)
    session.decide(second, "rejected", reason="wrong modality", replace=True)
    assert not session.mask_path(second).exists()  # the mask went to superseded/, not away
    assert len(list((tmp_path / "session" / "superseded").glob(f"{second}.*"))) == 2
    assert ReviewSession.open(tmp_path / "session").status(second) == "rejected"


def test_refused_decisions_write_nothing(tmp_path, dataset):
    session = open_session(tmp_path, dataset)
    case = session.load(session.case_ids[0])
    edited = paint(case.model_label, 5)
    with pytest.raises(ConfigError, match="5 voxel\\(s\\) differ from the model output"):
        session.decide(case, "accepted", label=edited)
    with pytest.raises(ConfigError, match="no voxel differs"):
        session.decide(case, "corrected", label=case.model_label)
    with pytest.raises(ConfigError, match="reject reason"):
        session.decide(case, "rejected", reason="boring")
    with pytest.raises(ConfigError, match="decision"):
        session.decide(case, "maybe")
    assert not (tmp_path / "session" / REVIEW_LOG).exists()
    assert session.status(case.case_id) == "to do"


def test_drafts_survive_reopening_and_go_with_the_decision(tmp_path, dataset):
    session = open_session(tmp_path, dataset)
    case = session.load(session.case_ids[1])
    session.begin(case.case_id)
    edited = paint(case.model_label, 30)
    path = session.save_draft(case, edited)
    assert path.parent.name == "drafts" and not list(path.parent.glob(".*"))  # no temp left
    again = ReviewSession.open(tmp_path / "session")
    reloaded = again.load(case.case_id)
    assert reloaded.draft is not None and np.array_equal(reloaded.draft.label, edited)
    assert reloaded.draft.changed_voxels == 30 and reloaded.draft.saved
    again.begin(case.case_id, already=reloaded.draft.seconds)
    again.decide(reloaded, "corrected", label=reloaded.draft.label)
    assert not path.exists() and again.load(case.case_id).draft is None


def test_missing_predictions_are_marked_or_computed(tmp_path, dataset):
    data, _ = dataset
    pred = write_predictions(data, tmp_path / "partial", drop={"Phantom_00301", "Phantom_00303"})
    session = ReviewSession.open(tmp_path / "marked", data, predictions=pred, reviewer="A")
    origins = {c.case_id: c.origin for c in session.cases}
    assert origins["Phantom_00301"] == origins["Phantom_00303"] == "missing"
    assert len(session.cases) == 5  # never silently dropped
    assert any("2 case(s) have no usable model output" in w for w in session.warnings)
    case = session.load("Phantom_00301")
    assert case.model_label is None and case.images.shape[0] == 4
    assert "no prediction Phantom_00301.nii.gz" in case.problem
    with pytest.raises(ConfigError, match="no model output to accept"):
        session.decide(case, "accepted")
    session.decide(case, "rejected", reason="other")
    assert session.status("Phantom_00301") == "rejected"

    computing = ReviewSession.open(tmp_path / "computed", data, predictions=pred, model="demo",
                                   reviewer="A")
    assert computing.model_sha256 and len(computing.model_sha256) == 64
    assert {c.case_id for c in computing.cases if c.origin == "model"} == {
        "Phantom_00301", "Phantom_00303"}
    case = computing.load("Phantom_00303")
    written = tmp_path / "computed" / "model_output" / "Phantom_00303.nii.gz"
    assert case.problem is None and case.prediction == written
    assert np.array_equal(load_volume(written).data, case.model_label)
    flair = nib.load(data / "Phantom_00303" / "Phantom_00303_flair.nii.gz")
    assert np.array_equal(nib.load(written).affine, flair.affine)
    reopened = ReviewSession.open(tmp_path / "computed")
    assert reopened.case("Phantom_00303").origin == "computed"  # not computed twice
    with pytest.raises(ConfigError, match="made with model"):
        ReviewSession.open(tmp_path / "computed", model=tmp_path)


def test_prediction_on_another_grid_is_marked_with_a_clear_error(tmp_path, dataset):
    data, pred = dataset
    bad = tmp_path / "bad_pred"
    bad.mkdir()
    for p in pred.glob("*.nii.gz"):
        (bad / p.name).write_bytes(p.read_bytes())
    small = nib.load(pred / "Phantom_00302.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(small.dataobj)[:, :, :30], small.affine),
             bad / "Phantom_00302.nii.gz")
    shifted = small.affine.copy()
    shifted[0, 3] += 4.0
    nib.save(nib.Nifti1Image(np.asarray(small.dataobj), shifted), bad / "Phantom_00304.nii.gz")
    session = ReviewSession.open(tmp_path / "s", data, predictions=bad, reviewer="A")
    problem = session.case("Phantom_00302").problem
    assert "has shape (48, 48, 30)" in problem and "(48, 48, 32)" in problem
    assert str(bad / "Phantom_00302.nii.gz") in problem and "Phantom_00302_flair" in problem
    assert "affines that differ by up to 4 mm" in session.case("Phantom_00304").problem
    case = session.load("Phantom_00302")
    assert case.model_label is None and "must lie on its images' grid" in case.problem
    session.decide(case, "rejected", reason="other", note="prediction on another grid")
    assert session.next_case("Phantom_00302") == "Phantom_00303"
    assert session.next_case("Phantom_00304") == "Phantom_00300"  # wraps round


def test_session_of_another_dataset_or_inside_an_input_is_refused(tmp_path, dataset):
    data, pred = dataset
    other = tmp_path / "other"
    write_phantom_dataset("brats", 1, other, seed=900, shape=SHAPE, spacing=2.0)
    open_session(tmp_path, dataset)
    with pytest.raises(ConfigError) as err:
        ReviewSession.open(tmp_path / "session", other, predictions=pred, reviewer="A")
    assert str(data.resolve()) in str(err.value) and str(other.resolve()) in str(err.value)
    with pytest.raises(InputDataError, match="inside the input folder"):
        ReviewSession.open(data / "reviews", data, predictions=pred, reviewer="A")
    with pytest.raises(InputDataError, match="inside the input folder"):
        ReviewSession.open(pred / "s", data, predictions=pred, reviewer="A")
    assert not (data / "reviews").exists() and not (pred / "s").exists()
    with pytest.raises(ConfigError, match="reviewer"):
        ReviewSession.open(tmp_path / "nobody", data, predictions=pred, reviewer=" ")
    with pytest.raises(ConfigError, match="predictions folder .* a model"):
        ReviewSession.open(tmp_path / "nothing", data, reviewer="A")


def test_concurrent_review_saves_one_winner_per_target(tmp_path, dataset):
    data, pred = dataset
    volume = load_volume(pred / "Phantom_00300.nii.gz")
    labels = [volume.data, paint(volume.data, 10)]
    outcomes = []
    trials = 20
    for trial in range(trials):
        out = tmp_path / f"t{trial}"
        barrier = threading.Barrier(2)
        results: list = [None, None]

        def save(i, out=out, barrier=barrier, results=results):
            barrier.wait()
            try:
                results[i] = save_review(labels[i], volume.source, out, case_id="c",
                                         reviewer=f"R{i}", decision="accepted",
                                         label_convention="brats2020")
            except FileExistsError as err:
                results[i] = err

        threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [i for i in range(2) if not isinstance(results[i], FileExistsError)]
        assert len(won) == 1, results
        records = read_reviews(out / REVIEW_LOG)
        assert len(records) == 1 and records[0]["reviewer"] == f"R{won[0]}"
        assert np.array_equal(load_volume(out / "c.nii.gz").data, labels[won[0]])
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp left
        outcomes.append(won[0])
    print(f"\n{trials} trials of two concurrent saves: exactly one success each "
          f"(winner 0: {outcomes.count(0)}, winner 1: {outcomes.count(1)})")


def test_failed_append_leaves_no_mask_without_record(tmp_path, dataset, monkeypatch):
    _, pred = dataset
    volume = load_volume(pred / "Phantom_00300.nii.gz")
    out = tmp_path / "out"
    kwargs = dict(case_id="c", reviewer="A", decision="accepted", label_convention="brats2020")
    save_review(volume.data, volume.source, out, **kwargs)

    def broken(log, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_module, "append_record", broken)
    with pytest.raises(OSError, match="No space left"):
        save_review(volume.data, volume.source, out, **{**kwargs, "case_id": "d"})
    assert not (out / "d.nii.gz").exists()
    edited = paint(volume.data, 7)
    with pytest.raises(OSError, match="No space left"):
        save_review(edited, volume.source, out, overwrite=True, **kwargs)
    assert np.array_equal(load_volume(out / "c.nii.gz").data, volume.data)  # put back
    assert sorted(p.name for p in out.iterdir()) == ["c.nii.gz", REVIEW_LOG]


def test_summary_and_inter_reader_dice_match_an_independent_computation(tmp_path, dataset):
    a = open_session(tmp_path, dataset, "A", reviewer="Dr A")
    decide_all(a)
    b = open_session(tmp_path, dataset, "B", reviewer="Dr B")
    for i, case_id in enumerate(b.case_ids):  # B corrects more, and accepts case 4
        case = b.load(case_id)
        if i in (0, 4):
            b.decide(case, "accepted")
        else:
            b.decide(case, "corrected", label=paint(case.model_label, 120, value=1, skip=60))
    assert main(["review-summary", str(tmp_path / "A")]) == 0
    rows = list(csv.DictReader((tmp_path / "A" / SUMMARY_CSV).open()))
    assert [r["decision"] for r in rows] == ["accepted"] * 2 + ["corrected"] * 2 + ["rejected"]
    for row in rows[:4]:
        model = load_volume(dataset[1] / f"{row['case_id']}.nii.gz").data
        final = load_volume(tmp_path / "A" / f"{row['case_id']}.nii.gz").data
        assert int(row["changed_voxels"]) == int(np.count_nonzero(model != final))
        for region, values in REGIONS.items():
            assert float(row[f"dice_{region}"]) == pytest.approx(
                region_dice(model, final, values), abs=1e-4)
    assert rows[4]["dice_WT"] == "" and rows[4]["reason"] == "artefact"
    assert all(float(r["seconds"]) >= 0 and r["reviewer"] == "Dr A" for r in rows)
    md = (tmp_path / "A" / SUMMARY_MD).read_text()
    assert "| accepted | 2 |" in md and "| corrected | 2 |" in md and "| rejected | 1 |" in md
    assert "5 / 5 reviewed" in md and "Dr A" in md and f"]({SUMMARY_PNG})" in md
    assert (tmp_path / "A" / SUMMARY_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["review-summary", str(tmp_path / "A")]) == 2  # exists: refused
    assert main(["review-summary", str(tmp_path / "A"), "--overwrite"]) == 0

    out = tmp_path / "both"
    assert main(["review-summary", str(tmp_path / "A"), str(tmp_path / "B"),
                 "--out", str(out)]) == 0
    inter = list(csv.DictReader((out / INTER_READER_CSV).open()))
    assert len(inter) == 5
    for row in inter:
        if row["decision_a"] == "rejected":
            assert row["dice_WT"] == "" and row["decision_b"] == "accepted"
            continue
        mask_a = load_volume(tmp_path / "A" / f"{row['case_id']}.nii.gz").data
        mask_b = load_volume(tmp_path / "B" / f"{row['case_id']}.nii.gz").data
        for region, values in REGIONS.items():
            assert float(row[f"dice_{region}"]) == pytest.approx(
                region_dice(mask_a, mask_b, values), abs=1e-4)
    assert "Inter-reader agreement: `A` vs `B`" in (out / SUMMARY_MD).read_text()
    assert len(list(csv.DictReader((out / SUMMARY_CSV).open()))) == 10


def test_export_is_a_dataset_discover_cases_reads(tmp_path, dataset):
    data, _ = dataset
    session = open_session(tmp_path, dataset)
    decide_all(session)
    before = tree_hash(data)
    out = tmp_path / "exported"
    assert main(["review-export", str(tmp_path / "session"), "--out", str(out),
                 "--link", "hardlink"]) == 0
    cases = discover_cases(out)
    assert [c.case_id for c in cases] == session.case_ids[:4]  # accepted + corrected
    for case in cases:
        assert case.layout == "brats2020" and case.modalities == ("flair", "t1", "t1ce", "t2")
        original = data / case.case_id / f"{case.case_id}_flair.nii.gz"
        assert case.images["flair"].stat().st_ino == original.stat().st_ino  # hard link
        final = load_volume(session.mask_path(case.case_id))
        exported = load_volume(case.label)
        assert np.array_equal(exported.data, final.data)
        assert np.array_equal(nib.load(case.label).affine, nib.load(original).affine)
    info = json.loads((out / "review_export.json").read_text())
    assert info["cases"] == dict(zip(session.case_ids[:4], ["accepted"] * 2 + ["corrected"] * 2,
                                     strict=True))
    assert tree_hash(data) == before
    assert main(["review-export", str(tmp_path / "session"), "--out", str(out)]) == 2
    assert main(["review-export", str(tmp_path / "session"), "--out",
                 str(data / "exported")]) == 2

    manifest = review_export(tmp_path / "session", tmp_path / "as_copy")
    assert manifest.link == "copy" and manifest.dataset == tmp_path / "as_copy"
    copied = discover_cases(manifest.dataset)[0].images["t2"]
    assert copied.read_bytes() == (data / copied.parent.name / copied.name).read_bytes()


def test_fine_tune_the_demo_on_an_exported_session(tmp_path, dataset, one_torch_thread):
    from safetensors.torch import load_file

    from ciml_core.checkpoint import DEMO_CHECKPOINT

    session = open_session(tmp_path, dataset)
    decide_all(session)
    exported = review_export(tmp_path / "session", tmp_path / "exported").dataset
    demo = ["--width", "8", "--patch", "48", "--variant", "full", "--norm", "batch"]
    tiny = ["--epochs", "1", "--iters-per-epoch", "2", "--batch", "1", "--workers", "0",
            "--device", "cpu", "--fold", "-1", "--bn-recalibration", "0"]
    run = tmp_path / "run"
    assert main(["train", str(exported), "--out", str(run), "--init", "demo", *demo, *tiny]) == 0
    start = load_file(str(DEMO_CHECKPOINT / "model.safetensors"))
    tuned = load_file(str(run / "latest" / "model.safetensors"))
    assert set(tuned) == set(start)
    moved = max(float((tuned[k].float() - start[k].float()).abs().max()) for k in start
                if start[k].is_floating_point() and "running" not in k)
    assert 0 < moved < 0.05  # two small steps from the demo's weights, not from scratch
    # another width: refused before training, naming the difference
    assert main(["train", str(exported), "--out", str(tmp_path / "bad"), "--init", "demo",
                 "--width", "4", "--patch", "48", "--variant", "full", "--norm", "batch",
                 *tiny]) == 2
    assert not (tmp_path / "bad" / "latest").exists()


def test_manifest_session_exports_a_manifest(tmp_path, dataset):
    data, pred = dataset
    rows = ["case_id,flair,t1,t1ce,t2"]
    for case in discover_cases(data)[:2]:
        rows.append(",".join([case.case_id, *[str(case.images[m]) for m in
                                              ("flair", "t1", "t1ce", "t2")]]))
    manifest = tmp_path / "lists" / "cases.csv"
    manifest.parent.mkdir()
    manifest.write_text("\n".join(rows) + "\n")
    session = ReviewSession.open(tmp_path / "s", manifest, predictions=pred, reviewer="A",
                                 label_convention="brats2020")
    assert session.meta["layout"] == "manifest" and len(session.cases) == 2
    assert any("3 prediction(s)" in w and "match no case" in w for w in session.warnings)
    first, second = (session.load(c) for c in session.case_ids)
    session.decide(first, "accepted")
    session.decide(second, "corrected", label=paint(second.model_label, 9))
    result = review_export(tmp_path / "s", tmp_path / "out", link="symlink")
    assert result.dataset == tmp_path / "out" / "manifest.csv" and result.link == "symlink"
    cases = discover_cases(result.dataset)
    assert [c.case_id for c in cases] == session.case_ids
    for case in cases:
        assert case.images["t1"].is_symlink() and case.images["t1"].resolve().is_relative_to(data)
        assert np.array_equal(load_volume(case.label).data,
                              load_volume(session.mask_path(case.case_id)).data)
