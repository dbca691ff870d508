"""Wall time and peak memory of `ciml-core predict` on one 240x240x155 phantom case (CPU).

    python benchmarks/predict_full_size.py [--model demo] [--tta] [--native-spacing] [--device cpu]

The case is 1 mm; a model that records another target spacing resamples it to that spacing
unless ``--native-spacing`` is given (results then go to ``*_native.json``). The demo records
1 mm, so for it both run the case on its own grid.

Runs the real CLI in a child process and reads its peak resident memory (ru_maxrss) afterwards,
so the number includes Python, torch and the whole volume pipeline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--native-spacing", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "ciml_core.cli", "phantom", "--kind", "brats",
                        "--cases", "1", "--seed", "6000", "--shape", "240", "240", "155",
                        "--out", f"{tmp}/data"], check=True, capture_output=True)
        cmd = [sys.executable, "-m", "ciml_core.cli", "predict", f"{tmp}/data", "--out",
               f"{tmp}/pred", "--model", args.model, "--device", args.device]
        if args.tta:
            cmd.append("--tta")
        if args.native_spacing:
            cmd.append("--native-spacing")
        t0 = time.time()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.time() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"shape": [240, 240, 155], "model": args.model, "tta": args.tta,
              "native_spacing": args.native_spacing, "device": args.device, "seconds": round(seconds, 1), "peak_rss_mib": round(peak_mib)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = ("predict_full_size" + ("_tta" if args.tta else "")
            + ("_native" if args.native_spacing else "") + ".json")
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
