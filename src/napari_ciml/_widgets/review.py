"""Review: metrics against a reference, accept / correct, save the mask and a review record.

The rules (what is written where, what is refused, what the record holds) live in
:mod:`ciml_core.review`; this widget only collects the layers and the reviewer's choices.
Edits are made with napari's own label tools on the CIML layer (the Ctrl+Alt+N / Ctrl+Alt+B
shortcuts show one region at a time and select the value it is painted with).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from ciml_core.data.nifti import NiftiSource
from ciml_core.review import (
    REVIEW_LOG,
    ReviewRecord,
    model_agreement,
    reference_metrics,
    save_review,
)
from napari_ciml._layers import ROLE, layer_source
from napari_ciml._shortcuts import install_shortcuts
from napari_ciml._widgets._common import (
    USER_ERRORS,
    CimlWidget,
    combo_value,
    fill_combo,
    notify_error,
    notify_info,
)


class ReviewWidget(CimlWidget):
    """Dock widget: segmentation + reference -> Dice/HD95 table; decision, reviewer, note; Save."""

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        self.last_record: ReviewRecord | None = None
        self.metrics: dict[str, dict[str, float]] = {}
        self._build_ui()
        self.refresh_layers()
        self.session.prediction_added.connect(self._on_prediction)
        install_shortcuts(napari_viewer)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.label_combo = QComboBox()
        self.label_combo.setToolTip("The segmentation to review (e.g. the CIML result, edited)")
        self.label_combo.currentTextChanged.connect(self.update_metrics)
        form.addRow("Segmentation", self.label_combo)
        self.reference_combo = QComboBox()
        self.reference_combo.setToolTip("A reference label layer (ground truth), if you have one")
        self.reference_combo.currentTextChanged.connect(self.update_metrics)
        form.addRow("Reference", self.reference_combo)
        layout.addLayout(form)

        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Dice", "HD95 (mm)", "Dice vs model"])
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setMinimumHeight(110)
        layout.addWidget(self.table)
        refresh = QPushButton("Refresh metrics")
        refresh.clicked.connect(self.update_metrics)
        layout.addWidget(refresh)
        self.changes_label = QLabel("")
        layout.addWidget(self.changes_label)

        decision = QHBoxLayout()
        self.accept_radio = QRadioButton("Accept")
        self.correct_radio = QRadioButton("Mark corrected")
        self.accept_radio.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.accept_radio)
        group.addButton(self.correct_radio)
        decision.addWidget(self.accept_radio)
        decision.addWidget(self.correct_radio)
        form2 = QFormLayout()
        form2.addRow("Decision", _holder(decision))
        self.reviewer_edit = QLineEdit()
        self.reviewer_edit.setPlaceholderText("your name")
        form2.addRow("Reviewer", self.reviewer_edit)
        self.note_edit = QLineEdit()
        self.note_edit.setPlaceholderText("optional note")
        form2.addRow("Note", self.note_edit)
        out_row = QHBoxLayout()
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("output folder (not the input folder)")
        browse = QPushButton("…")
        browse.setToolTip("Choose the output folder")
        browse.clicked.connect(self._browse)
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(browse)
        form2.addRow("Output", _holder(out_row))
        self.overwrite_check = QCheckBox("Overwrite an earlier saved mask of this case")
        form2.addRow(self.overwrite_check)
        layout.addLayout(form2)
        self.save_button = QPushButton("Save")
        self.save_button.clicked.connect(self.save)
        layout.addWidget(self.save_button)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output folder for reviewed masks")
        if folder:
            self.out_edit.setText(folder)

    # ------------------------------------------------------------------ layers
    def _labels(self) -> list[Labels]:
        return [layer for layer in self.viewer.layers
                if isinstance(layer, Labels) and layer.ndim == 3]

    def refresh_layers(self) -> None:
        labels = self._labels()
        names = [layer.name for layer in labels]
        predictions = [layer.name for layer in labels if layer.metadata.get(ROLE) == "prediction"]
        references = [layer.name for layer in labels if layer.metadata.get(ROLE) != "prediction"
                      and layer.metadata.get("label_convention")]
        current = combo_value(self.label_combo)
        fill_combo(self.label_combo, names,
                   current if current in names else (predictions[-1:] or names[-1:] or [None])[0])
        current_ref = combo_value(self.reference_combo)
        fill_combo(self.reference_combo, names,
                   current_ref if current_ref in names else (references[:1] or [None])[0],
                   allow_none=True)
        self.update_metrics()

    def _on_prediction(self, info) -> None:
        try:
            self.refresh_layers()
            if info.layer_name in self.viewer.layers:
                self.label_combo.setCurrentText(info.layer_name)
        except RuntimeError:  # the widget was closed
            pass

    def select(self, segmentation: str | None = None, reference: str | None = None) -> None:
        """Choose the layers by name (what picking in the combos does)."""
        if segmentation is not None:
            self.label_combo.setCurrentText(segmentation)
        if reference is not None:
            self.reference_combo.setCurrentText(reference)
        self.update_metrics()

    # ------------------------------------------------------------------ metrics
    def _model_output(self, layer: Labels) -> np.ndarray | None:
        info = self.session.predictions.get(layer.metadata.get("ciml_prediction_id"))
        return None if info is None else info.label

    @staticmethod
    def _convention(*layers) -> str | None:
        for layer in layers:
            if layer is not None and layer.metadata.get("label_convention"):
                return layer.metadata["label_convention"]
        return None

    def update_metrics(self, *_args) -> dict[str, dict[str, float]]:
        """Fill the table: Dice/HD95 against the reference and Dice against the model output."""
        self.metrics = {}
        self.table.setRowCount(0)
        name = combo_value(self.label_combo)
        if name is None or name not in self.viewer.layers:
            self.changes_label.setText("")
            return self.metrics
        layer = self.viewer.layers[name]
        ref_name = combo_value(self.reference_combo)
        reference = self.viewer.layers[ref_name] if ref_name in self.viewer.layers else None
        convention = self._convention(layer, reference)
        if convention is None:
            self.changes_label.setText("No label convention known for this layer.")
            return self.metrics
        label = np.asarray(layer.data)
        agreement, changed = {}, None
        model = self._model_output(layer)
        try:
            if reference is not None and reference.name != layer.name:
                self.metrics = reference_metrics(label, np.asarray(reference.data), convention,
                                                 tuple(layer.scale))
            if model is not None:
                agreement, changed = model_agreement(model, label, convention)
        except USER_ERRORS as err:
            self.changes_label.setText(f"Metrics unavailable: {err}")
            return self.metrics
        regions = list(self.metrics or agreement)
        self.table.setRowCount(len(regions))
        self.table.setVerticalHeaderLabels(regions)
        for row, region in enumerate(regions):
            values = self.metrics.get(region, {})
            cells = [values.get("dice"), values.get("hd95"), agreement.get(region)]
            for col, value in enumerate(cells):
                text = "—" if value is None else (f"{value:.3f}" if col != 1 else f"{value:.2f}")
                self.table.setItem(row, col, QTableWidgetItem(text))
        self.changes_label.setText(
            "" if changed is None else f"{changed} voxel(s) differ from the model output")
        return self.metrics

    # ------------------------------------------------------------------ save
    def _source_for(self, layer: Labels) -> NiftiSource:
        """The layer's own source, else that of an input image on the same grid."""
        source = layer_source(layer, synthesise=False)
        if source is not None:
            return source
        for other in self.viewer.layers:
            if isinstance(other, Image) and other.data.shape == layer.data.shape:
                candidate = layer_source(other, synthesise=False)
                if candidate is not None:
                    return candidate
        return layer_source(layer)

    def save(self) -> ReviewRecord | None:
        """Write the mask and append the record; a notification says what happened."""
        try:
            name = combo_value(self.label_combo)
            if name is None or name not in self.viewer.layers:
                raise ValueError("choose the segmentation layer to save")
            out = self.out_edit.text().strip()
            if not out:
                raise ValueError("choose an output folder for the reviewed mask")
            layer = self.viewer.layers[name]
            ref_name = combo_value(self.reference_combo)
            reference = self.viewer.layers[ref_name] if ref_name in self.viewer.layers else None
            if reference is not None and reference.name == layer.name:
                reference = None
            inputs = [p for p in (other.metadata.get("source_path") for other in self.viewer.layers)
                      if p]
            record = save_review(
                np.asarray(layer.data), self._source_for(layer), Path(out).expanduser(),
                case_id=str(layer.metadata.get("case_id") or layer.name),
                reviewer=self.reviewer_edit.text(),
                decision="corrected" if self.correct_radio.isChecked() else "accepted",
                note=self.note_edit.text(),
                model_label=self._model_output(layer),
                model_sha256=layer.metadata.get("model_sha256"),
                label_convention=self._convention(layer, reference),
                reference=None if reference is None else np.asarray(reference.data),
                spacing=tuple(layer.scale),
                inputs=inputs,
                overwrite=self.overwrite_check.isChecked(),
                extra={"layer": layer.name},
            )
        except USER_ERRORS as err:  # FileExistsError is an OSError
            self.status_label.setText(f"Not saved: {err}")
            notify_error(err)
            return None
        self.last_record = record
        log = Path(out).expanduser() / REVIEW_LOG
        self.status_label.setText(f"Saved {record.output}; review appended to {log}")
        if record.decision == "accepted" and record.changed_voxels:
            notify_info(f"CIML: recorded as accepted although {record.changed_voxels} voxel(s) "
                        "differ from the model output")
        else:
            notify_info(f"CIML: saved {record.output}")
        return record


def _holder(layout):
    from qtpy.QtWidgets import QWidget

    holder = QWidget()
    layout.setContentsMargins(0, 0, 0, 0)
    holder.setLayout(layout)
    return holder
