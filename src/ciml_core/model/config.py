"""Network hyper-parameters (:class:`ModelConfig`), validated and JSON round-trippable.

The config goes into every checkpoint's ``config.json``; :func:`ciml_core.model.build_model`
turns it back into the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ciml_core.errors import ConfigError
from ciml_core.model.blocks import NORMS
from ciml_core.model.decomposition import TaskDecomposition
from ciml_core.model.encoder import NUM_LEVELS


class GateSwitches(NamedTuple):
    """How the CIG of a CIML variant is built (see ``ComplementaryInformationGate``)."""

    gating: bool
    variational: bool


#: The Table 5 ablations that exchange messages, and the CIG each one uses.
#: "message": neither switch, i.e. one conv over the concatenated messages + Norm + sigmoid.
GATE_SWITCHES: dict[str, GateSwitches] = {
    "full": GateSwitches(gating=True, variational=True),
    "attention": GateSwitches(gating=True, variational=False),
    "vi": GateSwitches(gating=False, variational=True),
    "message": GateSwitches(gating=False, variational=False),
}
#: CIML variants: the message-passing ablations plus "baseline" (segmentors without messages).
CIML_VARIANTS = (*GATE_SWITCHES, "baseline")
#: Every network build_model can make.
VARIANTS = (*CIML_VARIANTS, "dynunet", "shapecomposition")
#: What ``ciml-core train`` builds (ShapeComposition has its own experiment, ``shapes``).
TRAINABLE_VARIANTS = tuple(v for v in VARIANTS if v != "shapecomposition")

#: The encoder halves the resolution this many times, so patch sizes must be multiples of it.
SIZE_DIVISOR = 2**NUM_LEVELS


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network.

    Attributes:
        decomposition: the segmentors' tasks and the modality / region orders.
        width: base number of filters C (encoder widths C, 2C, 4C, 8C).
        norm: "batch" (paper, BraTS with batch 2) or "instance" (paper, other data sets).
        spatial_dims: 3 for volumes, 2 for images.
        variant: one of :data:`VARIANTS`; "full" is CIML, the others are Table 5 ablations,
            the early-fusion DynUNet comparison and the ShapeComposition network (paper 4.3).
        detach_messages: stop gradients at the messages (no mutual learning through them).
        dilation: dilation of the stride-2 encoder convs (1 = plain strided conv, Table 1).
        patch_size: training / sliding-window patch; each entry a multiple of 16.
            ``None`` means 64 per axis.
        complementary_channels: channels of the complementary map ("shapecomposition" only).
        message_dropout: training-time probability of zeroing a sample's complementary
            representations in a segmentor (CIML variants with messages; see ``Segmentor``).
    """

    decomposition: TaskDecomposition = field(default_factory=TaskDecomposition.brats)
    width: int = 16
    norm: str = "batch"
    spatial_dims: int = 3
    variant: str = "full"
    detach_messages: bool = False
    dilation: int = 1
    patch_size: tuple[int, ...] | None = None
    complementary_channels: int = 1
    message_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3) or not _is_int(self.spatial_dims):
            raise ConfigError(f"ModelConfig.spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if self.patch_size is None:
            object.__setattr__(self, "patch_size", (64,) * self.spatial_dims)
        elif not isinstance(self.patch_size, (list, tuple)):
            raise ConfigError(
                f"ModelConfig.patch_size must be a list of sizes, got {self.patch_size!r}"
            )
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.decomposition, TaskDecomposition):
            raise ConfigError("ModelConfig.decomposition must be a TaskDecomposition")
        for name in ("width", "dilation", "complementary_channels"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"ModelConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"ModelConfig.variant must be one of {VARIANTS}, got {self.variant!r}"
            )
        dropout = self.message_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(
                f"ModelConfig.message_dropout must be a number in [0, 1), got {dropout!r}"
            )
        if not isinstance(self.detach_messages, bool):
            raise ConfigError(
                f"ModelConfig.detach_messages must be true or false, got {self.detach_messages!r}"
            )
        check_spatial_size(self.patch_size, self.spatial_dims, what="ModelConfig.patch_size")
        self._validate_variant()

    def _validate_variant(self) -> None:
        decomposition = self.decomposition
        unused = decomposition.unused_modalities()
        if self.variant in CIML_VARIANTS:
            if unused:
                raise ConfigError(
                    f"ModelConfig.decomposition: modalities {unused} are no task's primary "
                    f"modality, so no CIML segmentor would read them; add a task for each or "
                    f"remove them from modalities"
                )
            if self.variant != "baseline" and decomposition.num_tasks < 2:
                raise ConfigError(
                    f"ModelConfig.variant {self.variant!r} exchanges messages between segmentors "
                    f"and needs at least 2 tasks, the decomposition has 1; use 'baseline' or 'dynunet'"
                )
        elif self.variant == "shapecomposition" and (decomposition.num_tasks != 1 or not unused):
            raise ConfigError(
                "ModelConfig.decomposition: variant 'shapecomposition' needs exactly one task "
                "(its primary modalities feed the primary encoder) and at least one other "
                "modality (the auxiliary input), as TaskDecomposition.shapes()"
            )

    @property
    def gate_switches(self) -> GateSwitches | None:
        """CIG switches of this variant; None when the network has no CIG."""
        return GATE_SWITCHES.get(self.variant)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` inverts it."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["decomposition"] = self.decomposition.to_dict()
        data["patch_size"] = list(self.patch_size)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Rebuild (and validate) a config; missing keys take their defaults, unknown keys fail."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown keys {unknown}; known: {sorted(known)}")
        kwargs = dict(data)
        if "decomposition" in kwargs:
            kwargs["decomposition"] = TaskDecomposition.from_dict(kwargs["decomposition"])
        return cls(**kwargs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_spatial_size(size: tuple[int, ...], spatial_dims: int, *, what: str) -> None:
    """Raise ConfigError unless ``size`` has ``spatial_dims`` positive multiples of 16."""
    if len(size) != spatial_dims or not all(_is_int(s) and s > 0 for s in size):
        raise ConfigError(f"{what} must be {spatial_dims} positive integers, got {list(size)}")
    bad = [s for s in size if s % SIZE_DIVISOR]
    if bad:
        raise ConfigError(
            f"{what} {list(size)}: every size must be a multiple of {SIZE_DIVISOR} "
            f"(the encoder halves the resolution {NUM_LEVELS} times); {bad} are not"
        )
