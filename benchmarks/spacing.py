"""Target spacing with the bundled demo (trained at 2 mm): a phantom and its copies at 1 mm.

    python benchmarks/spacing.py [--seeds 5001 5003] [--native] [--threads 2]

Cases per seed:

- ``2mm``: the glioma phantom on its default grid (96x96x64 at 2 mm, the demo's training grid);
- ``1mm_copy``: the same case resampled to 1 mm (192x192x128): images cubic with the background
  kept exactly 0 (a masked scan stays masked), reference labels from its region masks resampled
  linearly and > 0.5 (:func:`spacing_copy`);
- ``1mm_rendered``: the generator run on 192x192x128 at 1 mm: the same anatomy and tumour (drawn
  before the images, independent of the grid) rendered with 1 mm voxels, its own noise and
  intensity draws, and its own 1 mm reference.

Every case is predicted at the model's spacing (a 1 mm case is resampled to 2 mm, the
probabilities back); with ``--native`` each 1 mm case also at its native 1 mm
(``InferenceSettings(native_spacing=True)``, 8x the windows: minutes per case on 2 cores).
``transfer`` scores the 2 mm case's own probabilities carried to the copy's 1 mm grid the way
``predict_case`` carries them (linear, > 0.5): what a perfect resampling pipeline would reach on
the copy. Writes ``benchmarks/results/spacing_demo.json`` and prints a Markdown table.
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
from ciml_core.data.dataset import LoadedCase, load_case
from ciml_core.data.labels import get_convention, labels_to_regions, regions_to_labels
from ciml_core.data.layouts import discover_cases
from ciml_core.data.nifti import atomic_save, nifti_image
from ciml_core.data.phantoms import PhantomCase, make_brats_phantom
from ciml_core.data.preprocess import resample_image, resample_labels, resample_to_spacing
from ciml_core.infer import InferenceSettings, predict_case
from ciml_core.metrics import region_metrics
from ciml_core.model import probabilities_to_region_masks

CONVENTION = "brats2020"
RENDERED_SHAPE = (192, 192, 128)


def spacing_copy(phantom: PhantomCase, spacing: float) -> PhantomCase:
    """``phantom`` resampled to isotropic ``spacing`` mm over the same field of view.

    Images: cubic (:func:`~ciml_core.data.preprocess.resample_to_spacing`), clipped at 0 and
    set to exactly 0 outside the nearest-neighbour resampled head, as a skull-stripped scan is
    (cubic ringing would otherwise leave faint nonzero background, which the union-nonzero crop
    and the brain mask of the z-score would count as brain). Label: the nested region masks
    (WT, TC, ET) resampled linearly and > 0.5, then painted back to BraTS labels.
    """
    conv = get_convention(CONVENTION)
    target = (float(spacing),) * 3
    images, affine = {}, phantom.affine
    for name, array in phantom.images.items():
        smooth, affine = resample_to_spacing(array, phantom.affine, target, order=3)
        head, _ = resample_to_spacing((array > 0).astype(np.uint8), phantom.affine, target,
                                      order=0)
        images[name] = np.where(head > 0, np.clip(smooth, 0, None), 0).astype(np.float32)
    old = tuple(float(s) for s in np.sqrt((phantom.affine[:3, :3] ** 2).sum(axis=0)))
    regions = labels_to_regions(phantom.label, conv).astype(np.uint8)
    shape = next(iter(images.values())).shape
    masks = resample_labels(regions, old, target, shape=shape).astype(bool)
    label = regions_to_labels(masks, conv).astype(np.uint8)
    return PhantomCase(phantom.case_id, images, label, affine)


def write_case(phantom: PhantomCase, root: Path) -> Path:
    """Write ``phantom`` as a BraTS 2020 case folder under ``root``; returns the folder."""
    folder = Path(root) / phantom.case_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in {**phantom.images, "seg": phantom.label}.items():
        atomic_save(nifti_image(array, phantom.affine),
                    folder / f"{phantom.case_id}_{name}.nii.gz")
    return folder


def load(folder: Path, loaded: LoadedModel) -> LoadedCase:
    (files,) = discover_cases(folder)
    return load_case(files, loaded.modalities, label_convention=CONVENTION)


def dice(label: np.ndarray, case: LoadedCase) -> dict[str, float]:
    """Dice per region of ``label`` against the case's own reference, on the case's grid."""
    metrics = region_metrics(label, case.label, CONVENTION, case.spacing)
    return {region: round(float(m["dice"]), 4) for region, m in metrics.items()}


def transfer(loaded: LoadedModel, probabilities: np.ndarray, spacing: tuple[float, ...],
             case: LoadedCase) -> dict[str, float]:
    """Dice on ``case`` of full-grid ``probabilities`` of another spacing, carried to the case's
    grid as ``predict_case`` carries probabilities (linear, then thresholded and nested)."""
    conv = get_convention(CONVENTION)
    probs = np.clip(resample_image(probabilities, spacing, case.spacing,
                                   order=1, shape=case.label.shape), 0, 1)
    masks = probabilities_to_region_masks(torch.from_numpy(probs)[None], loaded.regions)[0]
    order = [loaded.regions.index(r) for r in conv.region_names]
    return dice(regions_to_labels(masks.numpy()[order], conv).astype(np.uint8), case)


def run_seed(loaded: LoadedModel, seed: int, root: Path, native: bool) -> dict:
    settings = InferenceSettings(device="cpu")
    phantom = make_brats_phantom(seed)
    cases = {
        "2mm": load(write_case(phantom, root / f"{seed}_2mm"), loaded),
        "1mm_copy": load(write_case(spacing_copy(phantom, 1.0), root / f"{seed}_copy"), loaded),
        "1mm_rendered": load(write_case(make_brats_phantom(seed, RENDERED_SHAPE, 1.0),
                                        root / f"{seed}_rendered"), loaded),
    }
    result: dict = {"seed": seed}
    base = None
    for name, case in cases.items():
        runs = [("model", settings)]
        if native and name != "2mm":
            runs.append(("native", settings.replace(native_spacing=True)))
        for run, how in runs:
            t0 = time.perf_counter()
            prediction = predict_case(loaded, case, how)
            result[f"{name}/{run}"] = {
                "dice": dice(prediction.label, case),
                "grid": list(prediction.label.shape),
                "spacing": prediction.spacing.describe(),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            if name == "2mm":
                base = prediction
            print(seed, name, run, result[f"{name}/{run}"], flush=True)
    result["1mm_copy/transfer"] = {"dice": transfer(loaded, base.probabilities,
                                                    cases["2mm"].spacing, cases["1mm_copy"])}
    return result


def table(results: list[dict]) -> str:
    keys = sorted({k for r in results for k in r if k != "seed"},
                  key=lambda k: (k.split("/")[0] != "2mm", k))
    lines = ["| seed | case / run | WT | TC | ET |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        for k in keys:
            if k in r:
                d = r[k]["dice"]
                lines.append(f"| {r['seed']} | {k} | {d['WT']:.3f} | {d['TC']:.3f} | "
                             f"{d['ET']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[5001, 5003])
    parser.add_argument("--native", action="store_true",
                        help="also predict the 1 mm cases at their native spacing (slow)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "spacing_demo.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_seed(loaded, seed, Path(tmp), args.native) for seed in args.seeds]
    Path(args.out).write_text(json.dumps({"model": args.model, "results": results}, indent=2)
                              + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
