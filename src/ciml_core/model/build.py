"""``build_model``: the one place that maps a :class:`ModelConfig` variant to a network class."""

from __future__ import annotations

from torch import nn

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
