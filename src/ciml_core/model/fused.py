"""Training with the T segmentors fused into grouped convolutions, on the network's own parameters.

:class:`~ciml_core.model.grouped.GroupedCIMLNetwork` fuses a trained network for inference from
copies of its weights (batch norm folded, z = mu). :class:`FusedTrainingCIML` runs the same layout
(:class:`~ciml_core.model.grouped.FusedLayout`: full resolution per segmentor, everything from
P/2 down as ``groups=T`` layers over group-major channels) with training semantics:

- no copies: each forward concatenates the segmentors' current conv weights (``torch.cat``), so
  gradients flow back to the :class:`CIMLNetwork`'s own parameters, the optimiser, the
  checkpoint and ``state_dict`` stay the network's (the wrapper registers the network's
  ``segmentors`` and nothing else that has state, so its ``state_dict`` keys are the network's);
- batch norm over T*w channels is per-channel batch norm of every segmentor at once; the
  statistics are computed on concatenated running buffers and copied back into each
  segmentor's own batch norm after the step (same momentum, same ``num_batches_tracked``);
  instance norm is per channel and per sample anyway;
- the variational CIG computes mu_k and sigma_k of every (segmentor, message) in one 1x1 conv
  with ``groups=T*K``, samples z = mu + sigma * eps and returns the KL; the eps (and the message
  dropout draws) are drawn before the forward in the order and shapes the unfused network draws
  them, so that the same seed gives the same numbers and both networks can be compared exactly;
- every CIML variant (``GATE_SWITCHES`` and "baseline"), ``detach_messages``, message dropout and
  the ``messages_off`` switch, any task decomposition, 2-D and 3-D.

Train/eval follow the wrapped network's modules (``fused.train()`` sets them): a CIG samples
when it is in training mode, message dropout applies when its segmentor is, batch norm uses
batch statistics when it is. Forward hooks on the network's inner modules (Grad-CAM's
``representation_taps``) do not fire in the fused forward; explain with the network itself.

Why at all: with batch 2 the unfused training step runs every layer as T narrow convolutions
(C to 8C channels); oneDNN's backward for those is far from its peak (docs/performance.md,
"Fused training").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ciml_core.errors import ConfigError
from ciml_core.model.cig import SIGMA_FLOOR, ComplementaryInformationGate, kl_to_standard_normal
from ciml_core.model.ciml import CIMLNetwork
from ciml_core.model.encoder import NUM_LEVELS
from ciml_core.model.grouped import FusedLayout, RoutedGates
from ciml_core.model.interface import CIMLOutput, check_input

_CONV_FUNCTIONS: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}
_TRANSPOSED_FUNCTIONS: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}


class SharedGroupedNorm(nn.Module):
    """T norm layers of one width applied at once to group-major channels ``[B, T*w, ...]``.

    Holds references to the T modules (not registered: their parameters and buffers belong to
    the network) and uses their current affine parameters and running statistics.
    """

    def __init__(self, norms: Sequence[nn.Module]) -> None:
        super().__init__()
        first = norms[0]
        batch = isinstance(first, nn.modules.batchnorm._BatchNorm)
        if not batch and not isinstance(first, nn.modules.instancenorm._InstanceNorm):
            raise ConfigError(f"cannot fuse a {type(first).__name__} for training")
        if any(type(n) is not type(first) or n.num_features != first.num_features
               or n.eps != first.eps or n.affine != first.affine for n in norms):
            raise ConfigError("the T norms of a fused layer must be alike")
        if not batch and first.track_running_stats:
            raise ConfigError("instance norm with running statistics is not fused for training")
        self._norms = tuple(norms)
        self.batch = batch

    def forward(self, x: Tensor) -> Tensor:
        norms = self._norms
        first = norms[0]
        weight = torch.cat([n.weight for n in norms]) if first.affine else None
        bias = torch.cat([n.bias for n in norms]) if first.affine else None
        if not self.batch:
            return F.instance_norm(x, None, None, weight, bias, True, first.momentum, first.eps)
        # The logic of _BatchNorm.forward, read from the first of the T modules (they are built
        # alike, and train()/eval() and recalibration change them alike).
        update = first.training and first.track_running_stats
        factor = 0.0 if first.momentum is None else first.momentum
        if update:
            for n in norms:
                n.num_batches_tracked.add_(1)
            if first.momentum is None:  # cumulative average
                factor = 1.0 / float(first.num_batches_tracked)
        tracked = first.running_mean is not None
        mean = torch.cat([n.running_mean for n in norms]) if tracked else None
        var = torch.cat([n.running_var for n in norms]) if tracked else None
        out = F.batch_norm(x, mean, var, weight, bias, first.training or not tracked, factor,
                           first.eps)
        if update:
            # F.batch_norm updated the concatenated copies in place; hand them back.
            with torch.no_grad():
                for n, m, v in zip(norms, mean.chunk(len(norms)), var.chunk(len(norms)),
                                   strict=True):
                    n.running_mean.copy_(m)
                    n.running_var.copy_(v)
        return out


class SharedGroupedConvNormAct(nn.Module):
    """T ConvNormAct / UpConvNormAct blocks (or bare convs) of one shape as one grouped conv +
    norm + activation over group-major channels, on the blocks' own parameters."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        sequential = isinstance(blocks[0], nn.Sequential)
        convs = tuple(b[0] if sequential else b for b in blocks)
        first = convs[0]
        kind = type(first)
        if kind not in _CONV_FUNCTIONS and kind not in _TRANSPOSED_FUNCTIONS:
            raise ConfigError(f"cannot fuse a {kind.__name__} for training")
        if any(type(c) is not kind or c.weight.shape != first.weight.shape
               or (c.bias is None) != (first.bias is None) for c in convs):
            raise ConfigError("SharedGroupedConvNormAct stacks convolutions of one shape")
        if first.padding_mode != "zeros" or first.groups != 1:
            raise ConfigError("only zero-padded, ungrouped convolutions are fused")
        self._convs = convs
        self.transposed = kind in _TRANSPOSED_FUNCTIONS
        self._function = (_TRANSPOSED_FUNCTIONS if self.transposed else _CONV_FUNCTIONS)[kind]
        self.norm = SharedGroupedNorm([b[1] for b in blocks]) if sequential else None
        # LeakyReLU or Sigmoid: stateless, shared (in a tuple so that it is not registered twice).
        self._activation = (blocks[0][2],) if sequential else ()

    def forward(self, x: Tensor) -> Tensor:
        convs = self._convs
        first = convs[0]
        # Both layouts stack along dim 0: conv (out, in, k...), transposed conv (in, out, k...),
        # which is what groups=T expects of each.
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([c.bias for c in convs]) if first.bias is not None else None
        if self.transposed:
            y = self._function(x, weight, bias, first.stride, first.padding, first.output_padding,
                               len(convs), first.dilation)
        else:
            y = self._function(x, weight, bias, first.stride, first.padding, first.dilation,
                               len(convs))
        if self.norm is not None:
            y = self.norm(y)
        for activation in self._activation:
            y = activation(y)
        return y


class ConvInChannelsLast:
    """Calls one of the network's full-resolution blocks (a conv, or conv + norm + activation)
    with its convolution run in channels-last memory format on the CPU, the rest as it is.

    For the narrow full-resolution convolutions of a CIML segmentor (8 -> 1-2 channels in the
    head, 16 -> 8 in the last fuse conv, at 64^3) oneDNN's backward is 2-5x faster on
    channels-last input (docs/performance.md, "Fused training"), while batch norm's backward is
    slower there: so the conv's input goes to channels-last and its output back. Not a module: the
    block belongs to the network (registered there).
    """

    def __init__(self, block: nn.Module, owner: FusedTrainingCIML) -> None:
        self.block = block
        self._owner = owner  # whose forward decides (``full_resolution_channels_last``)
        sequential = isinstance(block, nn.Sequential)
        self.conv = block[0] if sequential else block
        self.rest = tuple(block)[1:] if sequential else ()

    def __call__(self, x: Tensor) -> Tensor:
        if not self._owner.full_resolution_channels_last:
            return self.block(x)
        y = self.conv(x.contiguous(memory_format=torch.channels_last_3d)).contiguous()
        for layer in self.rest:
            y = layer(y)
        return y


def grouped_pointwise(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int,
                      conv: Callable[..., Tensor]) -> Tensor:
    """``conv(x, weight, bias, groups=groups)`` for a 1x1 ``weight``; on the CPU, for standard-
    layout input, as one batched matmul: oneDNN's backward of this grouped 1x1 convolution
    (12 groups of 8 -> 16 channels at 32^3) takes 6x the matmul's (docs/performance.md)."""
    if x.device.type != "cpu" or not x.is_contiguous():
        return conv(x, weight, bias, groups=groups)
    b, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    out = weight.shape[0]
    y = torch.matmul(weight.reshape(groups, out // groups, channels // groups),
                     x.view(b, groups, channels // groups, -1))
    if bias is not None:
        y = y + bias.view(groups, out // groups, 1)
    return y.view(b, out, *spatial)


class SharedGroupedGate(RoutedGates):
    """The T CIGs of one level with training semantics, on the CIGs' own parameters.

    ``forward(local, noise)``: group-major local embeddings ``[B, T*w, ...]`` and, when sampling,
    ``noise[B, T*K, w, ...]`` (eps of message k of segmentor i at index i*K + k) ->
    (c_s ``[B, T*w, ...]``, KL ``[T]`` or None without the variational part).
    """

    def __init__(self, gates: Sequence[ComplementaryInformationGate],
                 sources: Sequence[Sequence[int]], *, detach: bool) -> None:
        super().__init__(sources)
        first = gates[0]
        self.detach = detach
        self.num_messages = first.num_messages
        self.variational = first.sigma is not None
        if any((g.sigma is None) == self.variational or (g.attention is None)
               != (first.attention is None) for g in gates):
            raise ConfigError("the T CIGs of a level must be of one variant")
        if first.attention is not None:
            self.hidden = SharedGroupedConvNormAct([g.attention.hidden for g in gates])
            self.gate = SharedGroupedConvNormAct([g.attention.gate for g in gates])
        else:
            self.hidden = self.gate = None
        self._gates = tuple(gates)
        conv = first.mu[0]
        self._function = _CONV_FUNCTIONS[type(conv)]
        # "+Message": Norm + sigmoid after the sum (see ComplementaryInformationGate).
        self.fusion = (SharedGroupedNorm([g.fusion[0] for g in gates])
                       if first.fusion is not None else None)

    def forward(self, local: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        flat = self.gated_messages(local, self.detach)  # [B, T*K*w, *spatial]
        groups, k = self.groups, self.num_messages
        if not self.variational:
            # sum_k mu_k(message_k) is one 1x1 conv over the concatenated messages.
            weight = torch.cat([torch.cat([m.weight for m in g.mu], dim=1) for g in self._gates])
            bias = (torch.cat([sum(m.bias for m in g.mu) for g in self._gates])
                    if self._gates[0].mu[0].bias is not None else None)
            side = grouped_pointwise(flat, weight, bias, groups, self._function)
            if self.fusion is not None:
                side = torch.sigmoid(self.fusion(side))
            return side, None
        # mu_k and sigma_k of every (segmentor, message): one 1x1 conv with groups=T*K whose
        # group i*K + k outputs [mu; sigma logit] of message k of segmentor i.
        weight = torch.cat([torch.cat([mu.weight, sigma.weight]) for g in self._gates
                            for mu, sigma in zip(g.mu, g.sigma, strict=True)])
        bias = torch.cat([torch.cat([mu.bias, sigma.bias]) for g in self._gates
                          for mu, sigma in zip(g.mu, g.sigma, strict=True)])
        out = grouped_pointwise(flat, weight, bias, groups * k, self._function).unflatten(
            1, (groups * k, 2, -1))
        mu, sigma_logit = out[:, :, 0], out[:, :, 1]
        # As cig.reparameterise, with the eps given rather than drawn here.
        sigma = F.softplus(sigma_logit) + SIGMA_FLOOR
        # Mean over (B, k, w, voxels) per segmentor = the mean over k of each message's mean.
        # No reshape (which would copy a channels-last tensor): means over every axis but T.
        kl = kl_to_standard_normal(mu, sigma).unflatten(1, (groups, k))
        kl = kl.mean(dim=[d for d in range(kl.dim()) if d != 1])
        z = mu if noise is None else mu + sigma * noise
        side = z.unflatten(1, (groups, k)).sum(dim=2).flatten(1, 2)
        return side, kl


def _noise_dtype(x: Tensor) -> torch.dtype:
    """The dtype of sigma in the unfused CIG: the conv's output dtype, through softplus (which
    CUDA's autocast runs in float32), so that eps is drawn as ``randn_like(sigma)`` draws it."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x.dtype
    probe = torch.zeros(1, dtype=torch.get_autocast_dtype(device_type), device=x.device)
    return F.softplus(probe).dtype


class FusedTrainingCIML(FusedLayout):
    """A :class:`CIMLNetwork` run with its segmentors fused, for training (module docstring).

    Shares every parameter and buffer with ``network``: train this module with an optimiser
    over ``network.parameters()`` (the same tensors as ``self.parameters()``, in the same order),
    save and load ``network`` (or this module: same ``state_dict`` keys). Forward returns the
    same :class:`CIMLOutput` as the network's, with the KL.
    """

    def __init__(self, network: CIMLNetwork) -> None:
        super().__init__()
        self.build_layout(
            network,
            # the network's own full-resolution blocks, their convolutions in channels-last
            separate=lambda blocks: tuple(ConvInChannelsLast(b, self) for b in blocks),
            grouped=SharedGroupedConvNormAct,
            gate=lambda gates, sources: SharedGroupedGate(
                gates, sources, detach=network.config.detach_messages),
        )
        # Registered under the network's own name: parameters, buffers, train()/eval(), .to()
        # and state_dict keys are the network's.
        self.segmentors = network.segmentors
        self._network = (network,)
        self.full_resolution_channels_last = False  # set per forward from the input
        self.train(network.training)

    def train(self, mode: bool = True) -> FusedTrainingCIML:
        """Set train/eval mode here and on the network (whose top module is not a child)."""
        super().train(mode)
        self.network.training = mode
        return self

    @property
    def network(self) -> CIMLNetwork:
        """The wrapped network (save, validate and explain with it)."""
        return self._network[0]

    def draw_noise(self, x: Tensor) -> tuple[list[Tensor | None] | None, Tensor | None]:
        """Everything random in one forward, drawn in the unfused network's order and shapes.

        The unfused forward draws, segmentor by segmentor: for each level the CIG's eps of each
        message (``randn_like(sigma)``, when the CIG is variational and training), then the
        segmentor's message-dropout draw (``rand(B)``, when training with message dropout and
        messages are not switched off). Returns (per level the eps ``[B, T*K, w, ...]`` or None,
        ``keep[B, T]`` or None when every c_s is kept).
        """
        if self.gates is None:  # "baseline": no CIG, no message dropout
            return None, None
        segmentors = list(self.segmentors)
        b, spatial = x.shape[0], x.shape[2:]
        k = self.groups - 1
        sampling = [[g.sigma is not None and g.training for g in s.gates] for s in segmentors]
        buffers: list[Tensor | None] = []
        for level in range(len(self.gates)):
            samples = [row[level] for row in sampling]
            if not any(samples):
                buffers.append(None)
                continue
            size = (s // 2 ** (level + 1) for s in spatial)
            # [T*K, B, ...]: each (segmentor, message) slice is contiguous, so normal_() on it
            # draws what randn_like draws for that message alone. Zeros where a CIG is in eval.
            make = torch.empty if all(samples) else torch.zeros
            buffers.append(make(self.groups * k, b, segmentors[0].gates[level].mu[0].out_channels,
                                *size, dtype=_noise_dtype(x), device=x.device))
        keeps, dropped = [], False
        for i, segmentor in enumerate(segmentors):
            for level, buffer in enumerate(buffers):
                if sampling[i][level]:
                    for message in range(k):
                        buffer[i * k + message].normal_()
            if segmentor.messages_off:
                keeps.append(x.new_zeros(b, dtype=torch.float32))
                dropped = True
            elif segmentor.training and segmentor.message_dropout > 0:
                draw = torch.rand(b, device=x.device) >= segmentor.message_dropout
                keeps.append(draw.float())
                dropped = True
            else:
                keeps.append(x.new_ones(b, dtype=torch.float32))
        noise = [None if buffer is None else buffer.transpose(0, 1) for buffer in buffers]
        return noise, torch.stack(keeps, dim=1) if dropped else None

    def forward(self, x: Tensor) -> CIMLOutput:
        """``x[B, M, *spatial]`` -> per-segmentor logits and KL, as ``CIMLNetwork.forward``."""
        decomposition = self.config.decomposition
        check_input(x, len(decomposition.modalities), self.config.spatial_dims)
        # Only for standard-layout 3-D input on the CPU: a caller that runs the whole network in
        # channels-last (or on a GPU) keeps its own layout throughout.
        self.full_resolution_channels_last = (
            x.device.type == "cpu" and x.dim() == 5 and x.is_contiguous()
            and not x.is_contiguous(memory_format=torch.channels_last_3d))
        noise, keep = self.draw_noise(x)
        logits, kls = self.run_layout(x, noise, keep)
        # As Segmentor.forward: the sum over levels (in level order), over NUM_LEVELS.
        kl = sum(kls) / NUM_LEVELS if kls else x.new_zeros(self.groups, dtype=torch.float32)
        return CIMLOutput(
            logits=logits,
            task_regions=tuple(task.regions for task in decomposition.tasks),
            kl=kl,
        )


def training_network(model: nn.Module, *, fused: bool = True) -> nn.Module:
    """The module the training steps run: a :class:`CIMLNetwork` wrapped in
    :class:`FusedTrainingCIML` (same parameters, same outputs and gradients, faster), unless
    ``fused`` is False; any other network (DynUNet, ShapeComposition) as it is.

    Build the optimiser over ``model.parameters()``, save ``model``; wrap the result (not
    ``model``) in DistributedDataParallel / torch.compile.
    """
    if fused and isinstance(model, CIMLNetwork):
        return FusedTrainingCIML(model).to(next(model.parameters()).device)
    return model
