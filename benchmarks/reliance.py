"""Modality reliance of a model on unseen phantoms (``ciml_core.reliance``).

    python benchmarks/reliance.py [--model demo] [--cases 10] [--seed 5000] [--overlap 0.5]

Per segmentor and region: Dice and mean probability inside the true region when nothing,
each single input modality, or every message is zeroed. Writes
``benchmarks/results/reliance_<name>.json`` and prints a Markdown table (Dice, with the mean
probability in brackets).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ciml_core.checkpoint import load_checkpoint
from ciml_core.data.dataset import load_case
from ciml_core.data.layouts import discover_cases
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.infer import InferenceSettings
from ciml_core.reliance import INTACT, NO_MESSAGES, largest_drop, modality_reliance, summarise


def table(summary: dict, modalities: tuple[str, ...]) -> str:
    conditions = [INTACT, *(f"zero:{m}" for m in modalities), NO_MESSAGES]
    lines = ["| segmentor: region | " + " | ".join(conditions) + " | largest single-input drop |",
             "| --- |" + " --- |" * (len(conditions) + 1)]
    for (segmentor, region), entry in summary.items():
        cells = [f"{entry[c]['dice']:.2f} ({entry[c]['mean_probability']:.2f})" for c in conditions]
        lines.append(f"| {segmentor}: {region} | " + " | ".join(cells)
                     + f" | {largest_drop(entry)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--name", default="demo", help="results file suffix")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="sliding-window overlap (0.25: about half the windows of 0.5)")
    args = parser.parse_args()

    loaded = load_checkpoint(args.model)
    settings = InferenceSettings(overlap=args.overlap)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_phantom_dataset("brats", args.cases, Path(tmp), seed=args.seed)
        for files in discover_cases(tmp):
            case = load_case(files, loaded.modalities, label_convention=loaded.info.label_convention)
            rows += modality_reliance(loaded, case, settings)
    summary = summarise(rows)
    report = table(summary, loaded.modalities)
    print(report)
    out = Path(args.out) / f"reliance_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": str(args.model), "weights_sha256": loaded.weights_sha256,
        "cases": args.cases, "seeds": [args.seed, args.seed + args.cases - 1],
        "overlap": args.overlap, "summary": {f"{s}:{r}": v for (s, r), v in summary.items()},
        "rows": [r.to_dict() for r in rows], "table": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
