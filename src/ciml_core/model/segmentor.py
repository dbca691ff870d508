"""A CIML segmentor (paper 3.1, Fig. 8-9): message generator + CIGs + predictor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ciml_core.model.cig import ComplementaryInformationGate
from ciml_core.model.config import GateSwitches
from ciml_core.model.decoder import Decoder
from ciml_core.model.encoder import NUM_LEVELS, MessageGenerator, level_width


class Segmentor(nn.Module):
    """One sub-task's network.

    The encoder runs first for every segmentor (``CIMLNetwork`` needs all messages before any
    decoder), so ``forward`` takes this segmentor's encoder ``features`` and the ``messages`` of
    the others rather than the image.

    Args:
        in_channels: number of primary modalities.
        out_channels: number of regions predicted.
        num_messages: K; ignored when ``gates`` is None.
        gates: CIG switches, or None for the "baseline" ablation: no CIG, no c_s, so the decoder's
            fuse convs are narrower (Table 1 widths minus the c_s channels).
        message_dropout: in training, the probability that a sample's complementary
            representations (c_s at every level) are replaced by zeros, so that the segmentor
            must also predict from its own modality alone (docs/method.md, "Message dropout").
            No effect in eval mode; no rescaling (eval sees c_s as training does when kept).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        width: int,
        num_messages: int,
        gates: GateSwitches | None,
        spatial_dims: int,
        norm: str,
        dilation: int = 1,
        message_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.message_dropout = message_dropout
        #: Analysis switch (``ciml_core.reliance``): run with every c_s replaced by zeros.
        self.messages_off = False
        dims = {"spatial_dims": spatial_dims, "norm": norm}
        self.encoder = MessageGenerator(in_channels, width, dilation=dilation, **dims)
        levels = range(1, NUM_LEVELS + 1)
        if gates is None:
            self.gates = None
            side_channels = (0,) * (NUM_LEVELS + 1)
        else:
            # gates[s - 1] is the CIG of level s.
            self.gates = nn.ModuleList(
                ComplementaryInformationGate(
                    level_width(width, s), num_messages, **gates._asdict(), **dims
                )
                for s in levels
            )
            side_channels = (0, *(level_width(width, s) for s in levels))
        self.decoder = Decoder(width, out_channels, side_channels=side_channels, **dims)

    def forward(
        self, features: Sequence[Tensor], messages: Sequence[Sequence[Tensor]] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return (logits, KL averaged over the 4 levels).

        Args:
            features: this segmentor's ``encoder`` output ``[e0, m1, m2, m3, m4]``.
            messages: ``messages[k]`` is the k-th other segmentor's ``[e0, m1, ..., m4]``
                (e0 is not used as a message); ignored in the baseline.
        """
        if self.gates is None:
            return self.decoder(features), features[0].new_zeros((), dtype=torch.float32)
        sides: list[Tensor | None] = [None]
        kl = features[0].new_zeros((), dtype=torch.float32)
        for level, gate in enumerate(self.gates, start=1):
            complementary, level_kl = gate(features[level], [m[level] for m in messages])
            sides.append(complementary)
            kl = kl + level_kl
        if self.messages_off:
            sides = [None] + [torch.zeros_like(side) for side in sides[1:]]
        elif self.training and self.message_dropout > 0:
            batch = features[0].shape[0]
            keep = torch.rand(batch, device=features[0].device) >= self.message_dropout
            sides = [None] + [
                side * keep.view(-1, *(1,) * (side.dim() - 1)).to(side.dtype) for side in sides[1:]
            ]
        return self.decoder(features, sides), kl / NUM_LEVELS
