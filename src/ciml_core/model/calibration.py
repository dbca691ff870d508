"""Batch-norm statistics recomputed the way the network runs in eval mode.

In training the CIGs sample ``z = mu + sigma * eps`` and message dropout zeroes some ``c_s``;
in eval ``z = mu`` and every ``c_s`` is kept. The running statistics that batch norm collected
during training therefore describe other activations than the ones eval normalises with them
(after the CIG, eval variances were 0.12-0.66 of the running ones on the demo). Recomputing the
statistics with the eval-mode behaviour of those two parts, on training patches, removes the
mismatch (docs/method.md, "Batch-norm recalibration").
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ciml_core.model.cig import ComplementaryInformationGate
from ciml_core.model.segmentor import Segmentor


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Replace every batch norm's running mean and variance by their averages over ``batches``
    (images ``[B, M, *spatial]`` on the model's device), computed with the CIGs and message
    dropout in eval mode (``z = mu``, every message kept). Returns the number of batches used
    (0: the model has no batch norm and was left unchanged). Leaves the model in eval mode.
    """
    norms = _batch_norms(model)
    if not norms:
        model.eval()
        return 0
    batches = iter(batches)
    first = next(batches, None)
    if first is None:  # checked before the running statistics are reset
        raise ValueError("recalibrate_batch_norm: no batch given")
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches, not an exponential one
    model.train()
    # ``training`` set on these modules alone (not recursively): their own sampling and dropout
    # switch to eval behaviour while the batch norms inside them keep collecting statistics.
    for module in model.modules():
        if isinstance(module, (ComplementaryInformationGate, Segmentor)):
            module.training = False
    count = 0
    try:
        for x in itertools.chain([first], batches):
            model(x)
            count += 1
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.eval()
    return count
