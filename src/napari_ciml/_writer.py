"""napari writer: a Labels layer -> NIfTI on its source image's grid (affine, header, voxel order).

The layer's ``metadata["nifti_source"]`` (set by the reader, the sample data and the Segment
widget) says which file's geometry to write with; a Labels layer made in napari without one is
written with a RAS+ affine built from its ``scale`` and ``translate``, which is the same world
placement. Label values are checked against ``metadata["label_convention"]`` when present. The
writer never replaces the file the layer was read from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ciml_core.data.nifti import NiftiSource
from ciml_core.errors import CimlError
from ciml_core.review import write_label_volume
from napari_ciml._layers import source_from_geometry


def _source(data: np.ndarray, attributes: dict[str, Any], path: str) -> NiftiSource:
    source = attributes.get("metadata", {}).get("nifti_source")
    if isinstance(source, NiftiSource):
        return source
    scale = attributes.get("scale") or (1.0,) * data.ndim
    translate = attributes.get("translate") or (0.0,) * data.ndim
    return source_from_geometry(data.shape, scale, translate, Path(path).name)


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels layers (``.nii`` / ``.nii.gz``)."""
    array = np.asarray(data)
    if array.ndim != 3:
        raise ValueError(f"{path}: napari-ciml writes 3-D label volumes; this layer has shape "
                         f"{array.shape}")
    metadata = attributes.get("metadata", {})
    target = path if str(path).lower().endswith((".nii", ".nii.gz")) else f"{path}.nii.gz"
    try:
        written = write_label_volume(
            array, _source(array, attributes, target), target,
            label_convention=metadata.get("label_convention"),
            inputs=[metadata["source_path"]] if metadata.get("source_path") else (),
            # napari's save dialog has already asked before replacing an existing file; only
            # the input itself is protected here.
            protect_folders=False, overwrite=True,
        )
    except CimlError as err:
        raise ValueError(str(err)) from err
    return [str(written)]
