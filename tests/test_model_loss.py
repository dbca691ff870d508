"""CIMLLoss against values computed by hand on tiny tensors."""

import math

import pytest
import torch

from ciml_core.model import CIMLLoss, CIMLOutput, Task, TaskDecomposition
from ciml_core.model.loss import term_weights

EPS = 1e-5  # MONAI DiceLoss smoothing (numerator and denominator)


def _dice_loss(p, t):
    return 1 - (2 * sum(a * b for a, b in zip(p, t, strict=True)) + EPS) / (sum(p) + sum(t) + EPS)


def _bce(p, t):
    return -sum(
        b * math.log(a) + (1 - b) * math.log(1 - a) for a, b in zip(p, t, strict=True)
    ) / len(p)


def test_loss_components_match_hand_computation():
    decomposition = TaskDecomposition(
        tasks=(Task(("ct",), ("WT",)), Task(("pet",), ("WT", "TC"))),
        modalities=("ct", "pet"),
        regions=("WT", "TC"),
    )
    # targets [B=1, R=2 (WT, TC), 4 voxels]
    wt, tc = [1, 0, 0, 1], [1, 1, 1, 1]
    targets = torch.tensor([[wt, tc]], dtype=torch.float32)
    # head 0 predicts WT with p = 0.5 everywhere; head 1 predicts WT, TC with p = 0.75 / 0.25.
    p0 = [0.5] * 4
    p1_wt, p1_tc = [0.75, 0.25, 0.25, 0.75], [0.75] * 4

    def logit(p):
        return math.log(p / (1 - p))

    output = CIMLOutput(
        logits=[
            torch.tensor([[[logit(p) for p in p0]]]),
            torch.tensor([[[logit(p) for p in p1_wt], [logit(p) for p in p1_tc]]]),
        ],
        task_regions=(("WT",), ("WT", "TC")),
        kl=torch.tensor([0.2, 0.4]),
    )
    total, parts = CIMLLoss(decomposition, beta=0.5, weighting="head")(output, targets)

    dice = _dice_loss(p0, wt) + (_dice_loss(p1_wt, wt) + _dice_loss(p1_tc, tc)) / 2
    bce = _bce(p0, wt) + (_bce(p1_wt, wt) + _bce(p1_tc, tc)) / 2
    assert _dice_loss(p0, wt) == pytest.approx(0.5, abs=1e-5)
    assert parts["dice"] == pytest.approx(dice, rel=1e-5)
    assert parts["bce"] == pytest.approx(bce, rel=1e-5)
    assert parts["kl"] == pytest.approx(0.6)
    assert parts["total"] == pytest.approx(dice + bce + 0.5 * 0.6, rel=1e-5)
    assert total.item() == pytest.approx(parts["total"], rel=1e-6)
    assert all(isinstance(v, float) for v in parts.values())

    _, beta_zero = CIMLLoss(decomposition, beta=0.0, weighting="head")(output, targets)
    assert beta_zero["total"] == pytest.approx(dice + bce, rel=1e-5)

    # "region": WT is predicted by two heads (1/2 each), TC by one (1): each region weighs 1.
    _, by_region = CIMLLoss(decomposition, beta=0.5, weighting="region")(output, targets)
    dice_r = (_dice_loss(p0, wt) + _dice_loss(p1_wt, wt)) / 2 + _dice_loss(p1_tc, tc)
    bce_r = (_bce(p0, wt) + _bce(p1_wt, wt)) / 2 + _bce(p1_tc, tc)
    assert by_region["dice"] == pytest.approx(dice_r, rel=1e-5)
    assert by_region["bce"] == pytest.approx(bce_r, rel=1e-5)
    assert by_region["total"] == pytest.approx(dice_r + bce_r + 0.5 * 0.6, rel=1e-5)


def test_effective_region_weights_of_the_brats_decomposition():
    # "head" (the paper's per-segmentor sum) gives WT 1.5, TC 2.0, ET 0.5; "region" 1 each.
    decomposition = TaskDecomposition.brats()
    for weighting, expected in (("head", {"WT": 1.5, "TC": 2.0, "ET": 0.5}),
                                ("region", {"WT": 1.0, "TC": 1.0, "ET": 1.0})):
        totals = dict.fromkeys(decomposition.regions, 0.0)
        for task, weights in zip(decomposition.tasks, term_weights(decomposition, weighting),
                                 strict=True):
            for region, w in zip(task.regions, weights, strict=True):
                totals[region] += w
        assert totals == pytest.approx(expected)
    with pytest.raises(ValueError, match="region weighting must be one of"):
        term_weights(decomposition, "voxel")


def test_dice_pools_the_batch_so_empty_patches_are_not_a_full_loss():
    decomposition = TaskDecomposition.petct()
    # sample 0 has a lesion predicted perfectly, sample 1 none and predicts ~none
    targets = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])
    logits = torch.where(targets > 0, 20.0, -20.0)
    output = CIMLOutput(logits=[logits, logits], task_regions=(("lesion",),) * 2, kl=torch.zeros(2))
    _, parts = CIMLLoss(decomposition)(output, targets)
    assert parts["dice"] == pytest.approx(0.0, abs=1e-5)  # per-sample Dice would give ~1 per head


def test_gradients_reach_logits_and_kl():
    decomposition = TaskDecomposition.petct()
    logits = [torch.zeros(1, 1, 4, requires_grad=True) for _ in range(2)]
    kl = torch.tensor([1.0, 2.0], requires_grad=True)
    output = CIMLOutput(logits=logits, task_regions=(("lesion",),) * 2, kl=kl)
    total, _ = CIMLLoss(decomposition, beta=0.25)(output, torch.ones(1, 1, 4))
    total.backward()
    assert torch.equal(kl.grad, torch.tensor([0.25, 0.25]))
    assert all(g.grad.abs().sum() > 0 for g in logits)


def test_target_channel_mismatch_is_reported():
    output = CIMLOutput(
        logits=[torch.zeros(1, 1, 4)], task_regions=(("lesion",),), kl=torch.zeros(1)
    )
    with pytest.raises(ValueError, match="one per region"):
        CIMLLoss(TaskDecomposition.brats())(output, torch.zeros(1, 1, 4))


def test_bf16_logits_are_scored_in_float32():
    decomposition = TaskDecomposition.petct()
    logits = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    targets = (torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()

    def output(t):
        return CIMLOutput(logits=[t, t], task_regions=(("lesion",),) * 2, kl=torch.zeros(2))

    loss_fn = CIMLLoss(decomposition)
    total16, _ = loss_fn(output(logits.bfloat16()), targets)
    total32, _ = loss_fn(output(logits.bfloat16().float()), targets)
    assert total16.dtype == torch.float32
    assert total16.item() == pytest.approx(total32.item(), rel=1e-6)


@pytest.mark.parametrize("weighting", ["region", "head"])
def test_early_fusion_dynunet_trains_with_either_weighting(weighting):
    """DynUNet has one head over every region, not one per task of the decomposition: the loss
    weighs the heads the network outputs (a regression: the weights were once taken from the
    decomposition's four tasks and the first DynUNet step failed)."""
    from ciml_core.model import ModelConfig, build_model

    decomposition = TaskDecomposition.brats()
    assert term_weights([decomposition.regions], weighting) == (
        [[1.0, 1.0, 1.0]] if weighting == "region" else [[1 / 3, 1 / 3, 1 / 3]])
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="dynunet", width=4, norm="instance",
                                    patch_size=(32, 32, 32)))
    x = torch.randn(2, 4, 32, 32, 32)
    targets = (torch.rand(2, 3, 32, 32, 32) > 0.7).float()
    output = model(x)
    loss, parts = CIMLLoss(decomposition, weighting=weighting)(output, targets)
    loss.backward()
    probs = torch.sigmoid(output.logits[0].detach().float())
    scale = 1.0 if weighting == "region" else 1 / 3
    bce = sum(torch.nn.functional.binary_cross_entropy(probs[:, r], targets[:, r]).item()
              for r in range(3))
    assert parts["bce"] == pytest.approx(scale * bce, rel=1e-4)
    assert parts["kl"] == 0.0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
