"""NIfTI I/O: canonical order on load, the input's own order/affine/header on write, validation."""

import gzip

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt

from ciml_core.data.nifti import load_volume, write_like
from ciml_core.errors import GeometryError, InputDataError
from conftest import write_nifti


def affine_for(codes: tuple[str, str, str], zooms=(2.0, 1.5, 3.0), origin=(10.0, -20.0, 5.0)):
    """An affine whose voxel axes point along ``codes`` (e.g. L, A, S)."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for i, (axis, flip) in enumerate(axcodes2ornt(codes)):
        affine[int(axis), i] = flip * zooms[i]
    affine[:3, 3] = origin
    return affine


@pytest.mark.parametrize("codes", [("L", "A", "S"), ("L", "S", "A"), ("P", "I", "R")])
def test_round_trip_keeps_affine_and_voxels(tmp_path, codes):
    affine = affine_for(codes)
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    src = write_nifti(tmp_path / "in.nii.gz", data, affine)

    vol = load_volume(src)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    out = write_like(vol.data, vol.source, tmp_path / "out.nii.gz")

    img = nib.load(out)
    assert np.array_equal(img.affine, nib.load(src).affine)
    assert np.array_equal(np.asarray(img.dataobj), data)
    assert nib.aff2axcodes(img.affine) == codes


def test_canonical_order_and_spacing_for_lsa(tmp_path):
    # LSA: voxel axis 1 runs superior, axis 2 anterior, so canonical order swaps them.
    affine = affine_for(("L", "S", "A"), zooms=(2.0, 1.5, 3.0))
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    vol = load_volume(write_nifti(tmp_path / "lsa.nii", data, affine))
    assert vol.data.shape == (5, 7, 6)
    assert vol.spacing == (2.0, 3.0, 1.5)
    # Voxel (i, j, k) of the file is at canonical (4 - i, k, j) because L flips and S/A swap.
    assert vol.data[4 - 1, 3, 2] == data[1, 2, 3]
    # World coordinates agree: the canonical affine maps the moved voxel to the same point.
    world_file = affine @ np.array([1, 2, 3, 1])
    world_canon = vol.affine @ np.array([4 - 1, 3, 2, 1])
    assert np.allclose(world_file, world_canon)


def test_write_labels_uint8_keeps_header_fields(tmp_path):
    affine = affine_for(("L", "A", "S"))
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), affine)
    img.header["descrip"] = b"source header"
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, tmp_path / "in.nii.gz")
    vol = load_volume(tmp_path / "in.nii.gz")
    labels = np.zeros(vol.data.shape, np.int64)
    labels[0, 1, 2] = 4
    out = nib.load(write_like(labels, vol.source, tmp_path / "seg.nii.gz", dtype=np.uint8))
    assert out.get_data_dtype() == np.uint8
    assert out.header["descrip"].tobytes().startswith(b"source header")
    assert out.header.get_xyzt_units() == ("mm", "sec")
    # canonical (0,1,2) = file (3,1,2) because axis 0 is L (flipped)
    assert np.asarray(out.dataobj)[3, 1, 2] == 4 and np.asarray(out.dataobj).sum() == 4


def test_write_refuses_overwrite_and_wrong_grid(tmp_path):
    vol = load_volume(write_nifti(tmp_path / "in.nii.gz", np.ones((4, 5, 6), np.float32)))
    out = write_like(vol.data, vol.source, tmp_path / "out.nii.gz")
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        write_like(vol.data * 2, vol.source, out)
    assert out.read_bytes() == before
    write_like(vol.data * 2, vol.source, out, overwrite=True)
    assert np.asarray(nib.load(out).dataobj).max() == 2
    with pytest.raises(GeometryError, match="does not match the grid"):
        write_like(np.ones((3, 3, 3)), vol.source, tmp_path / "bad.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_trailing_singleton_axis_is_squeezed(tmp_path):
    data = np.random.default_rng(1).random((4, 5, 6, 1)).astype(np.float32)
    vol = load_volume(write_nifti(tmp_path / "4d.nii.gz", data))
    assert vol.data.shape == (4, 5, 6)
    assert vol.source.shape == (4, 5, 6)


@pytest.mark.parametrize("shape", [(8, 9), (4, 5, 6, 3)])
def test_wrong_dimensionality_is_refused(tmp_path, shape):
    path = write_nifti(tmp_path / "bad.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(GeometryError, match=r"bad\.nii\.gz.*expected a 3-D volume"):
        load_volume(path)


def test_nan_and_inf_are_refused(tmp_path):
    data = np.ones((4, 4, 4), np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputDataError, match=r"nan\.nii\.gz: 2 voxel\(s\) are NaN or Inf"):
        load_volume(path)


def test_all_zero_is_refused_when_asked(tmp_path):
    path = write_nifti(tmp_path / "zero.nii.gz", np.zeros((4, 4, 4), np.float32))
    assert load_volume(path).data.sum() == 0
    with pytest.raises(InputDataError, match=r"zero\.nii\.gz: every voxel is zero"):
        load_volume(path, allow_empty=False)


def test_truncated_gzip_is_refused(tmp_path):
    path = write_nifti(tmp_path / "full.nii.gz", np.random.default_rng(0).random((16, 16, 16)))
    raw = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputDataError, match=r"cut\.nii\.gz: .*(truncated|corrupt|readable)"):
        load_volume(cut)


def test_gzip_of_non_nifti_and_other_files_are_refused(tmp_path):
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    with pytest.raises(InputDataError, match=r"fake\.nii\.gz"):
        load_volume(fake)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(InputDataError, match=r"notes\.txt: not a NIfTI file"):
        load_volume(txt)
    with pytest.raises(InputDataError, match="file not found"):
        load_volume(tmp_path / "missing.nii.gz")


def test_written_files_are_world_readable(tmp_path):
    vol = load_volume(write_nifti(tmp_path / "in.nii.gz", np.ones((4, 5, 6), np.float32)))
    out = write_like(vol.data, vol.source, tmp_path / "out.nii.gz")
    assert out.stat().st_mode & 0o777 == 0o644
