"""Message generator (paper 3.1, Table 1 "Encoder"): a segmentor's 4-stage encoder.

Its stage outputs are at the same time the segmentor's U-Net skip features and the messages it
sends to the other segmentors.
"""

from __future__ import annotations

from torch import Tensor, nn

from ciml_core.model.blocks import ConvNormAct

#: Number of encoder stages / decoder levels; the resolution is halved once per stage.
NUM_LEVELS = 4


def level_width(width: int, level: int) -> int:
    """Channels of the stage-``level`` output m_level (level 1..4): C, 2C, 4C, 8C."""
    return width * 2 ** (level - 1)


class EncoderStage(nn.Module):
    """Conv k3 to the stage width, then a dilated conv k3 with stride 2 (half resolution)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, spatial_dims: int, norm: str, dilation: int
    ) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_channels, out_channels, spatial_dims=spatial_dims, norm=norm)
        self.down = ConvNormAct(
            out_channels,
            out_channels,
            spatial_dims=spatial_dims,
            norm=norm,
            stride=2,
            dilation=dilation,
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (full-resolution conv output, downsampled stage output)."""
        same = self.conv(x)
        return same, self.down(same)


class MessageGenerator(nn.Module):
    """Encoder of one segmentor.

    ``forward`` returns a list ``features`` of 5 tensors indexed by level: ``features[0]`` is
    e0, the first conv of stage 1 (full resolution, C channels, used only as the last skip);
    ``features[s]`` for s = 1..4 is m_s, the output of stage s (size P / 2**s, width C * 2**(s-1)).
    """

    def __init__(
        self, in_channels: int, width: int, *, spatial_dims: int, norm: str, dilation: int = 1
    ) -> None:
        super().__init__()
        stages = []
        channels = in_channels
        for level in range(1, NUM_LEVELS + 1):
            out = level_width(width, level)
            stages.append(
                EncoderStage(channels, out, spatial_dims=spatial_dims, norm=norm, dilation=dilation)
            )
            channels = out
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        features: list[Tensor] = []
        for stage in self.stages:
            same, x = stage(x)
            if not features:
                features.append(same)  # e0
            features.append(x)
        return features
