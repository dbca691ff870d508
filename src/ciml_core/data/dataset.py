"""Load a discovered case into arrays: all modalities validated, on one grid, canonical order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ciml_core.data.labels import validate_label_values
from ciml_core.data.layouts import CaseFiles
from ciml_core.data.nifti import NiftiSource, Volume, check_same_grid, load_volume
from ciml_core.errors import InputDataError


@dataclass
class LoadedCase:
    """One case in memory. ``image`` is ``(M, X, Y, Z)`` float32 in canonical (RAS+) voxel order,
    channels in ``modalities`` order; ``label`` the validated label volume or None; ``reference``
    the source every output of this case is written back to."""

    case_id: str
    modalities: tuple[str, ...]
    image: np.ndarray
    label: np.ndarray | None
    reference: NiftiSource

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.reference.spacing


def _check_plain_labels(label: np.ndarray, source: str) -> None:
    """Without a convention, labels must still be small non-negative integers (uint8 on output)."""
    values = np.unique(label)
    if np.any(values != np.round(values)) or values.min() < 0 or values.max() > 255:
        raise InputDataError(
            f"{source}: expected integer label values in 0..255, found {values[:10].tolist()}"
        )


def load_case(
    case: CaseFiles,
    modalities: Sequence[str] | None = None,
    *,
    label_convention: str | None = None,
    require_label: bool = False,
) -> LoadedCase:
    """Load the images (in ``modalities`` order, default: the case's own) and the label of a case.

    Raises:
        InputDataError: a requested modality is missing, a file is unreadable, has NaN/Inf or is
            all zero, or the label is required but absent.
        GeometryError: the files do not share shape and affine.
        LabelError: label values outside ``label_convention``.
    """
    wanted = tuple(modalities) if modalities is not None else case.modalities
    missing = [m for m in wanted if m not in case.images]
    if missing:
        raise InputDataError(
            f"case {case.case_id}: modality {missing} missing (found {list(case.images)}, "
            f"expected {list(wanted)})"
        )
    volumes: dict[str, Volume] = {m: load_volume(case.images[m], allow_empty=False) for m in wanted}
    label_volume = None
    if case.label is not None:
        label_volume = load_volume(case.label)
        check_same_grid({**volumes, "label": label_volume})
    else:
        if require_label:
            raise InputDataError(f"case {case.case_id}: no label file found (a label is required)")
        check_same_grid(volumes)

    label = None
    if label_volume is not None:
        if label_convention is not None:
            validate_label_values(label_volume.data, label_convention, str(case.label))
        else:
            _check_plain_labels(label_volume.data, str(case.label))
        label = label_volume.data.astype(np.uint8)
    image = np.stack([volumes[m].data.astype(np.float32, copy=False) for m in wanted])
    return LoadedCase(case.case_id, wanted, image, label, volumes[wanted[0]].source)
