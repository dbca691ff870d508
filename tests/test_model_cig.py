"""The CIG: KL values and reduction, attention range, sampling vs eval determinism, taps."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ciml_core.model import (
    CIMLNetwork,
    ComplementaryInformationGate,
    ModelConfig,
    kl_to_standard_normal,
)


def test_kl_closed_form_and_torch_distributions():
    assert kl_to_standard_normal(torch.tensor(0.0), torch.tensor(1.0)).item() == 0.0
    assert kl_to_standard_normal(torch.tensor(1.0), torch.tensor(1.0)).item() == pytest.approx(0.5)
    assert kl_to_standard_normal(torch.tensor(0.0), torch.tensor(math.e)).item() == pytest.approx(
        0.5 * (math.e**2 - 1) - 1
    )
    generator = torch.Generator().manual_seed(0)
    mu = 2 * torch.randn(3, 5, 4, 4, generator=generator)
    sigma = torch.rand(3, 5, 4, 4, generator=generator) * 3 + 1e-3
    expected = kl_divergence(
        Normal(mu, sigma), Normal(torch.zeros_like(mu), torch.ones_like(sigma))
    )
    torch.testing.assert_close(kl_to_standard_normal(mu, sigma), expected)


def _gate(**switches):
    torch.manual_seed(0)
    return ComplementaryInformationGate(6, 3, spatial_dims=3, norm="batch", **switches)


def _inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    local = torch.randn(2, 6, 4, 4, 4, generator=generator)
    return local, [torch.randn(2, 6, 4, 4, 4, generator=generator) for _ in range(3)]


def test_gate_kl_is_the_mean_over_elements_then_messages():
    gate = _gate().eval()
    captured = {}
    for k in range(3):
        gate.mu[k].register_forward_hook(lambda m, a, o, k=k: captured.__setitem__(("mu", k), o))
        gate.sigma[k].register_forward_hook(lambda m, a, o, k=k: captured.__setitem__(("sg", k), o))
    gates = []
    gate.attention.register_forward_hook(lambda m, a, o: gates.append(o))
    local, messages = _inputs()
    with torch.no_grad():
        complementary, kl = gate(local, messages)
    per_message = []
    for k in range(3):
        mu = captured[("mu", k)]
        sigma = torch.nn.functional.softplus(captured[("sg", k)]) + 1e-6
        closed = 0.5 * (mu**2 + sigma**2 - 1) - torch.log(sigma)
        per_message.append(closed.mean())
    assert kl.item() == pytest.approx(torch.stack(per_message).mean().item(), rel=1e-5)
    # Eval: c_s = sum of the means, each computed from the gated message.
    assert torch.allclose(complementary, sum(captured[("mu", k)] for k in range(3)))
    g = gates[0]
    assert g.shape == (2, 3, 4, 4, 4) and g.min() >= 0 and g.max() <= 1
    expected_mu0 = gate.mu[0](messages[0] * g[:, :1])
    assert torch.allclose(captured[("mu", 0)], expected_mu0.detach(), atol=1e-6)


def test_segmentor_kl_is_the_mean_over_levels():
    model = CIMLNetwork(ModelConfig(width=4, patch_size=(32, 32, 32))).eval()
    level_kl = []
    for gate in model.segmentors[2].gates:
        gate.register_forward_hook(lambda m, a, o: level_kl.append(o[1]))
    with torch.no_grad():
        out = model(torch.randn(1, 4, 32, 32, 32))
    assert len(level_kl) == 4
    assert out.kl[2].item() == pytest.approx(torch.stack(level_kl).mean().item(), rel=1e-6)


def test_eval_is_deterministic_and_training_samples_z_per_seed():
    model = CIMLNetwork(ModelConfig(width=4, patch_size=(32, 32, 32)))
    x = torch.randn(2, 4, 32, 32, 32)
    taps, means = [], []
    gate = model.segmentors[0].gates[0]
    gate.representation_taps[1].register_forward_hook(lambda m, a, o: taps.append(o.detach()))
    gate.mu[1].register_forward_hook(lambda m, a, o: means.append(o.detach()))

    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    for a, b in zip(first.logits, second.logits, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first.kl, second.kl)
    assert torch.equal(taps[0], means[0])  # z = mu in eval

    model.train()
    runs = []
    for seed in (1, 2, 1):
        taps.clear()
        means.clear()
        torch.manual_seed(seed)
        with torch.no_grad():
            logits = model(x).logits[0]
        runs.append((taps[0], means[0], logits))
    (z1, mu1, l1), (z2, mu2, l2), (z1b, _, l1b) = runs
    assert torch.equal(mu1, mu2)  # the mean does not depend on the seed...
    assert not torch.equal(z1, z2) and not torch.equal(l1, l2)  # ...the sample does
    assert torch.equal(z1, z1b) and torch.equal(l1, l1b)
    assert (z1 - mu1).abs().mean() > 1e-3


def test_representation_taps_give_activation_and_gradient_for_gradcam():
    """The hook recipe the Grad-CAM code uses: A_i and dy/dA_i at the shallowest CIG."""
    model = CIMLNetwork(ModelConfig(width=4, patch_size=(32, 32, 32))).eval()
    assert model.message_sources(3) == [0, 1, 2]
    activations, gradients = {}, {}

    def capture(k):
        def hook(module, args, output):
            activations[k] = output
            output.register_hook(lambda grad: gradients.__setitem__(k, grad))

        return hook

    gate = model.segmentors[3].gates[0]  # T1CE segmentor, level 1 (P/2, C channels)
    for k, tap in enumerate(gate.representation_taps):
        tap.register_forward_hook(capture(k))
    out = model(torch.randn(1, 4, 32, 32, 32))
    out.logits[3][:, 1].sum().backward()  # ET logit
    for k in range(3):
        assert activations[k].shape == gradients[k].shape == (1, 4, 16, 16, 16)
        assert gradients[k].abs().sum() > 0
