"""Loader throughput: training patches per second that one DataLoader worker produces from the
memory-mapped cache of full-size (240x240x155) cases, with and without the nnU-Net augmentations,
at patch 128^3 and 64^3, against the GPU step time the loader has to keep up with.

    python benchmarks/loader.py [--cases 4] [--data runs/scale/data]

A worker is one process with one torch thread (torch's DataLoader sets that in its workers), so
the numbers are measured in this process with ``torch.set_num_threads(1)``: patches/s per worker;
n workers give about n times that while there are n free cores. Run it alone on the machine.

The GPU side comes from the FLOP count of one training step (forward x 3 for forward + backward,
counted by torch.utils.flop_counter on the meta device) at an assumed achieved throughput
(``--gpu-tflops``, default 250 TFLOP/s: about a quarter of an H100's dense bf16 peak, what 3-D
U-Nets reach with cuDNN). The workers needed = the GPU's patches/s / one worker's patches/s.
With ``--augment-on-device`` the workers only cut plain patches and the batched augmentations
(data/batch_augment.py) run on the training device: their patches/s are measured here on the CPU
(1 thread) and on CUDA when there is one.
Results: benchmarks/results/loader_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ciml_core.data.augment import nnunet_augmentations
from ciml_core.data.batch_augment import BatchAugment
from ciml_core.data.cache import PreprocessSettings, prepare_cases
from ciml_core.data.layouts import discover_cases
from ciml_core.data.patches import PatchDataset
from ciml_core.model import ModelConfig, build_model

MODALITIES = ("flair", "t1", "t1ce", "t2")
REGIONS = ("WT", "TC", "ET")


def step_gflop(patch: int, width: int, batch: int = 2) -> float:
    """FLOPs of one training step (forward + backward ~ 3 x forward) of CIML at ``patch``^3."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(ModelConfig(width=width, patch_size=(patch,) * 3))
        x = torch.randn(batch, 4, patch, patch, patch)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return 3 * counter.get_total_flops() / 1e9


def patches_per_second(cases, patch: int, augment: bool, count: int) -> float:
    ds = PatchDataset(cases, (patch,) * 3, length=count + 2, seed=1,
                      augment=nnunet_augmentations(3) if augment else None)
    ds[0], ds[1]  # first maps opened, MONAI's lazy imports done
    t0 = time.perf_counter()
    for i in range(2, count + 2):
        ds[i]
    return count / (time.perf_counter() - t0)


def device_patches_per_second(cases, patch: int, device: str, batches: int) -> float:
    """Patches/s of the batched augmentations (data/batch_augment.py, ``--augment-on-device``)
    on ``device``, batches of 2 plain loader patches, the loader's time not counted."""
    ds = PatchDataset(cases, (patch,) * 3, length=2 * (batches + 1), seed=1)
    pairs = []
    for i in range(batches + 1):
        (x0, y0), (x1, y1) = ds[2 * i], ds[2 * i + 1]  # each patch cut once
        pairs.append((torch.stack([x0, x1]).to(device), torch.stack([y0, y1]).to(device)))
    augment = BatchAugment(3)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    augment(*pairs[0], seed=0)  # warm-up
    sync()
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(pairs[1:]):
        augment(x, y, seed=i + 1)
    sync()
    return 2 * batches / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/scale/data"))
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=Path("runs/loader_cache"))
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--gpu-tflops", type=float, default=250.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loader_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = discover_cases(args.data)[: args.cases]
    prepared, _ = prepare_cases(cases, PreprocessSettings(MODALITIES, REGIONS, "brats2020"),
                                args.cache, workers=2)
    shape = list(prepared[0].load()[0].shape)
    rows = []
    for patch, count in ((128, 12), (64, 60)):
        gflop = step_gflop(patch, args.width)
        gpu_step = gflop / (args.gpu_tflops * 1e3)
        row = {"patch": patch, "step_gflop": round(gflop, 1),
               "assumed_gpu_step_s": round(gpu_step, 4),
               "gpu_patches_per_s": round(2 / gpu_step, 1)}
        for augment in (True, False):
            rate = patches_per_second(prepared, patch, augment, count)
            key = "augmented" if augment else "plain"
            row[f"{key}_patches_per_s_per_worker"] = round(rate, 2)
        row["workers_to_keep_up"] = round(row["gpu_patches_per_s"]
                                          / row["augmented_patches_per_s_per_worker"], 1)
        # --augment-on-device: the workers only cut plain patches; the batch augmentations run
        # where the model runs (here measured on this CPU with 1 thread, and on CUDA when there)
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            row[f"device_augment_patches_per_s_{device}"] = round(
                device_patches_per_second(prepared, patch, device, count // 2), 2)
        row["workers_to_keep_up_augment_on_device"] = round(
            row["gpu_patches_per_s"] / row["plain_patches_per_s_per_worker"], 1)
        print(json.dumps(row))
        rows.append(row)
    result = {"machine": platform.processor() or platform.machine(),
              "cores": len(os.sched_getaffinity(0)), "cases": len(prepared),
              "cropped_case_shape": shape, "width": args.width,
              "gpu_assumption": f"{args.gpu_tflops} TFLOP/s achieved (bf16)", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
