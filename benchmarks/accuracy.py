"""Accuracy of CIML, its Table 5 ablations, Table 6 decompositions and beta, against DynUNet.

    python benchmarks/accuracy.py [--seeds 0 1 2] [--threads 1]      # train what is missing, report
    python benchmarks/accuracy.py --report                            # only print the table

Every network is trained with the same budget (epochs x iterations, patch, batch, learning rate)
on the same generated BraTS-like phantoms (``--train-cases`` cases, seeds 2000..) and scored with
BraTS rules (Dice, HD95) on held-out phantoms (``--test-cases``, seeds 3000..) with the final
weights. The runs:

- Table 5: ``baseline``, ``message``, ``attention``, ``vi``, ``full`` (= CIML) and ``dynunet``
  (early fusion, base width chosen so that its FLOPs per window match CIML's);
- Table 6: ``decomposition_worst`` (the paper's worst row: FLAIR->TC, T1->TC+ET, T2->WT,
  T1CE->TC); its best row is the default decomposition, i.e. ``full``;
- beta: ``beta_0.05`` and ``beta_5`` (``full`` is beta = 0.5).

Each (seed, run) trains in ``<root>/seed<k>/<run>`` and writes ``result.json`` when scored, so the
script can be stopped at any time (Ctrl-C / SIGTERM save the run's ``latest``) and started again:
finished runs are skipped and an interrupted one resumes where it stopped. Results (per case and
mean) go to ``benchmarks/results/accuracy.json``; a Markdown table (mean +- sd over the seeds) is
printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ciml_core.checkpoint import load_checkpoint
from ciml_core.data.layouts import discover_cases
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.evaluate import score_model
from ciml_core.model import ModelConfig, flop_matched_width
from ciml_core.train import TrainConfig, train

WORST_DECOMPOSITION = {
    "modalities": ["flair", "t1", "t1ce", "t2"],
    "regions": ["WT", "TC", "ET"],
    "tasks": [{"primary": ["flair"], "regions": ["TC"]},
              {"primary": ["t1"], "regions": ["TC", "ET"]},
              {"primary": ["t2"], "regions": ["WT"]},
              {"primary": ["t1ce"], "regions": ["TC"]}],
}
#: run name -> TrainConfig fields that differ from CIML "full" (group, for the table).
RUNS: dict[str, tuple[str, dict]] = {
    "baseline": ("Table 5", {"variant": "baseline"}),
    "message": ("Table 5", {"variant": "message"}),
    "attention": ("Table 5", {"variant": "attention"}),
    "vi": ("Table 5", {"variant": "vi"}),
    "full": ("Table 5", {}),
    "dynunet": ("Table 5", {"variant": "dynunet", "norm": "instance"}),
    "decomposition_worst": ("Table 6", {"decomposition": WORST_DECOMPOSITION}),
    "beta_0.05": ("beta", {"beta": 0.05}),
    "beta_5": ("beta", {"beta": 5.0}),
}
REGIONS = ("WT", "TC", "ET")
#: A run whose mean ET Dice is below this predicted ET over (most of) the tumour core: the
#: "collapsed" runs the table counts, since a mean +- sd hides that the outcome is bimodal.
ET_COLLAPSE = 0.6
#: Row labels of the table, in the paper's words.
LABELS = {
    "baseline": "Baseline (no messages)",
    "message": "+ Message",
    "attention": "+ Message + Attention",
    "vi": "+ Message + VI",
    "full": "**CIML** (+ Message + Attention + VI; Table 6 best row; beta 0.5)",
    "dynunet": "DynUNet, early fusion (FLOP-matched width)",
    "decomposition_worst": "Table 6 worst row: FLAIR->TC, T1->TC+ET, T2->WT, T1CE->TC",
    "beta_0.05": "beta = 0.05",
    "beta_5": "beta = 5",
}


def flop_matched_dynunet_width(width: int, patch: int) -> int:
    """DynUNet base width whose FLOPs per window are closest to CIML's at ``width``."""
    ciml = ModelConfig(width=width, patch_size=(patch,) * 3)
    return flop_matched_width(ciml, "dynunet", norm="instance")


def make_data(root: Path, train_cases: int, test_cases: int) -> tuple[Path, Path]:
    train_dir, test_dir = root / "data" / "train", root / "data" / "test"
    for folder, cases, seed in ((train_dir, train_cases, 2000), (test_dir, test_cases, 3000)):
        if not (folder / "done").exists():
            write_phantom_dataset("brats", cases, folder, seed=seed, overwrite=True)
            (folder / "done").write_text(f"{cases} cases, seeds {seed}..\n")
    return train_dir, test_dir


def run_one(name: str, seed: int, args: argparse.Namespace, train_dir: Path, test_dir: Path,
            dynunet_width: int) -> dict:
    out = Path(args.root) / f"seed{seed}" / name
    result_path = out / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    overrides = dict(RUNS[name][1])
    if name == "dynunet":
        overrides["width"] = dynunet_width
    settings = {"width": args.width, **overrides}
    cfg = TrainConfig(out=out, data=train_dir, fold=-1, epochs=args.epochs,
                      iters_per_epoch=args.iters, patch=args.patch, batch=2, lr=args.lr, seed=seed,
                      workers=args.workers, device="cpu",
                      resume=(out / "latest" / "config.json").exists(), **settings)
    print(f"== seed {seed} {name}: {'resume' if cfg.resume else 'train'} {overrides}", flush=True)
    t0 = time.time()
    train(cfg)
    train_seconds = time.time() - t0
    per_case, mean = score_model(load_checkpoint(out / "best"), discover_cases(test_dir),
                                 "brats2020", device="cpu")
    result = {"run": name, "seed": seed, "overrides": overrides, "train_seconds": train_seconds,
              "per_case": per_case, "mean": mean}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(result_path)
    return result


def table(results: list[dict], budget: str) -> str:
    lines = [budget, "",
             "| group | network | Dice WT | Dice TC | Dice ET | Dice mean | HD95 WT | HD95 TC | HD95 ET "
             f"| HD95 mean | ET Dice < {ET_COLLAPSE} | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (group, _) in RUNS.items():
        rows = [r for r in results if r["run"] == name]
        if not rows:
            continue
        cells = []
        for metric, scale, fmt in (("dice", 100, "{:.1f}"), ("hd95", 1, "{:.1f}")):
            per_seed = np.array([[r["mean"][reg][metric] * scale for reg in REGIONS] for r in rows])
            per_seed = np.concatenate([per_seed, per_seed.mean(1, keepdims=True)], axis=1)
            for col in per_seed.T:
                sd = f" ± {col.std(ddof=1):.1f}" if len(col) > 1 else ""
                cells.append(fmt.format(col.mean()) + sd)
        seeds = ",".join(str(r["seed"]) for r in rows)
        collapsed = sum(r["mean"]["ET"]["dice"] < ET_COLLAPSE for r in rows)
        lines.append(f"| {group} | {LABELS[name]} | " + " | ".join(cells)
                     + f" | {collapsed}/{len(rows)} | {seeds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--iters", type=int, default=25, help="iterations per epoch")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--width", type=int, default=8, help="CIML base width C")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-cases", type=int, default=16)
    parser.add_argument("--test-cases", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--root", default="runs/accuracy")
    parser.add_argument("--out", default="benchmarks/results/accuracy.json")
    parser.add_argument("--report", action="store_true", help="only report finished runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(args.root)
    budget = (f"Budget per run: {args.epochs} epochs x {args.iters} iterations, batch 2, patch "
              f"{args.patch}^3, Adam lr {args.lr:g} (poly), CIML C={args.width}; "
              f"{args.train_cases} training / {args.test_cases} test phantoms (96x96x64, 2 mm).")
    if not args.report:
        train_dir, test_dir = make_data(root, args.train_cases, args.test_cases)
        dynunet_width = flop_matched_dynunet_width(args.width, args.patch)
        for seed in args.seeds:
            for name in args.runs:
                run_one(name, seed, args, train_dir, test_dir, dynunet_width)
    results = [json.loads(p.read_text()) for p in sorted(root.glob("seed*/*/result.json"))]
    report = table(results, budget)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The runs themselves say which seeds and settings they used (an invocation with --report
    # or a subset of --seeds must not stand in for them).
    out.write_text(json.dumps({"budget": budget, "seeds": sorted({r["seed"] for r in results}),
                               "runs": list(RUNS), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
