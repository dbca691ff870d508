"""The napari reader: NIfTI files and case folders -> aligned Image/Labels layers (under Xvfb)."""

import nibabel as nib
import numpy as np
import pytest

from conftest import tiny_case_arrays, write_nifti
from napari_ciml._reader import napari_get_reader


def test_reader_hook_claims_nifti_and_folders(tmp_path):
    assert napari_get_reader(str(tmp_path)) is not None
    assert napari_get_reader(str(tmp_path / "x.nii.gz")) is not None
    assert napari_get_reader(str(tmp_path / "x.png")) is None


def test_case_folder_gives_one_layer_per_modality(tmp_path, write_case):
    affine = np.diag([-1.0, -1.0, 2.5, 1.0])
    affine[:3, 3] = [100.0, 120.0, -30.0]
    write_case(tmp_path, "brats2020", "C1", affine=affine)
    layers = napari_get_reader(str(tmp_path / "C1"))(str(tmp_path / "C1"))
    names = [meta["name"] for _, meta, _ in layers]
    assert names == ["flair", "t1", "t1ce", "t2", "C1 label"]
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image"] * 4 + ["labels"]
    images, label = tiny_case_arrays()
    data, meta, _ = layers[0]
    assert np.array_equal(data, images["flair"][::-1, ::-1, :])
    assert meta["scale"] == (1.0, 1.0, 2.5)
    assert np.array_equal(meta["metadata"]["affine"], affine)
    assert meta["metadata"]["nifti_source"].header is not None
    label_data, label_meta, _ = layers[-1]
    assert label_data.dtype == np.uint8 and set(np.unique(label_data)) == {0, 1, 2, 4}
    assert label_meta["colormap"][1] == "red" and label_meta["colormap"][2] == "green"
    assert label_meta["colormap"][4] == "yellow"
    assert label_meta["metadata"]["label_convention"] == "brats2020"


def test_bad_folder_is_a_readable_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no known dataset layout"):
        napari_get_reader(str(tmp_path))(str(tmp_path))


def test_viewer_opens_case_with_plugin(make_napari_viewer, tmp_path, write_case):
    write_case(tmp_path, "brats2020", "C1")
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "C1"), plugin="napari-ciml")
    assert [layer.name for layer in viewer.layers] == ["flair", "t1", "t1ce", "t2", "C1 label"]
    assert viewer.layers["C1 label"].data.shape == viewer.layers["flair"].data.shape == (12, 10, 8)
    single = write_nifti(tmp_path / "single_t2.nii.gz", np.ones((4, 5, 6), np.float32))
    viewer.open(str(single), plugin="napari-ciml")
    assert viewer.layers["single_t2"].data.shape == (4, 5, 6)
    assert nib.load(single).shape == (4, 5, 6)


@pytest.mark.parametrize("layout", ["brats2020", "brats2023"])
def test_images_carry_the_datasets_label_convention_for_segment(tmp_path, write_case, layout):
    """The Segment widget paints in the dataset's convention (BraTS 2023: ET = 3), which the
    reader puts on every image layer of a case; one without the model's regions is ignored."""
    from ciml_core.checkpoint import describe
    from napari_ciml._widgets.segment import dataset_labels

    write_case(tmp_path, layout, "C1")
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    layers = napari_get_reader(str(folder))(str(folder))
    conventions = {meta["metadata"].get("label_convention") for _, meta, kind in layers
                   if kind == "image"}
    assert conventions == {layout}
    demo = describe("demo")  # regions WT, TC, ET
    assert dataset_labels(layout, demo) == layout
    assert dataset_labels("binary", demo) is None
    assert dataset_labels(None, demo) is None
