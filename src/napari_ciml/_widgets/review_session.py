"""Review session: a worklist through a whole dataset, keyboard-first.

The session itself (pairing cases with the model's output, statuses, resume, drafts, time per
case, the rules of each decision) is :class:`ciml_core.review.ReviewSession`; this widget shows
one case at a time and turns key presses into its decisions:

==========================  =====================================================
Ctrl+Alt+A                  accept the model output and go to the next case
Ctrl+Alt+S                  save the edited mask as a correction and go on
Ctrl+Alt+R                  reject (with the reason chosen in the widget)
Ctrl+Alt+K                  skip (come back later)
Ctrl+Alt+PageDown / PageUp  next / previous case (undecided: the edits stay as a draft)
Ctrl+Alt+J                  jump: focus the case list (arrows, Enter)
==========================  =====================================================

None of them is a napari default (tests/test_review_session_widget.py checks against napari's
shortcuts, menu actions, layer keymaps and the plugin's own Ctrl+Alt+N/B/H).

Loading a case replaces the data of the previous case's layers (no pile-up); the next case is
loaded (or its segmentation computed) in a background worker while the reviewer works on the
current one. Edits are autosaved as a draft every few seconds and when the case changes.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QColor, QKeySequence
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QShortcut,
    QVBoxLayout,
    QWidget,
)

from ciml_core.review import (
    REJECT_REASONS,
    AlreadyReviewedError,
    ReviewCase,
    ReviewRecord,
    ReviewSession,
)
from napari_ciml._layers import ROLE, label_colormap
from napari_ciml._shortcuts import install_shortcuts
from napari_ciml._widgets._common import (
    USER_ERRORS,
    CimlWidget,
    background_torch,
    notify_error,
    notify_info,
    start_job,
)

#: Seconds between two draft autosaves (a draft is written only when the mask changed).
AUTOSAVE_SECONDS = 3.0
#: Delay (ms) between a case appearing and the prefetch of the next one starting.
PREFETCH_DELAY_MS = 150
#: napari key -> (widget method, what it does). Qt spells the same keys in SESSION_QT_KEYS.
SESSION_SHORTCUTS = {
    "Control-Alt-A": ("accept_and_next", "accept and next case"),
    "Control-Alt-S": ("save_correction_and_next", "save correction and next case"),
    "Control-Alt-R": ("reject", "reject (with the chosen reason)"),
    "Control-Alt-K": ("skip", "skip the case"),
    "Control-Alt-PageDown": ("next_case", "next case"),
    "Control-Alt-PageUp": ("previous_case", "previous case"),
    "Control-Alt-J": ("focus_case_list", "jump: focus the case list"),
}
SESSION_QT_KEYS = {key: key.replace("Control", "Ctrl").replace("-", "+").replace(
    "PageDown", "PgDown").replace("PageUp", "PgUp") for key in SESSION_SHORTCUTS}
#: Marks a layer this widget shows (so that it can be found and replaced).
SESSION_LAYER = "ciml_review_session"
STATUS_COLOURS = {"to do": None, "accepted": "#2e9e44", "corrected": "#d08a00",
                  "rejected": "#c0392b", "skipped": "#7f8c8d"}


def _key_hint(method: str) -> str:
    for key, (name, _) in SESSION_SHORTCUTS.items():
        if name == method:
            return SESSION_QT_KEYS[key].replace("PgDown", "PgDn")
    return ""


class ReviewSessionWidget(CimlWidget):
    """Dock widget over :class:`~ciml_core.review.ReviewSession`."""

    #: a case is on screen (its id), or "" when no case is left to review
    case_shown = Signal(str)

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        self.review: ReviewSession | None = None
        self.current: ReviewCase | None = None  # the case on screen, once loaded
        self.current_id: str | None = None  # the case being shown (or loading)
        self.last_record: ReviewRecord | None = None
        self.last_error: str | None = None
        self._cache: dict[str, ReviewCase] = {}
        self._workers: dict[str, object] = {}
        self._wanted: str | None = None  # the case to show when its load returns
        self._own_drafts: set[str] = set()  # drafts this widget wrote (restored without asking)
        self._image_layers: dict[str, Image] = {}
        self._label_layer: Labels | None = None
        self._draft_state: np.ndarray | None = None  # the mask as last saved or loaded
        self._grid: tuple | None = None
        #: ``ask(question) -> bool``; a dialog by default (tests and scripts replace it)
        self.ask = self._ask_dialog
        self.autosave_timer = QTimer(self)
        self.autosave_timer.setInterval(int(AUTOSAVE_SECONDS * 1000))
        self.autosave_timer.timeout.connect(self.autosave_draft)
        self._build_ui()
        self._install_shortcuts(napari_viewer)
        install_shortcuts(napari_viewer)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.folder_edit = self._path_row(form, "Session", "session folder (new or existing)",
                                          folder=True)
        self.dataset_edit = self._path_row(form, "Dataset", "dataset folder or manifest "
                                           "(new session)", folder=True, files=True)
        self.predictions_edit = self._path_row(form, "Predictions", "ciml-core predict output "
                                               "(optional)", folder=True)
        self.model_edit = self._path_row(form, "Model", "'demo' or a checkpoint, for missing "
                                         "predictions (optional)", folder=True)
        self.reviewer_edit = QLineEdit()
        self.reviewer_edit.setPlaceholderText("your name")
        form.addRow("Reviewer", self.reviewer_edit)
        layout.addLayout(form)
        self.open_button = QPushButton("Open session")
        self.open_button.setToolTip("Create the session, or resume it at the first case to do")
        self.open_button.clicked.connect(self.open_session)
        layout.addWidget(self.open_button)

        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("%v / %m reviewed")
        self.progress_bar.setMaximum(1)
        self.progress_bar.setValue(0)
        layout.addWidget(self.progress_bar)
        self.case_list = QListWidget()
        self.case_list.setMinimumHeight(140)
        self.case_list.setToolTip("Enter or double-click: show the case")
        self.case_list.itemActivated.connect(
            lambda item: self.show_case(item.data(Qt.ItemDataRole.UserRole)))
        layout.addWidget(self.case_list, 1)
        self.case_label = QLabel("No session open.")
        self.case_label.setWordWrap(True)
        layout.addWidget(self.case_label)

        grid = QGridLayout()
        self.previous_button = self._button("◀ Previous", "previous_case")
        self.next_button = self._button("Next ▶", "next_case")
        self.accept_button = self._button("Accept and next", "accept_and_next")
        self.correct_button = self._button("Save correction and next",
                                           "save_correction_and_next")
        self.reject_button = self._button("Reject", "reject")
        self.skip_button = self._button("Skip", "skip")
        self.reason_combo = QComboBox()
        self.reason_combo.addItems(REJECT_REASONS)
        self.reason_combo.setToolTip("Why the case is rejected")
        grid.addWidget(self.previous_button, 0, 0)
        grid.addWidget(self.next_button, 0, 1)
        grid.addWidget(self.accept_button, 1, 0)
        grid.addWidget(self.correct_button, 1, 1)
        grid.addWidget(self.reject_button, 2, 0)
        grid.addWidget(self.reason_combo, 2, 1)
        grid.addWidget(self.skip_button, 3, 0)
        layout.addLayout(grid)
        self.note_edit = QLineEdit()
        self.note_edit.setPlaceholderText("optional note for this case")
        layout.addWidget(self.note_edit)
        self.summary_button = QPushButton("Write summary")
        self.summary_button.setToolTip("review_summary.csv / .md / .png in the session folder "
                                       "(ciml-core review-summary)")
        self.summary_button.clicked.connect(self.write_summary)
        layout.addWidget(self.summary_button)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        self._set_enabled(False)

    def _path_row(self, form: QFormLayout, label: str, placeholder: str, *, folder: bool,
                  files: bool = False) -> QLineEdit:
        row = QHBoxLayout()
        edit = QLineEdit()
        edit.setPlaceholderText(placeholder)
        browse = QPushButton("…")
        browse.setMaximumWidth(28)
        browse.setToolTip(f"Choose the {label.lower()}")

        def choose() -> None:
            if files:
                path, _ = QFileDialog.getOpenFileName(self, f"{label} manifest (or cancel to "
                                                      "choose a folder)", "",
                                                      "Manifests (*.csv *.json)")
                if path:
                    edit.setText(path)
                    return
            path = QFileDialog.getExistingDirectory(self, label)
            if path:
                edit.setText(path)

        browse.clicked.connect(choose)
        row.addWidget(edit, 1)
        row.addWidget(browse)
        holder = QWidget()
        row.setContentsMargins(0, 0, 0, 0)
        holder.setLayout(row)
        form.addRow(label, holder)
        return edit

    def _button(self, text: str, method: str) -> QPushButton:
        hint = _key_hint(method)
        button = QPushButton(f"{text}  ({hint})" if hint else text)
        button.setToolTip(f"{text} ({hint})")
        button.clicked.connect(lambda: getattr(self, method)())
        return button

    def _set_enabled(self, enabled: bool) -> None:
        for button in (self.previous_button, self.next_button, self.accept_button,
                       self.correct_button, self.reject_button, self.skip_button,
                       self.summary_button):
            button.setEnabled(enabled)

    def _install_shortcuts(self, viewer) -> None:
        """The session keys on the viewer (canvas focused) and on this widget (focused)."""
        ref = weakref.ref(self)
        for key, (method, _) in SESSION_SHORTCUTS.items():
            def handler(_viewer=None, method=method):
                widget = ref()
                if widget is not None:
                    getattr(widget, method)()

            handler.__doc__ = SESSION_SHORTCUTS[key][1]
            viewer.bind_key(key, handler, overwrite=True)
            shortcut = QShortcut(QKeySequence(SESSION_QT_KEYS[key]), self)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(lambda method=method: getattr(self, method)())

    def _ask_dialog(self, question: str) -> bool:
        answer = QMessageBox.question(
            self, "CIML review session", question,
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.Yes)
        return answer == QMessageBox.StandardButton.Yes

    def _say(self, text: str, error: BaseException | None = None) -> None:
        self.status_label.setText(text)
        if error is not None:
            self.last_error = str(error)
            notify_error(error)

    # ------------------------------------------------------------------ session
    def open_session(self, *_args) -> bool:
        """Open (or create) the session the fields describe and show its first case to do."""
        def text(edit: QLineEdit) -> str | None:
            value = edit.text().strip()
            return value or None

        try:
            folder = text(self.folder_edit)
            if folder is None:
                raise ValueError("choose a session folder (a new one starts a session)")
            model = text(self.model_edit)
            review = ReviewSession.open(
                Path(folder).expanduser(), text(self.dataset_edit),
                predictions=text(self.predictions_edit),
                model=model if model in (None, "demo") else Path(model).expanduser(),
                reviewer=text(self.reviewer_edit))
        except USER_ERRORS as err:
            self._say(f"Session not opened: {err}", err)
            return False
        self._leave_current()
        self._cache.clear()
        self._wanted = None
        self._own_drafts.clear()
        self.review = review
        self.dataset_edit.setText(review.dataset)
        self.predictions_edit.setText(review.predictions or "")
        self.model_edit.setText(review.model_ref or "")
        if not self.reviewer_edit.text().strip():
            self.reviewer_edit.setText(review.reviewer)
        self._fill_list()
        self._update_progress()
        self._set_enabled(True)
        for warning in review.warnings:
            notify_info(f"CIML review session: {warning}")
        target = review.resume_case()
        self._say(f"Session {review.folder}: {review.progress_text()}"
                  + (f"; {len(review.warnings)} warning(s): " + " / ".join(review.warnings)
                     if review.warnings else ""))
        if target is None:
            self._finish()
        else:
            self.show_case(target)
        return True

    def _fill_list(self) -> None:
        self.case_list.clear()
        for case in self.review.cases:
            item = QListWidgetItem()
            item.setData(Qt.ItemDataRole.UserRole, case.case_id)
            self.case_list.addItem(item)
            self._refresh_item(case.case_id, item)

    def _item(self, case_id: str) -> QListWidgetItem | None:
        if self.review is None:
            return None
        index = self.review.case_ids.index(case_id)
        return self.case_list.item(index)

    def _refresh_item(self, case_id: str, item: QListWidgetItem | None = None) -> None:
        item = item or self._item(case_id)
        if item is None:
            return
        case = self.review.case(case_id)
        reason = (case.last or {}).get("reason") if case.status == "rejected" else None
        text = f"{case.case_id}    {case.status}" + (f" ({reason})" if reason else "")
        if case.problem:
            text = f"⚠ {text}    no model output"
        item.setText(text)
        item.setToolTip(case.problem or case.status)
        colour = STATUS_COLOURS.get(case.status)
        item.setForeground(QColor(colour) if colour else self.case_list.palette().text())

    def _update_progress(self) -> None:
        done, total = self.review.progress()
        self.progress_bar.setMaximum(max(total, 1))
        self.progress_bar.setValue(done)

    def progress_text(self) -> str:
        """What the progress bar shows, e.g. '12 / 40 reviewed'."""
        return self.progress_bar.text()

    def case_statuses(self) -> dict[str, str]:
        return {c.case_id: c.status for c in self.review.cases} if self.review else {}

    # ------------------------------------------------------------------ navigation
    def show_case(self, case_id: str) -> None:
        """Show ``case_id`` (from the prefetch cache at once, else after loading it)."""
        if self.review is None or not case_id:
            return
        self.review.case(case_id)
        if case_id == self.current_id and self.current is not None:
            return
        self._leave_current()
        self.current_id = case_id
        self._select(case_id)
        case = self._cache.get(case_id)
        if case is not None:
            self._display(case)
            return
        self._wanted = case_id
        self.case_label.setText(f"Loading {case_id}…")
        self._start_load(case_id)

    def next_case(self) -> None:
        self._step(+1)

    def previous_case(self) -> None:
        self._step(-1)

    def _step(self, step: int) -> None:
        if self.review is None:
            return
        ids = self.review.case_ids
        if self.current_id is None:
            self.show_case(ids[0 if step > 0 else -1])
            return
        index = min(max(ids.index(self.current_id) + step, 0), len(ids) - 1)
        self.show_case(ids[index])

    def focus_case_list(self) -> None:
        self.case_list.setFocus()

    def _select(self, case_id: str) -> None:
        item = self._item(case_id)
        if item is not None:
            self.case_list.blockSignals(True)
            self.case_list.setCurrentItem(item)
            self.case_list.blockSignals(False)
            self.case_list.scrollToItem(item)

    def _leave_current(self) -> None:
        """The case leaves the screen undecided: autosave its edits, stop its clock."""
        if self.current is not None:
            self.autosave_draft()
            if self.current.case_id in self._own_drafts:
                self._cache.pop(self.current.case_id, None)  # come back to the draft on disk
        if self.review is not None:
            self.review.leave()
        self.current = None
        self.autosave_timer.stop()

    # ------------------------------------------------------------------ loading
    def _start_load(self, case_id: str) -> None:
        if case_id in self._workers or case_id in self._cache:
            return
        review = self.review

        def load() -> ReviewCase:
            with background_torch():
                return review.load(case_id)

        self._workers[case_id] = start_job(
            load,
            on_result=lambda case: self._on_loaded(review, case),
            on_error=lambda err: self._on_load_error(review, case_id, err),
            on_finished=lambda: self._workers.pop(case_id, None))

    @property
    def loading(self) -> list[str]:
        """Cases being loaded in the background right now."""
        return list(self._workers)

    def _on_loaded(self, review: ReviewSession, case: ReviewCase) -> None:
        try:
            self._loaded(review, case)
        except RuntimeError:  # the widget was closed while the case loaded
            pass

    def _loaded(self, review: ReviewSession, case: ReviewCase) -> None:
        if review is not self.review:
            return
        self._cache[case.case_id] = case
        self._refresh_item(case.case_id)
        if self._wanted == case.case_id:
            self._wanted = None
            self._display(case)
        self._trim_cache()

    def _on_load_error(self, review: ReviewSession, case_id: str, err: BaseException) -> None:
        try:
            self._load_failed(review, case_id, err)
        except RuntimeError:  # closed meanwhile
            pass

    def _load_failed(self, review: ReviewSession, case_id: str, err: BaseException) -> None:
        if review is not self.review:
            return
        review.case(case_id).problem = str(err)
        self._refresh_item(case_id)
        if self._wanted == case_id:
            self._wanted = None
            self._clear_layers()
            self.case_label.setText(f"{case_id}: cannot be shown. Reject or skip it.")
            self._say(f"Cannot load {case_id}: {err}", err)

    def _trim_cache(self) -> None:
        keep = {self.current_id, self._wanted}
        if self.review is not None and self.current_id is not None:
            keep.add(self.review.next_case(self.current_id))
        for case_id in [c for c in self._cache if c not in keep]:
            del self._cache[case_id]

    def _prefetch(self) -> None:
        try:
            if self.review is None or self.current_id is None:
                return
        except RuntimeError:  # closed meanwhile
            return
        upcoming = self.review.next_case(self.current_id)
        if upcoming is not None:
            self._start_load(upcoming)

    # ------------------------------------------------------------------ display
    def _display(self, case: ReviewCase) -> None:
        # A copy: the reviewer paints the layer, the model output stays what the model said.
        label = (np.zeros(case.images.shape[1:], np.uint8) if case.model_label is None
                 else case.model_label.copy())
        already = 0.0
        draft = case.draft
        if draft is not None:
            mine = case.case_id in self._own_drafts
            question = (f"Case {case.case_id} has a draft autosaved {draft.saved or '?'} "
                        f"({draft.changed_voxels if draft.changed_voxels is not None else '?'} "
                        "voxel(s) edited). Restore it?")
            if mine or self.ask(question):
                label, already = draft.label.copy(), draft.seconds
                self._own_drafts.add(case.case_id)
            else:
                self.review.discard_draft(case.case_id)
            case.draft = None
        self._set_layers(case, label)
        self.current, self.current_id = case, case.case_id
        self.review.begin(case.case_id, already=already)
        self._draft_state = label.copy()
        self._describe(case)
        self.autosave_timer.start()
        self._trim_cache()
        self.case_shown.emit(case.case_id)
        # Prefetch once the canvas has drawn this case: the GUI thread first.
        QTimer.singleShot(PREFETCH_DELAY_MS, self._prefetch)

    def _describe(self, case: ReviewCase) -> None:
        entry = self.review.case(case.case_id)
        index = self.review.case_ids.index(case.case_id) + 1
        origin = {"predictions": "prediction file", "computed": "computed by the model"}.get(
            entry.origin, entry.origin)
        text = (f"<b>{case.case_id}</b> ({index} of {len(self.review.cases)}): "
                f"{entry.status}; model output: {origin}")
        if case.problem:
            text += f"<br><span style='color:#c0392b'>{case.problem}</span>"
        if self._own_drafts and case.case_id in self._own_drafts:
            text += "<br>draft restored"
        self.case_label.setText(text)

    def _set_layers(self, case: ReviewCase, label: np.ndarray) -> None:
        """Put ``case`` into this widget's layers, replacing the previous case's data."""
        scale, translate = case.spacing, case.translate
        inputs = [str(p) for p in case.inputs]
        layers = self.viewer.layers
        for i, modality in enumerate(case.modalities):
            meta = {"nifti_source": case.reference, "modality": modality,
                    "case_id": case.case_id, SESSION_LAYER: True,
                    "source_path": inputs[i] if i < len(inputs) else ""}
            layer = self._image_layers.get(modality)
            data = case.images[i]
            if layer is None or layer not in layers:
                self._image_layers[modality] = self.viewer.add_image(
                    data, name=modality, scale=scale, translate=translate, colormap="gray",
                    metadata=meta)
            else:
                self._set_grid(layer, scale, translate)  # (each change re-slices the layer)
                layer.data = data
                layer.metadata = meta
                layer.reset_contrast_limits_range()
                layer.reset_contrast_limits()
        for modality in [m for m in self._image_layers if m not in case.modalities]:
            layer = self._image_layers.pop(modality)
            if layer in layers:
                layers.remove(layer)
        meta = {"nifti_source": case.reference, "case_id": case.case_id,
                "label_convention": case.label_convention, ROLE: "prediction",
                SESSION_LAYER: True, "model_sha256": self.review.model_sha256,
                "source_path": str(case.prediction or "")}
        name = f"{case.case_id} review"
        layer = self._label_layer
        if layer is None or layer not in layers:
            self._label_layer = self.viewer.add_labels(
                label, name=name, scale=scale, translate=translate, metadata=meta,
                colormap=label_colormap(case.label_convention), opacity=0.6)
        else:
            self._set_grid(layer, scale, translate)
            layer.data = label
            layer.metadata = meta
            layer.name = name
            # Undo steps of the previous case make no sense here: toggling ``editable`` is
            # napari's public way to drop the history (the paint mode is kept).
            mode = layer.mode
            layer.editable = False
            layer.editable = True
            layer.mode = mode
        layers.selection.active = self._label_layer
        grid = (label.shape, tuple(scale), tuple(translate))
        if grid != self._grid:
            self._grid = grid
            self.viewer.reset_view()
        self._centre_on(label, scale, translate)

    @staticmethod
    def _set_grid(layer, scale, translate) -> None:
        if not np.allclose(layer.scale[-3:], scale):
            layer.scale = scale
        if not np.allclose(layer.translate[-3:], translate):
            layer.translate = translate

    def _centre_on(self, label: np.ndarray, scale, translate) -> None:
        """Move the slice to the middle of the segmentation (the tumour), unless the slice
        shown already cuts through it (moving re-slices every layer: ~0.1 s)."""
        dims = self.viewer.dims
        offset = dims.ndim - 3
        axes = [axis for axis in range(3) if axis + offset in dims.not_displayed]
        if not axes or not label.any():
            return
        index = [int(round((dims.point[a + offset] - translate[a]) / scale[a])) for a in axes]
        if all(0 <= i < label.shape[a] for i, a in zip(index, axes, strict=True)):
            cut = label[tuple(index[axes.index(a)] if a in axes else slice(None)
                              for a in range(3))]
            if cut.any():
                return
        centre = np.argwhere(label > 0).mean(axis=0)
        dims.set_point([a + offset for a in axes],
                       [float(translate[a] + scale[a] * centre[a]) for a in axes])

    def _clear_layers(self) -> None:
        layers = self.viewer.layers
        for layer in [*self._image_layers.values(), self._label_layer]:
            if layer is not None and layer in layers:
                layers.remove(layer)
        self._image_layers.clear()
        self._label_layer = None
        self._grid = None

    def _finish(self) -> None:
        self.current, self.current_id = None, None
        self.autosave_timer.stop()
        self._clear_layers()
        self.case_list.clearSelection()
        done, total = self.review.progress()
        left = [c.case_id for c in self.review.cases if c.status in ("to do", "skipped")]
        self.case_label.setText(f"No case left to review: {done} / {total} reviewed."
                                if not left else f"{len(left)} case(s) left.")
        self.case_shown.emit("")

    # ------------------------------------------------------------------ drafts
    def autosave_draft(self) -> bool:
        """Save the edited mask of the case on screen as its draft if it changed since the last
        save; True when a draft was written."""
        if self.review is None or self.current is None or self._label_layer is None:
            return False
        if self._label_layer.metadata.get("case_id") != self.current.case_id:
            return False
        data = np.asarray(self._label_layer.data)
        if self._draft_state is not None and np.array_equal(data, self._draft_state):
            return False
        try:
            self.review.save_draft(self.current, data)
        except USER_ERRORS as err:
            self._say(f"Draft of {self.current.case_id} not saved: {err}", err)
            return False
        self._draft_state = data.copy()
        self._own_drafts.add(self.current.case_id)
        return True

    # ------------------------------------------------------------------ decisions
    def accept_and_next(self) -> ReviewRecord | None:
        """Accept the model output (unedited) and show the next case to review."""
        return self._decide("accepted")

    def save_correction_and_next(self) -> ReviewRecord | None:
        """Save the edited mask as a correction and show the next case to review."""
        return self._decide("corrected")

    def reject(self, reason: str | None = None) -> ReviewRecord | None:
        """Reject the case (reason: the combo's, unless given) and go on."""
        if reason is not None:
            self.reason_combo.setCurrentText(reason)
        return self._decide("rejected", reason=self.reason_combo.currentText())

    def skip(self) -> ReviewRecord | None:
        """Skip the case (it stays to be reviewed, after the others) and go on."""
        return self._decide("skipped")

    def _decide(self, decision: str, reason: str | None = None) -> ReviewRecord | None:
        if self.review is None:
            self._say("Open a session first.")
            return None
        case_id = self.current_id
        if case_id is None:
            self._say("No case on screen.")
            return None
        needs_mask = decision in ("accepted", "corrected")
        if needs_mask and self.current is None:
            self._say(f"{case_id} is still loading; decide once it is on screen.")
            return None
        if decision == "skipped":  # coming back later: keep the edits made so far
            self.autosave_draft()
        target = self.current if self.current is not None else case_id
        label = np.asarray(self._label_layer.data) if needs_mask else None
        kwargs = dict(label=label, reason=reason, note=self.note_edit.text().strip(),
                      reviewer=self.reviewer_edit.text().strip() or None)
        try:
            try:
                record = self.review.decide(target, decision, **kwargs)
            except AlreadyReviewedError as err:
                if not self.ask(f"{err}\n\nRecord the new decision ({decision}) instead?"):
                    self._say(f"{case_id}: kept the earlier decision.")
                    return None
                record = self.review.decide(target, decision, replace=True, **kwargs)
        except USER_ERRORS as err:
            self._say(f"{case_id} not {decision}: {err}", err)
            return None
        self.last_record = record
        if decision != "skipped":
            self._own_drafts.discard(case_id)
        self._cache.pop(case_id, None)  # shown again: loaded afresh (with its draft, if any)
        self.current = None  # decided: nothing to autosave when it leaves the screen
        self.note_edit.clear()
        self._refresh_item(case_id)
        self._update_progress()
        detail = (f", {record.changed_voxels} voxel(s) changed"
                  if record.changed_voxels is not None else "")
        self._say(f"{case_id}: {decision}{f' ({reason})' if reason else ''}{detail}, "
                  f"{record.seconds or 0:.0f} s. {self.review.progress_text()}")
        upcoming = self.review.next_case(case_id)
        if upcoming is None:
            self._leave_current()
            self._finish()
        else:
            self.show_case(upcoming)
        return record

    # ------------------------------------------------------------------ summary
    def write_summary(self) -> list[Path] | None:
        """Write review_summary.csv/.md/.png into the session folder (replacing earlier ones)."""
        if self.review is None:
            self._say("Open a session first.")
            return None
        from ciml_core.review.summary import write_summary

        try:
            paths = write_summary([self.review.folder], overwrite=True)
        except USER_ERRORS as err:
            self._say(f"Summary not written: {err}", err)
            return None
        self._say(f"Summary: {paths[1]} ({paths[0].name}, {paths[2].name})")
        notify_info(f"CIML: review summary written to {paths[1]}")
        return paths
