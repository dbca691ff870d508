"""Early-fusion comparison network: MONAI's nnU-Net-like ``DynUNet`` behind the CIML interface."""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet
from torch import Tensor, nn

from ciml_core.errors import ConfigError
from ciml_core.model.config import ModelConfig
from ciml_core.model.encoder import NUM_LEVELS
from ciml_core.model.interface import CIMLOutput, check_input

#: DynUNet widths per resolution level, in units of the CIML base width C. At the default C = 16
#: this is exactly nnU-Net's plan for a 64^3 patch (32, 64, 128, 256, 320; 4 downsamplings), and
#: it scales with C like CIML does. It has ~1.6x the parameters of the 4-segmentor CIML
#: (docs/method.md), so the comparison does not favour CIML by size.
FILTER_MULTIPLIERS = (2, 4, 8, 16, 20)


class EarlyFusionDynUNet(nn.Module):
    """All modalities stacked as input channels, all regions as sigmoid outputs (one "task").

    nnU-Net-like settings: kernel 3 everywhere, strides (1, 2, 2, 2, 2) so the depth and the
    P % 16 requirement match CIML's, LeakyReLU(0.01), no residual blocks, no deep supervision.
    The norm follows ``config.norm`` (nnU-Net itself uses "instance").
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.variant != "dynunet":
            raise ConfigError(
                f"EarlyFusionDynUNet builds variant 'dynunet', not {config.variant!r}"
            )
        self.config = config
        decomposition = config.decomposition
        strides = (1,) + (2,) * NUM_LEVELS
        norm_name = ("INSTANCE", {"affine": True}) if config.norm == "instance" else ("BATCH", {})
        self.net = DynUNet(
            spatial_dims=config.spatial_dims,
            in_channels=len(decomposition.modalities),
            out_channels=len(decomposition.regions),
            kernel_size=(3,) * len(strides),
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=[m * config.width for m in FILTER_MULTIPLIERS],
            norm_name=norm_name,
            deep_supervision=False,
            res_block=False,
        )

    def forward(self, x: Tensor) -> CIMLOutput:
        decomposition = self.config.decomposition
        check_input(x, len(decomposition.modalities), self.config.spatial_dims)
        return CIMLOutput(
            logits=[self.net(x)],
            task_regions=(decomposition.regions,),
            kl=x.new_zeros(1, dtype=torch.float32),
        )
