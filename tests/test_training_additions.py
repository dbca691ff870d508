"""The training additions against the ET collapse (docs/method.md): message dropout, batch-norm
recalibration with z = mu, region-weighted patch sampling, and the modality-reliance measurement."""

import numpy as np
import pytest
import torch

from ciml_core.data.cache import PreparedCase
from ciml_core.data.patches import PatchDataset
from ciml_core.errors import ConfigError
from ciml_core.model import ModelConfig, build_model, recalibrate_batch_norm
from ciml_core.model.cig import ComplementaryInformationGate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(width=2, patch_size=(16,) * 3, **kw))


def test_message_dropout_zeroes_whole_samples_in_training_only():
    net = _net(message_dropout=0.5)
    seen = []
    # the decoder's side inputs at level 1: record them
    for segmentor in net.segmentors:
        segmentor.decoder.register_forward_pre_hook(
            lambda m, args: seen.append(args[1][1].detach().clone()) if len(args) > 1 else None)
    x = torch.randn(8, 4, 16, 16, 16)
    torch.manual_seed(1)
    net.train()
    net(x)
    zeroed = torch.stack([s.flatten(1).abs().amax(1) == 0 for s in seen])  # [T, B]
    assert 0 < zeroed.sum() < zeroed.numel()  # some samples of some segmentors, not all
    seen.clear()
    net.eval()
    net(x)
    assert all(bool((s.flatten(1).abs().amax(1) > 0).all()) for s in seen)
    with pytest.raises(ConfigError, match="message_dropout"):
        ModelConfig(message_dropout=1.0)


def test_recalibration_gives_the_eval_mode_statistics():
    net = _net()
    bn = net.segmentors[0].decoder
    gate = net.segmentors[0].gates[0]
    assert isinstance(gate, ComplementaryInformationGate)
    batches = [torch.randn(2, 4, 16, 16, 16, generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    # The first batch norm after the CIG: the decoder's fuse conv at the P/2 level sees c_s.
    norms = [m for m in bn.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    captured = []
    handle = norms[-2].register_forward_hook(lambda m, a, o: captured.append(a[0].detach()))
    assert recalibrate_batch_norm(net, batches) == 3
    handle.remove()
    assert not net.training and not gate.training
    stacked = torch.cat(captured)  # the activations the norm saw, z = mu
    expected_mean = stacked.mean(dim=(0, 2, 3, 4))
    # cumulative average of per-batch means (equal batch sizes: the mean over all)
    np.testing.assert_allclose(norms[-2].running_mean, expected_mean, atol=1e-5)
    # No sampling and no message dropout while recalibrating: the same batch twice gives the
    # same activations (in training mode it does not).
    net = _net(message_dropout=0.5)
    captured.clear()
    norm = [m for m in net.segmentors[0].decoder.modules()
            if isinstance(m, torch.nn.BatchNorm3d)][-2]
    handle = norm.register_forward_hook(lambda m, a, o: captured.append(a[0].detach()))
    recalibrate_batch_norm(net, [batches[0], batches[0]])
    net.train()
    net(batches[0])
    net(batches[0])
    handle.remove()
    torch.testing.assert_close(captured[0], captured[1])
    assert not torch.allclose(captured[2], captured[3])
    momenta = {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)}
    assert momenta == {0.1}
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batch_norm(net, [])


def test_region_weights_steer_the_foreground_patch_centres(tmp_path):
    regions = np.zeros((3, 40, 40, 40), np.uint8)
    regions[0, 0:10] = 1  # "WT" at x < 10, "TC" at 15..25, "ET" at x >= 30
    regions[1, 15:25] = 1
    regions[2, 30:] = 1
    coords = {f"fg{i}": np.argwhere(regions[i]).astype(np.int32) for i in range(3)}
    np.save(tmp_path / "image.npy", np.zeros((4, 40, 40, 40), np.float32))
    np.save(tmp_path / "regions.npy", regions)
    np.savez(tmp_path / "foreground.npz", **coords)
    case = PreparedCase("case", tmp_path)

    def centres(weights):
        ds = PatchDataset([case], (8, 8, 8), length=600, foreground_fraction=1.0,
                          region_weights=weights, seed=5)
        counts = np.zeros(3)
        for i in range(len(ds)):
            _, y = ds[i]
            counts += y[:, 4, 4, 4].numpy()  # the patch centre's regions
        return counts / len(ds)

    uniform, et_heavy = centres(None), centres([1, 1, 4])
    assert uniform == pytest.approx([1 / 3] * 3, abs=0.06)
    assert et_heavy == pytest.approx([1 / 6, 1 / 6, 2 / 3], abs=0.06)
    assert centres([0, 0, 1])[2] == 1.0
    with pytest.raises(ConfigError, match="region weights"):
        PatchDataset([case], (8,) * 3, 1, region_weights=[0, 0, 0])
