"""The ``ciml-core`` command line.

Each subcommand is a small function ``_cmd_<name>(args)`` over the library; parsing lives in
``build_parser`` so that later subcommands (train, predict, evaluate, explain, info) plug in the
same way. Errors raised on bad input (:class:`ciml_core.errors.CimlError`) are printed as one line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ciml_core import __version__
from ciml_core.errors import CimlError

# -- option values, validated where they enter (argparse types) -----------------------------------


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in "invalid ... value" messages
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def _float_in(low: float, high: float | None, what: str, *, low_open: bool = False,
              high_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = value == value and value not in (float("inf"), float("-inf"))
        ok = ok and (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


positive_float = _float_in(0.0, None, "a finite number > 0", low_open=True)
nonnegative_float = _float_in(0.0, None, "a finite number >= 0")
overlap_fraction = _float_in(0.0, 1.0, "a fraction in [0, 1)")


def patch_size(text: str) -> int:
    """A cubic patch / image side that the network accepts (``check_spatial_size``)."""
    from ciml_core.errors import ConfigError
    from ciml_core.model.config import SIZE_DIVISOR, check_spatial_size

    value = positive_int(text)
    try:
        check_spatial_size((value,), 1, what="size")
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"expected a positive multiple of {SIZE_DIVISOR}, got {value}") from None
    return value


def _fold(text: str) -> int:
    value = _int_at_least(-1, "a fold 0-4, or -1 for all data")(text)
    if value > 4:
        raise argparse.ArgumentTypeError(f"expected a fold 0-4, or -1 for all data, got {value}")
    return value


#: Largest phantom side accepted by --shape (1024^3 voxels x 5 volumes is already ~20 GB).
_MAX_PHANTOM_SIDE = 1024


def _phantom_side(text: str) -> int:
    value = positive_int(text)
    if value > _MAX_PHANTOM_SIDE:
        raise argparse.ArgumentTypeError(f"expected at most {_MAX_PHANTOM_SIDE} voxels per axis, "
                                         f"got {value}")
    return value


class _OptionError(CimlError):
    """A bad command line (unknown option, a value of the wrong kind or out of range)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse whose errors reach :func:`main` (one line, exit 2, like every other error of the
    command line, also when called in-process) instead of printing the usage and exiting;
    ``--help`` still shows the usage."""

    def error(self, message: str):
        raise _OptionError(self.prog, message)


def _one_line(message: str) -> str:
    """A message as one line: control characters (a newline in a file name) are escaped."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], message)


def _cmd_phantom(args: argparse.Namespace) -> int:
    from ciml_core.data.phantoms import write_phantom_dataset
    from ciml_core.io import check_output_dir

    check_output_dir(args.out)
    written = write_phantom_dataset(
        kind=args.kind,
        cases=args.cases,
        out=Path(args.out),
        seed=args.seed,
        shape=tuple(args.shape) if args.shape else None,
        overwrite=args.overwrite,
        variety=args.variety,
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
    from ciml_core.io import check_output_dir
    from ciml_core.train import TrainConfig, resume_config, train

    check_output_dir(args.out)
    if args.data is None and not args.demo and not args.resume:
        print("no DATA given: training on freshly generated phantoms (--demo)", file=sys.stderr)
    settings = _train_settings(args)
    cfg = (resume_config(Path(args.out), **settings) if args.resume
           else TrainConfig(out=Path(args.out), **settings))
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


def _case_paths(cases) -> list[Path]:
    """Every file (images and labels) of discovered cases."""
    return [p for c in cases for p in (*c.images.values(), *([c.label] if c.label else []))]


def _refuse_output_inside_inputs(out: Path, inputs: list[Path], allow: bool, flag: bool) -> None:
    """``--out`` may not be (inside) a folder an input was read from: the next run would take the
    outputs for inputs. ``flag``: whether the command has ``--allow-input-dir``."""
    inside = _output_inside_inputs(out, inputs)
    if inside is not None and not allow:
        hint = " or pass --allow-input-dir" if flag else ""
        raise CimlError(f"--out {out} is inside the input folder {inside}; choose another "
                        f"folder{hint}")


def _split_input(item: str) -> tuple[str | None, Path]:
    """``MOD=PATH`` -> (canonical modality, path); a plain path -> (None, path). A path that
    holds '=' itself (``/data/run=1/x.nii.gz``) is a plain path when MOD is no modality name."""
    from ciml_core.data.layouts import MODALITY_ALIASES, canonical_modality

    key, sep, value = item.partition("=")
    if sep and key.strip().lower() in MODALITY_ALIASES:
        return canonical_modality(key), Path(value)
    if sep and not Path(item).exists():
        raise CimlError(f"{item}: {key!r} is not a modality name (expected MOD=PATH with MOD one "
                        f"of {sorted(MODALITY_ALIASES)}) and no such file exists")
    return None, Path(item)


def _case_from_files(inputs: list[str], modalities: tuple[str, ...], case_id: str | None):
    """One case given as its image files: ``MOD=PATH`` pairs, or paths whose names say the
    modality (``*_flair``, ``*_t1``, ``*_t1ce``, ``*_t2``, BraTS 2023 ``*-t2f``, ``*-t1n``,
    ``*-t1c``, ``*-t2w``, ...), in any order. Names that say no modality, or two files for one
    modality, are refused: assigning files by position silently swaps modalities."""
    from ciml_core.data.layouts import CaseFiles, check_case_id, modality_from_filename

    images: dict[str, Path] = {}
    prefixes: dict[str, Path] = {}
    for item in inputs:
        modality, path = _split_input(item)
        if modality is None:
            found = modality_from_filename(path)
            if found is None:
                raise CimlError(
                    f"{path}: cannot tell the modality from the file name (expected a name "
                    "ending in _flair, _t1, _t1ce, _t2 or -t2f, -t1n, -t1c, -t2w); pass the files "
                    f"as MOD=PATH ({', '.join(f'{m}=...' for m in modalities)})")
            modality, prefix = found
            also = modality_from_filename(prefix + ".nii") if prefix else None
            if also is not None and also[0] != modality:
                raise CimlError(
                    f"{path}: the file name is ambiguous (it names both {also[0]} and "
                    f"{modality}); pass the files as MOD=PATH")
            prefixes.setdefault(prefix, path)
        if modality in images:
            raise CimlError(f"{images[modality]} and {path} are both {modality} images; give "
                            "one file per modality")
        if modality not in modalities:
            raise CimlError(f"{path} is a {modality} image, but the model takes "
                            f"{', '.join(modalities)}")
        images[modality] = path
    if len(prefixes) > 1:
        (a, pa), (b, pb) = list(prefixes.items())[:2]
        raise CimlError(f"{pa.name} and {pb.name} belong to two cases ({a!r} and {b!r}); give "
                        "the files of one case")
    if case_id is None:
        first = next(iter(images.values()))
        prefix = next(iter(prefixes), "")
        case_id = prefix.rstrip("_-. ") or first.resolve().parent.name
        check_case_id(case_id, f"{first} (case id from the file name; pass --case-id)")
    return CaseFiles(case_id, {m: images[m] for m in modalities if m in images}, None, "files")


def _inputs_are_files(inputs: list[str]) -> bool:
    """True when INPUT... is the image files of one case (``MOD=PATH`` pairs or NIfTI paths)."""
    from ciml_core.data.nifti import is_nifti_path

    return all(is_nifti_path(i) or _split_input(i)[0] is not None for i in inputs)


def _discover_inputs(inputs: list[str]):
    """Case folders / dataset roots / manifests -> CaseFiles, case ids unique over them all."""
    from ciml_core.data.layouts import check_unique_case_ids, discover_cases

    cases = []
    for i in inputs:
        cases.extend(discover_cases(i))
    check_unique_case_ids(cases, " + ".join(inputs))
    return cases


def _output_labels(args: argparse.Namespace, case_files, loaded) -> str:
    """``--labels``, else the convention of the case's layout when it names the model's regions
    (a BraTS 2023 case gets ET = 3, a BraTS 2020 one ET = 4), else the model's own."""
    from ciml_core.data.layouts import DEFAULT_LABEL_CONVENTION
    from ciml_core.infer import fitting_convention

    if args.labels:
        return args.labels
    return (fitting_convention(DEFAULT_LABEL_CONVENTION.get(case_files.layout), loaded.regions)
            or loaded.info.label_convention)


def _cmd_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ciml_core.checkpoint import load_checkpoint
    from ciml_core.cohort import predict_cohort, prediction_paths
    from ciml_core.data.layouts import check_case_id
    from ciml_core.io import check_output_dir
    from ciml_core.runtime import cleanup, setup_distributed, shard

    out = check_output_dir(args.out)
    if args.case_id is not None:
        check_case_id(args.case_id, "--case-id")
    _refuse_output_inside_inputs(out, [_split_input(i)[1] for i in args.inputs],
                                 args.allow_input_dir, flag=True)
    # Datasets are read before the model is loaded: a bad folder or manifest fails at once.
    cases = None if _inputs_are_files(args.inputs) else _discover_inputs(args.inputs)
    ctx = setup_distributed(args.device)
    try:
        loaded = load_checkpoint(args.model, device="cpu")
        if cases is None:
            cases = [_case_from_files(args.inputs, loaded.modalities, args.case_id)]
        # A manifest may point anywhere: no output into the folder of any input file either.
        _refuse_output_inside_inputs(out, _case_paths(cases), args.allow_input_dir, flag=True)
        inputs = {p.resolve() for p in _case_paths(cases)}
        cases = shard(cases, ctx)
        settings = _inference_settings(args, device=ctx.device)
        for case_files in cases:
            for target in prediction_paths(case_files.case_id, loaded.regions, out,
                                           args.probabilities):
                if target.resolve() in inputs:  # even with --overwrite --allow-input-dir
                    raise CimlError(f"{target} is an input file of this run; the outputs of case "
                                    f"{case_files.case_id} would replace it")
        bar = tqdm(total=len(cases), desc="cases", unit="case",
                   disable=(not ctx.is_main) or None)

        window_bars: dict[str, tqdm] = {}

        def windows(case_id: str):
            window_bar = window_bars[case_id] = tqdm(desc=f"{case_id} windows", unit="win",
                                                     leave=False)

            def tick(done: int, total: int) -> None:
                window_bar.total = total
                window_bar.update(done - window_bar.n)
            return tick

        def case_done(case_id: str) -> None:
            window_bars.pop(case_id).close()
            bar.update()

        report = predict_cohort(
            loaded, cases, out, settings, probabilities=args.probabilities,
            overwrite=args.overwrite, prefetch=not args.no_prefetch,
            label_convention=lambda case_files: _output_labels(args, case_files, loaded),
            warn=lambda w: print(f"ciml-core predict: warning: {w}", file=sys.stderr),
            case_progress=windows, case_done=case_done)
        bar.close()
        written = report.files
        if report.cases:
            print(f"{report.cases} case(s) in {report.seconds:.1f} s "
                  f"({report.cases_per_hour:.1f} cases/hour)")
        print(f"wrote {len(written)} file(s) to {out}")
    finally:
        cleanup(ctx)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ciml_core.evaluate import evaluate_folders
    from ciml_core.io import check_output_dir

    if args.out is not None:
        if Path(args.out).is_dir():
            raise CimlError(f"--out {args.out}: is a folder; expected the report's CSV path "
                            "(e.g. report.csv)")
        check_output_dir(Path(args.out).parent, what=f"--out {args.out}: folder")
    report = evaluate_folders(Path(args.pred_dir), Path(args.ref_dir), labels=args.labels,
                              out=Path(args.out) if args.out else None, overwrite=args.overwrite,
                              allow_missing=args.allow_missing)
    print(report.summary_table())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ciml_core.checkpoint import describe, load_checkpoint, read_checkpoint_config

    document = read_checkpoint_config(args.model)
    loaded = load_checkpoint(args.model)  # also checks every tensor against the config
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print("\n".join(describe(loaded).lines()))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ciml_core.checkpoint import load_checkpoint
    from ciml_core.data.dataset import load_case
    from ciml_core.data.labels import get_convention, labels_to_regions
    from ciml_core.data.layouts import discover_cases
    from ciml_core.explain import explain_case, parse_pairs, planned_paths, write_explanations
    from ciml_core.figures import (
        METHOD_NAMES,
        heatmap_grid_figure,
        save_figure,
        weights_chart_figure,
    )
    from ciml_core.infer import input_warnings
    from ciml_core.io import check_output_dir, output_path, refuse_existing

    out = check_output_dir(args.out)
    # Heatmaps in an input folder would be taken for a modality by the next run (as predict).
    _refuse_output_inside_inputs(out, [Path(args.case)], allow=False, flag=False)
    loaded = load_checkpoint(args.model, device="cpu")
    pairs = parse_pairs(args.pairs, loaded.config.decomposition)
    cases = discover_cases(args.case)
    if len(cases) != 1:
        raise CimlError(f"{args.case} holds {len(cases)} cases; explain takes one case folder")
    _refuse_output_inside_inputs(out, _case_paths(cases), allow=False, flag=False)
    case = load_case(cases[0], loaded.modalities)
    for warning in input_warnings(case, loaded):
        print(f"ciml-core explain: warning: {warning}", file=sys.stderr)
    grid_png = output_path(out, f"{case.case_id}_gradcam.png")
    chart_png = output_path(out, f"{case.case_id}_weights.png")
    # Refuse before the (slow) Grad-CAM, not after it (each write refuses atomically too).
    refuse_existing([*planned_paths(loaded, case.case_id, pairs, out), grid_png, chart_png],
                    args.overwrite)
    with tqdm(desc=f"{case.case_id} {METHOD_NAMES[args.method]}", unit="pass") as bar:

        def tick(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        explanations = explain_case(loaded, case, pairs, _inference_settings(args),
                                    mode=args.mode, progress=tick, method=args.method,
                                    extent=args.extent, margin_mm=args.margin)
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
        shares = ", ".join(f"{aux.upper()} {e.weights[aux]:.2f} (inside "
                           f"{e.inside_fraction.get(aux, float('nan')):.2f})" for aux in e.auxiliary)
        empty = "  NO TARGET: weights are the uniform default" if e.target_voxels == 0 else ""
        print(f"{e.name:>10}  {shares}  ({e.target_voxels} target voxels){empty}")
        if e.target_voxels == 0:
            print(f"ciml-core explain: warning: case {case.case_id}, pair {e.name}: the model "
                  f"predicts no {e.region} voxel, so there is nothing to explain; its weights "
                  f"({', '.join(f'{w:.2f}' for w in e.weights.values())}) are the equal-share "
                  "default, not a measurement", file=sys.stderr)
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
    from ciml_core.io import check_output_dir, refuse_existing

    out = check_output_dir(args.out)
    refuse_existing(shapes_output_paths(out), args.overwrite)
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


def _cmd_review_summary(args: argparse.Namespace) -> int:
    from ciml_core.review.summary import write_summary

    written = write_summary(args.sessions, args.out, overwrite=args.overwrite)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _cmd_review_export(args: argparse.Namespace) -> int:
    from ciml_core.review.export import review_export

    result = review_export(args.session, args.out, link=args.link)
    print(f"exported {len(result.cases)} accepted/corrected case(s) as a {result.layout} dataset "
          f"({result.label_convention} labels, images: {result.link}): {result.dataset}")
    return 0


def _add_training_additions(p: argparse.ArgumentParser) -> None:
    """The training additions against the ET collapse (docs/method.md)."""
    from ciml_core.model.loss import REGION_WEIGHTINGS

    g = p.add_argument_group("training additions (docs/method.md)")
    g.add_argument("--region-weighting", choices=REGION_WEIGHTINGS,
                   help="loss weights: each region weighs 1 ('region') or each head ('head')")
    g.add_argument("--message-dropout", type=overlap_fraction,
                   help="probability of zeroing a sample's messages per segmentor in training")
    g.add_argument("--warmup-epochs", type=nonnegative_int, help="linear learning-rate warm-up epochs")
    g.add_argument("--beta-ramp-epochs", type=nonnegative_int, help="epochs over which beta grows from 0")
    g.add_argument("--et-oversampling", type=positive_float, metavar="W",
                   help="weight of ET against 1 for every other region among the foreground "
                   "patch centres (1 = uniform)")
    g.add_argument("--region-sampling", type=nonnegative_float, nargs="+", metavar="W",
                   help="explicit weight per region (model order, e.g. WT TC ET) of the "
                   "foreground patch centres; overrides --et-oversampling")
    g.add_argument("--bn-recalibration", type=nonnegative_int, metavar="BATCHES",
                   help="recompute batch-norm statistics with z = mu on this many batches before "
                   "validating and saving (0 = off)")


def _defaults_from_train_config(p: argparse.ArgumentParser) -> None:
    """Take the train options' defaults from ``TrainConfig`` (one source of truth): the parser's
    default becomes None, meaning "not given", which is what ``--resume`` needs to tell a
    setting the user asked for from one left alone; the help text shows TrainConfig's value."""
    from ciml_core.train import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for action in p._actions:
        if action.dest in fields and action.dest not in ("out", "data", "resume") and \
                action.nargs != 0:  # store_true flags stay False
            default = fields[action.dest]
            action.default = None
            if default is not None and "default" not in (action.help or ""):
                action.help = f"{action.help} (default {default})" if action.help \
                    else f"default {default}"


def _train_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the command line gave (None and unset flags left out)."""
    from ciml_core.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"out", "data", "resume",
                                                                  "decomposition", "augment",
                                                                  "fused"}
    given = {k: getattr(args, k) for k in names
             if getattr(args, k, None) is not None and getattr(args, k) is not False}
    if args.data:
        given["data"] = Path(args.data)
    if args.decomposition:
        given["decomposition"] = _read_decomposition(args.decomposition)
    if args.no_augment:
        given["augment"] = False
    if args.unfused:
        given["fused"] = False
    return given


# -- the parser, built from the library's definitions ----------------------------------------------
# Choices come from the registries (layouts, label conventions, variants, norms, phantom kinds,
# explain modes) and defaults from the dataclasses (TrainConfig, InferenceSettings, ShapesConfig),
# so that the command line cannot drift from the library.


def _parent(build) -> argparse.ArgumentParser:
    """An ``add_help=False`` parser holding the options ``build(parser)`` adds, for ``parents=``."""
    parent = _Parser(add_help=False)
    build(parent)
    return parent


def _inference_settings(args: argparse.Namespace, **changes):
    """The :class:`~ciml_core.infer.InferenceSettings` that the options of
    :func:`_inference_options` (or only ``--device``) gave."""
    from ciml_core.infer import InferenceSettings

    given = {"device": args.device, "native_spacing": getattr(args, "native_spacing", False)}
    if hasattr(args, "overlap"):
        given.update(overlap=args.overlap, mirror=args.tta, bf16=True if args.bf16 else None,
                     postprocess=not args.no_postprocess)
    return InferenceSettings(**{**given, **changes})


def _device_option(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default,
                   help=f"auto (CUDA when there is one), cpu or cuda (default {default})")


def _inference_options(p: argparse.ArgumentParser) -> None:
    """How windows run: InferenceSettings' fields and defaults."""
    from ciml_core.infer import InferenceSettings

    defaults = {f.name: f.default for f in dataclasses.fields(InferenceSettings)}
    p.add_argument("--tta", action="store_true", help="8-way mirroring test-time augmentation")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast on the CPU too (always on CUDA): faster on CPUs with "
                        "AVX512-BF16/AMX, probabilities differ by ~1e-2 (docs/performance.md)")
    p.add_argument("--overlap", type=overlap_fraction, default=defaults["overlap"],
                   help=f"sliding-window overlap (default {defaults['overlap']})")
    p.add_argument("--no-postprocess", action="store_true",
                   help="keep enhancing-tumour components that have no predicted tumour around "
                   "them (default: removed, they are vessels or dura: docs/method.md)")
    _native_spacing_option(p)
    _device_option(p, defaults["device"])


def _native_spacing_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--native-spacing", action="store_true",
                   help="run each case at its own voxel spacing (default: a case whose spacing "
                   "differs from the model's recorded target spacing is resampled to it and the "
                   "outputs back to the case's grid; models without one always run natively)")


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo' (the bundled model) or a checkpoint "
                   "folder")


def _out_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created if missing)")


def _overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _layout_choices() -> list[str]:
    from ciml_core.data.layouts import LAYOUTS

    return ["auto", *LAYOUTS]


def _label_choices() -> list[str]:
    from ciml_core.data.labels import LABEL_CONVENTIONS

    return list(LABEL_CONVENTIONS)


def _add_phantom(sub, parents: dict) -> None:
    from ciml_core.data.phantoms import BRAIN_VARIETIES, KINDS

    p = sub.add_parser(
        "phantom", parents=[parents["out"], parents["overwrite"]],
        help="write synthetic multimodal cases (BraTS-like glioma, glioma in real anatomy, "
        "ShapeComposition, PET/CT)",
        description="Write synthetic NIfTI cases with real affines. brats: BraTS 2020 layout "
        "(flair, t1, t1ce, t2, seg; labels 0/1/2/4), procedural head; brain: the same layout, "
        "a glioma grown in the deformed SRI24 atlas (needs the atlas on disk: docs/phantoms.md); "
        "shapes: ShapeComposition pairs "
        "(primary triangle, auxiliary ellipse, union target); petct: autoPET layout "
        "(CTres, SUV, SEG).",
    )
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--cases", type=positive_int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="random seed; case i uses seed+i")
    p.add_argument(
        "--shape", type=_phantom_side, nargs=3, metavar=("X", "Y", "Z"),
        help="volume shape in voxels (brats default 96 96 64 at 2 mm, brain default 240 240 155 "
        "at 1 mm, the BraTS grid; 120 120 78 gives 2 mm)",
    )
    p.add_argument("--variety", choices=BRAIN_VARIETIES,
                   help="brain only: standard (default) or wide (more tumour texture and blur, "
                   "for training)")
    p.set_defaults(func=_cmd_phantom)


def _add_train(sub, parents: dict) -> None:
    from ciml_core.model.blocks import NORMS
    from ciml_core.model.config import TRAINABLE_VARIANTS

    p = sub.add_parser(
        "train", help="train a CIML model (or an ablation / DynUNet) on a dataset folder",
        description="Train on DATA (any supported layout) or, without DATA, on freshly generated "
        "phantoms. Works on CPU, one GPU, or many through "
        "`torchrun --nproc_per_node N -m ciml_core.cli train ...`.",
    )
    p.add_argument("data", nargs="?", help="dataset root, case folder or manifest (omit for --demo)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, splits)")
    p.add_argument("--demo", action="store_true", help="train on generated BraTS-like phantoms")
    p.add_argument("--demo-cases", type=positive_int, help="phantom cases for --demo")
    p.add_argument("--layout", choices=_layout_choices())
    p.add_argument("--labels", choices=_label_choices(),
                   help="label convention (default: the layout's)")
    p.add_argument("--fold", type=_fold, help="cross-validation fold 0-4, -1 = all data")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--iters-per-epoch", type=positive_int)
    p.add_argument("--patch", type=patch_size, help="cubic patch size")
    p.add_argument("--batch", type=positive_int)
    p.add_argument("--width", type=positive_int, help="base number of filters C")
    p.add_argument("--variant", choices=TRAINABLE_VARIANTS)
    p.add_argument("--beta", type=nonnegative_float, help="KL weight")
    p.add_argument("--decomposition", metavar="JSON",
                   help="task decomposition file {modalities, regions, tasks: [{primary, regions}]} "
                   "(default: the paper's for the dataset's modalities; docs/training.md)")
    p.add_argument("--norm", choices=NORMS)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--device", help="auto (CUDA when there is one), cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights ('demo' or a folder; "
                   "same decomposition, width, variant and norm required), e.g. on a dataset "
                   "written by `ciml-core review-export`")
    p.add_argument("--seed", type=nonnegative_int)
    p.add_argument("--val-every", type=positive_int, help="validate every N epochs")
    p.add_argument("--workers", type=nonnegative_int, help="DataLoader worker processes")
    p.add_argument("--preprocess-workers", type=positive_int,
                   help="processes that build the preprocessed cache (default 1)")
    p.add_argument("--spacing", type=positive_float, nargs=3, metavar=("X", "Y", "Z"),
                   help="target voxel size in mm (canonical RAS+ axes) every case is resampled "
                   "to and the model records (default: the median of the training cases)")
    p.add_argument("--no-augment", action="store_true", help="turn the augmentations off")
    p.add_argument("--augment-on-device", action="store_true",
                   help="run the augmentations on whole batches on the training device (a GPU) "
                   "instead of in the loader workers (for when the CPUs cannot keep up)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--unfused", action="store_true",
                   help="train the segmentors one after the other instead of as grouped layers "
                   "(same gradients; on a 2-core CPU x1.4 the fp32 step time: "
                   "docs/performance.md)")
    _add_training_additions(p)
    _defaults_from_train_config(p)
    p.set_defaults(func=_cmd_train)


def _add_predict(sub, parents: dict) -> None:
    p = sub.add_parser(
        "predict", parents=[parents["out"], parents["model"], parents["inference"],
                            parents["overwrite"]],
        help="segment cases with a trained model (default: the bundled demo model)",
        description="INPUT is a case folder, a dataset root (every case), a manifest, or the "
        "image files of one case (MOD=PATH pairs, or paths whose names end in the modality, "
        "e.g. *_flair.nii.gz or *-t2f.nii.gz, in any order). "
        "Writes <case>.nii.gz (uint8 labels in the dataset's convention, or --labels) with the "
        "input's affine and header.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--labels", choices=_label_choices(),
                   help="label convention of the written labels (default: the dataset layout's "
                   "when it has the model's regions, e.g. BraTS 2023 ET = 3, else the model's)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <case>_prob_<region>.nii.gz")
    p.add_argument("--case-id", help="case name when INPUT is a list of files (default: the "
                   "common prefix of their names); a plain file name")
    p.add_argument("--allow-input-dir", action="store_true",
                   help="allow --out to be inside an input folder")
    p.add_argument("--no-prefetch", action="store_true",
                   help="read, predict and write one case after the other (default: the next "
                   "case is read and the last one written while a case computes)")
    p.set_defaults(func=_cmd_predict)


def _add_evaluate(sub, parents: dict) -> None:
    p = sub.add_parser(
        "evaluate", parents=[parents["overwrite"]],
        help="Dice and HD95 per region and case against reference labels",
        description="Compare <case>.nii.gz predictions with reference labels (a dataset folder "
        "or a flat folder of <case>.nii.gz). BraTS rules for empty masks.",
    )
    p.add_argument("pred_dir")
    p.add_argument("ref_dir")
    p.add_argument("--labels", default="brats2020", choices=_label_choices())
    p.add_argument("--out", help="report CSV path (a JSON is written beside it)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score a reference case without prediction as an empty prediction")
    p.set_defaults(func=_cmd_evaluate)


def _add_explain(sub, parents: dict) -> None:
    from ciml_core.explain import DEFAULT_METHOD, EXTENTS, METHODS, MODES, TARGET_MARGIN_MM

    p = sub.add_parser(
        "explain", parents=[parents["out"], parents["model"], parents["device"],
                            parents["overwrite"]],
        help="Grad-CAM heatmaps and complementary-information weights of a case",
        description="Per (primary modality : region) pair, Grad-CAM heatmaps of each auxiliary "
        "modality's complementary representation (paper 4.6, Eq. 14-15) and their weights "
        "(Eq. 16-17). CASE is one case folder. Writes <case>_heatmap_<PAIR>_from_<AUX>.nii.gz "
        "(the input's affine and header), weights.csv, weights.json, <case>_gradcam.png (paper "
        "Fig. 16) and <case>_weights.png (Fig. 18). See docs/interpretability.md.",
    )
    p.add_argument("case", metavar="CASE", help="a case folder of any supported layout")
    _native_spacing_option(p)
    p.add_argument("--pairs", default="all",
                   help="'all' (default) or a comma-separated list such as FLAIR:WT,T1CE:ET")
    p.add_argument("--mode", default=MODES[0], choices=MODES,
                   help="roi: one patch-sized window centred on the predicted tumour (default, "
                   "fast); sliding: every sliding window, Gaussian-stitched")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help="hirescam: the gradient at each voxel times the activation there, heat "
                   "where the target's gradient reaches; gradcam: the paper's mean-gradient "
                   f"alpha (default {DEFAULT_METHOD}; docs/interpretability.md)")
    p.add_argument("--extent", default=EXTENTS[0], choices=EXTENTS,
                   help="target: heatmaps and weights count only heat within --margin of the "
                   "pair's predicted region (default); window: every voxel, as the paper")
    p.add_argument("--margin", type=nonnegative_float, default=TARGET_MARGIN_MM, metavar="MM",
                   help="dilation of the target for --extent target and the inside fraction "
                   f"(default {TARGET_MARGIN_MM:g} mm)")
    p.set_defaults(func=_cmd_explain)


def _add_shapes(sub, parents: dict) -> None:
    from ciml_core.shapes_experiment import ShapesConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ShapesConfig)}
    p = sub.add_parser(
        "shapes", parents=[parents["out"], parents["overwrite"]],
        help="the ShapeComposition experiment (paper 4.3): redundancy filtering",
        description="Train the two-encoder ShapeComposition network on generated triangle / "
        "ellipse pairs, then write shapes_fig13.png (paper Fig. 13) and shapes_result.json with "
        "the redundancy-filtering ratio (mean |complementary map| on auxiliary-only pixels / on "
        "the overlap, held-out pairs) and the Dice. --beta 0 trains without the KL term.",
    )
    p.add_argument("--steps", type=positive_int, default=defaults["steps"],
                   help=f"optimiser steps (default {defaults['steps']})")
    p.add_argument("--beta", type=nonnegative_float, default=defaults["beta"],
                   help=f"KL weight; 0 = without KL (default {defaults['beta']})")
    p.add_argument("--seed", type=nonnegative_int, default=defaults["seed"])
    p.add_argument("--size", type=patch_size, default=defaults["size"],
                   help=f"image size (default {defaults['size']})")
    p.add_argument("--width", type=positive_int, default=defaults["width"],
                   help=f"base number of filters C (default {defaults['width']})")
    p.add_argument("--train-pairs", type=positive_int, default=defaults["train_pairs"],
                   help=f"generated training pairs (default {defaults['train_pairs']}, as the "
                   "paper)")
    p.add_argument("--eval-pairs", type=positive_int, default=defaults["eval_pairs"],
                   help=f"held-out pairs (default {defaults['eval_pairs']})")
    _device_option(p, defaults["device"])
    p.set_defaults(func=_cmd_shapes)


def _add_review_summary(sub, parents: dict) -> None:
    p = sub.add_parser(
        "review-summary", parents=[parents["overwrite"]],
        help="summary of review sessions: decisions, Dice model vs final mask, "
        "time per case, inter-reader Dice",
        description="Write review_summary.csv (one row per session and case), review_summary.md "
        "and review_summary.png (decisions per category, per-region Dice between the model "
        "output and the final mask, changed voxels, time per case, reviewers) and, for two or "
        "more sessions over the same cases, inter_reader.csv (per-region Dice between the "
        "reviewers' final masks). See docs/plugin.md, 'Review session'.",
    )
    p.add_argument("sessions", nargs="+", metavar="SESSION_DIR", help="review session folder(s)")
    p.add_argument("--out", help="output folder (default: the first session folder)")
    p.set_defaults(func=_cmd_review_summary)


def _add_review_export(sub, parents: dict) -> None:
    from ciml_core.review.export import LINK_MODES

    p = sub.add_parser(
        "review-export", help="a review session's accepted and corrected cases as a dataset",
        description="Write the cases whose latest decision is accepted or corrected as a "
        "dataset in the input's layout (images copied or linked, the final masks as labels) "
        "that `ciml-core train` reads, e.g. to fine-tune with --init CHECKPOINT.",
    )
    p.add_argument("session", metavar="SESSION_DIR", help="review session folder")
    p.add_argument("--out", required=True, help="new dataset folder (must not exist, or be empty)")
    p.add_argument("--link", default=LINK_MODES[0], choices=LINK_MODES,
                   help="how the images get there (default copy; hardlink falls back to copy "
                   "across file systems)")
    p.set_defaults(func=_cmd_review_export)


def _add_info(sub, parents: dict) -> None:
    p = sub.add_parser("info", help="show a checkpoint's configuration, training and metrics")
    p.add_argument("model", nargs="?", default="demo", help="'demo' (default) or a checkpoint")
    p.add_argument("--json", action="store_true", help="print config.json as is")
    p.set_defaults(func=_cmd_info)


COMMANDS = (_add_phantom, _add_train, _add_predict, _add_evaluate, _add_explain, _add_shapes,
            _add_review_summary, _add_review_export, _add_info)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ciml-core",
        description="Train, evaluate and run CIML multimodal segmentation models.",
    )
    parser.add_argument("--version", action="version", version=f"ciml-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parents = {"out": _parent(_out_option), "overwrite": _parent(_overwrite_option),
               "model": _parent(_model_option), "device": _parent(_device_option),
               "inference": _parent(_inference_options)}
    for add in COMMANDS:
        add(sub, parents)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _OptionError as err:
        print(f"{err.prog}: error: {_one_line(str(err))} (see {err.prog} --help)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (CimlError, FileExistsError) as err:
        print(f"ciml-core {args.command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ciml-core {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
