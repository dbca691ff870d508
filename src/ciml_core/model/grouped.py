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
- the only layers whose shapes differ between segmentors (the first conv: input channels; the
  output conv: regions) are at full resolution, which runs per segmentor, so any task
  decomposition fuses;
- a CIG's K per-message 1x1 convolutions and their sum are one 1x1 convolution over the K
  (gated) messages concatenated.

Its outputs match the unfused network to float rounding (tested to 1e-4). Grad-CAM uses the
unfused network, whose modules and hooks this class does not have. Training has its own fusion,
``ciml_core.model.fused.FusedTrainingCIML``, which shares the network's parameters instead of
copying them; both run the layout of :class:`FusedLayout`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ciml_core.errors import ConfigError
from ciml_core.model.blocks import conv_transpose_type, conv_type, make_norm
from ciml_core.model.cig import ComplementaryInformationGate
from ciml_core.model.ciml import CIMLNetwork
from ciml_core.model.interface import CIMLOutput, check_input
from ciml_core.model.segmentor import Segmentor


def is_channels_last(t: Tensor) -> bool:
    """Whether ``t`` (4-D or 5-D) is stored channels-last and not also channels-first (as a
    tensor with one channel or one voxel is)."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return layout is not None and not t.is_contiguous() and t.is_contiguous(memory_format=layout)


def cat_per_group(tensors: Sequence[Tensor], groups: int) -> Tensor:
    """Concatenate group-major tensors group by group: group t of the result is the
    concatenation of group t of each input (what ``torch.cat`` does inside one segmentor).

    Channels-last inputs give a channels-last result (concatenated along the innermost axis
    of their storage, with no reordering copy)."""
    if all(is_channels_last(t) for t in tensors):
        parts = [t.movedim(1, -1).unflatten(-1, (groups, -1)) for t in tensors]
        return torch.cat(parts, dim=-1).flatten(-2).movedim(-1, 1)
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


class RoutedGates(nn.Module):
    """Base of the T CIGs of one level run at once: routes the messages and gates them.

    Message k of segmentor i is the level's embedding of segmentor ``sources[i][k]``. Subclasses
    set ``hidden`` and ``gate`` (the attention's two layers over all groups, or None without
    attention) and implement ``forward(local, noise) -> (c_s, kl)``.
    """

    hidden: nn.Module | None
    gate: nn.Module | None

    def __init__(self, sources: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.groups = len(sources)
        self.register_buffer(
            "message_index", torch.tensor([j for s in sources for j in s]), persistent=False)
        # Into torch.cat([local means, sent means]): group i's pooled maps are its own mean and
        # the means of what it receives (which, with detached messages, carry no gradient).
        self.register_buffer(
            "pooled_index",
            torch.tensor([x for i, s in enumerate(sources) for x in (i, *(self.groups + j
                                                                         for j in s))]),
            persistent=False)

    def gated_messages(self, local: Tensor, detach: bool = False) -> Tensor:
        """Group-major embeddings ``[B, T*w, *spatial]`` -> the (gated) messages of every
        segmentor concatenated, ``[B, T*K*w, *spatial]`` (message k of segmentor i in channels
        ``[(i*K + k) * w, (i*K + k + 1) * w)``); ``detach`` stops gradients at the messages.

        A channels-last ``local`` is handled in its storage order (channels innermost), so that
        the result is channels-last too and no copy reorders it."""
        channels_last = is_channels_last(local)
        view = local.movedim(1, -1) if channels_last else local
        axis = view.dim() - 1 if channels_last else 1  # the channel axis of ``view``
        per_segmentor = view.unflatten(axis, (self.groups, -1))  # segmentor at axis, w next
        sent = per_segmentor.detach() if detach else per_segmentor
        messages = sent.index_select(axis, self.message_index)
        if self.gate is not None:
            means = per_segmentor.mean(dim=axis + 1)  # one map per segmentor
            pooled = torch.cat([means, means.detach() if detach else means], dim=axis)
            pooled = pooled.index_select(axis, self.pooled_index)
            gates = self.gate(self.hidden(pooled.movedim(-1, 1) if channels_last else pooled))
            # gates: [B, T*K, *spatial], gate k of segmentor i multiplies its message k.
            messages = messages * (gates.movedim(1, -1) if channels_last else gates).unsqueeze(
                axis + 1)
        messages = messages.flatten(axis, axis + 1)
        return messages.movedim(-1, 1) if channels_last else messages


class GroupedGate(RoutedGates):
    """The T CIGs of one level (eval semantics): local embeddings [B, T*w] -> c_s [B, T*w]."""

    def __init__(
        self,
        gates: Sequence[ComplementaryInformationGate],
        sources: Sequence[Sequence[int]],
        spatial_dims: int,
    ) -> None:
        super().__init__(sources)
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

    def forward(self, local: Tensor, noise: Tensor | None = None) -> tuple[Tensor, None]:
        """Return (c_s, None): z = mu, so no noise is used and no KL computed."""
        return self.project(self.gated_messages(local)), None


class FusedLayout(nn.Module):
    """The layer layout and forward shared by both fusions of a :class:`CIMLNetwork`.

    Layers at full resolution (the first encoder stage, the last up-block and the output conv)
    run one per segmentor; from P/2 down all T segmentors run as one layer on group-major
    tensors. :meth:`build_layout` takes how to make each kind of layer: :class:`GroupedCIMLNetwork`
    makes eval-mode copies with batch norm folded; ``ciml_core.model.fused.FusedTrainingCIML``
    makes layers that share the network's parameters.
    """

    def build_layout(
        self,
        network: CIMLNetwork,
        *,
        separate: Callable[[list[nn.Module]], Sequence[nn.Module]],
        grouped: Callable[[list[nn.Module]], nn.Module],
        gate: Callable[[list[ComplementaryInformationGate], list[list[int]]], RoutedGates],
    ) -> None:
        """Set the layers. ``separate(blocks)``: the T blocks as T callables; ``grouped(blocks)``:
        the T blocks as one layer over group-major channels; ``gate(gates, sources)``: one
        level's T CIGs."""
        if not isinstance(network, CIMLNetwork):
            raise ConfigError(
                f"{type(self).__name__} fuses a CIMLNetwork, not {type(network).__name__}")
        self.config = network.config
        self.input_channels = network.input_channels
        segmentors = list(network.segmentors)
        self.groups = len(segmentors)

        def per_segmentor(pick: Callable[[Segmentor], nn.Module]) -> Sequence[nn.Module]:
            return separate([pick(s) for s in segmentors])

        def all_segmentors(pick: Callable[[Segmentor], nn.Module]) -> nn.Module:
            return grouped([pick(s) for s in segmentors])

        stages = range(len(segmentors[0].encoder.stages))
        self.first_conv = per_segmentor(lambda s: s.encoder.stages[0].conv)
        self.first_down = per_segmentor(lambda s: s.encoder.stages[0].down)
        self.stages = nn.ModuleList(
            nn.ModuleList([all_segmentors(lambda s, i=i: s.encoder.stages[i].conv),
                           all_segmentors(lambda s, i=i: s.encoder.stages[i].down)])
            for i in stages[1:]
        )
        if segmentors[0].gates is None:  # "baseline": no CIG
            self.gates = None
        else:
            sources = [network.message_sources(i) for i in range(self.groups)]
            self.gates = nn.ModuleList(
                gate([s.gates[level] for s in segmentors], sources)
                for level in range(len(segmentors[0].gates))
            )
        ups = range(len(segmentors[0].decoder.up))
        self.up = nn.ModuleList(
            nn.ModuleList([all_segmentors(lambda s, j=j: s.decoder.up[j].upsample),
                           all_segmentors(lambda s, j=j: s.decoder.up[j].fuse)])
            for j in ups[:-1]
        )
        self.last_upsample = per_segmentor(lambda s: s.decoder.up[-1].upsample)
        self.last_fuse = per_segmentor(lambda s: s.decoder.up[-1].fuse)
        self.head = per_segmentor(lambda s: s.decoder.head)

    def run_layout(
        self,
        x: Tensor,
        noise: Sequence[Tensor | None] | None = None,
        keep: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Return (per-task logits, per-level KL ``[T]`` of the gates that compute one).

        Args:
            noise: per CIG level, the eps of every (segmentor, message) or None (passed to
                the level's gate).
            keep: ``[B, T]``, multiplies each segmentor's c_s at every level (message
                dropout, ``messages_off``); None keeps them all.
        """
        # Full resolution, one segmentor at a time.
        e0 = [conv(x[:, channels]) for conv, channels in
              zip(self.first_conv, self.input_channels, strict=True)]
        h = torch.cat([down(e) for down, e in zip(self.first_down, e0, strict=True)], dim=1)
        # P/2 and below, all segmentors at once (group-major channels).
        features = [h]
        for conv, down in self.stages:
            h = down(conv(h))
            features.append(h)  # features[s - 1] is m_s
        inputs, kls = list(features), []
        if self.gates is not None:
            inputs = []
            for level, (f, gate) in enumerate(zip(features, self.gates, strict=True)):
                side, kl = gate(f, None if noise is None else noise[level])
                if keep is not None:
                    mask = keep.to(side.dtype).view(*keep.shape, *(1,) * (side.dim() - 1))
                    side = (side.unflatten(1, (self.groups, -1)) * mask).flatten(1, 2)
                if kl is not None:
                    kls.append(kl)
                inputs.append(cat_per_group([f, side], self.groups))
        y = inputs[-1]
        for (upsample, fuse), skip in zip(self.up, reversed(inputs[:-1]), strict=True):
            y = fuse(cat_per_group([upsample(y), skip], self.groups))
        logits = [
            head(fuse(torch.cat([upsample(part), skip], dim=1)))
            for part, skip, upsample, fuse, head in zip(
                y.chunk(self.groups, dim=1), e0, self.last_upsample, self.last_fuse, self.head,
                strict=True)
        ]
        return logits, kls


class GroupedCIMLNetwork(FusedLayout):
    """A :class:`CIMLNetwork` for inference with its segmentors fused (see the module docstring).

    Layers at full resolution (the first encoder stage, the last up-block and the output conv)
    stay one per segmentor: there, oneDNN runs T narrow convolutions faster than one grouped
    convolution (``benchmarks/speed.py --layers``), while from P/2 down the grouped ones win.

    Build with :meth:`from_network`; the forward returns the same :class:`CIMLOutput` (per-task
    logits in task order), with ``kl`` all zeros.
    """

    def __init__(self, network: CIMLNetwork) -> None:
        super().__init__()
        # build_layout checks the network's type before it calls these.
        def dims() -> int:
            return network.config.spatial_dims

        self.build_layout(
            network,
            separate=lambda blocks: nn.ModuleList(GroupedConvNormAct([b], dims()) for b in blocks),
            grouped=lambda blocks: GroupedConvNormAct(blocks, dims()),
            gate=lambda gates, sources: GroupedGate(gates, sources, dims()),
        )
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
        logits, _ = self.run_layout(x)
        return CIMLOutput(
            logits=logits,
            task_regions=tuple(task.regions for task in decomposition.tasks),
            kl=x.new_zeros(self.groups, dtype=torch.float32),
        )
