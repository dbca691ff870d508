"""Refactors must not change what the tool computes: ``predict`` and ``explain`` on one unseen
phantom with the bundled demo, compared with stored values (first stored from main before the
"one source of truth" refactor, issue 15; stored again when the 1 mm demo was bundled and when
its stage-3 fine-tune with post-processing replaced it, as the model itself changed: re-record
only when the model or the method is meant to change).

The label map is compared bit for bit (sha256) on a CPU with the capability the values were
recorded on (float kernels differ between AVX2 and AVX512 builds); elsewhere its class counts
must agree within a few voxels. Probability sums, weights, in-target fractions and heat sums are
compared to 1e-5 relative.
"""

import hashlib

import numpy as np
import pytest
import torch

from ciml_core.checkpoint import load_checkpoint
from ciml_core.data.dataset import load_case
from ciml_core.data.layouts import discover_cases
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.explain import explain_case
from ciml_core.infer import InferenceSettings, predict_case
from ciml_core.runtime import torch_threads

pytestmark = pytest.mark.slow
CPU = InferenceSettings(device="cpu")

RECORDED_ON = "AVX512"
LABEL_SHA256 = "cac9dfb5a886c4cfbe0d0d452e1f75e85dee63eee30f4cfb73d5e6a4ee97ee8c"
LABEL_COUNTS = [579416, 2228, 7942, 0, 238]
PROB_SUMS = [10490.263300805413, 2496.9547568370904, 264.9836113183512]
EXPLAIN = {
    "T1:TC": {
        "weights": {
            "flair": 0.031642824895005923,
            "t2": 0.6127877186932678,
            "t1ce": 0.35556945641172627
        },
        "inside": {
            "flair": 0.2594295354447615,
            "t2": 0.6339490514625453,
            "t1ce": 0.21507932056508633
        },
        "heat_sums": {
            "flair": 230.86213258807038,
            "t2": 4470.823323477482,
            "t1ce": 2594.1907292653777
        }
    },
    "T1CE:ET": {
        "weights": {
            "flair": 0.003178266808183201,
            "t1": 0.5572218182556253,
            "t2": 0.43959991493619144
        },
        "inside": {
            "flair": 0.02581657410124729,
            "t1": 0.31084785728096664,
            "t2": 0.3371994559245037
        },
        "heat_sums": {
            "flair": 0.2240614334998554,
            "t1": 39.28302024684979,
            "t2": 30.990912044707102
        }
    }
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    loaded = load_checkpoint("demo", device="cpu")
    root = tmp_path_factory.mktemp("lock")
    write_phantom_dataset("brats", 1, root, seed=5003)
    (files,) = discover_cases(root)
    case = load_case(files, loaded.modalities)
    with torch_threads(1):
        prediction = predict_case(loaded, case, CPU)
        # Grad-CAM: the method these values were stored with.
        explanations = explain_case(loaded, case, "T1:TC,T1CE:ET", CPU, method="gradcam",
                                    prediction=prediction.probabilities)
    return prediction, {e.name: e for e in explanations}


def test_predict_labels_and_probabilities_unchanged(outputs):
    prediction, _ = outputs
    counts = np.bincount(prediction.label.ravel(), minlength=len(LABEL_COUNTS)).tolist()
    if torch.backends.cpu.get_cpu_capability() == RECORDED_ON:
        assert hashlib.sha256(prediction.label.tobytes()).hexdigest() == LABEL_SHA256
        assert counts == LABEL_COUNTS
    else:
        np.testing.assert_allclose(counts, LABEL_COUNTS, atol=5)
    sums = [float(p.sum(dtype=np.float64)) for p in prediction.probabilities]
    np.testing.assert_allclose(sums, PROB_SUMS, rtol=1e-5)


@pytest.mark.parametrize("pair", sorted(EXPLAIN))
def test_explain_weights_and_maps_unchanged(outputs, pair):
    _, explanations = outputs
    got, want = explanations[pair], EXPLAIN[pair]
    for aux, value in want["weights"].items():
        assert got.weights[aux] == pytest.approx(value, rel=1e-5, abs=1e-7)
        assert got.inside_fraction[aux] == pytest.approx(want["inside"][aux], rel=1e-5, abs=1e-7)
        heat = float(got.heatmaps[aux].sum(dtype=np.float64))
        assert heat == pytest.approx(want["heat_sums"][aux], rel=1e-5, abs=1e-7)
    assert set(got.weights) == set(want["weights"])
