"""Cohort prediction with and without prefetch: wall time of ``predict_cohort`` on N full-size
(240x240x155) phantom cases, reading ahead / writing behind vs one case after the other, and a
byte comparison of the outputs.

    python benchmarks/cohort_predict.py [--cases 8] [--data runs/scale/data] [--model demo]

Uses the cases ``benchmarks/scale_rehearsal.py`` generates (it writes them when missing). Both
loops run in this process, sequential first; run it alone on the machine. Results:
benchmarks/results/cohort_predict_cpu.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

from ciml_core.checkpoint import load_checkpoint
from ciml_core.cohort import predict_cohort
from ciml_core.data.layouts import discover_cases
from ciml_core.infer import InferenceSettings


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/scale/data"))
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/cohort_predict_cpu.json"))
    args = parser.parse_args()
    if not args.data.is_dir() or len(discover_cases(args.data)) < args.cases:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from scale_rehearsal import generate

        generate(args.data.parent, args.cases)
    cases = discover_cases(args.data)[: args.cases]
    loaded = load_checkpoint(args.model, device="cpu")
    settings = InferenceSettings(device="cpu")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prefetch in (False, True):
            out = Path(tmp) / ("prefetch" if prefetch else "sequential")
            report = predict_cohort(loaded, cases, out, settings, prefetch=prefetch)
            runs[prefetch] = (report, digests(out))
    (seq, seq_files), (pre, pre_files) = runs[False], runs[True]
    result = {
        "cases": len(cases), "shape": [240, 240, 155], "model": args.model,
        "cores": len(os.sched_getaffinity(0)),
        "sequential_s": round(seq.seconds, 1), "prefetch_s": round(pre.seconds, 1),
        "ratio_prefetch_over_sequential": round(pre.seconds / seq.seconds, 3),
        "cases_per_hour_sequential": round(seq.cases_per_hour, 1),
        "cases_per_hour_prefetch": round(pre.cases_per_hour, 1),
        "outputs_identical": seq_files == pre_files, "files": len(pre_files),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
