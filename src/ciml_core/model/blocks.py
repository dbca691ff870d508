"""Layer helpers shared by every network: dimension-agnostic conv / norm picks and ConvNormAct."""

from __future__ import annotations

from torch import nn

from ciml_core.errors import ConfigError

NORMS = ("batch", "instance")
#: Negative slope of every LeakyReLU (paper 4.2).
LEAKY_SLOPE = 0.01


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    _check_dims(spatial_dims)
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def conv_transpose_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    _check_dims(spatial_dims)
    return nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d


def make_norm(norm: str, channels: int, spatial_dims: int) -> nn.Module:
    """Batch norm, or instance norm with learnable affine parameters (as nnU-Net)."""
    _check_dims(spatial_dims)
    if norm == "batch":
        return (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(channels)
    if norm == "instance":
        return (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(
            channels, affine=True
        )
    raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}")


class ConvNormAct(nn.Sequential):
    """Conv (k, stride, dilation; 'same'-style padding) -> Norm -> LeakyReLU(0.01).

    ``padding = dilation * (kernel_size // 2)`` keeps the size at stride 1 and gives exactly
    ``size / 2`` at stride 2 for even sizes, whatever the dilation. The conv has no bias: the
    norm that follows would cancel it. ``activation`` may replace the LeakyReLU (the attention
    gate ends in a sigmoid).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        spatial_dims: int,
        norm: str,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        activation: nn.Module | None = None,
    ) -> None:
        conv = conv_type(spatial_dims)(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            bias=False,
        )
        act = activation if activation is not None else nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        super().__init__(conv, make_norm(norm, out_channels, spatial_dims), act)


class UpConvNormAct(nn.Sequential):
    """ConvTranspose (k2, s2: exactly doubles the size) -> Norm -> LeakyReLU(0.01)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, spatial_dims: int, norm: str
    ) -> None:
        up = conv_transpose_type(spatial_dims)(in_channels, out_channels, 2, stride=2, bias=False)
        super().__init__(
            up, make_norm(norm, out_channels, spatial_dims), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        )


def init_weights(module: nn.Module) -> None:
    """nnU-Net's He initialisation (a = 0.01, the LeakyReLU slope); biases to zero.

    Use with ``model.apply(init_weights)``.
    """
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
