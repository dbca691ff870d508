"""CIML loss (paper eq. 8 and 4.2): per segmentor sigmoid Dice + BCE + beta * KL, summed."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import Tensor, nn

from ciml_core.model.decomposition import TaskDecomposition
from ciml_core.model.interface import CIMLOutput


class CIMLLoss(nn.Module):
    """Sum over output heads of ``Dice + BCE-with-logits + beta * KL``.

    - Dice: MONAI ``DiceLoss(sigmoid=True, batch=True)``, one Dice per region (not a softmax over
      classes: regions overlap), averaged over the head's regions. ``batch=True`` pools the voxels
      of the whole batch per region, as nnU-Net's batch Dice, so that a patch without tumour does
      not give a Dice of ~0 for an otherwise perfect prediction.
    - BCE: mean over every voxel of every region of the head.
    - KL: the head's ``output.kl`` entry, already a mean (batch, channels, voxels, messages,
      levels), so it does not grow with the patch size, the width or K and beta means the same
      thing for every configuration.

    ``targets`` are region masks ``[B, R, *spatial]`` in ``decomposition.regions`` order; each head
    is compared with the channels of the regions it predicts.
    """

    def __init__(self, decomposition: TaskDecomposition, beta: float = 0.5) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.regions = decomposition.regions
        self.beta = beta
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, output: CIMLOutput, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Return (total loss, components) with components ``dice``, ``bce``, ``kl`` (unweighted,
        summed over heads) and ``total``, as floats for logging."""
        if targets.shape[1] != len(self.regions):
            raise ValueError(
                f"targets have {targets.shape[1]} channels; expected one per region {list(self.regions)}"
            )
        targets = targets.float()
        dice = bce = targets.new_zeros(())
        for logits, regions in zip(output.logits, output.task_regions, strict=True):
            target = targets[:, [self.regions.index(r) for r in regions]]
            # float32: bf16 (autocast) sums over a whole patch would lose the Dice's precision.
            logits = logits.float()
            dice = dice + self.dice(logits, target)
            bce = bce + self.bce(logits, target)
        kl = output.kl.sum()
        total = dice + bce + self.beta * kl
        # One device sync for all four numbers rather than one per .item().
        values = torch.stack([dice, bce, kl, total]).detach().tolist()
        return total, dict(zip(("dice", "bce", "kl", "total"), values, strict=True))
