"""Task decomposition (paper 3.1): which modality each segmentor reads and which regions it predicts.

A :class:`TaskDecomposition` is the expert prior of CIML written down as data. It fixes three
orders that the rest of the package relies on:

- ``modalities``: the channel order of every input tensor ``x[B, M, *spatial]``;
- ``regions``: the channel order of every target / probability tensor ``[B, R, *spatial]``;
- ``tasks``: the segmentor order (segmentor ``i`` solves ``tasks[i]``).

It is stored in checkpoints through :meth:`TaskDecomposition.to_dict` / :meth:`from_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ciml_core.errors import ConfigError


def _as_name_tuple(value: Any, field: str) -> tuple[str, ...]:
    """Turn a JSON list (or a tuple) of names into a tuple, rejecting anything else by field name."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"task decomposition: {field} must be a list of names, got {value!r}")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"task decomposition: {field} holds {name!r}; expected non-empty strings"
            )
    return names


def _check_unique(names: tuple[str, ...], field: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"task decomposition: {field} lists {name!r} twice")
        seen.add(name)


@dataclass(frozen=True)
class Task:
    """One sub-task: the primary modality/modalities a segmentor reads and the regions it predicts.

    ``primary`` may hold several modalities (they become the segmentor's input channels, in this
    order); ``regions`` become its output channels, in this order.
    """

    primary: tuple[str, ...]
    regions: tuple[str, ...]

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so that the dataclass stays hashable.
        object.__setattr__(self, "primary", _as_name_tuple(self.primary, "task.primary"))
        object.__setattr__(self, "regions", _as_name_tuple(self.regions, "task.regions"))

    @property
    def name(self) -> str:
        """A readable, unique (within a decomposition) name: the primary modalities joined by '+'."""
        return "+".join(self.primary)


@dataclass(frozen=True)
class TaskDecomposition:
    """The segmentors of a CIML network, with the modality and region orders they refer to.

    Validation (every failure is a :class:`~ciml_core.errors.ConfigError` naming the field):
    no empty lists; modality names lower case; no duplicate modality, region or task (two tasks
    with the same primary modalities); within a task no duplicate primary modality or region;
    every primary modality and every predicted region known; every region predicted by at least
    one task. A modality that is no task's primary is allowed here (the ShapeComposition network
    uses it as a pure auxiliary input); the CIML variants reject it in ``ModelConfig``.
    """

    tasks: tuple[Task, ...]
    modalities: tuple[str, ...]
    regions: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", _as_name_tuple(self.modalities, "modalities"))
        object.__setattr__(self, "regions", _as_name_tuple(self.regions, "regions"))
        if isinstance(self.tasks, Task) or not isinstance(self.tasks, Sequence):
            raise ConfigError(
                f"task decomposition: tasks must be a list of tasks, got {self.tasks!r}"
            )
        object.__setattr__(self, "tasks", tuple(self.tasks))
        self._validate()

    def _validate(self) -> None:
        for field, names in (("modalities", self.modalities), ("regions", self.regions)):
            if not names:
                raise ConfigError(f"task decomposition: {field} is empty")
            _check_unique(names, field)
        for name in self.modalities:
            if name != name.lower():
                raise ConfigError(
                    f"task decomposition: modality {name!r} must be lower case "
                    f"(canonical names are e.g. 'flair', 't1', 't1ce', 't2', 'ct', 'pet')"
                )
        if not self.tasks:
            raise ConfigError(
                "task decomposition: tasks is empty; at least one segmentor is needed"
            )
        for i, task in enumerate(self.tasks):
            if not isinstance(task, Task):
                raise ConfigError(f"task decomposition: tasks[{i}] is {task!r}, not a Task")
            for field, names, known in (
                ("primary", task.primary, self.modalities),
                ("regions", task.regions, self.regions),
            ):
                if not names:
                    raise ConfigError(f"task decomposition: tasks[{i}].{field} is empty")
                _check_unique(names, f"tasks[{i}].{field}")
                for name in names:
                    if name not in known:
                        kind = "modality" if field == "primary" else "region"
                        raise ConfigError(
                            f"task decomposition: tasks[{i}].{field} names unknown {kind} "
                            f"{name!r}; known: {list(known)}"
                        )
        _check_unique(tuple(task.name for task in self.tasks), "tasks (by primary modalities)")
        for region in self.regions:
            if not self.tasks_predicting(region):
                raise ConfigError(
                    f"task decomposition: region {region!r} (in regions) is predicted by no task"
                )

    # ---------------------------------------------------------------- defaults
    @classmethod
    def brats(cls) -> TaskDecomposition:
        """BraTS default, Table 6 best row: FLAIR->WT, T1->TC, T2->WT,TC, T1CE->TC,ET."""
        return cls(
            tasks=(
                Task(("flair",), ("WT",)),
                Task(("t1",), ("TC",)),
                Task(("t2",), ("WT", "TC")),
                Task(("t1ce",), ("TC", "ET")),
            ),
            modalities=("flair", "t1", "t1ce", "t2"),
            regions=("WT", "TC", "ET"),
        )

    @classmethod
    def petct(cls) -> TaskDecomposition:
        """autoPET / HECKTOR default: two segmentors, CT and PET, both predicting the lesion."""
        return cls(
            tasks=(Task(("ct",), ("lesion",)), Task(("pet",), ("lesion",))),
            modalities=("ct", "pet"),
            regions=("lesion",),
        )

    @classmethod
    def shapes(cls) -> TaskDecomposition:
        """ShapeComposition (paper 4.3): the primary image holds a triangle, the auxiliary image
        an ellipse (the names the ``shapes`` phantoms are written with); the target is their union."""
        return cls(
            tasks=(Task(("primary",), ("union",)),),
            modalities=("primary", "auxiliary"),
            regions=("union",),
        )

    # ---------------------------------------------------------------- look-ups
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def modality_index(self, modality: str) -> int:
        """Channel of ``modality`` in an input tensor."""
        if modality not in self.modalities:
            raise ConfigError(f"unknown modality {modality!r}; known: {list(self.modalities)}")
        return self.modalities.index(modality)

    def region_index(self, region: str) -> int:
        """Channel of ``region`` in a target / probability tensor."""
        if region not in self.regions:
            raise ConfigError(f"unknown region {region!r}; known: {list(self.regions)}")
        return self.regions.index(region)

    def input_channels(self, task: int) -> list[int]:
        """Input channels (modality indices) read by segmentor ``task``."""
        return [self.modality_index(m) for m in self.tasks[task].primary]

    def regions_of(self, task: int) -> tuple[str, ...]:
        """Regions predicted by segmentor ``task``, in its output channel order."""
        return self.tasks[task].regions

    def tasks_predicting(self, region: str) -> list[int]:
        """Indices of the segmentors that predict ``region``."""
        return [i for i, task in enumerate(self.tasks) if region in task.regions]

    def unused_modalities(self) -> list[str]:
        """Modalities that are no task's primary modality."""
        used = {m for task in self.tasks for m in task.primary}
        return [m for m in self.modalities if m not in used]

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` inverts it."""
        return {
            "modalities": list(self.modalities),
            "regions": list(self.regions),
            "tasks": [{"primary": list(t.primary), "regions": list(t.regions)} for t in self.tasks],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskDecomposition:
        """Rebuild (and validate) a decomposition written by :meth:`to_dict`."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"task decomposition must be a JSON object, got {type(data).__name__}"
            )
        expected = {"modalities", "regions", "tasks"}
        missing, extra = expected - set(data), set(data) - expected
        if missing or extra:
            raise ConfigError(
                f"task decomposition: expected keys {sorted(expected)}; "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        raw_tasks = data["tasks"]
        if not isinstance(raw_tasks, Sequence) or isinstance(raw_tasks, str):
            raise ConfigError(f"task decomposition: tasks must be a list, got {raw_tasks!r}")
        tasks = []
        for i, raw in enumerate(raw_tasks):
            if not isinstance(raw, Mapping) or set(raw) != {"primary", "regions"}:
                raise ConfigError(
                    f"task decomposition: tasks[{i}] must be an object with keys "
                    f"'primary' and 'regions', got {raw!r}"
                )
            tasks.append(
                Task(
                    _as_name_tuple(raw["primary"], f"tasks[{i}].primary"),
                    _as_name_tuple(raw["regions"], f"tasks[{i}].regions"),
                )
            )
        return cls(tasks=tuple(tasks), modalities=data["modalities"], regions=data["regions"])
