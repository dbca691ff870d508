"""A radiologist's review of one segmented case: metrics, the saved mask and the review log.

The napari plugin's Review widgets are thin layers over this module (and so is anything else that
wants to record a review), so that the rules live in one place and are tested without a GUI:

- the reviewed label volume is written with the source image's affine and header
  (:func:`ciml_core.data.nifti.write_like`) as ``<out>/<case_id>.nii.gz`` (the name
  ``ciml-core evaluate`` pairs with a reference), never over an input file and never inside an
  input case folder, and only over an earlier output when asked. Without ``overwrite`` the
  refusal is atomic (:func:`ciml_core.io.publish`: a hard link that fails when the name exists),
  so of two reviewers saving the same case into one folder at the same moment exactly one
  succeeds and the other gets ``FileExistsError``;
- its label values must belong to the label convention (a painted 3 in a BraTS 2020 mask is an
  error, not a silent new class);
- one JSON line per review is appended to ``<out>/reviews.jsonl``: case id, model hash, time,
  reviewer, decision, the Dice between the model's output and the saved mask (per region), the
  note and the output path, plus the metrics against a reference when one was loaded. A mask is
  never left without its record: when the append fails, the mask just written is removed (or
  the earlier one put back).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ciml_core.data.labels import get_convention, validate_label_values
from ciml_core.data.nifti import NiftiSource, write_like
from ciml_core.errors import ConfigError, GeometryError, InputDataError
from ciml_core.io import already_exists_message, append_bytes, write_with_rollback
from ciml_core.metrics import dice, region_metrics

#: The decisions that save a mask.
DECISIONS = ("accepted", "corrected")
#: Every decision a review session records (rejected and skipped save no mask).
SESSION_DECISIONS = ("accepted", "corrected", "rejected", "skipped")
#: Why a case is rejected.
REJECT_REASONS = ("wrong modality", "artefact", "not a tumour case", "other")
#: The review log, one JSON object per line, inside the output folder.
REVIEW_LOG = "reviews.jsonl"


@dataclass
class ReviewRecord:
    """One line of ``reviews.jsonl``."""

    case_id: str
    model_sha256: str | None
    time: str  # ISO 8601, UTC, seconds
    reviewer: str
    decision: str  # one of SESSION_DECISIONS
    dice_vs_model: dict[str, float] | None  # region -> Dice(model output, saved mask)
    changed_voxels: int | None  # voxels whose label differs from the model output
    note: str
    output: str  # the saved NIfTI file ("" when the decision saves no mask)
    label_convention: str | None
    source: str  # the image whose affine/header the output carries
    reference_metrics: dict[str, dict[str, float]] | None = None  # vs a loaded reference
    seconds: float | None = None  # time the reviewer spent on the case (review sessions)
    reason: str | None = None  # why a case was rejected (REJECT_REASONS)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        # allow_nan=False: the BraTS empty-mask rules leave no NaN; fail loudly if one appears.
        return json.dumps(self.to_dict(), allow_nan=False, sort_keys=False)


def review_output_path(out_dir: str | os.PathLike, case_id: str) -> Path:
    """Where the reviewed mask of ``case_id`` goes: ``<out_dir>/<case_id>.nii.gz``."""
    if (not case_id or any(sep in case_id for sep in ("/", "\\", "\x00"))
            or case_id in (".", "..") or os.path.isabs(case_id)):
        raise ConfigError(f"case id {case_id!r} cannot be used as a file name")
    return Path(out_dir) / f"{case_id}.nii.gz"


def check_not_input(target: str | os.PathLike, inputs: Iterable[str | os.PathLike], *,
                    folders: bool = True) -> None:
    """Refuse a target that is an input file or (``folders``) lies inside an input's folder.

    Inputs that do not exist on disk (volumes made in memory, e.g. napari sample data) are
    skipped: there is nothing to protect.

    Raises:
        InputDataError: naming the target and the input it would overwrite or sit beside.
    """
    target = Path(target).resolve()
    for item in inputs:
        path = Path(item)
        if not path.exists():
            continue
        path = path.resolve()
        if target == path:
            raise InputDataError(f"{target} is an input file; a review never overwrites its input "
                                 "(choose another output folder)")
        folder = path if path.is_dir() else path.parent
        if folders and (target.parent == folder or folder in target.parents):
            raise InputDataError(f"{target} is inside the input folder {folder}; choose an output "
                                 "folder outside the case's folder so the input stays untouched")


def _check_label(label: np.ndarray, label_convention: str | None, what: str) -> None:
    if label_convention is not None:
        validate_label_values(label, label_convention, what)
    elif label.size and (label.min() < 0 or label.max() > 255
                         or not np.array_equal(label, np.round(label))):
        raise InputDataError(f"{what}: expected integer values in 0..255")


def write_label_volume(
    label: np.ndarray,
    source: NiftiSource,
    path: str | os.PathLike,
    *,
    label_convention: str | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    protect_folders: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a canonical-order label volume as uint8 NIfTI with ``source``'s affine and header.

    The values are checked against ``label_convention`` (when given), the target against the
    input files (:func:`check_not_input`; ``source.path`` always counts as an input, and with
    ``protect_folders`` their folders are refused too). The file appears atomically; without
    ``overwrite`` an existing target (even one created by a concurrent writer a moment ago) is
    refused, never replaced.

    Raises:
        LabelError: values outside the convention.
        GeometryError: the array is not on ``source``'s grid.
        InputDataError: the target is an input or inside an input folder.
        FileExistsError: the target exists and ``overwrite`` is False.
    """
    label = np.asarray(label)
    _check_label(label, label_convention, f"label volume for {path}")
    check_not_input(path, [source.path, *inputs], folders=protect_folders)
    return write_like(label, source, path, dtype=np.uint8, overwrite=overwrite)


def model_agreement(
    model_label: np.ndarray, saved_label: np.ndarray, label_convention: str | None
) -> tuple[dict[str, float], int]:
    """Dice per region between the model's output and the saved mask, and the changed voxels.

    Without a convention, one region ``"foreground"`` (label > 0) is used.
    """
    model_label, saved_label = np.asarray(model_label), np.asarray(saved_label)
    if model_label.shape != saved_label.shape:
        raise GeometryError(f"model output shape {model_label.shape} does not match the saved "
                            f"mask shape {saved_label.shape}")
    changed = int(np.count_nonzero(model_label != saved_label))
    if label_convention is None:
        return {"foreground": dice(model_label > 0, saved_label > 0)}, changed
    conv = get_convention(label_convention)
    scores = {name: dice(np.isin(model_label, values), np.isin(saved_label, values))
              for name, values in conv.regions}
    return scores, changed


def reference_metrics(
    label: np.ndarray,
    reference: np.ndarray,
    label_convention: str,
    spacing: float | Sequence[float] | None = None,
) -> dict[str, dict[str, float]]:
    """Dice and HD95 (mm) per region of ``label`` against a reference (BraTS rules)."""
    return region_metrics(label, reference, label_convention, spacing)


def append_record(log: str | os.PathLike, record: ReviewRecord) -> Path:
    """Append one JSON line to the review log (created with its folder when missing).

    One write of a whole line (:func:`ciml_core.io.append_bytes`): concurrent writers never
    interleave lines, and a crash leaves at most one truncated last line (read_reviews reports
    it).
    """
    return append_bytes(log, (record.to_json() + "\n").encode("utf-8"))


def read_reviews(log: str | os.PathLike, *, strict: bool = True) -> list[dict[str, Any]]:
    """The records of a review log, oldest first.

    A line that is not JSON (a write cut by a crash) raises :class:`InputDataError` naming the
    log and the line, or is skipped with ``strict=False``.
    """
    log = Path(log)
    records = []
    with log.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if strict:
                    raise InputDataError(f"{log}: line {number} is not a JSON record ({err})") \
                        from err
                continue
            if not isinstance(record, dict) or "case_id" not in record:
                if strict:
                    raise InputDataError(f"{log}: line {number} is not a review record")
                continue
            records.append(record)
    return records


def _check_reviewer(reviewer: str) -> str:
    reviewer = reviewer.strip()
    if not reviewer:
        raise ConfigError("reviewer: the reviewer's name is required for a review record")
    return reviewer


def save_review(
    label: np.ndarray,
    source: NiftiSource,
    out_dir: str | os.PathLike,
    *,
    case_id: str,
    reviewer: str,
    decision: str,
    note: str = "",
    model_label: np.ndarray | None = None,
    model_sha256: str | None = None,
    label_convention: str | None = None,
    reference: np.ndarray | None = None,
    spacing: float | Sequence[float] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
    seconds: float | None = None,
    now: datetime | None = None,
) -> ReviewRecord:
    """Save a reviewed mask to ``<out_dir>/<case_id>.nii.gz`` and append its review record.

    Everything is checked before anything is written: the decision and reviewer, the label
    values, the grid, the target (never an input, not an existing file unless ``overwrite``).
    The mask is published atomically (refused atomically when it exists and ``overwrite`` is
    False), then the record is appended; a failed append removes the new mask again (or puts
    the replaced one back), so no mask is ever left without its record.

    Args:
        label: the reviewed label volume, canonical voxel order, dataset label values.
        source: the image (or label) source whose affine and header the output carries.
        model_label: the model's unedited output, for the Dice in the record.
        reference: a reference label volume on the same grid, for Dice/HD95 in the record.
        spacing: voxel size in mm along the canonical axes (default: ``source.spacing``).
        inputs: the files the case was read from (the output never replaces or joins them).
        seconds: time the reviewer spent on the case, for the record.

    Raises:
        ConfigError: unknown decision, empty reviewer name or unusable case id.
        LabelError, GeometryError, InputDataError, FileExistsError: see
            :func:`write_label_volume`.
    """
    if decision not in DECISIONS:
        raise ConfigError(f"decision: expected one of {list(DECISIONS)}, got {decision!r}")
    reviewer = _check_reviewer(reviewer)
    label = np.asarray(label)
    target = review_output_path(out_dir, case_id)
    inputs = [source.path, *inputs]
    check_not_input(target, inputs)
    if target.exists() and not overwrite:  # early, friendly; the publish below is what refuses
        raise FileExistsError(already_exists_message(
            target, hint="tick 'overwrite' / pass overwrite=True to replace it"))
    _check_label(label, label_convention, f"reviewed mask of case {case_id}")
    if tuple(label.shape) != source.canonical_shape:
        raise GeometryError(f"reviewed mask of case {case_id} has shape {label.shape}; the "
                            f"source {source.path} has {source.canonical_shape}")
    agreement, changed = (None, None)
    if model_label is not None:
        agreement, changed = model_agreement(model_label, label, label_convention)
    ref_metrics = None
    if reference is not None and label_convention is not None:
        ref_metrics = reference_metrics(label, reference, label_convention,
                                        spacing if spacing is not None else source.spacing)

    record = ReviewRecord(
        case_id=case_id,
        model_sha256=model_sha256,
        time=(now or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        reviewer=reviewer,
        decision=decision,
        dice_vs_model=agreement,
        changed_voxels=changed,
        note=note,
        output=str(target.resolve()),
        label_convention=label_convention,
        source=str(source.path),
        reference_metrics=ref_metrics,
        seconds=None if seconds is None else round(float(seconds), 3),
        extra=dict(extra or {}),
    )
    record.to_json()  # a record that cannot be serialised fails before the mask is written

    def write(replace: bool) -> None:
        write_label_volume(label, source, target, label_convention=label_convention,
                           inputs=inputs, overwrite=replace)

    # A failed append removes the new mask again (or puts the replaced one back).
    write_with_rollback(target, write, lambda: append_record(Path(out_dir) / REVIEW_LOG, record),
                        overwrite=overwrite)
    return record


def record_decision(
    out_dir: str | os.PathLike,
    *,
    case_id: str,
    reviewer: str,
    decision: str,
    source: str | os.PathLike,
    reason: str | None = None,
    note: str = "",
    model_sha256: str | None = None,
    label_convention: str | None = None,
    seconds: float | None = None,
    extra: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> ReviewRecord:
    """Append the record of a decision that saves no mask: ``rejected`` (with a reason from
    :data:`REJECT_REASONS`) or ``skipped``.

    Raises:
        ConfigError: another decision, a rejection without a known reason, an empty reviewer.
    """
    if decision not in ("rejected", "skipped"):
        raise ConfigError(f"decision: a decision without mask is 'rejected' or 'skipped', got "
                          f"{decision!r}")
    if decision == "rejected" and reason not in REJECT_REASONS:
        raise ConfigError(f"reject reason: expected one of {list(REJECT_REASONS)}, got {reason!r}")
    if decision == "skipped":
        reason = None
    review_output_path(out_dir, case_id)  # the case id must be a plain file name
    record = ReviewRecord(
        case_id=case_id, model_sha256=model_sha256,
        time=(now or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        reviewer=_check_reviewer(reviewer), decision=decision, dice_vs_model=None,
        changed_voxels=None, note=note, output="", label_convention=label_convention,
        source=str(source), seconds=None if seconds is None else round(float(seconds), 3),
        reason=reason, extra=dict(extra or {}),
    )
    append_record(Path(out_dir) / REVIEW_LOG, record)
    return record
