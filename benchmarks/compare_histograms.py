"""Do your scans look like the training phantoms? Per-modality intensity distributions of one or
more case folders beside those of brain phantoms, raw and after the model's normalisation.

    python benchmarks/compare_histograms.py CASE [CASE ...] [--phantoms 4] [--seed 8100]

Prints, per modality, quantiles (1, 5, 25, 50, 75, 95, 99 %) of the raw values inside the brain
(non-zero voxels) and of the normalised values (z-score inside the brain, as preprocessing does)
for every case given and for ``--phantoms`` freshly generated brain phantoms (needs the atlas,
docs/phantoms.md), plus the overlap of the normalised histograms (sum of the bin-wise minima of
the two densities: 1 = identical, 0 = disjoint) of each case against the phantoms pooled. Nothing
is written: the cases may be data that must not be copied anywhere.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from ciml_core.data.dataset import load_case
from ciml_core.data.layouts import discover_cases
from ciml_core.data.phantoms import write_phantom_dataset

MODALITIES = ("flair", "t1", "t1ce", "t2")
QUANTILES = (1, 5, 25, 50, 75, 95, 99)
BINS = np.linspace(-4, 6, 101)


def brain_values(case) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per modality: (raw values inside the brain, the same z-scored)."""
    out = {}
    mask = np.any(case.image != 0, axis=0)
    for i, modality in enumerate(MODALITIES):
        raw = case.image[i][mask].astype(np.float64)
        out[modality] = raw, (raw - raw.mean()) / max(raw.std(), 1e-8)
    return out


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    pa, _ = np.histogram(np.clip(a, BINS[0], BINS[-1]), BINS)
    pb, _ = np.histogram(np.clip(b, BINS[0], BINS[-1]), BINS)
    return float(np.minimum(pa / pa.sum(), pb / pb.sum()).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--phantoms", type=int, default=4)
    parser.add_argument("--seed", type=int, default=8100)
    args = parser.parse_args()
    given = [files for path in args.cases for files in discover_cases(path)]
    with tempfile.TemporaryDirectory() as tmp:
        write_phantom_dataset("brain", args.phantoms, Path(tmp), seed=args.seed)
        phantoms = [brain_values(load_case(f, MODALITIES, label_convention="brats2020"))
                    for f in discover_cases(tmp)]
    pooled = {m: np.concatenate([p[m][1] for p in phantoms]) for m in MODALITIES}
    rows = []
    for files in given:
        values = brain_values(load_case(files, MODALITIES))
        for m in MODALITIES:
            raw, z = values[m]
            rows.append({"case": files.case_id, "modality": m,
                         "raw_q": np.percentile(raw, QUANTILES).round(1).tolist(),
                         "z_q": np.percentile(z, QUANTILES).round(2).tolist(),
                         "overlap_with_phantoms": round(overlap(z, pooled[m]), 3)})
    for i, p in enumerate(phantoms):
        for m in MODALITIES:
            raw, z = p[m]
            rows.append({"case": f"brain phantom {args.seed + i}", "modality": m,
                         "raw_q": np.percentile(raw, QUANTILES).round(1).tolist(),
                         "z_q": np.percentile(z, QUANTILES).round(2).tolist(),
                         "overlap_with_phantoms": round(overlap(
                             z, np.concatenate([q[m][1] for j, q in enumerate(phantoms)
                                                if j != i])), 3)})
    print(f"quantiles {QUANTILES} (%) inside the brain; overlap: normalised histograms vs the "
          "other phantoms pooled")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
