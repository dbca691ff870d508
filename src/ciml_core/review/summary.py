"""What a review session amounts to: decisions, correction effort, time, reviewers; and how two
reviewers' sessions over the same cases agree.

:func:`write_summary` (``ciml-core review-summary SESSION [SESSION ...]``) writes, by default
into the first session folder:

- ``review_summary.csv``: one row per session and case: decision, reject reason, reviewer, time
  of the decision, seconds spent (summed over the case's records), changed voxels, and the Dice
  per region between the model's output and the final mask (the correction effort);
- ``review_summary.md``: decisions per category, the Dice per region (mean, median, min), time
  per case, reviewers, the plot, and, for two or more sessions, the inter-reader Dice;
- ``review_summary.png``: the plot (matplotlib, Agg canvas, no pyplot);
- ``inter_reader.csv`` (two or more sessions): per pair of sessions and case both reviewers
  saved a mask for (accepted or corrected), the Dice per region between their final masks.

Only the session folders are read (``session.json``, ``reviews.jsonl``, the saved masks): the
dataset may have moved since.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ciml_core.data.labels import get_convention
from ciml_core.data.nifti import check_grid, load_volume
from ciml_core.errors import ConfigError, InputDataError
from ciml_core.io import atomic_write, atomic_write_text, refuse_existing
from ciml_core.metrics import dice
from ciml_core.review.record import REVIEW_LOG, SESSION_DECISIONS, read_reviews
from ciml_core.review.session import REVIEWED, SESSION_FILE, TODO, ReviewSession

SUMMARY_CSV = "review_summary.csv"
SUMMARY_MD = "review_summary.md"
SUMMARY_PNG = "review_summary.png"
INTER_READER_CSV = "inter_reader.csv"


@dataclass
class CaseSummary:
    """The outcome of one case in one session (its latest decision)."""

    session: str
    case_id: str
    decision: str  # a SESSION_DECISIONS value, or "to do"
    reason: str | None
    reviewer: str | None
    time: str | None
    seconds: float  # summed over every record of the case
    changed_voxels: int | None
    dice: dict[str, float | None]  # region -> Dice(model output, final mask)
    note: str
    mask: Path | None


@dataclass
class SessionSummary:
    folder: Path
    meta: dict[str, Any]
    cases: list[CaseSummary]
    regions: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.folder.name

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((TODO, *SESSION_DECISIONS), 0)
        for case in self.cases:
            counts[case.decision] += 1
        return counts

    @property
    def reviewers(self) -> list[str]:
        return sorted({c.reviewer for c in self.cases if c.reviewer})


@dataclass
class InterReader:
    """Agreement of two sessions over the cases both saved a mask for."""

    a: str
    b: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # per case: decisions + Dice

    def mean(self, region: str) -> float | None:
        values = [r[region] for r in self.rows if r.get(region) is not None]
        return float(np.mean(values)) if values else None


def summarize_session(folder: str | os.PathLike) -> SessionSummary:
    """Read a session folder into one :class:`CaseSummary` per case (session order)."""
    folder = Path(folder)
    if not (folder / SESSION_FILE).is_file():
        raise InputDataError(f"{folder}: no {SESSION_FILE}; expected a review session folder")
    meta = ReviewSession._read_meta(folder / SESSION_FILE)
    regions = get_convention(meta["label_convention"]).region_names
    log = folder / REVIEW_LOG
    records = read_reviews(log, strict=False) if log.is_file() else []
    by_case: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_case.setdefault(record.get("case_id"), []).append(record)
    cases = []
    for case_id in meta["cases"]:
        history = [r for r in by_case.get(case_id, []) if r.get("decision") in SESSION_DECISIONS]
        last = history[-1] if history else None
        seconds = float(sum(r.get("seconds") or 0.0 for r in history))
        decision = last["decision"] if last else TODO
        saved = decision in ("accepted", "corrected")
        agreement = (last or {}).get("dice_vs_model") or {}
        cases.append(CaseSummary(
            session=folder.name, case_id=case_id, decision=decision,
            reason=(last or {}).get("reason"), reviewer=(last or {}).get("reviewer"),
            time=(last or {}).get("time"), seconds=seconds,
            changed_voxels=(last or {}).get("changed_voxels") if saved else None,
            dice={r: (agreement.get(r) if saved else None) for r in regions},
            note=(last or {}).get("note") or "",
            # The session folder's own mask (the record's absolute path breaks if it moved).
            mask=folder / f"{case_id}.nii.gz" if saved else None,
        ))
    return SessionSummary(folder, meta, cases, regions)


def inter_reader(a: SessionSummary, b: SessionSummary) -> InterReader:
    """Dice per region between the final masks of two sessions, case by case.

    Raises:
        ConfigError: the sessions use different label conventions or share no case.
        GeometryError: two masks of one case lie on different grids.
    """
    if a.meta["label_convention"] != b.meta["label_convention"]:
        raise ConfigError(f"sessions {a.folder} and {b.folder} use different label conventions "
                          f"({a.meta['label_convention']}, {b.meta['label_convention']})")
    b_cases = {c.case_id: c for c in b.cases}
    common = [c for c in a.cases if c.case_id in b_cases]
    if not common:
        raise ConfigError(f"sessions {a.folder} and {b.folder} share no case; inter-reader "
                          "agreement needs two reviews of the same cases")
    conv = get_convention(a.meta["label_convention"])
    result = InterReader(a.name, b.name)
    for ca in common:
        cb = b_cases[ca.case_id]
        row: dict[str, Any] = {"case_id": ca.case_id, "decision_a": ca.decision,
                               "decision_b": cb.decision}
        both = ca.mask is not None and cb.mask is not None
        for name, _ in conv.regions:
            row[name] = None
        if both:
            va, vb = load_volume(ca.mask), load_volume(cb.mask)
            check_grid(va.source, vb.source, what=(f"{a.name}'s mask", f"{b.name}'s mask"),
                       context=f"case {ca.case_id}: ",
                       hint="two reviews of a case must lie on one grid")
            for name, values in conv.regions:
                row[name] = dice(np.isin(va.data, values), np.isin(vb.data, values))
        result.rows.append(row)
    return result


# ---------------------------------------------------------------------------------- writing


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def summary_csv(summaries: Sequence[SessionSummary]) -> str:
    regions = summaries[0].regions
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["session", "case_id", "decision", "reason", "reviewer", "time", "seconds",
                     "changed_voxels", *[f"dice_{r}" for r in regions], "note"])
    for summary in summaries:
        for c in summary.cases:
            writer.writerow([c.session, c.case_id, c.decision, c.reason or "", c.reviewer or "",
                             c.time or "", f"{c.seconds:.1f}",
                             "" if c.changed_voxels is None else c.changed_voxels,
                             *[_fmt(c.dice[r]) for r in regions], c.note])
    return buffer.getvalue()


def inter_reader_csv(results: Sequence[InterReader], regions: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["session_a", "session_b", "case_id", "decision_a", "decision_b",
                     *[f"dice_{r}" for r in regions]])
    for result in results:
        for row in result.rows:
            writer.writerow([result.a, result.b, row["case_id"], row["decision_a"],
                             row["decision_b"], *[_fmt(row[r]) for r in regions]])
    return buffer.getvalue()


def _stats(values: list[float]) -> tuple[str, str, str]:
    if not values:
        return "–", "–", "–"
    return (f"{np.mean(values):.3f}", f"{np.median(values):.3f}", f"{np.min(values):.3f}")


def summary_markdown(summaries: Sequence[SessionSummary], results: Sequence[InterReader],
                     plot_name: str | None) -> str:
    regions = summaries[0].regions
    lines = ["# Review summary", ""]
    for s in summaries:
        meta = s.meta
        reviewed = sum(c.decision in REVIEWED for c in s.cases)
        lines += [
            f"## Session `{s.name}`", "",
            f"- dataset: `{meta['dataset']}` ({meta['layout']}, {len(s.cases)} cases)",
            f"- model output: predictions `{meta.get('predictions')}`, model "
            f"`{meta.get('model')}` (sha256 `{meta.get('model_sha256')}`)",
            f"- created {meta.get('created')} by {meta['reviewer']}; reviewer(s): "
            f"{', '.join(s.reviewers) or '–'}",
            f"- progress: {reviewed} / {len(s.cases)} reviewed", "",
            "| decision | cases |", "| --- | ---: |",
        ]
        lines += [f"| {k} | {v} |" for k, v in s.counts().items()]
        reasons: dict[str, int] = {}
        for c in s.cases:
            if c.decision == "rejected":
                reasons[c.reason or "?"] = reasons.get(c.reason or "?", 0) + 1
        if reasons:
            lines += ["", "Rejected: " + ", ".join(f"{k} ({v})" for k, v in reasons.items())]
        saved = [c for c in s.cases if c.decision in ("accepted", "corrected")]
        lines += ["", "Correction effort: Dice between the model output and the final mask "
                  f"({len(saved)} saved masks)", "",
                  "| region | mean | median | min |", "| --- | ---: | ---: | ---: |"]
        for r in regions:
            mean, median, low = _stats([c.dice[r] for c in saved if c.dice[r] is not None])
            lines.append(f"| {r} | {mean} | {median} | {low} |")
        changed = [c.changed_voxels for c in saved if c.changed_voxels is not None]
        seconds = [c.seconds for c in s.cases if c.decision != TODO]
        lines += ["", f"Changed voxels: {sum(changed)} in all, "
                  f"{(np.mean(changed) if changed else 0):.0f} per saved mask on average.",
                  f"Time per decided case: mean {np.mean(seconds) if seconds else 0:.1f} s, "
                  f"median {np.median(seconds) if seconds else 0:.1f} s, total "
                  f"{sum(seconds) / 60:.1f} min.", ""]
    for result in results:
        lines += [f"## Inter-reader agreement: `{result.a}` vs `{result.b}`", "",
                  f"{sum(r[regions[0]] is not None for r in result.rows)} case(s) with a final "
                  f"mask in both; {sum(r['decision_a'] == r['decision_b'] for r in result.rows)} "
                  f"of {len(result.rows)} common case(s) with the same decision.", "",
                  "| region | mean Dice |", "| --- | ---: |"]
        lines += [f"| {r} | {_fmt(result.mean(r), 3) or '–'} |" for r in regions]
        lines.append("")
    if plot_name:
        lines += [f"![Review summary]({plot_name})", ""]
    lines += ["## Cases", "", "| session | case | decision | reviewer | seconds | changed | "
              + " | ".join(f"Dice {r}" for r in regions) + " |",
              "| --- | --- | --- | --- | ---: | ---: | " + " | ".join("---:" for _ in regions)
              + " |"]
    for s in summaries:
        for c in s.cases:
            decision = c.decision + (f" ({c.reason})" if c.reason else "")
            lines.append(f"| {c.session} | {c.case_id} | {decision} | {c.reviewer or ''} | "
                         f"{c.seconds:.1f} | {'' if c.changed_voxels is None else c.changed_voxels}"
                         " | " + " | ".join(_fmt(c.dice[r], 3) for r in regions) + " |")
    return "\n".join(lines) + "\n"


def summary_figure(summaries: Sequence[SessionSummary], results: Sequence[InterReader]):
    """Decisions per category, Dice per region (model vs final), time per case, and the
    inter-reader Dice when there is more than one session. A Figure on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    regions = summaries[0].regions
    panels = 4 if results else 3
    fig = Figure(figsize=(3.6 * panels, 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    categories = [TODO, *SESSION_DECISIONS]
    width = 0.8 / len(summaries)
    x = np.arange(len(categories))
    for i, s in enumerate(summaries):
        counts = s.counts()
        axes[0].bar(x + i * width - 0.4 + width / 2, [counts[c] for c in categories], width,
                    label=s.name)
    axes[0].set_xticks(x, categories, rotation=30, ha="right")
    axes[0].set_ylabel("cases")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title("Decisions")
    if len(summaries) > 1:
        axes[0].legend(fontsize="small")
    rng = np.random.default_rng(0)
    for i, s in enumerate(summaries):
        saved = [c for c in s.cases if c.decision in ("accepted", "corrected")]
        for j, r in enumerate(regions):
            values = [c.dice[r] for c in saved if c.dice[r] is not None]
            xs = j + i * width - 0.4 + width / 2 + rng.uniform(-0.08, 0.08, len(values))
            axes[1].scatter(xs, values, s=14, alpha=0.8, color=f"C{i}",
                            label=s.name if j == 0 else None)
            if values:
                axes[1].hlines(np.mean(values), j + i * width - 0.4, j + (i + 1) * width - 0.4,
                               colors="k")
    axes[1].set_xticks(range(len(regions)), regions)
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_ylabel("Dice")
    axes[1].set_title("Model output vs final mask")
    for s in summaries:
        decided = [c for c in s.cases if c.decision != TODO]
        axes[2].bar([f"{c.case_id}" if len(summaries) == 1 else f"{s.name}:{c.case_id}"
                     for c in decided], [c.seconds for c in decided], label=s.name)
    axes[2].set_ylabel("seconds")
    axes[2].set_title("Time per case")
    axes[2].tick_params(axis="x", labelrotation=90, labelsize=6)
    if results:
        for k, result in enumerate(results):
            means = [result.mean(r) or 0.0 for r in regions]
            axes[3].bar(np.arange(len(regions)) + k * 0.8 / len(results), means,
                        0.8 / len(results), label=f"{result.a} vs {result.b}")
        axes[3].set_xticks(np.arange(len(regions)), regions)
        axes[3].set_ylim(0, 1.02)
        axes[3].set_title("Inter-reader Dice (mean)")
        axes[3].legend(fontsize="small")
    return fig


def summary_paths(out: str | os.PathLike, sessions: int) -> list[Path]:
    out = Path(out)
    names = [SUMMARY_CSV, SUMMARY_MD, SUMMARY_PNG] + ([INTER_READER_CSV] if sessions > 1 else [])
    return [out / n for n in names]


def write_summary(
    session_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write the summary of one session, or of several over the same cases with their
    inter-reader agreement (every pair). ``out`` defaults to the first session folder.

    Raises:
        InputDataError: a folder is not a review session.
        ConfigError: sessions with different label conventions or without a common case.
        FileExistsError: a report exists and ``overwrite`` is False (nothing is written).
    """
    if not session_dirs:
        raise ConfigError("review-summary: give at least one session folder")
    summaries = [summarize_session(d) for d in session_dirs]
    names = [s.name for s in summaries]
    if len(set(names)) != len(names):  # the CSVs name sessions by folder: keep them apart
        for s in summaries:
            s.cases = [dataclasses.replace(c, session=str(s.folder)) for c in s.cases]
    results = [inter_reader(a, b) for a, b in itertools.combinations(summaries, 2)]
    out = Path(out) if out is not None else summaries[0].folder
    paths = summary_paths(out, len(summaries))
    refuse_existing(paths, overwrite)
    regions = summaries[0].regions
    atomic_write_text(paths[0], summary_csv(summaries), overwrite=overwrite)
    atomic_write_text(paths[1], summary_markdown(summaries, results, SUMMARY_PNG),
                      overwrite=overwrite)
    fig = summary_figure(summaries, results)
    atomic_write(paths[2], lambda fh: fig.savefig(fh, format="png", dpi=110), binary=True,
                 overwrite=overwrite)
    if results:
        atomic_write_text(paths[3], inter_reader_csv(results, regions), overwrite=overwrite)
    return paths

