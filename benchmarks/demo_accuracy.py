"""Accuracy of the bundled demo model on fresh phantom cases (seeds never used in training).

    python benchmarks/demo_accuracy.py [--cases 10] [--seed 5000] [--out benchmarks/results]

Generates the cases, predicts them with the demo model and with an untrained network of the same
architecture (the floor), evaluates both with BraTS rules and writes a JSON + prints a table.
The training phantoms used seeds 1000-1023.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ciml_core.checkpoint import LoadedModel, load_checkpoint
from ciml_core.data.layouts import discover_cases
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.evaluate import score_model
from ciml_core.model import build_model


def score(loaded: LoadedModel, cases, label_convention: str) -> dict:
    per_case, mean = score_model(loaded, cases, label_convention)
    return {"per_case": list(per_case.values()), "mean": mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    demo = load_checkpoint(args.model)
    torch.manual_seed(0)
    untrained = LoadedModel(build_model(demo.config).eval(), demo.config, demo.info, demo.path, "")
    with tempfile.TemporaryDirectory() as tmp:
        write_phantom_dataset("brats", args.cases, Path(tmp), seed=args.seed)
        cases = discover_cases(tmp)
        t0 = time.time()
        trained = score(demo, cases, demo.info.label_convention)
        seconds = time.time() - t0
        floor = score(untrained, cases, demo.info.label_convention)
    result = {"model": str(demo.path), "weights_sha256": demo.weights_sha256,
              "cases": args.cases, "seeds": [args.seed, args.seed + args.cases - 1],
              "demo": trained, "untrained": floor, "seconds_demo": round(seconds, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.cases} phantom cases, seeds {args.seed}-{args.seed + args.cases - 1}")
    print("| region | demo Dice | demo HD95 (mm) | untrained Dice | untrained HD95 (mm) |")
    print("| --- | --- | --- | --- | --- |")
    for region in trained["mean"]:
        d, u = trained["mean"][region], floor["mean"][region]
        print(f"| {region} | {d['dice']:.3f} | {d['hd95']:.1f} | {u['dice']:.3f} | {u['hd95']:.1f} |")


if __name__ == "__main__":
    main()
