"""Mutual learning through the messages, and what each Table 5 ablation switch changes."""

import pytest
import torch
from torch import nn

from ciml_core.model import (
    CIMLNetwork,
    ComplementaryInformationGate,
    CrossModalAttention,
    ModelConfig,
)

SIZE = 16  # the smallest legal patch; batch 2 keeps batch norm defined at the 1-voxel bottom


def _model(variant="full", **kwargs):
    torch.manual_seed(0)
    return CIMLNetwork(
        ModelConfig(width=4, variant=variant, patch_size=(SIZE,) * 3, **kwargs)
    ).train()


def _x():
    return torch.randn(2, 4, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def _encoder_gradient(model, j):
    grads = [p.grad for p in model.segmentors[j].encoder.parameters()]
    return sum(0.0 if g is None else g.abs().sum().item() for g in grads)


def _loss_on(model, i):
    logits = model(_x()).logits[i]
    target = (torch.rand(logits.shape, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    return nn.functional.binary_cross_entropy_with_logits(logits, target)


@pytest.mark.parametrize("variant", ["full", "message", "attention", "vi"])
def test_loss_of_one_segmentor_trains_every_other_encoder(variant):
    model = _model(variant)
    for i in range(4):
        model.zero_grad(set_to_none=True)
        _loss_on(model, i).backward()
        for j in range(4):
            stage_grads = [
                sum(p.grad.abs().sum().item() for p in stage.parameters())
                for stage in model.segmentors[j].encoder.stages
            ]
            assert all(g > 0 for g in stage_grads), (variant, i, j, stage_grads)


@pytest.mark.parametrize(("variant", "detach"), [("baseline", False), ("full", True)])
def test_no_gradient_reaches_other_encoders_without_message_gradients(variant, detach):
    model = _model(variant, detach_messages=detach)
    for i in range(4):
        model.zero_grad(set_to_none=True)
        _loss_on(model, i).backward()
        assert _encoder_gradient(model, i) > 0
        for j in set(range(4)) - {i}:
            assert _encoder_gradient(model, j) == 0.0, (variant, i, j)


def test_detaching_messages_does_not_change_the_forward_pass():
    attached, detached = _model("full").eval(), _model("full", detach_messages=True).eval()
    detached.load_state_dict(attached.state_dict())
    with torch.no_grad():
        a, b = attached(_x()), detached(_x())
    for x, y in zip(a.logits, b.logits, strict=True):
        assert torch.equal(x, y)


def _cig_outputs(model):
    """Run twice (train mode) with different seeds; return [(level-1 c_s of segmentor 0, output)]."""
    captured = []
    gate = model.segmentors[0].gates[0]
    gate.register_forward_hook(lambda m, a, o: captured.append(o[0].detach()))
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(model(_x()))
    return list(zip(captured, outputs, strict=True))


@pytest.mark.parametrize(
    ("variant", "attention", "sigma", "fusion", "kl_positive", "random"),
    [
        ("full", True, True, False, True, True),
        ("attention", True, False, False, False, False),
        ("vi", False, True, False, True, True),
        ("message", False, False, True, False, False),
    ],
)
def test_each_switch_changes_modules_and_outputs(
    variant, attention, sigma, fusion, kl_positive, random
):
    model = _model(variant)
    for segmentor in model.segmentors:
        assert len(segmentor.gates) == 4
        for gate in segmentor.gates:
            assert isinstance(gate, ComplementaryInformationGate)
            assert isinstance(gate.attention, CrossModalAttention) == attention
            assert (gate.sigma is not None) == sigma
            assert (gate.fusion is not None) == fusion
            assert len(gate.mu) == 3
    (c1, out1), (c2, out2) = _cig_outputs(model)
    assert bool(torch.all(out1.kl > 0)) == kl_positive
    if not kl_positive:
        assert torch.equal(out1.kl, torch.zeros(4))
    # Only the variational variants sample: otherwise the seed changes nothing.
    assert (not torch.equal(c1, c2)) == random
    if fusion:  # one conv + Norm + sigmoid over the messages: c_s in (0, 1)
        assert isinstance(model.segmentors[0].gates[0].fusion[1], nn.Sigmoid)
        assert c1.min() > 0 and c1.max() < 1
    else:  # a sum of projections: unbounded, signed
        assert c1.min() < 0 < c1.max()


def test_gating_is_used_zero_gates_leave_only_the_biases():
    model = _model("full").eval()
    gate = model.segmentors[1].gates[2]
    with torch.no_grad():
        for conv in gate.mu:  # biases start at zero; make them tell apart
            conv.bias.normal_()
    gate.attention.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    captured = []
    gate.register_forward_hook(lambda m, a, o: captured.append(o[0]))
    with torch.no_grad():
        model(_x())
    bias = sum(conv.bias for conv in gate.mu)
    expected = bias.view(1, -1, 1, 1, 1).expand_as(captured[0])
    torch.testing.assert_close(captured[0], expected)


def test_baseline_has_no_cig_and_narrower_decoder():
    baseline, full = _model("baseline"), _model("full")
    assert not any(isinstance(m, ComplementaryInformationGate) for m in baseline.modules())
    C = 4
    for segmentor in baseline.segmentors:
        assert segmentor.gates is None
        up = segmentor.decoder.up
        # upsample input: m4 only (8C instead of 16C); fuse inputs: up + m_s (no c_s)
        assert up[0].upsample[0].in_channels == 8 * C
        assert [block.fuse[0].in_channels for block in up] == [12 * C, 6 * C, 3 * C, 2 * C]
    assert full.segmentors[0].decoder.up[0].upsample[0].in_channels == 16 * C
    full_fuse = [b.fuse[0].in_channels for b in full.segmentors[0].decoder.up]
    assert full_fuse == [16 * C, 8 * C, 4 * C, 2 * C]
    out = baseline(_x())
    assert torch.equal(out.kl, torch.zeros(4))
    # Each baseline segmentor's output depends only on its own modality.
    x = _x()
    x2 = x.clone()
    x2[:, 1] = 0  # change T1 only: segmentor 1 (T1) changes, the others do not
    baseline.eval()
    with torch.no_grad():
        a, b = baseline(x), baseline(x2)
    changed = [not torch.equal(p, q) for p, q in zip(a.logits, b.logits, strict=True)]
    assert changed == [False, True, False, False]
