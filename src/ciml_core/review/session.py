"""A review session: one reviewer going through a whole dataset, case after case.

A session pairs the cases of a dataset (any layout :func:`~ciml_core.data.layouts.discover_cases`
knows, or a manifest) with the model's segmentation of each: a ``ciml-core predict`` output
folder (``<case_id>.nii.gz``, paired by case id as ``ciml-core evaluate`` pairs them), or, for
the cases it lacks, the segmentation computed on the fly with a chosen model. It lives in its own
folder::

    SESSION/session.json          dataset, predictions, model (and its sha256), reviewer, created,
                                  label convention, the case list
    SESSION/reviews.jsonl         one record per decision (ciml_core.review.record)
    SESSION/<case_id>.nii.gz      the final mask of an accepted or corrected case (input affine)
    SESSION/drafts/<case_id>.*    the autosaved edits of a case not decided yet
    SESSION/model_output/         the segmentations computed on the fly (kept: resuming does not
                                  compute them again)
    SESSION/superseded/           masks replaced by a later decision (never deleted)

The status of a case is its latest decision in ``reviews.jsonl`` (``to do`` without one).
Re-opening the folder resumes at the first case still to do. The dataset and prediction folders
are only read: the session folder may not lie inside them.

Nothing here needs a GUI; the napari Review-session widget drives this class.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ciml_core.data.labels import get_convention, validate_label_values
from ciml_core.data.layouts import DEFAULT_LABEL_CONVENTION, CaseFiles, discover_cases
from ciml_core.data.nifti import NiftiSource, grid_mismatch, load_volume, write_like
from ciml_core.errors import CimlError, ConfigError, GeometryError, InputDataError
from ciml_core.io import atomic_write_text, is_inside, link_or_copy
from ciml_core.review.record import (
    REJECT_REASONS,
    REVIEW_LOG,
    SESSION_DECISIONS,
    ReviewRecord,
    model_agreement,
    read_reviews,
    record_decision,
    review_output_path,
    save_review,
)

SESSION_FILE = "session.json"
DRAFTS = "drafts"
MODEL_OUTPUT = "model_output"
SUPERSEDED = "superseded"
SESSION_FORMAT = "ciml-review-session"
SESSION_VERSION = 1

TODO = "to do"
#: Every status a case can have, in the order lists show them.
STATUSES = (TODO, *SESSION_DECISIONS)
#: Statuses that count as reviewed in the progress ("12 / 40 reviewed"); a skipped case is
#: still to be reviewed, later.
REVIEWED = ("accepted", "corrected", "rejected")


class AlreadyReviewedError(CimlError, ValueError):
    """A new decision for a case that already has one, without ``replace=True``."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _resolved(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def header_source(path: str | os.PathLike) -> NiftiSource:
    """The :class:`NiftiSource` of a NIfTI file from its header alone (no voxel is read)."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise InputDataError(f"{path}: not a readable NIfTI file ({err})") from err
    if len(img.shape) < 3 or any(int(s) != 1 for s in img.shape[3:]):
        raise InputDataError(f"{path}: expected a 3-D volume, the header says {img.shape}")
    return NiftiSource.from_affine(img.shape, img.affine, path, header=img.header)


def prediction_off_grid(prediction: NiftiSource, image: NiftiSource, case_id: str) -> str | None:
    """Why ``prediction`` does not lie on the grid of ``image`` (canonical order), or None
    (:func:`~ciml_core.data.nifti.grid_mismatch`)."""
    return grid_mismatch(prediction, image, what=("the prediction", "the image"),
                         context=f"case {case_id}: ",
                         hint="a prediction must lie on its images' grid")


@dataclass
class SessionCase:
    """One case of a session: its files, where its model output comes from, its status."""

    case_id: str
    files: CaseFiles | None  # None: the case is no longer in the dataset
    prediction: Path | None  # the model output file (predictions folder or model_output/)
    #: "predictions" (the predictions folder), "computed" (model_output/), "model" (to be
    #: computed with the session's model) or "missing" (neither: see ``problem``)
    origin: str
    problem: str | None = None  # why the model output cannot be shown (the case is marked)
    status: str = TODO
    last: dict[str, Any] | None = None  # the latest record


@dataclass
class Draft:
    """Edits autosaved for a case not decided yet."""

    label: np.ndarray = field(repr=False)
    saved: str | None  # ISO time of the autosave
    seconds: float  # time spent on the case when it was saved
    changed_voxels: int | None


@dataclass
class ReviewCase:
    """A case loaded for review: images, the model output, the draft if there is one."""

    case_id: str
    modalities: tuple[str, ...]
    images: np.ndarray = field(repr=False)  # (M, X, Y, Z) float32, canonical voxel order
    reference: NiftiSource  # the grid; saved masks carry its affine and header
    model_label: np.ndarray | None = field(repr=False)  # None: see ``problem``
    label_convention: str
    prediction: Path | None
    problem: str | None = None
    draft: Draft | None = None
    inputs: tuple[Path, ...] = ()

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.reference.spacing

    @property
    def translate(self) -> tuple[float, ...]:
        return tuple(float(t) for t in self.reference.canonical_affine[:3, 3])

    def image(self, modality: str) -> np.ndarray:
        return self.images[self.modalities.index(modality)]

    def changed_voxels(self, label: np.ndarray) -> int | None:
        if self.model_label is None:
            return None
        return int(np.count_nonzero(np.asarray(label) != self.model_label))


class ReviewSession:
    """A reviewer's pass over a dataset; see the module docstring. Open with :meth:`open`."""

    def __init__(self, folder: Path, meta: dict[str, Any], cases: list[SessionCase],
                 warnings: list[str], reviewer: str) -> None:
        self.folder = folder
        self.meta = meta
        self.cases = cases
        self.warnings = warnings
        self.reviewer = reviewer
        self._by_id = {c.case_id: c for c in cases}
        self._model = None
        self._model_lock = threading.Lock()
        self._predict_lock = threading.Lock()
        self._clock_lock = threading.Lock()
        self._spent: dict[str, float] = {}
        self._current: tuple[str, float] | None = None
        self._read_log()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        dataset: str | os.PathLike | None = None,
        *,
        predictions: str | os.PathLike | None = None,
        model: str | os.PathLike | None = None,
        reviewer: str | None = None,
        layout: str = "auto",
        label_convention: str | None = None,
    ) -> ReviewSession:
        """Open the session in ``folder``, creating it when it holds no ``session.json``.

        Re-opening needs no argument but the folder; arguments given must match the session's
        (a session folder of another dataset is refused, naming both).

        Args:
            folder: the session folder (created; never inside the dataset or predictions).
            dataset: a dataset root, a case folder or a manifest (.csv/.json).
            predictions: a ``ciml-core predict`` output folder (``<case_id>.nii.gz``).
            model: ``"demo"`` or a checkpoint folder, to compute the segmentations the
                predictions folder lacks (or all of them without a predictions folder).
            reviewer: the reviewer's name (required to create a session; records carry it).
            label_convention: of the masks (default: the model's, else the layout's).

        Raises:
            ConfigError: missing arguments, a session of another dataset / predictions / model,
                a folder holding single-case reviews.
            InputDataError: a dataset or predictions folder that cannot be read, a session
                folder inside them.
        """
        folder = Path(folder).expanduser()
        meta_path = folder / SESSION_FILE
        if meta_path.is_file():
            meta = cls._read_meta(meta_path)
            for key, given in (("dataset", dataset), ("predictions", predictions)):
                if given is not None and _resolved(given) != meta.get(key):
                    raise ConfigError(
                        f"session folder {folder} belongs to {key} {meta.get(key)}, not "
                        f"{_resolved(given)}; open it without a {key} to continue that session, "
                        "or choose another session folder")
            if model is not None and cls._model_ref(model) != meta.get("model"):
                raise ConfigError(
                    f"session folder {folder} was made with model {meta.get('model')}, not "
                    f"{cls._model_ref(model)}; choose another session folder for another model")
            if label_convention is not None and label_convention != meta["label_convention"]:
                raise ConfigError(f"session folder {folder} uses label convention "
                                  f"{meta['label_convention']}, not {label_convention}")
            reviewer = (reviewer or "").strip() or meta["reviewer"]
        else:
            meta = cls._new_meta(folder, dataset, predictions, model, reviewer, layout,
                                 label_convention)
            reviewer = meta["reviewer"]
        cases, warnings = cls._pair(folder, meta)
        cls._check_outside_inputs(folder, meta, cases)
        if not meta_path.is_file():
            meta["cases"] = [c.case_id for c in cases]
            folder.mkdir(parents=True, exist_ok=True)
            # Not overwritten: two reviewers creating the same session at once -> one wins.
            atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
        return cls(folder, meta, cases, warnings, reviewer)

    @staticmethod
    def _model_ref(model: str | os.PathLike) -> str:
        return "demo" if str(model) == "demo" else str(Path(model).expanduser().resolve())

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputDataError(f"{path}: cannot read the session file ({err})") from err
        if not isinstance(meta, dict) or meta.get("format") != SESSION_FORMAT:
            raise InputDataError(f"{path}: not a review session file (expected format "
                                 f"{SESSION_FORMAT!r})")
        missing = [k for k in ("dataset", "layout", "label_convention", "reviewer", "cases")
                   if k not in meta]
        if missing:
            raise InputDataError(f"{path}: session file lacks {missing}")
        return meta

    @classmethod
    def _new_meta(cls, folder: Path, dataset, predictions, model, reviewer, layout,
                  label_convention) -> dict[str, Any]:
        if dataset is None:
            raise ConfigError(f"{folder} holds no {SESSION_FILE}: give the dataset (and a "
                              "predictions folder or a model) to start a review session there")
        reviewer = (reviewer or "").strip()
        if not reviewer:
            raise ConfigError("reviewer: the reviewer's name is required to start a session")
        if predictions is None and model is None:
            raise ConfigError("give a predictions folder (ciml-core predict output), a model to "
                              "compute the segmentations, or both")
        if (folder / REVIEW_LOG).exists():
            raise ConfigError(f"{folder} holds a {REVIEW_LOG} but no {SESSION_FILE} (reviews "
                              "saved one case at a time); choose a new folder for the session")
        files = discover_cases(dataset, layout)
        layout = files[0].layout
        if predictions is not None and not Path(predictions).is_dir():
            raise InputDataError(f"{predictions}: predictions folder not found")
        sha = None
        convention = label_convention
        if model is not None:
            from ciml_core.checkpoint import read_checkpoint_config

            document = read_checkpoint_config(model)  # verifies the weights' hash
            sha = document["weights_sha256"]
            model_convention = document.get("label_convention")
            if convention is not None and model_convention and convention != model_convention:
                raise ConfigError(f"label convention {convention} differs from the model's "
                                  f"{model_convention}")
            convention = convention or model_convention
        convention = convention or DEFAULT_LABEL_CONVENTION.get(layout, "binary")
        get_convention(convention)
        return {
            "format": SESSION_FORMAT, "version": SESSION_VERSION,
            "dataset": _resolved(dataset), "layout": layout,
            "predictions": _resolved(predictions),
            "model": None if model is None else cls._model_ref(model), "model_sha256": sha,
            "label_convention": convention, "reviewer": reviewer, "created": _now(),
        }

    @staticmethod
    def _check_outside_inputs(folder: Path, meta: dict[str, Any],
                              cases: list[SessionCase]) -> None:
        dataset = Path(meta["dataset"])
        roots = {dataset if dataset.is_dir() else dataset.parent}
        if meta.get("predictions"):
            roots.add(Path(meta["predictions"]))
        for case in cases:  # a manifest's images may live anywhere
            if case.files is not None:
                roots.update(p.parent for p in case.files.images.values())
        for root in sorted(roots):
            if is_inside(folder, root):
                raise InputDataError(f"session folder {folder} is inside the input folder "
                                     f"{root}; a review never writes into its inputs (choose a "
                                     "folder outside)")

    @staticmethod
    def _pair(folder: Path, meta: dict[str, Any]) -> tuple[list[SessionCase], list[str]]:
        """The dataset's cases with their model output, problems marked (never dropped)."""
        discovered = {c.case_id: c for c in discover_cases(meta["dataset"], meta["layout"])}
        ids = meta.get("cases") or list(discovered)
        warnings = []
        extra = sorted(set(discovered) - set(ids))
        if extra:
            warnings.append(f"{len(extra)} case(s) of {meta['dataset']} are newer than the "
                            f"session and not in it: {', '.join(extra[:5])}")
        predictions: dict[str, Path] = {}
        if meta.get("predictions"):
            from ciml_core.evaluate import find_predictions

            predictions = find_predictions(meta["predictions"])
            orphans = sorted(set(predictions) - set(discovered))
            if orphans:
                warnings.append(f"{len(orphans)} prediction(s) in {meta['predictions']} match no "
                                f"case of the dataset: {', '.join(orphans[:5])}")
        cases = []
        for case_id in ids:
            files = discovered.get(case_id)
            computed = folder / MODEL_OUTPUT / f"{case_id}.nii.gz"
            if case_id in predictions:
                case = SessionCase(case_id, files, predictions[case_id], "predictions")
            elif computed.is_file():
                case = SessionCase(case_id, files, computed, "computed")
            elif meta.get("model"):
                case = SessionCase(case_id, files, None, "model")
            else:
                where = meta.get("predictions")
                case = SessionCase(case_id, files, None, "missing",
                                   problem=f"case {case_id}: no prediction {case_id}.nii.gz in "
                                   f"{where} and no model to compute one")
            if files is None:
                case.problem = f"case {case_id} is no longer in {meta['dataset']}"
            elif case.prediction is not None and files.images:
                try:
                    image = header_source(next(iter(files.images.values())))
                    case.problem = prediction_off_grid(header_source(case.prediction), image,
                                                       case_id)
                except InputDataError as err:
                    case.problem = f"case {case_id}: {err}"
            cases.append(case)
        problems = [c for c in cases if c.problem]
        if problems:
            warnings.append(f"{len(problems)} case(s) have no usable model output (marked in "
                            f"the list): {', '.join(c.case_id for c in problems[:5])}")
        return cases, warnings

    def _read_log(self) -> None:
        log = self.folder / REVIEW_LOG
        records = read_reviews(log, strict=False) if log.is_file() else []
        unknown = set()
        for record in records:
            case = self._by_id.get(record.get("case_id"))
            if case is None:
                unknown.add(record.get("case_id"))
                continue
            if record.get("decision") in SESSION_DECISIONS:
                case.status, case.last = record["decision"], record
        if unknown:
            self.warnings.append(f"{log}: records of {len(unknown)} case(s) not in the session")

    # ------------------------------------------------------------------ properties
    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    @property
    def predictions(self) -> str | None:
        return self.meta.get("predictions")

    @property
    def model_ref(self) -> str | None:
        return self.meta.get("model")

    @property
    def model_sha256(self) -> str | None:
        return self.meta.get("model_sha256")

    @property
    def label_convention(self) -> str:
        return self.meta["label_convention"]

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def case(self, case_id: str) -> SessionCase:
        try:
            return self._by_id[case_id]
        except KeyError:
            raise ConfigError(f"case {case_id!r} is not in the session {self.folder}") from None

    def status(self, case_id: str) -> str:
        return self.case(case_id).status

    def progress(self) -> tuple[int, int]:
        """(cases reviewed, cases in the session): accepted, corrected and rejected count."""
        return sum(c.status in REVIEWED for c in self.cases), len(self.cases)

    def progress_text(self) -> str:
        done, total = self.progress()
        return f"{done} / {total} reviewed"

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for case in self.cases:
            counts[case.status] += 1
        return counts

    def next_case(self, after: str | None = None) -> str | None:
        """The next case to review after ``after`` (wrapping round): the first to do, else the
        first skipped one; None when every case is reviewed. ``after=None``: from the start
        (where re-opening resumes)."""
        ids = self.case_ids
        start = 0 if after is None else ids.index(after) + 1
        order = ids[start:] + ids[:start]
        for wanted in (TODO, "skipped"):
            for case_id in order:
                if case_id != after and self._by_id[case_id].status == wanted:
                    return case_id
        return None

    def resume_case(self) -> str | None:
        """Where re-opening lands: the first case to do (then the first skipped), or None."""
        return self.next_case(None)

    def mask_path(self, case_id: str) -> Path:
        return review_output_path(self.folder, case_id)

    # ------------------------------------------------------------------ time per case
    def begin(self, case_id: str, already: float = 0.0) -> None:
        """Start the clock on ``case_id`` (the one on screen); stops the previous case's."""
        self.case(case_id)
        with self._clock_lock:
            self._stop_locked()
            if already:
                self._spent[case_id] = max(self._spent.get(case_id, 0.0), float(already))
            self._current = (case_id, time.monotonic())

    def leave(self) -> None:
        """Stop the clock (the case left the screen undecided)."""
        with self._clock_lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._current is not None:
            case_id, start = self._current
            self._spent[case_id] = self._spent.get(case_id, 0.0) + time.monotonic() - start
            self._current = None

    def elapsed(self, case_id: str) -> float:
        """Seconds spent on ``case_id`` since its last decision (in this process, plus a
        restored draft's)."""
        with self._clock_lock:
            spent = self._spent.get(case_id, 0.0)
            if self._current is not None and self._current[0] == case_id:
                spent += time.monotonic() - self._current[1]
            return spent

    def _reset_clock(self, case_id: str) -> None:
        with self._clock_lock:
            self._spent.pop(case_id, None)
            if self._current is not None and self._current[0] == case_id:
                self._current = (case_id, time.monotonic())

    # ------------------------------------------------------------------ loading
    def load_model(self):
        """The session's model (loaded once, on the CPU), for computing missing outputs."""
        if self.model_ref is None:
            raise ConfigError("this session has no model to compute segmentations with")
        with self._model_lock:
            if self._model is None:
                from ciml_core.checkpoint import load_checkpoint

                loaded = load_checkpoint(self.model_ref, device="cpu")
                if self.model_sha256 and loaded.weights_sha256 != self.model_sha256:
                    raise ConfigError(
                        f"model {self.model_ref} has weights sha256 {loaded.weights_sha256}, the "
                        f"session was made with {self.model_sha256}; it changed since")
                self._model = loaded
            return self._model

    def load(
        self,
        case_id: str,
        *,
        device: str = "cpu",
        progress: Callable[[int, int], None] | None = None,
    ) -> ReviewCase:
        """Read a case's images, its model output (computing it when the session has to) and
        its draft. Runs in a worker thread in the widget (it touches no session state but the
        case's ``origin``/``prediction``/``problem``).

        A model output that cannot be used (missing, another grid, bad labels) does not fail the
        load: the case comes back with ``model_label=None`` and ``problem`` set (and marked in
        the session), so that its images can still be looked at, rejected or skipped.

        Raises:
            InputDataError, GeometryError: the case's images cannot be read or disagree.
        """
        from ciml_core.data.dataset import load_case

        case = self.case(case_id)
        if case.files is None:
            raise InputDataError(case.problem or f"case {case_id} is not in the dataset")
        modalities = case.files.modalities
        if case.origin == "model":  # the model reads its modalities in its own order
            modalities = tuple(self.load_model().modalities)
        files = dataclasses.replace(case.files, label=None)  # the dataset's own label: not used
        loaded = load_case(files, modalities)
        model_label, problem = None, None
        try:
            model_label = self._model_output(case, loaded, device, progress)
        except (InputDataError, GeometryError) as err:
            problem = str(err)
        if problem is None and case.origin == "missing":
            problem = case.problem
        case.problem = problem
        return ReviewCase(
            case_id=case_id, modalities=loaded.modalities, images=loaded.image,
            reference=loaded.reference, model_label=model_label,
            label_convention=self.label_convention, prediction=case.prediction, problem=problem,
            draft=self.read_draft(case_id, loaded.reference) if problem is None else None,
            inputs=tuple(case.files.images.values()),
        )

    def _model_output(self, case: SessionCase, loaded, device, progress) -> np.ndarray | None:
        if case.origin == "missing":
            return None
        if case.origin == "model":
            from ciml_core.infer import InferenceSettings, predict_case

            model = self.load_model()
            with self._predict_lock:  # one forward pass at a time (prefetch + current case)
                prediction = predict_case(model, loaded, InferenceSettings(device=device),
                                          progress=progress)
            target = self.folder / MODEL_OUTPUT / f"{case.case_id}.nii.gz"
            try:
                write_like(prediction.label, loaded.reference, target, dtype=np.uint8)
            except FileExistsError:
                pass  # computed meanwhile (another worker): the file is read below
            case.prediction, case.origin = target, "computed"
        volume = load_volume(case.prediction)
        mismatch = prediction_off_grid(volume.source, loaded.reference, case.case_id)
        if mismatch:
            raise GeometryError(mismatch)
        validate_label_values(volume.data, self.label_convention, str(case.prediction))
        return volume.data.astype(np.uint8)

    # ------------------------------------------------------------------ drafts
    def draft_paths(self, case_id: str) -> tuple[Path, Path]:
        review_output_path(self.folder, case_id)  # a plain file name
        folder = self.folder / DRAFTS
        return folder / f"{case_id}.nii.gz", folder / f"{case_id}.json"

    def save_draft(self, case: ReviewCase, label: np.ndarray) -> Path:
        """Autosave the edits of an undecided case (atomically: a reader, or a crash, sees the
        previous draft or this one, never half a file)."""
        label = np.asarray(label)
        validate_label_values(label, self.label_convention, f"draft of case {case.case_id}")
        path, meta_path = self.draft_paths(case.case_id)
        write_like(label, case.reference, path, dtype=np.uint8, overwrite=True)
        meta = {"case_id": case.case_id, "saved": _now(),
                "seconds": round(self.elapsed(case.case_id), 3),
                "changed_voxels": case.changed_voxels(label)}
        atomic_write_text(meta_path, json.dumps(meta) + "\n", overwrite=True)
        return path

    def read_draft(self, case_id: str, reference: NiftiSource | None = None) -> Draft | None:
        """The autosaved draft of ``case_id``, or None (also for a draft that cannot be read
        or lies on another grid, with a warning)."""
        path, meta_path = self.draft_paths(case_id)
        if not path.is_file():
            return None
        try:
            volume = load_volume(path)
        except InputDataError as err:
            self.warnings.append(f"draft of case {case_id} ignored: {err}")
            return None
        if reference is not None and grid_mismatch(volume.source, reference):
            self.warnings.append(f"draft {path} ignored: not on the grid of case {case_id}")
            return None
        meta: Mapping[str, Any] = {}
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # the label is the draft; its notes are a bonus
        return Draft(label=volume.data.astype(np.uint8), saved=meta.get("saved"),
                     seconds=float(meta.get("seconds") or 0.0),
                     changed_voxels=meta.get("changed_voxels"))

    def discard_draft(self, case_id: str) -> None:
        for path in self.draft_paths(case_id):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ decisions
    def _supersede(self, case_id: str) -> Path | None:
        """Keep a copy of the case's current mask in ``superseded/`` (a new decision replaces
        it); returns the copy."""
        mask = self.mask_path(case_id)
        if not mask.exists():
            return None
        folder = self.folder / SUPERSEDED
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        for n in range(1000):
            try:
                return link_or_copy(mask, folder / f"{case_id}.{stamp}.{n}.nii.gz")
            except FileExistsError:
                continue
        raise ConfigError(f"{folder}: cannot find a free name for the superseded mask")

    def decide(
        self,
        case: ReviewCase | str,
        decision: str,
        *,
        label: np.ndarray | None = None,
        reason: str | None = None,
        note: str = "",
        reviewer: str | None = None,
        replace: bool = False,
    ) -> ReviewRecord:
        """Record a decision on a case and clear its draft.

        - ``accepted``: the model output is right; it is saved as the final mask (a ``label``
          given must equal it: an edited mask is a correction).
        - ``corrected``: ``label`` (the edited mask, which must differ from the model output)
          is saved as the final mask.
        - ``rejected`` (``reason`` from :data:`REJECT_REASONS`) and ``skipped``: no mask.

        The record holds the time spent on the case (:meth:`elapsed`), the Dice per region
        between the model output and the final mask, and the changed voxels. The case's draft
        is removed, except when it is skipped.

        Raises:
            AlreadyReviewedError: the case is accepted, corrected or rejected already and
                ``replace`` is False (with ``replace`` the earlier mask goes to superseded/).
            ConfigError: an unknown decision or reason, a correction that changes nothing, an
                acceptance of an edited mask, a mask decision on a case without model output.
        """
        case_id = case if isinstance(case, str) else case.case_id
        entry = self.case(case_id)
        if decision not in SESSION_DECISIONS:
            raise ConfigError(f"decision: expected one of {list(SESSION_DECISIONS)}, got "
                              f"{decision!r}")
        if decision == "rejected" and reason not in REJECT_REASONS:
            raise ConfigError(f"reject reason: expected one of {list(REJECT_REASONS)}, got "
                              f"{reason!r}")
        if entry.status in REVIEWED and not replace:
            who = (entry.last or {}).get("reviewer", "?")
            when = (entry.last or {}).get("time", "?")
            raise AlreadyReviewedError(
                f"case {case_id} is already {entry.status} (by {who} at {when}); confirm to "
                "replace that decision (replace=True)")
        reviewer = (reviewer or self.reviewer).strip()
        seconds = self.elapsed(case_id)
        extra = {"session": str(self.folder.resolve()), "model_output": None if isinstance(
            case, str) or case.prediction is None else str(case.prediction)}
        if decision in ("accepted", "corrected"):
            if isinstance(case, str):
                raise ConfigError(f"case {case_id}: load the case to {decision[:-2]} it")
            if case.model_label is None:
                raise ConfigError(f"case {case_id} has no model output to "
                                  f"{'accept' if decision == 'accepted' else 'correct'} "
                                  f"({case.problem}); reject or skip it")
            final = case.model_label if label is None else np.asarray(label)
            _, changed = model_agreement(case.model_label, final, self.label_convention)
            if decision == "accepted" and changed:
                raise ConfigError(f"case {case_id}: {changed} voxel(s) differ from the model "
                                  "output; save them as a correction, or revert the edits to "
                                  "accept the model output")
            if decision == "corrected" and not changed:
                raise ConfigError(f"case {case_id}: no voxel differs from the model output; "
                                  "accept it instead")
            overwrite = self.mask_path(case_id).exists()
            if overwrite:
                self._supersede(case_id)
            record = save_review(
                final, case.reference, self.folder, case_id=case_id, reviewer=reviewer,
                decision=decision, note=note, model_label=case.model_label,
                model_sha256=self.model_sha256, label_convention=self.label_convention,
                inputs=case.inputs, overwrite=overwrite, extra=extra, seconds=seconds)
        else:
            source = "" if isinstance(case, str) else case.reference.path
            if isinstance(case, str) and entry.files is not None and entry.files.images:
                source = next(iter(entry.files.images.values()))
            record = record_decision(
                self.folder, case_id=case_id, reviewer=reviewer, decision=decision,
                source=source, reason=reason, note=note, model_sha256=self.model_sha256,
                label_convention=self.label_convention, seconds=seconds, extra=extra)
            if self._supersede(case_id) is not None:  # an earlier mask no longer holds
                self.mask_path(case_id).unlink(missing_ok=True)
        entry.status, entry.last = decision, record.to_dict()
        self._reset_clock(case_id)
        if decision != "skipped":  # a skipped case keeps its edits for when it comes back
            self.discard_draft(case_id)
        return record

    def records(self) -> list[dict[str, Any]]:
        log = self.folder / REVIEW_LOG
        return read_reviews(log, strict=False) if log.is_file() else []
