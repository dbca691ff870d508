"""Post-processing: enhancing-tumour components with no predicted tumour around them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ciml_core.infer as infer_module
from ciml_core.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from ciml_core.cli import _inference_settings, build_parser
from ciml_core.data.dataset import load_case
from ciml_core.data.layouts import discover_cases
from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.infer import InferenceSettings, predict_case
from ciml_core.model import ModelConfig, build_model
from ciml_core.postprocess import remove_lone_enhancement

REGIONS = ("WT", "TC", "ET")


def ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing, strict=True))
    return d2 <= radius**2


SPECK = (slice(-5, -2),) * 3  # a 3x3x3 ET speck in the far corner


def glioma_with_a_speck(shape=(48, 48, 48)) -> np.ndarray:
    """Nested masks: an enhancing rim (radius 5-7) around necrosis, in oedema (radius 10),
    and a lone ET speck in the far corner, away from it (a vessel)."""
    centre = [s // 2 - 4 for s in shape]
    wt, tc = ball(shape, centre, 10), ball(shape, centre, 7)
    et = tc & ~ball(shape, centre, 5)
    speck = np.zeros(shape, bool)
    speck[SPECK] = True
    return np.stack([wt | speck, tc | speck, et | speck])


def test_lone_speck_goes_and_the_rim_stays():
    masks = glioma_with_a_speck()
    out, removed = remove_lone_enhancement(masks, REGIONS, (1.0, 1.0, 1.0))
    assert removed == 1
    assert not out[(slice(None), *SPECK)].any()  # gone from every region: background
    expected = masks.copy()
    expected[(slice(None), *SPECK)] = False
    assert np.array_equal(out, expected)  # the glioma untouched, voxel for voxel
    assert masks[2][SPECK].all()  # the input is not modified


def test_the_shell_decides_at_min_context():
    """A 3x3x3 speck with oedema on its +z side: its 2 mm shell (the 7x7x7 box around it
    minus the speck, 316 voxels) holds a 7x7x2 slab of oedema (98 voxels, 31%): kept while
    min_context is at most that fraction, removed above it."""
    shape = (24, 24, 24)
    et = np.zeros(shape, bool)
    et[10:13, 10:13, 10:13] = True
    wt = et.copy()
    wt[8:15, 8:15, 13:15] = True  # oedema on the speck's +z side, inside its shell
    shell = np.zeros(shape, bool)
    shell[8:15, 8:15, 8:15] = True
    shell &= ~et
    fraction = (shell & wt).sum() / shell.sum()
    assert shell.sum() == 316 and fraction == pytest.approx(98 / 316)
    masks = np.stack([wt, et, et])
    kept, n_kept = remove_lone_enhancement(masks, REGIONS, (1, 1, 1), min_context=0.3)
    dropped, n_dropped = remove_lone_enhancement(masks, REGIONS, (1, 1, 1), min_context=0.32)
    assert (n_kept, n_dropped) == (0, 1)
    assert kept[2].sum() == 27 and not dropped[2].any()
    # the oedema next to a dropped speck stays (only the ET component is cleared)
    assert dropped[0].sum() == wt.sum() - 27


def test_shell_thickness_is_in_millimetres():
    """With 3 mm slices a 2 mm shell is one slice thick along z: oedema two slices away is
    outside it, so the speck is lone; at 1 mm it is inside the shell."""
    shape = (24, 24, 24)
    et = np.zeros(shape, bool)
    et[10:13, 10:13, 10:13] = True
    wt = et.copy()
    wt[:, :, 14] = True  # a slab of oedema two voxels past the speck
    wt[:, :, 8] = True
    wt[:, 8, :] = wt[:, 14, :] = wt[8, :, :] = wt[14, :, :] = True
    masks = np.stack([wt, et, et])
    assert remove_lone_enhancement(masks, REGIONS, (1.0, 1.0, 1.0))[1] == 0
    assert remove_lone_enhancement(masks, REGIONS, (1.0, 1.0, 3.0))[1] == 0
    assert remove_lone_enhancement(masks, REGIONS, (3.0, 3.0, 3.0))[1] == 1


def test_models_without_wt_and_et_are_left_alone():
    masks = glioma_with_a_speck()[:1]
    out, removed = remove_lone_enhancement(masks, ("lesion",), (1, 1, 1))
    assert removed == 0 and np.array_equal(out, masks)
    empty = np.zeros((3, 8, 8, 8), bool)
    assert remove_lone_enhancement(empty, REGIONS, (1, 1, 1))[1] == 0


@pytest.fixture
def case_and_model(tmp_path):
    write_phantom_dataset("brats", 1, tmp_path / "data", seed=3, shape=(48, 48, 48),
                          spacing=1.0)
    config = ModelConfig(width=2, patch_size=(16, 16, 16))
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "ck", build_model(config), config,
                           CheckpointInfo(label_convention="brats2020"))
    loaded = load_checkpoint(Path(path))
    (files,) = discover_cases(tmp_path / "data")
    return load_case(files, loaded.modalities, label_convention="brats2020"), loaded


def test_predict_case_applies_it_unless_switched_off(case_and_model, monkeypatch):
    """The network's output replaced by the masks above (as probabilities): predict_case
    removes the speck by default and keeps it with ``postprocess=False``; the probabilities
    are returned as predicted either way."""
    case, loaded = case_and_model
    calls = []

    def fake_windows(network, image, patch, settings, progress=None):
        calls.append(image.shape)
        return glioma_with_a_speck(image.shape[1:]).astype(np.float32)

    monkeypatch.setattr(infer_module, "sliding_window_predict", fake_windows)
    default = predict_case(loaded, case, InferenceSettings(device="cpu"))
    kept = predict_case(loaded, case, InferenceSettings(device="cpu", postprocess=False))
    assert len(calls) == 2
    assert (kept.label == 4).sum() - (default.label == 4).sum() == 27
    assert ((kept.label > 0) & (default.label == 0)).sum() == 27
    np.testing.assert_array_equal(kept.probabilities, default.probabilities)


def test_cli_switch():
    parser = build_parser()
    args = parser.parse_args(["predict", "in", "--out", "o", "--model", "demo"])
    assert _inference_settings(args).postprocess is True
    args = parser.parse_args(["predict", "in", "--out", "o", "--no-postprocess"])
    assert _inference_settings(args).postprocess is False
