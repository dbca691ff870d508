"""ciml_core.io, the one place outputs are written, and the one grid check / in-memory source of
ciml_core.data.nifti: values, not just "no error"."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ciml_core import io as ciml_io
from ciml_core.data.nifti import (
    AFFINE_TOLERANCE_MM,
    NiftiSource,
    check_grid,
    grid_mismatch,
    load_volume,
    nifti_image,
    write_like,
)
from ciml_core.errors import GeometryError, OutputError

LAS = np.diag([-1.5, 1.0, 2.0, 1.0])
LAS[:3, 3] = [10.0, -20.0, 5.0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def strict_umask():
    """A private umask (0077): the policy's modes must not depend on it."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# -- one permission policy ------------------------------------------------------------------------


def test_every_writer_gives_files_0644_and_folders_0755(tmp_path, strict_umask):
    text = ciml_io.atomic_write_text(tmp_path / "a" / "t.txt", "x")
    data = ciml_io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    nifti = write_like(np.ones((3, 4, 5), np.uint8), NiftiSource.from_affine((3, 4, 5), np.eye(4),
                                                                             "mem"),
                       tmp_path / "m.nii.gz")
    log = ciml_io.append_bytes(tmp_path / "logs" / "r.jsonl", b"{}\n")
    copy = ciml_io.link_or_copy(text, tmp_path / "kept.txt")
    with ciml_io.dir_output(tmp_path / "ckpt") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
        (tmp / "c.json").write_text("{}")
    assert {p.name: _mode(p) for p in (text, data, nifti, log, copy)} == {
        "t.txt": 0o644, "b.bin": 0o644, "m.nii.gz": 0o644, "r.jsonl": 0o644, "kept.txt": 0o644}
    assert [_mode(tmp_path / "ckpt" / p) for p in ("", "sub", "sub/w.bin", "c.json")] == [
        0o755, 0o755, 0o644, 0o644]
    assert ciml_io.FILE_MODE == 0o644 and ciml_io.DIR_MODE == 0o755


def test_replace_dir_leaves_linked_inputs_alone(tmp_path):
    source = tmp_path / "input.nii.gz"
    source.write_bytes(b"input")
    os.chmod(source, 0o600)
    with ciml_io.dir_output(tmp_path / "out") as tmp:
        ciml_io.place_file(source, tmp / "hard" / "a.nii.gz", "hardlink")
        ciml_io.place_file(source, tmp / "soft.nii.gz", "symlink")
        ciml_io.place_file(source, tmp / "copy.nii.gz", "copy")
    out = tmp_path / "out"
    assert _mode(source) == 0o600  # neither the hard link nor the symbolic link changed it
    assert (out / "hard" / "a.nii.gz").read_bytes() == b"input"
    assert os.readlink(out / "soft.nii.gz") == str(source.resolve())
    assert _mode(out / "copy.nii.gz") == 0o644 and (out / "copy.nii.gz").read_bytes() == b"input"
    with pytest.raises(ValueError, match="how: expected one of"):
        ciml_io.place_file(source, tmp_path / "x", "move")


# -- one message --------------------------------------------------------------------------------


def test_the_one_already_exists_message(tmp_path):
    target = tmp_path / "report.csv"
    assert ciml_io.already_exists_message(target) == (
        f"{target} already exists (use --overwrite / overwrite=True to replace it)")
    assert ciml_io.already_exists_message(target, hint="tick 'overwrite'") == (
        f"{target} already exists (tick 'overwrite')")
    target.write_text("keep")
    expected = ciml_io.already_exists_message(target)
    for refuse in (lambda: ciml_io.refuse_existing([tmp_path / "new", target], False),
                   lambda: ciml_io.atomic_write_text(target, "new"),
                   lambda: ciml_io.link_or_copy(tmp_path / "new", target)):
        with pytest.raises(FileExistsError) as err:
            refuse()
        assert str(err.value) == expected
    assert target.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["report.csv"]
    ciml_io.refuse_existing([target], True)  # overwrite: no refusal


# -- one folder swap ----------------------------------------------------------------------------


def test_replace_dir_swaps_the_whole_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    tmp = ciml_io.make_temp_dir(target)
    (tmp / "new.bin").write_text("new")
    assert ciml_io.replace_dir(tmp, target) == target
    assert {p.name: p.read_text() for p in target.iterdir()} == {"new.bin": "new"}
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary or old folder left


def test_replace_dir_without_overwrite_takes_only_an_empty_place(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with ciml_io.dir_output(empty, overwrite=False) as tmp:
        (tmp / "a").write_text("a")
    assert (empty / "a").read_text() == "a"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("keep")
    with pytest.raises(FileExistsError) as err, \
            ciml_io.dir_output(full, overwrite=False, hint="choose a new folder") as tmp:
        (tmp / "b").write_text("b")
    assert str(err.value) == f"{full} already exists (choose a new folder)"
    assert [p.name for p in full.iterdir()] == ["keep"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "full"]  # the temporary folder is gone


def test_dir_output_leaves_the_target_on_error(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), ciml_io.dir_output(target) as tmp:
        (tmp / "new.bin").write_text("new")
        raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["old.bin"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


# -- second names, rollback, appends ------------------------------------------------------------


def test_write_with_rollback_puts_the_earlier_file_back(tmp_path):
    target = tmp_path / "case.nii.gz"
    target.write_text("earlier")

    def write(overwrite: bool) -> None:
        ciml_io.atomic_write_text(target, "new", overwrite=overwrite)

    def failing_commit() -> None:
        raise OSError("log is full")

    with pytest.raises(OSError, match="log is full"):
        ciml_io.write_with_rollback(target, write, failing_commit, overwrite=True)
    assert target.read_text() == "earlier" and sorted(os.listdir(tmp_path)) == ["case.nii.gz"]
    committed = []
    ciml_io.write_with_rollback(target, write, lambda: committed.append(1), overwrite=True)
    assert target.read_text() == "new" and committed == [1]
    assert sorted(os.listdir(tmp_path)) == ["case.nii.gz"]  # no backup left behind
    fresh = tmp_path / "fresh.txt"
    with pytest.raises(OSError, match="log is full"):
        ciml_io.write_with_rollback(
            fresh, lambda o: ciml_io.atomic_write_text(fresh, "x", overwrite=o), failing_commit)
    assert not fresh.exists()


def test_append_bytes_appends_whole_records(tmp_path):
    log = tmp_path / "deep" / "reviews.jsonl"
    ciml_io.append_bytes(log, b'{"a": 1}\n')
    ciml_io.append_bytes(log, b'{"b": 2}\n')
    assert log.read_bytes() == b'{"a": 1}\n{"b": 2}\n'


def test_link_or_copy_copies_where_links_are_impossible(tmp_path, monkeypatch):
    src = tmp_path / "mask.nii.gz"
    src.write_bytes(b"mask")

    def no_links(*_args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(ciml_io.os, "link", no_links)
    copy = ciml_io.link_or_copy(src, tmp_path / "kept" / "mask.0.nii.gz")
    assert copy.read_bytes() == b"mask" and _mode(copy) == 0o644
    assert sorted(os.listdir(copy.parent)) == ["mask.0.nii.gz"]


def test_make_dirs_names_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        ciml_io.make_dirs(tmp_path / "f")


# -- one grid check -----------------------------------------------------------------------------


def _source(affine: np.ndarray, shape=(4, 5, 6), name: str = "a.nii.gz") -> NiftiSource:
    return NiftiSource.from_affine(shape, affine, Path("/data") / name)


def test_grid_mismatch_is_none_within_the_tolerance():
    a = _source(LAS)
    nudged = LAS.copy()
    nudged[0, 3] += AFFINE_TOLERANCE_MM / 2
    assert grid_mismatch(a, _source(nudged, name="b.nii.gz")) is None
    check_grid(a, _source(nudged, name="b.nii.gz"))  # no error


def test_grid_mismatch_names_both_files_beyond_the_tolerance():
    a = _source(LAS)
    moved = LAS.copy()
    moved[1, 3] += 0.5
    b = _source(moved, name="b.nii.gz")
    assert grid_mismatch(a, b, what=("prediction", "reference"), context="case C1: ",
                         hint="they must share one voxel grid") == (
        "case C1: prediction /data/a.nii.gz and reference /data/b.nii.gz have affines that "
        f"differ by up to 0.5 mm (tolerance {AFFINE_TOLERANCE_MM} mm); they must share one "
        "voxel grid")
    with pytest.raises(GeometryError) as err:
        check_grid(a, b)
    assert "/data/a.nii.gz and /data/b.nii.gz have affines" in str(err.value)


def test_grid_mismatch_compares_shapes_first_in_canonical_or_own_order():
    a = _source(LAS, shape=(4, 5, 6))
    b = _source(LAS, shape=(4, 5, 7), name="b.nii.gz")
    assert grid_mismatch(a, b) == (
        "/data/a.nii.gz has shape (4, 5, 6) but /data/b.nii.gz has shape (4, 5, 7) (canonical "
        "order); they must lie on one voxel grid")
    assert grid_mismatch(a, b, canonical=False) == (
        "/data/a.nii.gz has shape (4, 5, 6) but /data/b.nii.gz has shape (4, 5, 7); they must "
        "lie on one voxel grid")
    # The same grid stored in another voxel order: one grid canonically, two in file order.
    flipped = LAS @ np.array([[-1, 0, 0, 3], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    c = _source(flipped, shape=(4, 5, 6), name="c.nii.gz")
    assert grid_mismatch(a, c) is None
    assert "have affines that differ" in grid_mismatch(a, c, canonical=False)


# -- one in-memory NiftiSource ------------------------------------------------------------------


def test_from_affine_holds_the_given_affine_and_shape(tmp_path):
    source = NiftiSource.from_affine((4, 5, 6, 1), LAS, "<in memory>/t2")
    assert source.path == Path("<in memory>/t2") and source.shape == (4, 5, 6)
    np.testing.assert_array_equal(source.affine, LAS)
    assert source.affine.dtype == np.float64
    np.testing.assert_array_equal(source.header.get_sform(), LAS)
    np.testing.assert_array_equal(source.header.get_qform(), LAS)
    assert source.header.get_xyzt_units() == ("mm", "sec")
    assert source.canonical_shape == (4, 5, 6) and source.spacing == (1.5, 1.0, 2.0)
    # written back, it is an ordinary file at the affine's place
    data = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    path = write_like(data, source, tmp_path / "t2.nii.gz")
    img = nib.load(str(path))
    np.testing.assert_array_equal(img.affine, LAS)
    np.testing.assert_array_equal(load_volume(path).data, data)


def test_from_affine_keeps_a_given_header_and_nifti_image_matches_it():
    img = nifti_image(np.zeros((4, 5, 6), np.float32), LAS)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    source = NiftiSource.from_affine(img.shape, img.affine, "f.nii", header=img.header)
    assert source.header is not img.header and source.header.get_data_dtype() == np.float32
    fresh = NiftiSource.from_affine(img.shape, LAS, "g.nii", dtype=np.float32)
    assert fresh.header.binaryblock == source.header.binaryblock
