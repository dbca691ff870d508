"""Shared test helpers: tiny NIfTI trees written on the fly."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

#: A BraTS-like affine (LPS storage, as real BraTS files have), 1 mm.
LPS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = LPS_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def tiny_case_arrays(seed: int = 0, shape=(12, 10, 8)) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Four random MRI-like channels with a zero border and a BraTS 2020 label with 1, 2 and 4."""
    rng = np.random.default_rng(seed)
    images = {}
    for name in ("flair", "t1", "t1ce", "t2"):
        x = np.zeros(shape, np.float32)
        x[2:-2, 2:-2, 1:-1] = rng.uniform(1, 2, size=(shape[0] - 4, shape[1] - 4, shape[2] - 2))
        images[name] = x
    label = np.zeros(shape, np.uint8)
    label[4:8, 4:7, 3:6] = 2
    label[5:7, 5:6, 4:5] = 1
    label[6, 4, 3] = 4
    return images, label


@pytest.fixture
def write_case():
    """Write a tiny 4-modality case in a given layout; returns (root, images, label)."""

    def _write(root: Path, layout: str = "brats2020", case_id: str = "Case_001", seed: int = 0,
               affine: np.ndarray = LPS_AFFINE):
        images, label = tiny_case_arrays(seed)
        if layout == "brats2020":
            for name, x in images.items():
                write_nifti(root / case_id / f"{case_id}_{name}.nii.gz", x, affine)
            write_nifti(root / case_id / f"{case_id}_seg.nii.gz", label, affine)
        elif layout == "brats2023":
            names = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
            for name, x in images.items():
                write_nifti(root / case_id / f"{case_id}-{names[name]}.nii.gz", x, affine)
            label23 = np.where(label == 4, 3, label).astype(np.uint8)
            write_nifti(root / case_id / f"{case_id}-seg.nii.gz", label23, affine)
        else:
            raise ValueError(layout)
        return root, images, label

    return _write


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a shared CPU two OpenMP
    threads can wait on each other for seconds per step."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_torchrun(args: list[str], port: int, timeout: float = 300):
    """``python -m torch.distributed.run --nproc_per_node 2 ARGS`` on the CPU (one OpenMP thread
    per rank); asserts exit status 0 with the tail of its output. Returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), *args],
        capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when this machine has no CUDA device, saying so."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
