"""Inference with the T segmentors fused into grouped convolutions.

A CIML network runs T segmentors of identical shape side by side. Run one by one, each layer is
T small convolutions; on CPU the small ones (C to 8C channels, batch 1) fall off oneDNN's fast
path and run several times slower per FLOP than one wide convolution. :class:`GroupedCIMLNetwork`
computes the same function with every layer of the T segmentors stacked into one convolution
with ``groups=T``: channels ``[t * w, (t + 1) * w)`` of every tensor belong to segmentor t
("group-major").

It is built from a trained :class:`~ciml_core.model.ciml.CIMLNetwork` for inference only:

- eval semantics: batch norm is folded into the preceding convolution (running statistics),
  instance norm keeps its per-channel affine; the variational CIG uses z = mu, so its sigma
  convolutions and the KL are not computed (``kl`` is returned as zeros);
- segmentors with fewer input channels or regions than the widest one get zero weights for the
  padding channels, so any task decomposition fuses;
- a CIG's K per-message 1x1 convolutions and their sum are one 1x1 convolution over the K
  (gated) messages concatenated.

Its outputs match the unfused network to float rounding (tested to 1e-4). Grad-CAM and training
use the unfused network, whose modules and hooks this class does not have.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ciml_core.errors import ConfigError
from ciml_core.model.blocks import conv_transpose_type, conv_type, make_norm
from ciml_core.model.cig import ComplementaryInformationGate
from ciml_core.model.ciml import CIMLNetwork
from ciml_core.model.interface import CIMLOutput, check_input


def cat_per_group(tensors: Sequence[Tensor], groups: int) -> Tensor:
    """Concatenate group-major tensors group by group: group t of the result is the
    concatenation of group t of each input (what ``torch.cat`` does inside one segmentor)."""
    b, spatial = tensors[0].shape[0], tensors[0].shape[2:]
    parts = [t.reshape(b, groups, -1, *spatial) for t in tensors]
    return torch.cat(parts, dim=2).reshape(b, -1, *spatial)


def _fold_batch_norm(weight: Tensor, bias: Tensor, norm: nn.Module, out_dim: int):
    """Conv weight/bias with an eval-mode batch norm folded in (``out_dim``: the weight's
    output-channel dimension, 0 for conv, 1 for transposed conv)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    return weight * scale.reshape(shape), (bias - norm.running_mean) * scale + norm.bias


class GroupedConvNormAct(nn.Sequential):
    """T stacked ConvNormAct / UpConvNormAct (or bare convs) as one grouped conv (+ norm) + act.

    Args:
        blocks: the T blocks (of one shape), each an ``nn.Sequential(conv, norm, act)`` or a
            bare conv. With one block this is that block with its batch norm folded.
    """

    def __init__(self, blocks: Sequence[nn.Module], spatial_dims: int) -> None:
        convs = [b[0] if isinstance(b, nn.Sequential) else b for b in blocks]
        norms = [b[1] if isinstance(b, nn.Sequential) else None for b in blocks]
        first = convs[0]
        if any(c.weight.shape != first.weight.shape for c in convs):
            raise ValueError("GroupedConvNormAct stacks convolutions of one shape")
        transposed = isinstance(first, (nn.ConvTranspose2d, nn.ConvTranspose3d))
        # Weight layout: conv (out, in, k...), transposed conv (in, out, k...).
        out_dim = 1 if transposed else 0
        in_c, out_c = first.weight.shape[1 - out_dim], first.weight.shape[out_dim]
        weights, biases = [], []
        instance_affine = []
        for conv, norm in zip(convs, norms, strict=True):
            w = conv.weight.detach()
            b = conv.bias.detach() if conv.bias is not None else w.new_zeros(out_c)
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                w, b = _fold_batch_norm(w, b, norm, out_dim)
            elif norm is not None:
                instance_affine.append((norm.weight.detach(), norm.bias.detach()))
            weights.append(w)
            biases.append(b)
        groups = len(blocks)
        if transposed:
            conv = conv_transpose_type(spatial_dims)(
                groups * in_c, groups * out_c, first.kernel_size, stride=first.stride,
                groups=groups)
        else:
            conv = conv_type(spatial_dims)(
                groups * in_c, groups * out_c, first.kernel_size, stride=first.stride,
                padding=first.padding, dilation=first.dilation, groups=groups)
        conv.weight.data.copy_(torch.cat(weights, dim=0))
        conv.bias.data.copy_(torch.cat(biases))
        layers: list[nn.Module] = [conv]
        if instance_affine:
            norm = make_norm("instance", groups * out_c, spatial_dims)
            norm.weight.data.copy_(torch.cat([w for w, _ in instance_affine]))
            norm.bias.data.copy_(torch.cat([b for _, b in instance_affine]))
            layers.append(norm)
        if isinstance(blocks[0], nn.Sequential):
            layers.append(blocks[0][2])  # LeakyReLU or Sigmoid: stateless, shareable
        super().__init__(*layers)


class GroupedGate(nn.Module):
    """The T CIGs of one level (eval semantics): local embeddings [B, T*w] -> c_s [B, T*w]."""

    def __init__(
        self,
        gates: Sequence[ComplementaryInformationGate],
        sources: Sequence[Sequence[int]],
        spatial_dims: int,
    ) -> None:
        super().__init__()
        self.groups = len(gates)
        # Message k of segmentor i is the embedding of segmentor sources[i][k].
        self.register_buffer(
            "message_index", torch.tensor([j for s in sources for j in s]), persistent=False)
        self.register_buffer(
            "pooled_index", torch.tensor([x for i, s in enumerate(sources) for x in (i, *s)]),
            persistent=False)
        if gates[0].attention is not None:
            self.hidden = GroupedConvNormAct([g.attention.hidden for g in gates], spatial_dims)
            self.gate = GroupedConvNormAct([g.attention.gate for g in gates], spatial_dims)
        else:
            self.hidden = self.gate = None
        # sum_k mu_k(message_k) is one 1x1 conv over the concatenated messages.
        summed = []
        for g in gates:
            conv = conv_type(spatial_dims)(
                g.num_messages * g.mu[0].in_channels, g.mu[0].out_channels, 1,
                bias=g.mu[0].bias is not None)
            conv.weight.data.copy_(torch.cat([m.weight.detach() for m in g.mu], dim=1))
            if conv.bias is not None:
                conv.bias.data.copy_(sum(m.bias.detach() for m in g.mu))
            # "+Message": Norm + sigmoid after the sum (see ComplementaryInformationGate).
            summed.append(nn.Sequential(conv, g.fusion[0], g.fusion[1]) if g.fusion else conv)
        self.project = GroupedConvNormAct(summed, spatial_dims)

    def forward(self, local: Tensor) -> Tensor:
        b, spatial = local.shape[0], local.shape[2:]
        per_segmentor = local.reshape(b, self.groups, -1, *spatial)
        messages = per_segmentor[:, self.message_index]  # [B, T*K, w, *spatial]
        if self.gate is not None:
            means = per_segmentor.mean(dim=2)  # [B, T, *spatial]
            gates = self.gate(self.hidden(means[:, self.pooled_index]))  # [B, T*K, *spatial]
            messages = messages * gates.unsqueeze(2)
        return self.project(messages.reshape(b, -1, *spatial))


class GroupedCIMLNetwork(nn.Module):
    """A :class:`CIMLNetwork` for inference with its segmentors fused (see the module docstring).

    Layers at full resolution (the first encoder stage, the last up-block and the output conv)
    stay one per segmentor: there, oneDNN runs T narrow convolutions faster than one grouped
    convolution (``benchmarks/speed.py --layers``), while from P/2 down the grouped ones win.

    Build with :meth:`from_network`; the forward returns the same :class:`CIMLOutput` (per-task
    logits in task order), with ``kl`` all zeros.
    """

    def __init__(self, network: CIMLNetwork) -> None:
        super().__init__()
        if not isinstance(network, CIMLNetwork):
            raise ConfigError(
                f"GroupedCIMLNetwork fuses a CIMLNetwork, not {type(network).__name__}")
        self.config = network.config
        self.input_channels = network.input_channels
        dims = self.config.spatial_dims
        segmentors = list(network.segmentors)
        self.groups = len(segmentors)

        def per_segmentor(pick) -> nn.ModuleList:
            return nn.ModuleList(GroupedConvNormAct([pick(s)], dims) for s in segmentors)

        def grouped(pick) -> GroupedConvNormAct:
            return GroupedConvNormAct([pick(s) for s in segmentors], dims)

        stages = range(len(segmentors[0].encoder.stages))
        self.first_conv = per_segmentor(lambda s: s.encoder.stages[0].conv)
        self.first_down = per_segmentor(lambda s: s.encoder.stages[0].down)
        self.stages = nn.ModuleList(
            nn.ModuleList([grouped(lambda s, i=i: s.encoder.stages[i].conv),
                           grouped(lambda s, i=i: s.encoder.stages[i].down)])
            for i in stages[1:]
        )
        if segmentors[0].gates is None:  # "baseline": no CIG
            self.gates = None
        else:
            sources = [network.message_sources(i) for i in range(self.groups)]
            self.gates = nn.ModuleList(
                GroupedGate([s.gates[level] for s in segmentors], sources, dims)
                for level in range(len(segmentors[0].gates))
            )
        ups = range(len(segmentors[0].decoder.up))
        self.up = nn.ModuleList(
            nn.ModuleList([grouped(lambda s, j=j: s.decoder.up[j].upsample),
                           grouped(lambda s, j=j: s.decoder.up[j].fuse)])
            for j in ups[:-1]
        )
        self.last_upsample = per_segmentor(lambda s: s.decoder.up[-1].upsample)
        self.last_fuse = per_segmentor(lambda s: s.decoder.up[-1].fuse)
        self.head = per_segmentor(lambda s: s.decoder.head)
        self.eval()

    @classmethod
    def from_network(cls, network: CIMLNetwork) -> GroupedCIMLNetwork:
        """Fuse ``network`` (its current weights and running statistics) on its device."""
        device = next(network.parameters()).device
        with torch.no_grad():
            return cls(network).to(device)

    def forward(self, x: Tensor) -> CIMLOutput:
        decomposition = self.config.decomposition
        check_input(x, len(decomposition.modalities), self.config.spatial_dims)
        # Full resolution, one segmentor at a time.
        e0 = [conv(x[:, channels]) for conv, channels in
              zip(self.first_conv, self.input_channels, strict=True)]
        h = torch.cat([down(e) for down, e in zip(self.first_down, e0, strict=True)], dim=1)
        # P/2 and below, all segmentors at once (group-major channels).
        features = [h]
        for conv, down in self.stages:
            h = down(conv(h))
            features.append(h)  # features[s - 1] is m_s
        inputs = list(features)
        if self.gates is not None:
            inputs = [cat_per_group([f, gate(f)], self.groups)
                      for f, gate in zip(features, self.gates, strict=True)]
        y = inputs[-1]
        for (upsample, fuse), skip in zip(self.up, reversed(inputs[:-1]), strict=True):
            y = fuse(cat_per_group([upsample(y), skip], self.groups))
        logits = [
            head(fuse(torch.cat([upsample(part), skip], dim=1)))
            for part, skip, upsample, fuse, head in zip(
                y.chunk(self.groups, dim=1), e0, self.last_upsample, self.last_fuse, self.head,
                strict=True)
        ]
        return CIMLOutput(
            logits=logits,
            task_regions=tuple(task.regions for task in decomposition.tasks),
            kl=x.new_zeros(self.groups, dtype=torch.float32),
        )
