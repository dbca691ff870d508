"""The ``ciml-core`` command line.

Each subcommand is a small function ``_cmd_<name>(args)`` over the library; parsing lives in
``build_parser`` so that later subcommands (train, predict, evaluate, explain, info) plug in the
same way. Errors raised on bad input (:class:`ciml_core.errors.CimlError`) are printed as one line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ciml_core import __version__
from ciml_core.errors import CimlError


def _cmd_phantom(args: argparse.Namespace) -> int:
    from ciml_core.data.phantoms import write_phantom_dataset

    written = write_phantom_dataset(
        kind=args.kind,
        cases=args.cases,
        out=Path(args.out),
        seed=args.seed,
        shape=tuple(args.shape) if args.shape else None,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(written)} {args.kind} phantom case(s) to {args.out}")
    return 0


def _read_decomposition(path: str | None) -> dict | None:
    """``--decomposition FILE``: the JSON object, validated (errors name the file)."""
    if path is None:
        return None
    from ciml_core.errors import ConfigError
    from ciml_core.model import TaskDecomposition

    try:
        data = json.loads(Path(path).read_text())
        return TaskDecomposition.from_dict(data).to_dict()
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--decomposition {path}: cannot read a JSON object ({err})") from err
    except ConfigError as err:
        raise ConfigError(f"--decomposition {path}: {err}") from err


def _cmd_train(args: argparse.Namespace) -> int:
    from ciml_core.train import TrainConfig, train

    if args.data is None and not args.demo and not args.resume:
        print("no DATA given: training on freshly generated phantoms (--demo)", file=sys.stderr)
    cfg = TrainConfig(
        out=Path(args.out), data=Path(args.data) if args.data else None, layout=args.layout,
        labels=args.labels, fold=args.fold, epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch, patch=args.patch, batch=args.batch,
        width=args.width, variant=args.variant, beta=args.beta, norm=args.norm, lr=args.lr,
        device=args.device, seed=args.seed, val_every=args.val_every, workers=args.workers,
        augment=not args.no_augment, compile=args.compile, demo_cases=args.demo_cases,
        resume=args.resume, decomposition=_read_decomposition(args.decomposition),
    )
    run = train(cfg).run_dir
    print(f"run folder: {run} (best model: {run / 'best'}, latest: {run / 'latest'})")
    return 0


def _output_inside_inputs(out: Path, inputs: list[Path]) -> Path | None:
    out = out.resolve()
    for p in inputs:
        folder = (p if p.is_dir() else p.parent).resolve()
        if out == folder or folder in out.parents:
            return folder
    return None


def _cases_for_prediction(inputs: list[str], modalities: tuple[str, ...], case_id: str | None):
    """INPUT... -> CaseFiles: case folders / dataset roots / manifests, or one case given as
    files (``MOD=PATH`` pairs, or bare paths in the model's modality order)."""
    from ciml_core.data.layouts import CaseFiles, canonical_modality, discover_cases
    from ciml_core.data.nifti import is_nifti_path

    if all("=" in i or is_nifti_path(i) for i in inputs):
        if all("=" in i for i in inputs):
            images = {canonical_modality(k): Path(v) for k, v in (i.split("=", 1) for i in inputs)}
        elif len(inputs) == len(modalities):
            images = dict(zip(modalities, map(Path, inputs), strict=True))
        else:
            raise CimlError(
                f"{len(inputs)} image file(s) given, the model needs {len(modalities)} "
                f"({', '.join(modalities)}): pass them in that order or as MOD=PATH")
        name = case_id or re.sub(r"(_[^_]+)?\.nii(\.gz)?$", "", next(iter(images.values())).name)
        return [CaseFiles(name, images, None, "files")]
    cases = []
    for i in inputs:
        cases.extend(discover_cases(i))
    return cases


def _cmd_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ciml_core.checkpoint import load_checkpoint
    from ciml_core.data.dataset import load_case
    from ciml_core.distributed import cleanup, setup_distributed, shard
    from ciml_core.infer import predict_case, write_prediction

    out = Path(args.out)
    inside = _output_inside_inputs(out, [Path(i.split("=", 1)[-1]) for i in args.inputs])
    if inside is not None and not args.allow_input_dir:
        raise CimlError(f"--out {out} is inside the input folder {inside}; choose another folder "
                        "or pass --allow-input-dir")
    ctx = setup_distributed(args.device)
    try:
        loaded = load_checkpoint(args.model, device="cpu")
        cases = shard(_cases_for_prediction(args.inputs, loaded.modalities, args.case_id), ctx)
        written = []
        for case_files in tqdm(cases, desc="cases", unit="case", disable=(not ctx.is_main) or None):
            target = out / f"{case_files.case_id}.nii.gz"
            if target.exists() and not args.overwrite:
                raise FileExistsError(f"{target} already exists (use --overwrite to replace it)")
            case = load_case(case_files, loaded.modalities)
            bar = tqdm(desc=f"{case_files.case_id} windows", unit="win", leave=False)

            def tick(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.update(done - bar.n)

            prediction = predict_case(loaded, case, overlap=args.overlap, mirror=args.tta,
                                      device=ctx.device, progress=tick,
                                      bf16=True if args.bf16 else None)
            bar.close()
            written += write_prediction(prediction, case, out, probabilities=args.probabilities,
                                        overwrite=args.overwrite)
        print(f"wrote {len(written)} file(s) to {out}")
    finally:
        cleanup(ctx)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ciml_core.evaluate import evaluate_folders

    report = evaluate_folders(Path(args.pred_dir), Path(args.ref_dir), labels=args.labels,
                              out=Path(args.out) if args.out else None, overwrite=args.overwrite,
                              allow_missing=args.allow_missing)
    print(report.summary_table())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ciml_core.checkpoint import load_checkpoint, read_checkpoint_config, resolve_checkpoint
    from ciml_core.model import count_parameters

    document = read_checkpoint_config(args.model)
    loaded = load_checkpoint(args.model)  # also checks every tensor against the config
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    model = document["model"]
    training = document.get("training", {})
    print(f"checkpoint      {resolve_checkpoint(args.model)}")
    print(f"package         napari-ciml {document.get('package_version', '?')}")
    print(f"variant         {model['variant']} (width C={model['width']}, norm {model['norm']}, "
          f"patch {document['patch_size']}, {count_parameters(loaded.model):,} parameters)")
    print(f"modalities      {', '.join(document['modalities'])}")
    print(f"regions         {', '.join(document['regions'])} "
          f"(labels: {document['label_convention']})")
    print("decomposition")
    for task in model["decomposition"]["tasks"]:
        print(f"  {'+'.join(task['primary']):>12} -> {', '.join(task['regions'])}")
    cfg = training.get("config", {})
    if cfg:
        print(f"training        {training.get('epochs_completed', '?')}/{cfg.get('epochs')} epochs x "
              f"{cfg.get('iters_per_epoch')} iterations, batch {cfg.get('batch')}, seed "
              f"{cfg.get('seed')}, {training.get('seconds', '?')} s, data {training.get('data')}")
    if document.get("metrics"):
        print(f"metrics         {json.dumps(document['metrics'])}")
    print(f"weights sha256  {document['weights_sha256']}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ciml_core.checkpoint import load_checkpoint
    from ciml_core.data.dataset import load_case
    from ciml_core.data.labels import get_convention, labels_to_regions
    from ciml_core.data.layouts import discover_cases
    from ciml_core.explain import explain_case, parse_pairs, planned_paths, write_explanations
    from ciml_core.figures import heatmap_grid_figure, save_figure, weights_chart_figure

    loaded = load_checkpoint(args.model, device="cpu")
    pairs = parse_pairs(args.pairs, loaded.config.decomposition)
    cases = discover_cases(args.case)
    if len(cases) != 1:
        raise CimlError(f"{args.case} holds {len(cases)} cases; explain takes one case folder")
    case = load_case(cases[0], loaded.modalities)
    out = Path(args.out)
    grid_png = out / f"{case.case_id}_gradcam.png"
    chart_png = out / f"{case.case_id}_weights.png"
    # Refuse before the (slow) Grad-CAM, not after it.
    existing = [p for p in [*planned_paths(loaded, case.case_id, pairs, out), grid_png, chart_png]
                if p.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} already exists (use --overwrite to replace it)")
    with tqdm(desc=f"{case.case_id} Grad-CAM", unit="pass") as bar:

        def tick(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        explanations = explain_case(loaded, case, pairs, mode=args.mode, device=args.device,
                                    progress=tick)
    written = write_explanations(explanations, case, out, overwrite=args.overwrite)
    reference = None
    if case.label is not None:
        convention = get_convention(loaded.info.label_convention)
        masks = labels_to_regions(case.label, convention)
        reference = dict(zip(convention.region_names, masks, strict=True))
    written.append(save_figure(heatmap_grid_figure(explanations, case, reference=reference),
                               grid_png, overwrite=args.overwrite))
    written.append(save_figure(weights_chart_figure(
        explanations, title=f"{case.case_id}: complementary information weights"),
        chart_png, overwrite=args.overwrite))
    for e in explanations:
        shares = ", ".join(f"{aux.upper()} {e.weights[aux]:.2f}" for aux in e.auxiliary)
        print(f"{e.name:>10}  {shares}  ({e.target_voxels} target voxels)")
    print(f"wrote {len(written)} file(s) to {out}")
    return 0


def _cmd_shapes(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ciml_core.shapes_experiment import (
        ShapesConfig,
        run_shapes_experiment,
        shapes_output_paths,
        write_shapes_outputs,
    )

    cfg = ShapesConfig(steps=args.steps, beta=args.beta, seed=args.seed, size=args.size,
                       width=args.width, train_pairs=args.train_pairs,
                       eval_pairs=args.eval_pairs, device=args.device)
    out = Path(args.out)
    existing = [p for p in shapes_output_paths(out) if p.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} already exists (use --overwrite to replace it)")
    with tqdm(total=cfg.steps, desc=f"ShapeComposition beta={cfg.beta:g}", unit="step") as bar:

        def tick(step: int, steps: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(step - bar.n)

        result = run_shapes_experiment(cfg, progress=tick)
    written = write_shapes_outputs(result, out, overwrite=args.overwrite)
    means = result.region_means
    print(f"redundancy-filtering ratio {result.ratio:.3f} (mean |map| auxiliary-only "
          f"{means['auxiliary_only']:.3f} / overlap {means['overlap']:.3f}), held-out Dice "
          f"{result.dice:.3f}, {result.seconds:.0f} s")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ciml-core",
        description="Train, evaluate and run CIML multimodal segmentation models.",
    )
    parser.add_argument("--version", action="version", version=f"ciml-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "phantom",
        help="write synthetic multimodal cases (BraTS-like glioma, ShapeComposition, PET/CT)",
        description="Write synthetic NIfTI cases with real affines. brats: BraTS 2020 layout "
        "(flair, t1, t1ce, t2, seg; labels 0/1/2/4); shapes: ShapeComposition pairs "
        "(primary triangle, auxiliary ellipse, union target); petct: autoPET layout "
        "(CTres, SUV, SEG).",
    )
    p.add_argument("--kind", choices=["brats", "shapes", "petct"], required=True)
    p.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed; case i uses seed+i")
    p.add_argument(
        "--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
        help="volume shape in voxels (brats default 96 96 64 at 2 mm; 240 240 155 is the BraTS grid)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace cases that already exist")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser(
        "train", help="train a CIML model (or an ablation / DynUNet) on a dataset folder",
        description="Train on DATA (any supported layout) or, without DATA, on freshly generated "
        "phantoms. Works on CPU, one GPU, or many through "
        "`torchrun --nproc_per_node N -m ciml_core.cli train ...`.",
    )
    p.add_argument("data", nargs="?", help="dataset root, case folder or manifest (omit for --demo)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, splits)")
    p.add_argument("--demo", action="store_true", help="train on generated BraTS-like phantoms")
    p.add_argument("--demo-cases", type=int, default=16, help="phantom cases for --demo (default 16)")
    p.add_argument("--layout", default="auto",
                   choices=["auto", "brats2020", "brats2023", "nnunet", "autopet", "hecktor",
                            "manifest"])
    p.add_argument("--labels", choices=["brats2020", "brats2023", "binary", "hecktor"],
                   help="label convention (default: the layout's)")
    p.add_argument("--fold", type=int, default=0, help="cross-validation fold 0-4, -1 = all data")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--iters-per-epoch", type=int, default=100)
    p.add_argument("--patch", type=int, default=64, help="cubic patch size, multiple of 16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--width", type=int, default=16, help="base number of filters C")
    p.add_argument("--variant", default="full",
                   choices=["full", "baseline", "message", "attention", "vi", "dynunet"])
    p.add_argument("--beta", type=float, default=0.5, help="KL weight (default 0.5)")
    p.add_argument("--decomposition", metavar="JSON",
                   help="task decomposition file {modalities, regions, tasks: [{primary, regions}]} "
                   "(default: the paper's for the dataset's modalities; docs/training.md)")
    p.add_argument("--norm", default="batch", choices=["batch", "instance"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=5, help="validate every N epochs")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--no-augment", action="store_true", help="turn the augmentations off")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "predict", help="segment cases with a trained model (default: the bundled demo model)",
        description="INPUT is a case folder, a dataset root (every case), a manifest, or the "
        "image files of one case (MOD=PATH pairs, or paths in the model's modality order). "
        "Writes <case>.nii.gz (uint8 labels in the dataset's convention) with the input's "
        "affine and header.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="demo", help="'demo' or a checkpoint folder")
    p.add_argument("--tta", action="store_true", help="8-way mirroring test-time augmentation")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast on the CPU too (always on CUDA): faster on CPUs with "
                        "AVX512-BF16/AMX, probabilities differ by ~1e-2 (docs/performance.md)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (0.5)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <case>_prob_<region>.nii.gz")
    p.add_argument("--case-id", help="case name when INPUT is a list of files")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--allow-input-dir", action="store_true",
                   help="allow --out to be inside an input folder")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "evaluate", help="Dice and HD95 per region and case against reference labels",
        description="Compare <case>.nii.gz predictions with reference labels (a dataset folder "
        "or a flat folder of <case>.nii.gz). BraTS rules for empty masks.",
    )
    p.add_argument("pred_dir")
    p.add_argument("ref_dir")
    p.add_argument("--labels", default="brats2020",
                   choices=["brats2020", "brats2023", "binary", "hecktor"])
    p.add_argument("--out", help="report CSV path (a JSON is written beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--allow-missing", action="store_true",
                   help="score a reference case without prediction as an empty prediction")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "explain", help="Grad-CAM heatmaps and complementary-information weights of a case",
        description="Per (primary modality : region) pair, Grad-CAM heatmaps of each auxiliary "
        "modality's complementary representation (paper 4.6, Eq. 14-15) and their weights "
        "(Eq. 16-17). CASE is one case folder. Writes <case>_heatmap_<PAIR>_from_<AUX>.nii.gz "
        "(the input's affine and header), weights.csv, weights.json, <case>_gradcam.png (paper "
        "Fig. 16) and <case>_weights.png (Fig. 18). See docs/interpretability.md.",
    )
    p.add_argument("case", metavar="CASE", help="a case folder of any supported layout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="demo", help="'demo' or a checkpoint folder")
    p.add_argument("--pairs", default="all",
                   help="'all' (default) or a comma-separated list such as FLAIR:WT,T1CE:ET")
    p.add_argument("--mode", default="roi", choices=["roi", "sliding"],
                   help="roi: one patch-sized window centred on the predicted tumour (default, "
                   "fast); sliding: every sliding window, Gaussian-stitched")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "shapes", help="the ShapeComposition experiment (paper 4.3): redundancy filtering",
        description="Train the two-encoder ShapeComposition network on generated triangle / "
        "ellipse pairs, then write shapes_fig13.png (paper Fig. 13) and shapes_result.json with "
        "the redundancy-filtering ratio (mean |complementary map| on auxiliary-only pixels / on "
        "the overlap, held-out pairs) and the Dice. --beta 0 trains without the KL term.",
    )
    p.add_argument("--out", required=True, help="output folder")
    # 600 = shapes_experiment.DEFAULT_STEPS (not imported here: --help must not load torch).
    p.add_argument("--steps", type=int, default=600, help="optimiser steps (default 600)")
    p.add_argument("--beta", type=float, default=0.5, help="KL weight; 0 = without KL (0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image size, multiple of 16 (64)")
    p.add_argument("--width", type=int, default=4, help="base number of filters C (4)")
    p.add_argument("--train-pairs", type=int, default=1000,
                   help="generated training pairs (1000, as the paper)")
    p.add_argument("--eval-pairs", type=int, default=100, help="held-out pairs (100)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_cmd_shapes)

    p = sub.add_parser("info", help="show a checkpoint's configuration, training and metrics")
    p.add_argument("model", nargs="?", default="demo", help="'demo' (default) or a checkpoint")
    p.add_argument("--json", action="store_true", help="print config.json as is")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CimlError, FileExistsError) as err:
        print(f"ciml-core {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ciml-core {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
