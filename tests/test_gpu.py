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


def test_batch_augmentations_on_cuda_match_the_cpu_where_no_noise_is_drawn():
    from ciml_core.data.batch_augment import BatchAugment

    image = torch.randn(4, 4, 32, 32, 32)
    label = (torch.rand(4, 3, 32, 32, 32) > 0.7).float()
    augment = BatchAugment(3)
    gen = torch.Generator().manual_seed(3)
    # the spatial part and the flips draw on the CPU generator: the same on both devices
    cpu_image, cpu_label = augment.spatial(image, label, gen)
    gen = torch.Generator().manual_seed(3)
    gpu_image, gpu_label = augment.spatial(image.cuda(), label.cuda(), gen)
    torch.testing.assert_close(gpu_image.cpu(), cpu_image, atol=1e-4, rtol=1e-4)
    assert (gpu_label.cpu() != cpu_label).float().mean() < 1e-3  # nearest: ties may differ
    a = augment(image.cuda(), label.cuda(), seed=(0, 1, 2, 0))
    b = augment(image.cuda(), label.cuda(), seed=(0, 1, 2, 0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].device.type == "cuda" and set(a[1].unique().tolist()) <= {0.0, 1.0}
