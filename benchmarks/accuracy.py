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
- beta: ``beta_0.05`` and ``beta_5`` (``full`` is beta = 0.5);
- the ET collapse: ``paper`` (CIML trained without the training additions that are now the
  defaults: docs/method.md) and ``paper+<addition>`` with one addition each. Every trained model
  is also scored with the other nesting rule and with / without batch-norm recalibration
  (``posthoc``), which need no retraining.

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
from ciml_core.infer import InferenceSettings
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
#: The paper's training recipe: TrainConfig's additions against the ET collapse switched off.
PAPER_RECIPE = {"region_weighting": "head", "message_dropout": 0.0, "warmup_epochs": 0,
                "beta_ramp_epochs": 0, "et_oversampling": 1.0, "bn_recalibration": 0}
#: run name -> TrainConfig fields that differ from CIML "full" (group, for the table).
RUNS: dict[str, tuple[str, dict]] = {
    "baseline": ("Table 5", {"variant": "baseline"}),
    "message": ("Table 5", {"variant": "message"}),
    "attention": ("Table 5", {"variant": "attention"}),
    "vi": ("Table 5", {"variant": "vi"}),
    "full": ("Table 5", {}),
    "dynunet": ("Table 5", {"variant": "dynunet", "norm": "instance"}),
    # the same DynUNet with CIML's batch norm (the norms differ in the row above)
    "dynunet_batchnorm": ("Table 5", {"variant": "dynunet", "norm": "batch"}),
    "decomposition_worst": ("Table 6", {"decomposition": WORST_DECOMPOSITION}),
    "beta_0.05": ("beta", {"beta": 0.05}),
    "beta_5": ("beta", {"beta": 5.0}),
    # The ET collapse (docs/method.md, "Training additions"): CIML trained as the paper says
    # (none of the additions that are now the defaults), then with each addition alone.
    "paper": ("collapse", PAPER_RECIPE),
    "paper+region_weights": ("collapse", {**PAPER_RECIPE, "region_weighting": "region"}),
    "paper+message_dropout": ("collapse", {**PAPER_RECIPE, "message_dropout": 0.3}),
    "paper+warmup_beta_ramp": ("collapse", {**PAPER_RECIPE, "warmup_epochs": 4,
                                            "beta_ramp_epochs": 10}),
    "paper+et_sampling": ("collapse", {**PAPER_RECIPE, "et_oversampling": 3.0}),
    # the four together, i.e. the defaults without batch-norm recalibration (scored +- it)
    "paper+all": ("collapse", {**PAPER_RECIPE, "region_weighting": "region",
                               "message_dropout": 0.3, "warmup_epochs": 4, "beta_ramp_epochs": 10,
                               "et_oversampling": 3.0}),
}
CPU = InferenceSettings(device="cpu")
#: Post-hoc settings scored on every trained model: nesting rule x batch-norm recalibration.
POSTHOC = [(nesting, recal) for nesting in ("union", "intersection") for recal in (False, True)]
RECALIBRATION_BATCHES = 16
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
    "full": "**CIML** (+ Message + Attention + VI; Table 6 best row; beta 0.5; training additions)",
    "dynunet": "DynUNet, early fusion (FLOP-matched width; instance norm, the CIML rows batch norm)",
    "dynunet_batchnorm": "DynUNet, early fusion, batch norm (as the CIML rows)",
    "decomposition_worst": "Table 6 worst row: FLAIR->TC, T1->TC+ET, T2->WT, T1CE->TC",
    "beta_0.05": "beta = 0.05",
    "beta_5": "beta = 5",
    "paper": "CIML, the paper's recipe (no training additions)",
    "paper+region_weights": "paper + equal weight per region",
    "paper+message_dropout": "paper + message dropout 0.3",
    "paper+warmup_beta_ramp": "paper + lr warm-up 4 epochs, beta ramp 10 epochs",
    "paper+et_sampling": "paper + ET-weighted patch centres (x3)",
    "paper+all": "paper + all four (the defaults without BN recalibration)",
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
    if name.startswith("dynunet"):
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
    test_cases = discover_cases(test_dir)
    posthoc, per_case_union = (posthoc_scores(out, cfg, train_dir, test_cases) if args.posthoc
                               else (None, None))
    if posthoc is not None and cfg.bn_recalibration == 0:  # scored with the default nesting above
        per_case, mean = per_case_union, posthoc["union"]
    else:
        per_case, mean = score_model(load_checkpoint(out / "best"), test_cases, "brats2020",
                                     CPU)
    result = {"run": name, "seed": seed, "overrides": overrides, "train_seconds": train_seconds,
              "per_case": per_case, "mean": mean}
    if posthoc is not None:
        result["posthoc"] = posthoc
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(result_path)
    return result


def posthoc_scores(out: Path, cfg: TrainConfig, train_dir: Path,
                   test_cases: list) -> tuple[dict, dict]:
    """Mean Dice/HD95 of the final model under each nesting rule, with and without batch-norm
    statistics recomputed (z = mu) on training patches: settings that need no retraining.
    Also returns the per-case scores of the saved model with union nesting."""
    from ciml_core.data.cache import PreprocessSettings, prepare_cases
    from ciml_core.model import recalibrate_batch_norm
    from ciml_core.train import foreground_region_weights, recalibration_batches

    scores, per_case_union = {}, {}
    for recal in (False, True):
        loaded = load_checkpoint(out / "best")
        if recal:
            cases, _ = prepare_cases(discover_cases(train_dir), PreprocessSettings(
                loaded.modalities, loaded.regions, "brats2020"), out / "cache")
            recalibrate_batch_norm(loaded.model, recalibration_batches(
                cfg, cases, torch.device("cpu"), RECALIBRATION_BATCHES,
                foreground_region_weights(cfg, loaded.regions)))
        for nesting in ("union", "intersection"):
            per_case, mean = score_model(loaded, test_cases, "brats2020", CPU,
                                         nesting=nesting)
            scores[f"{nesting}{'+recal' if recal else ''}"] = mean
            if not recal and nesting == "union":
                per_case_union = per_case
    return scores, per_case_union


def posthoc_table(results: list[dict]) -> str:
    """ET Dice (mean over seeds) per run under each post-hoc setting, and collapsed counts."""
    keys = [f"{n}{'+recal' if r else ''}" for n, r in POSTHOC]
    lines = ["| network | " + " | ".join(f"ET Dice, {k}" for k in keys) + " | seeds |",
             "| --- |" + " --- |" * (len(keys) + 1)]
    for name in RUNS:
        rows = [r for r in results if r["run"] == name and "posthoc" in r]
        if not rows:
            continue
        cells = []
        for k in keys:
            et = np.array([r["posthoc"][k]["ET"]["dice"] for r in rows])
            cells.append(f"{100 * et.mean():.1f} ({int((et < ET_COLLAPSE).sum())}/{len(et)})")
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells)
                     + f" | {','.join(str(r['seed']) for r in rows)} |")
    return "\n".join(lines)


def paired_comparison(results: list[dict], a: str, b: str, *, resamples: int = 10_000,
                      seed: int = 0) -> dict | None:
    """Run ``a`` against run ``b`` on the same (seed, test case) pairs: mean Dice over the regions
    per pair, the mean difference a - b with a 95 % bootstrap interval (resampling the pairs)
    and the Wilcoxon signed-rank p-value. None when they share no (seed, case)."""
    from scipy.stats import wilcoxon

    def per_case(run: str) -> dict[tuple[int, str], float]:
        return {(r["seed"], case): float(np.mean([m[reg]["dice"] for reg in REGIONS]))
                for r in results if r["run"] == run for case, m in r["per_case"].items()}

    da, db = per_case(a), per_case(b)
    keys = sorted(set(da) & set(db))
    if not keys:
        return None
    diff = np.array([da[k] - db[k] for k in keys])
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    return {"a": a, "b": b, "pairs": len(keys), "seeds": sorted({k[0] for k in keys}),
            "mean_difference": float(diff.mean()), "ci95": [float(low), float(high)],
            "wilcoxon_p": p}


def comparison_table(results: list[dict]) -> str:
    lines = ["| comparison (mean Dice over WT, TC, ET per case) | pairs (seed x case) | mean "
             "difference | 95 % bootstrap CI | Wilcoxon p |", "| --- | --- | --- | --- | --- |"]
    for a, b in (("full", "dynunet"), ("full", "dynunet_batchnorm"), ("full", "baseline"),
                 ("full", "attention"),
                 ("paper+all", "paper")):
        c = paired_comparison(results, a, b)
        if c is not None:
            lines.append(f"| {LABELS[a].split(' (')[0]} - {LABELS[b].split(' (')[0]} | "
                         f"{c['pairs']} | {100 * c['mean_difference']:+.2f} | "
                         f"[{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}] | "
                         f"{c['wilcoxon_p']:.3g} |")
    return "\n".join(lines)


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
    parser.add_argument("--no-posthoc", dest="posthoc", action="store_false",
                        help="score each model once (default nesting, as saved) instead of under "
                        "every nesting x recalibration setting")
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
    print()
    print(posthoc_table(results))
    print()
    print(comparison_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The runs themselves say which seeds and settings they used (an invocation with --report
    # or a subset of --seeds must not stand in for them).
    out.write_text(json.dumps({"budget": budget, "seeds": sorted({r["seed"] for r in results}),
                               "runs": list(RUNS), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
