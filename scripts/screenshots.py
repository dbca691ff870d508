"""Screenshots of the napari-ciml widgets in use, for docs/plugin.md and the README.

Run under a virtual display (nothing is downloaded; the sample case is generated and the bundled
demo model segments it)::

    xvfb-run -a python scripts/screenshots.py [--out docs/screenshots]

Writes segment.png, explain.png, weights.png (the whole window with the widget docked),
weights_chart.png (the chart's own PNG export) and review.png.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

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


if __name__ == "__main__":
    main()
