"""Label conventions: dataset label values <-> region masks (WT/TC/ET, lesion...).

A convention says which label values a file may hold, which values make up each region, and how to
paint regions back into label values. Regions are nested for BraTS (ET inside TC inside WT); painting
in the listed order (outer first) makes the innermost region win, which is the BraTS definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ciml_core.errors import ConfigError, LabelError


@dataclass(frozen=True)
class LabelConvention:
    """How a dataset's integer labels map to the regions a model predicts."""

    name: str
    values: tuple[int, ...]  # every value a label file may hold (0 = background)
    regions: tuple[tuple[str, tuple[int, ...]], ...]  # (region, label values inside it), outer first
    paint: tuple[tuple[str, int], ...]  # (region, value written for it), applied in order

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.regions)


LABEL_CONVENTIONS: dict[str, LabelConvention] = {
    # BraTS 2018-2021: 1 NCR/NET, 2 ED, 4 ET.
    "brats2020": LabelConvention(
        name="brats2020",
        values=(0, 1, 2, 4),
        regions=(("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))),
        paint=(("WT", 2), ("TC", 1), ("ET", 4)),
    ),
    # BraTS 2023+: 1 NETC, 2 SNFH, 3 ET.
    "brats2023": LabelConvention(
        name="brats2023",
        values=(0, 1, 2, 3),
        regions=(("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,))),
        paint=(("WT", 2), ("TC", 1), ("ET", 3)),
    ),
    # One foreground class (autoPET lesions, ShapeComposition union).
    "binary": LabelConvention(
        name="binary", values=(0, 1), regions=(("lesion", (1,)),), paint=(("lesion", 1),)
    ),
    # ShapeComposition phantoms: the union of the triangle and the ellipse.
    "shapes": LabelConvention(
        name="shapes", values=(0, 1), regions=(("union", (1,)),), paint=(("union", 1),)
    ),
    # HECKTOR 2022: 1 GTVp (primary tumour), 2 GTVn (lymph nodes).
    "hecktor": LabelConvention(
        name="hecktor",
        values=(0, 1, 2),
        regions=(("GTVp", (1,)), ("GTVn", (2,))),
        paint=(("GTVp", 1), ("GTVn", 2)),
    ),
}


def get_convention(name: str | LabelConvention) -> LabelConvention:
    """Look up a convention by name ("brats2020", "brats2023", "binary", "hecktor")."""
    if isinstance(name, LabelConvention):
        return name
    try:
        return LABEL_CONVENTIONS[name]
    except KeyError:
        raise ConfigError(
            f"label convention {name!r} is unknown; expected one of {sorted(LABEL_CONVENTIONS)}"
        ) from None


def validate_label_values(label: np.ndarray, convention: str | LabelConvention, source: str) -> None:
    """Raise LabelError naming ``source`` and the offending values if any are outside the convention."""
    conv = get_convention(convention)
    found = np.unique(label)
    if np.issubdtype(found.dtype, np.floating) and not np.all(found == np.round(found)):
        raise LabelError(
            f"{source}: label values must be integers for convention {conv.name!r} "
            f"{list(conv.values)}; found non-integer values {found[found != np.round(found)][:5].tolist()}"
        )
    unexpected = sorted(set(found.astype(np.int64).tolist()) - set(conv.values))
    if unexpected:
        raise LabelError(
            f"{source}: label values {unexpected} are not part of convention {conv.name!r} "
            f"(expected a subset of {list(conv.values)}; found {found.astype(np.int64).tolist()})"
        )


def labels_to_regions(label: np.ndarray, convention: str | LabelConvention) -> np.ndarray:
    """Label volume -> boolean region masks of shape ``(R, *label.shape)`` in convention order."""
    conv = get_convention(convention)
    return np.stack([np.isin(label, values) for _, values in conv.regions])


def regions_to_labels(regions: np.ndarray, convention: str | LabelConvention) -> np.ndarray:
    """Boolean region masks ``(R, *spatial)`` in convention order -> uint8 label volume.

    Regions are painted outer to inner, so for BraTS a voxel in ET is labelled ET even if the
    TC or WT mask missed it (the masks are expected nested; see ``enforce_hierarchy``).
    """
    conv = get_convention(convention)
    regions = np.asarray(regions)
    if regions.shape[0] != len(conv.regions):
        raise ConfigError(
            f"expected {len(conv.regions)} region masks {conv.region_names} for convention "
            f"{conv.name!r}, got {regions.shape[0]}"
        )
    index = {name: i for i, name in enumerate(conv.region_names)}
    label = np.zeros(regions.shape[1:], dtype=np.uint8)
    for name, value in conv.paint:
        label[regions[index[name]].astype(bool)] = value
    return label
