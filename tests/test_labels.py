"""Label conventions <-> region masks, both directions."""

import numpy as np
import pytest

from ciml_core.data.labels import labels_to_regions, regions_to_labels, validate_label_values
from ciml_core.errors import ConfigError, LabelError

LABELS_2020 = np.array([0, 1, 2, 4, 2, 0], dtype=np.uint8)


def test_brats2020_labels_to_regions():
    wt, tc, et = labels_to_regions(LABELS_2020, "brats2020")
    assert wt.tolist() == [False, True, True, True, True, False]
    assert tc.tolist() == [False, True, False, True, False, False]
    assert et.tolist() == [False, False, False, True, False, False]


def test_brats2023_labels_to_regions():
    wt, tc, et = labels_to_regions(np.array([0, 1, 2, 3]), "brats2023")
    assert (wt.tolist(), tc.tolist(), et.tolist()) == (
        [False, True, True, True], [False, True, False, True], [False, False, False, True])


@pytest.mark.parametrize("conv,labels", [("brats2020", LABELS_2020),
                                         ("brats2023", np.array([0, 1, 2, 3, 2])),
                                         ("binary", np.array([0, 1, 1, 0])),
                                         ("hecktor", np.array([0, 1, 2, 2]))])
def test_round_trip(conv, labels):
    back = regions_to_labels(labels_to_regions(labels, conv), conv)
    assert back.dtype == np.uint8 and back.tolist() == labels.tolist()


def test_regions_to_labels_inner_region_wins():
    # ET predicted where TC was not: the voxel is still labelled ET (4), as BraTS defines it.
    wt = np.array([1, 1, 1, 0], bool)
    tc = np.array([0, 1, 0, 0], bool)
    et = np.array([0, 0, 1, 0], bool)
    assert regions_to_labels(np.stack([wt, tc, et]), "brats2020").tolist() == [2, 1, 4, 0]
    assert regions_to_labels(np.stack([wt, tc, et]), "brats2023").tolist() == [2, 1, 3, 0]


def test_validation_errors():
    with pytest.raises(LabelError, match=r"seg\.nii: label values \[3, 7\] .*expected a subset of \[0, 1, 2, 4\]"):
        validate_label_values(np.array([0, 3, 7, 1]), "brats2020", "seg.nii")
    with pytest.raises(LabelError, match="non-integer"):
        validate_label_values(np.array([0.0, 0.5]), "binary", "x.nii")
    with pytest.raises(ConfigError, match="label convention 'brats2019' is unknown"):
        labels_to_regions(LABELS_2020, "brats2019")
    with pytest.raises(ConfigError, match="expected 3 region masks"):
        regions_to_labels(np.zeros((2, 4), bool), "brats2020")
