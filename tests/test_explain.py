"""Grad-CAM interpretability (issue 5, SPEC 7): pairs, Eq. 14-17, the closed-form oracle, the
cross-check against MONAI's Grad-CAM, whole-volume modes and NIfTI outputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from nibabel.orientations import apply_orientation
from torch import nn

from ciml_core.checkpoint import CheckpointInfo, LoadedModel
from ciml_core.data.dataset import load_case
from ciml_core.data.layouts import discover_cases
from ciml_core.data.preprocess import preprocess_image, uncrop
from ciml_core.errors import Cancelled, ConfigError, InputDataError
from ciml_core.explain import (
    complementary_weights,
    dilate_mm,
    explain_case,
    inside_fraction,
    list_pairs,
    parse_pairs,
    write_explanations,
)
from ciml_core.infer import InferenceSettings
from ciml_core.model import CIMLOutput, ModelConfig, TaskDecomposition, build_model
from conftest import write_nifti

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = InferenceSettings(device="cpu")

PATCH = 16
#: An LAS-stored affine with anisotropic spacing and an offset (not the canonical RAS order).
LAS_AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.2, 0, -20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
LPS_AFFINE = np.array([[-1.0, 0, 0, 40.0], [0, -1.0, 0, 30.0], [0, 0, 1.0, -7.0], [0, 0, 0, 1]])
GRID = (22, 20, 19)
#: The imaged (nonzero) box: exactly one 16^3 patch, so that the ROI window is the whole crop.
BOX = (slice(3, 19), slice(2, 18), slice(1, 17))


def _write_case(root: Path, affine: np.ndarray = LAS_AFFINE, case_id: str = "Case_7") -> Path:
    """A BraTS 2020 case whose nonzero box is BOX, with a bright 'tumour' blob."""
    rng = np.random.default_rng(3)
    for k, name in enumerate(("flair", "t1", "t1ce", "t2")):
        x = np.zeros(GRID, np.float32)
        x[BOX] = rng.uniform(1, 2, size=(16, 16, 16))
        x[8:13, 7:12, 6:11] += 1.0 + k
        write_nifti(root / case_id / f"{case_id}_{name}.nii.gz", x, affine)
    return root / case_id


def _loaded(model: nn.Module, config: ModelConfig) -> LoadedModel:
    return LoadedModel(model.eval(), config, CheckpointInfo("brats2020"), Path("<test>"), "0" * 64)


def _tiny_ciml(seed: int = 0, variant: str = "full") -> LoadedModel:
    torch.manual_seed(seed)
    config = ModelConfig(width=2, patch_size=(PATCH,) * 3, variant=variant)
    return _loaded(build_model(config), config)


def _roi_mask() -> np.ndarray:
    mask = np.zeros(GRID, bool)
    mask[6:14, 5:12, 4:12] = True  # inside BOX
    return mask


# ------------------------------------------------------------------------------ pairs


def test_list_pairs_brats_gives_the_six_paper_pairs():
    decomposition = TaskDecomposition.brats()
    assert list_pairs(decomposition) == [(0, "WT"), (1, "TC"), (2, "WT"), (2, "TC"), (3, "TC"),
                                         (3, "ET")]
    assert parse_pairs("all", decomposition) == list_pairs(decomposition)
    assert len(list_pairs(TaskDecomposition.petct())) == 2


def test_parse_pairs_is_case_insensitive_and_names_bad_items():
    decomposition = TaskDecomposition.brats()
    assert parse_pairs("FLAIR:WT, t1ce:et,FLAIR:WT", decomposition) == [(0, "WT"), (3, "ET")]
    with pytest.raises(ConfigError) as err:
        parse_pairs("FLAIR:WT,T1:ET", decomposition)
    message = str(err.value)
    assert "'T1:ET'" in message and "FLAIR:WT" in message and "T1CE:ET" in message
    for bad in ("", "T1", "T3:TC"):
        with pytest.raises(ConfigError, match="pairs"):
            parse_pairs(bad, decomposition)


# ------------------------------------------------------------------------------ weights


def test_weights_sum_to_one_scale_invariance_and_sensitivity():
    rng = np.random.default_rng(0)
    maps = {name: rng.uniform(0, 1, (6, 5, 4)).astype(np.float32) for name in ("a", "b", "c")}
    weights = complementary_weights(maps)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
    sums = {k: float(v.sum(dtype=np.float64)) for k, v in maps.items()}
    for k in maps:
        assert weights[k] == pytest.approx(sums[k] / sum(sums.values()), rel=1e-12)
    # A global rescaling of all maps of the pair leaves the weights unchanged...
    rescaled = complementary_weights({k: v * 37.5 for k, v in maps.items()})
    for k in maps:
        assert rescaled[k] == pytest.approx(weights[k], rel=1e-6)
    # ...scaling one modality's map changes them (its weight rises, the others fall).
    boosted = complementary_weights({**maps, "b": maps["b"] * 3})
    assert sum(boosted.values()) == pytest.approx(1.0)
    assert boosted["b"] > weights["b"] + 0.1
    assert boosted["a"] < weights["a"] and boosted["c"] < weights["c"]


def test_all_zero_maps_give_equal_weights_not_nan():
    zeros = {name: np.zeros((4, 4, 4), np.float32) for name in ("flair", "t1", "t2")}
    weights = complementary_weights(zeros)
    assert weights == {"flair": pytest.approx(1 / 3), "t1": pytest.approx(1 / 3),
                       "t2": pytest.approx(1 / 3)}
    # One non-zero voxel is enough to take all the weight.
    zeros["t1"][1, 2, 3] = 1e-30
    assert complementary_weights(zeros)["t1"] == pytest.approx(1.0)


def test_weights_reject_negative_maps_and_mixed_grids():
    with pytest.raises(InputDataError, match=">= 0"):
        complementary_weights({"a": -np.ones((2, 2)), "b": np.ones((2, 2))})
    with pytest.raises(InputDataError, match="one grid"):
        complementary_weights({"a": np.ones((2, 2)), "b": np.ones((3, 2))})


# ------------------------------------------------------------------------------ closed-form oracle


class _Gate(nn.Module):
    def __init__(self, num_messages: int) -> None:
        super().__init__()
        self.representation_taps = nn.ModuleList(nn.Identity() for _ in range(num_messages))


class _Segmentor(nn.Module):
    def __init__(self, num_messages: int) -> None:
        super().__init__()
        self.gates = nn.ModuleList([_Gate(num_messages)])


class LinearCIML(nn.Module):
    """A CIML-shaped network whose maps and head are linear, so Grad-CAM has a closed form.

    Message k of segmentor i: A = W[j] · avgpool2(x) + b[j] (C channels at P/2), j its sender.
    Head: logit_r = sum_k sum_c V[i, k, c, r] · nearest_up2(A_k^c). Hence, for a target T inside
    the window, dy/dA_k^c[m] = V[i, k, c, r] · |T ∩ block(m)| and alpha_kc = V[i, k, c, r] · |T| / N.
    """

    def __init__(self, config: ModelConfig, channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        d = config.decomposition
        t, m = d.num_tasks, len(d.modalities)
        g = torch.Generator().manual_seed(seed)
        self.segmentors = nn.ModuleList(_Segmentor(t - 1) for _ in range(t))
        self.register_buffer("W", 0.5 * torch.randn(t, channels, m, generator=g))
        self.register_buffer("b", 0.5 * torch.randn(t, channels, generator=g))
        self.register_buffer("V", 0.5 * torch.randn(t, t - 1, channels, 2, generator=g))

    def message_sources(self, i: int) -> list[int]:
        return [j for j in range(len(self.segmentors)) if j != i]

    def representation(self, x: torch.Tensor, j: int) -> torch.Tensor:
        pooled = F.avg_pool3d(x, 2)
        w, b = self.W[j].to(x.dtype), self.b[j].to(x.dtype)  # float64 in the test's reference
        return torch.einsum("cm,bm...->bc...", w, pooled) + b.view(1, -1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> CIMLOutput:
        d = self.config.decomposition
        logits = []
        for i, segmentor in enumerate(self.segmentors):
            n_out = len(d.tasks[i].regions)
            out = 0
            for k, j in enumerate(self.message_sources(i)):
                a = segmentor.gates[0].representation_taps[k](self.representation(x, j))
                up = F.interpolate(a, scale_factor=2, mode="nearest")
                out = out + torch.einsum("bc...,co->bo...", up, self.V[i, k, :, :n_out])
            logits.append(out)
        return CIMLOutput(logits, tuple(t.regions for t in d.tasks), torch.zeros(d.num_tasks))


def test_closed_form_oracle_linear_model(tmp_path):
    config = ModelConfig(width=2, patch_size=(PATCH,) * 3)
    model = LinearCIML(config)
    loaded = _loaded(model, config)
    case = load_case(discover_cases(_write_case(tmp_path))[0], loaded.modalities)
    roi = _roi_mask()
    explanations = explain_case(loaded, case, target_mask=roi, settings=CPU, extent="window",
                                method="gradcam")
    assert [(e.segmentor, e.region) for e in explanations] == list_pairs(config.decomposition)

    pre = preprocess_image(case.image, case.modalities)
    assert pre.image.shape[1:] == (PATCH,) * 3  # the window is exactly the crop
    x = torch.from_numpy(pre.image)[None].double()
    n_target, n_low = int(roi.sum()), (PATCH // 2) ** 3
    mixed = 0  # maps with both positive and clipped voxels: the ReLU matters there
    for e in explanations:
        assert e.target_source == "mask" and e.target_voxels == n_target
        region = config.decomposition.tasks[e.segmentor].regions.index(e.region)
        for k, (j, aux) in enumerate(zip(model.message_sources(e.segmentor), e.auxiliary,
                                         strict=True)):
            a = model.representation(x, j)[0]  # [C, 8, 8, 8], float64
            alpha = model.V[e.segmentor, k, :, region].double() * n_target / n_low
            expected = torch.relu((alpha.view(-1, 1, 1, 1) * a).sum(0))
            mixed += bool(expected.max() > 0 and (expected == 0).any())
            np.testing.assert_allclose(e.level_maps[aux], expected.numpy(), atol=1e-6, rtol=0)
            image = F.interpolate(expected[None, None], size=(PATCH,) * 3, mode="trilinear",
                                  align_corners=False)[0, 0].numpy()
            np.testing.assert_allclose(e.heatmaps[aux], uncrop(image, pre.box), atol=1e-6, rtol=0)
            assert e.heatmaps[aux].dtype == np.float32 and e.heatmaps[aux].shape == GRID
        sums = {aux: float(e.heatmaps[aux].sum(dtype=np.float64)) for aux in e.auxiliary}
        for aux in e.auxiliary:
            assert e.weights[aux] == pytest.approx(sums[aux] / sum(sums.values()), rel=1e-9)
    assert mixed >= 6


# ------------------------------------------------------------------------------ MONAI cross-check


class _SegScore(nn.Module):
    """Seg-Grad-CAM target as a one-class 'classifier' for MONAI: sum of a region's logit over
    a mask."""

    def __init__(self, net: nn.Module, segmentor: int, channel: int, mask: torch.Tensor) -> None:
        super().__init__()
        self.net, self.segmentor, self.channel = net, segmentor, channel
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x).logits[self.segmentor][:, self.channel]
        return (logits * self.mask).sum(dim=(1, 2, 3))[:, None]


def test_matches_monai_gradcam_on_the_same_layer_and_target(tmp_path):
    loaded = _tiny_ciml(seed=1)
    case = load_case(discover_cases(_write_case(tmp_path))[0], loaded.modalities)
    roi = _roi_mask()
    # Three pairs (9 maps) from three segmentors and all three regions keep the test short.
    explanations = explain_case(loaded, case, "T1:TC,T2:WT,T1CE:ET", target_mask=roi,
                                settings=CPU, extent="window", method="gradcam")
    pre = preprocess_image(case.image, case.modalities)
    x = torch.from_numpy(pre.image)[None]
    mask = torch.from_numpy(roi[pre.box.slices]).float()[None]
    decomposition = loaded.config.decomposition
    checked = 0
    for e in explanations:
        channel = decomposition.tasks[e.segmentor].regions.index(e.region)
        score = _SegScore(loaded.model, e.segmentor, channel, mask)
        for k, aux in enumerate(e.auxiliary):
            layer = f"net.segmentors.{e.segmentor}.gates.0.representation_taps.{k}"
            cam = GradCAM(nn_module=score, target_layers=layer)
            reference = cam.compute_map(x, class_idx=0)  # raw: no upsampling, no normalisation
            assert reference.shape == (1, 1, 8, 8, 8)
            np.testing.assert_allclose(e.level_maps[aux], reference[0, 0].detach().numpy(),
                                       atol=1e-5, rtol=0)
            upsampled = cam.upsampler(x.shape[2:])(reference)[0, 0].detach().numpy()
            np.testing.assert_allclose(e.heatmaps[aux][pre.box.slices], upsampled, atol=1e-5,
                                       rtol=0)
            checked += float(reference.detach().max()) > 0
    assert checked >= 6  # most maps are non-trivial, so the comparison means something


# ------------------------------------------------------------------------------ whole volumes


def test_sliding_mode_single_window_equals_roi_and_covers_larger_volumes(tmp_path):
    loaded = _tiny_ciml(seed=2)
    case = load_case(discover_cases(_write_case(tmp_path))[0], loaded.modalities)
    roi = _roi_mask()
    one = explain_case(loaded, case, "T1:TC,T1CE:ET", target_mask=roi, settings=CPU)
    calls = []
    sliding = explain_case(loaded, case, "T1:TC,T1CE:ET", target_mask=roi, mode="sliding",
                           settings=CPU, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 1)]  # one window, Gaussian weights divide out
    for a, b in zip(one, sliding, strict=True):
        assert b.mode == "sliding" and b.window is None and b.level_maps == {}
        for aux in a.auxiliary:
            np.testing.assert_allclose(b.heatmaps[aux], a.heatmaps[aux], atol=1e-6, rtol=1e-5)

    # A 20^3 crop needs 8 windows (overlap 0.5); maps are finite, >= 0, zero outside the box.
    big = tmp_path / "big"
    for name in ("flair", "t1", "t1ce", "t2"):
        x = np.zeros((24, 24, 22), np.float32)
        x[2:22, 2:22, 1:21] = np.random.default_rng(5).uniform(1, 2, (20, 20, 20))
        write_nifti(big / "Big_1" / f"Big_1_{name}.nii.gz", x, LPS_AFFINE)
    case = load_case(discover_cases(big)[0], loaded.modalities)
    mask = np.zeros((24, 24, 22), bool)
    mask[5:19, 4:18, 3:20] = True
    calls.clear()
    result = explain_case(loaded, case, "T2:WT", target_mask=mask, mode="sliding", settings=CPU,
                          progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (8, 8) and len(calls) == 8
    heat = np.stack(list(result[0].heatmaps.values()))
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() > 0
    assert heat[:, :2].max() == 0 and heat[:, 22:].max() == 0
    assert sum(result[0].weights.values()) == pytest.approx(1.0)


def test_roi_mode_predicted_target_window_and_progress(tmp_path):
    loaded = _tiny_ciml(seed=3)
    case = load_case(discover_cases(_write_case(tmp_path))[0], loaded.modalities)
    # A given prediction: WT everywhere in a block, TC inside it, ET empty.
    probs = np.zeros((3, *GRID), np.float32)
    probs[0, 6:14, 5:13, 4:12] = 0.9
    probs[1, 8:12, 7:11, 6:10] = 0.8
    probs[2, 8:12, 7:11, 6:10] = 0.2
    calls = []
    explanations = explain_case(loaded, case, prediction=probs, settings=CPU,
                                progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 6) for i in range(1, 7)]  # one backward pass per pair
    by_name = {e.name: e for e in explanations}
    assert set(by_name) == {"FLAIR:WT", "T1:TC", "T2:WT", "T2:TC", "T1CE:TC", "T1CE:ET"}
    assert by_name["T1:TC"].auxiliary == ("flair", "t2", "t1ce")
    assert by_name["FLAIR:WT"].target_voxels == 8 * 8 * 8
    assert by_name["T1:TC"].target_voxels == 4 ** 3
    assert np.array_equal(by_name["T2:TC"].target, probs[1] > 0.5)
    # Nothing predicted for ET: zero maps, equal weights, no NaN; the window falls back to WT.
    et = by_name["T1CE:ET"]
    assert et.target_voxels == 0
    assert all(h.max() == 0 for h in et.heatmaps.values())
    assert et.weights == {aux: pytest.approx(1 / 3) for aux in et.auxiliary}
    for e in explanations:
        assert e.window == ((3, 19), (2, 18), (1, 17))  # the whole (16^3) crop, full-grid coords
        assert all(h.shape == GRID and h.dtype == np.float32 and h.min() >= 0
                   for h in e.heatmaps.values())


def test_roi_window_is_centred_on_the_target_and_padded(tmp_path):
    """A crop larger than the patch: the window follows the target; a smaller one is padded."""
    loaded = _tiny_ciml(seed=4)
    root = tmp_path / "wide"
    for name in ("flair", "t1", "t1ce", "t2"):
        x = np.zeros((40, 12, 16), np.float32)
        x[:, 1:11, :] = np.random.default_rng(1).uniform(1, 2, (40, 10, 16))
        write_nifti(root / "W_1" / f"W_1_{name}.nii.gz", x, LPS_AFFINE)
    case = load_case(discover_cases(root)[0], loaded.modalities)
    mask = np.zeros((40, 12, 16), bool)
    mask[28:34, 4:8, 6:10] = True
    (e,) = explain_case(loaded, case, "FLAIR:WT", target_mask=mask, settings=CPU)
    # target_mask is in canonical order: its centre of mass is at x = 30.5.
    centre_x = np.argwhere(e.target).mean(axis=0)[0]
    (x0, x1), (y0, y1), (z0, z1) = e.window
    assert x1 - x0 == y1 - y0 == z1 - z0 == PATCH
    assert abs((x0 + x1) / 2 - centre_x) <= 1
    assert y0 == 1 - 3 and y1 == 11 + 3  # the 10-voxel axis is padded to 16, centred
    heat = sum(e.heatmaps.values())
    assert heat[:x0].max() == 0 and heat[x1:].max() == 0 and heat.max() > 0


def test_progress_exception_cancels_and_removes_hooks(tmp_path):
    loaded = _tiny_ciml()
    case = load_case(discover_cases(_write_case(tmp_path))[0], loaded.modalities)

    def cancel(done: int, total: int) -> None:
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        explain_case(loaded, case, target_mask=_roi_mask(), settings=CPU, progress=cancel)
    for segmentor in loaded.model.segmentors:
        for tap in segmentor.gates[0].representation_taps:
            assert not tap._forward_hooks


def test_bad_inputs_are_clear_errors(tmp_path):
    loaded = _tiny_ciml()
    case = load_case(discover_cases(_write_case(tmp_path))[0], loaded.modalities)
    with pytest.raises(InputDataError, match="target mask has shape"):
        explain_case(loaded, case, target_mask=np.ones((3, 3, 3), bool))
    with pytest.raises(InputDataError, match="empty"):
        explain_case(loaded, case, target_mask=np.zeros(GRID, bool))
    with pytest.raises(ConfigError, match="mode"):
        explain_case(loaded, case, mode="tiles")
    with pytest.raises(ConfigError, match="T1:ET"):
        explain_case(loaded, case, "T1:ET")
    baseline = _tiny_ciml(variant="baseline")
    with pytest.raises(ConfigError, match="baseline"):
        explain_case(baseline, case, target_mask=_roi_mask())


# ------------------------------------------------------------------------------ NIfTI outputs


@pytest.mark.parametrize("affine", [LAS_AFFINE, LPS_AFFINE], ids=["LAS", "LPS"])
def test_heatmap_nifti_has_the_input_affine_and_shape(tmp_path, affine):
    loaded = _tiny_ciml(seed=5)
    folder = _write_case(tmp_path / "in", affine)
    case = load_case(discover_cases(folder)[0], loaded.modalities)
    explanations = explain_case(loaded, case, "T2:TC", target_mask=_roi_mask(), settings=CPU)
    out = tmp_path / "out"
    written = write_explanations(explanations, case, out)
    source = nib.load(str(folder / "Case_7_t1.nii.gz"))
    heatmaps = [p for p in written if p.name.endswith(".nii.gz")]
    assert sorted(p.name for p in heatmaps) == [
        "Case_7_heatmap_T2-TC_from_FLAIR.nii.gz", "Case_7_heatmap_T2-TC_from_T1.nii.gz",
        "Case_7_heatmap_T2-TC_from_T1CE.nii.gz"]
    for path in heatmaps:
        img = nib.load(str(path))
        assert np.array_equal(img.affine, source.affine)
        assert img.shape == source.shape
        assert np.array_equal(img.header.get_sform(), source.header.get_sform())
        aux = path.name.split("_from_")[1].removesuffix(".nii.gz").lower()
        native = apply_orientation(explanations[0].heatmaps[aux], case.reference.from_canonical)
        np.testing.assert_array_equal(np.asarray(img.dataobj), native)
    assert (out / "weights.csv").is_file() and (out / "weights.json").is_file()
    with pytest.raises(FileExistsError):
        write_explanations(explanations, case, out)
    assert len(write_explanations(explanations, case, out, overwrite=True)) == 5


def test_gradcam_window_works_under_inference_mode():
    """A GUI worker may call it inside torch.inference_mode(); the maps must not change."""
    from ciml_core.explain import gradcam_window

    loaded = _tiny_ciml(seed=6)
    x = torch.randn(1, 4, PATCH, PATCH, PATCH)
    target = torch.zeros(1, 1, PATCH, PATCH, PATCH, dtype=torch.bool)
    target[..., 4:12, 4:12, 4:12] = True
    plain, _ = gradcam_window(loaded.model, x, target, [(1, "TC")], [0], num_messages=3)
    with torch.inference_mode():
        inside, _ = gradcam_window(loaded.model, x.clone(), target, [(1, "TC")], [0],
                                   num_messages=3)
    assert plain.shape == (1, 3, PATCH, PATCH, PATCH) and plain.max() > 0
    assert torch.equal(plain, inside)


# ------------------------------------------------------------------------------ bound to the target


def test_hirescam_oracle_and_target_bound_maps(tmp_path):
    """HiResCAM on the linear model: heat_k[m] = ReLU(sum_c V[i,k,c,r] |T ∩ block(m)| A_k^c[m]).
    With extent "target" the maps are the window maps times the dilated target, the weights come
    from those, and inside_fraction is the share of the window map's heat in the dilated target."""
    config = ModelConfig(width=2, patch_size=(PATCH,) * 3)
    model = LinearCIML(config, seed=3)
    loaded = _loaded(model, config)
    case = load_case(discover_cases(_write_case(tmp_path))[0], loaded.modalities)
    roi = _roi_mask()
    window = explain_case(loaded, case, target_mask=roi, settings=CPU, method="hirescam",
                          extent="window")
    bound = explain_case(loaded, case, target_mask=roi, settings=CPU, method="hirescam",
                         margin_mm=2.0)
    pre = preprocess_image(case.image, case.modalities)
    x = torch.from_numpy(pre.image)[None].double()
    t = torch.from_numpy(roi[pre.box.slices]).double()
    counts = F.avg_pool3d(t[None, None], 2)[0, 0] * 8  # |T ∩ block(m)| per low-res voxel
    dilated = dilate_mm(roi, case.spacing, 2.0)
    for w, b in zip(window, bound, strict=True):
        assert (w.method, w.extent, b.extent, b.margin_mm) == ("hirescam", "window", "target", 2.0)
        region = config.decomposition.tasks[w.segmentor].regions.index(w.region)
        for k, (j, aux) in enumerate(zip(model.message_sources(w.segmentor), w.auxiliary,
                                         strict=True)):
            a = model.representation(x, j)[0]
            v = model.V[w.segmentor, k, :, region].double()
            expected = torch.relu((v.view(-1, 1, 1, 1) * a * counts).sum(0))
            np.testing.assert_allclose(w.level_maps[aux], expected.numpy(), atol=1e-5, rtol=1e-6)
            np.testing.assert_allclose(b.heatmaps[aux], w.heatmaps[aux] * dilated, atol=1e-7)
            total = w.heatmaps[aux].sum(dtype=np.float64)
            if total > 0:
                assert b.inside_fraction[aux] == pytest.approx(
                    w.heatmaps[aux][dilated].sum(dtype=np.float64) / total, rel=1e-6)
        sums = {aux: float(b.heatmaps[aux].sum(dtype=np.float64)) for aux in b.auxiliary}
        if sum(sums.values()) > 0:
            for aux in b.auxiliary:
                assert b.weights[aux] == pytest.approx(sums[aux] / sum(sums.values()), rel=1e-6)
    with pytest.raises(ConfigError, match="method"):
        explain_case(loaded, case, target_mask=roi, settings=CPU, method="lime")
    with pytest.raises(ConfigError, match="extent"):
        explain_case(loaded, case, target_mask=roi, settings=CPU, extent="everywhere")


def test_dilate_mm_uses_the_voxel_spacing():
    mask = np.zeros((9, 9, 9), bool)
    mask[4, 4, 4] = True
    grown = dilate_mm(mask, (1.0, 2.0, 4.0), 4.0)
    # 4 mm reach 4 voxels along x, 2 along y, 1 along z; nothing diagonal beyond the sphere
    assert grown[:, 4, 4].nonzero()[0].tolist() == list(range(0, 9))
    assert grown[4, :, 4].nonzero()[0].tolist() == [2, 3, 4, 5, 6]
    assert grown[4, 4, :].nonzero()[0].tolist() == [3, 4, 5]
    assert not grown[8, 6, 4]  # sqrt(16 + 16) > 4 mm
    assert np.array_equal(dilate_mm(mask, (1, 1, 1), 0.0), mask)
    assert not dilate_mm(np.zeros((3, 3, 3), bool), (1, 1, 1), 5.0).any()
    assert inside_fraction(np.zeros((2, 2)), np.ones((2, 2), bool)) != inside_fraction(
        np.zeros((2, 2)), np.ones((2, 2), bool))  # nan: no heat
    heat = np.array([[1.0, 3.0], [0.0, 0.0]])
    assert inside_fraction(heat, np.array([[True, False], [False, False]])) == pytest.approx(0.25)
