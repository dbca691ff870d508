"""Complementary weights: the paper's Fig. 18 as an embedded chart.

One group of bars per (primary modality : region) pair, one bar per auxiliary modality, height =
the complementary-information weight w (Eq. 16-17, computed by ciml_core.explain; the bars of a
pair sum to 1). The chart is :func:`ciml_core.figures.draw_weights_chart`, the one
``ciml-core explain`` saves, in napari's theme. It redraws whenever the Explain widget publishes
results in the viewer's session and exports PNG and CSV (the CSV is
:func:`ciml_core.explain.weights_table`, the same rows ``ciml-core explain`` writes).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from ciml_core.explain import weights_table
from ciml_core.figures import draw_weights_chart
from napari_ciml._widgets._common import CimlWidget, notify_error, notify_info


class WeightsWidget(CimlWidget):
    """Dock widget: grouped bar chart of the complementary weights, PNG / CSV export."""

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        self.explanations: list[Any] = []
        self.case_id: str | None = None
        layout = QVBoxLayout(self)
        # matplotlib's object API only (no pyplot): no global figure state inside napari.
        self.figure = Figure(figsize=(5.0, 3.4), dpi=100, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(260)
        self.ax = self.figure.add_subplot()
        layout.addWidget(self.canvas, 1)
        self.hint = QLabel("Run Explain to see the weights of each pair.")
        self.hint.setWordWrap(True)
        layout.addWidget(self.hint)
        buttons = QHBoxLayout()
        self.png_button = QPushButton("Export PNG…")
        self.png_button.clicked.connect(self._ask_png)
        self.csv_button = QPushButton("Export CSV…")
        self.csv_button.clicked.connect(self._ask_csv)
        buttons.addWidget(self.png_button)
        buttons.addWidget(self.csv_button)
        layout.addLayout(buttons)
        self.session.explanations_changed.connect(self._on_explanations)
        napari_viewer.events.theme.connect(self._on_theme)
        self.update_chart(self.session.explanations, self.session.explanation_case)

    # ------------------------------------------------------------------ chart
    def _theme(self) -> dict[str, str]:
        from napari.utils.theme import get_theme

        theme = get_theme(self.viewer.theme)
        return {"background": theme.background.as_hex(), "text": theme.text.as_hex(),
                "grid": theme.highlight.as_hex(), "panel": theme.foreground.as_hex()}

    def _on_explanations(self, explanations: list[Any]) -> None:
        try:
            self.update_chart(explanations, self.session.explanation_case)
        except RuntimeError:  # the widget was closed; its canvas is gone
            pass

    def _on_theme(self, _event=None) -> None:
        try:
            self.update_chart(self.explanations, self.case_id)
        except RuntimeError:
            pass

    def update_chart(self, explanations: list[Any], case_id: str | None = None) -> None:
        """Redraw: one bar group per pair, one bar per auxiliary modality."""
        self.explanations, self.case_id = list(explanations), case_id
        self.hint.setVisible(not self.explanations)
        if self.explanations:
            draw_weights_chart(self.ax, self.explanations, title=(
                f"{case_id}: complementary information weights" if case_id else None))
        else:
            self.ax.clear()
            self.ax.set_ylim(0, 1)
            self.ax.set_xticks([])
        self._apply_theme()
        self.canvas.draw_idle()

    def _apply_theme(self) -> None:
        """napari's colours and a dock's font sizes on the chart as drawn."""
        colors = self._theme()
        ax = self.ax
        self.figure.set_facecolor(colors["background"])
        ax.set_facecolor(colors["panel"])
        for spine in ax.spines.values():
            spine.set_color(colors["text"])
        ax.tick_params(colors=colors["text"], labelsize=8)
        ax.yaxis.grid(True, color=colors["grid"], linewidth=0.5, alpha=0.6)
        ax.set_axisbelow(True)
        ax.xaxis.label.set_fontsize(9)
        ax.yaxis.label.set_fontsize(9)
        ax.title.set_fontsize(10)
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        legend = ax.get_legend()
        if legend is not None:
            texts += [*legend.get_texts(), legend.get_title()]
        for text in texts:
            text.set_color(colors["text"])

    def bar_groups(self) -> list[list[float]]:
        """The drawn bar heights, one list per pair (what the chart shows, for checks)."""
        return [[patch.get_height() for patch in container] for container in self.ax.containers]

    # ------------------------------------------------------------------ export
    def export_png(self, path: str | Path, dpi: int = 150) -> Path:
        """Save the chart as PNG (the theme's background kept)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(path, dpi=dpi, facecolor=self.figure.get_facecolor())
        return path

    def export_csv(self, path: str | Path) -> Path:
        """Save one row per pair and auxiliary modality (case, pair, ..., weight, heat_sum)."""
        if not self.explanations:
            raise ValueError("no weights to export yet: run Explain first")
        rows = weights_table(self.explanations, self.case_id or "")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def _ask_png(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export chart", "weights.png", "PNG (*.png)")
        if path:
            self._export(self.export_png, path)

    def _ask_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export weights", "weights.csv",
                                              "CSV (*.csv)")
        if path:
            self._export(self.export_csv, path)

    @staticmethod
    def _export(func, path: str) -> None:
        try:
            notify_info(f"CIML: wrote {func(path)}")
        except (ValueError, OSError) as err:
            notify_error(err)
