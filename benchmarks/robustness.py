"""Robustness curve: how a model's Dice degrades when one randomisation of the brain phantoms is
pushed beyond the range the demo was trained on, the others left as in training.

    python benchmarks/robustness.py [--model demo] [--cases 4] [--seed 8200] [--overlap 0.5]
        [--threads 2]

(benchmarks/results/robustness.json: ``--cases 2 --overlap 0.25 --threads 1``.)

Each setting regenerates the same ``--cases`` brain phantoms (same seeds: same anatomy, tumour,
texture and noise draws; only the pushed parameter differs) and scores the model's predictions
with BraTS rules (mean Dice WT/TC/ET). The cases are the standard variety; the parameters are
module constants of ``ciml_core.data.brain_phantoms`` (docs/phantoms.md), and a setting replaces
one range by a fixed value outside what the demo was trained on (texture and blur: the wide
variety's ranges). Needs the atlas. Results: benchmarks/results/robustness.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

from ciml_core.checkpoint import load_checkpoint
from ciml_core.data import brain_phantoms as bp
from ciml_core.data.layouts import discover_cases
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.evaluate import score_model
from ciml_core.infer import InferenceSettings


def _et_enhancement(value: float) -> dict:
    table = {t: dict(v) for t, v in bp.BRAIN_INTENSITY.items()}
    table["et"]["t1ce"] = (value, value)
    return {"BRAIN_INTENSITY": table}


def _psf(value: float) -> dict:
    return {"PSF_IN_PLANE_MM": (value, value),
            "PSF_THROUGH_PLANE_MM": {m: (value, value) for m in bp.PSF_THROUGH_PLANE_MM}}


WIDE = bp.WIDE_RANGES  # the demo's last training stage drew texture and blur from these

#: name -> (training range as text, [(level label, constants to patch)])
SETTINGS: dict[str, tuple[str, list[tuple[str, dict]]]] = {
    "noise (Rician sigma / WM)": (f"{bp.NOISE_FRACTION}", [
        ("0.08", {"NOISE_FRACTION": (0.08, 0.08)}), ("0.16", {"NOISE_FRACTION": (0.16, 0.16)})]),
    "bias field (std of log)": (f"{bp.BIAS_STD}", [
        ("0.25", {"BIAS_STD": (0.25, 0.25)}), ("0.5", {"BIAS_STD": (0.5, 0.5)})]),
    "gamma": (f"{bp.GAMMA}", [
        ("0.6", {"GAMMA": (0.6, 0.6)}), ("1.6", {"GAMMA": (1.6, 1.6)})]),
    "blur (PSF sigma, mm, all axes)": (
        f"in-plane {WIDE['PSF_IN_PLANE_MM']}, through-plane up to "
        f"{max(hi for _, hi in WIDE['PSF_THROUGH_PLANE_MM'].values())}", [
            ("1.5", _psf(1.5)), ("2.5", _psf(2.5))]),
    "ET enhancement on T1CE (x WM)": (f"{bp.BRAIN_INTENSITY['et']['t1ce']}", [
        ("1.35", _et_enhancement(1.35)), ("1.2", _et_enhancement(1.2))]),
    "tumour texture (relative std)": (f"{WIDE['SPREAD']['tumour']}", [
        ("0.4", {"SPREAD": {**bp.SPREAD, "tumour": (0.4, 0.4)}}),
        ("0.6", {"SPREAD": {**bp.SPREAD, "tumour": (0.6, 0.6)}})]),
    "enhancing vessels on T1CE (cm^3)": (f"{bp.VESSEL_VOLUME_CM3}", [
        ("8", {"VESSEL_VOLUME_CM3": (8.0, 8.0)}), ("16", {"VESSEL_VOLUME_CM3": (16.0, 16.0)})]),
}


def score_setting(loaded, patches: dict, cases: int, seed: int,
                  settings: InferenceSettings) -> dict[str, float]:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        for name, value in patches.items():
            stack.enter_context(mock.patch.object(bp, name, value))
        write_phantom_dataset("brain", cases, Path(tmp), seed=seed)
        _, mean = score_model(loaded, discover_cases(tmp), loaded.info.label_convention,
                              settings)
    return {region: round(values["dice"], 4) for region, values in mean.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=8200)
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="sliding-window overlap (0.25: about half the windows of 0.5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/robustness.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.model)
    settings = InferenceSettings(device="cpu", overlap=args.overlap)
    t0 = time.time()
    rows = [{"setting": "training ranges", "level": "-", "training_range": "-",
             "dice": score_setting(loaded, {}, args.cases, args.seed, settings)}]
    print(json.dumps(rows[-1]), flush=True)
    for name, (training_range, levels) in SETTINGS.items():
        for label, patches in levels:
            rows.append({"setting": name, "level": label, "training_range": training_range,
                         "dice": score_setting(loaded, patches, args.cases, args.seed,
                                               settings)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"model": str(loaded.path), "weights_sha256": loaded.weights_sha256,
              "cases": args.cases, "seeds": [args.seed, args.seed + args.cases - 1],
              "overlap": args.overlap, "threads": args.threads,
              "seconds": round(time.time() - t0, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| randomisation | training range | pushed to | WT | TC | ET |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        d = row["dice"]
        print(f"| {row['setting']} | {row['training_range']} | {row['level']} | "
              f"{d['WT']:.3f} | {d['TC']:.3f} | {d['ET']:.3f} |")


if __name__ == "__main__":
    main()
