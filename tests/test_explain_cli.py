"""`ciml-core explain` and the interpretability figures (issue 5)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from ciml_core.checkpoint import CheckpointInfo, save_checkpoint
from ciml_core.cli import main
from ciml_core.data.dataset import load_case
from ciml_core.data.layouts import discover_cases
from ciml_core.explain import PairExplanation
from ciml_core.figures import (
    heatmap_grid_figure,
    save_figure,
    tumour_slice,
    weights_chart_figure,
)
from ciml_core.model import ModelConfig, build_model
from conftest import write_nifti

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAS_AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.2, 0, -20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
GRID = (20, 18, 17)


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(width=2, patch_size=(16, 16, 16))
    return save_checkpoint(tmp_path / "ckpt", build_model(config).eval(), config,
                           CheckpointInfo("brats2020"))


@pytest.fixture
def case_folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    label = np.zeros(GRID, np.uint8)
    label[6:14, 5:12, 4:12] = 2
    label[8:12, 7:10, 6:10] = 1
    label[9:11, 8:9, 7:9] = 4
    for k, name in enumerate(("flair", "t1", "t1ce", "t2")):
        x = np.zeros(GRID, np.float32)
        x[2:18, 1:17, 0:16] = rng.uniform(1, 2, (16, 16, 16))
        x[label > 0] += 1 + k
        write_nifti(tmp_path / "in" / "Case_3" / f"Case_3_{name}.nii.gz", x, LAS_AFFINE)
    write_nifti(tmp_path / "in" / "Case_3" / "Case_3_seg.nii.gz", label, LAS_AFFINE)
    return tmp_path / "in" / "Case_3"


def test_cli_explain_writes_heatmaps_weights_and_figures(tmp_path, tiny_checkpoint, case_folder,
                                                         capsys):
    out = tmp_path / "out"
    code = main(["explain", str(case_folder), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--pairs", "T1:TC,T1CE:ET", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "Case_3_heatmap_T1-TC_from_FLAIR.nii.gz", "Case_3_heatmap_T1-TC_from_T2.nii.gz",
        "Case_3_heatmap_T1-TC_from_T1CE.nii.gz", "Case_3_heatmap_T1CE-ET_from_FLAIR.nii.gz",
        "Case_3_heatmap_T1CE-ET_from_T1.nii.gz", "Case_3_heatmap_T1CE-ET_from_T2.nii.gz",
        "weights.csv", "weights.json", "Case_3_gradcam.png", "Case_3_weights.png"])
    source = nib.load(str(case_folder / "Case_3_t1.nii.gz"))
    for path in out.glob("*.nii.gz"):
        img = nib.load(str(path))
        assert np.array_equal(img.affine, source.affine) and img.shape == source.shape
        assert np.asarray(img.dataobj).min() >= 0
    with open(out / "weights.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["pair"] for r in rows} == {"T1:TC", "T1CE:ET"}
    for pair in ("T1:TC", "T1CE:ET"):
        assert sum(float(r["weight"]) for r in rows if r["pair"] == pair) == pytest.approx(1.0)
    document = json.loads((out / "weights.json").read_text())
    assert document["case"] == "Case_3"
    assert [p["auxiliary"] for p in document["pairs"]] == [["flair", "t2", "t1ce"],
                                                           ["flair", "t1", "t2"]]
    for png in ("Case_3_gradcam.png", "Case_3_weights.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("weights.csv", "weights.json", "Case_3_gradcam.png", "Case_3_weights.png"):
        # One permission policy (ciml_core.io): 0644, not tempfile's private 0o600.
        assert (out / name).stat().st_mode & 0o777 == 0o644
    assert not list(out.glob(".*"))  # no temporary file left behind
    printed = capsys.readouterr().out
    assert "T1:TC" in printed and "wrote 10 file(s)" in printed

    # A second run refuses to overwrite (before computing anything), --overwrite replaces.
    code = main(["explain", str(case_folder), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--pairs", "T1:TC", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code = main(["explain", str(case_folder), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--pairs", "T1:TC", "--device", "cpu", "--overwrite"])
    assert code == 0


def test_cli_explain_bad_pair_is_a_one_line_error(tmp_path, tiny_checkpoint, case_folder, capsys):
    code = main(["explain", str(case_folder), "--out", str(tmp_path / "o"), "--model",
                 str(tiny_checkpoint), "--pairs", "FLAIR:ET"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ciml-core explain: error:")
    assert "'FLAIR:ET'" in err and "T1CE:ET" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _fake_explanations(grid=(12, 10, 8)) -> list[PairExplanation]:
    rng = np.random.default_rng(0)
    target = np.zeros(grid, bool)
    target[4:8, 3:7, 4:7] = True
    out = []
    for primary, region, aux in (("t1", "TC", ("flair", "t2", "t1ce")),
                                 ("t1ce", "ET", ("flair", "t1", "t2"))):
        maps = {a: rng.uniform(0, 1, grid).astype(np.float32) * (i + 1)
                for i, a in enumerate(aux)}
        total = sum(float(m.sum()) for m in maps.values())
        out.append(PairExplanation(1, primary, region, aux, maps,
                                   {a: float(m.sum()) / total for a, m in maps.items()},
                                   target=target))
    return out


def test_figures_are_built_without_pyplot(tmp_path, case_folder):
    case = load_case(discover_cases(case_folder)[0], ("flair", "t1", "t1ce", "t2"))
    explanations = _fake_explanations(GRID)
    assert tumour_slice(explanations, GRID) == 5  # centre of the target's z range 4..6
    grid = heatmap_grid_figure(explanations, case, reference={"TC": explanations[0].target})
    chart = weights_chart_figure(explanations)
    assert isinstance(grid, Figure) and isinstance(chart, Figure)
    # rows = pairs; columns = 4 modalities + target + reference (+ the colour bar axes)
    image_axes = [ax for ax in grid.axes if ax.get_images()]
    assert len(image_axes) == 2 * 6
    assert [ax.get_ylabel() for ax in image_axes[::6]] == ["T1:TC", "T1CE:ET"]
    bars = chart.axes[0].patches
    assert len(bars) == 6
    assert [round(b.get_height(), 6) for b in bars[:3]] == [
        round(explanations[0].weights[a], 6) for a in explanations[0].auxiliary]
    path = save_figure(chart, tmp_path / "w.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError):
        save_figure(chart, tmp_path / "w.png")
    if "matplotlib.pyplot" in sys.modules:  # nothing was registered with pyplot's state
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
