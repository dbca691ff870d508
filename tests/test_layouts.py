"""Case discovery in every supported layout, on generated trees."""

import json

import numpy as np
import pytest

from ciml_core.data.dataset import load_case
from ciml_core.data.layouts import detect_layout, discover_cases
from ciml_core.errors import ConfigError, GeometryError, InputDataError, LabelError
from conftest import tiny_case_arrays, write_nifti

BRATS_ORDER = ("flair", "t1", "t1ce", "t2")


@pytest.mark.parametrize("layout", ["brats2020", "brats2023"])
def test_brats_layouts(tmp_path, write_case, layout):
    write_case(tmp_path, layout, "Case_A", seed=0)
    write_case(tmp_path, layout, "Case_B", seed=1)
    assert detect_layout(tmp_path) == layout
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["Case_A", "Case_B"]
    assert cases[0].modalities == BRATS_ORDER
    assert cases[0].label is not None and cases[0].layout == layout

    loaded = load_case(cases[1], label_convention=layout)
    images, label = tiny_case_arrays(seed=1)
    # LPS storage -> canonical RAS flips the first two axes.
    assert np.array_equal(loaded.image[2], images["t1ce"][::-1, ::-1, :])
    expected = label if layout == "brats2020" else np.where(label == 4, 3, label)
    assert np.array_equal(loaded.label, expected[::-1, ::-1, :])


def test_single_case_folder_is_one_case(tmp_path, write_case):
    write_case(tmp_path, "brats2020", "Only")
    cases = discover_cases(tmp_path / "Only")
    assert len(cases) == 1 and cases[0].case_id == "Only"


def test_nnunet_layout(tmp_path):
    images, label = tiny_case_arrays()
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T1", "2": "T1CE", "3": "T2"},
        "labels": {"background": 0, "edema": 2}, "file_ending": ".nii.gz"}))
    for cid in ("BRATS_001", "BRATS_002"):
        for ch, name in enumerate(BRATS_ORDER):
            write_nifti(tmp_path / "imagesTr" / f"{cid}_{ch:04d}.nii.gz", images[name])
        write_nifti(tmp_path / "labelsTr" / f"{cid}.nii.gz", label)
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002"]
    assert cases[0].modalities == BRATS_ORDER
    assert cases[0].images["t2"].name == "BRATS_001_0003.nii.gz"
    assert cases[0].label.name == "BRATS_001.nii.gz"


def test_nnunet_channel_not_in_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}}))
    write_nifti(tmp_path / "imagesTr" / "c_0001.nii.gz", np.ones((3, 3, 3)))
    with pytest.raises(InputDataError, match=r"c_0001\.nii\.gz: channel 0001 is not listed"):
        discover_cases(tmp_path)


def test_autopet_layout(tmp_path):
    for cid in ("PETCT_1", "PETCT_2"):
        write_nifti(tmp_path / cid / "CTres.nii.gz", np.full((4, 4, 4), -100.0))
        write_nifti(tmp_path / cid / "SUV.nii.gz", np.ones((4, 4, 4)))
        write_nifti(tmp_path / cid / "SEG.nii.gz", np.zeros((4, 4, 4), np.uint8))
    cases = discover_cases(tmp_path)
    assert detect_layout(tmp_path) == "autopet"
    assert [c.modalities for c in cases] == [("ct", "pet")] * 2
    assert cases[0].label.name == "SEG.nii.gz"


@pytest.mark.parametrize("nested", [False, True])
def test_hecktor_layout(tmp_path, nested):
    img_dir = tmp_path / "imagesTr" if nested else tmp_path
    lab_dir = tmp_path / "labelsTr" if nested else tmp_path
    for cid in ("CHUM-001", "CHUP-002"):
        write_nifti(img_dir / f"{cid}__CT.nii.gz", np.ones((4, 4, 4)))
        write_nifti(img_dir / f"{cid}__PT.nii.gz", np.ones((4, 4, 4)))
        write_nifti(lab_dir / f"{cid}.nii.gz", np.zeros((4, 4, 4), np.uint8))
    cases = discover_cases(tmp_path, layout="auto")
    assert [c.case_id for c in cases] == ["CHUM-001", "CHUP-002"]
    assert cases[1].modalities == ("ct", "pet") and cases[1].label.name == "CHUP-002.nii.gz"


def test_manifest_csv_and_json(tmp_path, write_case):
    write_case(tmp_path / "data", "brats2020", "X1")
    rel = "data/X1/X1_{}.nii.gz"
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text("case_id,FLAIR,T1,T1CE,T2,label\n"
                        f"X1,{rel.format('flair')},{rel.format('t1')},{rel.format('t1ce')},"
                        f"{rel.format('t2')},{rel.format('seg')}\n")
    (cases,) = discover_cases(csv_path)
    assert cases.case_id == "X1" and cases.modalities == BRATS_ORDER
    assert load_case(cases, label_convention="brats2020").image.shape == (4, 12, 10, 8)

    json_path = tmp_path / "cases.json"
    json_path.write_text(json.dumps([{"flair": rel.format("flair"), "t2": rel.format("t2")}]))
    (case,) = discover_cases(json_path)
    assert case.case_id == "case_0000" and case.modalities == ("flair", "t2") and case.label is None


def test_manifest_unknown_column(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("case_id,flair,weight\nA,a.nii.gz,3\n")
    with pytest.raises(InputDataError, match=r"m\.csv: unknown column\(s\) \['weight'\]"):
        discover_cases(path)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(InputDataError, match="no such file or folder"):
        discover_cases(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="folder is empty"):
        discover_cases(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("x")
    with pytest.raises(InputDataError, match="no known dataset layout"):
        discover_cases(tmp_path / "junk")
    with pytest.raises(ConfigError, match="layout 'brats1999' is unknown"):
        discover_cases(tmp_path / "junk", layout="brats1999")


def test_missing_modality(tmp_path, write_case):
    write_case(tmp_path, "brats2020", "C")
    (tmp_path / "C" / "C_t1ce.nii.gz").unlink()
    (case,) = discover_cases(tmp_path)
    with pytest.raises(InputDataError, match=r"case C: modality \['t1ce'\] missing"):
        load_case(case, BRATS_ORDER)


def test_modalities_of_different_shape_or_affine(tmp_path, write_case):
    write_case(tmp_path, "brats2020", "C")
    write_nifti(tmp_path / "C" / "C_t2.nii.gz", np.ones((12, 10, 9), np.float32))
    (case,) = discover_cases(tmp_path)
    with pytest.raises(GeometryError, match=r"t2 .*C_t2\.nii\.gz has shape \(12, 10, 9\) but flair .*C_flair"):
        load_case(case)
    shifted = np.diag([-1.0, -1.0, 1.0, 1.0])
    shifted[0, 3] = 0.5
    write_nifti(tmp_path / "C" / "C_t2.nii.gz", np.ones((12, 10, 8), np.float32), shifted)
    with pytest.raises(GeometryError, match=r"differ by up to 0\.5 mm"):
        load_case(case)


def test_label_values_outside_convention(tmp_path, write_case):
    write_case(tmp_path, "brats2020", "C")
    _, label = tiny_case_arrays()
    write_nifti(tmp_path / "C" / "C_seg.nii.gz", np.where(label == 4, 3, label).astype(np.uint8))
    (case,) = discover_cases(tmp_path)
    with pytest.raises(LabelError, match=r"C_seg\.nii\.gz: label values \[3\] are not part of .*'brats2020'"):
        load_case(case, label_convention="brats2020")
    assert set(np.unique(load_case(case, label_convention="brats2023").label)) == {0, 1, 2, 3}


def test_all_zero_modality_is_refused(tmp_path, write_case):
    write_case(tmp_path, "brats2020", "C")
    write_nifti(tmp_path / "C" / "C_t1.nii.gz", np.zeros((12, 10, 8), np.float32))
    (case,) = discover_cases(tmp_path)
    with pytest.raises(InputDataError, match=r"C_t1\.nii\.gz: every voxel is zero"):
        load_case(case)


def test_phantom_cli_round_trip_through_discovery(tmp_path):
    import nibabel as nib

    from ciml_core.cli import main
    from ciml_core.data.phantoms import make_brats_phantom

    assert main(["phantom", "--kind", "brats", "--cases", "3", "--out", str(tmp_path),
                 "--shape", "48", "48", "32"]) == 0
    cases = discover_cases(tmp_path)
    assert detect_layout(tmp_path) == "brats2020"
    assert [c.case_id for c in cases] == ["Phantom_00000", "Phantom_00001", "Phantom_00002"]
    for seed, case in enumerate(cases):
        loaded = load_case(case, BRATS_ORDER, label_convention="brats2020")
        assert set(np.unique(loaded.label)) <= {0, 1, 2, 4}
        for value in (1, 2, 4):  # NCR, ED and ET are all present
            assert (loaded.label == value).any()
        expected = make_brats_phantom(seed, shape=(48, 48, 32))
        # Files are LPS; canonical order flips the first two axes back.
        assert np.array_equal(loaded.label, expected.label[::-1, ::-1, :])
        for i, name in enumerate(BRATS_ORDER):
            assert np.array_equal(loaded.image[i], expected.images[name][::-1, ::-1, :])
            assert np.array_equal(nib.load(case.images[name]).affine, expected.affine)
        assert np.array_equal(loaded.reference.affine, expected.affine)
