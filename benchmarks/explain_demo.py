"""Regenerate the interpretability figures and numbers of docs/interpretability.md.

Runs the bundled demo model (or --model) on BraTS-like phantom cases with seeds never used in
training (5000+), explains every pair (ROI mode, target = the predicted region, and again with
the reference region as ROI), and reports the complementary-information weights of the TC pairs
whose primary modality is T1 or T2, where the phantom makes T1CE the most informative auxiliary
modality (SPEC 3.4; paper Fig. 18 finds the same on BraTS).

    python benchmarks/explain_demo.py --out /tmp/explain_demo [--images docs/images] [--cases 5]
        [--sliding] [--model demo] [--overwrite]

Writes ``<out>/summary.json`` and ``<out>/summary.md`` (a Markdown table), the per-case outputs
of ``ciml-core explain`` under ``<out>/<case>/``, and with ``--images`` the two figures of the
first case as ``gradcam_demo.png`` and ``weights_demo.png`` (overwriting them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ciml_core.checkpoint import load_checkpoint
from ciml_core.data.dataset import load_case
from ciml_core.data.labels import get_convention, labels_to_regions
from ciml_core.data.layouts import discover_cases
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.explain import explain_case, write_explanations
from ciml_core.figures import heatmap_grid_figure, save_figure, weights_chart_figure
from ciml_core.infer import InferenceSettings, predict_case

TC_PAIRS = ("T1:TC", "T2:TC")


def _dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--images", type=Path, help="also write the first case's figures here")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in --out")
    parser.add_argument("--sliding", action="store_true",
                        help="also explain the TC pairs of the first case in sliding mode")
    args = parser.parse_args(argv)

    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"{out} is not empty; pass --overwrite to replace what this script wrote")
    data = out / "phantoms"
    write_phantom_dataset("brats", args.cases, data, seed=args.seed, overwrite=args.overwrite)
    loaded = load_checkpoint(args.model, device="cpu")
    settings = InferenceSettings(device=args.device)
    convention = get_convention(loaded.info.label_convention)
    print(f"model {loaded.path} (sha256 {loaded.weights_sha256[:12]}), "
          f"width {loaded.config.width}, patch {loaded.config.patch_size}")

    records = []
    for index, files in enumerate(discover_cases(data)):
        case = load_case(files, loaded.modalities)
        reference = dict(zip(convention.region_names, labels_to_regions(case.label, convention),
                             strict=True))
        start = time.perf_counter()
        prediction = predict_case(loaded, case, settings)
        predict_seconds = time.perf_counter() - start
        start = time.perf_counter()
        predicted = explain_case(loaded, case, None, settings,
                                 prediction=prediction.probabilities)
        seconds = time.perf_counter() - start
        masks = labels_to_regions(prediction.label, convention)
        dice = {r: _dice(m, reference[r]) for r, m in zip(convention.region_names, masks,
                                                          strict=True)}
        case_dir = out / case.case_id
        write_explanations(predicted, case, case_dir, overwrite=args.overwrite)
        grid = heatmap_grid_figure(predicted, case, reference=reference)
        chart = weights_chart_figure(predicted, title=f"{case.case_id}: complementary "
                                     "information weights (demo model)")
        save_figure(grid, case_dir / f"{case.case_id}_gradcam.png", overwrite=args.overwrite)
        save_figure(chart, case_dir / f"{case.case_id}_weights.png", overwrite=args.overwrite)
        if index == 0 and args.images is not None:
            save_figure(grid, args.images / "gradcam_demo.png", overwrite=True)
            save_figure(chart, args.images / "weights_demo.png", overwrite=True)
        # The same pairs with the reference TC as ROI: weights that do not depend on how well
        # the demo model segments.
        roi = explain_case(loaded, case, "T1:TC,T2:TC", settings, target_mask=reference["TC"])
        runs = [("prediction", predicted), ("reference ROI", roi)]
        if index == 0 and args.sliding:
            start = time.perf_counter()
            sliding = explain_case(loaded, case, "T1:TC,T2:TC", settings, mode="sliding",
                                   prediction=prediction.probabilities)
            sliding_seconds = time.perf_counter() - start
            runs.append(("prediction, sliding", sliding))
            print(f"sliding mode on {case.case_id}: {sliding_seconds:.1f} s")
        for target, explanations in runs:
            for e in explanations:
                records.append({"case": case.case_id, "target": target, "pair": e.name,
                                "weights": e.weights, "target_voxels": e.target_voxels,
                                "dice": dice, "predict_seconds": round(predict_seconds, 1),
                                "explain_seconds": round(seconds, 1)})
        print(case.case_id, f"predict {predict_seconds:.1f} s, explain {seconds:.1f} s, Dice",
              {r: round(d, 3) for r, d in dice.items()},
              {e.name: {k: round(v, 3) for k, v in e.weights.items()} for e in predicted})

    summary = {"model": str(loaded.path), "weights_sha256": loaded.weights_sha256,
               "cases": args.cases, "seed": args.seed, "records": records, "tc_pairs": {}}
    lines = ["| pair | target | w(T1CE) mean ± sd | other auxiliary modalities (mean) | "
             "T1CE largest in | T1CE margin over next (mean) |", "|---|---|---|---|---|---|"]
    for target in ("prediction", "reference ROI"):
        for pair in TC_PAIRS:
            rows = [r for r in records if r["pair"] == pair and r["target"] == target]
            t1ce = [r["weights"]["t1ce"] for r in rows]
            others = sorted({k for r in rows for k in r["weights"] if k != "t1ce"})
            margins = [r["weights"]["t1ce"] - max(v for k, v in r["weights"].items()
                                                  if k != "t1ce") for r in rows]
            largest = sum(m > 0 for m in margins)
            entry = {
                "t1ce_mean": statistics.mean(t1ce),
                "t1ce_sd": statistics.stdev(t1ce) if len(t1ce) > 1 else 0.0,
                "others_mean": {k: statistics.mean(r["weights"][k] for r in rows) for k in others},
                "t1ce_largest": f"{largest}/{len(rows)}",
                "margin_mean": statistics.mean(margins),
            }
            summary["tc_pairs"][f"{pair} ({target})"] = entry
            other_text = ", ".join(f"{k.upper()} {v:.2f}" for k, v in entry["others_mean"].items())
            lines.append(f"| {pair} | {target} | {entry['t1ce_mean']:.2f} ± {entry['t1ce_sd']:.2f} "
                         f"| {other_text} | {entry['t1ce_largest']} | "
                         f"{entry['margin_mean']:+.2f} |")
    lines += ["", "| case | target | " + " | ".join(TC_PAIRS) + " |",
              "|---|---|" + "---|" * len(TC_PAIRS)]
    for case_id in sorted({r["case"] for r in records}):
        for target in ("prediction", "reference ROI", "prediction, sliding"):
            cells = []
            for pair in TC_PAIRS:
                rows = [r for r in records if r["case"] == case_id and r["pair"] == pair
                        and r["target"] == target]
                if not rows:
                    continue
                (row,) = rows
                cells.append(", ".join(f"{k.upper()} {v:.2f}" for k, v in row["weights"].items())
                             + f" ({row['target_voxels']} vox)")
            if cells:
                lines.append(f"| {case_id} | {target} | " + " | ".join(cells) + " |")
    lines += ["", "| case | " + " | ".join(convention.region_names) + " (Dice of the demo) |",
              "|---|" + "---|" * len(convention.region_names)]
    for case_id in sorted({r["case"] for r in records}):
        dice = next(r["dice"] for r in records if r["case"] == case_id)
        lines.append(f"| {case_id} | " + " | ".join(f"{dice[k]:.3f}" for k in
                                                     convention.region_names) + " |")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
