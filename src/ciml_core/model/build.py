"""``build_model``: the one place that maps a :class:`ModelConfig` variant to a network class."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ciml_core.errors import ConfigError
from ciml_core.model.ciml import CIMLNetwork
from ciml_core.model.config import CIML_VARIANTS, ModelConfig
from ciml_core.model.dynunet import EarlyFusionDynUNet
from ciml_core.model.shape_composition import ShapeCompositionNet


def build_model(config: ModelConfig) -> nn.Module:
    """The network of ``config.variant``; every one returns a ``CIMLOutput``."""
    if config.variant in CIML_VARIANTS:
        return CIMLNetwork(config)
    if config.variant == "dynunet":
        return EarlyFusionDynUNet(config)
    if config.variant == "shapecomposition":
        return ShapeCompositionNet(config)
    raise ConfigError(f"build_model: no network for variant {config.variant!r}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def window_flops(config: ModelConfig, batch: int = 1) -> int:
    """FLOPs of one forward pass over ``batch`` windows of ``config.patch_size``
    (``torch.utils.flop_counter``, eval mode, random weights)."""
    model = build_model(config).eval()
    x = torch.zeros(batch, len(config.decomposition.modalities), *config.patch_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def flop_matched_width(target: ModelConfig, variant: str, norm: str | None = None) -> int:
    """The base width at which ``variant`` (same decomposition, ``norm`` or the target's) costs
    the FLOPs per window closest to ``target``'s.

    Counted on 32-voxel windows: both networks are fully convolutional, so their FLOPs grow with
    the voxel count alike and the ratio does not depend on the patch.
    """
    small = (32,) * target.spatial_dims
    goal = window_flops(dataclasses.replace(target, patch_size=small))

    best, best_gap = 1, None
    for width in range(1, 4 * target.width + 1):
        candidate = dataclasses.replace(target, variant=variant, width=width, patch_size=small,
                                        norm=norm or target.norm)
        flops = window_flops(candidate)
        if best_gap is None or abs(flops - goal) < best_gap:
            best, best_gap = width, abs(flops - goal)
        if flops > goal:  # FLOPs grow with the width: nothing wider comes closer
            break
    return best
