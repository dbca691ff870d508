"""Refactors must not change what the tool computes: ``predict`` and ``explain`` on one unseen
phantom with the bundled demo, compared with values stored from main before the "one source of
truth" refactor (issue 15).

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
LABEL_SHA256 = "1e3fbc5d53ad0e1c7f5dccd86502bc58ac7f143612ecd31ae2cd63a206b52474"
LABEL_COUNTS = [579929, 2098, 7567, 0, 230]
PROB_SUMS = [9868.965159472957, 2306.0600162386704, 234.36279402203567]
EXPLAIN = {
    "T1:TC": {
        "weights": {"flair": 0.010752261879635985, "t2": 0.4848414012717047,
                    "t1ce": 0.5044063368486593},
        "inside": {"flair": 0.11301573582228708, "t2": 0.3781753390118888,
                   "t1ce": 0.11549345791550474},
        "heat_sums": {"flair": 36.36900706627057, "t2": 1639.9526486856848,
                      "t1ce": 1706.1300993667392},
    },
    "T1CE:ET": {
        "weights": {"flair": 4.3139965067558434e-05, "t1": 0.32340317303896665,
                    "t2": 0.6765536869959657},
        "inside": {"flair": 0.0002583706789341234, "t1": 0.14768920134211658,
                   "t2": 0.3215816186265608},
        "heat_sums": {"flair": 0.002186993839814022, "t1": 16.395023642344313,
                      "t2": 34.298097910986144},
    },
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
