"""Ensembling of per-segmentor probabilities and region masks with the BraTS nesting."""

import math

import pytest
import torch

from ciml_core.errors import ConfigError
from ciml_core.model import (
    CIMLOutput,
    Task,
    TaskDecomposition,
    ensemble_region_probabilities,
    probabilities_to_region_masks,
)

LOGIT = {0.5: 0.0, 0.75: math.log(3), 0.25: -math.log(3), 0.9: math.log(9), 0.1: -math.log(9)}


def _logits(*probabilities):
    """[1, n, 2] logits whose sigmoids are the given per-channel pairs."""
    return torch.tensor([[[LOGIT[p] for p in pair] for pair in probabilities]])


def test_ensemble_averages_every_head_that_predicts_a_region():
    decomposition = TaskDecomposition.brats()
    output = CIMLOutput(
        logits=[
            _logits((0.9, 0.1)),  # flair: WT
            _logits((0.5, 0.25)),  # t1: TC
            _logits((0.5, 0.5), (0.75, 0.25)),  # t2: WT, TC
            _logits((0.25, 0.75), (0.9, 0.1)),  # t1ce: TC, ET
        ],
        task_regions=(("WT",), ("TC",), ("WT", "TC"), ("TC", "ET")),
        kl=torch.zeros(4),
    )
    probabilities = ensemble_region_probabilities(output, decomposition)
    expected = torch.tensor(
        [
            [
                [(0.9 + 0.5) / 2, (0.1 + 0.5) / 2],  # WT: flair, t2
                [(0.5 + 0.75 + 0.25) / 3, (0.25 + 0.25 + 0.75) / 3],  # TC: t1, t2, t1ce
                [0.9, 0.1],  # ET: t1ce only
            ]
        ]
    )
    torch.testing.assert_close(probabilities, expected)


def test_ensemble_follows_the_decomposition_region_order_and_rejects_gaps():
    output = CIMLOutput(
        logits=[_logits((0.75, 0.25), (0.9, 0.5))],
        task_regions=(("TC", "WT"),),
        kl=torch.zeros(1),
    )
    d = TaskDecomposition((Task(("t1ce",), ("TC", "WT")),), ("t1ce",), ("WT", "TC"))
    probabilities = ensemble_region_probabilities(output, d)
    torch.testing.assert_close(probabilities, torch.tensor([[[0.9, 0.5], [0.75, 0.25]]]))
    with pytest.raises(ConfigError, match="region 'ET' is predicted by no output head"):
        ensemble_region_probabilities(output, TaskDecomposition.brats())


def test_masks_threshold_and_nest_et_in_tc_in_wt():
    # voxels:        0    1    2    3    4
    wt = torch.tensor([0.9, 0.9, 0.2, 0.9, 0.4])
    tc = torch.tensor([0.8, 0.3, 0.8, 0.6, 0.4])
    et = torch.tensor([0.7, 0.9, 0.9, 0.2, 0.5])
    masks = probabilities_to_region_masks(torch.stack([wt, tc, et])[None], ("WT", "TC", "ET"))
    assert masks.dtype == torch.bool
    # WT: threshold only. TC: voxel 2 is outside WT. ET: voxels 1 and 2 are outside TC, voxel 3
    # is below threshold and voxel 4 at 0.5 is not > 0.5.
    assert masks[0].int().tolist() == [[1, 1, 0, 1, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 0]]
    # Any channel order; other regions are left alone.
    shuffled = probabilities_to_region_masks(torch.stack([et, wt, tc])[None], ("ET", "WT", "TC"))
    assert torch.equal(shuffled[0], masks[0][[2, 0, 1]])
    lesion = probabilities_to_region_masks(et[None, None], ("lesion",))
    assert lesion[0, 0].int().tolist() == [1, 1, 1, 0, 0]
