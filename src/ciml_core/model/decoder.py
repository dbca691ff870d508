"""Predictor path (paper 3.1, Table 1 "Up1..Up4", "Output"): a U-Net decoder with side inputs.

Going up from the bottom (level 4, P/16) to full resolution, each ``UpBlock`` upsamples with a
ConvTranspose k2 s2 (+ Norm + LeakyReLU) and fuses the result with a conv k3 (+ Norm + LeakyReLU)
after concatenating the skip feature of the level it arrives at. Each encoder feature can carry a
*side* input concatenated to it: in a CIML segmentor the side of m_s is the complementary
representation c_s of its CIG (this concatenation is the "residual mechanism" of paper Fig. 12
that puts the local embedding back next to the complementary information).

With side widths (0, C, 2C, 4C, 8C) this is exactly Table 1:

====  ==========================================  =======================================
Up1   ConvT  [m4, c4] 16C -> 8C   (P/16 -> P/8)   conv [up 8C, m3 4C, c3 4C] 16C -> 8C
Up2   ConvT  8C -> 4C             (P/8 -> P/4)    conv [up 4C, m2 2C, c2 2C]  8C -> 4C
Up3   ConvT  4C -> 2C             (P/4 -> P/2)    conv [up 2C, m1 C,  c1 C]   4C -> 2C
Up4   ConvT  2C -> C              (P/2 -> P)      conv [up C, e0 C]           2C -> C
Out   conv k3 C -> O
====  ==========================================  =======================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ciml_core.model.blocks import ConvNormAct, UpConvNormAct, conv_type
from ciml_core.model.encoder import NUM_LEVELS, level_width


class UpBlock(nn.Module):
    """Upsample x2, concatenate the skip (and its side input), fuse with a conv k3."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        *,
        spatial_dims: int,
        norm: str,
    ) -> None:
        super().__init__()
        self.upsample = UpConvNormAct(
            in_channels, out_channels, spatial_dims=spatial_dims, norm=norm
        )
        self.fuse = ConvNormAct(
            out_channels + skip_channels, out_channels, spatial_dims=spatial_dims, norm=norm
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.fuse(torch.cat([self.upsample(x), skip], dim=1))


class Decoder(nn.Module):
    """Predictor path over encoder features ``[e0, m1, m2, m3, m4]`` (see ``MessageGenerator``).

    Args:
        width: base width C of the encoder that produced the features.
        out_channels: O, the number of output logits.
        side_channels: widths of the side inputs concatenated to ``features[0..4]``
            (index 0: next to e0; index s: next to m_s). All zero: a plain U-Net decoder.
    """

    def __init__(
        self,
        width: int,
        out_channels: int,
        *,
        spatial_dims: int,
        norm: str,
        side_channels: Sequence[int] = (0,) * (NUM_LEVELS + 1),
    ) -> None:
        super().__init__()
        if len(side_channels) != NUM_LEVELS + 1:
            raise ValueError(f"side_channels needs {NUM_LEVELS + 1} entries, got {side_channels}")
        self.side_channels = tuple(side_channels)
        feature_widths = [width] + [level_width(width, s) for s in range(1, NUM_LEVELS + 1)]
        in_widths = [f + s for f, s in zip(feature_widths, self.side_channels, strict=True)]
        blocks = []
        channels = in_widths[NUM_LEVELS]
        # Up_j arrives at level NUM_LEVELS - j and keeps the width of the level it leaves (Table 1).
        for level in range(NUM_LEVELS - 1, -1, -1):
            out = feature_widths[level + 1] if level > 0 else width
            blocks.append(
                UpBlock(channels, in_widths[level], out, spatial_dims=spatial_dims, norm=norm)
            )
            channels = out
        self.up = nn.ModuleList(blocks)
        self.head = conv_type(spatial_dims)(width, out_channels, 3, padding=1)

    def forward(
        self, features: Sequence[Tensor], sides: Sequence[Tensor | None] | None = None
    ) -> Tensor:
        """Return logits [B, O, *full-resolution spatial].

        ``sides[s]`` (or None) is concatenated to ``features[s]``; ``sides=None`` means no side input.
        """
        sides = sides if sides is not None else [None] * (NUM_LEVELS + 1)
        inputs = [
            f if s is None else torch.cat([f, s], dim=1)
            for f, s in zip(features, sides, strict=True)
        ]
        x = inputs[NUM_LEVELS]
        for block, level in zip(self.up, range(NUM_LEVELS - 1, -1, -1), strict=True):
            x = block(x, inputs[level])
        return self.head(x)
