"""Accuracy of the bundled demo model on fresh phantom cases (seeds never used in training).

    python benchmarks/demo_accuracy.py [--kind brats] [--cases 10] [--seed 5000]
    python benchmarks/demo_accuracy.py --kind brain --seed 8000 --atlas-cases 3

Generates the cases, predicts them with the demo model and with an untrained network of the same
architecture (the floor), evaluates both with BraTS rules and writes a JSON + prints a table.
``--kind brain`` scores brain phantoms on the BraTS grid (1 mm; needs the atlas, docs/phantoms.md)
and, with ``--atlas-cases N``, the predicted tumour volume (cm^3) on N tumour-free atlas cases
(each its own contrast draw and deformation): false positives, ~0 for a good model.
Training used procedural seeds 1000-1023 and 1100-1115, brain seeds 7000-7031.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ciml_core.checkpoint import LoadedModel, load_checkpoint
from ciml_core.data.layouts import discover_cases
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.evaluate import score_model
from ciml_core.model import build_model


def score(loaded: LoadedModel, cases, label_convention: str) -> dict:
    per_case, mean = score_model(loaded, cases, label_convention)
    return {"per_case": list(per_case.values()), "mean": mean}


def atlas_false_positives(loaded: LoadedModel, count: int, seed: int) -> list[dict]:
    """Predicted tumour (any label) in cm^3 on ``count`` tumour-free, deformed atlas cases."""
    from ciml_core.data.brain_phantoms import make_atlas_case
    from ciml_core.data.dataset import load_case
    from ciml_core.data.phantoms import write_phantom_case
    from ciml_core.infer import predict_case

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            write_phantom_case(make_atlas_case(seed + i, deform=True), "brain", tmp)
        for files in discover_cases(tmp):
            case = load_case(files, loaded.modalities, label_convention="brats2020")
            label = predict_case(loaded, case).label
            voxel_cm3 = float(np.prod(case.spacing)) / 1000.0
            rows.append({"case": case.case_id,
                         "predicted_tumour_cm3": round(float((label > 0).sum()) * voxel_cm3, 3),
                         "predicted_et_cm3": round(float((label == 4).sum()) * voxel_cm3, 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=("brats", "brain"), default="brats")
    parser.add_argument("--atlas-cases", type=int, default=0,
                        help="tumour-free atlas cases to measure false-positive volume on")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the untrained network (half the time)")
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    demo = load_checkpoint(args.model)
    torch.manual_seed(0)
    untrained = LoadedModel(build_model(demo.config).eval(), demo.config, demo.info, demo.path, "")
    with tempfile.TemporaryDirectory() as tmp:
        write_phantom_dataset(args.kind, args.cases, Path(tmp), seed=args.seed)
        cases = discover_cases(tmp)
        t0 = time.time()
        trained = score(demo, cases, demo.info.label_convention)
        seconds = time.time() - t0
        floor = None if args.no_floor else score(untrained, cases, demo.info.label_convention)
    result = {"model": str(demo.path), "weights_sha256": demo.weights_sha256, "kind": args.kind,
              "cases": args.cases, "seeds": [args.seed, args.seed + args.cases - 1],
              "demo": trained, "untrained": floor, "seconds_demo": round(seconds, 1)}
    if args.atlas_cases:
        result["atlas_false_positive_cm3"] = atlas_false_positives(demo, args.atlas_cases,
                                                                   args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "demo_accuracy.json" if args.kind == "brats" else f"demo_accuracy_{args.kind}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.cases} {args.kind} phantom cases, seeds {args.seed}-{args.seed + args.cases - 1}")
    print("| region | demo Dice | demo HD95 (mm) | untrained Dice | untrained HD95 (mm) |")
    print("| --- | --- | --- | --- | --- |")
    for region in trained["mean"]:
        d = trained["mean"][region]
        u = floor["mean"][region] if floor else {"dice": float("nan"), "hd95": float("nan")}
        print(f"| {region} | {d['dice']:.3f} | {d['hd95']:.1f} | {u['dice']:.3f} | {u['hd95']:.1f} |")


if __name__ == "__main__":
    main()
