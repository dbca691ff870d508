"""The napari plugin without a model: manifest, sample data, writer, shortcuts, layer mapping.

GUI tests run under Xvfb (pytest-xvfb); the widgets driven end to end with the bundled model are
in tests/test_plugin_widgets.py.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from ciml_core.data.phantoms import make_brats_phantom
from napari_ciml._layers import auto_map, layer_modality
from napari_ciml._sample_data import glioma_sample, petct_sample
from napari_ciml._writer import write_labels

WIDGETS = ("Segment", "Explain", "Complementary weights", "Review", "Review session")
#: A LAS-stored affine (first axis runs right->left, unlike RAS+): the writer must restore it.
LAS_AFFINE = np.array([[-2.0, 0, 0, 95.0], [0, 2.0, 0, -95.0], [0, 0, 2.0, -63.0], [0, 0, 0, 1]])


def write_las_case(root: Path, case_id: str = "LAS_001", seed: int = 0,
                   shape=(96, 96, 64)) -> Path:
    """A BraTS 2020 case folder of the glioma phantom, stored in LAS voxel order."""
    phantom = make_brats_phantom(seed, shape=shape)
    to_las = ornt_transform(io_orientation(phantom.affine), axcodes2ornt(("L", "A", "S")))
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in {**phantom.images, "seg": phantom.label}.items():
        img = nib.Nifti1Image(array, phantom.affine).as_reoriented(to_las)
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        nib.save(img, str(folder / f"{case_id}_{name}.nii.gz"))
    return folder


def test_manifest_validates_and_lists_every_contribution():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-ciml")
    manifest.validate_imports()  # every python_name resolves
    contributions = manifest.contributions
    assert [w.display_name for w in contributions.widgets] == list(WIDGETS)
    assert [s.key for s in contributions.sample_data] == ["glioma", "brain", "petct"]
    assert contributions.writers[0].layer_types == ["labels"]
    assert ".nii.gz" in contributions.writers[0].filename_extensions
    assert contributions.readers[0].accepts_directories


def test_npe2_validate_cli():
    import subprocess
    import sys

    script = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(script), "validate", "napari-ciml"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sample_data_looks_like_the_reader():
    layers = glioma_sample()
    names = [meta["name"] for _, meta, _ in layers]
    assert names == ["flair", "t1", "t1ce", "t2", "Phantom_00000 label"]
    data, meta, kind = layers[0]
    assert kind == "image" and data.shape == (96, 96, 64) and data.dtype == np.float32
    assert meta["scale"] == (2.0, 2.0, 2.0)
    source = meta["metadata"]["nifti_source"]
    assert source.canonical_shape == (96, 96, 64)
    assert np.allclose(source.canonical_affine[:3, 3], meta["translate"])
    label, label_meta, label_kind = layers[-1]
    assert label_kind == "labels" and set(np.unique(label)) <= {0, 1, 2, 4}
    assert label_meta["metadata"]["label_convention"] == "brats2020"
    assert label_meta["colormap"][1] == "red" and label_meta["colormap"][4] == "yellow"
    # canonical order: the phantom is stored LPS, so x and y are flipped
    phantom = make_brats_phantom(0, shape=(96, 96, 64))
    assert np.array_equal(data, phantom.images["flair"][::-1, ::-1, :])

    pet = petct_sample()
    assert [meta["name"] for _, meta, _ in pet] == ["ct", "pet", "PETCT_00000 label"]
    assert pet[-1][1]["metadata"]["label_convention"] == "binary"


def test_sample_data_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-ciml", "glioma")
    assert [layer.name for layer in viewer.layers] == ["flair", "t1", "t1ce", "t2",
                                                       "Phantom_00000 label"]
    assert all(tuple(layer.scale) == (2.0, 2.0, 2.0) for layer in viewer.layers)


def test_reader_writer_round_trip_keeps_las_affine(make_napari_viewer, tmp_path, write_case):
    las = np.diag([-1.0, 1.0, 2.5, 1.0])
    las[:3, 3] = [40.0, -20.0, -10.0]
    write_case(tmp_path / "in", "brats2020", "C1", affine=las)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "in" / "C1"), plugin="napari-ciml")
    layer = viewer.layers["C1 label"]
    layer.data[layer.data == 4] = 1  # an edit, in canonical order
    out = tmp_path / "out" / "C1_edited.nii.gz"
    written = layer.save(str(out), plugin="napari-ciml")
    assert [Path(p) for p in written] == [out]
    img = nib.load(out)
    original = nib.load(tmp_path / "in" / "C1" / "C1_seg.nii.gz")
    assert np.array_equal(img.affine, original.affine) and img.shape == original.shape
    expected = np.asarray(original.dataobj).copy()
    expected[expected == 4] = 1
    assert np.array_equal(np.asarray(img.dataobj), expected)
    assert img.get_data_dtype() == np.uint8
    # ... and reading it back gives the edited layer again
    viewer.open(str(out), plugin="napari-ciml")
    assert np.array_equal(viewer.layers["C1_edited"].data, layer.data)


def test_writer_refuses_the_input_and_bad_labels(tmp_path, write_case):
    from napari_ciml._reader import read_path

    write_case(tmp_path, "brats2020", "C1")
    data, meta, _ = read_path(tmp_path / "C1")[-1]
    source_file = tmp_path / "C1" / "C1_seg.nii.gz"
    before = source_file.read_bytes()
    with pytest.raises(ValueError, match="input file"):
        write_labels(str(source_file), data, meta)
    assert source_file.read_bytes() == before
    bad = data.copy()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"\[3\]"):
        write_labels(str(tmp_path / "x.nii.gz"), bad, meta)
    # a Labels layer made in napari (no source): placed by its scale/translate, RAS+
    written = write_labels(str(tmp_path / "plain"), np.ones((4, 5, 6), np.uint8),
                           {"scale": (2, 2, 3), "translate": (1, 2, 3), "metadata": {}})
    img = nib.load(written[0])
    assert written[0].endswith("plain.nii.gz")
    assert np.array_equal(img.affine, np.array([[2, 0, 0, 1], [0, 2, 0, 2], [0, 0, 3, 3],
                                                [0, 0, 0, 1.0]]))


def test_auto_mapping_uses_metadata_then_names(make_napari_viewer):
    viewer = make_napari_viewer()
    shape = (4, 4, 4)
    viewer.add_image(np.ones(shape), name="BraTS_001_flair")
    viewer.add_image(np.ones(shape), name="T1Gd")
    viewer.add_image(np.ones(shape), name="scan 7", metadata={"modality": "t2w"})
    viewer.add_image(np.ones(shape), name="t1")
    viewer.add_image(np.ones(shape), name="notes")
    layers = list(viewer.layers)
    assert [layer_modality(layer) for layer in layers] == ["flair", "t1ce", "t2", "t1", None]
    assert auto_map(("flair", "t1", "t1ce", "t2", "pet"), layers) == {
        "flair": "BraTS_001_flair", "t1": "t1", "t1ce": "T1Gd", "t2": "scan 7", "pet": None}


def test_shortcuts_do_not_clash_and_cycle_regions(make_napari_viewer):
    from app_model.types import KeyBinding
    from napari._app_model import get_app_model
    from napari.utils.key_bindings import coerce_keybinding
    from napari.utils.shortcuts import default_shortcuts

    from napari_ciml._shortcuts import (
        NEXT_REGION,
        PREVIOUS_REGION,
        SHORTCUTS,
        TOGGLE_OVERLAYS,
        install_shortcuts,
        next_region,
        previous_region,
        toggle_overlays,
    )

    viewer = make_napari_viewer()
    ours = {coerce_keybinding(k) for k in SHORTCUTS}
    assert len(ours) == 3
    napari_keys = {kb for kbs in default_shortcuts.values() for kb in kbs}
    napari_keys |= {KeyBinding.validate(rule.keybinding)
                    for rule in get_app_model().keybindings}
    assert not ours & napari_keys
    for layer_type in ("image", "labels", "shapes", "points"):  # layer keymaps too
        cls = {"image": "Image", "labels": "Labels", "shapes": "Shapes", "points": "Points"}
        keymap = getattr(__import__("napari.layers", fromlist=[cls[layer_type]]),
                         cls[layer_type]).class_keymap
        assert not ours & set(keymap), layer_type

    install_shortcuts(viewer)
    assert viewer.keymap[coerce_keybinding(NEXT_REGION)] is next_region
    assert viewer.keymap[coerce_keybinding(PREVIOUS_REGION)] is previous_region
    assert viewer.keymap[coerce_keybinding(TOGGLE_OVERLAYS)] is toggle_overlays

    label = np.zeros((6, 6, 6), np.uint8)
    label[1:5, 1:5, 1:5] = 2
    label[2:4, 2:4, 2:4] = 1
    label[3, 3, 3] = 4
    layer = viewer.add_labels(label, name="c CIML", metadata={
        "label_convention": "brats2020", "ciml_role": "prediction"})
    viewer.add_image(np.ones((6, 6, 6)), name="heat", metadata={"ciml_role": "heatmap"})
    viewer.layers.selection.active = viewer.layers["heat"]
    shown = []
    for _ in range(4):
        next_region(viewer)
        shown.append(layer.metadata["ciml_region"])
    assert shown == ["WT", "TC", "ET", None]
    previous_region(viewer)
    assert layer.metadata["ciml_region"] == "ET" and layer.selected_label == 4
    assert layer.colormap.map(np.array([2]))[0][3] == 0  # ED hidden while showing ET
    assert layer.colormap.map(np.array([4]))[0][3] > 0
    previous_region(viewer)
    assert layer.selected_label == 1  # TC is painted as NCR

    assert toggle_overlays(viewer) is False
    assert not layer.visible and not viewer.layers["heat"].visible
    assert toggle_overlays(viewer) is True
    assert layer.visible and viewer.layers["heat"].visible
