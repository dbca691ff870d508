"""The CIML network (paper 3, Fig. 7): T segmentors exchanging their encoder stages as messages."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ciml_core.errors import ConfigError
from ciml_core.model.blocks import init_weights
from ciml_core.model.config import CIML_VARIANTS, ModelConfig
from ciml_core.model.interface import CIMLOutput, check_input
from ciml_core.model.segmentor import Segmentor


class CIMLNetwork(nn.Module):
    """CIML and its Table 5 ablations, chosen by ``config.variant``.

    Segmentor i (``self.segmentors[i]``) reads the channels of ``decomposition.tasks[i].primary``
    and predicts ``tasks[i].regions``. Its CIGs receive the stage outputs of every other
    segmentor, in task order (:meth:`message_sources`). Gradients flow back through the messages
    into the senders' encoders (mutual learning) unless ``config.detach_messages``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.variant not in CIML_VARIANTS:
            raise ConfigError(f"CIMLNetwork builds {CIML_VARIANTS}, not variant {config.variant!r}")
        self.config = config
        decomposition = config.decomposition
        self.input_channels = [
            decomposition.input_channels(i) for i in range(decomposition.num_tasks)
        ]
        self.segmentors = nn.ModuleList(
            Segmentor(
                len(task.primary),
                len(task.regions),
                width=config.width,
                num_messages=decomposition.num_tasks - 1,
                gates=config.gate_switches,
                spatial_dims=config.spatial_dims,
                norm=config.norm,
                dilation=config.dilation,
                message_dropout=config.message_dropout,
            )
            for task in decomposition.tasks
        )
        self.apply(init_weights)

    def message_sources(self, segmentor: int) -> list[int]:
        """Task indices of the senders of messages 0..K-1 received by ``segmentor``."""
        return [j for j in range(len(self.segmentors)) if j != segmentor]

    def forward(self, x: Tensor) -> CIMLOutput:
        """``x[B, M, *spatial]`` (modalities in decomposition order) -> per-segmentor logits and KL."""
        decomposition = self.config.decomposition
        check_input(x, len(decomposition.modalities), self.config.spatial_dims)
        features = [
            segmentor.encoder(x[:, channels])
            for segmentor, channels in zip(self.segmentors, self.input_channels, strict=True)
        ]
        sent = (
            [[f.detach() for f in fs] for fs in features]
            if self.config.detach_messages
            else features
        )
        logits, kls = [], []
        for i, segmentor in enumerate(self.segmentors):
            out, kl = segmentor(features[i], [sent[j] for j in self.message_sources(i)])
            logits.append(out)
            kls.append(kl)
        return CIMLOutput(
            logits=logits,
            task_regions=tuple(task.regions for task in decomposition.tasks),
            kl=torch.stack(kls),
        )
