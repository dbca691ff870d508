"""The Review-session widget under Xvfb: a whole phantom dataset reviewed by keyboard, drafts
that survive SIGKILL, next-case latency with prefetch, no layer pile-up or memory growth over a
40-case session (issue 13)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from qtpy.QtWidgets import QApplication

from ciml_core.cli import main
from ciml_core.data.nifti import load_volume
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.review import REVIEW_LOG, ReviewSession, read_reviews
from napari_ciml._widgets.review_session import SESSION_LAYER, SESSION_SHORTCUTS
from test_review_session import write_predictions

ACCEPT, CORRECT, REJECT, SKIP = ("Control-Alt-A", "Control-Alt-S", "Control-Alt-R",
                                 "Control-Alt-K")
LOAD_TIMEOUT_MS = 300_000  # a fail-safe: a busy 2-core CI machine may starve the worker


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """Five 48x48x32 phantom cases and their segmentation by `ciml-core predict` (demo model)."""
    root = tmp_path_factory.mktemp("session_widget")
    write_phantom_dataset("brats", 5, root / "data", seed=400, shape=(48, 48, 32))
    # native spacing (4 mm): the demo runs one window per case instead of resampling to 1 mm
    assert main(["predict", str(root / "data"), "--out", str(root / "pred"),
                 "--device", "cpu", "--native-spacing"]) == 0
    return root / "data", root / "pred"


def open_widget(viewer, qtbot, folder: Path, dataset=None, predictions=None, model=None,
                reviewer: str | None = "Dr Rivera"):
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-ciml", "Review session")
    asked: list[str] = []
    widget.ask = lambda question: asked.append(question) or True
    widget.folder_edit.setText(str(folder))
    for edit, value in ((widget.dataset_edit, dataset), (widget.predictions_edit, predictions),
                        (widget.model_edit, model), (widget.reviewer_edit, reviewer)):
        edit.setText("" if value is None else str(value))
    with qtbot.waitSignal(widget.case_shown, timeout=LOAD_TIMEOUT_MS):
        assert widget.open_session(), widget.last_error
    return widget, asked


def press(viewer, key: str) -> None:
    """A key press through napari's own keymap dispatch (active layer, then viewer)."""
    handler = viewer.window._qt_viewer._key_map_handler
    assert handler.press_key(key), key
    handler.release_key(key)


def decide_by_key(qtbot, viewer, widget, key: str) -> None:
    """Press ``key`` and wait for the next case (or the end) to be on screen; an error shown to
    the user fails at once."""
    widget.last_error = None
    shown: list[str] = []
    widget.case_shown.connect(shown.append)
    try:
        press(viewer, key)
        qtbot.waitUntil(lambda: bool(shown or widget.last_error), timeout=LOAD_TIMEOUT_MS)
    finally:
        widget.case_shown.disconnect(shown.append)
    assert widget.last_error is None, widget.last_error


def wait_on_screen(qtbot, widget, case_id: str) -> None:
    qtbot.waitUntil(lambda: widget.current is not None and widget.current_id == case_id,
                    timeout=LOAD_TIMEOUT_MS)


def session_layers(viewer) -> list:
    return [layer for layer in viewer.layers if layer.metadata.get(SESSION_LAYER)]


def paint_strokes(layer, value: int = 2) -> None:
    """Brush strokes beside the segmentation, on the slice shown (napari's own paint)."""
    layer.selected_label = value
    layer.brush_size = 3
    found = np.argwhere(layer.data > 0)
    centre = found.mean(axis=0).round().astype(int)
    extent = found.max(axis=0)
    for dx in (2, 3, 4):
        coord = [min(int(extent[0]) + dx, layer.data.shape[0] - 2), int(centre[1]),
                 int(centre[2])]
        layer.paint(coord, value)


def test_session_shortcuts_do_not_clash(make_napari_viewer):
    from app_model.types import KeyBinding
    from napari._app_model import get_app_model
    from napari.layers import Image, Labels, Points, Shapes
    from napari.utils.key_bindings import coerce_keybinding
    from napari.utils.shortcuts import default_shortcuts

    from napari_ciml._shortcuts import SHORTCUTS

    ours = {coerce_keybinding(k) for k in SESSION_SHORTCUTS}
    assert len(ours) == len(SESSION_SHORTCUTS) == 7
    taken = {kb for kbs in default_shortcuts.values() for kb in kbs}
    taken |= {KeyBinding.validate(rule.keybinding) for rule in get_app_model().keybindings}
    for cls in (Image, Labels, Shapes, Points):
        taken |= set(cls.class_keymap)
    taken |= {coerce_keybinding(k) for k in SHORTCUTS}
    assert not ours & taken
    viewer = make_napari_viewer()
    viewer.window.add_plugin_dock_widget("napari-ciml", "Review session")
    assert ours <= set(viewer.keymap)


def test_five_case_session_through_the_widget(make_napari_viewer, qtbot, predicted, tmp_path):
    data, pred = predicted
    folder = tmp_path / "session"
    viewer = make_napari_viewer()
    widget, asked = open_widget(viewer, qtbot, folder, data, pred)
    ids = widget.review.case_ids
    assert ids == [f"Phantom_{i:05d}" for i in range(400, 405)] and asked == []
    assert widget.progress_text() == "0 / 5 reviewed"
    assert widget.case_list.count() == 5 and "to do" in widget.case_list.item(0).text()

    painted: dict[str, np.ndarray] = {}
    keys = [ACCEPT, ACCEPT, CORRECT, CORRECT, REJECT]
    for i, case_id in enumerate(ids):
        wait_on_screen(qtbot, widget, case_id)
        layers = session_layers(viewer)
        assert [x.name for x in layers] == ["flair", "t1", "t1ce", "t2", f"{case_id} review"]
        assert len(viewer.layers) == 5  # replaced, not piled up
        layer = viewer.layers[f"{case_id} review"]
        model = load_volume(pred / f"{case_id}.nii.gz").data
        assert np.array_equal(layer.data, model)
        assert np.array_equal(layer.scale, viewer.layers["flair"].scale)
        if keys[i] == CORRECT:
            paint_strokes(layer)
            assert np.count_nonzero(layer.data != model) > 0
            painted[case_id] = np.array(layer.data)
        if keys[i] == REJECT:
            widget.reason_combo.setCurrentText("not a tumour case")
        decide_by_key(qtbot, viewer, widget, keys[i])
        assert widget.progress_text() == f"{i + 1 if keys[i] != SKIP else i} / 5 reviewed"
    assert widget.current_id is None and session_layers(viewer) == []
    assert "No case left to review: 5 / 5 reviewed" in widget.case_label.text()

    records = read_reviews(folder / REVIEW_LOG)
    assert [r["decision"] for r in records] == ["accepted"] * 2 + ["corrected"] * 2 + ["rejected"]
    assert [r["case_id"] for r in records] == ids and records[4]["reason"] == "not a tumour case"
    for record in records:
        assert record["reviewer"] == "Dr Rivera" and record["seconds"] > 0
    assert records[0]["changed_voxels"] == records[1]["changed_voxels"] == 0
    assert records[4]["changed_voxels"] is None and records[4]["output"] == ""
    for record in records[:4]:
        case_id = record["case_id"]
        model = load_volume(pred / f"{case_id}.nii.gz").data
        final = painted.get(case_id, model)
        assert record["changed_voxels"] == int(np.count_nonzero(final != model))
        saved = nib.load(folder / f"{case_id}.nii.gz")
        flair = nib.load(data / case_id / f"{case_id}_flair.nii.gz")
        assert np.array_equal(saved.affine, flair.affine)  # the input's affine
        assert np.array_equal(nib.as_closest_canonical(saved).get_fdata().astype(np.uint8), final)
    assert records[2]["changed_voxels"] > 0 and records[2]["dice_vs_model"]["WT"] < 1.0

    # re-opening the folder: nothing left to do, 5 / 5
    again = make_napari_viewer()
    reopened, asked = open_widget(again, qtbot, folder, reviewer=None)
    assert reopened.current_id is None and reopened.progress_text() == "5 / 5 reviewed"
    assert list(reopened.case_statuses().values()) == ["accepted"] * 2 + ["corrected"] * 2 + [
        "rejected"]
    assert session_layers(again) == [] and asked == []
    paths = reopened.write_summary()
    assert paths is not None and paths[0].read_text().count("\n") == 6


def test_bad_input_is_marked_in_the_list(make_napari_viewer, qtbot, predicted, tmp_path):
    data, pred = predicted
    partial = tmp_path / "partial"
    partial.mkdir()
    for p in sorted(pred.glob("*.nii.gz"))[1:]:  # the first case has no prediction
        (partial / p.name).write_bytes(p.read_bytes())
    viewer = make_napari_viewer()
    widget, _ = open_widget(viewer, qtbot, tmp_path / "s", data, partial)
    first = widget.review.case_ids[0]
    assert widget.current_id == first and widget.current.model_label is None
    assert widget.case_list.item(0).text().startswith("⚠") and "no prediction" in \
        widget.case_list.item(0).toolTip()
    assert "no prediction Phantom_00400.nii.gz" in widget.case_label.text()
    assert widget.accept_and_next() is None and "no model output to accept" in widget.last_error
    with qtbot.waitSignal(widget.case_shown, timeout=LOAD_TIMEOUT_MS):
        assert widget.reject("other") is not None
    assert widget.progress_text() == "1 / 5 reviewed"


def test_edits_follow_the_case_when_navigating(make_napari_viewer, qtbot, predicted, tmp_path):
    data, pred = predicted
    viewer = make_napari_viewer()
    widget, asked = open_widget(viewer, qtbot, tmp_path / "s", data, pred)
    first, second = widget.review.case_ids[:2]
    paint_strokes(viewer.layers[f"{first} review"])
    edited = np.array(viewer.layers[f"{first} review"].data)
    draft = widget.review.draft_paths(first)[0]
    assert not draft.exists()
    press(viewer, "Control-Alt-PageDown")  # case change: the draft is written at once
    wait_on_screen(qtbot, widget, second)
    assert np.array_equal(load_volume(draft).data, edited)
    assert len(viewer.layers) == 5
    press(viewer, "Control-Alt-PageUp")
    wait_on_screen(qtbot, widget, first)
    assert np.array_equal(viewer.layers[f"{first} review"].data, edited) and asked == []
    assert "draft restored" in widget.case_label.text()
    decide_by_key(qtbot, viewer, widget, CORRECT)
    assert not draft.exists() and widget.current_id == second
    # an accepted case shown again: deciding anew asks first, and a refusal keeps the record
    decide_by_key(qtbot, viewer, widget, ACCEPT)
    press(viewer, "Control-Alt-PageUp")
    wait_on_screen(qtbot, widget, second)
    widget.ask = lambda question: asked.append(question) and False
    press(viewer, SKIP)
    assert "already accepted" in asked[-1] and widget.case_statuses()[second] == "accepted"
    assert len(read_reviews(tmp_path / "s" / REVIEW_LOG)) == 2


def test_draft_survives_sigkill(make_napari_viewer, qtbot, predicted, tmp_path):
    data, pred = predicted
    folder = tmp_path / "session"
    ReviewSession.open(folder, data, predictions=pred, reviewer="Dr Rivera")
    edited_file = tmp_path / "edited.npy"
    script = f"""
import sys, time
import numpy as np
import napari
from qtpy.QtWidgets import QApplication
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_review_session_widget import paint_strokes
viewer = napari.Viewer(show=False)
_, widget = viewer.window.add_plugin_dock_widget("napari-ciml", "Review session")
widget.autosave_timer.setInterval(200)
widget.folder_edit.setText({str(folder)!r})
assert widget.open_session(), widget.last_error
app = QApplication.instance()
while widget.current is None:
    app.processEvents(); time.sleep(0.01)
layer = viewer.layers[widget.current_id + " review"]
paint_strokes(layer, value=1)
np.save({str(edited_file)!r}, np.asarray(layer.data))
draft = widget.review.draft_paths(widget.current_id)[0]
while not draft.exists():
    app.processEvents(); time.sleep(0.02)
print("draft saved", widget.current_id, flush=True)
while True:  # a reviewer still at work, never pressing save
    app.processEvents(); time.sleep(0.05)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = proc.stdout.readline()
        assert line.startswith("draft saved"), line + proc.stderr.read()
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    case_id = line.split()[-1]
    edited = np.load(edited_file)
    assert not (folder / REVIEW_LOG).exists() and not (folder / f"{case_id}.nii.gz").exists()
    assert not [p for p in (folder / "drafts").iterdir() if p.name.startswith(".")]

    viewer = make_napari_viewer()
    widget, asked = open_widget(viewer, qtbot, folder, reviewer=None)
    assert widget.current_id == case_id
    assert len(asked) == 1 and f"Case {case_id} has a draft autosaved" in asked[0]
    layer = viewer.layers[f"{case_id} review"]
    assert np.array_equal(layer.data, edited)  # the edits, intact
    model = load_volume(pred / f"{case_id}.nii.gz").data
    decide_by_key(qtbot, viewer, widget, CORRECT)
    record = read_reviews(folder / REVIEW_LOG)[0]
    assert record["decision"] == "corrected"
    assert record["changed_voxels"] == int(np.count_nonzero(edited != model)) > 0
    assert not (folder / "drafts" / f"{case_id}.nii.gz").exists()


def test_next_case_latency_with_prefetch(make_napari_viewer, qtbot, tmp_path):
    data = tmp_path / "data"
    write_phantom_dataset("brats", 4, data, seed=500, shape=(96, 96, 64))
    pred = write_predictions(data, tmp_path / "pred")
    viewer = make_napari_viewer()
    widget, _ = open_widget(viewer, qtbot, tmp_path / "session", data, pred)
    ids = widget.review.case_ids
    timings, cpu = [], []
    for i in range(3):
        wait_on_screen(qtbot, widget, ids[i])
        # the reviewer looks at the case while the next one is prefetched
        qtbot.waitUntil(lambda i=i: ids[i + 1] in widget._cache, timeout=LOAD_TIMEOUT_MS)
        qtbot.wait(100)
        gc.collect()
        start, start_cpu = time.perf_counter(), time.thread_time()
        with qtbot.waitSignal(widget.case_shown, timeout=LOAD_TIMEOUT_MS):
            press(viewer, ACCEPT)
        QApplication.processEvents()  # the canvas draws the new case
        timings.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)  # the GUI thread's own work
        assert widget.current_id == ids[i + 1]
        assert viewer.layers[f"{ids[i + 1]} review"].data.shape == (96, 96, 64)
    wall, work = float(np.median(timings)), float(np.median(cpu))
    print(f"\nnext case on screen (96x96x64, prediction exists, prefetched): "
          f"{', '.join(f'{1000 * t:.0f} ms' for t in timings)} after the key press "
          f"(decision saved, layers replaced, canvas drawn); GUI-thread CPU "
          f"{', '.join(f'{1000 * t:.0f} ms' for t in cpu)}")
    if work / wall < 0.5:  # the machine starved this process (other jobs on 2 cores)
        print(f"starved: the GUI thread ran {100 * work / wall:.0f}% of the wall time; "
              "checking its work instead")
        assert work < 1.0
    else:
        assert wall < 1.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_tiny_cases(root: Path, n: int, shape=(64, 64, 40)) -> tuple[Path, Path]:
    """n small BraTS-layout cases (piecewise constant, fast to write and read) and their
    'predictions' (the label)."""
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    for i in range(n):
        case_id = f"Tiny_{i:03d}"
        folder = root / "data" / case_id
        folder.mkdir(parents=True)
        for k, name in enumerate(("flair", "t1", "t1ce", "t2")):
            image = np.zeros(shape, np.float32)
            image[8:-8, 8:-8, 4:-4] = 100 + 10 * k + i
            image[24:40, 24:40, 14:26] = 300 + k
            nib.save(nib.Nifti1Image(image, affine), folder / f"{case_id}_{name}.nii.gz")
        label = np.zeros(shape, np.uint8)
        label[24:40, 24:40, 14:26] = 2
        label[28:36, 28:36, 18:22] = 1
        nib.save(nib.Nifti1Image(label, affine), folder / f"{case_id}_seg.nii.gz")
        (root / "pred").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(label, affine), root / "pred" / f"{case_id}.nii.gz")
    return root / "data", root / "pred"


def test_forty_cases_no_pile_up_no_memory_growth(make_napari_viewer, qtbot, tmp_path):
    data, pred = write_tiny_cases(tmp_path, 40)
    viewer = make_napari_viewer()
    widget, _ = open_widget(viewer, qtbot, tmp_path / "session", data, pred)
    ids = widget.review.case_ids
    rss = {}
    start = time.perf_counter()
    for i, case_id in enumerate(ids):
        wait_on_screen(qtbot, widget, case_id)
        assert len(viewer.layers) == 5
        if i in (0, len(ids) - 1):
            gc.collect()
            QApplication.processEvents()
            rss[i + 1] = _rss_mb()
        decide_by_key(qtbot, viewer, widget, ACCEPT)
    seconds = time.perf_counter() - start
    assert widget.progress_text() == "40 / 40 reviewed"
    assert len(read_reviews(tmp_path / "session" / REVIEW_LOG)) == 40
    growth = rss[40] - rss[1]
    print(f"\nRSS after case 1: {rss[1]:.0f} MB, after case 40: {rss[40]:.0f} MB "
          f"(growth {growth:+.1f} MB; one case's images are 2.6 MB), {seconds:.1f} s for 40 cases")
    assert growth < 40
