"""Speed and memory of CIML against an early-fusion DynUNet at matched FLOPs, measured in one run.

    python benchmarks/speed.py [--device cpu|cuda] [--patch 64] [--widths 8 16] [--quick]

For each network: training-step time (forward + backward + Adam step, batch 2), whole-case
inference of a 240x240x155 4-modality phantom (sliding window, overlap 0.5, with and without
8-way mirroring), peak memory (RSS on CPU, torch.cuda.max_memory_allocated on GPU) and achieved
GFLOP/s from torch.utils.flop_counter, also as a fraction of the machine's peak. Each measurement
runs in a fresh child process so that peak memory is its own. Prints a Markdown table and writes
benchmarks/results/speed_<device>.json.

Peak FLOP/s: on CPU, cores x max clock x FLOPs/cycle/core, where FLOPs/cycle is 64 with AVX-512
(two 16-lane fp32 FMA pipes, e.g. AMD Zen 4/5, Intel server cores), 32 with AVX2+FMA, 8 otherwise;
on CUDA, a table of the dense bf16 tensor-core peak of common cards. Both are nominal peaks.
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
from torch.utils.flop_counter import FlopCounterMode

from ciml_core.checkpoint import CheckpointInfo, LoadedModel
from ciml_core.data.dataset import LoadedCase
from ciml_core.data.nifti import NiftiSource
from ciml_core.data.phantoms import make_brats_phantom
from ciml_core.infer import predict_case
from ciml_core.model import CIMLLoss, ModelConfig, build_model

GPU_PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
BRATS = ("flair", "t1", "t1ce", "t2")


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


def config_for(variant: str, width: int, patch: int) -> ModelConfig:
    return ModelConfig(width=width, variant=variant, patch_size=(patch,) * 3,
                       norm="instance" if variant == "dynunet" else "batch")


def flops_per_window(config: ModelConfig, batch: int = 1) -> int:
    model = build_model(config).eval()
    x = torch.zeros(batch, len(config.decomposition.modalities), *config.patch_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def matched_dynunet_width(target_flops: int, patch: int) -> int:
    """The DynUNet base width whose forward FLOPs per window are closest to ``target_flops``."""
    best = min(range(1, 33), key=lambda c: abs(flops_per_window(config_for("dynunet", c, 32))
                                               * (patch / 32) ** 3 - target_flops))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_train_step(config: ModelConfig, device: torch.device, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    loss_fn = CIMLLoss(config.decomposition)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(2, 4, *config.patch_size, device=device)
    y = (torch.rand(2, 3, *config.patch_size, device=device) > 0.8).float()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x)
        loss, _ = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, cuDNN autotuning)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    return {"seconds": seconds, "gflop": flops / 1e9, "gflops_per_s": flops / 1e9 / seconds,
            "peak_mib": _peak_memory_mib(device)}


def measure_inference(config: ModelConfig, device: torch.device, mirror: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(config).eval()
    loaded = LoadedModel(model, config, CheckpointInfo(label_convention="brats2020"), Path("."), "")
    phantom = make_brats_phantom(6000, shape=(240, 240, 155))
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
    predict_case(loaded, case, overlap=0.5, mirror=mirror, device=device, progress=progress)
    _sync(device)
    seconds = time.perf_counter() - t0
    flops = flops_per_window(config) * windows * (8 if mirror else 1)
    return {"seconds": seconds, "windows": windows, "gflop": flops / 1e9,
            "gflops_per_s": flops / 1e9 / seconds, "peak_mib": _peak_memory_mib(device)}


def _child(queue, kind, config_dict, device, arg) -> None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    config = ModelConfig.from_dict(config_dict)
    dev = torch.device(device)
    if kind == "train":
        queue.put(measure_train_step(config, dev, arg))
    else:
        with torch.inference_mode():
            queue.put(measure_inference(config, dev, arg))


def run_isolated(kind: str, config: ModelConfig, device: str, arg) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kind, config.to_dict(), device, arg))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--quick", action="store_true", help="skip the mirrored (TTA) inference")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    peak, peak_how = gpu_peak_gflops() if args.device == "cuda" else cpu_peak_gflops()
    rows = []
    for width in args.widths:
        ciml = config_for("full", width, args.patch)
        ciml_flops = flops_per_window(ciml)
        dyn_width = matched_dynunet_width(ciml_flops, args.patch)
        dyn = config_for("dynunet", dyn_width, args.patch)
        for name, config in ((f"CIML C={width}", ciml), (f"DynUNet C={dyn_width}", dyn)):
            row = {"network": name, "variant": config.variant, "width": config.width,
                   "gflop_per_window": flops_per_window(config) / 1e9,
                   "train_step": run_isolated("train", config, args.device, args.steps),
                   "inference": run_isolated("infer", config, args.device, False)}
            if not args.quick:
                row["inference_tta"] = run_isolated("infer", config, args.device, True)
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {"device": args.device, "patch": args.patch, "batch": 2, "overlap": 0.5,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "peak_gflops": peak, "peak_how": peak_how, "rows": rows}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\npeak: {peak:.0f} GFLOP/s ({peak_how})")
    print("| network | GFLOP/window | train step (s) | GFLOP/s (% peak) | whole case (s) "
          "| whole case TTA (s) | peak memory (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t, i = r["train_step"], r["inference"]
        tta = f"{r['inference_tta']['seconds']:.1f}" if "inference_tta" in r else "-"
        print(f"| {r['network']} | {r['gflop_per_window']:.1f} | {t['seconds']:.2f} | "
              f"{i['gflops_per_s']:.0f} ({100 * i['gflops_per_s'] / peak:.0f}%) | "
              f"{i['seconds']:.1f} | {tta} | {max(t['peak_mib'], i['peak_mib']):.0f} |")
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        print(f"{a['network']} / {b['network']}: train step x"
              f"{a['train_step']['seconds'] / b['train_step']['seconds']:.2f}, whole case x"
              f"{a['inference']['seconds'] / b['inference']['seconds']:.2f}")


if __name__ == "__main__":
    main()
