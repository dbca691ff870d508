"""``ciml-core predict`` writes labels in the dataset's convention (issue 16): the same phantom
as a BraTS 2020 and as a BraTS 2023 case gets ET painted 4 and 3; ``--labels`` overrides."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from ciml_core.cli import main
from ciml_core.data.phantoms import write_phantom_dataset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
BRATS2023_SUFFIX = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """One 64x64x48 phantom in the BraTS 2020 layout and the same files in the 2023 layout."""
    root = tmp_path_factory.mktemp("labels")
    write_phantom_dataset("brats", 1, root / "b20", seed=5001, shape=(64, 64, 48))
    (case20,) = [p for p in (root / "b20").iterdir() if p.is_dir()]
    case23 = root / "b23" / "BraTS-GLI-05001-000"
    case23.mkdir(parents=True)
    for path in case20.glob("*.nii.gz"):
        key = path.name.removesuffix(".nii.gz").rsplit("_", 1)[1]
        shutil.copy(path, case23 / f"{case23.name}-{BRATS2023_SUFFIX[key]}.nii.gz")
    return case20, case23


def _predict(case, out, *extra) -> np.ndarray:
    # native spacing: one window per case (the test is about the labels, not the resampling)
    assert main(["predict", str(case), "--out", str(out), "--device", "cpu", "--native-spacing",
                 *extra]) == 0
    (written,) = out.glob("*.nii.gz")
    return np.asarray(nib.load(written).dataobj)


def test_predict_writes_each_layouts_labels_and_labels_overrides(cases, tmp_path):
    case20, case23 = cases
    labels20 = _predict(case20, tmp_path / "p20")
    labels23 = _predict(case23, tmp_path / "p23")
    assert set(np.unique(labels20)) == {0, 1, 2, 4}
    assert set(np.unique(labels23)) == {0, 1, 2, 3}
    # the same segmentation, ET painted 3 instead of 4
    np.testing.assert_array_equal(labels23, np.where(labels20 == 4, 3, labels20))
    forced = _predict(case23, tmp_path / "p23_2020", "--labels", "brats2020")
    np.testing.assert_array_equal(forced, labels20)


def test_predict_refuses_labels_without_the_models_regions(cases, tmp_path, capsys):
    case20, _ = cases
    assert main(["predict", str(case20), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--labels", "binary"]) == 2
    err = capsys.readouterr().err
    assert "label convention 'binary'" in err and "WT" in err
    assert not any((tmp_path / "o").glob("*.nii.gz"))
