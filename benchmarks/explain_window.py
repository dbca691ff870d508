"""How the complementary-information weights depend on the explained window, the attribution
method and the target binding (docs/interpretability.md, "Window-size sensitivity").

    python benchmarks/explain_window.py [--model demo] [--cases 5] [--seed 5000]
        [--sizes 32 48 64 96]

For each unseen phantom, ROI window size, method (gradcam, hirescam) and extent (target,
window): per pair the weights, and per map the fraction of its heat inside the predicted target
dilated by 8 mm. Reports the smallest and mean inside fraction, the mean weight of T1CE in the
T1:TC and T2:TC pairs and in how many cases T1CE gets the largest weight there (the phantom's
design makes T1CE the most informative auxiliary for TC). Writes
``benchmarks/results/explain_window_<name>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ciml_core.checkpoint import load_checkpoint
from ciml_core.data.dataset import load_case
from ciml_core.data.layouts import discover_cases
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.explain import explain_case
from ciml_core.infer import InferenceSettings, predict_case

CPU = InferenceSettings(device="cpu")

TC_PAIRS = ("T1:TC", "T2:TC")


def pair_inside_fractions(rows: list[dict], size: int, method: str) -> dict[tuple, float]:
    """Per (case, pair): the share of the pair's whole-window heat (all its auxiliary maps)
    that lies inside the dilated target, i.e. the target-bound heat sums over the window ones
    (the ``extent="target"`` and ``"window"`` runs of the same window and method)."""
    sums = {}
    for r in rows:
        if (r["size"], r["method"]) == (size, method):
            sums[(r["case"], r["pair"], r["extent"])] = sum(r["heat_sums"].values())
    return {(case, pair): (sums[(case, pair, "target")] / total if total > 0 else float("nan"))
            for (case, pair, extent), total in sums.items() if extent == "window"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 96])
    parser.add_argument("--name", default="demo")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    loaded = load_checkpoint(args.model)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_phantom_dataset("brats", args.cases, Path(tmp), seed=args.seed)
        for files in discover_cases(tmp):
            case = load_case(files, loaded.modalities)
            probs = predict_case(loaded, case, CPU).probabilities
            for size in args.sizes:
                for method in ("gradcam", "hirescam"):
                    for extent in ("target", "window"):
                        for e in explain_case(loaded, case, None, CPU, prediction=probs,
                                              roi_size=size, method=method, extent=extent):
                            rows.append({"case": case.case_id, "size": size, "method": method,
                                         "extent": extent, "pair": e.name, "weights": e.weights,
                                         "inside_fraction": e.inside_fraction,
                                         "heat_sums": e.heat_sums})
            print(case.case_id, "done", flush=True)
    lines = ["| window | method | extent | inside fraction: min / mean over maps | "
             "pair inside fraction: min (which) / mean | "
             "w(T1CE) in T1:TC, T2:TC (mean) | T1CE largest in T1:TC, T2:TC (cases) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    summary = []
    for size in args.sizes:
        for method in ("gradcam", "hirescam"):
            for extent in ("target", "window"):
                sel = [r for r in rows if (r["size"], r["method"], r["extent"])
                       == (size, method, extent)]
                fractions = [f for r in sel for f in r["inside_fraction"].values()
                             if np.isfinite(f)]
                w = {p: [r["weights"]["t1ce"] for r in sel if r["pair"] == p] for p in TC_PAIRS}
                largest = {p: sum(max(r["weights"], key=r["weights"].get) == "t1ce"
                                  for r in sel if r["pair"] == p) for p in TC_PAIRS}
                pairs = pair_inside_fractions(rows, size, method)
                worst = min(pairs, key=pairs.get)
                entry = {"size": size, "method": method, "extent": extent,
                         "pair_inside_min": pairs[worst], "pair_inside_worst": list(worst),
                         "pair_inside_mean": float(np.mean(list(pairs.values()))),
                         "inside_min": float(min(fractions)), "inside_mean": float(np.mean(fractions)),
                         "t1ce_weight": {p: float(np.mean(v)) for p, v in w.items()},
                         "t1ce_largest": largest, "cases": args.cases}
                summary.append(entry)
                lines.append(
                    f"| {size}^3 | {method} | {extent} | {entry['inside_min']:.2f} / "
                    f"{entry['inside_mean']:.2f} | {pairs[worst]:.2f} ({worst[1]}, {worst[0]}) / "
                    f"{entry['pair_inside_mean']:.2f} | "
                    + ", ".join(f"{entry['t1ce_weight'][p]:.2f}" for p in TC_PAIRS) + " | "
                    + ", ".join(f"{largest[p]}/{args.cases}" for p in TC_PAIRS) + " |")
    report = "\n".join(lines)
    print(report)
    out = Path(args.out) / f"explain_window_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "weights_sha256": loaded.weights_sha256,
                               "seeds": [args.seed, args.seed + args.cases - 1],
                               "summary": summary, "rows": rows, "table": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
