"""ciml_core.review: the rules behind the Review widget, without a GUI."""

from datetime import datetime, timezone

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from ciml_core.data.dataset import case_from_arrays
from ciml_core.data.nifti import load_volume
from ciml_core.errors import ConfigError, GeometryError, InputDataError, LabelError
from ciml_core.review import (
    REVIEW_LOG,
    check_not_input,
    model_agreement,
    read_reviews,
    save_review,
    write_label_volume,
)
from conftest import write_nifti

LAS_AFFINE = np.array([[-1.5, 0, 0, 40.0], [0, 1.5, 0, -30.0], [0, 0, 2.0, -12.0], [0, 0, 0, 1]])


def _label(shape=(10, 8, 6)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[2:7, 2:6, 1:5] = 2
    label[3:6, 3:5, 2:4] = 1
    label[4, 3, 2] = 4
    return label


@pytest.fixture
def las_case(tmp_path):
    """A LAS-stored label file and its loaded (canonical) volume."""
    native = _label()
    path = write_nifti(tmp_path / "in" / "case_seg.nii.gz", native, LAS_AFFINE)
    return path, load_volume(path)


def test_save_review_writes_input_geometry_and_a_record(tmp_path, las_case):
    path, volume = las_case
    model = volume.data.astype(np.uint8)
    edited = model.copy()
    edited[edited == 4] = 1  # the reviewer removes the enhancing voxel
    record = save_review(
        edited, volume.source, tmp_path / "out", case_id="case", reviewer=" Dr A ",
        decision="corrected", note="ET was a vessel", model_label=model, model_sha256="abc",
        label_convention="brats2020", reference=model, inputs=[path],
        now=datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    )
    out = tmp_path / "out" / "case.nii.gz"
    img = nib.load(out)
    assert np.array_equal(img.affine, LAS_AFFINE)
    assert "".join(nib.aff2axcodes(img.affine)) == "LAS"
    back = nib.as_closest_canonical(img).get_fdata().astype(np.uint8)
    assert np.array_equal(back, edited) and img.get_data_dtype() == np.uint8
    records = read_reviews(tmp_path / "out" / REVIEW_LOG)
    assert len(records) == 1
    rec = records[0]
    assert rec["case_id"] == "case" and rec["model_sha256"] == "abc"
    assert rec["reviewer"] == "Dr A" and rec["decision"] == "corrected"
    assert rec["time"] == "2025-01-02T03:04:05+00:00" and rec["note"] == "ET was a vessel"
    assert rec["output"] == str(out.resolve()) and rec["changed_voxels"] == 1
    assert rec["dice_vs_model"]["WT"] == 1.0 and rec["dice_vs_model"]["ET"] == 0.0
    assert rec["reference_metrics"]["ET"]["dice"] == 0.0
    assert record.to_dict() == rec


def test_review_log_appends_and_overwrite_is_explicit(tmp_path, las_case):
    _, volume = las_case
    kwargs = dict(case_id="case", reviewer="A", decision="accepted",
                  label_convention="brats2020")
    save_review(volume.data, volume.source, tmp_path / "out", **kwargs)
    with pytest.raises(FileExistsError, match="already exists"):
        save_review(volume.data, volume.source, tmp_path / "out", **kwargs)
    save_review(volume.data, volume.source, tmp_path / "out", overwrite=True, **kwargs)
    assert [r["decision"] for r in read_reviews(tmp_path / "out" / REVIEW_LOG)] == ["accepted"] * 2


def test_never_writes_over_or_inside_the_input(tmp_path, las_case):
    path, volume = las_case
    kwargs = dict(case_id="case_seg", reviewer="A", decision="accepted")
    with pytest.raises(InputDataError, match="input"):
        save_review(volume.data, volume.source, path.parent, **kwargs)
    with pytest.raises(InputDataError, match="inside the input folder"):
        save_review(volume.data, volume.source, path.parent / "sub", **kwargs)
    with pytest.raises(InputDataError, match="is an input file"):
        check_not_input(path, [path], folders=False)
    with pytest.raises(InputDataError, match="is an input file"):
        write_label_volume(volume.data, volume.source, path, protect_folders=False,
                           overwrite=True)
    assert not (path.parent / REVIEW_LOG).exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"decision": "maybe"}, ConfigError, "decision"),
        ({"reviewer": "  "}, ConfigError, "reviewer"),
        ({"case_id": "../x"}, ConfigError, "file name"),
        ({"label": "painted 3"}, LabelError, r"\[3\]"),
        ({"label": "wrong shape"}, GeometryError, "shape"),
    ],
)
def test_bad_reviews_write_nothing(tmp_path, las_case, kwargs, error, match):
    _, volume = las_case
    label = volume.data.astype(np.uint8)
    if kwargs.get("label") == "painted 3":
        label = label.copy()
        label[0, 0, 0] = 3
    elif kwargs.get("label") == "wrong shape":
        label = label[:-1]
    args = {"case_id": "case", "reviewer": "A", "decision": "accepted",
            **{k: v for k, v in kwargs.items() if k != "label"}}
    with pytest.raises(error, match=match):
        save_review(label, volume.source, tmp_path / "out", label_convention="brats2020", **args)
    assert not (tmp_path / "out").exists()


def test_model_agreement_without_convention():
    a = _label()
    b = a.copy()
    b[a == 2] = 0
    scores, changed = model_agreement(a, b, None)
    assert set(scores) == {"foreground"} and 0 < scores["foreground"] < 1
    assert changed == int((a == 2).sum())


def test_case_from_arrays_validates_like_load_case(las_case):
    _, volume = las_case
    ok = {"flair": np.ones(volume.data.shape, np.float32), "t1": np.full(volume.data.shape, 2.0)}
    case = case_from_arrays("c", ok, volume.source)
    assert case.image.shape == (2, *volume.data.shape) and case.image.dtype == np.float32
    assert case.modalities == ("flair", "t1") and case.label is None
    with pytest.raises(GeometryError, match="'my t1' \\(t1\\) has shape"):
        case_from_arrays("c", {"flair": ok["flair"], "t1": np.ones((3, 3, 3))}, volume.source,
                         names={"t1": "my t1"})
    with pytest.raises(InputDataError, match="zero"):
        case_from_arrays("c", {"flair": np.zeros(volume.data.shape)}, volume.source)
    bad = ok["flair"].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        case_from_arrays("c", {"flair": bad}, volume.source)
    with pytest.raises(GeometryError, match="reference grid"):
        case_from_arrays("c", {"flair": np.ones((4, 4, 4))}, volume.source)
    other = load_volume(write_nifti(volume.source.path.parent / "shifted.nii.gz", _label(),
                                    LAS_AFFINE + _shift(5.0)))
    with pytest.raises(GeometryError, match="affines that differ"):
        case_from_arrays("c", ok, volume.source, sources={"flair": volume.source,
                                                          "t1": other.source})


def _shift(mm: float) -> np.ndarray:
    shift = np.zeros((4, 4))
    shift[0, 3] = mm
    return shift


def test_las_fixture_is_really_las(las_case):
    path, volume = las_case
    ornt = io_orientation(nib.load(path).affine)
    assert np.array_equal(ornt, axcodes2ornt(("L", "A", "S")))
    assert ornt_transform(ornt, axcodes2ornt(("R", "A", "S")))[0, 1] == -1
    assert volume.source.spacing == (1.5, 1.5, 2.0)
