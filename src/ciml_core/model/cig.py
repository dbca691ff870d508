"""Cross-modality information gate (CIG, paper 3.2, Fig. 12, Table 1 "CIG_*").

One CIG sits at each decoder level of each segmentor. It turns the K messages received from the
other segmentors into one complementary representation ``c_s`` of the level's width:

1. gating (``gating=True``): a cross-modal spatial attention computes one map in [0, 1] per
   message from the channel means of the local embedding and of the messages; map k multiplies
   message k (broadcast over channels);
2. projection, per message k: a 1x1 conv gives mu_k; with ``variational=True`` a second 1x1 conv
   gives sigma_k = softplus(.) + 1e-6 and z_k = mu_k + sigma_k * eps while training (z_k = mu_k in
   eval), with KL(N(mu_k, sigma_k^2) || N(0, 1)); otherwise z_k = mu_k and no KL;
3. c_s = sum_k z_k. With neither gating nor VI (the paper's "+Message" ablation) c_s is followed by
   Norm + sigmoid: a sum of per-message 1x1 convs *is* one 1x1 conv over the concatenated messages,
   so this is exactly "one conv layer + BN + sigmoid over the messages".

Each z_k passes through ``representation_taps[k]`` (an ``nn.Identity``) so that Grad-CAM can hook
the information representation A_i and its gradient without touching this code:
``gate.representation_taps[k].register_forward_hook(...)`` sees z_k (its output), and a tensor
hook on that output gives dy/dA. Message k comes from the k-th *other* segmentor, in task order
(see ``CIMLNetwork.message_sources``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ciml_core.model.blocks import ConvNormAct, conv_type, make_norm

#: Floor of sigma, so that log(sigma) in the KL stays finite.
SIGMA_FLOOR = 1e-6


def kl_to_standard_normal(mu: Tensor, sigma: Tensor) -> Tensor:
    """Element-wise KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - 1) / 2 - log(sigma).

    Computed in float32 so that bf16 autocast does not ruin the log.
    """
    mu, sigma = mu.float(), sigma.float()
    return 0.5 * (mu.square() + sigma.square() - 1.0) - torch.log(sigma)


def reparameterise(mu: Tensor, sigma_logit: Tensor, *, sample: bool) -> tuple[Tensor, Tensor]:
    """Gaussian bottleneck: sigma = softplus(sigma_logit) + 1e-6; z = mu + sigma * eps if ``sample``
    else mu. Return (z, mean KL to N(0, 1) over every element)."""
    sigma = F.softplus(sigma_logit) + SIGMA_FLOOR
    kl = kl_to_standard_normal(mu, sigma).mean()
    z = mu + sigma * torch.randn_like(sigma) if sample else mu
    return z, kl


class CrossModalAttention(nn.Module):
    """Spatial attention over K messages: [local, messages] channel means -> K gates in [0, 1]."""

    def __init__(self, num_messages: int, *, spatial_dims: int, norm: str) -> None:
        super().__init__()
        maps = num_messages + 1
        self.hidden = ConvNormAct(maps, 4 * maps, spatial_dims=spatial_dims, norm=norm)
        self.gate = ConvNormAct(
            4 * maps,
            num_messages,
            spatial_dims=spatial_dims,
            norm=norm,
            kernel_size=1,
            activation=nn.Sigmoid(),
        )

    def forward(self, local: Tensor, messages: list[Tensor]) -> Tensor:
        """Return the gates, shape [B, K, *spatial]; gate k belongs to ``messages[k]``."""
        # Channel means keep the location but not the width: cheap, and width-independent.
        pooled = torch.cat([t.mean(dim=1, keepdim=True) for t in (local, *messages)], dim=1)
        return self.gate(self.hidden(pooled))


class ComplementaryInformationGate(nn.Module):
    """Messages of the K other segmentors -> complementary representation c_s and its KL.

    Args:
        channels: width w_s of the level (of the local embedding, each message and c_s).
        num_messages: K, the number of other segmentors.
        gating: use the cross-modal spatial attention (Table 5 "Attention").
        variational: sample z with mu/sigma and return the KL (Table 5 "VI").
    """

    def __init__(
        self,
        channels: int,
        num_messages: int,
        *,
        spatial_dims: int,
        norm: str,
        gating: bool = True,
        variational: bool = True,
    ) -> None:
        super().__init__()
        if num_messages < 1:
            raise ValueError("a CIG needs at least one message")
        self.num_messages = num_messages
        conv = conv_type(spatial_dims)
        self.attention = (
            CrossModalAttention(num_messages, spatial_dims=spatial_dims, norm=norm)
            if gating
            else None
        )
        # In the fused ("+Message") variant a norm follows, so the per-message bias is redundant.
        fused = not gating and not variational
        self.mu = nn.ModuleList(
            conv(channels, channels, 1, bias=not fused) for _ in range(num_messages)
        )
        self.sigma = (
            nn.ModuleList(conv(channels, channels, 1) for _ in range(num_messages))
            if variational
            else None
        )
        self.representation_taps = nn.ModuleList(nn.Identity() for _ in range(num_messages))
        self.fusion = (
            nn.Sequential(make_norm(norm, channels, spatial_dims), nn.Sigmoid()) if fused else None
        )

    def forward(self, local: Tensor, messages: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Return (c_s [B, w_s, *spatial], KL scalar).

        The KL is the mean over batch, channels and voxels of each message's element-wise KL,
        averaged over the K messages; 0 without ``variational``.
        """
        if len(messages) != self.num_messages:
            raise ValueError(f"expected {self.num_messages} messages, got {len(messages)}")
        if self.attention is not None:
            gates = self.attention(local, messages)
            messages = [m * gates[:, k : k + 1] for k, m in enumerate(messages)]
        kl = local.new_zeros((), dtype=torch.float32)
        representations = []
        for k, message in enumerate(messages):
            z = self.mu[k](message)
            if self.sigma is not None:
                z, message_kl = reparameterise(z, self.sigma[k](message), sample=self.training)
                kl = kl + message_kl
            representations.append(self.representation_taps[k](z))
        complementary = sum(representations)
        if self.fusion is not None:
            complementary = self.fusion(complementary)
        return complementary, kl / self.num_messages
