"""CUDA paths: bf16 training steps and GPU sliding windows with CPU accumulators.

Skipped (with the reason) on machines without CUDA; benchmarks/gpu_check.sh runs them on a GPU.
"""

import numpy as np
import pytest
import torch

from ciml_core.checkpoint import load_checkpoint
from ciml_core.data.phantoms import make_brats_phantom
from ciml_core.infer import InferenceSettings, sliding_window_predict
from ciml_core.model import CIMLLoss, ModelConfig, build_model

pytestmark = pytest.mark.gpu


def test_bf16_training_step_on_cuda():
    config = ModelConfig(width=4, patch_size=(32, 32, 32))
    model = build_model(config).cuda().train()
    loss_fn = CIMLLoss(config.decomposition)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, 4, 32, 32, 32, device="cuda")
    y = (torch.rand(2, 3, 32, 32, 32, device="cuda") > 0.7).float()
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        loss, _ = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_gpu_windows_match_cpu():
    loaded = load_checkpoint("demo")
    phantom = make_brats_phantom(5000, shape=(64, 64, 48))
    image = np.stack([phantom.images[m] for m in loaded.modalities])
    image = (image - image.mean()) / image.std()
    patch = loaded.config.patch_size
    cpu = sliding_window_predict(loaded.model, image, patch, InferenceSettings(device="cpu"))
    gpu = sliding_window_predict(loaded.model, image, patch, InferenceSettings(device="cuda"))
    assert gpu.shape == cpu.shape
    # bf16 autocast on the GPU: probabilities agree to a few hundredths
    assert np.abs(gpu - cpu).max() < 0.1
    assert ((gpu > 0.5) == (cpu > 0.5)).mean() > 0.99


def test_fused_windows_match_unfused_on_cuda():
    loaded = load_checkpoint("demo")
    phantom = make_brats_phantom(5001, shape=(64, 64, 48))
    image = np.stack([phantom.images[m] for m in loaded.modalities])
    image = (image - image.mean()) / image.std()
    patch = loaded.config.patch_size
    fused = sliding_window_predict(loaded.model, image, patch,
                                   InferenceSettings(device="cuda", bf16=False))
    unfused = sliding_window_predict(
        loaded.model, image, patch, InferenceSettings(device="cuda", bf16=False, fused=False))
    # fp32 (cuDNN may use TF32 for convolutions): equal to a few thousandths
    assert np.abs(fused - unfused).max() < 5e-3
