"""Separability of the brain phantom, measured the way tests/test_phantoms.py measures it: the
best single-threshold Dice of each modality for each region inside the brain, and the
T1CE+FLAIR rule for TC, per seed, then min / mean / max over the high-grade seeds.

    python benchmarks/brain_separability.py [--seeds 0 1 ... 11] [--shape 240 240 155]

Prints the Markdown table of docs/phantoms.md ("Separability (measured)"); writes nothing.
The measurement helpers live in the tests (one definition of "measured the same way").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ciml_core.data.brain_phantoms import brain_spacing, make_brain_phantom  # noqa: E402
from ciml_core.data.phantoms import BRATS_MODALITIES  # noqa: E402
from test_phantoms import regions, separability_table, two_modality_core  # noqa: E402

COLUMNS = [(r, m) for r in ("WT", "TC", "ET") for m in BRATS_MODALITIES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(12)))
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    args = parser.parse_args()
    head = " | ".join(f"{r} {m.upper()}" for r, m in COLUMNS)
    print(f"| seed (grade) | WT / TC / ET cm³ | {head} | TC T1CE+FLAIR | vessels cm³ |")
    print("| --- " * (len(COLUMNS) + 4) + "|")
    rows = []
    voxel_cm3 = float(np.prod(brain_spacing(args.shape))) / 1000
    for seed in args.seeds:
        case = make_brain_phantom(seed, tuple(args.shape))
        r = regions(case.label)
        high = bool(r["ET"].any())
        table = separability_table([case])
        row = [table.get((0, reg, m)) for reg, m in COLUMNS]
        row.append(two_modality_core(case) if high else None)
        if high:
            rows.append(row)
        volumes = " / ".join(f"{r[k].sum() * voxel_cm3:.0f}" for k in ("WT", "TC", "ET"))
        cells = " | ".join("-" if v is None else f"{v:.3f}" for v in row)
        vessels = case.tissues["vessels"].sum() * voxel_cm3
        print(f"| {seed} ({'HGG' if high else 'LGG'}) | {volumes} | {cells} | {vessels:.1f} |",
              flush=True)
    values = np.array(rows, dtype=float)
    for name, fn in (("min", np.min), ("mean", np.mean), ("max", np.max)):
        cells = " | ".join(f"{v:.3f}" for v in fn(values, axis=0))
        print(f"| {name}, high grade | | {cells} | |")


if __name__ == "__main__":
    main()
