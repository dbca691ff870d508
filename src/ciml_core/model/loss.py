"""CIML loss (paper eq. 8 and 4.2): per segmentor sigmoid Dice + BCE + beta * KL, summed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from monai.losses import DiceLoss
from torch import Tensor, nn

from ciml_core.model.decomposition import TaskDecomposition
from ciml_core.model.interface import CIMLOutput

#: How the (head, region) Dice + BCE terms are weighted (docs/method.md, "Loss weights").
#: "region": every region weighs 1 in total, split equally over the heads that predict it.
#: "head": every head weighs 1, split equally over its regions (the paper's per-segmentor sum;
#: with the BraTS decomposition WT weighs 1.5, TC 2.0 and ET only 0.5).
REGION_WEIGHTINGS = ("region", "head")


def term_weights(heads: TaskDecomposition | Sequence[Sequence[str]],
                 weighting: str) -> list[list[float]]:
    """``weights[head][j]``: the weight of head ``head``'s j-th region's Dice + BCE term.

    ``heads``: the regions of each output head (``CIMLOutput.task_regions``), or a decomposition
    (one head per task). An early-fusion network has a single head over every region."""
    if weighting not in REGION_WEIGHTINGS:
        raise ValueError(f"region weighting must be one of {REGION_WEIGHTINGS}, got {weighting!r}")
    if isinstance(heads, TaskDecomposition):
        heads = [t.regions for t in heads.tasks]
    if weighting == "head":
        return [[1.0 / len(regions)] * len(regions) for regions in heads]
    heads_per_region = Counter(r for regions in heads for r in regions)
    return [[1.0 / heads_per_region[r] for r in regions] for regions in heads]


class CIMLLoss(nn.Module):
    """Weighted sum over (head, region) of ``Dice + BCE-with-logits``, plus ``beta * KL``.

    - Dice: MONAI ``DiceLoss(sigmoid=True, batch=True)`` per region (not a softmax over classes:
      regions overlap). ``batch=True`` pools the voxels of the whole batch per region, as nnU-Net's
      batch Dice, so that a patch without tumour does not give a Dice of ~0 for an otherwise
      perfect prediction.
    - BCE: mean over every voxel of the region.
    - Weights: :func:`term_weights` with ``weighting`` (:data:`REGION_WEIGHTINGS`).
    - KL: the sum over heads of ``output.kl``, each already a mean (batch, channels, voxels,
      messages, levels), so it does not grow with the patch size, the width or K and beta means
      the same thing for every configuration.

    ``targets`` are region masks ``[B, R, *spatial]`` in ``decomposition.regions`` order; each head
    is compared with the channels of the regions it predicts. ``beta`` may be changed between
    steps (the beta ramp of ``ciml_core.train``).
    """

    def __init__(self, decomposition: TaskDecomposition, beta: float = 0.5,
                 weighting: str = "region") -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.regions = decomposition.regions
        self.beta = beta
        self.weighting = weighting
        term_weights(decomposition, weighting)  # refuse an unknown weighting here, not later
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, output: CIMLOutput, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Return (total loss, components) with components ``dice``, ``bce`` (weighted sums),
        ``kl`` (unweighted, summed over heads) and ``total``, as floats for logging."""
        if targets.shape[1] != len(self.regions):
            raise ValueError(
                f"targets have {targets.shape[1]} channels; expected one per region {list(self.regions)}"
            )
        targets = targets.float()
        dice = bce = targets.new_zeros(())
        # From the heads the network has (one per task, or one early-fusion head for DynUNet).
        weights_per_head = term_weights(output.task_regions, self.weighting)
        for logits, regions, weights in zip(output.logits, output.task_regions, weights_per_head,
                                            strict=True):
            # float32: bf16 (autocast) sums over a whole patch would lose the Dice's precision.
            logits = logits.float()
            for j, (region, weight) in enumerate(zip(regions, weights, strict=True)):
                target = targets[:, self.regions.index(region)][:, None]
                dice = dice + weight * self.dice(logits[:, j:j + 1], target)
                bce = bce + weight * self.bce(logits[:, j:j + 1], target)
        kl = output.kl.sum()
        total = dice + bce + self.beta * kl
        # One device sync for all four numbers rather than one per .item().
        values = torch.stack([dice, bce, kl, total]).detach().tolist()
        return total, dict(zip(("dice", "bce", "kl", "total"), values, strict=True))
