"""Target spacing with a model: a phantom and its copy resampled to the other of 1 mm and
2 mm, both ways round (the bundled demo runs at 1 mm).

    python benchmarks/spacing.py [--model demo] [--kind brats|brain] [--seeds 5001 5003]
                                 [--phantom-mm 1 2] [--native] [--threads 2]

Cases per seed and phantom spacing ``P`` (``O`` the other one):

- ``Pmm``: the glioma phantom rendered at P mm over the default 192x192x128 mm field of view
  (192x192x128 voxels at 1 mm, 96x96x64 at 2 mm);
- ``Omm_copy``: the same case resampled to O mm: images cubic with the background kept exactly
  0 (a masked scan stays masked), reference labels from its region masks resampled linearly and
  > 0.5 (:func:`spacing_copy`). Down to 2 mm a voxel half inside a region is a tie that only the
  "> 0.5" rule decides; up to 1 mm each voxel lies inside one 2 mm voxel and takes its label;
- ``Omm_rendered``: the generator run at O mm: the same anatomy and tumour (drawn before the
  images, independent of the grid) rendered with O mm voxels, its own noise and intensity
  draws, and its own reference.

Every case is predicted at the model's spacing (a case at another spacing is resampled to it,
the probabilities back); with ``--native`` each such case also at its native spacing
(``InferenceSettings(native_spacing=True)``). ``transfer`` scores the P mm case's own
probabilities carried to the copy's grid the way ``predict_case`` carries them (linear, > 0.5):
what a perfect resampling pipeline would reach on the copy. ``dice_outside_ties`` scores the
copy's rows without the voxels whose reference is a tie (:func:`tie_voxels`). Writes
``benchmarks/results/spacing_demo.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from nibabel.orientations import apply_orientation

from ciml_core.checkpoint import LoadedModel, load_checkpoint
from ciml_core.data.brain_phantoms import BRAIN_FOV_MM, make_brain_phantom
from ciml_core.data.dataset import LoadedCase, load_case
from ciml_core.data.labels import get_convention, labels_to_regions, regions_to_labels
from ciml_core.data.layouts import discover_cases
from ciml_core.data.nifti import atomic_save, nifti_image
from ciml_core.data.phantoms import PhantomCase, make_brats_phantom
from ciml_core.data.preprocess import resample_image, resample_to_spacing
from ciml_core.infer import InferenceSettings, predict_case
from ciml_core.metrics import dice as dice_score
from ciml_core.metrics import region_metrics
from ciml_core.model import probabilities_to_region_masks

CONVENTION = "brats2020"
FIELD_OF_VIEW_MM = (192.0, 192.0, 128.0)


def phantom_at(seed: int, spacing: float, kind: str = "brats") -> PhantomCase:
    """The glioma phantom ``seed`` rendered with isotropic ``spacing`` mm voxels over the
    default field of view (the anatomy and tumour do not depend on the grid). ``kind="brain"``:
    the brain phantom over the BraTS grid's 240x240x155 mm (2-5 mm rims; needs the atlas)."""
    if kind == "brain":
        shape = tuple(round(f / spacing) for f in BRAIN_FOV_MM)
        return make_brain_phantom(seed, shape, spacing)
    shape = tuple(round(f / spacing) for f in FIELD_OF_VIEW_MM)
    return make_brats_phantom(seed, shape, spacing)


def other_spacing(loaded: LoadedModel) -> tuple[float, float]:
    """(the model's isotropic spacing, the other of 1 mm and 2 mm)."""
    spacing = loaded.info.spacing
    if spacing is None or len(set(spacing)) != 1:
        raise SystemExit(f"{loaded.path}: needs a model with an isotropic target spacing, "
                         f"got {spacing}")
    model = float(spacing[0])
    return model, (2.0 if model < 1.5 else 1.0)


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
    shape = next(iter(images.values())).shape
    label = regions_to_labels(soft_region_masks(phantom, spacing, shape) > 0.5, conv)
    label = label.astype(np.uint8)
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
    return dice_against(label, case.label, case)


def soft_region_masks(phantom: PhantomCase, spacing: float, shape: tuple[int, ...]) -> np.ndarray:
    """The phantom's region masks (the convention's order) resampled linearly to isotropic ``spacing`` mm on
    a grid of ``shape``: ``(3, *shape)`` in [0, 1], in the phantom's voxel order."""
    old = tuple(float(s) for s in np.sqrt((phantom.affine[:3, :3] ** 2).sum(axis=0)))
    regions = labels_to_regions(phantom.label, CONVENTION).astype(np.float32)
    return resample_image(regions, old, (float(spacing),) * 3, order=1, shape=shape)


def tie_voxels(phantom: PhantomCase, spacing: float, shape: tuple[int, ...]) -> np.ndarray:
    """Per region ``(3, *shape)``: the voxels of a :func:`spacing_copy` grid where the region's
    linearly resampled mask is exactly 0.5, so that the copy's reference there is decided by
    the "> 0.5" rule alone (always outside; on a 2:1 grid, a 2x2x2 block of which exactly four
    voxels are inside the region). A thin rim makes many; soft probabilities fall either side."""
    return np.abs(soft_region_masks(phantom, spacing, shape) - 0.5) < 1e-4


def dice_against(label: np.ndarray, reference: np.ndarray, case: LoadedCase
                 ) -> dict[str, float]:
    """Dice per region of ``label`` against another ``reference`` on ``case``'s grid."""
    metrics = region_metrics(label, reference, CONVENTION, case.spacing)
    return {region: round(float(m["dice"]), 4) for region, m in metrics.items()}


def dice_outside(label: np.ndarray, case: LoadedCase, ignore: np.ndarray) -> dict[str, float]:
    """Dice per region of ``label`` against the case's reference, voxels in ``ignore`` left out."""
    conv = get_convention(CONVENTION)
    pred, ref = labels_to_regions(label, conv), labels_to_regions(case.label, conv)
    return {name: round(float(dice_score(p & ~ignore, r & ~ignore)), 4)
            for name, p, r in zip(conv.region_names, pred, ref, strict=True)}


def transfer_label(loaded: LoadedModel, probabilities: np.ndarray, spacing: tuple[float, ...],
                   case: LoadedCase) -> np.ndarray:
    """Full-grid ``probabilities`` of another spacing carried to ``case``'s grid as
    ``predict_case`` carries them (linear, then thresholded and nested), as a label map."""
    conv = get_convention(CONVENTION)
    probs = np.clip(resample_image(probabilities, spacing, case.spacing,
                                   order=1, shape=case.label.shape), 0, 1)
    masks = probabilities_to_region_masks(torch.from_numpy(probs)[None], loaded.regions)[0]
    order = [loaded.regions.index(r) for r in conv.region_names]
    return regions_to_labels(masks.numpy()[order], conv).astype(np.uint8)


def run_seed(loaded: LoadedModel, seed: int, root: Path, native: bool,
             rendered: bool = True, phantom_mm: float | None = None, kind: str = "brats"
             ) -> dict:
    """One seed: the phantom at ``phantom_mm`` (default the model's spacing) and its copy at
    the other of 1 mm and 2 mm. From a 1 mm phantom the 2 mm copy averages 2x2x2 blocks (the
    copy's reference has ties); from a 2 mm phantom the 1 mm copy interpolates, and every 1 mm
    reference voxel is decided by the 2 mm voxel it lies in (no ties)."""
    settings = InferenceSettings(device="cpu")
    model_mm, _ = other_spacing(loaded)
    home_mm = model_mm if phantom_mm is None else float(phantom_mm)
    other_mm = 2.0 if home_mm < 1.5 else 1.0
    home, copy = f"{home_mm:g}mm", f"{other_mm:g}mm_copy"
    phantom = phantom_at(seed, home_mm, kind)
    copied = spacing_copy(phantom, other_mm)
    cases = {
        home: load(write_case(phantom, root / f"{seed}_{home}"), loaded),
        copy: load(write_case(copied, root / f"{seed}_{copy}"), loaded),
    }
    # The same phantom rendered on the other grid: a case of its own, and the truth below.
    truth = phantom_at(seed, other_mm, kind)
    if rendered:
        cases[f"{other_mm:g}mm_rendered"] = load(write_case(truth, root / f"{seed}_{home}_rendered"),
                                                 loaded)
    # in the phantom's (LPS) voxel order, then in the loaded case's canonical one
    to_canonical = cases[copy].reference.to_canonical
    per_region = np.stack([apply_orientation(t, to_canonical) for t in
                           tie_voxels(phantom, other_mm, copied.label.shape)]).astype(bool)
    ties = per_region.any(axis=0)
    # The phantom's own label on the copy's grid: its geometry does not depend on the grid, so
    # this is the truth there (what a resampled reference only approximates). Only where the
    # rendered grid is the copy's (not the brain's 155 mm, which is 78 slices of 2 mm).
    truth_label = (apply_orientation(truth.label, to_canonical)
                   if np.allclose(truth.affine, copied.affine) else None)
    reference = labels_to_regions(cases[copy].label, CONVENTION)
    result: dict = {"seed": seed, "phantom_mm": home_mm, f"{copy}/ties": {
        **{r: int(t.sum()) for r, t in
           zip(get_convention(CONVENTION).region_names, per_region, strict=True)},
        "any": int(ties.sum()),
        # always 0 (a tie is outside its region's reference): checks the two grids line up
        "inside_reference": int((per_region & reference).sum())}}
    base = None
    for name, case in cases.items():
        runs = [("model", settings)]
        if native and not np.allclose(case.spacing, model_mm):
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
            if name == copy:
                result[f"{name}/{run}"]["dice_outside_ties"] = dice_outside(
                    prediction.label, case, ties)
                if truth_label is not None:
                    result[f"{name}/{run}"]["dice_vs_truth"] = dice_against(
                        prediction.label, truth_label, case)
            if name == home:
                base = prediction
            print(seed, home_mm, name, run, result[f"{name}/{run}"], flush=True)
    carried = transfer_label(loaded, base.probabilities, cases[home].spacing, cases[copy])
    result[f"{copy}/transfer"] = {"dice": dice(carried, cases[copy]),
                                  "dice_outside_ties": dice_outside(carried, cases[copy], ties),
                                  **({} if truth_label is None else {
                                      "dice_vs_truth": dice_against(carried, truth_label,
                                                                    cases[copy])})}
    return result


def table(results: list[dict]) -> str:
    lines = ["| seed | case / run | WT | TC | ET | outside ties: WT | TC | ET |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        keys = sorted((k for k in r if isinstance(r[k], dict) and "dice" in r[k]),
                      key=lambda k: ("copy" in k or "rendered" in k, k))
        for k in keys:
            d, o = r[k]["dice"], r[k].get("dice_outside_ties")
            tail = (f" {o['WT']:.3f} | {o['TC']:.3f} | {o['ET']:.3f} |" if o
                    else " - | - | - |")
            lines.append(f"| {r['seed']} | {k} | {d['WT']:.3f} | {d['TC']:.3f} | "
                         f"{d['ET']:.3f} |" + tail)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[5001, 5003])
    parser.add_argument("--native", action="store_true",
                        help="also predict the copies and rendered cases at their native spacing")
    parser.add_argument("--phantom-mm", type=float, nargs="+", default=None,
                        help="spacings to render the phantom at (each gets a copy at the other "
                             "of 1 and 2 mm); default both")
    parser.add_argument("--kind", choices=("brats", "brain"), default="brats",
                        help="procedural glioma phantom (default) or brain phantom (atlas)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "spacing_demo.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_seed(loaded, seed, Path(tmp), args.native, phantom_mm=mm,
                            kind=args.kind)
                   for mm in (args.phantom_mm or other_spacing(loaded)) for seed in args.seeds]
    Path(args.out).write_text(json.dumps({"model": args.model, "kind": args.kind,
                                          "results": results}, indent=2)
                              + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
