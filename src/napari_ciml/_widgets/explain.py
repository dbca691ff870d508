"""Explain: per-pair Grad-CAM heatmaps of the complementary representations (paper 4.6).

All the work is :func:`ciml_core.explain.explain_case`; the widget picks the pairs and the
target, runs it in the background (cancellable through its progress callback, like Segment) and
shows one Image layer per (pair, auxiliary modality) on the image grid, named
``"<pair> ← <auxiliary>"`` (e.g. ``"T1:TC ← T1CE"``) so that the layers of a pair sort together.
The results go to the viewer's :class:`~napari_ciml._session.CimlSession`, where the
Complementary-weights chart picks them up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QRadioButton,
    QVBoxLayout,
)

from ciml_core.checkpoint import document_spacing, read_checkpoint_config
from ciml_core.data.dataset import LoadedCase
from ciml_core.data.nifti import NiftiSource
from ciml_core.errors import InputDataError
from ciml_core.explain import MODES, explain_case, list_pairs, pair_name
from ciml_core.infer import InferenceSettings
from ciml_core.model import ModelConfig
from ciml_core.runtime import resolve_device
from napari_ciml._layers import ROLE, auto_map, case_from_layers, image_layers
from napari_ciml._shortcuts import install_shortcuts
from napari_ciml._widgets._common import (
    USER_ERRORS,
    JobWidget,
    add_device_row,
    add_native_spacing_row,
    combo_value,
    fill_combo,
    notify_error,
    notify_info,
    replace_or_add_layer,
    spacing_summary,
)

ALL_PAIRS = "all"
COLORMAPS = ("turbo", "inferno")
ARROW = "←"


def heatmap_layer_name(pair: str, auxiliary: str) -> str:
    """``"T1:TC ← T1CE"``: the pair first, so that a pair's layers sort together."""
    return f"{pair} {ARROW} {auxiliary.upper()}"


def heatmap_colormap(name: str):
    """``turbo`` / ``inferno`` whose lowest tenth fades to transparent: with additive blending a
    zero heat adds nothing, so the image under the map keeps its own grey levels."""
    from matplotlib import colormaps
    from napari.utils.colormaps import Colormap

    colors = colormaps[name](np.linspace(0.0, 1.0, 256))
    colors[:, 3] = np.clip(np.linspace(0.0, 1.0, 256) / 0.1, 0.0, 1.0)
    return Colormap(colors, name=f"CIML {name}", display_name=f"{name} (CIML)")


def display_maps(explanations: list[Any], normalise: bool) -> dict[tuple[str, str], np.ndarray]:
    """(pair name, auxiliary) -> the map to show: raw, or divided by the pair's maximum over its
    auxiliary maps (each pair's row then spans 0..1, as in the paper's figures)."""
    shown = {}
    for e in explanations:
        peak = max((float(np.max(m)) for m in e.heatmaps.values()), default=0.0)
        for aux in e.auxiliary:
            heat = e.heatmaps[aux].astype(np.float32, copy=False)
            shown[(e.name, aux)] = heat / peak if normalise and peak > 0 else heat
    return shown


@dataclass
class _ExplainContext:
    case: LoadedCase
    source: NiftiSource
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    started: float
    device: str


class ExplainWidget(JobWidget):
    """Dock widget: pair picker, target (predicted region or a label layer), Run / Cancel."""

    job_title = "CIML Grad-CAM"

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        self.explanations: list[Any] = []
        self._context: _ExplainContext | None = None
        self._document: dict[str, Any] | None = None
        self._document_ref: str | None = None
        self._pairs: dict[str, tuple[int, str]] = {}
        self._build_ui()
        self.refresh_model()
        self.refresh_layers()
        install_shortcuts(napari_viewer)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        layout.addWidget(self.model_label)
        form = QFormLayout()
        self.pair_combo = QComboBox()
        self.pair_combo.setToolTip("A (primary modality : region) pair of the model, or all")
        form.addRow("Pair", self.pair_combo)

        self.target_predicted = QRadioButton("Predicted region")
        self.target_predicted.setToolTip("Explain the region the model predicts (Seg-Grad-CAM)")
        self.target_roi = QRadioButton("ROI from label layer:")
        self.target_roi.setToolTip("Explain a region you drew: the nonzero voxels of a Labels "
                                   "layer on the image grid")
        self.target_predicted.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.target_predicted)
        group.addButton(self.target_roi)
        self.roi_combo = QComboBox()
        roi_row = QHBoxLayout()
        roi_row.addWidget(self.target_roi)
        roi_row.addWidget(self.roi_combo, 1)
        form.addRow("Target", self.target_predicted)
        form.addRow("", _wrap(roi_row))

        self.mode_combo = QComboBox()
        self.mode_combo.addItems(MODES)
        self.mode_combo.setToolTip("roi: one window centred on the tumour (fast); sliding: every "
                                   "window of the volume, stitched (slow)")
        form.addRow("Window", self.mode_combo)
        self.device_combo, self.device_reason = add_device_row(form)
        self.native_check = add_native_spacing_row(form)
        self.colormap_combo = QComboBox()
        self.colormap_combo.addItems(COLORMAPS)
        self.colormap_combo.currentTextChanged.connect(self._restyle)
        form.addRow("Colormap", self.colormap_combo)
        self.normalise_check = QCheckBox("Normalise per pair (each pair's maps / its maximum)")
        self.normalise_check.setChecked(True)
        self.normalise_check.toggled.connect(self._restyle)
        form.addRow(self.normalise_check)
        layout.addLayout(form)

        self._add_run_controls(layout)

    # ------------------------------------------------------------------ model and layers
    def refresh_model(self) -> None:
        """Follow the model chosen in Segment (the bundled demo model by default)."""
        ref = self.session.model_ref
        if ref == self._document_ref:
            return
        try:
            document = read_checkpoint_config(ref, verify_hash=False)
            config = ModelConfig.from_dict(document["model"])
        except USER_ERRORS as err:
            self.model_label.setText(f"Model unusable: {err}")
            self._document, self._document_ref = None, None
            return
        self._document, self._document_ref = document, ref
        decomposition = config.decomposition
        current = self.pair_combo.currentText()
        names = [ALL_PAIRS] + [pair_name(decomposition, i, r) for i, r in
                               list_pairs(decomposition)]
        fill_combo(self.pair_combo, names, current if current in names else ALL_PAIRS)
        self._pairs = {pair_name(decomposition, i, r): (i, r) for i, r in
                       list_pairs(decomposition)}
        self.model_label.setText(
            f"Model: {'bundled demo' if ref == 'demo' else ref} "
            f"(sha256 {document['weights_sha256'][:12]}); modalities "
            f"{', '.join(document['modalities'])}; {spacing_summary(document_spacing(document))}")

    def refresh_layers(self) -> None:
        from napari.layers import Labels

        names = [layer.name for layer in self.viewer.layers
                 if isinstance(layer, Labels) and layer.ndim == 3]
        current = combo_value(self.roi_combo)
        fill_combo(self.roi_combo, names, current)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._document["modalities"]) if self._document else ()

    def _mapping(self) -> dict[str, str | None]:
        """The Segment widget's mapping when it covers the model, else a fresh automatic one."""
        layers = image_layers(self.viewer.layers)
        names = {layer.name for layer in layers}
        mapping = {m: self.session.mapping.get(m) for m in self.modalities}
        if all(n in names for n in mapping.values()):
            return mapping
        return auto_map(self.modalities, layers)

    def set_pair(self, name: str) -> None:
        """Choose a pair by name (``"T1:TC"``) or ``"all"``."""
        if self.pair_combo.findText(name) < 0:
            raise ValueError(f"unknown pair {name!r}; choose one of "
                             f"{[self.pair_combo.itemText(i) for i in range(self.pair_combo.count())]}")
        self.pair_combo.setCurrentText(name)

    # ------------------------------------------------------------------ run
    def run(self):
        """Start Grad-CAM in a background worker (returns it), or notify why not."""
        if self.busy:
            notify_info("CIML: Grad-CAM is already running")
            return None
        self.last_error = None
        self.refresh_model()
        try:
            if self._document is None:
                raise ValueError(self.model_label.text())
            mapping = self._mapping()
            case = case_from_layers(self.viewer.layers, mapping, self.modalities)
            device = str(resolve_device(self.device_combo.currentText()))
            choice = self.pair_combo.currentText()
            pairs = None if choice == ALL_PAIRS else [self._pairs[choice]]
            target_mask = self._target_mask(case)
            prediction = None
            if target_mask is None:
                info = self.session.latest_prediction(case.case_id,
                                                      self._document["weights_sha256"], mapping)
                prediction = None if info is None else info.probabilities
        except USER_ERRORS as err:
            self.last_error = str(err)
            notify_error(err)
            return None
        first = self.viewer.layers[mapping[self.modalities[0]]]
        self._context = _ExplainContext(case, case.reference, tuple(first.scale),
                                        tuple(first.translate), time.perf_counter(), device)
        self.status_label.setText(f"Grad-CAM of {choice} on {case.case_id} ({device})…")
        settings = InferenceSettings(device=device, native_spacing=self.native_check.isChecked())
        mode = self.mode_combo.currentText()

        def work(loaded, progress) -> list[Any]:
            return explain_case(loaded, case, pairs, settings, target_mask=target_mask,
                                mode=mode, progress=progress, prediction=prediction)

        return self._launch_model_job(work, what=f"case {case.case_id}: Grad-CAM")

    def _target_mask(self, case: LoadedCase) -> np.ndarray | None:
        if not self.target_roi.isChecked():
            return None
        name = combo_value(self.roi_combo)
        if name is None or name not in self.viewer.layers:
            raise InputDataError("ROI target: choose a Labels layer that marks the region")
        mask = np.asarray(self.viewer.layers[name].data) != 0
        if mask.shape != case.image.shape[1:]:
            raise InputDataError(f"ROI layer '{name}' has shape {mask.shape}; the images have "
                                 f"{case.image.shape[1:]}")
        return mask

    def _result_steps(self, explanations: list[Any]) -> list:
        """One step per heatmap layer (a dozen layers at once would freeze the viewer)."""
        self.explanations = list(explanations)
        ctx = self._context
        normalise = self.normalise_check.isChecked()
        shown = display_maps(self.explanations, normalise)
        peak = max((float(m.max()) for m in shown.values()), default=0.0) or 1.0
        limits = (0.0, 1.0) if normalise else (0.0, peak)
        # show the first pair's strongest auxiliary map; the others start hidden
        head = self.explanations[0] if self.explanations else None
        first = (head.name, max(head.auxiliary, key=head.weights.get)) if head else None
        steps = []
        for e in self.explanations:
            for aux in e.auxiliary:
                meta = {ROLE: "heatmap", "pair": e.name, "auxiliary": aux,
                        "weight": e.weights[aux], "case_id": ctx.case.case_id,
                        "nifti_source": ctx.source, "target_source": e.target_source,
                        "mode": e.mode}
                steps.append(partial(self._put_heatmap, heatmap_layer_name(e.name, aux),
                                     shown[(e.name, aux)], meta, limits,
                                     (e.name, aux) == first, ctx))
        return steps

    def _result_shown(self) -> None:
        ctx = self._context
        self.session.set_explanations(self.explanations, ctx.case.case_id)
        empty = [e.name for e in self.explanations if e.target_voxels == 0]
        note = f"; empty target for {', '.join(empty)} (equal weights)" if empty else ""
        self.status_label.setText(f"{len(self.explanations)} pair(s) in "
                                  f"{time.perf_counter() - ctx.started:.1f} s on {ctx.device}{note}")

    # ------------------------------------------------------------------ layers
    def heatmap_layers(self) -> list:
        """The heatmap layers currently in the viewer (any run)."""
        return [layer for layer in self.viewer.layers if layer.metadata.get(ROLE) == "heatmap"]

    def _put_heatmap(self, name: str, data: np.ndarray, meta: dict, limits: tuple,
                     visible: bool, ctx: _ExplainContext) -> None:
        # Only the first map is visible: a dozen additive maps at once is noise.
        replace_or_add_layer(
            self.viewer, "image", name, data, role="heatmap", metadata=meta, scale=ctx.scale,
            translate=ctx.translate, refresh=("contrast_limits",),
            colormap=heatmap_colormap(self.colormap_combo.currentText()), blending="additive",
            opacity=0.6, contrast_limits=limits, visible=visible)

    def _restyle(self, *_args) -> None:
        """Apply the colormap / normalisation choice to the layers of the last run."""
        if not self.explanations or self._context is None:
            return
        normalise = self.normalise_check.isChecked()
        shown = display_maps(self.explanations, normalise)
        peak = max((float(m.max()) for m in shown.values()), default=0.0) or 1.0
        for layer in self.heatmap_layers():
            key = (layer.metadata.get("pair"), layer.metadata.get("auxiliary"))
            if key in shown:
                layer.data = shown[key]
                layer.contrast_limits = (0.0, 1.0) if normalise else (0.0, peak)
            layer.colormap = heatmap_colormap(self.colormap_combo.currentText())


def _wrap(layout) -> Any:
    from qtpy.QtWidgets import QWidget

    holder = QWidget()
    layout.setContentsMargins(0, 0, 0, 0)
    holder.setLayout(layout)
    return holder
