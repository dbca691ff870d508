"""Screenshots of the napari-ciml widgets in use, for docs/plugin.md and the README.

Run under a virtual display (nothing is downloaded; the sample case is generated and the bundled
demo model segments it)::

    xvfb-run -a python scripts/screenshots.py [--out docs/screenshots]

Writes segment.png, explain.png, weights.png (the whole window with the widget docked),
weights_chart.png (the chart's own PNG export), review.png, review_session.png (a review
session over four phantom cases, part-way through) and review_summary.png (that session's
summary plot). ``--only review_session`` takes the last two alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def wait(widget, app, timeout: float = 600.0) -> None:
    """Process Qt events until the widget's background run (and its display steps) is over."""
    deadline = time.monotonic() + timeout
    while widget.busy:
        app.processEvents()
        time.sleep(0.01)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{type(widget).__name__} did not finish in {timeout} s")
    for _ in range(20):  # let the canvas redraw
        app.processEvents()
        time.sleep(0.01)


def settle(app, seconds: float = 0.5) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def review_session_shots(out: Path) -> list[Path]:
    """A review session over four phantom cases (predicted by the demo model): two decided,
    the third on screen with a correction painted; then its summary plot."""
    import shutil

    import napari
    from qtpy.QtWidgets import QApplication

    from ciml_core.cli import main as cli
    from ciml_core.data.phantoms import write_phantom_dataset
    from ciml_core.review.summary import write_summary

    tmp = Path(tempfile.mkdtemp(prefix="ciml-review-shots-"))
    try:
        write_phantom_dataset("brats", 4, tmp / "cases", seed=7000)
        assert cli(["predict", str(tmp / "cases"), "--out", str(tmp / "pred")]) == 0
        viewer = napari.Viewer(title="napari-ciml", show=True)
        app = QApplication.instance()
        viewer.window.resize(1500, 950)
        dock, widget = viewer.window.add_plugin_dock_widget("napari-ciml", "Review session")
        dock.setMinimumWidth(430)
        widget.folder_edit.setText(str(tmp / "session"))
        widget.dataset_edit.setText(str(tmp / "cases"))
        widget.predictions_edit.setText(str(tmp / "pred"))
        widget.model_edit.setText("demo")
        widget.reviewer_edit.setText("Dr. A. Reviewer")
        widget.open_session()

        def on_screen(case_id: str) -> None:
            deadline = time.monotonic() + 120
            while widget.current is None or widget.current_id != case_id:
                app.processEvents()
                time.sleep(0.01)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"case {case_id} did not load")

        ids = widget.review.case_ids
        on_screen(ids[0])
        viewer.dims.order = (2, 1, 0)  # axial, radiological convention as above
        viewer.scene.camera.orientation2d = ("up", "left")
        widget.accept_and_next()
        on_screen(ids[1])
        widget.reject("artefact")
        on_screen(ids[2])
        layer = viewer.layers[f"{ids[2]} review"]
        layer.contour = 2
        z = int(viewer.dims.current_step[2])  # the axial slice shown (centred on the tumour)
        found = np.argwhere(layer.data[:, :, z] > 0)
        centre = found.mean(axis=0).round().astype(int)
        x0 = int(found[:, 0].max())
        stroke = (slice(x0 - 1, x0 + 5), slice(centre[1] - 4, centre[1] + 5), slice(z - 2, z + 3))
        layer.data[stroke] = np.where(layer.data[stroke] == 0, 2, layer.data[stroke])
        layer.refresh()
        for name in ("t1", "t1ce", "t2"):
            viewer.layers[name].visible = False
        widget.note_edit.setText("oedema extended laterally")
        viewer.reset_view()
        settle(app, 1.0)
        shots = [out / "review_session.png"]
        viewer.screenshot(str(shots[0]), canvas_only=False, flash=False)
        widget.save_correction_and_next()
        on_screen(ids[3])
        widget.accept_and_next()
        summary = write_summary([tmp / "session"], tmp / "summary")
        shots.append(out / "review_summary.png")
        shutil.copyfile(summary[2], shots[1])
        viewer.close()
        return shots
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--only", choices=["review_session"],
                        help="take only these screenshots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only == "review_session":
        for path in review_session_shots(args.out):
            print(path)
        return

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari-ciml", show=True)
    app = QApplication.instance()
    viewer.window.resize(1500, 950)
    viewer.open_sample("napari-ciml", "glioma")
    # Axial slices in radiological convention: anterior up, patient's right on the left.
    viewer.dims.order = (2, 1, 0)
    viewer.scene.camera.orientation2d = ("up", "left")
    label = viewer.layers["Phantom_00000 label"].data
    centre = [int(round(c)) for c in np.argwhere(label > 0).mean(axis=0)]
    viewer.dims.current_step = tuple(centre)
    viewer.layers["Phantom_00000 label"].visible = False
    viewer.reset_view()

    # 1. Segment
    seg_dock, seg = viewer.window.add_plugin_dock_widget("napari-ciml", "Segment")
    seg.prob_check.setChecked(True)
    seg.run()
    wait(seg, app)
    viewer.layers.selection.active = viewer.layers["Phantom_00000 CIML"]
    settle(app)
    viewer.screenshot(str(args.out / "segment.png"), canvas_only=False, flash=False)

    # 2. Explain (all pairs; the first pair's maps are shown)
    seg_dock.hide()
    ex_dock, explain = viewer.window.add_plugin_dock_widget("napari-ciml", "Explain")
    explain.set_pair("all")
    explain.run()
    wait(explain, app)
    viewer.layers["Phantom_00000 CIML"].visible = False
    shown = [layer for layer in explain.heatmap_layers() if layer.visible][0]
    for name in ("flair", "t1", "t1ce", "t2"):  # the map over its own auxiliary modality
        image = viewer.layers[name]
        image.visible = name == shown.metadata["auxiliary"]
        if image.visible:  # darker grey, so that the additive heat stands out
            low, high = image.contrast_limits
            image.contrast_limits = (low, low + 2.2 * (high - low))
    viewer.layers.selection.active = shown
    settle(app)
    viewer.screenshot(str(args.out / "explain.png"), canvas_only=False, flash=False)

    # 3. Complementary weights
    ex_dock.hide()
    w_dock, weights = viewer.window.add_plugin_dock_widget("napari-ciml", "Complementary weights")
    w_dock.setMinimumWidth(620)
    settle(app, 1.0)
    viewer.screenshot(str(args.out / "weights.png"), canvas_only=False, flash=False)
    weights.export_png(args.out / "weights_chart.png")

    # 4. Review: a correction painted, metrics against the reference
    w_dock.hide()
    for layer in explain.heatmap_layers():
        layer.visible = False
    for name in ("flair", "t1", "t1ce", "t2"):
        viewer.layers[name].visible = name == "flair"
    result = viewer.layers["Phantom_00000 CIML"]
    result.visible = True
    result.contour = 2  # outline, so the image under it stays readable
    _, review = viewer.window.add_plugin_dock_widget("napari-ciml", "Review")
    z = centre[2]
    result.data[centre[0] - 3:centre[0] + 3, centre[1] - 3:centre[1] + 3, z - 1:z + 2] = 1
    result.refresh()
    viewer.layers.selection.active = result
    review.select("Phantom_00000 CIML", "Phantom_00000 label")
    review.correct_radio.setChecked(True)
    review.reviewer_edit.setText("Dr. A. Reviewer")
    review.note_edit.setText("necrotic core extended")
    with tempfile.TemporaryDirectory() as tmp:
        review.out_edit.setText(str(Path(tmp) / "reviews"))
        review.save()
        settle(app)
        viewer.screenshot(str(args.out / "review.png"), canvas_only=False, flash=False)
    viewer.close()
    for name in ("segment", "explain", "weights", "weights_chart", "review"):
        print(args.out / f"{name}.png")
    for path in review_session_shots(args.out):
        print(path)


if __name__ == "__main__":
    main()
