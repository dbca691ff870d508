"""Speed and memory of CIML against an early-fusion DynUNet at matched FLOPs, measured in one run.

    python benchmarks/speed.py [--device cpu|cuda] [--patch 64] [--widths 8 16] [--quick]
    python benchmarks/speed.py --train-only [--widths 8 16] [--train-compile]

Four parts, all in this one run (``--train-only``: part 3 alone, a few minutes):

1. ``layers``: one convolution of the T = 4 segmentors at each resolution level, run as T convs
   and as one grouped conv (``groups=T``) - why ``GroupedCIMLNetwork`` fuses from P/2 down only.
2. ``window``: one forward of a P^3 window (batch 1, as the sliding window runs it) for CIML
   unfused, CIML fused and the FLOP-matched DynUNet, each plain (fp32, inference_mode) and with
   one speed option: ``no_grad`` instead of inference_mode, bf16 autocast, channels_last_3d,
   torch.compile. Median of ``--repeats``. On CUDA every column runs in bf16 (as predict does).
3. ``train``: one training step (forward + backward + Adam, batch 2) of DynUNet, CIML unfused
   and CIML fused (``ciml_core.model.fused.training_network``, what training runs), each fp32,
   fp32 with channels_last_3d weights and input, and bf16 autocast (``--train-compile`` adds
   torch.compile). The main table's train columns are the fused row's fused step and the
   unfused row's unfused step; the training table has every option.
4. ``case``: whole-case inference of a 240x240x155 4-modality phantom (sliding window, overlap
   0.5, batch 1, with and without 8-way mirroring) as ``predict_case`` runs it, with peak memory
   (RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU) and achieved GFLOP/s.

Every measurement runs in a fresh child process (peak memory is its own). FLOPs come from
torch.utils.flop_counter. Peak FLOP/s: on CPU, cores x max clock x FLOPs/cycle/core, where
FLOPs/cycle is 64 with AVX-512 (two 16-lane fp32 FMA pipes, e.g. AMD Zen 4/5), 32 with
AVX2+FMA, 8 otherwise; on CUDA the card's dense bf16 tensor-core peak. Both are nominal peaks.
Prints Markdown tables; writes benchmarks/results/speed_<device>.json (``--train-only``:
speed_<device>_train.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ciml_core.checkpoint import CheckpointInfo, LoadedModel
from ciml_core.data.dataset import LoadedCase
from ciml_core.data.nifti import NiftiSource
from ciml_core.data.phantoms import make_brats_phantom
from ciml_core.infer import InferenceSettings, inference_network, predict_case
from ciml_core.model import (
    CIMLLoss,
    ModelConfig,
    build_model,
    flop_matched_width,
    window_flops,
)
from ciml_core.model.fused import training_network

GPU_PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
BRATS = ("flair", "t1", "t1ce", "t2")
WINDOW_OPTIONS = ("plain", "no_grad", "bf16", "channels_last", "compile")
#: How a training step can run: fp32, fp32 with channels_last_3d, bf16 autocast, torch.compile.
TRAIN_OPTIONS = ("fp32", "channels_last", "bf16", "compile")


# ------------------------------------------------------------------------------------ machine
def cpu_peak_gflops() -> tuple[float, str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    per_cycle = 64 if "avx512f" in flags else 32 if ("avx2" in flags and " fma" in flags) else 8
    mhz = [float(line.split(":")[1]) for line in flags.splitlines() if line.startswith("cpu MHz")]
    ghz = (max(mhz) if mhz else 2000.0) / 1000
    cores = len(os.sched_getaffinity(0))
    return cores * ghz * per_cycle, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle"


def gpu_peak_gflops() -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    for key, tflops in GPU_PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1000, f"{name}: dense bf16 tensor-core peak {tflops} TFLOP/s"
    return float("nan"), f"{name}: peak unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM starts afresh with the child's exec; ru_maxrss would carry the parent's peak over.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocations, oneDNN primitives, cuDNN autotuning
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ------------------------------------------------------------------------------------ networks
def config_for(variant: str, width: int, patch: int) -> ModelConfig:
    return ModelConfig(width=width, variant=variant, patch_size=(patch,) * 3,
                       norm="instance" if variant == "dynunet" else "batch")


# ------------------------------------------------------------------------------------ measurements
def measure_layers(patch: int, width: int, device: torch.device, repeats: int) -> list[dict]:
    """T=4 convs k3 (and ConvTranspose k2 s2) per level: separately vs one grouped conv."""
    groups, rows = 4, []
    for level in range(4):
        size, channels = patch // 2**level, width * 2**level  # encoder stage level + 1
        xs = [torch.randn(1, channels, *(size,) * 3, device=device) for _ in range(groups)]
        ws = [torch.randn(channels, channels, 3, 3, 3, device=device) for _ in range(groups)]
        x, w = torch.cat(xs, 1), torch.cat(ws, 0)
        up_w = [torch.randn(channels, channels, 2, 2, 2, device=device) for _ in range(groups)]
        small = [a[:, :, ::2, ::2, ::2].contiguous() for a in xs]
        small_x, up_cat = torch.cat(small, 1), torch.cat(up_w, 0)

        def separate(xs=xs, ws=ws):
            return [F.conv3d(a, b, padding=1) for a, b in zip(xs, ws, strict=True)]

        def grouped(x=x, w=w):
            return F.conv3d(x, w, padding=1, groups=groups)

        def up_separate(small=small, up_w=up_w):
            return [F.conv_transpose3d(a, b, stride=2) for a, b in zip(small, up_w, strict=True)]

        def up_grouped(small_x=small_x, up_cat=up_cat):
            return F.conv_transpose3d(small_x, up_cat, stride=2, groups=groups)

        with torch.inference_mode():
            row = {"level": level, "size": size, "channels": channels,
                   "conv_separate": _median_seconds(separate, device, repeats),
                   "conv_grouped": _median_seconds(grouped, device, repeats)}
            if level > 0:
                row["up_separate"] = _median_seconds(up_separate, device, repeats)
                row["up_grouped"] = _median_seconds(up_grouped, device, repeats)
        rows.append(row)
    return rows


def measure_window(config: ModelConfig, fused: bool, option: str, device: torch.device,
                   repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(config).to(device)
    net = inference_network(model, fused=fused)
    x = torch.randn(1, 4, *config.patch_size, device=device)
    if option == "channels_last":
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    compile_seconds = None
    if option == "compile":
        t0 = time.perf_counter()
        net = torch.compile(net)
        with torch.inference_mode():
            net(x)
        compile_seconds = time.perf_counter() - t0
    context = torch.no_grad if option == "no_grad" else torch.inference_mode
    bf16 = option == "bf16" or device.type == "cuda"  # CUDA windows always run in bf16

    def forward() -> None:
        with context(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            net(x)

    seconds = _median_seconds(forward, device, repeats)
    return {"seconds": seconds, "compile_seconds": compile_seconds}


def measure_train_step(config: ModelConfig, device: torch.device, steps: int, option: str,
                       fused: bool = False) -> dict:
    """One optimiser step, batch 2: median of ``steps`` after two untimed ones (warm-up, FLOP
    count). ``fused``: a CIML network runs as ``training_network(model)`` (FusedTrainingCIML);
    ``option``: one of :data:`TRAIN_OPTIONS`."""
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    x = torch.randn(2, 4, *config.patch_size, device=device)
    y = (torch.rand(2, 3, *config.patch_size, device=device) > 0.8).float()
    if option == "channels_last":
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    net = training_network(model, fused=fused)
    loss_fn = CIMLLoss(config.decomposition)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    compile_seconds = None
    if option == "compile":
        net = torch.compile(net)
    bf16 = option == "bf16"

    def step(network: torch.nn.Module = net) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = network(x)
        loss, _ = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    _sync(device)
    if option == "compile":
        compile_seconds = time.perf_counter() - t0
    # FLOPs of the unfused network, which does the same arithmetic: torch's flop counter counts
    # a grouped conv's weight gradient as if it were dense (x groups).
    with FlopCounterMode(display=False) as counter:
        step(model)
    flops = counter.get_total_flops()
    seconds = _median_seconds(step, device, steps)
    return {"seconds": seconds, "gflop": flops / 1e9, "gflops_per_s": flops / 1e9 / seconds,
            "peak_mib": _peak_memory_mib(device), "compile_seconds": compile_seconds}


def measure_training(width: int, patch: int, device: str, steps: int, options: list[str]
                     ) -> tuple[list[dict], list[str]]:
    """The training table's rows for CIML C=``width`` (fused, unfused) and its FLOP-matched
    DynUNet, every option in ``options``, each in a fresh process; and the ratios."""
    ciml = config_for("full", width, patch)
    dyn_width = flop_matched_width(ciml, "dynunet", norm="instance")
    networks = [(f"DynUNet C={dyn_width}", config_for("dynunet", dyn_width, patch), False),
                (f"CIML C={width} unfused", ciml, False), (f"CIML C={width} fused", ciml, True)]
    rows = []
    for name, config, fused in networks:
        row = {"network": name, "variant": config.variant, "width": config.width,
               "fused": fused, "train": {}}
        for option in options:
            row["train"][option] = isolated("train", config, device, steps=steps,
                                            option=option, fused=fused)
        rows.append(row)
        print(json.dumps(row), flush=True)
    dyn, unfused, fused_row = (r["train"] for r in rows)

    def ratio(a: dict, b: dict, option_a: str, option_b: str | None = None) -> str:
        option_b = option_b or option_a
        if option_a not in a or option_b not in b:
            return "-"
        return f"x{a[option_a]['seconds'] / b[option_b]['seconds']:.2f}"

    ciml_name, dyn_name = f"CIML C={width}", f"DynUNet C={dyn_width}"
    ratios = [
        f"training step {ciml_name} fused / {dyn_name} (matched FLOPs): fp32 "
        f"{ratio(fused_row, dyn, 'fp32')}, both channels_last {ratio(fused_row, dyn, 'channels_last')}"
        f", both bf16 {ratio(fused_row, dyn, 'bf16')}"
        + (f", both compiled {ratio(fused_row, dyn, 'compile')}" if "compile" in options else ""),
        f"training step {ciml_name} unfused / {dyn_name}: fp32 {ratio(unfused, dyn, 'fp32')}, "
        f"both channels_last {ratio(unfused, dyn, 'channels_last')}",
        f"training step {ciml_name} fused / unfused: fp32 {ratio(fused_row, unfused, 'fp32')}, "
        f"channels_last {ratio(fused_row, unfused, 'channels_last')}, "
        f"bf16 {ratio(fused_row, unfused, 'bf16')}",
    ]
    return rows, ratios


def measure_case(config: ModelConfig, device: torch.device, mirror: bool, fused: bool,
                 shape: tuple[int, int, int]) -> dict:
    torch.manual_seed(0)
    model = build_model(config).eval()
    loaded = LoadedModel(model, config, CheckpointInfo(label_convention="brats2020"), Path("."), "")
    phantom = make_brats_phantom(6000, shape=shape)
    image = np.stack([phantom.images[m] for m in BRATS])
    header = nib.Nifti1Image(image[0], phantom.affine).header
    source = NiftiSource(Path("phantom"), phantom.affine, header, image.shape[1:],
                         nib.orientations.io_orientation(phantom.affine))
    case = LoadedCase("phantom", BRATS, image, None, source)
    windows = 0

    def progress(done: int, total: int) -> None:
        nonlocal windows
        windows = total

    t0 = time.perf_counter()
    predict_case(loaded, case, InferenceSettings(mirror=mirror, device=device, fused=fused),
                 progress=progress)
    _sync(device)
    seconds = time.perf_counter() - t0
    flops = window_flops(config) * windows * (8 if mirror else 1)
    return {"seconds": seconds, "windows": windows, "gflop": flops / 1e9,
            "gflops_per_s": flops / 1e9 / seconds, "peak_mib": _peak_memory_mib(device)}


def _child(queue, kind: str, config_dict: dict | None, device: str, kwargs: dict) -> None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dev = torch.device(device)
    config = ModelConfig.from_dict(config_dict) if config_dict else None
    measure = {"layers": measure_layers, "window": measure_window,
               "train": measure_train_step, "case": measure_case}[kind]
    queue.put(measure(device=dev, **kwargs) if config is None
              else measure(config, device=dev, **kwargs))


def isolated(kind: str, config: ModelConfig | None, device: str, **kwargs) -> dict:
    """Run one measurement in a fresh process and return its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kind, config.to_dict() if config else None,
                                            device, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ------------------------------------------------------------------------------------ report
def report(result: dict) -> str:
    peak = result["peak_gflops"]
    out = [f"{result['machine']}, torch {result['torch']}, {result['threads']} threads; "
           f"peak {peak:.0f} GFLOP/s ({result['peak_how']})", ""]
    if "layers" in result:
        out += _main_tables(result)
    if result.get("train_rows"):
        out += _train_table(result)
    for ratio in result["ratios"]:
        out.append(f"- {ratio}")
    return "\n".join(out)


def _train_table(result: dict) -> list[str]:
    peak = result["peak_gflops"]
    options = [o for o in TRAIN_OPTIONS if any(o in r["train"] for r in result["train_rows"])]
    out = [f"Training step (forward + backward + Adam, batch {result['train_batch']}, "
           f"{result['patch']}^3), s (GFLOP/s, % peak):", "",
           "| network | GFLOP/step | " + " | ".join(options) + " | peak memory fp32 (MiB) |",
           "| --- | --- |" + " --- |" * len(options) + " --- |"]
    for r in result["train_rows"]:
        t = r["train"]
        first = t[options[0]]
        cells = [f"{t[o]['seconds']:.2f} ({t[o]['gflops_per_s']:.0f}, "
                 f"{100 * t[o]['gflops_per_s'] / peak:.0f}%)" if o in t else "-" for o in options]
        memory = f"{t['fp32']['peak_mib']:.0f}" if "fp32" in t else "-"
        out.append(f"| {r['network']} | {first['gflop']:.1f} | " + " | ".join(cells)
                   + f" | {memory} |")
    out.append("")
    return out


def _main_tables(result: dict) -> list[str]:
    peak = result["peak_gflops"]
    out = []
    out += ["Layers (T=4 convs k3 / ConvTranspose k2 s2, batch 1), ms:", "",
            "| level | size | channels | conv: 4 separate | conv: grouped | up: 4 separate "
            "| up: grouped |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["layers"]:
        up = (f"{1e3 * r['up_separate']:.1f} | {1e3 * r['up_grouped']:.1f}"
              if "up_separate" in r else "- | -")
        out.append(f"| {r['level']} | {r['size']}^3 | {r['channels']} | "
                   f"{1e3 * r['conv_separate']:.1f} | {1e3 * r['conv_grouped']:.1f} | {up} |")
    out += ["", f"One {result['patch']}^3 window forward (batch 1), ms:", "",
            "| network | " + " | ".join(WINDOW_OPTIONS) + " |",
            "| --- |" + " --- |" * len(WINDOW_OPTIONS)]
    for name, options in result["window"].items():
        cells = [f"{1e3 * options[o]['seconds']:.0f}" if o in options else "-"
                 for o in WINDOW_OPTIONS]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    shape = "x".join(map(str, result["case_shape"]))
    out += ["", f"Training step (batch 2) and whole {shape} case (overlap 0.5):", "",
            "| network | GFLOP/window | train step fp32 (s) | train step bf16 (s) | train GFLOP/s "
            "(% peak) | case (s) | case TTA (s) | case GFLOP/s (% peak) | peak memory train / "
            "case (MiB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        t, c = r.get("train"), r["case"]
        tb = r.get("train_bf16")
        tta = r.get("case_tta")
        memory = (f"{t['peak_mib']:.0f} / " if t else "- / ") + f"{c['peak_mib']:.0f}"
        out.append(
            f"| {r['network']} | {r['gflop_per_window']:.1f} | "
            + (f"{t['seconds']:.2f} | " if t else "- | ")
            + (f"{tb['seconds']:.2f} | " if tb else "- | ")
            + (f"{t['gflops_per_s']:.0f} ({100 * t['gflops_per_s'] / peak:.0f}%) | " if t else "- | ")
            + f"{c['seconds']:.1f} | " + (f"{tta['seconds']:.1f} | " if tta else "- | ")
            + f"{c['gflops_per_s']:.0f} ({100 * c['gflops_per_s'] / peak:.0f}%) | {memory} |")
    out.append("")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed window forwards")
    parser.add_argument("--quick", action="store_true",
                        help="skip the mirrored (TTA) whole case, the unfused whole case and "
                             "torch.compile")
    parser.add_argument("--train-only", action="store_true",
                        help="only the training table (DynUNet, CIML unfused and fused), "
                             "written to speed_<device>_train.json")
    parser.add_argument("--train-compile", action="store_true",
                        help="add torch.compile training steps (minutes of compilation each)")
    parser.add_argument("--case-shape", type=int, nargs=3, default=[240, 240, 155])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--report", metavar="JSON", help="only print the tables of a saved run")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    dev = args.device
    train_options = [o for o in TRAIN_OPTIONS if o != "compile" or args.train_compile]

    peak, peak_how = gpu_peak_gflops() if dev == "cuda" else cpu_peak_gflops()
    result = {"device": dev, "patch": args.patch, "train_batch": 2, "overlap": 0.5,
              "case_shape": args.case_shape,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": len(os.sched_getaffinity(0)), "peak_gflops": peak, "peak_how": peak_how,
              "train_rows": [], "ratios": []}
    if dev == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.train_only:
        for width in args.widths:
            rows, ratios = measure_training(width, args.patch, dev, args.steps, train_options)
            result["train_rows"] += rows
            result["ratios"] += ratios
        (out / f"speed_{dev}_train.json").write_text(json.dumps(result, indent=2) + "\n")
        print()
        print(report(result))
        return

    result.update(layers=isolated("layers", None, dev, patch=args.patch, width=args.widths[0],
                                  repeats=args.repeats), window={}, rows=[])
    print(json.dumps(result["layers"]), flush=True)
    options = [o for o in WINDOW_OPTIONS if not (args.quick and o == "compile")]
    for width in args.widths:
        ciml = config_for("full", width, args.patch)
        dyn_width = flop_matched_width(ciml, "dynunet", norm="instance")
        dyn = config_for("dynunet", dyn_width, args.patch)
        first = width == args.widths[0]
        train_rows, train_ratios = measure_training(width, args.patch, dev, args.steps,
                                                    train_options)
        result["train_rows"] += train_rows
        trained = {r["network"]: r["train"] for r in train_rows}
        networks = [(f"CIML C={width} fused", ciml, True), (f"CIML C={width} unfused", ciml, False),
                    (f"DynUNet C={dyn_width}", dyn, False)]
        for name, config, fused in networks:
            if first:  # the per-window options table, for the first width
                result["window"][name] = {
                    o: isolated("window", config, dev, fused=fused, option=o,
                                repeats=args.repeats) for o in options}
                print(name, json.dumps(result["window"][name]), flush=True)
            if not fused and name.startswith("CIML") and (args.quick or not first):
                continue  # the unfused whole case once, for the first width
            row = {"network": name, "variant": config.variant, "width": config.width,
                   "fused": fused, "gflop_per_window": window_flops(config) / 1e9,
                   "case": isolated("case", config, dev, mirror=False, fused=fused,
                                     shape=args.case_shape)}
            # The fused row trains fused, the unfused row unfused (the training table).
            row["train"] = trained[name]["fp32"]
            if "bf16" in trained[name]:
                row["train_bf16"] = trained[name]["bf16"]
            if first and not args.quick and (fused or name.startswith("DynUNet")):
                row["case_tta"] = isolated("case", config, dev, mirror=True, fused=fused,
                                           shape=args.case_shape)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        by_name = {r["network"]: r for r in result["rows"]}
        a, b = by_name[f"CIML C={width} fused"], by_name[f"DynUNet C={dyn_width}"]
        result["ratios"].append(
            f"CIML C={width} / DynUNet C={dyn_width} (matched FLOPs): whole case "
            f"x{a['case']['seconds'] / b['case']['seconds']:.2f}"
            + (f", with TTA x{a['case_tta']['seconds'] / b['case_tta']['seconds']:.2f}"
               if "case_tta" in a and "case_tta" in b else ""))
        unfused = by_name.get(f"CIML C={width} unfused")
        if unfused:
            result["ratios"].append(
                f"CIML C={width} fused / unfused: whole case "
                f"x{a['case']['seconds'] / unfused['case']['seconds']:.2f}")
        result["ratios"] += train_ratios

    (out / f"speed_{dev}.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(report(result))


if __name__ == "__main__":
    main()
