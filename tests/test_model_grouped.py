"""The fused (grouped-convolution) inference network computes what the unfused one does."""

import numpy as np
import pytest
import torch
from torch import nn

from ciml_core.errors import ConfigError
from ciml_core.model import CIMLNetwork, ModelConfig, Task, TaskDecomposition, build_model
from ciml_core.model.grouped import GroupedCIMLNetwork, cat_per_group

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained_looking(config: ModelConfig) -> CIMLNetwork:
    """A network whose norms are not at their initial identity: random running statistics and
    affine parameters, so that folding them into the convolutions is really exercised."""
    torch.manual_seed(0)
    model = build_model(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm3d, nn.BatchNorm2d)):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
                module.weight.copy_(1 + 0.3 * torch.randn(module.num_features, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.num_features, generator=generator))
            if isinstance(module, nn.Conv3d) and module.bias is not None:
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()


def _assert_same_outputs(config: ModelConfig, batch: int = 2) -> None:
    model = _trained_looking(config)
    grouped = GroupedCIMLNetwork.from_network(model)
    size = config.patch_size
    x = torch.randn(batch, len(config.decomposition.modalities), *size,
                    generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
        got = grouped(x)
    assert got.task_regions == expected.task_regions
    assert len(got.logits) == len(expected.logits)
    for e, g in zip(expected.logits, got.logits, strict=True):
        assert g.shape == e.shape
        assert e.abs().max() > 0.1  # a real signal, not all zeros
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.kl, torch.zeros(len(config.decomposition.tasks)))


@pytest.mark.parametrize("variant", ["full", "attention", "vi", "message", "baseline"])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_fused_equals_unfused_for_every_variant(variant, norm):
    _assert_same_outputs(ModelConfig(width=4, variant=variant, norm=norm, patch_size=(32,) * 3))


def test_fused_handles_uneven_tasks_and_2d():
    # 2 input channels for one segmentor, 1 for the others; 3, 1 and 2 regions.
    decomposition = TaskDecomposition(
        tasks=(Task(("a", "b"), ("x", "y", "z")), Task(("b",), ("y",)), Task(("c",), ("x", "z"))),
        modalities=("a", "b", "c"), regions=("x", "y", "z"))
    for dims, size in ((3, (16, 32, 16)), (2, (48, 32))):
        _assert_same_outputs(ModelConfig(decomposition=decomposition, width=3, spatial_dims=dims,
                                         patch_size=size), batch=1)


def test_fused_with_dilation_and_the_default_width():
    _assert_same_outputs(ModelConfig(width=8, dilation=2, patch_size=(32,) * 3), batch=1)


def test_cat_per_group_matches_concatenation_inside_each_group():
    a = torch.arange(2 * 6 * 2).reshape(2, 6, 2).float()  # 3 groups of 2 channels
    b = -torch.arange(2 * 3 * 2).reshape(2, 3, 2).float()  # 3 groups of 1 channel
    out = cat_per_group([a, b], 3)
    assert out.shape == (2, 9, 2)
    for t in range(3):
        torch.testing.assert_close(out[:, 3 * t:3 * t + 3],
                                   torch.cat([a[:, 2 * t:2 * t + 2], b[:, t:t + 1]], dim=1))


def test_fusing_a_non_ciml_network_is_refused():
    with pytest.raises(ConfigError, match="fuses a CIMLNetwork"):
        GroupedCIMLNetwork.from_network(build_model(ModelConfig(width=2, variant="dynunet")))


def test_sliding_window_fused_equals_unfused_and_bf16_is_close():
    from ciml_core.checkpoint import load_checkpoint
    from ciml_core.data.phantoms import make_brats_phantom
    from ciml_core.data.preprocess import preprocess_image
    from ciml_core.infer import InferenceSettings, sliding_window_predict

    demo = load_checkpoint("demo")
    CPU = InferenceSettings(device="cpu")
    patch = demo.config.patch_size
    phantom = make_brats_phantom(11, shape=(64, 64, 48))
    modalities = ("flair", "t1", "t1ce", "t2")
    image = preprocess_image(np.stack([phantom.images[m] for m in modalities]), modalities).image
    fused = sliding_window_predict(demo.model, image, patch, CPU)
    unfused = sliding_window_predict(demo.model, image, patch, CPU.replace(fused=False))
    assert fused.shape == unfused.shape == (3, *image.shape[1:])
    assert (unfused > 0.5).sum(axis=(1, 2, 3)).min() > 100  # the demo finds every region here
    np.testing.assert_allclose(fused, unfused, atol=1e-4)

    # bf16 windows (--bf16): probabilities within 0.03, masks nearly identical (measured on
    # phantoms 5000-5001: max |dp| < 0.01, mask Dice >= 0.9988).
    half = sliding_window_predict(demo.model, image, patch, CPU.replace(bf16=True))
    assert 0 < np.abs(half - fused).max() < 0.03
    for region in range(3):
        a, b = fused[region] > 0.5, half[region] > 0.5
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.99
