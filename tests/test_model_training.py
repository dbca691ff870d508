"""Tiny training runs on ShapeComposition-like images (paper 4.3): the networks learn.

Triangle image + ellipse image, target = their union. Neither image alone gives the union, so a
CIML network can only solve it by passing messages. Numbers measured when written are in
docs/method.md; the thresholds below leave a wide margin.
"""

import pytest
import torch

from ciml_core.model import (
    CIMLLoss,
    ModelConfig,
    Task,
    TaskDecomposition,
    build_model,
    ensemble_region_probabilities,
    probabilities_to_region_masks,
)

SIZE = 32
STEPS = 300


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small are overhead-bound: a second thread only adds contention (10x slower
    when other processes share the 2 CPU cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shape_pairs(n: int, generator: torch.Generator):
    """n noisy (triangle, ellipse) image pairs [n, 2, S, S] and the masks triangle, ellipse."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    centre = 0.35 + 0.3 * torch.rand(n, 2, 1, generator=generator)
    angles = torch.rand(n, 1, generator=generator) * 2 * torch.pi + torch.tensor([0.0, 2.1, 4.2])
    radius = 0.15 + 0.15 * torch.rand(n, 3, generator=generator)
    vy = (centre[:, 0] + radius * torch.sin(angles))[..., None, None]
    vx = (centre[:, 1] + radius * torch.cos(angles))[..., None, None]
    sides = [
        (vx[:, j] - vx[:, i]) * (yy - vy[:, i]) - (vy[:, j] - vy[:, i]) * (xx - vx[:, i])
        for i, j in ((0, 1), (1, 2), (2, 0))
    ]
    triangle = torch.stack(sides).ge(0).all(0) | torch.stack(sides).le(0).all(0)
    ellipse_centre = centre[..., None] + 0.3 * (torch.rand(n, 2, 1, 1, generator=generator) - 0.5)
    axes = 0.08 + 0.12 * torch.rand(n, 2, 1, 1, generator=generator)
    offset = torch.stack([yy, xx])[None] - ellipse_centre
    ellipse = (offset / axes).square().sum(1) <= 1
    images = torch.stack([triangle, ellipse], 1).float()
    images += 0.2 * torch.randn(images.shape, generator=generator)
    return images, triangle, ellipse


def _dice(model, decomposition, x, union) -> float:
    model.eval()
    with torch.no_grad():
        probabilities = ensemble_region_probabilities(model(x), decomposition)
    model.train()
    masks = probabilities_to_region_masks(probabilities, decomposition.regions)[:, 0]
    return (2 * (masks & union).sum() / (masks.sum() + union.sum())).item()


def _train(config: ModelConfig):
    """Train for STEPS Adam steps; return (model, first/last-20 mean loss, Dice before/after)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(config)
    loss_fn = CIMLLoss(config.decomposition)
    x_test, triangle, ellipse = shape_pairs(64, generator)
    dice_before = _dice(model, config.decomposition, x_test, triangle | ellipse)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(STEPS):
        x, triangle_b, ellipse_b = shape_pairs(8, generator)
        loss, _ = loss_fn(model(x), (triangle_b | ellipse_b)[:, None].float())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    dice_after = _dice(model, config.decomposition, x_test, triangle | ellipse)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"{config.variant}: loss {first:.3f} -> {last:.3f}", end=", ")
    print(f"Dice {dice_before:.3f} -> {dice_after:.3f}")
    return model, (first, last), (dice_before, dice_after), (x_test, triangle, ellipse)


def test_ciml_learns_the_union_through_messages():
    decomposition = TaskDecomposition(
        tasks=(Task(("triangle",), ("union",)), Task(("ellipse",), ("union",))),
        modalities=("triangle", "ellipse"),
        regions=("union",),
    )
    config = ModelConfig(
        decomposition=decomposition, width=4, spatial_dims=2, norm="batch", patch_size=(SIZE, SIZE)
    )
    _, (first, last), (before, after), _ = _train(config)
    assert last < 0.25 * first
    assert before < 0.3 and after > 0.9


def test_shape_composition_learns_and_its_map_shows_the_ellipse_outside_the_triangle():
    config = ModelConfig(
        decomposition=TaskDecomposition.shapes(),
        variant="shapecomposition",
        width=4,
        spatial_dims=2,
        norm="batch",
        patch_size=(SIZE, SIZE),
    )
    model, (first, last), (before, after), (x, triangle, ellipse) = _train(config)
    assert last < 0.25 * first
    assert before < 0.3 and after > 0.9
    model.eval()
    with torch.no_grad():
        complementary = model(x).complementary[:, 0]
    mean = {
        name: complementary[mask].mean().item()
        for name, mask in {
            "ellipse only": ellipse & ~triangle,
            "overlap": ellipse & triangle,
            "triangle only": triangle & ~ellipse,
            "background": ~(triangle | ellipse),
        }.items()
    }
    print("complementary map means:", {k: round(v, 2) for k, v in mean.items()})
    # The information the primary (triangle) image lacks stands out; the sign is arbitrary.
    assert abs(mean["ellipse only"]) > 0.5
    assert abs(mean["ellipse only"]) > 2 * abs(mean["background"])
    assert abs(mean["ellipse only"]) > abs(mean["overlap"])
