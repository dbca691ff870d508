"""State the plugin's widgets share per viewer: the model, the model's outputs, the explanations.

Widgets stay independent (each can be opened alone) but talk through one :class:`CimlSession`
per viewer: Segment records the model it used and its unedited output (Review computes the Dice
between that and the saved mask), Explain publishes its results and the Complementary-weights
chart redraws on :attr:`CimlSession.explanations_changed`.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal

from ciml_core.checkpoint import LoadedModel, load_checkpoint, resolve_checkpoint

DEMO = "demo"


@dataclass
class PredictionInfo:
    """What one Segment run produced (kept for Review and Explain)."""

    layer_name: str
    case_id: str
    model_ref: str
    model_sha256: str
    label_convention: str
    regions: tuple[str, ...]
    mapping: dict[str, str]  # model modality -> image layer name
    label: np.ndarray = field(repr=False)  # the unedited model output
    # per-region probabilities (R, *grid): Explain reuses them instead of predicting again
    probabilities: np.ndarray | None = field(default=None, repr=False)

    def matches(self, case_id: str, model_sha256: str, mapping: dict[str, str | None]) -> bool:
        """True when this prediction was made on the same layers with the same model."""
        return (self.case_id == case_id and self.model_sha256 == model_sha256
                and self.mapping == {m: str(n) for m, n in mapping.items()})


class CimlSession:
    """Per-viewer shared state; get it with :func:`get_session`."""

    #: a Segment run finished (argument: :class:`PredictionInfo`)
    prediction_added = Signal(object)
    #: Explain finished (argument: the list of ``PairExplanation``)
    explanations_changed = Signal(object)

    def __init__(self) -> None:
        self.model_ref: str = DEMO
        self.mapping: dict[str, str | None] = {}
        self.predictions: dict[str, PredictionInfo] = {}  # prediction id -> info
        self.explanations: list[Any] = []
        self.explanation_case: str | None = None
        # One heavy job on the model at a time: Segment and Explain share the network, and
        # Grad-CAM's hooks must not see another thread's forward pass.
        self.model_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: tuple[tuple, LoadedModel] | None = None
        self.shortcuts_installed = False

    def load_model(self, ref: str | None = None) -> LoadedModel:
        """Load (or reuse) the checkpoint ``ref`` (default: the current one), on the CPU."""
        ref = self.model_ref if ref is None else ref
        folder = resolve_checkpoint(ref)
        weights = folder / "model.safetensors"
        stamp = weights.stat().st_mtime_ns if weights.exists() else None
        key = (str(Path(folder).resolve()), stamp)
        with self._cache_lock:
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        loaded = load_checkpoint(ref, device="cpu")
        with self._cache_lock:
            self._cache = (key, loaded)
        return loaded

    def add_prediction(self, prediction_id: str, info: PredictionInfo) -> None:
        self.predictions[prediction_id] = info
        self.prediction_added.emit(info)

    def latest_prediction(self, case_id: str, model_sha256: str,
                          mapping: dict[str, str | None]) -> PredictionInfo | None:
        """The newest prediction of this case with this model and these layers, if any."""
        for info in reversed(list(self.predictions.values())):
            if info.matches(case_id, model_sha256, mapping):
                return info
        return None

    def set_explanations(self, explanations: list[Any], case_id: str | None) -> None:
        self.explanations = list(explanations)
        self.explanation_case = case_id
        self.explanations_changed.emit(self.explanations)


_SESSIONS: dict[int, CimlSession] = {}


def get_session(viewer) -> CimlSession:
    """The :class:`CimlSession` of ``viewer`` (created on first use, dropped with the viewer)."""
    # napari hands plugin widgets a PublicOnlyProxy of the viewer (a new one per widget): key
    # the session on the viewer itself so that every widget of a window shares it.
    viewer = getattr(viewer, "__wrapped__", viewer)
    key = id(viewer)
    session = _SESSIONS.get(key)
    if session is None:
        session = _SESSIONS[key] = CimlSession()
        weakref.finalize(viewer, _SESSIONS.pop, key, None)
    return session
