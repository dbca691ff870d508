"""Layers <-> ciml_core objects: geometry, modality mapping, label colours (no Qt here).

Every layer the plugin makes carries ``metadata["ciml_role"]`` (``"prediction"``,
``"probability"`` or ``"heatmap"``) so that overlays can be found, toggled and replaced without
guessing from names. Input layers come from the reader (or the sample data) with
``metadata["nifti_source"]``; layers from elsewhere get a source synthesised from their
``scale``/``translate`` so that the writer still produces a correctly placed file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from nibabel.orientations import apply_orientation

from ciml_core.data.dataset import LoadedCase, case_from_arrays
from ciml_core.data.labels import get_convention
from ciml_core.data.layouts import KNOWN_MODALITIES, canonical_modality
from ciml_core.data.nifti import NiftiSource, Volume
from ciml_core.errors import InputDataError
from napari_ciml._reader import BRATS_LABEL_COLORS

#: metadata key naming what a plugin-made layer is.
ROLE = "ciml_role"
OVERLAY_ROLES = ("prediction", "probability", "heatmap")
#: metadata key of the region a label layer currently shows (None = all).
REGION_KEY = "ciml_region"


def in_memory_source(array_shape: Sequence[int], affine: np.ndarray, name: str) -> NiftiSource:
    """A :class:`NiftiSource` for a volume that exists only in memory (stored as ``affine`` says;
    :meth:`NiftiSource.from_affine`). ``name`` becomes a path that does not exist, used only in
    messages."""
    return NiftiSource.from_affine(array_shape, affine, f"<in memory>/{name}")


def volume_from_array(array: np.ndarray, affine: np.ndarray, name: str) -> Volume:
    """An in-memory array in its stored voxel order -> a canonical :class:`Volume` (as if read)."""
    source = in_memory_source(array.shape, affine, name)
    data = apply_orientation(np.asarray(array), source.to_canonical)
    return Volume(data=np.ascontiguousarray(data), source=source)


def source_from_geometry(shape: Sequence[int], scale: Sequence[float],
                         translate: Sequence[float], name: str) -> NiftiSource:
    """A RAS+ source for a canonical-order layer known only by its scale and translate."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag([float(s) for s in scale[-3:]])
    affine[:3, 3] = [float(t) for t in translate[-3:]]
    return in_memory_source(shape, affine, name)


def layer_source(layer, *, synthesise: bool = True) -> NiftiSource | None:
    """The layer's :class:`NiftiSource`, or one made from its scale/translate (3-D layers)."""
    source = layer.metadata.get("nifti_source")
    if isinstance(source, NiftiSource):
        return source
    if not synthesise or layer.ndim != 3:
        return None
    return source_from_geometry(layer.data.shape, layer.scale, layer.translate, layer.name)


def is_overlay(layer) -> bool:
    """True for the layers the plugin made (predictions, probabilities, heatmaps)."""
    return layer.metadata.get(ROLE) in OVERLAY_ROLES


def image_layers(layers: Iterable) -> list:
    """3-D, single-channel Image layers that are inputs (not plugin overlays)."""
    from napari.layers import Image

    return [layer for layer in layers
            if isinstance(layer, Image) and not layer.rgb and not is_overlay(layer)]


def _name_tokens(name: str) -> list[str]:
    stem = re.sub(r"\.nii(\.gz)?$", "", name.strip(), flags=re.IGNORECASE)
    return [t for t in re.split(r"[\s_.\-]+", stem.lower()) if t]


def layer_modality(layer) -> str | None:
    """The canonical modality a layer holds: its metadata, else its name (``t2``, ``T1Gd``,
    ``BraTS_001_flair``...); None when nothing in the name is a known modality alias."""
    declared = layer.metadata.get("modality")
    if declared:
        return canonical_modality(str(declared))
    for candidate in (layer.name, *reversed(_name_tokens(layer.name))):
        modality = canonical_modality(candidate)
        if modality in KNOWN_MODALITIES:
            return modality
    return None


def auto_map(modalities: Sequence[str], layers: Sequence) -> dict[str, str | None]:
    """Model modality -> name of the image layer that holds it (None when no layer matches).

    A layer's ``metadata["modality"]`` wins over its name; each layer is used once.
    """
    mapping: dict[str, str | None] = {}
    used: set[str] = set()
    for modality in modalities:
        match = next((layer.name for layer in layers
                      if layer.name not in used and layer_modality(layer) == modality), None)
        mapping[modality] = match
        if match is not None:
            used.add(match)
    return mapping


def case_from_layers(layers, mapping: Mapping[str, str | None],
                     modalities: Sequence[str]) -> LoadedCase:
    """The model's input case from the mapped image layers, validated by ciml_core.

    Raises:
        InputDataError: a modality without a layer, a mapped layer that is gone or declares
            another modality (a checkpoint for other modalities), or data ciml_core refuses.
        GeometryError: layers of different shapes or affines.
    """
    names = [layer.name for layer in image_layers(layers)]
    missing = [m for m in modalities if not mapping.get(m)]
    if missing:
        raise InputDataError(
            f"the model expects modalities {list(modalities)}; no image layer is chosen for "
            f"{missing} (image layers: {names or 'none'})"
        )
    chosen = {}
    for m in modalities:
        name = mapping[m]
        if name not in layers:
            raise InputDataError(f"modality {m}: layer '{name}' is no longer in the viewer")
        layer = layers[name]
        declared = layer.metadata.get("modality")
        if declared and canonical_modality(str(declared)) != m:
            raise InputDataError(
                f"layer '{name}' holds {declared} but is mapped to the model's {m}; the model "
                f"expects modalities {list(modalities)} (choose the matching layers or a "
                "checkpoint trained on these modalities)"
            )
        chosen[m] = layer
    first = chosen[modalities[0]]
    sources = {m: layer_source(layer) for m, layer in chosen.items()}
    case_id = str(first.metadata.get("case_id") or first.name)
    return case_from_arrays(
        case_id,
        {m: np.asarray(layer.data) for m, layer in chosen.items()},
        sources[modalities[0]],
        sources=sources,
        names={m: layer.name for m, layer in chosen.items()},
    )


def label_colormap(convention: str | None, region: str | None = None) -> dict:
    """Label colours (BraTS: NCR red, ED green, ET yellow); with ``region``, labels outside the
    region are transparent so that only that region shows."""
    colors = dict(BRATS_LABEL_COLORS)
    if region is not None and convention is not None:
        inside = dict(get_convention(convention).regions)[region]
        colors = {k: (v if k in inside else "transparent") for k, v in colors.items()}
    return colors


def paint_value(convention: str, region: str) -> int:
    """The label value a correction of ``region`` paints (the value written for it)."""
    return dict(get_convention(convention).paint)[region]
