"""Refactors must not change what the tool computes: ``predict`` and ``explain`` on one unseen
phantom with the bundled demo, compared with stored values (first stored from main before the
"one source of truth" refactor, issue 15; stored again when the 1 mm demo was bundled, as the
model itself changed: re-record only when the model or the method is meant to change).

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
LABEL_SHA256 = "b480ea2f5232eca8294945d67a571857e4bef8863189eebaa3b9290e073f21ec"
LABEL_COUNTS = [579422, 2165, 7999, 0, 238]
PROB_SUMS = [10614.3909768649, 2431.2039957946795, 255.93171863376477]
EXPLAIN = {
    "T1:TC": {
        "weights": {"flair": 0.028939599183646164, "t2": 0.6120828098622445,
                    "t1ce": 0.35897759095410936},
        "inside": {"flair": 0.19819448627880298, "t2": 0.625171669071194,
                   "t1ce": 0.2136692815612784},
        "heat_sums": {"flair": 230.78074624605324, "t2": 4881.094818487138,
                      "t1ce": 2862.690523122925},
    },
    "T1CE:ET": {
        "weights": {"flair": 0.0026423458745674713, "t1": 0.5161903954897861,
                    "t2": 0.4811672586356464},
        "inside": {"flair": 0.020633814444574072, "t1": 0.30894369485052525,
                   "t2": 0.35165456313250293},
        "heat_sums": {"flair": 0.15546136409579958, "t1": 30.36985573628897,
                      "t2": 28.30928346879591},
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
