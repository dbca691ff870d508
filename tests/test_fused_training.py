"""The fused training network computes what the unfused one does: outputs, KL, loss, the
gradient of every parameter, batch-norm statistics and whole optimiser steps.

The equality tests run in float64, where the two agree to rounding (1e-6 relative per
parameter: the KL is float32 in both). In float32 (``test_float32_step_is_close``) the grouped
convolutions round differently by ~1e-6; where a pre-activation lies within that of zero the
LeakyReLU's slope (1 or 0.01) differs between the two, so a few voxels' gradients differ by
their whole size: measured up to 3.4e-4 of the network's largest gradient (float64 truth:
unfused 1e-7, fused 3.4e-4 from such voxels). The float32 test allows 1e-3.
"""

import copy

import pytest
import torch
from torch import nn

from ciml_core.errors import ConfigError
from ciml_core.model import (
    CIMLLoss,
    CIMLNetwork,
    ModelConfig,
    Task,
    TaskDecomposition,
    build_model,
    recalibrate_batch_norm,
)
from ciml_core.model.fused import FusedTrainingCIML, training_network
from ciml_core.model.grouped import cat_per_group

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNEVEN = TaskDecomposition(
    tasks=(Task(("a", "b"), ("x", "y", "z")), Task(("b",), ("y",)), Task(("c",), ("x", "z"))),
    modalities=("a", "b", "c"), regions=("x", "y", "z"))


def _pair(config: ModelConfig, memory_format=torch.contiguous_format, dtype=torch.float64):
    """(unfused network, its deep copy, the copy fused), in ``dtype``. Norm parameters and
    running statistics away from their initial values, so that nothing passes by being at
    identity."""
    torch.manual_seed(0)
    model = build_model(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
                module.weight.copy_(1 + 0.3 * torch.randn(module.num_features, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.num_features, generator=generator))
    model = model.to(dtype=dtype, memory_format=memory_format).train()
    twin = copy.deepcopy(model)
    return model, twin, training_network(twin)


def _batch(config: ModelConfig, batch: int = 2, seed: int = 5, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    decomposition = config.decomposition
    x = torch.randn(batch, len(decomposition.modalities), *config.patch_size, generator=generator)
    y = torch.rand(batch, len(decomposition.regions), *config.patch_size, generator=generator)
    return x.to(dtype), (y > 0.7).to(dtype)


def _assert_same_gradients(expected: nn.Module, got: nn.Module, rel: float = 1e-6) -> None:
    """Every parameter's gradient within ``rel`` of that parameter's largest gradient (not
    1e-12: the KL and its gradient are computed in float32 in both networks)."""
    pairs = list(zip(expected.named_parameters(), got.parameters(), strict=True))
    assert all(p.grad is not None and q.grad is not None for (_, p), q in pairs)
    assert max(p.grad.abs().max().item() for (_, p), _ in pairs) > 1e-3
    for (name, p), q in pairs:
        error = (p.grad - q.grad).abs().max().item()
        assert error <= rel * p.grad.abs().max().item() + 1e-15, f"{name}: |d grad| {error:.3g}"


def _assert_float32_gradients(expected: nn.Module, got: nn.Module) -> None:
    """float32: each gradient element within 1e-3 of itself or of the largest gradient in the
    network (rounding and LeakyReLU slopes, see the module docstring)."""
    largest = max(p.grad.abs().max() for p in expected.parameters())
    for (name, p), q in zip(expected.named_parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-3 * largest, msg=name)


def _assert_same_buffers(expected: nn.Module, got: nn.Module, tol: float = 1e-12) -> None:
    for (name, a), b in zip(expected.named_buffers(), got.buffers(), strict=True):
        if a.dtype == torch.long:  # num_batches_tracked
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=name)


def _step_both(config: ModelConfig, model: nn.Module, fused: nn.Module, seed: int = 3):
    """One forward + backward of each from the same RNG state; returns both outputs and losses."""
    x, y = _batch(config, dtype=next(model.parameters()).dtype)
    loss_fn = CIMLLoss(config.decomposition)
    results = []
    for network in (model, fused):
        torch.manual_seed(seed)
        output = network(x)
        loss, _ = loss_fn(output, y)
        loss.backward()
        results.append((output, loss))
    return results


def _assert_same_step(config: ModelConfig) -> None:
    model, twin, fused = _pair(config)
    (expected, loss_e), (got, loss_g) = _step_both(config, model, fused)
    assert got.task_regions == expected.task_regions
    for e, g in zip(expected.logits, got.logits, strict=True):
        assert g.shape == e.shape
        assert e.abs().max() > 0.1  # a real signal
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    # The KL is computed in float32 whatever the network's dtype (cig.kl_to_standard_normal).
    torch.testing.assert_close(got.kl, expected.kl, rtol=1e-6, atol=1e-9)
    if config.gate_switches is not None and config.gate_switches.variational:
        assert expected.kl.min() > 0.01  # a real KL, not zeros on both sides
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-6, atol=1e-9)
    _assert_same_gradients(model, twin)
    _assert_same_buffers(model, twin)


@pytest.mark.parametrize("variant", ["full", "attention", "vi", "message", "baseline"])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_train_step_equals_unfused_for_every_variant(variant, norm):
    # Message dropout (drawn per sample) and sampling of z both run; same seed, same draws.
    dropout = 0.0 if variant == "baseline" else 0.5
    # instance norm needs more than one voxel at the deepest level (2 x 2 x 1 here)
    _assert_same_step(ModelConfig(width=4, variant=variant, norm=norm, patch_size=(32, 32, 16),
                                  message_dropout=dropout))


def test_uneven_tasks_2d_and_detached_messages():
    for dims, size in ((3, (16, 32, 16)), (2, (48, 32))):
        _assert_same_step(ModelConfig(decomposition=UNEVEN, width=3, spatial_dims=dims,
                                      patch_size=size, detach_messages=True,
                                      message_dropout=0.3))


def test_dilation_and_messages_off():
    config = ModelConfig(width=4, dilation=2, patch_size=(16,) * 3)
    model, twin, fused = _pair(config)
    for network in (model, twin):
        network.segmentors[1].messages_off = True
    (expected, _), (got, _) = _step_both(config, model, fused)
    for e, g in zip(expected.logits, got.logits, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    _assert_same_gradients(model, twin)


@pytest.mark.parametrize("variant", ["full", "baseline"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_float32_step_is_close(variant, memory_format):
    # Other rounding (grouped vs separate convolutions, and other oneDNN algorithms for
    # channels-last weights), so float32 tolerances. 32^3: at 16^3 batch norm at the deepest
    # level normalises 2 values (batch 2, one voxel), which float32 cannot do stably.
    config = ModelConfig(width=4, variant=variant, patch_size=(32,) * 3, message_dropout=0.5)
    model, twin, fused = _pair(config, memory_format, torch.float32)
    (expected, loss_e), (got, loss_g) = _step_both(config, model, fused)
    for e, g in zip(expected.logits, got.logits, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.kl, expected.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-5, atol=1e-6)
    _assert_float32_gradients(model, twin)
    _assert_same_buffers(model, twin, tol=1e-5)


def test_optimiser_steps_stay_equal():
    config = ModelConfig(width=4, patch_size=(32, 32, 16), message_dropout=0.3)
    model, twin, fused = _pair(config)
    loss_fn = CIMLLoss(config.decomposition)
    optimisers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, twin)]
    for step in range(3):
        x, y = _batch(config, seed=10 + step)
        losses = []
        for network, optimiser in zip((model, fused), optimisers, strict=True):
            torch.manual_seed(100 + step)
            loss, _ = loss_fn(network(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-10)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-10)
    _assert_same_buffers(model, twin)


def test_eval_mode_and_batch_norm_recalibration():
    config = ModelConfig(width=4, patch_size=(16,) * 3, message_dropout=0.5)
    model, twin, fused = _pair(config)
    x, _ = _batch(config)
    # eval: z = mu, no dropout, running statistics used and left alone; the KL is still there.
    model.eval()
    fused.eval()
    assert not twin.training and not twin.segmentors[0].gates[0].training
    with torch.no_grad():
        expected, got = model(x), fused(x)
    for e, g in zip(expected.logits, got.logits, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    assert expected.kl.min() > 0.01
    torch.testing.assert_close(got.kl, expected.kl, rtol=1e-6, atol=1e-9)
    _assert_same_buffers(model, twin)
    # recalibrate_batch_norm through the fused module (cumulative averages, momentum None).
    batches = [_batch(config, seed=s)[0] for s in (20, 21)]
    assert recalibrate_batch_norm(model, batches) == recalibrate_batch_norm(fused, batches) == 2
    _assert_same_buffers(model, twin)
    assert all(bn.momentum == 0.1 for bn in twin.modules()
               if isinstance(bn, nn.modules.batchnorm._BatchNorm))


def test_shares_the_network_parameters_and_state_dict():
    model = build_model(ModelConfig(width=2, patch_size=(16,) * 3))
    fused = training_network(model)
    assert isinstance(fused, FusedTrainingCIML) and fused.network is model
    assert [id(p) for p in fused.parameters()] == [id(p) for p in model.parameters()]
    assert list(fused.state_dict()) == list(model.state_dict())
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(
        fused.state_dict().values(), model.state_dict().values(), strict=True))
    # train()/eval() reach the network's modules.
    fused.eval()
    assert not any(m.training for m in model.modules())
    fused.train()
    assert all(m.training for m in model.modules())


def test_other_networks_are_not_fused():
    dynunet = build_model(ModelConfig(width=2, variant="dynunet"))
    assert training_network(dynunet) is dynunet
    ciml = build_model(ModelConfig(width=2))
    assert training_network(ciml, fused=False) is ciml
    with pytest.raises(ConfigError, match="fuses a CIMLNetwork"):
        FusedTrainingCIML(dynunet)
    assert isinstance(ciml, CIMLNetwork)


def test_cat_per_group_keeps_channels_last():
    a = torch.randn(2, 6, 4, 4, 4)
    b = torch.randn(2, 9, 4, 4, 4)
    expected = cat_per_group([a, b], 3)
    got = cat_per_group([t.contiguous(memory_format=torch.channels_last_3d) for t in (a, b)], 3)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(got, expected)
