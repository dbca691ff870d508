"""ShapeComposition network (paper 4.3): complementary information made visible.

The demonstration task: the primary image holds a triangle, the auxiliary image an ellipse, the
target is their union. A simplified two-encoder network shows what the variational bottleneck
keeps from the auxiliary modality:

- path 1 (complementary path): a plain U-Net decoder (no CIG) over the primary features, *detached*
  so that this path cannot shape the primary encoder, with the auxiliary features concatenated at
  every level; its head gives mu and sigma of a complementary map the size of the image, sampled
  with the reparameterisation trick and pulled towards N(0, 1) by the KL;
- path 2 (predictor): a U-Net decoder over the primary features with the complementary map
  concatenated at full resolution, predicting the union.

With the KL pushing out everything the predictor can already get from the primary image, the map
should show the part of the ellipse outside the triangle (paper Fig. 13, fifth column).
"""

from __future__ import annotations

from torch import Tensor, nn

from ciml_core.errors import ConfigError
from ciml_core.model.blocks import init_weights
from ciml_core.model.cig import reparameterise
from ciml_core.model.config import ModelConfig
from ciml_core.model.decoder import Decoder
from ciml_core.model.encoder import NUM_LEVELS, MessageGenerator, level_width
from ciml_core.model.interface import CIMLOutput, check_input


class ShapeCompositionNet(nn.Module):
    """Primary + auxiliary encoders, a complementary path and a predictor path.

    The single task's primary modalities feed the primary encoder; every other modality of the
    decomposition feeds the auxiliary encoder. ``complementary_tap`` (an ``nn.Identity``) sees the
    sampled complementary map, for hooks.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.variant != "shapecomposition":
            raise ConfigError(
                f"ShapeCompositionNet builds variant 'shapecomposition', not {config.variant!r}"
            )
        self.config = config
        decomposition = config.decomposition
        self.primary_channels = decomposition.input_channels(0)
        self.auxiliary_channels = [
            decomposition.modality_index(m) for m in decomposition.unused_modalities()
        ]
        width, n = config.width, config.complementary_channels
        dims = {"spatial_dims": config.spatial_dims, "norm": config.norm}
        self.primary_encoder = MessageGenerator(
            len(self.primary_channels), width, dilation=config.dilation, **dims
        )
        self.auxiliary_encoder = MessageGenerator(
            len(self.auxiliary_channels), width, dilation=config.dilation, **dims
        )
        # The auxiliary features (e0, m1..m4) ride as side inputs next to the primary ones.
        auxiliary_widths = (width, *(level_width(width, s) for s in range(1, NUM_LEVELS + 1)))
        self.complementary_decoder = Decoder(width, 2 * n, side_channels=auxiliary_widths, **dims)
        self.complementary_tap = nn.Identity()
        self.predictor = Decoder(
            width,
            len(decomposition.tasks[0].regions),
            side_channels=(n,) + (0,) * NUM_LEVELS,
            **dims,
        )
        self.apply(init_weights)

    def forward(self, x: Tensor) -> CIMLOutput:
        decomposition = self.config.decomposition
        check_input(x, len(decomposition.modalities), self.config.spatial_dims)
        primary = self.primary_encoder(x[:, self.primary_channels])
        auxiliary = self.auxiliary_encoder(x[:, self.auxiliary_channels])
        mu, sigma_logit = self.complementary_decoder(
            [f.detach() for f in primary], auxiliary
        ).chunk(2, dim=1)
        complementary, kl = reparameterise(mu, sigma_logit, sample=self.training)
        complementary = self.complementary_tap(complementary)
        logits = self.predictor(primary, [complementary] + [None] * NUM_LEVELS)
        return CIMLOutput(
            logits=[logits],
            task_regions=(decomposition.tasks[0].regions,),
            kl=kl.reshape(1),
            complementary=complementary,
        )
