"""Dataset-scale rehearsal: N full-size (240x240x155) phantom cases, preprocessing and 2 epochs of
training with 2 loader workers, logging the peak resident memory of the whole process tree.

    python benchmarks/scale_rehearsal.py --cases 20 [--cases-root runs/scale] [--iters 100]
    python benchmarks/scale_rehearsal.py --cases 80
    python benchmarks/scale_rehearsal.py --report      # the table from the stored results

The cases are generated once under ``--cases-root/data`` (case i has seed 9000 + i, so the
N = 80 set contains the N = 20 set) and reused. Each run trains from scratch in a fresh folder
through the real CLI (``ciml-core train``, fold -1: no validation) in a child process; a sampler
thread sums the RSS of that process and all its descendants (loader workers, preprocessing
workers) every 0.2 s. Results: ``benchmarks/results/scale_rehearsal.json`` (one entry per N and
code version), and docs/performance.md holds the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path("benchmarks/results/scale_rehearsal.json")
SHAPE = (240, 240, 155)


def generate(root: Path, n: int) -> Path:
    """Cases 0..n-1 under ``root/data`` (only the missing ones are written)."""
    from ciml_core.data.phantoms import _case_id, write_phantom_dataset

    data = root / "data"
    for i in range(n):
        if not (data / _case_id("brats", 9000 + i)).is_dir():
            write_phantom_dataset("brats", 1, data, seed=9000 + i, shape=SHAPE)
    return data


class TreeMemory:
    """Peak of the summed RSS of a process and its descendants, sampled on a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            if total > self.peak:
                self.peak, self.peak_processes = total, len(procs)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def rehearse(data: Path, n: int, run: Path, args: argparse.Namespace) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    # A folder with links to the first n cases: the CLI trains on every case it finds.
    subset = run.parent / f"{run.name}_data"
    shutil.rmtree(subset, ignore_errors=True)
    subset.mkdir(parents=True)
    for case in sorted(data.iterdir())[:n]:
        (subset / case.name).symlink_to(case.resolve())
    cmd = [sys.executable, "-m", "ciml_core.cli", "train", str(subset), "--out", str(run),
           "--epochs", "2", "--iters-per-epoch", str(args.iters), "--patch", str(args.patch),
           "--batch", "2", "--width", str(args.width), "--workers", "2", "--fold", "-1",
           "--device", "cpu", "--bn-recalibration", "0"]
    if args.preprocess_workers > 0:  # 0: the code before the flag existed
        cmd += ["--preprocess-workers", str(args.preprocess_workers)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(proc.pid)
    output = proc.communicate()[0]
    peak = memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}):\n{output[-3000:]}")
    wall = time.time() - t0
    metas = [json.loads(p.read_text()) for p in run.glob("cache/*/*/meta.json")]
    n_cached = len(metas) or len(list(run.glob("cache/*.npz")))  # the old cache: one .npz each
    cache_bytes = sum(f.stat().st_size for f in run.glob("cache/**/*") if f.is_file())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch_seconds = [epochs[0]["time"]] + [b["time"] - a["time"] for a, b in zip(epochs, epochs[1:], strict=False)]
    return {
        "cases": n, "patch": args.patch, "width": args.width, "iters_per_epoch": args.iters,
        "batch": 2, "workers": 2, "preprocess_workers": args.preprocess_workers,
        "peak_rss_mib": round(peak / 2**20), "processes_at_peak": memory.peak_processes,
        "cache_mib": round(cache_bytes / 2**20, 1),
        "cache_mib_per_case": round(cache_bytes / 2**20 / max(n_cached, 1), 1),
        "preprocess_s_per_case": (round(sum(m["seconds"] for m in metas) / len(metas), 2)
                                  if metas else None),
        "epoch_seconds": [round(s, 1) for s in epoch_seconds],
        "patches_per_s_epoch2": round(args.iters * 2 / epoch_seconds[-1], 2),
        "wall_s": round(wall, 1),
        "code": args.label,
    }


def report(results: list[dict]) -> str:
    lines = ["| N cases | code | peak RSS tree (MiB) | cache (MiB, per case) | preprocess s/case | "
             "patches/s (epoch 2) | wall (s) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["code"], r["cases"])):
        lines.append(f"| {r['cases']} | {r['code']} | {r['peak_rss_mib']} | {r['cache_mib']} "
                     f"({r['cache_mib_per_case']}) | {r['preprocess_s_per_case']} | "
                     f"{r['patches_per_s_epoch2']} | {r['wall_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs="*", default=[20])
    parser.add_argument("--cases-root", type=Path, default=Path("runs/scale"))
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--preprocess-workers", type=int, default=2)
    parser.add_argument("--label", default="mmap cache",
                        help="what code this is (e.g. 'before: npz + per-worker dict')")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    if not args.report:
        for n in args.cases:
            data = generate(args.cases_root, n)
            result = rehearse(data, n, args.cases_root / f"run{n}", args)
            print(json.dumps(result))
            results = [r for r in results if (r["cases"], r["code"]) != (n, args.label)]
            results.append(result)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
