"""The ShapeComposition experiment (paper 4.3, issue 5): runs, measures, writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ciml_core.cli import main
from ciml_core.errors import ConfigError
from ciml_core.shapes_experiment import (
    FIGURE_NAME,
    RESULT_NAME,
    ShapesConfig,
    redundancy_ratio,
    run_shapes_experiment,
    shape_pair,
    write_shapes_outputs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_redundancy_ratio_on_a_known_map():
    triangle = np.zeros((1, 8, 8), bool)
    ellipse = np.zeros((1, 8, 8), bool)
    triangle[0, :4, :6] = True
    ellipse[0, 2:8, 3:8] = True
    complementary = np.zeros((1, 8, 8))
    complementary[ellipse & ~triangle] = -2.0  # magnitudes count, not signs
    complementary[ellipse & triangle] = 0.5
    ratio, means = redundancy_ratio(complementary, triangle, ellipse)
    assert ratio == pytest.approx(4.0)
    assert means == {"auxiliary_only": 2.0, "overlap": 0.5, "primary_only": 0.0,
                     "background": 0.0}


def test_shape_pair_masks_match_the_generator():
    pair = shape_pair(7, 32)
    assert np.array_equal(pair["triangle"] | pair["ellipse"], pair["target"].astype(bool))
    assert (pair["triangle"] & pair["ellipse"]).any()
    assert (pair["ellipse"] & ~pair["triangle"]).any()


def test_experiment_runs_and_returns_a_finite_ratio(tmp_path):
    cfg = ShapesConfig(steps=4, size=32, train_pairs=16, eval_pairs=6, figure_rows=2, batch=4)
    calls = []
    result = run_shapes_experiment(cfg, progress=lambda s, n, loss: calls.append((s, n, loss)))
    assert [c[:2] for c in calls] == [(s, 4) for s in range(1, 5)]
    assert math.isfinite(result.ratio) and result.ratio > 0
    assert set(result.region_means) == {"auxiliary_only", "overlap", "primary_only", "background"}
    assert result.ratio == pytest.approx(
        result.region_means["auxiliary_only"] / result.region_means["overlap"])
    assert 0 <= result.dice <= 1 and math.isfinite(result.loss_last)
    assert result.examples["complementary"].shape == (2, 32, 32)
    written = write_shapes_outputs(result, tmp_path)
    assert [p.name for p in written] == [FIGURE_NAME, RESULT_NAME]
    document = json.loads((tmp_path / RESULT_NAME).read_text())
    assert document["ratio"] == pytest.approx(result.ratio) and document["kl"] is True
    assert document["config"]["beta"] == 0.5
    with pytest.raises(FileExistsError):
        write_shapes_outputs(result, tmp_path)


def test_cli_shapes_without_kl(tmp_path, capsys):
    code = main(["shapes", "--out", str(tmp_path), "--steps", "2", "--size", "32", "--beta", "0",
                 "--seed", "3", "--train-pairs", "8", "--eval-pairs", "4", "--width", "2"])
    assert code == 0, capsys.readouterr().err
    document = json.loads((tmp_path / RESULT_NAME).read_text())
    assert document["kl"] is False and document["config"]["seed"] == 3
    assert document["config"]["train_pairs"] == 8 and document["config"]["width"] == 2
    assert math.isfinite(document["ratio"])
    assert (tmp_path / FIGURE_NAME).read_bytes()[:4] == b"\x89PNG"
    assert "redundancy-filtering ratio" in capsys.readouterr().out
    # Refused before training (so this is fast even with the default data sizes).
    assert main(["shapes", "--out", str(tmp_path), "--steps", "2", "--size", "32"]) == 2


@pytest.mark.parametrize("field, value", [("steps", 0), ("size", 40), ("beta", -1.0),
                                          ("seed", -2)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ShapesConfig(**{field: value})
