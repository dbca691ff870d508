"""Score a folder of predicted label files against reference labels (``ciml-core evaluate``).

Pairing: a prediction is ``PRED_DIR/<case_id>.nii.gz`` (or ``.nii``), which is what
``ciml-core predict`` writes (its ``<case_id>_prob_<region>`` probability maps are skipped).
References are the labels of the cases :func:`ciml_core.data.layouts.discover_cases` finds under
``REF_DIR`` (any dataset layout), or, when it finds no labelled case, a flat folder of
``<case_id>.nii.gz`` label files.

Each pair is loaded in canonical voxel order, must lie on the same grid, and must hold only the
label values of the chosen convention; then Dice and HD95 are computed per region with the BraTS
empty-mask rules (:mod:`ciml_core.metrics`). Every reference case is scored or reported: a
prediction without a reference, or (unless ``allow_missing``) a reference without a prediction,
is an error listing the case ids.

Outputs (when ``out`` is given): ``out`` itself, a CSV with one row per case
(``case_id, <region>_dice, <region>_hd95, ...``) followed by the summary rows ``mean``, ``std``
and ``median``; and a JSON file beside it (same name, ``.json``) with every case, the summary
(mean, std, median, min, max, n per region and metric) and the settings used.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ciml_core.data.labels import LabelConvention, get_convention, validate_label_values
from ciml_core.data.layouts import discover_cases
from ciml_core.data.nifti import Volume, check_grid, is_nifti_path, load_volume
from ciml_core.errors import ConfigError, InputDataError
from ciml_core.io import atomic_write_text, refuse_existing
from ciml_core.metrics import HD95_EMPTY, METRIC_NAMES, region_metrics

#: Summary statistics per region and metric, in report order. ``std`` is the population standard
#: deviation (numpy's default, ddof=0), so that it is defined for a single case.
SUMMARY_STATS = ("mean", "std", "median", "min", "max", "n")
#: Summary rows appended to the CSV after the cases.
CSV_SUMMARY_ROWS = ("mean", "std", "median")
#: How many case ids an error message lists before abbreviating.
_MAX_IDS_LISTED = 20


@dataclass(frozen=True)
class CaseResult:
    """Metrics of one case: ``metrics[region]["dice" | "hd95"]``.

    ``prediction`` is None when the case had no prediction file and was scored as an empty
    prediction (``allow_missing=True``).
    """

    case_id: str
    reference: Path
    prediction: Path | None
    spacing: tuple[float, ...]
    metrics: dict[str, dict[str, float]]

    @property
    def missing_prediction(self) -> bool:
        return self.prediction is None


@dataclass
class EvaluationReport:
    """Per-case and summary metrics of one evaluation; see :func:`evaluate_folders`."""

    label_convention: str
    regions: tuple[str, ...]
    cases: list[CaseResult]
    pred_dir: Path
    ref_dir: Path
    outputs: tuple[Path, ...] = field(default=())  # files written (CSV, JSON), if any

    @property
    def missing_predictions(self) -> list[str]:
        """Case ids that had no prediction and were scored as empty predictions."""
        return [c.case_id for c in self.cases if c.missing_prediction]

    def values(self, region: str, metric: str) -> np.ndarray:
        """One metric of one region over all cases, in case order."""
        return np.array([c.metrics[region][metric] for c in self.cases], dtype=np.float64)

    @property
    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``summary[region][metric][stat]`` with stat in :data:`SUMMARY_STATS`."""
        return {
            region: {metric: summarize(self.values(region, metric)) for metric in METRIC_NAMES}
            for region in self.regions
        }

    def to_dict(self) -> dict:
        """Everything in the report as JSON-ready Python objects."""
        return {
            "label_convention": self.label_convention,
            "regions": list(self.regions),
            "metrics": list(METRIC_NAMES),
            "hd95_unit": "mm",
            "hd95_empty_mm": HD95_EMPTY,
            "empty_mask_rules": "both empty: dice 1, hd95 0; exactly one empty: dice 0, "
            f"hd95 {HD95_EMPTY}",
            "std": "population standard deviation (ddof=0)",
            "pred_dir": str(self.pred_dir),
            "ref_dir": str(self.ref_dir),
            "n_cases": len(self.cases),
            "missing_predictions": self.missing_predictions,
            "cases": [
                {
                    "case_id": c.case_id,
                    "prediction": None if c.prediction is None else str(c.prediction),
                    "reference": str(c.reference),
                    "spacing_mm": list(c.spacing),
                    "metrics": c.metrics,
                }
                for c in self.cases
            ],
            "summary": self.summary,
        }

    def to_json(self) -> str:
        # allow_nan=False: the empty-mask rules mean no NaN/inf can reach the report; if one ever
        # did, fail loudly rather than write invalid JSON.
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def to_csv(self) -> str:
        """CSV text: header, one row per case, then the ``mean``, ``std`` and ``median`` rows."""
        columns = [f"{region}_{metric}" for region in self.regions for metric in METRIC_NAMES]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["case_id", *columns])
        for case in self.cases:
            writer.writerow([case.case_id, *(
                _fmt(case.metrics[region][metric])
                for region in self.regions for metric in METRIC_NAMES
            )])
        summary = self.summary
        for stat in CSV_SUMMARY_ROWS:
            writer.writerow([stat, *(
                _fmt(summary[region][metric][stat])
                for region in self.regions for metric in METRIC_NAMES
            )])
        return buf.getvalue()

    def summary_table(self) -> str:
        """A plain-text table of the summary, for printing on a terminal."""
        summary = self.summary
        lines = [f"{len(self.cases)} case(s), label convention {self.label_convention}"]
        header = (f"{'region':<8} {'Dice mean':>10} {'std':>8} {'median':>8}   "
                  f"{'HD95 mm mean':>12} {'std':>8} {'median':>8} {'n':>5}")
        lines += [header, "-" * len(header)]
        for region in self.regions:
            d, h = summary[region]["dice"], summary[region]["hd95"]
            lines.append(
                f"{region:<8} {d['mean']:>10.4f} {d['std']:>8.4f} {d['median']:>8.4f}   "
                f"{h['mean']:>12.2f} {h['std']:>8.2f} {h['median']:>8.2f} {int(d['n']):>5}"
            )
        missing = self.missing_predictions
        if missing:
            lines.append(
                f"{len(missing)} case(s) had no prediction and were scored as empty "
                f"(Dice 0 / HD95 {HD95_EMPTY} where the reference is not empty): {_ids(missing)}"
            )
        return "\n".join(lines)

    def write(self, out: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Write the CSV to ``out`` and the JSON beside it, atomically; returns both paths.

        Raises:
            FileExistsError: either file exists and ``overwrite`` is False (nothing is written).
            ConfigError: ``out`` ends in .json (the JSON goes beside the CSV).
        """
        csv_path, json_path = output_paths(out)
        refuse_existing((csv_path, json_path), overwrite)  # early; each write refuses atomically
        atomic_write_text(csv_path, self.to_csv(), overwrite=overwrite)
        atomic_write_text(json_path, self.to_json(), overwrite=overwrite)
        self.outputs = (csv_path, json_path)
        return csv_path, json_path


def summarize(values: np.ndarray) -> dict[str, float]:
    """mean, std (ddof=0), median, min, max and n of a non-empty 1-D array."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("cannot summarize an empty set of values")
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
    }


def _fmt(value: float) -> str:
    # Six decimals: far below any meaningful Dice or HD95 (mm) difference, and it hides the
    # float32 noise of MONAI's distances (14.39999771 -> 14.400000).
    return f"{value:.6f}"


def _ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:_MAX_IDS_LISTED])
    if len(ids) > _MAX_IDS_LISTED:
        shown += f", ... ({len(ids)} in all)"
    return shown


# -- outputs -------------------------------------------------------------------------------------


def output_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``report.csv`` -> (``report.csv``, ``report.json``)."""
    csv_path = Path(out)
    if csv_path.suffix.lower() == ".json":
        raise ConfigError(
            f"--out {csv_path}: expected the CSV path (e.g. report.csv); the JSON report is "
            "written beside it with the same name"
        )
    return csv_path, csv_path.with_suffix(".json")


# -- pairing -------------------------------------------------------------------------------------


def _case_id_of(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def _flat_label_files(folder: Path, what: str) -> dict[str, Path]:
    """``<case_id>.nii[.gz]`` files directly in ``folder`` -> {case_id: path}."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or not is_nifti_path(path):
            continue
        case_id = _case_id_of(path)
        if case_id in found:
            raise InputDataError(
                f"{folder}: two {what} files for case {case_id!r}: {found[case_id].name} and "
                f"{path.name}; keep one"
            )
        found[case_id] = path
    return found


def find_predictions(pred_dir: str | os.PathLike) -> dict[str, Path]:
    """Prediction files ``<case_id>.nii.gz`` (or ``.nii``) directly in ``pred_dir``.

    ``<case_id>_prob_<region>.nii.gz`` files next to ``<case_id>.nii.gz`` are the probability maps
    ``ciml-core predict --probabilities`` writes beside the labels; they are skipped, not taken
    for predictions of unknown cases.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputDataError(f"{pred_dir}: prediction folder not found")
    files = _flat_label_files(pred_dir, "prediction")
    return {cid: path for cid, path in files.items() if not _is_probability_map(cid, files)}


def _is_probability_map(case_id: str, files: dict[str, Path]) -> bool:
    m = re.match(r"^(?P<case>.+)_prob_[^_]+$", case_id)
    return m is not None and m["case"] in files


def find_references(ref_dir: str | os.PathLike) -> dict[str, Path]:
    """Reference label files of ``ref_dir`` -> {case_id: path}.

    First the labels of the cases of a dataset layout (:func:`discover_cases`); when that finds
    no layout or no labelled case, the ``<case_id>.nii[.gz]`` files directly in ``ref_dir``.
    """
    ref_dir = Path(ref_dir)
    if not ref_dir.exists():
        raise InputDataError(f"{ref_dir}: reference folder not found")
    try:
        labelled = {c.case_id: c.label for c in discover_cases(ref_dir) if c.label is not None}
    except InputDataError:
        labelled = {}  # not a dataset layout: try a flat folder of label files
    if labelled:
        return dict(sorted(labelled.items()))
    if not ref_dir.is_dir():
        raise InputDataError(f"{ref_dir}: expected a folder of reference labels or a dataset")
    flat = _flat_label_files(ref_dir, "reference")
    if not flat:
        raise InputDataError(
            f"{ref_dir}: no reference labels found (looked for labelled cases of a dataset layout "
            "and for <case_id>.nii.gz label files)"
        )
    return flat


def pair_cases(
    predictions: dict[str, Path], references: dict[str, Path], *, allow_missing: bool = False
) -> list[tuple[str, Path | None, Path]]:
    """(case_id, prediction or None, reference) for every reference case, sorted by case id.

    Raises:
        InputDataError: a prediction has no reference; or a reference has no prediction and
            ``allow_missing`` is False. The message lists the case ids.
    """
    orphans = sorted(set(predictions) - set(references))
    if orphans:
        raise InputDataError(
            f"{len(orphans)} prediction(s) have no reference label: {_ids(orphans)} "
            f"(predictions in {predictions[orphans[0]].parent}; reference case ids: "
            f"{_ids(sorted(references))})"
        )
    missing = sorted(set(references) - set(predictions))
    if missing and not allow_missing:
        raise InputDataError(
            f"{len(missing)} reference case(s) have no prediction <case_id>.nii.gz: {_ids(missing)}"
            " (pass allow_missing=True / --allow-missing to score them as empty predictions)"
        )
    pairs = [(cid, predictions.get(cid), references[cid]) for cid in sorted(references)]
    for cid, pred, ref in pairs:
        if pred is not None and _same_file(pred, ref):
            raise InputDataError(
                f"case {cid}: the prediction {pred} is the reference label itself; comparing a "
                "folder with itself scores every case perfectly (expected predictions and "
                "references in different files)"
            )
    return pairs


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# -- scoring -------------------------------------------------------------------------------------


def check_same_canonical_grid(pred: Volume, ref: Volume) -> None:
    """Raise GeometryError naming both files unless they cover the same voxel grid.

    The comparison is made in canonical voxel order (:func:`~ciml_core.data.nifti.grid_mismatch`:
    shape and affine, tolerance 1e-3 mm), the order both arrays are compared in, so a prediction
    stored in another axis order or flip of the same grid is accepted.
    """
    check_grid(pred.source, ref.source, what=("prediction", "reference"),
               hint="they must share one voxel grid")


def score_case(
    case_id: str, pred_path: Path | None, ref_path: Path, convention: LabelConvention
) -> CaseResult:
    """Load, check and score one case; ``pred_path=None`` scores an empty prediction."""
    ref = load_volume(ref_path)
    validate_label_values(ref.data, convention, str(ref_path))
    if pred_path is None:
        pred_data = np.zeros(ref.data.shape, dtype=np.uint8)
    else:
        pred = load_volume(pred_path)
        check_same_canonical_grid(pred, ref)
        validate_label_values(pred.data, convention, str(pred_path))
        pred_data = pred.data
    spacing = tuple(float(s) for s in ref.spacing)
    metrics = region_metrics(pred_data, ref.data, convention, spacing)
    return CaseResult(case_id, ref_path, pred_path, spacing, metrics)


def evaluate_folders(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    labels: str = "brats2020",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    *,
    allow_missing: bool = False,
    progress: bool | None = None,
) -> EvaluationReport:
    """Score every prediction in ``pred_dir`` against its reference label in ``ref_dir``.

    Args:
        pred_dir: folder of ``<case_id>.nii.gz`` label files (``ciml-core predict`` output).
        ref_dir: a dataset in any supported layout (its labels are used) or a flat folder of
            ``<case_id>.nii.gz`` reference label files.
        labels: label convention of both ("brats2020", "brats2023", "binary", "hecktor");
            regions and allowed values follow from it.
        out: CSV path of the report; a JSON report is written beside it (``report.csv`` ->
            ``report.json``). Nothing is written when None.
        overwrite: replace existing report files (otherwise FileExistsError, checked before any
            work is done).
        allow_missing: score a reference case without a prediction as an empty prediction
            (BraTS rule: Dice 0 and HD95 373.13 for each non-empty reference region, Dice 1 and
            HD95 0 for an empty one) instead of refusing. Such cases are listed in
            :attr:`EvaluationReport.missing_predictions` and in the JSON.
        progress: show a tqdm bar over cases; None shows it only on a terminal.

    Raises:
        InputDataError: a folder is missing or holds no labels; unpaired cases (listed);
            unreadable files.
        GeometryError: a prediction and its reference are not on the same grid (both named).
        LabelError: a file holds label values outside the convention (file and values named).
        ConfigError: unknown label convention, or ``out`` ends in .json.
        FileExistsError: a report file exists and ``overwrite`` is False.
    """
    convention = get_convention(labels)
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    if out is not None:  # fail before the work, not after it
        refuse_existing(output_paths(out), overwrite)
    pairs = pair_cases(find_predictions(pred_dir), find_references(ref_dir),
                       allow_missing=allow_missing)
    disable = None if progress is None else not progress
    results = [
        score_case(case_id, pred_path, ref_path, convention)
        for case_id, pred_path, ref_path in tqdm(pairs, desc="evaluate", unit="case",
                                                 disable=disable)
    ]
    report = EvaluationReport(
        label_convention=convention.name,
        regions=convention.region_names,
        cases=results,
        pred_dir=pred_dir,
        ref_dir=ref_dir,
    )
    if out is not None:
        report.write(out, overwrite=overwrite)
    return report


def score_model(
    loaded, cases, label_convention: str, settings=None, *, nesting: str = "union"
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, float]]]:
    """Predict labelled cases in memory and score them: ``(per_case, mean)``.

    ``loaded`` is a :class:`~ciml_core.checkpoint.LoadedModel`, ``cases`` are ``CaseFiles``
    (e.g. from :func:`discover_cases`). ``per_case[case_id][region]`` holds ``dice`` and
    ``hd95`` (BraTS rules); ``mean[region]`` their means over the cases. For benchmarks and
    experiments; ``ciml-core evaluate`` scores files written by ``predict`` instead.
    ``settings``: an :class:`~ciml_core.infer.InferenceSettings` (None: the defaults).
    """
    from ciml_core.data.dataset import load_case
    from ciml_core.infer import predict_case

    per_case = {}
    for files in cases:
        case = load_case(files, loaded.modalities, label_convention=label_convention)
        prediction = predict_case(loaded, case, settings, nesting=nesting)
        per_case[case.case_id] = region_metrics(prediction.label, case.label, label_convention,
                                                case.spacing)
    regions = next(iter(per_case.values()))
    mean = {r: {m: float(np.mean([c[r][m] for c in per_case.values()])) for m in ("dice", "hd95")}
            for r in regions}
    return per_case, mean
