"""From network outputs to per-region probabilities and masks (SPEC 4, "Prediction")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ciml_core.errors import ConfigError
from ciml_core.model.decomposition import TaskDecomposition
from ciml_core.model.interface import CIMLOutput

#: Nested BraTS regions, outermost first: ET lies within TC, which lies within WT.
NESTED_REGIONS = ("WT", "TC", "ET")
#: How nesting is enforced on thresholded masks (see :func:`probabilities_to_region_masks`).
NESTINGS = ("union", "intersection")


def ensemble_region_probabilities(output: CIMLOutput, decomposition: TaskDecomposition) -> Tensor:
    """Per region, the mean sigmoid probability over every head that predicts it (paper 4.1.1).

    Returns ``[B, R, *spatial]`` with regions in ``decomposition.regions`` order. Works for any
    network: which head predicts what is read from ``output.task_regions``.
    """
    channels = []
    for region in decomposition.regions:
        votes = [
            torch.sigmoid(logits[:, regions.index(region)])
            for logits, regions in zip(output.logits, output.task_regions, strict=True)
            if region in regions
        ]
        if not votes:
            raise ConfigError(
                f"region {region!r} is predicted by no output head {output.task_regions}"
            )
        channels.append(torch.stack(votes).mean(dim=0))
    return torch.stack(channels, dim=1)


def probabilities_to_region_masks(
    probabilities: Tensor, regions: Sequence[str], threshold: float = 0.5,
    nesting: str = "union",
) -> Tensor:
    """Threshold ``[B, R, *spatial]`` probabilities into boolean masks, enforcing ET ⊂ TC ⊂ WT.

    Nesting is applied between whichever of WT, TC, ET are present, so the masks always map to a
    valid BraTS label map (:data:`NESTINGS`):

    - ``"union"`` (default): the inner region wins, as in nnU-Net's region training: a voxel
      predicted ET is TC and WT too (``TC |= ET``, ``WT |= TC``);
    - ``"intersection"``: the outer region wins: an ET voxel outside the predicted TC is dropped.
      It removed 16-37 % of the true ET voxels of some phantoms (docs/method.md).
    """
    if probabilities.shape[1] != len(regions):
        raise ValueError(
            f"{probabilities.shape[1]} probability channels for regions {list(regions)}"
        )
    if nesting not in NESTINGS:
        raise ValueError(f"nesting must be one of {NESTINGS}, got {nesting!r}")
    masks = probabilities > threshold
    present = [r for r in NESTED_REGIONS if r in regions]
    pairs = list(zip(present, present[1:], strict=False))
    if nesting == "union":
        for outer, inner in reversed(pairs):  # innermost first, so ET reaches WT through TC
            masks[:, regions.index(outer)] |= masks[:, regions.index(inner)]
    else:
        for outer, inner in pairs:
            masks[:, regions.index(inner)] &= masks[:, regions.index(outer)]
    return masks
