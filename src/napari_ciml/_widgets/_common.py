"""Pieces the dock widgets share: notifications, layer combos, background jobs, result layers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
from napari.utils import notifications
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from ciml_core.errors import Cancelled, CimlError
from ciml_core.infer import ProgressFn
from ciml_core.runtime import background_threads, torch_threads
from napari_ciml._layers import ROLE
from napari_ciml._session import get_session

#: Exceptions that are the user's input, not a bug: shown as one readable notification.
USER_ERRORS = (CimlError, ValueError, OSError)
NONE_TEXT = "(none)"


def notify_error(error: BaseException | str) -> None:
    """Show an error the way napari shows errors (a notification), with ciml_core's message."""
    notifications.show_error(str(error))


def notify_info(message: str) -> None:
    notifications.show_info(message)


class ProgressRelay(QObject):
    """Carries ``(done, total)`` from a worker thread to the GUI thread (a queued signal)."""

    progress = Signal(int, int)


T = TypeVar("T")


def background_torch() -> AbstractContextManager[None]:
    """Torch threads for a job beside the GUI thread: every core but one
    (:func:`ciml_core.runtime.background_threads`), restored afterwards."""
    return torch_threads(background_threads())


def run_model_job(session, ref: str, work: Callable[[Any, ProgressFn], T], *, what: str,
                  should_stop: Callable[[], bool], relay: ProgressRelay) -> T:
    """The background part of a model run (Segment, Explain): ``work(loaded, progress)``.

    Waits for the session's model lock (another widget's run may hold the model), loads the
    checkpoint ``ref`` with :func:`background_torch` threads and calls ``work`` with the loaded
    model and a ``progress(done, total)`` callback for ciml_core that relays every report to the
    widget's progress bar. :class:`~ciml_core.errors.Cancelled` ("<what> cancelled") is raised
    as soon as ``should_stop()`` is true (while waiting, after loading, at each report) and when
    the widget was closed. ``should_stop`` and ``relay`` are what :meth:`JobWidget._launch`
    passes.
    """

    def check() -> None:
        if should_stop():
            raise Cancelled(f"{what} cancelled")

    def progress(done: int, total: int) -> None:
        check()
        try:
            relay.progress.emit(done, total)
        except RuntimeError:  # the widget (and its relay) was closed: stop quietly
            raise Cancelled(f"{what} cancelled (widget closed)") from None

    while not session.model_lock.acquire(timeout=0.05):  # another run may hold the model
        check()
    try:
        with background_torch():
            loaded = session.load_model(ref)
            check()
            return work(loaded, progress)
    finally:
        session.model_lock.release()


def start_job(func: Callable[..., Any], *args: Any, on_result: Callable[[Any], None],
              on_error: Callable[[BaseException], None], on_finished: Callable[[], None],
              **kwargs: Any):
    """Run ``func`` in a napari background worker; results and errors come back in the GUI
    thread. napari lists the job in its activity/status bar (with its own cancel button)."""
    from napari.qt.threading import create_worker

    worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True, **kwargs)
    worker.returned.connect(on_result)
    worker.errored.connect(on_error)
    worker.finished.connect(on_finished)
    worker.start()
    return worker


#: Pause between two GUI steps of a result (ms).
STEP_PAUSE_MS = 15


def run_steps(steps: list[Callable[[], None]], done: Callable[[], None],
              error: Callable[[BaseException], None]) -> None:
    """Run ``steps`` in the GUI thread one per event-loop turn, then ``done``.

    Adding a napari layer costs ~0.1 s of GUI-thread time (vispy node, texture); adding a
    dozen in one slot would freeze the viewer for a second. One layer per turn keeps every
    pause short while the result appears. A step raising one of :data:`USER_ERRORS` stops
    the chain and goes to ``error`` (then ``done``).
    """
    from qtpy.QtCore import QTimer

    remaining = list(steps)
    # A zero-delay single shot can run before overdue timers and paint events; a short delay
    # gives the event loop a real turn between two layers.

    def step() -> None:
        if not remaining:
            done()
            return
        try:
            remaining.pop(0)()
        except USER_ERRORS as err:
            remaining.clear()
            error(err)
        QTimer.singleShot(STEP_PAUSE_MS, step)

    QTimer.singleShot(0, step)


def available_devices() -> tuple[list[str], str | None]:
    """Devices this machine can run on (``auto`` first) and, without CUDA, why not."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return devices, None
    if torch.version.cuda is None:
        reason = f"CUDA unavailable: torch {torch.__version__} is a CPU-only build"
    else:
        reason = (f"CUDA unavailable: torch {torch.__version__} (CUDA {torch.version.cuda}) sees "
                  "no GPU (no driver, or CUDA_VISIBLE_DEVICES hides it)")
    return devices, reason


def add_device_row(form: QFormLayout) -> tuple[QComboBox, QLabel]:
    """A "Device" combo (auto, cpu, cuda:i) and, without CUDA, a label saying why not."""
    combo = QComboBox()
    devices, reason = available_devices()
    combo.addItems(devices)
    label = QLabel(reason or "")
    label.setWordWrap(True)
    label.setVisible(reason is not None)
    if reason:
        combo.setToolTip(reason)
    form.addRow("Device", combo)
    form.addRow("", label)
    return combo, label


NATIVE_SPACING_TEXT = "Run at native spacing"


def add_native_spacing_row(form: QFormLayout) -> QCheckBox:
    """The "Run at native spacing" checkbox (off: a case is resampled to the model's target
    spacing and the results back, as ``InferenceSettings.native_spacing`` says)."""
    check = QCheckBox(NATIVE_SPACING_TEXT)
    check.setChecked(False)
    check.setToolTip("Off (default): a case whose voxel spacing differs from the spacing the "
                     "model was trained at is resampled to it, and the results back onto the "
                     "image grid. On: run on the image's own voxels (models that record no "
                     "spacing always do).")
    form.addRow(check)
    return check


def spacing_summary(spacing) -> str:
    """How the model treats voxel spacing, for a model summary line."""
    from ciml_core.data.preprocess import format_spacing

    if spacing is None:
        return "spacing not recorded (runs at native spacing)"
    return f"trained at {format_spacing(spacing)}"


def fill_combo(combo: QComboBox, names: list[str], current: str | None, *,
               allow_none: bool = False) -> None:
    """Refill a combo with ``names`` (plus '(none)'), keeping ``current`` when still present."""
    combo.blockSignals(True)
    try:
        combo.clear()
        if allow_none:
            combo.addItem(NONE_TEXT)
        combo.addItems(names)
        if current is not None and current in names:
            combo.setCurrentText(current)
        elif allow_none:
            combo.setCurrentIndex(0)
    finally:
        combo.blockSignals(False)


def combo_value(combo: QComboBox) -> str | None:
    text = combo.currentText()
    return None if not text or text == NONE_TEXT else text


def find_layer(layers: Iterable, name: str, role: str):
    """The layer called ``name`` that a widget made with ``metadata[ROLE] == role``, or None."""
    for layer in layers:
        if layer.name == name and layer.metadata.get(ROLE) == role:
            return layer
    return None


def replace_or_add_layer(viewer, kind: str, name: str, data: Any, *, role: str, metadata: dict,
                         scale: Sequence[float], translate: Sequence[float],
                         keep_previous: bool = False, refresh: Sequence[str] = (),
                         on_replace: Callable[[Any], None] | None = None, **style: Any):
    """Show a result as the layer ``name``; returns the layer.

    The layer called ``name`` with ``metadata[ROLE] == role`` gets the new data, metadata
    (``role`` included by the caller), grid and the ``style`` keys named in ``refresh`` (the
    others are the user's to change); ``on_replace(layer)`` runs first, while the layer still
    holds the previous result. Without such a layer, or with ``keep_previous``, a new one is
    added with ``viewer.add_<kind>`` (napari makes its name unique) and every ``style`` key.
    """
    old = None if keep_previous else find_layer(viewer.layers, name, role)
    if old is None:
        add = getattr(viewer, f"add_{kind}")
        return add(data, name=name, metadata=metadata, scale=scale, translate=translate,
                   **style)
    if on_replace is not None:
        on_replace(old)
    old.data = data
    old.metadata = metadata
    old.scale, old.translate = scale, translate
    for key in refresh:
        setattr(old, key, style[key])
    return old


class CimlWidget(QWidget):
    """Base of the dock widgets: the viewer, its :class:`CimlSession`, layer-change refreshes."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        events = napari_viewer.layers.events
        events.inserted.connect(self._on_layer_inserted)
        events.removed.connect(self._on_layers_changed)
        events.reordered.connect(self._on_layers_changed)
        for layer in napari_viewer.layers:
            layer.events.name.connect(self._on_layers_changed)

    def _on_layer_inserted(self, event) -> None:
        event.value.events.name.connect(self._on_layers_changed)
        self._on_layers_changed()

    def _on_layers_changed(self, event=None) -> None:
        try:
            self.refresh_layers()
        except RuntimeError:  # the Qt side of a closed dock widget is gone; nothing to refresh
            pass

    def refresh_layers(self) -> None:
        """Update the layer choices (override)."""


class JobWidget(CimlWidget):
    """A widget that runs one ciml_core job at a time in a napari background worker.

    Subclasses build ``run_button``, ``cancel_button``, ``progress_bar`` and ``status_label``,
    start a job with :meth:`_launch` and turn its result into GUI steps
    (:meth:`_result_steps`, one layer per step, see :func:`run_steps`). The job gets
    ``should_stop`` and ``relay`` keyword arguments: it reports ``relay.progress.emit(done,
    total)`` and raises :class:`~ciml_core.errors.Cancelled` when ``should_stop()`` is true,
    which is what ciml_core's ``progress`` callbacks are for; :func:`run_model_job` does both
    for a job that runs the session's model.
    """

    #: emitted in the GUI thread when a run is over: "done", "cancelled" or "error"
    run_finished = Signal(str)
    job_title = "CIML"

    run_button: QPushButton
    cancel_button: QPushButton
    progress_bar: QProgressBar
    status_label: QLabel

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer)
        self.worker = None
        self.last_error: str | None = None
        self._outcome = "error"
        self._worker_done = True
        self._steps_pending = False
        self._cancel = threading.Event()
        self._relay = ProgressRelay()
        self._relay.progress.connect(self._on_progress)
        self._pbar = None

    def _add_run_controls(self, layout, progress_format: str | None = None) -> None:
        """Run / Cancel buttons, a progress bar and a status line at the bottom of ``layout``."""
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress_bar = QProgressBar()
        if progress_format:
            self.progress_bar.setFormat(progress_format)
        layout.addWidget(self.progress_bar)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    @property
    def busy(self) -> bool:
        """True from Run until the result is on screen (or the run failed / was cancelled)."""
        return self.worker is not None

    def _launch(self, func: Callable[..., Any], *args: Any, **kwargs: Any):
        self._cancel.clear()
        self._outcome, self._worker_done, self._steps_pending = "error", False, False
        self._set_running(True)
        self.worker = start_job(func, *args, should_stop=self._should_stop, relay=self._relay,
                                on_result=self._on_result, on_error=self._on_error,
                                on_finished=self._on_finished, **kwargs)
        return self.worker

    def _launch_model_job(self, work: Callable[[Any, ProgressFn], Any], *, what: str):
        """Start :func:`run_model_job`: ``work(loaded, progress)`` on the session's model."""
        return self._launch(run_model_job, self.session, self.session.model_ref, work,
                            what=what)

    def cancel(self) -> None:
        """Ask the running job to stop at its next progress report; no layer is changed."""
        if self.worker is not None and not self._worker_done:
            self._cancel.set()
            self.status_label.setText("Cancelling…")

    def _should_stop(self) -> bool:
        # our Cancel button, or napari's own cancel in its status bar (worker.quit())
        worker = self.worker
        return self._cancel.is_set() or bool(worker is not None and worker.abort_requested)

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running or self._outcome != "done":  # a finished run keeps its full bar
            self.progress_bar.setValue(0)
        if running:
            from napari.utils import progress

            self._pbar = progress(total=0, desc=self.job_title)
        elif self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def _on_progress(self, done: int, total: int) -> None:
        self.progress_bar.setMaximum(total)
        self.progress_bar.setValue(done)
        if self._pbar is not None:
            self._pbar.total = total
            self._pbar.update(done - self._pbar.n)

    def _on_error(self, err: BaseException) -> None:
        if isinstance(err, Cancelled):
            self._outcome = "cancelled"
            self.status_label.setText("Cancelled; no layer was changed.")
            notify_info(f"CIML: {err}")
            return
        self._outcome = "error"
        self.last_error = str(err)
        self.status_label.setText(f"Failed: {err}")
        notify_error(err)

    def _on_result(self, result: Any) -> None:
        try:
            steps = self._result_steps(result)
        except USER_ERRORS as err:  # e.g. a layer removed while the job ran
            self._on_error(err)
            return
        self._outcome, self._steps_pending = "done", True
        run_steps(steps, self._after_steps, self._on_error)

    def _after_steps(self) -> None:
        self._steps_pending = False
        if self._outcome == "done":
            self._result_shown()
        if self._worker_done:
            self._complete()

    def _on_finished(self) -> None:
        self._worker_done = True
        if not self._steps_pending:
            self._complete()

    def _complete(self) -> None:
        self.worker = None
        try:
            self._set_running(False)
        except RuntimeError:  # closed meanwhile
            return
        outcome, self._outcome = self._outcome, "error"
        self.run_finished.emit(outcome)

    def _result_steps(self, result: Any) -> list[Callable[[], None]]:
        """GUI steps that show ``result`` (override)."""
        raise NotImplementedError

    def _result_shown(self) -> None:
        """Called once every step ran (override: status text, session updates)."""
