"""The contract every network of this package follows: what goes in, what comes out.

All networks (CIML and its ablations, the early-fusion DynUNet, the ShapeComposition network)
take ``x[B, M, *spatial]`` with the M channels in ``decomposition.modalities`` order and return a
:class:`CIMLOutput`, so that training, inference and interpretability code handle them alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ciml_core.errors import InputDataError
from ciml_core.model.config import SIZE_DIVISOR


@dataclass
class CIMLOutput:
    """What a network returns.

    Attributes:
        logits: one tensor per output head (per segmentor for CIML), ``[B, n_regions, *spatial]``.
        task_regions: the region names of each head's channels, same order as ``logits``.
        kl: ``[n_heads]`` KL term of each head; for CIML segmentor i: the mean over its 4 CIG
            levels of the per-level KL (itself the mean over batch, channels, voxels and the K
            messages). Zeros for networks without a variational part.
        complementary: the ShapeComposition complementary map ``[B, n, *spatial]``, else None.
    """

    logits: list[Tensor]
    task_regions: tuple[tuple[str, ...], ...]
    kl: Tensor
    complementary: Tensor | None = None


def check_input(x: Tensor, num_modalities: int, spatial_dims: int) -> None:
    """Raise InputDataError unless ``x`` is ``[B, num_modalities, *spatial]`` with sizes that are multiples of
    :data:`~ciml_core.model.config.SIZE_DIVISOR`."""
    if x.dim() != spatial_dims + 2 or x.shape[1] != num_modalities:
        raise InputDataError(
            f"network input has shape {tuple(x.shape)}; expected [batch, {num_modalities} "
            f"modalities, {spatial_dims} spatial sizes]"
        )
    bad = [s for s in x.shape[2:] if s % SIZE_DIVISOR]
    if bad:
        raise InputDataError(
            f"network input has spatial size {tuple(x.shape[2:])}; every size must be a multiple "
            f"of {SIZE_DIVISOR} (pad the volume or use a patch size that is)"
        )
