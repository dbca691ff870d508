"""Every layer of Table 1 has its shape and channel count, checked with forward hooks (P = 64).

Also: parameter counts (the numbers of docs/method.md), 2-D instances, patch-size errors and the
DynUNet / ShapeComposition networks' interfaces.
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from ciml_core.errors import ConfigError, InputDataError
from ciml_core.model import (
    CIMLNetwork,
    EarlyFusionDynUNet,
    ModelConfig,
    ShapeCompositionNet,
    TaskDecomposition,
    build_model,
    count_parameters,
    ensemble_region_probabilities,
)

P = 64


def table1(
    C: int, K: int, in_channels: int, out_channels: int
) -> list[tuple[str, int, int, int, int, int]]:
    """Table 1 of the paper as (module, kernel, in channels, in size divisor, out channels,
    out size divisor); sizes are P / divisor along every axis. Our names for its rows:
    DownN -> encoder.stages[N-1].{conv, down}; CIG at level s -> gates[s-1]; UpN -> decoder.up[N-1]
    {upsample, fuse}; Output -> decoder.head. Table 1 lists the ConvTranspose with kernel 3 but
    stride 2, padding 1 and exact doubling, which needs kernel 2 (see docs/method.md)."""
    rows = [
        ("encoder.stages.0.conv", 3, in_channels, 1, C, 1),
        ("encoder.stages.0.down", 3, C, 1, C, 2),
        ("encoder.stages.1.conv", 3, C, 2, 2 * C, 2),
        ("encoder.stages.1.down", 3, 2 * C, 2, 2 * C, 4),
        ("encoder.stages.2.conv", 3, 2 * C, 4, 4 * C, 4),
        ("encoder.stages.2.down", 3, 4 * C, 4, 4 * C, 8),
        ("encoder.stages.3.conv", 3, 4 * C, 8, 8 * C, 8),
        ("encoder.stages.3.down", 3, 8 * C, 8, 8 * C, 16),
    ]
    for level, width, up_in, up_out in ((4, 8 * C, 16 * C, 8 * C), (3, 4 * C, 8 * C, 4 * C),
                                        (2, 2 * C, 4 * C, 2 * C), (1, C, 2 * C, C)):  # fmt: skip
        div = 2**level
        gate = f"gates.{level - 1}"
        rows += [
            (f"{gate}.attention.hidden", 3, K + 1, div, 4 * (K + 1), div),
            (f"{gate}.attention.gate", 1, 4 * (K + 1), div, K, div),
        ]
        for k in range(K):
            rows += [
                (f"{gate}.mu.{k}", 1, width, div, width, div),
                (f"{gate}.sigma.{k}", 1, width, div, width, div),
            ]
        up = f"decoder.up.{4 - level}"
        rows += [
            (f"{up}.upsample", 2, up_in, div, up_out, div // 2),
            (f"{up}.fuse", 3, 2 * up_out, div // 2, up_out, div // 2),
        ]
    rows.append(("decoder.head", 3, C, 1, out_channels, 1))
    return rows


def _kernel(module: nn.Module) -> int:
    conv = module[0] if isinstance(module, nn.Sequential) else module
    assert len(set(conv.kernel_size)) == 1
    return conv.kernel_size[0]


@pytest.mark.parametrize("C", [8, 16])
def test_every_layer_matches_table1(C):
    torch.manual_seed(0)
    model = CIMLNetwork(ModelConfig(width=C)).eval()
    K = 3
    seen: dict[tuple[int, str], tuple] = {}
    gate_io: dict[tuple[int, int], tuple] = {}

    def record(key):
        def hook(module, args, output):
            seen[key] = (args[0].shape, output.shape, output.detach())

        return hook

    def record_gate(key):
        def hook(module, args, output):
            local, messages = args
            gate_io[key] = (local.shape, [m.shape for m in messages], output[0].shape, output[1])

        return hook

    rows = table1(C, K, in_channels=1, out_channels=0)
    for i, segmentor in enumerate(model.segmentors):
        modules = dict(segmentor.named_modules())
        for name, *_ in rows:
            modules[name].register_forward_hook(record((i, name)))
        for level, gate in enumerate(segmentor.gates, start=1):
            gate.register_forward_hook(record_gate((i, level)))

    with torch.no_grad():
        out = model(torch.randn(1, 4, P, P, P))

    for i, task in enumerate(model.config.decomposition.tasks):
        modules = dict(model.segmentors[i].named_modules())
        for name, kernel, c_in, d_in, c_out, d_out in table1(C, K, 1, len(task.regions)):
            in_shape, out_shape, value = seen[(i, name)]
            assert tuple(in_shape) == (1, c_in) + (P // d_in,) * 3, (i, name)
            assert tuple(out_shape) == (1, c_out) + (P // d_out,) * 3, (i, name)
            assert _kernel(modules[name]) == kernel, (i, name)
            if name.endswith("attention.gate"):  # K attention maps in [0, 1]
                assert value.min() >= 0 and value.max() <= 1 and value.std() > 0
        for level in range(1, 5):
            width, size = C * 2 ** (level - 1), P // 2**level
            local, messages, c_shape, kl = gate_io[(i, level)]
            assert tuple(local) == (1, width, size, size, size)
            assert [tuple(m) for m in messages] == [(1, width, size, size, size)] * K
            assert tuple(c_shape) == (1, width, size, size, size)
            assert kl.shape == () and kl > 0
        assert tuple(out.logits[i].shape) == (1, len(task.regions), P, P, P)
    assert out.task_regions == (("WT",), ("TC",), ("WT", "TC"), ("TC", "ET"))
    assert out.kl.shape == (4,)


def test_dilation_keeps_the_halving():
    model = CIMLNetwork(ModelConfig(width=4, dilation=2, patch_size=(32, 32, 32))).eval()
    down = model.segmentors[0].encoder.stages[0].down[0]
    assert down.dilation == (2, 2, 2) and down.padding == (2, 2, 2) and down.stride == (2, 2, 2)
    with torch.no_grad():
        out = model(torch.randn(1, 4, 32, 32, 32))
    assert out.logits[3].shape == (1, 2, 32, 32, 32)


#: Parameter counts, BraTS decomposition, 3-D, batch norm; also printed in docs/method.md.
PARAMETERS = {
    ("full", 8): 2_569_494,
    ("full", 16): 10_173_126,
    ("full", 24): 22_839_926,
    ("full", 32): 40_569_894,
    ("baseline", 16): 7_930_598,
    ("message", 16): 9_879_142,
    ("attention", 16): 9_909_126,
    ("vi", 16): 10_144_102,
    ("dynunet", 16): 16_546_275,
}


def test_parameter_counts_match_docs():
    docs = (Path(__file__).parents[1] / "docs" / "method.md").read_text()
    for (variant, C), expected in PARAMETERS.items():
        assert count_parameters(build_model(ModelConfig(width=C, variant=variant))) == expected
        assert f"{expected:,}" in docs, (variant, C)


def test_2d_instance_norm_model_runs():
    config = ModelConfig(width=4, spatial_dims=2, norm="instance", patch_size=(32, 48))
    model = build_model(config)
    norms = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
    assert norms == {nn.InstanceNorm2d}
    assert all(m.affine for m in model.modules() if isinstance(m, nn.InstanceNorm2d))
    out = model(torch.randn(2, 4, 32, 48))
    assert [tuple(t.shape) for t in out.logits] == [(2, 1, 32, 48)] * 2 + [(2, 2, 32, 48)] * 2
    assert out.kl.shape == (4,) and torch.all(out.kl > 0)
    out.logits[0].mean().backward()


def test_input_size_not_divisible_by_16_is_a_clear_error():
    model = build_model(ModelConfig(width=4, patch_size=(32, 32, 32)))
    with pytest.raises(InputDataError, match=r"spatial size \(40, 32, 32\).*multiple of 16"):
        model(torch.randn(1, 4, 40, 32, 32))
    with pytest.raises(InputDataError, match="expected \\[batch, 4 modalities, 3 spatial sizes\\]"):
        model(torch.randn(1, 3, 32, 32, 32))
    with pytest.raises(ConfigError, match="multiple of 16"):
        ModelConfig(patch_size=(72, 64, 64))


def test_dynunet_has_the_same_interface():
    config = ModelConfig(width=4, variant="dynunet", norm="instance", patch_size=(32, 32, 32))
    model = build_model(config)
    assert isinstance(model, EarlyFusionDynUNet)
    net = model.net
    assert net.filters == [8, 16, 32, 64, 80] and not net.deep_supervision
    assert net.input_block.conv1.conv.in_channels == 4
    assert not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    out = model.eval()(torch.randn(2, 4, 32, 32, 32))
    assert len(out.logits) == 1 and out.logits[0].shape == (2, 3, 32, 32, 32)
    assert out.task_regions == (("WT", "TC", "ET"),)
    assert torch.equal(out.kl, torch.zeros(1))
    probabilities = ensemble_region_probabilities(out, config.decomposition)
    assert torch.allclose(probabilities, torch.sigmoid(out.logits[0]))


def test_shape_composition_network_paths():
    config = ModelConfig(
        decomposition=TaskDecomposition.shapes(),
        variant="shapecomposition",
        width=4,
        spatial_dims=2,
        norm="instance",
        complementary_channels=2,
        patch_size=(32, 32),
    )
    model = build_model(config)
    assert isinstance(model, ShapeCompositionNet)
    assert model.primary_channels == [0] and model.auxiliary_channels == [1]
    assert not any("ComplementaryInformationGate" in type(m).__name__ for m in model.modules())
    x = torch.randn(2, 2, 32, 32)
    out = model(x)
    assert out.logits[0].shape == (2, 1, 32, 32) and out.task_regions == (("union",),)
    assert out.complementary.shape == (2, 2, 32, 32)
    assert out.kl.shape == (1,) and out.kl.item() > 0

    # The complementary path reaches the auxiliary encoder but never the primary one.
    out.complementary.square().mean().backward()
    assert all(p.grad is None for p in model.primary_encoder.parameters())
    assert all(p.grad is None for p in model.predictor.parameters())
    assert sum(p.grad.abs().sum() for p in model.auxiliary_encoder.parameters()) > 0
    model.zero_grad(set_to_none=True)
    # ...while the prediction trains the primary encoder through the predictor path.
    model(x).logits[0].square().mean().backward()
    assert sum(p.grad.abs().sum() for p in model.primary_encoder.parameters()) > 0

    # Eval: the map is the mean (deterministic); training samples it.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).complementary, model(x).complementary)
        model.train()
        assert not torch.equal(model(x).complementary, model(x).complementary)
