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


def test_masks_union_nesting_lets_the_inner_region_win():
    # voxels:        0    1    2    3    4    5
    wt = torch.tensor([0.9, 0.9, 0.2, 0.9, 0.4, 0.1])
    tc = torch.tensor([0.8, 0.3, 0.8, 0.6, 0.4, 0.1])
    et = torch.tensor([0.7, 0.9, 0.9, 0.2, 0.5, 0.6])
    masks = probabilities_to_region_masks(torch.stack([wt, tc, et])[None], ("WT", "TC", "ET"))
    # ET: threshold only (voxel 4 at 0.5 is not > 0.5). TC gains the ET voxels 1 and 5, WT gains
    # every TC voxel: 2 (TC) and 5 (ET through TC).
    assert masks[0].int().tolist() == [[1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 0, 1], [1, 1, 1, 0, 0, 1]]
    shuffled = probabilities_to_region_masks(torch.stack([et, wt, tc])[None], ("ET", "WT", "TC"))
    assert torch.equal(shuffled[0], masks[0][[2, 0, 1]])
    # Without TC, ET still reaches WT.
    no_tc = probabilities_to_region_masks(torch.stack([wt, et])[None], ("WT", "ET"))
    assert no_tc[0].int().tolist() == [[1, 1, 1, 1, 0, 1], [1, 1, 1, 0, 0, 1]]


def test_masks_intersection_nesting_drops_inner_voxels_outside_the_outer_region():
    # voxels:        0    1    2    3    4
    wt = torch.tensor([0.9, 0.9, 0.2, 0.9, 0.4])
    tc = torch.tensor([0.8, 0.3, 0.8, 0.6, 0.4])
    et = torch.tensor([0.7, 0.9, 0.9, 0.2, 0.5])
    masks = probabilities_to_region_masks(torch.stack([wt, tc, et])[None], ("WT", "TC", "ET"),
                                          nesting="intersection")
    assert masks.dtype == torch.bool
    # WT: threshold only. TC: voxel 2 is outside WT. ET: voxels 1 and 2 are outside TC, voxel 3
    # is below threshold and voxel 4 at 0.5 is not > 0.5.
    assert masks[0].int().tolist() == [[1, 1, 0, 1, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 0]]
    # Any channel order; other regions are left alone.
    shuffled = probabilities_to_region_masks(torch.stack([et, wt, tc])[None], ("ET", "WT", "TC"),
                                             nesting="intersection")
    assert torch.equal(shuffled[0], masks[0][[2, 0, 1]])
    with pytest.raises(ValueError, match="nesting must be one of"):
        probabilities_to_region_masks(et[None, None], ("ET",), nesting="outer")
    lesion = probabilities_to_region_masks(et[None, None], ("lesion",))
    assert lesion[0, 0].int().tolist() == [1, 1, 1, 0, 0]
