"""Synthetic multimodal cases: a BraTS-like glioma head, ShapeComposition pairs, a PET/CT body.

The phantoms are the project's own data (SPEC 3.4): tests, demos, napari sample data and
benchmarks use them, so they must be cheap, deterministic and *informative*: each modality shows
some regions and hides others, exactly like the real data the CIML model is meant for.

How a phantom is built (all three kinds follow the same recipe):

1. a **tissue map** (one small integer per voxel) from simple shapes, made irregular with smooth
   random fields (:func:`_smooth_random_field`);
2. **intensities** by table look-up per tissue and modality (:data:`BRATS_INTENSITY` is the SPEC
   table verbatim);
3. **acquisition effects**: anatomical texture, a smooth bias field, a random global gain and
   Rician (MRI) or Gaussian (CT, PET) noise.

Geometry is defined in field-of-view coordinates, not voxels, and the random fields are drawn on a
lattice that does not depend on the voxel grid, so one seed gives the same anatomy at 96x96x64 and
at 240x240x155. Every case uses its own ``np.random.default_rng(seed)``: one seed gives
byte-identical arrays on every run.

``docs/phantoms.md`` describes the generators, their parameters and the measured separability.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ciml_core.data.nifti import atomic_save, nifti_image
from ciml_core.errors import ConfigError
from ciml_core.io import refuse_existing

KINDS = ("brats", "shapes", "petct", "brain")
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")

#: Default and smallest accepted grids per kind (voxels, X Y Z).
DEFAULT_SHAPES = {"brats": (96, 96, 64), "shapes": (64, 64, 1), "petct": (96, 96, 96),
                  "brain": (240, 240, 155)}  # brain: ciml_core.data.brain_phantoms (SRI24 atlas)
MIN_SHAPES = {"brats": (32, 32, 24), "shapes": (16, 16, 1), "petct": (32, 32, 32),
              "brain": (48, 48, 32)}

#: BraTS 2020 label values.
NCR, ED, ET = 1, 2, 4

# --------------------------------------------------------------------------------------------
# Shared helpers: random fields, affines
# --------------------------------------------------------------------------------------------

Axes = tuple[np.ndarray, np.ndarray, np.ndarray]


def _smooth_random_field(
    rng: np.random.Generator,
    axes: Sequence[np.ndarray],
    domain: Sequence[tuple[float, float]],
    length: float,
) -> np.ndarray:
    """A zero-mean, unit-variance smooth Gaussian random field sampled on a grid.

    ``axes`` are the 1-D coordinates of the grid along each axis, ``domain`` the (low, high)
    extent of the field of view per axis (same units) and ``length`` the correlation length.

    White noise on a coarse lattice (step 0.75 * length) is blended with separable Gaussian
    weights. Because the lattice depends only on ``domain`` and ``length``, the same seed gives the
    same field at any voxel size; and because each axis's weights are L2-normalised, the variance
    is exactly 1 at every voxel, so a threshold on the field means the same everywhere. Separable
    tensor products keep this at a few hundred ms even for 240x240x155.
    """
    step = 0.75 * length
    kernels = []
    for coords, (low, high) in zip(axes, domain, strict=True):
        first = int(np.floor((low - 3 * length) / step))
        last = int(np.ceil((high + 3 * length) / step))
        lattice = np.arange(first, last + 1) * step
        weights = np.exp(-0.5 * ((np.asarray(coords)[:, None] - lattice[None, :]) / length) ** 2)
        weights /= np.sqrt((weights**2).sum(axis=1, keepdims=True))
        kernels.append(weights.astype(np.float32))
    noise = rng.standard_normal(tuple(k.shape[1] for k in kernels), dtype=np.float32)
    # Contract one lattice axis at a time: (lx,ly,lz) -> (X,ly,lz) -> (X,lz,Y) -> (X,Y,Z).
    out = np.tensordot(kernels[0], noise, axes=(1, 0))
    out = np.tensordot(out, kernels[1], axes=(1, 1))
    out = np.tensordot(out, kernels[2], axes=(1, 1))
    return np.ascontiguousarray(out, dtype=np.float32)


def _lps_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """A BraTS-like affine: LPS voxel storage (``diag(-sx, -sy, sz)``), volume centre at 0 mm.

    Real BraTS files store voxels with the first axis running right->left and the second
    anterior->posterior; using the same here means loaders are exercised on a realistic,
    non-canonical orientation.
    """
    sx, sy, sz = (float(s) for s in spacing)
    nx, ny, nz = shape
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [sx * (nx - 1) / 2, sy * (ny - 1) / 2, -sz * (nz - 1) / 2]
    # NIfTI stores the affine in float32: round it now so the in-memory case equals the file.
    return affine.astype(np.float32).astype(np.float64)


def _world_axes(shape: Sequence[int], affine: np.ndarray) -> Axes:
    """RAS world coordinates (mm) of the voxel centres along each axis of a diagonal affine."""
    return tuple(affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(shape))


def _check_shape(shape: Sequence[int], kind: str) -> tuple[int, int, int]:
    minimum = MIN_SHAPES[kind]
    try:
        values = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or any(v < m for v, m in zip(values, minimum, strict=True)):
        raise ConfigError(
            f"shape: expected 3 integers X Y Z with X >= {minimum[0]}, Y >= {minimum[1]}, "
            f"Z >= {minimum[2]} for kind '{kind}', got {tuple(shape)!r}"
        )
    return values  # type: ignore[return-value]


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
    return int(seed)


@dataclass
class PhantomCase:
    """One synthetic case, held in the voxel order it is written in (LPS storage).

    ``tissues`` holds boolean masks of the anatomy used to build it (e.g. ``"csf"``, ``"brain"``,
    ``"heart"``), so tests and demos can check intensities per tissue without re-deriving them.
    """

    case_id: str
    images: dict[str, np.ndarray]  # modality name -> float32 array
    label: np.ndarray  # uint8
    affine: np.ndarray  # 4x4, shared by every image and the label
    tissues: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# BraTS-like glioma phantom
# --------------------------------------------------------------------------------------------

#: Tissue codes of the glioma phantom's tissue map, in drawing order.
TISSUES = ("air", "skull", "csf", "gm", "wm", "ed", "ncr", "et")
AIR, SKULL, CSF, GM, WM, T_ED, T_NCR, T_ET = range(len(TISSUES))

#: Relative intensities per tissue and modality. WM..ET are the SPEC 3.4 table verbatim. The
#: skull is our choice: cortical bone is dark in every MR sequence (and the scalp is left out, as
#: BraTS images are skull-stripped), so it never looks like tumour.
BRATS_INTENSITY: dict[str, dict[str, float]] = {
    "skull": {"t1": 0.15, "t1ce": 0.15, "t2": 0.10, "flair": 0.10},
    "wm": {"t1": 1.00, "t1ce": 1.00, "t2": 0.55, "flair": 0.60},
    "gm": {"t1": 0.75, "t1ce": 0.75, "t2": 0.75, "flair": 0.75},
    "csf": {"t1": 0.30, "t1ce": 0.30, "t2": 1.50, "flair": 0.20},
    "ed": {"t1": 0.65, "t1ce": 0.65, "t2": 1.20, "flair": 1.30},
    "ncr": {"t1": 0.35, "t1ce": 0.30, "t2": 1.35, "flair": 0.90},
    "et": {"t1": 0.65, "t1ce": 1.40, "t2": 1.20, "flair": 1.30},
}

#: Head ellipsoid in field-of-view units (1 = half the field of view): semi-axes LR, AP, SI.
HEAD_SEMI_AXES = (0.66, 0.82, 0.85)
HEAD_CENTRE = (0.0, 0.0, -0.04)
#: Radii of the head layers in the head frame (the head is the unit ball there).
SKULL_INNER, BRAIN_OUTER = 0.92, 0.885

#: Acquisition effects (ranges drawn per case and modality; see docs/phantoms.md). Chosen so
#: that the separability statements of SPEC 3.4 hold with margin (tests/test_phantoms.py).
NOISE_FRACTION = (0.03, 0.05)  # Rician sigma / (WM-level intensity)
BIAS_AMPLITUDE = (0.03, 0.07)  # std of the log bias field
GAIN = (200.0, 2000.0)  # random global scaling, log-uniform
TISSUE_JITTER = 0.03  # per-case relative jitter of each table entry
TEXTURE_AMPLITUDE = 0.03  # anatomical texture, shared by all modalities

#: Every tenth seed (seed % 10 == 9) has no enhancing tumour (a non-enhancing glioma); about a
#: third of the others have an incomplete enhancing rim.
NO_ENHANCEMENT_EVERY = 10


def brats_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """Default isotropic voxel size (mm) of the glioma phantom for a grid.

    The field of view should be a head: ``192 mm / max(X, Y)``, but never below the 1 mm of real
    BraTS data. 96x96x64 -> 2 mm (192x192x128 mm), 240x240x155 -> 1 mm (the BraTS grid).
    """
    s = max(1.0, 192.0 / max(int(shape[0]), int(shape[1])))
    return (s, s, s)


def _head_frame(shape: Sequence[int]) -> tuple[Axes, Axes]:
    """Field-of-view coordinates (RAS, -1..1) per axis and the head-frame coordinates.

    In the head frame the head is the unit ball, so anatomy can be described by simple radii.
    """
    fov = []
    for axis, n in enumerate(shape):
        u = (np.arange(n) * 2.0 - (n - 1)) / n  # voxel centres, -1..1, increasing with the index
        fov.append(-u if axis < 2 else u)  # LPS storage: R and A decrease along the first two axes
    head = tuple(
        ((u - c) / s).astype(np.float32).reshape([-1 if a == b else 1 for b in range(3)])
        for a, (u, c, s) in enumerate(zip(fov, HEAD_CENTRE, HEAD_SEMI_AXES, strict=True))
    )
    return tuple(fov), head


def _ellipsoid(p: Axes, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoidal radius (< 1 inside) around ``centre`` in head-frame coordinates."""
    return np.sqrt(sum(((p[a] - centre[a]) / radii[a]) ** 2 for a in range(3)))


def _head_tissues(rng: np.random.Generator, fov: Axes, p: Axes) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map of a healthy head (skull, subarachnoid CSF, cortex with sulci, WM, deep grey
    nuclei, lateral ventricles, interhemispheric fissure) and the intracranial brain mask (inside
    the subarachnoid space, where a tumour may grow)."""
    domain = [(-1.0, 1.0)] * 3
    shape_field = _smooth_random_field(rng, fov, domain, 0.3)
    gyri = _smooth_random_field(rng, fov, domain, 0.08)
    sulci = _smooth_random_field(rng, fov, domain, 0.05)
    ventricle_scale = rng.uniform(0.85, 1.25)

    r = _ellipsoid(p, (0, 0, 0), (1, 1, 1)) * (1 + 0.02 * shape_field)
    cortex_inner = 0.74 + 0.04 * gyri  # irregular grey/white boundary

    tissue = np.zeros(r.shape, np.uint8)
    tissue[r < 1.0] = SKULL
    tissue[r < SKULL_INNER] = CSF  # subarachnoid space
    tissue[r < BRAIN_OUTER] = GM
    tissue[r < cortex_inner] = WM
    # Sulci: the zero level set of a smooth field is a set of folded sheets; inside the cortex
    # they look like CSF-filled sulci opening onto the subarachnoid space.
    cortex = (r < BRAIN_OUTER) & (r >= cortex_inner - 0.03)
    tissue[cortex & (np.abs(sulci) < 0.15)] = CSF
    fissure = (np.abs(p[0]) < 0.02 / HEAD_SEMI_AXES[0]) & (p[2] > -0.25) & (r > 0.3)
    tissue[fissure & (r < BRAIN_OUTER)] = CSF
    for side in (-1, 1):
        tissue[_ellipsoid(p, (0.28 * side, 0.0, -0.05), (0.12, 0.18, 0.14)) < 1] = GM
        radii = (0.08 * ventricle_scale, 0.35, 0.13 * ventricle_scale)
        tissue[_ellipsoid(p, (0.11 * side, -0.02, 0.12), radii) < 1] = CSF
    return tissue, r < BRAIN_OUTER


def _tumour(rng: np.random.Generator, fov: Axes, p: Axes, brain: np.ndarray,
            enhancing: bool) -> np.ndarray:
    """BraTS 2020 label map of one glioma inside ``brain``: NCR core, ET rim, ED around them.

    Regions are level sets of a distance from the tumour centre plus a smooth random field, so
    they are irregular but nested by construction (NCR and ET inside TC, TC inside WT).
    """
    domain = [(-1.0, 1.0)] * 3
    wt_field = _smooth_random_field(rng, fov, domain, 0.12)
    tc_field = _smooth_random_field(rng, fov, domain, 0.10)
    rim_field = _smooth_random_field(rng, fov, domain, 0.08)
    gap_field = _smooth_random_field(rng, fov, domain, 0.15)

    side = rng.choice([-1.0, 1.0])
    centre = np.array([side * rng.uniform(0.28, 0.42), rng.uniform(-0.35, 0.35),
                       rng.uniform(-0.15, 0.3)])
    r_wt = rng.uniform(0.36, 0.46)
    r_tc = r_wt * rng.uniform(0.55, 0.68)
    rim = rng.uniform(0.09, 0.14)  # ET thickness, fraction of the TC radius
    incomplete = rng.random() < 0.35
    # Oedema spreads off-centre; the core sits somewhere inside it.
    tc_centre = centre + rng.uniform(-0.3, 0.3, size=3) * (r_wt - r_tc)

    wt_level = _ellipsoid(p, centre, (r_wt,) * 3) + 0.25 * wt_field
    tc_level = _ellipsoid(p, tc_centre, (r_tc,) * 3) + 0.15 * tc_field
    tc = (tc_level < 1.0) & brain
    # Oedema always wraps the core (at least a quarter of its radius), whatever the WT field does.
    wt = ((wt_level < 1.0) | (tc_level < 1.25)) & brain
    ncr = tc & (tc_level + 0.04 * rim_field < 1.0 - rim)

    label = np.zeros(brain.shape, np.uint8)
    label[wt] = ED
    label[tc] = NCR
    if enhancing:
        et = tc & ~ncr
        if incomplete:  # part of the rim does not enhance: it stays non-enhancing core
            et &= gap_field < 0.6
        label[et] = ET
    return label


def _bias_field(rng: np.random.Generator, fov: Axes) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field, log-normal around 1."""
    amplitude = rng.uniform(*BIAS_AMPLITUDE)
    return np.exp(amplitude * _smooth_random_field(rng, fov, [(-1.0, 1.0)] * 3, 0.5))


def _rician_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise, as an MR scanner reconstructs it."""
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def _mri_images(rng: np.random.Generator, fov: Axes, tissue: np.ndarray) -> dict[str, np.ndarray]:
    """The four MR sequences of a tissue map: table look-up, texture, bias, gain, Rician noise."""
    texture = 1 + TEXTURE_AMPLITUDE * _smooth_random_field(rng, fov, [(-1.0, 1.0)] * 3, 0.04)
    head = tissue != AIR
    images = {}
    for modality in BRATS_MODALITIES:
        lut = np.zeros(len(TISSUES), np.float32)
        for code, name in enumerate(TISSUES[1:], start=1):
            jitter = rng.uniform(1 - TISSUE_JITTER, 1 + TISSUE_JITTER)
            lut[code] = BRATS_INTENSITY[name][modality] * jitter
        gain = float(np.exp(rng.uniform(np.log(GAIN[0]), np.log(GAIN[1]))))
        sigma = gain * rng.uniform(*NOISE_FRACTION)
        clean = lut[tissue] * texture * _bias_field(rng, fov) * np.float32(gain)
        noisy = _rician_noise(rng, clean, sigma)
        noisy[~head] = 0  # BraTS images are masked: the background is exactly 0
        images[modality] = noisy.astype(np.float32, copy=False)
    return images


def make_brats_phantom(
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPES["brats"],
    spacing: float | Sequence[float] | None = None,
) -> PhantomCase:
    """A BraTS-like glioma case (SPEC 3.4) with images ``flair``, ``t1``, ``t1ce``, ``t2``.

    Args:
        seed: the case's random seed (>= 0); the case id is ``Phantom_<seed:05d>``.
        shape: grid X Y Z in LPS storage order; the head fills the field of view at any shape.
        spacing: voxel size in mm (one number or three); default :func:`brats_spacing`.

    Returns:
        A :class:`PhantomCase` whose label uses BraTS 2020 values (0, 1 NCR, 2 ED, 4 ET) and whose
        ``tissues`` holds ``head``, ``brain``, ``skull``, ``csf``, ``gm`` and ``wm`` masks.
    """
    shape = _check_shape(shape, "brats")
    seed = _check_seed(seed)
    if spacing is None:
        spacing = brats_spacing(shape)
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (3,)))
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ConfigError(f"spacing: expected positive voxel sizes in mm, got {spacing}")
    rng = np.random.default_rng(seed)

    fov, p = _head_frame(shape)
    tissue, brain = _head_tissues(rng, fov, p)
    label = _tumour(rng, fov, p, brain, enhancing=seed % NO_ENHANCEMENT_EVERY != 9)
    healthy = {name: tissue == code for name, code in (("skull", SKULL), ("csf", CSF), ("gm", GM),
                                                       ("wm", WM))}
    tissue[label == ED] = T_ED
    tissue[label == NCR] = T_NCR
    tissue[label == ET] = T_ET
    images = _mri_images(rng, fov, tissue)
    tissues = {"head": tissue != AIR, "brain": brain}
    tissues.update({name: mask & (label == 0) for name, mask in healthy.items()})
    return PhantomCase(case_id=_case_id("brats", seed), images=images, label=label,
                       affine=_lps_affine(shape, spacing), tissues=tissues)


def best_threshold_dice(
    image: np.ndarray, mask: np.ndarray, within: np.ndarray | None = None
) -> tuple[float, float, str]:
    """Best Dice of a one-threshold classifier of ``image`` against ``mask``.

    Every threshold between two distinct intensities is tried, in both polarities (``image >= t``
    and ``image < t``); voxels outside ``within`` (default: none) are ignored. One sort makes this
    exact search cost O(n log n). The phantom tests use it to measure what one modality alone can
    segment; a coarse threshold grid would miss small regions such as a thin enhancing rim.

    Returns:
        ``(dice, threshold, polarity)`` with polarity ``">="`` or ``"<"``.

    Raises:
        ValueError: ``mask`` has no voxel inside ``within``.
    """
    values = image[within] if within is not None else image.ravel()
    target = (mask[within] if within is not None else mask.ravel()).astype(bool)
    n_target = int(target.sum())
    if n_target == 0:
        raise ValueError("best_threshold_dice: the mask is empty inside 'within'")
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    hits_below = np.concatenate([[0], np.cumsum(target[order])])  # targets among the k lowest
    # Cut positions k: "value < t" selects the k lowest; only cuts between distinct values exist.
    k = np.concatenate([[0], np.flatnonzero(np.diff(sorted_values)) + 1, [values.size]])
    dice_above = 2 * (n_target - hits_below[k]) / (values.size - k + n_target)
    dice_below = 2 * hits_below[k] / (k + n_target)
    i_above, i_below = int(np.argmax(dice_above)), int(np.argmax(dice_below))
    if dice_above[i_above] >= dice_below[i_below]:
        i, dice, polarity = i_above, dice_above[i_above], ">="
    else:
        i, dice, polarity = i_below, dice_below[i_below], "<"
    cut = int(k[i])
    threshold = sorted_values[cut] if cut < values.size else np.inf
    return float(dice), float(threshold), polarity


# --------------------------------------------------------------------------------------------
# ShapeComposition (paper 4.3)
# --------------------------------------------------------------------------------------------

SHAPE_NOISE = 0.1  # Gaussian noise std; shapes have intensity 0.7..1 on a 0 background


def _ellipse_mask(yy: np.ndarray, xx: np.ndarray, centre, radii, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - centre[0], xx - centre[1]
    return ((c * dy + s * dx) / radii[0]) ** 2 + ((-s * dy + c * dx) / radii[1]) ** 2 < 1


def _triangle_mask(yy: np.ndarray, xx: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Pixels inside a triangle: on the same side of all three edges (either winding)."""
    sides = []
    for (y0, x0), (y1, x1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        sides.append((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0))
    sides = np.stack(sides)
    return np.all(sides >= 0, axis=0) | np.all(sides <= 0, axis=0)


def _overlapping_shapes(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """A triangle and an ellipse that overlap, neither containing the other (rejection sampling;
    deterministic for a generator state)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    scale = min(h, w)
    for _ in range(10_000):
        centre = rng.uniform(0.3, 0.7, size=2) * (h, w)
        radii = rng.uniform(0.12, 0.25, size=2) * scale
        ellipse = _ellipse_mask(yy, xx, centre, radii, rng.uniform(0, np.pi))
        direction = rng.uniform(0, 2 * np.pi)
        tri_centre = centre + rng.uniform(0.4, 1.0) * radii.mean() * np.array(
            [np.sin(direction), np.cos(direction)])
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(
            -0.4, 0.4, size=3)
        lengths = rng.uniform(0.18, 0.35, size=3) * scale
        vertices = tri_centre + lengths[:, None] * np.stack([np.sin(angles), np.cos(angles)], 1)
        vertices = np.clip(vertices, 1, np.array([h, w]) - 1)
        triangle = _triangle_mask(yy, xx, vertices)
        both = (triangle & ellipse).sum()
        n_tri, n_ell = triangle.sum(), ellipse.sum()
        if (min(n_tri, n_ell) >= 0.02 * h * w and both >= 0.15 * min(n_tri, n_ell)
                and n_tri - both >= 0.25 * n_tri and n_ell - both >= 0.25 * n_ell):
            return triangle, ellipse
    raise RuntimeError(f"could not place overlapping shapes in a {size} image")  # pragma: no cover


def make_shape_composition(
    seed: int, size: Sequence[int] = (64, 64)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ShapeComposition pair (paper 4.3): a triangle image, an ellipse image, their union.

    The two shapes always overlap and neither contains the other, so the union target needs both
    images: the triangle image alone cannot know the ellipse part, and vice versa.

    Returns:
        ``(primary, auxiliary, target)``: 2-D float32 images of ``size`` (shape intensity 0.7..1
        plus Gaussian noise of std :data:`SHAPE_NOISE`) and the uint8 {0, 1} union.
    """
    seed = _check_seed(seed)
    size = (int(size[0]), int(size[1]))
    if min(size) < MIN_SHAPES["shapes"][0]:
        raise ConfigError(f"size: expected two integers >= {MIN_SHAPES['shapes'][0]}, got {size}")
    rng = np.random.default_rng(seed)
    triangle, ellipse = _overlapping_shapes(rng, size)
    primary = triangle * rng.uniform(0.7, 1.0) + SHAPE_NOISE * rng.standard_normal(size)
    auxiliary = ellipse * rng.uniform(0.7, 1.0) + SHAPE_NOISE * rng.standard_normal(size)
    target = (triangle | ellipse).astype(np.uint8)
    return primary.astype(np.float32), auxiliary.astype(np.float32), target


# --------------------------------------------------------------------------------------------
# PET/CT phantom (autoPET-like)
# --------------------------------------------------------------------------------------------

#: Field of view (mm) of the PET/CT phantom, LR x AP x SI: a body from the top of the head to
#: the upper thighs. The voxel size is this divided by the grid (5.2 x 5.2 x 10 mm at 96^3).
PETCT_FOV_MM = (500.0, 500.0, 960.0)

BODY_TISSUES = ("air", "fat", "soft", "lung", "bone", "skull", "brain", "heart", "liver",
                "bladder", "lesion")
#: CT number (HU) and SUV per body tissue. Brain, heart and bladder are as hot on PET as lesions;
#: only CT anatomy (where the hot spot is) tells them apart. Lesions in soft tissue and liver are
#: nearly invisible on CT; only PET shows them.
BODY_HU = {"air": -1000, "fat": -100, "soft": 40, "lung": -820, "bone": 650, "skull": 900,
           "brain": 35, "heart": 40, "liver": 60, "bladder": 10, "lesion": 45}
BODY_SUV = {"air": 0.0, "fat": 0.3, "soft": 0.8, "lung": 0.4, "bone": 1.2, "skull": 0.5,
            "brain": 8.0, "heart": 5.0, "liver": 2.3, "bladder": 20.0, "lesion": 8.0}
CT_NOISE_HU = (10.0, 20.0)
PET_FWHM_MM = 8.0
LESION_SITES = ("lung", "liver", "soft")
#: Lesion centres lie in the torso, away from the edges of the field of view (SI, mm).
LESION_Z_RANGE_MM = (-360.0, 230.0)


def petct_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """Voxel size (mm) of the PET/CT phantom: :data:`PETCT_FOV_MM` divided by the grid."""
    return tuple(f / int(n) for f, n in zip(PETCT_FOV_MM, shape, strict=True))


def _body_tissues(rng: np.random.Generator, xyz: Axes) -> np.ndarray:
    """Tissue map (indices into :data:`BODY_TISSUES`) of a head, neck and torso in RAS mm."""
    x, y, z = (a.reshape([-1 if i == b else 1 for b in range(3)]) for i, a in enumerate(xyz))
    code = {name: i for i, name in enumerate(BODY_TISSUES)}
    domain = [(-f / 2, f / 2) for f in PETCT_FOV_MM]
    outline = 1 + 0.03 * _smooth_random_field(rng, xyz, domain, 80.0)

    def ellipsoid(centre, radii):
        return np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                       + ((z - centre[2]) / radii[2]) ** 2)

    half_lr, half_ap = rng.uniform(150, 175), rng.uniform(100, 115)
    shoulders = np.sqrt(np.clip(1 - ((z - 180) / 75).clip(0) ** 2, 0, 1))  # rounded top
    torso = (np.sqrt((x / half_lr) ** 2 + (y / half_ap) ** 2) / np.maximum(shoulders, 1e-3)
             * outline)
    in_torso = (torso < 1) & (z < 255)
    fat_depth = rng.uniform(12, 25)
    neck = (np.sqrt((x / 50) ** 2 + ((y + 5) / 55) ** 2) < 1) & (z > 200) & (z < 320)
    head = ellipsoid((0, 5, 370), (72, 90, 100)) * outline

    tissue = np.zeros(torso.shape, np.uint8)
    tissue[in_torso | neck] = code["fat"]
    tissue[(in_torso & (torso < 1 - fat_depth / half_ap)) | neck] = code["soft"]
    tissue[head < 1] = code["skull"]
    tissue[head < 0.92] = code["brain"]
    for side in (-1, 1):
        tissue[ellipsoid((80 * side, -5, 120), (55, 70, 105)) < 1] = code["lung"]
        tissue[ellipsoid((95 * side, -35, -330), (35, 55, 60)) < 1] = code["bone"]  # pelvis
    spine = (np.sqrt((x / 17) ** 2 + ((y + 75) / 17) ** 2) < 1) & (z > -330) & (z < 320)
    tissue[spine] = code["bone"]
    tissue[ellipsoid((75, 10, -20), (85, 75, 65)) < 1] = code["liver"]
    tissue[ellipsoid((-25, 35, 60), (50, 42, 48)) < 1] = code["heart"]
    tissue[ellipsoid((0, 45, -400), (45, 38, 35)) < 1] = code["bladder"]
    return tissue


def _lesions(rng: np.random.Generator, xyz: Axes, tissue: np.ndarray) -> np.ndarray:
    """1-4 irregular lesions in lung, liver or soft tissue, kept clear of the hot organs."""
    code = {name: i for i, name in enumerate(BODY_TISSUES)}
    domain = [(-f / 2, f / 2) for f in PETCT_FOV_MM]
    roughness = _smooth_random_field(rng, xyz, domain, 12.0)
    hot_organs = np.isin(tissue, [code["brain"], code["heart"], code["bladder"]])
    x, y, z = (a.reshape([-1 if i == b else 1 for b in range(3)]) for i, a in enumerate(xyz))
    in_z_range = np.broadcast_to((z > LESION_Z_RANGE_MM[0]) & (z < LESION_Z_RANGE_MM[1]),
                                 tissue.shape)
    body = tissue != code["air"]
    lesions = np.zeros(tissue.shape, bool)
    wanted = int(rng.integers(1, 5))
    for _ in range(200):  # rejection sampling; deterministic for a generator state
        if lesions.any() and wanted == 0:
            break
        site = rng.choice(LESION_SITES)
        candidates = np.flatnonzero((tissue == code[site]) & in_z_range)
        if candidates.size == 0:
            continue
        centre = np.unravel_index(candidates[rng.integers(candidates.size)], tissue.shape)
        radius = rng.uniform(12, 24)
        distance = np.sqrt((x - xyz[0][centre[0]]) ** 2 + (y - xyz[1][centre[1]]) ** 2
                           + (z - xyz[2][centre[2]]) ** 2)
        blob = distance / radius + 0.2 * roughness < 1
        if blob.sum() < 2 or (blob & (hot_organs | ~body)).any():
            continue
        lesions |= blob
        wanted -= 1
    return lesions


def make_petct_phantom(seed: int, shape: Sequence[int] = DEFAULT_SHAPES["petct"]) -> PhantomCase:
    """An autoPET-like case: images ``ct`` (HU) and ``pet`` (SUV >= 0), label = lesions {0, 1}.

    Physiological uptake (brain, heart, bladder) is as hot as the lesions on PET but unlabelled,
    so PET alone cannot segment the lesions; CT alone shows only the lung lesions. ``tissues`` has
    one mask per entry of :data:`BODY_TISSUES` (and ``body``).
    """
    shape = _check_shape(shape, "petct")
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    spacing = petct_spacing(shape)
    affine = _lps_affine(shape, spacing)
    xyz = _world_axes(shape, affine)
    tissue = _body_tissues(rng, xyz)
    lesions = _lesions(rng, xyz, tissue)
    lesion_code = BODY_TISSUES.index("lesion")
    liver_lesion = lesions & (tissue == BODY_TISSUES.index("liver"))
    tissue[lesions] = lesion_code

    hu = np.array([BODY_HU[t] + rng.normal(0, 5) for t in BODY_TISSUES], np.float32)
    hu[0] = BODY_HU["air"]
    suv = np.array([BODY_SUV[t] * rng.uniform(0.8, 1.25) for t in BODY_TISSUES], np.float32)
    suv[BODY_TISSUES.index("lesion")] = rng.uniform(4.0, 15.0)
    suv[BODY_TISSUES.index("brain")] = rng.uniform(6.0, 10.0)
    suv[BODY_TISSUES.index("bladder")] = rng.uniform(10.0, 40.0)

    ct = hu[tissue]
    ct[liver_lesion] -= 30  # liver metastases are hypodense on (non-contrast) CT
    ct += rng.uniform(*CT_NOISE_HU) * rng.standard_normal(shape, dtype=np.float32)
    ct = np.clip(ct, -1024, 3071)
    # PET: limited resolution (Gaussian PSF) and count noise growing with the activity.
    sigma_vox = [PET_FWHM_MM / 2.355 / s for s in spacing]
    pet = ndimage.gaussian_filter(suv[tissue], sigma_vox, mode="constant")
    pet += 0.15 * np.sqrt(pet) * rng.standard_normal(shape, dtype=np.float32)
    pet = np.clip(pet, 0, None)

    tissues = {name: tissue == i for i, name in enumerate(BODY_TISSUES)}
    tissues["body"] = tissue != 0
    return PhantomCase(case_id=_case_id("petct", seed), images={"ct": ct.astype(np.float32),
                                                            "pet": pet.astype(np.float32)},
                       label=lesions.astype(np.uint8), affine=affine, tissues=tissues)


# --------------------------------------------------------------------------------------------
# Writing datasets
# --------------------------------------------------------------------------------------------


#: Case folder name per kind: ``<prefix>_<seed:05d>``.
CASE_ID_PREFIX = {"brats": "Phantom", "shapes": "Shapes", "petct": "PETCT", "brain": "Brain"}
#: File written per array of a case ("seg" is the label), per kind; ``{id}`` is the case id.
LAYOUTS = {
    "brats": {m: f"{{id}}_{m}.nii.gz" for m in (*BRATS_MODALITIES, "seg")},
    "brain": {m: f"{{id}}_{m}.nii.gz" for m in (*BRATS_MODALITIES, "seg")},
    "shapes": {m: f"{{id}}_{m}.nii.gz" for m in ("primary", "auxiliary", "seg")},
    "petct": {"ct": "CTres.nii.gz", "pet": "SUV.nii.gz", "seg": "SEG.nii.gz"},  # autoPET names
}


def _case_id(kind: str, seed: int) -> str:
    return f"{CASE_ID_PREFIX[kind]}_{seed:05d}"


#: The brain kind's varieties (:func:`ciml_core.data.brain_phantoms.make_brain_phantom`).
BRAIN_VARIETIES = ("standard", "wide")


def _make_case(kind: str, seed: int, shape: tuple[int, int, int],
               spacing: float | None = None, variety: str | None = None) -> PhantomCase:
    if kind == "brats":
        return make_brats_phantom(seed, shape, spacing)
    if kind == "petct":
        return make_petct_phantom(seed, shape)
    if kind == "brain":  # imported here: brain_phantoms imports this module
        from ciml_core.data.brain_phantoms import make_brain_phantom

        return make_brain_phantom(seed, shape, variety=variety or "standard")
    primary, auxiliary, target = make_shape_composition(seed, shape[:2])

    def thin_volume(a: np.ndarray) -> np.ndarray:  # the same 2-D pair on each of the Z slices
        return np.repeat(a[:, :, None], shape[2], axis=2)

    images = {"primary": thin_volume(primary), "auxiliary": thin_volume(auxiliary)}
    return PhantomCase(case_id=_case_id(kind, seed), images=images, label=thin_volume(target),
                       affine=_lps_affine(shape, (1.0, 1.0, 1.0)))


def write_phantom_dataset(
    kind: str,
    cases: int,
    out: Path,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    overwrite: bool = False,
    spacing: float | None = None,
    variety: str | None = None,
) -> list[Path]:
    """Write ``cases`` synthetic cases of ``kind`` under ``out``; return the case folders.

    ``spacing`` (``brats`` only): the voxel size in mm instead of :func:`brats_spacing`'s
    head-sized field of view; e.g. a 48x48x32 grid at 2 mm is a small head whose case runs at
    1 mm in 1/8 of the windows of the default 4 mm one. ``variety`` (``brain`` only):
    ``"standard"`` (default) or ``"wide"`` (more texture and blur, for training).

    Layouts: ``brats`` -> ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (BraTS 2020, case ids
    ``Phantom_<seed+i:05d>``); ``shapes`` -> ``<case>/<case>_{primary,auxiliary,seg}.nii.gz``
    (ids ``Shapes_...``, default grid 64x64x1); ``petct`` -> ``<case>/{CTres,SUV,SEG}.nii.gz``
    (autoPET, ids ``PETCT_...``). Case ``i`` uses seed ``seed + i``. Images are float32, labels
    uint8, every file of a case has the same LPS affine, and files are written atomically.

    Raises:
        ConfigError: unknown ``kind``, ``cases`` < 1, negative ``seed``, a ``shape`` below the
            kind's minimum (:data:`MIN_SHAPES`), a ``spacing`` for a kind other than brats,
            or a ``variety`` for a kind other than brain.
        FileExistsError: a file to be written exists and ``overwrite`` is False (checked for
            every case before anything is written).
    """
    if kind not in KINDS:
        raise ConfigError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if spacing is not None and kind != "brats":
        raise ConfigError(f"spacing: only the brats kind takes a spacing, got kind {kind!r}")
    if variety is not None and kind != "brain":
        raise ConfigError(f"variety: only the brain kind takes a variety, got kind {kind!r}")
    if isinstance(cases, bool) or not isinstance(cases, int | np.integer) or cases < 1:
        raise ConfigError(f"cases: expected an integer >= 1, got {cases!r}")
    seed = _check_seed(seed)
    shape = _check_shape(DEFAULT_SHAPES[kind] if shape is None else shape, kind)
    out = Path(out)

    seeds = [seed + i for i in range(int(cases))]
    # Check every case first, so that a refusal writes nothing at all.
    refuse_existing((out / _case_id(kind, s) / pattern.format(id=_case_id(kind, s))
                     for s in seeds for pattern in LAYOUTS[kind].values()), overwrite)

    return [write_phantom_case(_make_case(kind, s, shape, spacing, variety), kind, out,
                               overwrite=overwrite) for s in seeds]


def write_phantom_case(case: PhantomCase, kind: str, out: str | os.PathLike, *,
                       overwrite: bool = False) -> Path:
    """Write one generated case in ``kind``'s layout (:data:`LAYOUTS`) into ``out/<case id>``,
    each file atomically; returns the case folder."""
    folder = Path(out) / case.case_id
    for key, pattern in LAYOUTS[kind].items():
        array = case.label if key == "seg" else case.images[key]
        atomic_save(nifti_image(array, case.affine), folder / pattern.format(id=case.case_id),
                    overwrite=overwrite)
    return folder
