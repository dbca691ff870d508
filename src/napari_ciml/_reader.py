"""napari reader: NIfTI files and multimodal case folders -> Image / Labels layers.

Volumes are shown in ciml_core's canonical (RAS+) voxel order with ``scale`` = voxel spacing and
``translate`` = the canonical origin, so every modality, prediction and heatmap of a case overlays.
The file's own affine, header and orientation travel in ``layer.metadata["nifti_source"]`` so that
the writer can put an edited label volume back exactly where it came from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ciml_core.data.layouts import DEFAULT_LABEL_CONVENTION, discover_cases
from ciml_core.data.nifti import Volume, is_nifti_path, load_volume
from ciml_core.errors import CimlError

#: BraTS colours: NCR red, ED green, ET yellow (both 2020 and 2023 label values).
BRATS_LABEL_COLORS = {
    None: "transparent", 0: "transparent", 1: "red", 2: "green", 3: "yellow", 4: "yellow",
}
_LABEL_NAME = re.compile(r"([_-]seg|^seg|labelsTr|^label)", re.IGNORECASE)

LayerData = tuple[np.ndarray, dict, str]


def _geometry(volume: Volume) -> dict:
    return {
        "scale": tuple(volume.spacing),
        "translate": tuple(float(t) for t in volume.affine[:3, 3]),
    }


def _metadata(volume: Volume, **extra) -> dict:
    return {
        "nifti_source": volume.source,
        "affine": volume.source.affine.copy(),
        "source_path": str(volume.source.path),
        **extra,
    }


def _looks_like_label(path: Path) -> bool:
    return bool(_LABEL_NAME.search(path.name)) or path.parent.name == "labelsTr"


def _label_layer(volume: Volume, name: str, **extra) -> LayerData:
    data = volume.data.astype(np.uint8)
    meta = {"name": name, "metadata": _metadata(volume, **extra), **_geometry(volume)}
    meta["colormap"] = {k: v for k, v in BRATS_LABEL_COLORS.items()}
    return data, meta, "labels"


def _image_layer(volume: Volume, name: str, **extra) -> LayerData:
    meta = {"name": name, "metadata": _metadata(volume, **extra), **_geometry(volume)}
    meta["colormap"] = "gray"
    return volume.data.astype(np.float32), meta, "image"


def read_path(path: str | Path) -> list[LayerData]:
    """Read a NIfTI file or every case under a folder into napari layer data tuples."""
    path = Path(path)
    if path.is_file() and is_nifti_path(path):
        volume = load_volume(path)
        name = re.sub(r"\.nii(\.gz)?$", "", path.name)
        if _looks_like_label(path):
            return [_label_layer(volume, name)]
        return [_image_layer(volume, name)]
    layers: list[LayerData] = []
    for case in discover_cases(path):
        convention = DEFAULT_LABEL_CONVENTION[case.layout]
        for modality, file in case.images.items():
            # the dataset's label convention rides with the images: Segment paints in it
            layers.append(_image_layer(load_volume(file), modality, modality=modality,
                                       case_id=case.case_id, label_convention=convention))
        if case.label is not None:
            layers.append(_label_layer(load_volume(case.label), f"{case.case_id} label",
                                       case_id=case.case_id, label_convention=convention))
    return layers


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: claim NIfTI files and folders holding a known case layout."""
    paths = [path] if isinstance(path, str) else list(path)
    for p in map(Path, paths):
        if not (p.is_dir() or is_nifti_path(p)):
            return None
    return _read


def _read(path: str | list[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, str) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        try:
            layers.extend(read_path(p))
        except CimlError as err:
            # napari shows reader exceptions as an error notification; keep ours readable.
            raise ValueError(str(err)) from err
    return layers
