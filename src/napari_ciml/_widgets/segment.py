"""Segment: run a CIML checkpoint on the image layers of a case, in the background.

The widget only gathers choices; ciml_core does the work: the case is built and validated by
:func:`ciml_core.data.dataset.case_from_arrays`, the prediction is
:func:`ciml_core.infer.predict_case`, whose per-window ``progress`` callback both drives the
progress bar and raises :class:`ciml_core.errors.Cancelled` when Cancel was pressed (see
:func:`napari_ciml._widgets._common.run_model_job`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
)

from ciml_core.checkpoint import CheckpointSummary, describe, resolve_checkpoint
from ciml_core.data.dataset import LoadedCase
from ciml_core.data.nifti import NiftiSource
from ciml_core.infer import CasePrediction, InferenceSettings, fitting_convention, predict_case
from ciml_core.runtime import resolve_device
from napari_ciml._layers import (
    REGION_KEY,
    ROLE,
    auto_map,
    case_from_layers,
    image_layers,
    label_colormap,
)
from napari_ciml._session import DEMO, PredictionInfo
from napari_ciml._shortcuts import install_shortcuts
from napari_ciml._widgets._common import (
    USER_ERRORS,
    JobWidget,
    add_device_row,
    add_native_spacing_row,
    combo_value,
    fill_combo,
    find_layer,
    notify_error,
    notify_info,
    replace_or_add_layer,
)

DEMO_TEXT = "Bundled demo model"


@dataclass
class _RunContext:
    """What the GUI thread knew when Run was pressed (the worker never touches layers)."""

    case: LoadedCase
    source: NiftiSource
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    mapping: dict[str, str]
    model_ref: str
    probabilities: bool
    keep_previous: bool
    started: float
    label_convention: str | None  # the dataset's (from the reader), None: the model's


def dataset_labels(convention: str | None, summary) -> str | None:
    """The convention to paint a prediction in: the dataset's (what the reader found, e.g.
    BraTS 2023), when it names the model's regions; None (the model's own) otherwise."""
    if summary is None:
        return None
    return fitting_convention(convention, summary.config.decomposition.regions)


class SegmentWidget(JobWidget):
    """Dock widget: model, modality -> layer mapping, device, overlap, TTA; Run / Cancel."""

    job_title = "CIML segment"

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        self._context: _RunContext | None = None
        self._result: tuple[Any, CasePrediction] | None = None
        self._summary: CheckpointSummary | None = None
        self._combos: dict[str, QComboBox] = {}
        self._build_ui()
        self.set_model(self.session.model_ref)
        install_shortcuts(napari_viewer)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        model_box = QGroupBox("Model")
        model_layout = QVBoxLayout(model_box)
        row = QHBoxLayout()
        self.model_combo = QComboBox()
        self.model_combo.addItem(DEMO_TEXT, DEMO)
        self.model_combo.setToolTip("The bundled demo model, or a checkpoint folder "
                                    "(model.safetensors + config.json)")
        self.model_combo.activated.connect(self._on_model_chosen)
        self.browse_button = QPushButton("Checkpoint…")
        self.browse_button.clicked.connect(self._browse)
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.browse_button)
        model_layout.addLayout(row)
        self.info_label = QLabel()
        self.info_label.setWordWrap(True)
        self.info_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        model_layout.addWidget(self.info_label)
        layout.addWidget(model_box)

        self.mapping_box = QGroupBox("Modality → image layer")
        self.mapping_form = QFormLayout(self.mapping_box)
        layout.addWidget(self.mapping_box)

        options = QFormLayout()
        self.device_combo, self.device_reason = add_device_row(options)
        self.overlap_spin = QDoubleSpinBox()
        self.overlap_spin.setRange(0.0, 0.9)
        self.overlap_spin.setSingleStep(0.05)
        self.overlap_spin.setValue(InferenceSettings().overlap)
        self.overlap_spin.setToolTip("Overlap of neighbouring sliding windows (more = smoother, "
                                     "slower)")
        options.addRow("Overlap", self.overlap_spin)
        self.tta_check = QCheckBox("Test-time mirroring (8× slower)")
        options.addRow(self.tta_check)
        self.native_check = add_native_spacing_row(options)
        self.postprocess_check = QCheckBox("Drop enhancement with no tumour around it")
        self.postprocess_check.setChecked(InferenceSettings().postprocess)
        self.postprocess_check.setToolTip(
            "On (default): enhancing-tumour specks with no predicted tumour around them "
            "(vessels, dura) are removed from the labels; the probability layers keep them.")
        options.addRow(self.postprocess_check)
        self.prob_check = QCheckBox("Probability layers (one per region)")
        options.addRow(self.prob_check)
        self.keep_check = QCheckBox("Keep previous result (add a new layer)")
        options.addRow(self.keep_check)
        layout.addLayout(options)

        self._add_run_controls(layout, progress_format="%v / %m windows")

    # ------------------------------------------------------------------ model
    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._summary.config.decomposition.modalities) if self._summary else ()

    def set_model(self, ref: str | Path) -> bool:
        """Use the checkpoint ``ref`` ("demo" or a folder); False (and a notification) when it
        cannot be read, in which case the previous model stays selected."""
        ref = str(ref)
        try:
            summary = describe(ref)
        except USER_ERRORS as err:
            notify_error(err)
            self._select_model_item(self.session.model_ref)
            return False
        self._summary = summary
        self.session.model_ref = ref
        self._select_model_item(ref)
        self.info_label.setText("\n".join(summary.lines(brief=True)))
        self._rebuild_mapping()
        return True

    def _select_model_item(self, ref: str) -> None:
        index = self.model_combo.findData(ref)
        if index < 0:
            self.model_combo.addItem(str(resolve_checkpoint(ref)), ref)
            index = self.model_combo.count() - 1
        self.model_combo.setCurrentIndex(index)

    def _on_model_chosen(self, index: int) -> None:
        self.set_model(self.model_combo.itemData(index))

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a CIML checkpoint folder")
        if folder:
            self.set_model(folder)

    # ------------------------------------------------------------------ mapping
    def _rebuild_mapping(self) -> None:
        while self.mapping_form.rowCount():
            self.mapping_form.removeRow(0)
        self._combos = {}
        for modality in self.modalities:
            combo = QComboBox()
            combo.setToolTip(f"The image layer that holds {modality}")
            combo.currentTextChanged.connect(self._remember_mapping)
            self.mapping_form.addRow(modality, combo)
            self._combos[modality] = combo
        self.refresh_layers(auto=True)

    def refresh_layers(self, auto: bool = False) -> None:
        """Refill the combos; keep the user's choices, fill unset ones from names/metadata."""
        layers = image_layers(self.viewer.layers)
        names = [layer.name for layer in layers]
        guess = auto_map(self.modalities, layers)
        for modality, combo in self._combos.items():
            current = combo_value(combo) or self.session.mapping.get(modality)
            if auto or current not in names:
                current = guess.get(modality)
            fill_combo(combo, names, current, allow_none=True)
        self._remember_mapping()

    def _remember_mapping(self, *_args) -> None:
        self.session.mapping.update(self.mapping())

    def mapping(self) -> dict[str, str | None]:
        """Model modality -> chosen image layer name (None = no layer)."""
        return {m: combo_value(c) for m, c in self._combos.items()}

    def set_mapping(self, modality: str, layer_name: str | None) -> None:
        """Map one model modality to a layer (what picking in its combo does)."""
        combo = self._combos[modality]
        combo.setCurrentText(layer_name if layer_name else combo.itemText(0))

    @property
    def device(self) -> str:
        return self.device_combo.currentText()

    # ------------------------------------------------------------------ run
    def run(self):
        """Start a run in a background worker (returns it), or notify why not (returns None)."""
        if self.busy:
            notify_info("CIML: a segmentation is already running")
            return None
        self.last_error = None
        try:
            if self._summary is None:
                raise ValueError("no model selected")
            mapping = self.mapping()
            case = case_from_layers(self.viewer.layers, mapping, self.modalities)
            device = str(resolve_device(self.device))
            settings = InferenceSettings(overlap=float(self.overlap_spin.value()),
                                         mirror=self.tta_check.isChecked(), device=device,
                                         native_spacing=self.native_check.isChecked(),
                                         postprocess=self.postprocess_check.isChecked())
        except USER_ERRORS as err:
            self.last_error = str(err)
            notify_error(err)
            return None
        first = self.viewer.layers[mapping[self.modalities[0]]]
        labels = dataset_labels(first.metadata.get("label_convention"), self._summary)
        self._context = _RunContext(
            case=case, source=case.reference, scale=tuple(first.scale),
            translate=tuple(first.translate), mapping={m: str(n) for m, n in mapping.items()},
            model_ref=self.session.model_ref, probabilities=self.prob_check.isChecked(),
            keep_previous=self.keep_check.isChecked(), started=time.perf_counter(),
            label_convention=labels,
        )
        self.status_label.setText(f"Segmenting {case.case_id} on {device}…")

        def work(loaded, progress) -> tuple[Any, CasePrediction]:
            return loaded, predict_case(loaded, case, settings, progress=progress,
                                        label_convention=labels)

        return self._launch_model_job(work, what=f"case {case.case_id}: segmentation")

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        self.model_combo.setEnabled(not running)
        self.browse_button.setEnabled(not running)

    def _result_shown(self) -> None:
        ctx, (loaded, prediction) = self._context, self._result
        self._result = None
        plan = prediction.spacing
        spacing = f", {plan.describe()}" if plan is not None else ""
        self.status_label.setText(
            f"{prediction.case_id}: labels {sorted(np.unique(prediction.label).tolist())} in "
            f"{time.perf_counter() - ctx.started:.1f} s{spacing} (model sha256 "
            f"{loaded.weights_sha256[:12]})")

    # ------------------------------------------------------------------ layers
    def _result_steps(self, result: tuple[Any, CasePrediction]) -> list:
        """One step per layer: probability maps (if asked), then the label layer."""
        loaded, prediction = result
        self._result = result
        ctx = self._context
        convention = ctx.label_convention or loaded.info.label_convention
        case_id = prediction.case_id
        common = {
            "nifti_source": ctx.source, "source_path": str(ctx.source.path),
            "affine": ctx.source.affine.copy(), "case_id": case_id,
            "model_sha256": loaded.weights_sha256, "model": ctx.model_ref,
            "modalities": dict(ctx.mapping),
        }
        steps = []
        prob_names = [f"{case_id} P({region})" for region in prediction.regions]
        if ctx.probabilities:
            for i, (region, name) in enumerate(zip(prediction.regions, prob_names, strict=True)):
                meta = {**common, ROLE: "probability", "region": region}
                steps.append(partial(self._put_probability, name, prediction.probabilities[i],
                                     meta, ctx))
        elif not ctx.keep_previous:
            # stale maps of an earlier run would contradict the new labels
            steps.append(partial(self._remove, prob_names, "probability"))
        meta = {**common, ROLE: "prediction", "label_convention": convention,
                "regions": list(prediction.regions), REGION_KEY: None}
        steps.append(partial(self._put_labels, f"{case_id} CIML", loaded, prediction, meta, ctx))
        return steps

    def _remove(self, names: list[str], role: str) -> None:
        for name in names:
            old = find_layer(self.viewer.layers, name, role)
            if old is not None:
                self.viewer.layers.remove(old)

    def _put_probability(self, name: str, data: np.ndarray, meta: dict,
                         ctx: _RunContext) -> None:
        replace_or_add_layer(
            self.viewer, "image", name, data, role="probability", metadata=meta,
            scale=ctx.scale, translate=ctx.translate, keep_previous=ctx.keep_previous,
            colormap="magma", blending="additive", contrast_limits=(0.0, 1.0), opacity=0.7,
            visible=False)

    def _put_labels(self, name: str, loaded, prediction: CasePrediction, meta: dict,
                    ctx: _RunContext) -> None:
        convention = meta["label_convention"]
        prediction_id = uuid.uuid4().hex
        meta = {**meta, "ciml_prediction_id": prediction_id}

        def forget(old) -> None:  # the replaced result is no longer on screen
            self.session.predictions.pop(old.metadata.get("ciml_prediction_id"), None)

        layer = replace_or_add_layer(
            self.viewer, "labels", name, prediction.label, role="prediction", metadata=meta,
            scale=ctx.scale, translate=ctx.translate, keep_previous=ctx.keep_previous,
            refresh=("colormap",), on_replace=forget, colormap=label_colormap(convention),
            opacity=0.6)
        self.session.add_prediction(prediction_id, PredictionInfo(
            layer_name=layer.name, case_id=prediction.case_id, model_ref=ctx.model_ref,
            model_sha256=loaded.weights_sha256, label_convention=convention,
            regions=tuple(prediction.regions), mapping=dict(ctx.mapping),
            label=prediction.label.copy(), probabilities=prediction.probabilities,
        ))
