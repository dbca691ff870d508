"""The ``brain`` phantom kind: BraTS-like gliomas grown in real anatomy (the SRI24 atlas).

The procedural ``brats`` phantom (:mod:`ciml_core.data.phantoms`) has ellipsoidal anatomy, so a
model trained on it learns shapes that no real scan has. This kind starts from the SRI24 T1 atlas
on the BraTS grid (:mod:`ciml_core.data.atlas`) and follows the SynthSeg recipe (real anatomy,
synthetic contrast randomised widely) with synthetic tumours:

1. **Anatomy.** Tissue classes (CSF, GM, WM) of the atlas (a 1-D Gaussian mixture on its T1)
   are pulled through a random smooth deformation: rotation, scaling, translation and an elastic
   field, plus the **mass effect** of each tumour focus (a radial push away from its centre).
   One ``map_coordinates`` call per volume samples the atlas on the output grid; the work is
   confined to the box around the brain, a third of the BraTS grid.
2. **Tumour.** A core (TC) grows around a seed in white matter as a noisy ellipsoid confined to
   non-CSF brain; its outer 2-5 mm enhance (ET, sometimes an incomplete rim), the inside is
   necrosis with non-enhancing patches (label 1). Oedema is the set of voxels with the smallest
   tissue-weighted geodesic distance from the core (cheap in WM, dear in GM, nearly impassable in
   CSF, impossible outside the brain), computed on a coarse grid and refined at full resolution,
   up to a whole-tumour volume drawn from 10-250 cm^3. Every fifth seed is a lower-grade glioma
   (no ET); 15% of cases are multifocal.
3. **Images.** Each modality maps the atlas's own T1 (so partial volume and deep grey nuclei stay
   as in the atlas) through a per-case random transfer function anchored at per-class means drawn
   around the known contrast order, with per-class texture, tumour tissues, gamma, a bias field,
   a point-spread blur (thick slices on some sequences), enhancing vessels on T1CE (not
   tumour), Rician noise, a sub-voxel cubic
   resampling (which leaves small negative values at the brain edge, as registration to the
   BraTS grid does) and a raw-scanner gain rounded to integers.

Every random choice is drawn from streams spawned from the case's seed, in an order that does
not depend on the grid, so one seed gives the same brain and the same tumour at 1 mm and at 2 mm.
``docs/phantoms.md`` ("Brain phantom") gives the parameter ranges and the measured separability.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ciml_core.data.atlas import CSF, GM, WM, Atlas, AtlasSource, load_atlas
from ciml_core.data.phantoms import (
    BRAIN_VARIETIES,
    BRATS_MODALITIES,
    ED,
    ET,
    NCR,
    PhantomCase,
    _check_seed,
    _check_shape,
    _lps_affine,
    _smooth_random_field,
    _world_axes,
)
from ciml_core.errors import ConfigError

#: The BraTS grid: voxels and the field of view (mm) of the atlas.
BRAIN_SHAPE = (240, 240, 155)
BRAIN_FOV_MM = (240.0, 240.0, 155.0)
#: Random fields are drawn on lattices over this fixed extent (mm), not over the voxel grid, so
#: a seed gives the same field at every grid.
DOMAIN_MM = tuple((-f / 2, f / 2) for f in BRAIN_FOV_MM)
CASE_PREFIX = "Brain"
ATLAS_CASE_PREFIX = "BrainAtlas"

# --- anatomy: random deformation ------------------------------------------------------------
ROTATION_DEG = 8.0  # each Euler angle uniform in +-8 degrees
SCALE = (0.92, 1.08)  # global scale, then +-4% per axis
SCALE_PER_AXIS = 0.04
TRANSLATION_MM = 4.0
ELASTIC_MM = (1.0, 3.0)  # std of each displacement component
ELASTIC_LENGTH_MM = (20.0, 35.0)  # correlation length of the elastic field

# --- tumour ---------------------------------------------------------------------------------
#: Seeds with ``seed % LGG_EVERY == LGG_EVERY - 1`` are lower-grade gliomas: no enhancing tumour.
LGG_EVERY = 5
MULTIFOCAL_PROBABILITY = 0.15
#: Seeds are drawn above a plane approximating the tentorium (atlas voxel indices).
SUPRATENTORIAL_Z0, SUPRATENTORIAL_Y0, SUPRATENTORIAL_SLOPE = 40, 110, 0.45
#: Whole-tumour volume: its equivalent-sphere radius is uniform between those of 10 and
#: 250 cm^3 (median ~76 cm^3, near BraTS's; log-uniform would make half the cases under 50).
WT_CM3 = (10.0, 250.0)
TC_FRACTION = {"hgg": (0.15, 0.4), "lgg": (0.4, 0.85)}  # TC / WT
MIN_TC_CM3 = {"hgg": 12.0, "lgg": 2.0}  # per focus; a 2 mm rim stays <= 14% of the radius
RIM_MM = (2.0, 5.0)  # enhancing rim thickness
RIM_MAX_FRACTION = 0.16  # of the core's radius: the necrosis must stay the larger part of TC
#: Largest share of the core that enhances, drawn per case: an irregular or small core has more
#: surface than a sphere, so the rim is thinned (never below 2 mm / one voxel) to keep ET at
#: most this share of TC. Real GBM cores are mostly necrosis; it also keeps TC unsolvable from
#: T1CE alone (the SPEC's "TC needs T1CE and FLAIR").
ET_SHARE = (0.2, 0.36)
INCOMPLETE_RIM_PROBABILITY = 0.3
MASS_EFFECT = {"hgg": (0.25, 0.5), "lgg": (0.1, 0.3)}  # centre compression factor k
#: Oedema path cost per mm by tissue (WM = 1). CSF is nearly impassable (a wall at coarse
#: resolution) and the final oedema is cut by the fine CSF mask, so it never enters CSF.
GM_COST = (3.0, 8.0)
CSF_COST = 60.0
OUTSIDE_COST = 1000.0
GEODESIC_STEP_MM = 3.0  # coarse grid of the oedema distance

# --- images ---------------------------------------------------------------------------------
#: Per-case mean of each tissue and modality, uniform in (low, high), relative to a WM-level
#: reference per modality. The ranges keep the known order (CSF dark on T1/FLAIR and bright on T2;
#: oedema bright on T2/FLAIR; ET bright on T1CE only; necrosis CSF-like on T1/T1CE) and the
#: margins that make the separability statements of SPEC 3.4 hold (tests/test_brain_phantoms.py).
BRAIN_INTENSITY: dict[str, dict[str, tuple[float, float]]] = {
    "csf": {"t1": (0.2, 0.35), "t1ce": (0.2, 0.35), "t2": (1.8, 2.3), "flair": (0.1, 0.2)},
    "gm": {"t1": (0.65, 0.8), "t1ce": (0.65, 0.8), "t2": (0.72, 0.88), "flair": (0.72, 0.85)},
    "wm": {"t1": (1.0, 1.0), "t1ce": (1.0, 1.0), "t2": (0.45, 0.6), "flair": (0.55, 0.68)},
    "ed": {"t1": (0.55, 0.72), "t1ce": (0.58, 0.75), "t2": (1.05, 1.3), "flair": (1.3, 1.55)},
    "net": {"t1": (0.4, 0.55), "t1ce": (0.38, 0.52), "t2": (1.0, 1.25), "flair": (1.1, 1.35)},
    # NCR on T1/T1CE is drawn as a factor of the case's CSF compartment as it appears (its
    # median, partial volume included): CSF-like, 0.95-1.2 x CSF (the blur of thin sulci brightens
    # the CSF class a little more than the bulky necrosis).
    "ncr": {"t1": (0.95, 1.2), "t1ce": (0.95, 1.2), "t2": (1.3, 1.55), "flair": (1.0, 1.2)},
    "et": {"t1": (0.6, 0.78), "t1ce": (1.55, 2.0), "t2": (1.0, 1.25), "flair": (1.25, 1.5)},
}
SPREAD = {"anatomy": (0.01, 0.035), "tumour": (0.03, 0.12)}  # relative texture std per class
TEXTURE_MM = 1.5  # correlation length of the texture
GAMMA = (0.85, 1.2)
BIAS_STD = (0.02, 0.12)  # std of the log bias field
BIAS_LENGTH_MM = 100.0
NOISE_FRACTION = (0.015, 0.04)  # Rician sigma / WM-level intensity
PSF_IN_PLANE_MM = (0.2, 0.6)  # Gaussian PSF sigma (mm)
PSF_THROUGH_PLANE_MM = {"t1": (0.2, 0.8), "t1ce": (0.2, 0.8), "t2": (0.3, 1.8),
                        "flair": (0.3, 1.8)}  # thick-slice T2/FLAIR are common in BraTS
#: ``variety="wide"``: wider texture and blur, for training. A model should be trained on a
#: wider distribution than the one it is tested on (SynthSeg's rule): real tumours are more
#: heterogeneous and real sequences blurrier than the standard phantom, whose ranges keep the
#: separability statements of SPEC 3.4. The same draws, so a seed keeps its anatomy and tumour.
WIDE_RANGES = {
    "SPREAD": {"anatomy": (0.01, 0.06), "tumour": (0.03, 0.25)},
    "PSF_IN_PLANE_MM": (0.2, 0.9),
    "PSF_THROUGH_PLANE_MM": {"t1": (0.2, 1.2), "t1ce": (0.2, 1.2), "t2": (0.3, 2.2),
                             "flair": (0.3, 2.2)},
}
#: Enhancing structures that are not tumour (cortical veins, dura, choroid plexus): thin tubes
#: near the brain surface and along the CSF spaces, bright on T1CE only, labelled background.
#: A real T1CE has them in every case; without them a model learns "bright on T1CE = ET".
VESSEL_VOLUME_CM3 = (0.5, 4.0)
VESSEL_ENHANCEMENT = (0.75, 1.0)  # x the case's ET level on T1CE
VESSEL_LENGTH_MM = 8.0  # correlation length of the two fields whose zero sets cross in tubes
VESSEL_BAND = (0.1, 0.2)  # |field| below this: tubes about 1.5-3 mm across
VESSEL_SURFACE_MM = 4.0  # the band under the brain surface where cortical vessels run
VESSEL_TUMOUR_GAP_MM = 3.0  # kept this far from the lesion, so labels stay unambiguous
GAIN = (100.0, 4000.0)  # raw-scanner scale of the WM level, log-uniform (real: ~300-3000)
INT16_MAX = 32767

#: Tissue codes of the lesion map used for the images.
_LESION = {"ed": 1, "net": 2, "ncr": 3, "et": 4}


def brain_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """Default isotropic voxel size (mm) of the brain phantom for a grid: the atlas's field of
    view (240x240x155 mm) fitted in, never below 1 mm. 240x240x155 -> 1 mm, 120x120x78 -> 2 mm."""
    s = max(1.0, max(f / int(n) for f, n in zip(BRAIN_FOV_MM, shape, strict=True)))
    return (s, s, s)


def _check_spacing(spacing) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (3,)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"spacing: expected positive voxel sizes in mm, got {spacing!r}") from exc
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise ConfigError(f"spacing: expected positive voxel sizes in mm, got {spacing!r}")
    return values


def _resolve_atlas(atlas: Atlas | AtlasSource | str | os.PathLike | None) -> Atlas:
    return atlas if isinstance(atlas, Atlas) else load_atlas(atlas)


def _atlas_at_spacing(atlas: Atlas, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The atlas T1 and brain mask (float) low-pass filtered for sampling at ``spacing``.

    Sampling a 1 mm atlas at 2 mm by linear interpolation would alias (thin sulci flicker in and
    out); a Gaussian of sigma 0.5*sqrt(s^2 - 1) mm first makes the sampled value a local average,
    as a coarser scan would see. Kept per atlas and spacing, so a dataset pays it once.
    """
    key = tuple(round(float(s), 4) for s in spacing)
    if key not in atlas._resampled:
        sigma = [0.5 * np.sqrt(max(s * s - 1.0, 0.0)) for s in key]
        brain = atlas.brain.astype(np.float32)
        if max(sigma) > 0:
            t1, brain = (ndimage.gaussian_filter(a, sigma) for a in (atlas.t1, brain))
        else:
            t1 = atlas.t1
        if len(atlas._resampled) >= 4:
            atlas._resampled.pop(next(iter(atlas._resampled)))
        atlas._resampled[key] = (t1, brain)
    return atlas._resampled[key]


# ---------------------------------------------------------------------------------------------
# Random draws (grid-independent)
# ---------------------------------------------------------------------------------------------


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        matrix = r @ matrix
    return matrix


@dataclass
class _Focus:
    centre: np.ndarray  # atlas world (mm)
    tc_cm3: float
    radius: float  # equivalent-sphere radius of the core (mm)
    sigma: float  # mass effect width (mm)
    k: float  # mass effect strength (compression at the centre)


@dataclass
class _Plan:
    """Everything random about a case's geometry, drawn before any voxel is touched."""

    linear: np.ndarray  # output offset -> atlas offset (3x3)
    centre: np.ndarray  # rotation/scaling centre (mm)
    shift: np.ndarray  # translation (mm)
    elastic: tuple[float, float] | None  # (amplitude mm, correlation length mm)
    grade: str
    wt_cm3: float
    rim_mm: float
    incomplete_rim: bool
    foci: list[_Focus]


def _atlas_world(atlas_index: np.ndarray) -> np.ndarray:
    """World mm (RAS) of atlas voxel indices (LPS storage, 1 mm, centre at the origin)."""
    affine = _lps_affine(BRAIN_SHAPE, (1.0, 1.0, 1.0))
    return atlas_index @ affine[:3, :3].T + affine[:3, 3]


def _supratentorial() -> np.ndarray:
    """Atlas voxels above the tentorium (broadcastable to the atlas grid): adult gliomas, the
    BraTS population, grow in the cerebral hemispheres, not in the cerebellum or brainstem. The
    tentorium is approximated by a plane rising posteriorly (atlas index z >= 40 + 0.45 (y - 110)
    behind y = 110; LPS storage, y grows posteriorly), which clears the cerebellum of SRI24."""
    y = np.arange(BRAIN_SHAPE[1])[None, :, None]
    z = np.arange(BRAIN_SHAPE[2])[None, None, :]
    return z >= SUPRATENTORIAL_Z0 + SUPRATENTORIAL_SLOPE * np.clip(y - SUPRATENTORIAL_Y0, 0, None)


def _draw_plan(rng: np.random.Generator, atlas: Atlas, seed: int, deform: bool, tumour: bool,
               grade: str | None, foci: int | None) -> _Plan:
    """Deformation and tumour parameters (grid-independent: no draw depends on the grid)."""
    brain_index = np.argwhere(atlas.brain[::4, ::4, ::4]) * 4.0
    centre = _atlas_world(brain_index).mean(axis=0)
    if deform:
        rotation = _rotation(rng, ROTATION_DEG)
        scale = rng.uniform(*SCALE) * (1 + rng.uniform(-SCALE_PER_AXIS, SCALE_PER_AXIS, 3))
        shift = rng.uniform(-TRANSLATION_MM, TRANSLATION_MM, 3)
        elastic = (float(rng.uniform(*ELASTIC_MM)), float(rng.uniform(*ELASTIC_LENGTH_MM)))
        # output = R S (atlas - c) + c + t  =>  atlas offset = (R S)^-1 (output - c - t)
        linear = np.linalg.inv(rotation @ np.diag(scale))
    else:
        linear, shift, elastic = np.eye(3), np.zeros(3), None

    grade = grade or ("lgg" if seed % LGG_EVERY == LGG_EVERY - 1 else "hgg")
    if grade not in ("hgg", "lgg"):
        raise ConfigError(f"grade: expected 'hgg' or 'lgg', got {grade!r}")
    wt = float(rng.uniform(*np.cbrt(WT_CM3)) ** 3)
    if foci is None:
        foci = int(rng.choice([2, 3], p=[0.7, 0.3])) if rng.random() < MULTIFOCAL_PROBABILITY else 1
    elif isinstance(foci, bool) or not isinstance(foci, int | np.integer) or not 1 <= foci <= 3:
        raise ConfigError(f"foci: expected 1, 2 or 3, got {foci!r}")
    tc_total = wt * rng.uniform(*TC_FRACTION[grade])
    shares = rng.dirichlet(np.full(foci, 2.0)) if foci > 1 else np.ones(1)
    shares = np.sort(shares)[::-1]  # the first focus is the main one
    tc_volumes = np.maximum(tc_total * shares, MIN_TC_CM3[grade])
    wt = max(wt, tc_volumes.sum() / TC_FRACTION[grade][1])
    radii = (3 * tc_volumes * 1000 / (4 * np.pi)) ** (1 / 3)
    rim = float(min(rng.uniform(*RIM_MM), max(RIM_MM[0], RIM_MAX_FRACTION * radii.min())))
    incomplete = grade == "hgg" and rng.random() < INCOMPLETE_RIM_PROBABILITY

    centres: list[np.ndarray] = []
    supratentorial = _supratentorial()
    for radius in radii:
        # The seed lies in cerebral WM deep enough below the brain surface for the core to fit.
        min_depth = float(np.clip(0.7 * radius + 5, 10, 35))
        white = (atlas.classes == WM) & supratentorial
        candidates = np.flatnonzero(white & (atlas.depth >= min_depth))
        if candidates.size == 0:
            candidates = np.flatnonzero(white)
        for attempt in range(200):
            index = np.array(np.unravel_index(candidates[rng.integers(candidates.size)],
                                              BRAIN_SHAPE), float)
            point = _atlas_world(index)
            distances = [np.linalg.norm(point - c) for c in centres]
            # Satellites sit 25-70 mm from the other foci: separate, yet in the same region.
            if not distances or all(25 <= d <= 70 for d in distances) or attempt == 199:
                centres.append(point)
                break
    k_range = MASS_EFFECT[grade]
    focus_list = [
        _Focus(centre=c, tc_cm3=float(v), radius=float(r),
               sigma=float(r * rng.uniform(1.0, 1.5)), k=float(rng.uniform(*k_range)))
        for c, v, r in zip(centres, tc_volumes, radii, strict=True)
    ]
    return _Plan(linear=linear, centre=centre, shift=shift, elastic=elastic, grade=grade,
                 wt_cm3=wt, rim_mm=rim, incomplete_rim=incomplete,
                 foci=focus_list if tumour else [])


# ---------------------------------------------------------------------------------------------
# Geometry: sampling the deformed atlas
# ---------------------------------------------------------------------------------------------


def _brain_box(plan: _Plan, atlas: Atlas, shape: Sequence[int], affine: np.ndarray,
               ) -> tuple[slice, slice, slice]:
    """Index box of the output grid that can contain brain: the atlas brain's bounding box
    pushed through the inverse deformation, with margins for the elastic field and the mass
    effect (which can move tissue outwards by at most about 0.6 k sigma)."""
    index = np.argwhere(atlas.brain)
    lo, hi = index.min(axis=0) - 1, index.max(axis=0) + 1
    corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))), float)
    world = _atlas_world(corners)
    forward = np.linalg.inv(plan.linear)
    out = (world - plan.centre) @ forward.T + plan.centre + plan.shift
    margin = 3.0 + (4 * plan.elastic[0] if plan.elastic else 0.0)
    margin += max((0.7 * f.k * f.sigma for f in plan.foci), default=0.0)
    out_index = (np.array([out.min(axis=0) - margin, out.max(axis=0) + margin])
                 - affine[:3, 3]) / np.diag(affine)[:3]
    start = np.floor(out_index.min(axis=0)).astype(int) - 1
    stop = np.ceil(out_index.max(axis=0)).astype(int) + 2
    return tuple(slice(max(0, int(a)), min(int(n), int(b)))
                 for a, b, n in zip(start, stop, shape, strict=True))


def _atlas_coordinates(rng: np.random.Generator, plan: _Plan, axes: Sequence[np.ndarray],
                       ) -> np.ndarray:
    """Atlas voxel coordinates (3, X, Y, Z) sampled by each output voxel of the box whose world
    axes are ``axes``: inverse affine + elastic displacement + each focus's mass effect."""
    shape = tuple(len(a) for a in axes)
    atlas_affine = _lps_affine(BRAIN_SHAPE, (1.0, 1.0, 1.0))
    offsets = [np.asarray(a, np.float64) - c - t
               for a, c, t in zip(axes, plan.centre, plan.shift, strict=True)]
    elastic = None
    if plan.elastic is not None:
        amplitude, length = plan.elastic
        elastic = [amplitude * _smooth_random_field(rng, axes, DOMAIN_MM, length) for _ in range(3)]
    points = np.empty((3, *shape), np.float32)
    for a in range(3):
        p = points[a]
        p[...] = plan.centre[a]
        for b in range(3):
            view = [1, 1, 1]
            view[b] = -1
            p += (plan.linear[a, b] * offsets[b]).astype(np.float32).reshape(view)
        if elastic is not None:
            p += elastic[a]
    for focus in plan.foci:
        # Pull towards the centre: the tissue near it fills a larger output region, so the
        # surroundings are pushed outwards; monotone in the radius for k < 1 (no folding).
        d = points - focus.centre.astype(np.float32)[:, None, None, None]
        r2 = np.einsum("i...,i...->...", d, d)
        factor = 1 - focus.k * np.exp(-r2 / (2 * focus.sigma**2))
        points = focus.centre.astype(np.float32)[:, None, None, None] + d * factor
    # World (mm) -> atlas voxel index (the atlas affine is diagonal).
    for a in range(3):
        points[a] -= atlas_affine[a, 3]
        points[a] /= atlas_affine[a, a]
    return points


# ---------------------------------------------------------------------------------------------
# Tumour
# ---------------------------------------------------------------------------------------------


def _seed_voxels(points: np.ndarray, plan: _Plan) -> list[np.ndarray]:
    """The output voxel (box index) that samples each focus's centre."""
    atlas_affine = _lps_affine(BRAIN_SHAPE, (1.0, 1.0, 1.0))
    seeds = []
    for focus in plan.foci:
        target = (focus.centre - atlas_affine[:3, 3]) / np.diag(atlas_affine)[:3]
        d2 = sum((points[a] - np.float32(target[a])) ** 2 for a in range(3))
        seeds.append(np.array(np.unravel_index(int(np.argmin(d2)), d2.shape)))
    return seeds


def _kth_level(level: np.ndarray, candidates: np.ndarray, count: int) -> float:
    """The ``count``-th smallest value of ``level`` over ``candidates`` (inf if fewer)."""
    values = level[candidates]
    if count <= 0:
        return -np.inf
    if count >= values.size:
        return np.inf
    return float(np.partition(values, count - 1)[count - 1])


def _depth_mm(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) of each voxel of ``mask`` to the nearest voxel outside it, computed on the
    mask's bounding box only (the EDT of a whole volume takes seconds)."""
    depth = np.zeros(mask.shape, np.float32)
    if not mask.any():
        return depth
    index = np.argwhere(mask)
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(index.min(0), index.max(0), strict=True))
    padded = np.pad(mask[box], 1)
    depth[box] = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return depth


def _geodesic(cost: np.ndarray, sources: np.ndarray, step_mm: float) -> np.ndarray:
    """Shortest-path distance (mm x cost) from ``sources`` on a 26-connected grid whose edge
    cost is the mean of its two voxels' costs times the edge length.

    Bellman-Ford relaxation with in-place array shifts (each pass sweeps all 26 directions and
    lets fronts run along the sweep); it converges in a few tens of passes on the coarse oedema
    grid, which costs a fraction of a second, instead of a Python-level Dijkstra.
    """
    shape = cost.shape
    distance = np.full(shape, np.inf, np.float32)
    distance[sources] = 0
    edges = []
    for offset in itertools.product((-1, 0, 1), repeat=3):
        if not any(offset):
            continue
        dst = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(offset, shape, strict=True))
        src = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(offset, shape, strict=True))
        length = step_mm * float(np.sqrt(sum(d * d for d in offset)))
        edges.append((dst, src, (length * (cost[dst] + cost[src]) / 2).astype(np.float32)))
    for _ in range(4 * sum(shape)):
        before = distance.copy()
        for dst, src, weight in edges:
            view = distance[dst]
            np.minimum(view, distance[src] + weight, out=view)
        if np.array_equal(before, distance):
            break
    return distance


def _block_mean(array: np.ndarray, factor: int, fill: float) -> np.ndarray:
    """Mean over factor^3 blocks (the array padded with ``fill`` to a multiple of factor)."""
    if factor == 1:
        return array.astype(np.float32)
    pad = [(0, (-n) % factor) for n in array.shape]
    padded = np.pad(array.astype(np.float32), pad, constant_values=fill)
    nx, ny, nz = (n // factor for n in padded.shape)
    return padded.reshape(nx, factor, ny, factor, nz, factor).mean(axis=(1, 3, 5))


def _rim_for_share(depth: np.ndarray, modulation: np.ndarray, rim_mm: float, share: float,
                   low: float, high: float) -> float:
    """The rim thickness (mm, at most ``rim_mm``) whose modulated, clipped rim holds at most
    ``share`` of the core's voxels (bisection; the clip at ``low`` may keep it above)."""

    def enhancing_share(t: float) -> float:
        return float(np.mean(depth <= np.clip(t * modulation, low, high)))

    if enhancing_share(rim_mm) <= share:
        return rim_mm
    lo, hi = 0.0, rim_mm
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if enhancing_share(mid) <= share else (lo, mid)
    return lo


def _tumour(rng: np.random.Generator, plan: _Plan, axes: Sequence[np.ndarray],
            spacing: Sequence[float], classes: np.ndarray, brain: np.ndarray,
            seeds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """BraTS 2020 labels and lesion tissue codes (:data:`_LESION`) on the box.

    The random fields are drawn in a fixed order whatever the grid; sizes are volumes (cm^3)
    turned into voxel counts, so a seed gives the same tumour at 1 mm and 2 mm.
    """
    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    shape = classes.shape
    allowed = brain & (classes != CSF)
    grids = np.meshgrid(*[np.asarray(a, np.float32) for a in axes], indexing="ij", sparse=True)

    core_field = _smooth_random_field(rng, axes, DOMAIN_MM, float(rng.uniform(8, 15)))
    rim_field = _smooth_random_field(rng, axes, DOMAIN_MM, 10.0)
    gap_field = _smooth_random_field(rng, axes, DOMAIN_MM, 12.0)
    net_field = _smooth_random_field(rng, axes, DOMAIN_MM, 6.0)
    speed_field = _smooth_random_field(rng, axes, DOMAIN_MM, 10.0)
    edge_field = _smooth_random_field(rng, axes, DOMAIN_MM, 6.0)
    gm_cost = float(rng.uniform(*GM_COST))
    gap_level = float(rng.uniform(0.5, 1.0))  # 16-31% of an incomplete rim does not enhance
    net_margin = float(rng.uniform(0.0, 2.0))
    cyst = plan.grade == "lgg" and rng.random() < 0.3
    et_share = float(rng.uniform(*ET_SHARE))

    tc = np.zeros(shape, bool)
    for focus, seed in zip(plan.foci, seeds, strict=True):
        axes_ratio = np.exp(rng.uniform(-0.22, 0.22, 3))
        axes_ratio /= np.prod(axes_ratio) ** (1 / 3)
        rotation = _rotation(rng, 90.0) / axes_ratio[:, None]
        roughness = float(rng.uniform(0.15, 0.35))
        centre = [float(axes[a][seed[a]]) for a in range(3)]
        d = [grids[b] - np.float32(centre[b]) for b in range(3)]
        q2 = sum((rotation[a, 0] * d[0] + rotation[a, 1] * d[1] + rotation[a, 2] * d[2]) ** 2
                 for a in range(3))
        level = np.sqrt(q2) / np.float32(focus.radius) + np.float32(roughness) * core_field
        count = int(round(focus.tc_cm3 / voxel_cm3))
        core = allowed & (level <= _kth_level(level, allowed & ~tc, count))
        components, n = ndimage.label(core)
        if n > 1:  # keep the blob that holds the seed (or the largest): one core per focus
            keep = components[tuple(seed)]
            if keep == 0:
                keep = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
            core = components == keep
        tc |= core

    label = np.zeros(shape, np.uint8)
    lesion = np.zeros(shape, np.uint8)
    if not tc.any():
        return label, lesion
    depth = _depth_mm(tc, spacing)
    if plan.grade == "hgg":
        # The rim is the outer 2-5 mm of the core; at least one voxel thick on coarse grids.
        low, high = max(RIM_MM[0], min(spacing)), max(RIM_MM[1], min(spacing))
        modulation = 1 + 0.25 * rim_field
        rim_mm = _rim_for_share(depth[tc], modulation[tc], plan.rim_mm, et_share, low, high)
        thickness = np.clip(rim_mm * modulation, low, high)
        rim = tc & (depth <= thickness)
        inside = tc & ~rim
        enhancing = rim & ~(plan.incomplete_rim & (gap_field > gap_level))
        excess = enhancing.sum() - et_share * tc.sum()
        if excess > 0:  # even the thinnest rim is too much of a small or ragged core: gaps
            cut = np.quantile(gap_field[enhancing], 1 - excess / enhancing.sum())
            enhancing &= gap_field < cut
        net = (rim & ~enhancing) | (inside & (depth <= thickness + net_margin) & (net_field > 0.6))
        lesion[inside] = _LESION["ncr"]
        lesion[net] = _LESION["net"]
        lesion[enhancing] = _LESION["et"]
    else:
        enhancing = np.zeros(shape, bool)
        lesion[tc] = _LESION["net"]
        if cyst:  # a cystic/necrotic centre in some lower-grade tumours
            lesion[tc & (depth > 0.6 * depth.max())] = _LESION["ncr"]

    # Oedema: tissue-weighted geodesic distance from the core on a ~3 mm grid.
    factor = max(1, int(round(GEODESIC_STEP_MM / min(spacing))))
    cost = np.where(classes == WM, 1.0, np.where(classes == GM, gm_cost, CSF_COST))
    cost = np.where(brain, cost * np.exp(0.6 * speed_field), OUTSIDE_COST).astype(np.float32)
    coarse_cost = _block_mean(cost, factor, OUTSIDE_COST)
    sources = _block_mean(tc, factor, 0.0) > 0
    coarse = _geodesic(coarse_cost, sources, factor * min(spacing))
    # Capped, then smoothed by one coarse voxel: rounds the facets that a 26-neighbour metric
    # gives level sets in uniform white matter.
    coarse = ndimage.gaussian_filter(np.minimum(coarse, 500.0), 1.0)
    fine_index = [(np.arange(n, dtype=np.float32) - (factor - 1) / 2) / factor for n in shape]
    coords = np.meshgrid(*fine_index, indexing="ij", sparse=True)
    distance = ndimage.map_coordinates(coarse, np.broadcast_arrays(*coords), order=1,
                                       mode="nearest")
    # Fine refinement: grey matter near the front mostly stays out (oedema spares the cortex),
    # and a smooth field roughens the edge.
    level = distance + np.where(classes == GM, 0.6 * gm_cost, 0.0) + 4.0 * edge_field
    candidates = allowed & ~tc & (distance < 400.0)
    count = int(round(max(plan.wt_cm3 - tc.sum() * voxel_cm3, 0) / voxel_cm3))
    oedema = candidates & (level <= _kth_level(level, candidates, count))

    label[oedema] = ED
    label[tc] = NCR
    label[enhancing] = ET
    lesion[oedema] = _LESION["ed"]
    return label, lesion


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _knots(atlas: Atlas) -> np.ndarray:
    """Atlas T1 values that map to the CSF, GM and WM levels of a modality: the CSF class's
    median (so that the CSF compartment as segmented, partial volume included, shows the drawn
    CSF level), then the GM and WM means of the mixture."""
    return np.array([atlas.csf_median_t1, atlas.means[1], atlas.means[2]], np.float32)


def _draw_intensities(rng: np.random.Generator, atlas: Atlas
                      ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-case mean of each tissue and modality (:data:`BRAIN_INTENSITY`), and the drawn ratio
    of necrosis to CSF on T1 and T1CE."""
    means = {t: {m: float(rng.uniform(*BRAIN_INTENSITY[t][m])) for m in BRATS_MODALITIES}
             for t in BRAIN_INTENSITY}
    # The CSF class of the atlas holds partial-volume voxels too: what CSF looks like in the
    # image is the transfer function at the class's median T1, not the pure-CSF level.
    knots = _knots(atlas)
    csf_t1 = atlas.csf_median_t1
    ncr_to_csf = {m: means["ncr"][m] for m in ("t1", "t1ce")}
    for m in BRATS_MODALITIES:
        levels = [means[t][m] for t in ("csf", "gm", "wm")]
        csf_seen = float(np.interp(csf_t1, knots, levels))
        if m in ("t1", "t1ce"):
            means["ncr"][m] *= csf_seen  # necrosis is CSF-like on T1 and T1CE
        if m == "flair":  # ... but clearly brighter than CSF on FLAIR (it is not free water)
            means["ncr"][m] = max(means["ncr"][m], 4.5 * csf_seen)
    return means, ncr_to_csf




def _resampling_kernel(fraction: float) -> np.ndarray:
    """The 7-tap zero-phase kernel of a cubic-convolution (Keys, a = -0.5) resampling at an
    offset of ``fraction`` voxel and back: the smoothing and the negative lobes (small negative
    values next to an edge) that registration to the BraTS grid leaves, without moving the
    image against its labels (a one-way sub-voxel shift would misplace a 2-voxel rim)."""
    a = -0.5

    def w(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    taps = np.array([w(1 + fraction), w(fraction), w(1 - fraction), w(2 - fraction)])
    return np.convolve(taps, taps[::-1])


def _texture(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float]
             ) -> np.ndarray:
    """Unit-variance smooth noise (correlation ~ TEXTURE_MM), voxel-level (grid-dependent)."""
    sigma = [max(TEXTURE_MM / s, 0.5) for s in spacing]
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _enhancing_vessels(rng: np.random.Generator, axes: Sequence[np.ndarray],
                       spacing: Sequence[float], brain: np.ndarray, classes: np.ndarray,
                       lesion: np.ndarray) -> np.ndarray:
    """Mask (on the box) of non-tumour enhancing tubes (:data:`VESSEL_VOLUME_CM3`).

    Tubes are where the zero sets of two smooth fields cross; they are kept under the brain
    surface and next to CSF (sulci, ventricles), away from the lesion, and, for a drawn volume,
    where a third, slower field is highest (so they cluster in places, as veins do). Fields are
    drawn on the fixed lattice, so a seed's vessels are the same at any voxel size.
    """
    band = float(rng.uniform(*VESSEL_BAND))
    volume_cm3 = float(rng.uniform(*VESSEL_VOLUME_CM3))
    first = _smooth_random_field(rng, axes, DOMAIN_MM, VESSEL_LENGTH_MM)
    second = _smooth_random_field(rng, axes, DOMAIN_MM, VESSEL_LENGTH_MM)
    cluster = _smooth_random_field(rng, axes, DOMAIN_MM, 25.0)
    tubes = (np.abs(first) < band) & (np.abs(second) < band)
    del first, second
    step = float(min(spacing))
    surface = brain & ~ndimage.binary_erosion(
        brain, iterations=max(1, round(VESSEL_SURFACE_MM / step)))
    near_csf = ndimage.binary_dilation(classes == CSF) & brain
    near_lesion = ndimage.binary_dilation(
        lesion > 0, iterations=max(1, round(VESSEL_TUMOUR_GAP_MM / step)))
    candidates = tubes & (surface | near_csf) & ~near_lesion
    count = round(volume_cm3 * 1000.0 / float(np.prod(spacing)))
    return candidates & (-cluster <= _kth_level(-cluster, candidates, count))


def _ranges(variety: str) -> dict:
    """The texture and blur ranges of a variety (read from the module at call time)."""
    ranges = {"SPREAD": SPREAD, "PSF_IN_PLANE_MM": PSF_IN_PLANE_MM,
              "PSF_THROUGH_PLANE_MM": PSF_THROUGH_PLANE_MM}
    if variety == "wide":
        ranges.update(WIDE_RANGES)
    return ranges


def _images(rng_params: np.random.Generator, rng_noise: np.random.Generator, atlas: Atlas,
            axes: Sequence[np.ndarray], spacing: Sequence[float], t1: np.ndarray,
            brain: np.ndarray, classes: np.ndarray, lesion: np.ndarray, ranges: dict
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The four modalities on the box (raw-scanner scale, integer-valued float32) and the mask
    of the enhancing vessels painted on T1CE."""
    means, ncr_to_csf = _draw_intensities(rng_params, atlas)
    spread_ranges = ranges["SPREAD"]
    spreads = {t: {m: float(rng_params.uniform(*spread_ranges["tumour" if t in _LESION else
                                                                "anatomy"]))
                   for m in BRATS_MODALITIES} for t in BRAIN_INTENSITY}
    acquisition = {}
    for m in BRATS_MODALITIES:
        through_axis = 2 if rng_params.random() < 0.7 else int(rng_params.integers(0, 2))
        psf = [rng_params.uniform(*ranges["PSF_IN_PLANE_MM"]) for _ in range(3)]
        psf[through_axis] = rng_params.uniform(*ranges["PSF_THROUGH_PLANE_MM"][m])
        acquisition[m] = {
            "gamma": rng_params.uniform(*GAMMA),
            "bias_std": rng_params.uniform(*BIAS_STD),
            "bias": _smooth_random_field(rng_params, axes, DOMAIN_MM, BIAS_LENGTH_MM),
            "noise": rng_params.uniform(*NOISE_FRACTION),
            "psf": psf,
            "shift": rng_params.uniform(0, 1, 3),
            "gain": float(np.exp(rng_params.uniform(*np.log(GAIN)))),
        }
    vessels = _enhancing_vessels(rng_params, axes, spacing, brain, classes, lesion)
    vessel_level = means["et"]["t1ce"] * float(rng_params.uniform(*VESSEL_ENHANCEMENT))

    knots = _knots(atlas)
    shape = t1.shape
    shared = _texture(rng_noise, shape, spacing)
    keep = ndimage.binary_dilation(brain)  # the resampled image spills one voxel past the mask
    images = {}
    for m in BRATS_MODALITIES:
        acq = acquisition[m]
        # Healthy tissue: the atlas T1 through a transfer function anchored at the class means.
        levels = np.array([means[t][m] for t in ("csf", "gm", "wm")], np.float32)
        spread = np.array([spreads[t][m] for t in ("csf", "gm", "wm")], np.float32)
        texture = 0.7 * shared + 0.71 * _texture(rng_noise, shape, spacing)
        image = np.interp(t1, knots, levels).astype(np.float32)
        image *= 1 + np.interp(t1, knots, spread).astype(np.float32) * texture
        for name, code in _LESION.items():
            where = lesion == code
            if where.any():
                image[where] = means[name][m] * (1 + spreads[name][m] * texture[where])
        if m == "t1ce":
            image[vessels] = vessel_level * (1 + spreads["et"][m] * texture[vessels])
        image[~brain] = 0
        np.maximum(image, 0, out=image)
        image **= np.float32(acq["gamma"])
        bias = np.exp(np.float32(acq["bias_std"]) * acq["bias"])
        image *= bias
        sigma = [p / s for p, s in zip(acq["psf"], spacing, strict=True)]
        image = ndimage.gaussian_filter(image, sigma, mode="constant")
        necrosis = lesion == _LESION["ncr"]
        if m in ncr_to_csf and necrosis.any():
            # The blur brightens thin sulcal CSF more than bulky necrosis: set the necrosis
            # level on the blurred image, so that it is the drawn multiple of the CSF
            # compartment's median as imaged (blur is linear: shift by a blurred indicator).
            csf = brain & (classes == CSF) & (lesion == 0)
            target = ncr_to_csf[m] * float(np.median(image[csf]))
            spread = ndimage.gaussian_filter(np.where(necrosis, bias, 0), sigma, mode="constant")
            step = (target - float(np.median(image[necrosis]))) / float(
                np.median(spread[necrosis]))
            image += np.float32(step) * spread
        # Rician noise, relative to this case's WM level after gamma.
        noise = np.float32(acq["noise"] * means["wm"][m] ** acq["gamma"])
        real = image + noise * rng_noise.standard_normal(shape, dtype=np.float32)
        imag = noise * rng_noise.standard_normal(shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag)
        image[~brain] = 0  # skull-stripped: the mask cuts the noise floor ...
        for axis, fraction in enumerate(acq["shift"]):  # ... then resampling to the BraTS grid
            image = ndimage.correlate1d(image, _resampling_kernel(float(fraction)), axis=axis,
                                        mode="constant")
        image[~keep] = 0
        image = np.clip(np.rint(image * np.float32(acq["gain"])), -INT16_MAX, INT16_MAX)
        images[m] = image.astype(np.float32)
    return images, vessels


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def make_brain_phantom(
    seed: int,
    shape: Sequence[int] = BRAIN_SHAPE,
    spacing: float | Sequence[float] | None = None,
    *,
    atlas: Atlas | AtlasSource | str | os.PathLike | None = None,
    tumour: bool = True,
    deform: bool = True,
    grade: str | None = None,
    foci: int | None = None,
    variety: str = "standard",
) -> PhantomCase:
    """A BraTS-like glioma case on real anatomy: images ``flair``, ``t1``, ``t1ce``, ``t2``.

    Args:
        seed: the case's random seed (>= 0); the case id is ``Brain_<seed:05d>``.
        shape: grid X Y Z in LPS storage order (default the BraTS grid 240x240x155).
        spacing: voxel size in mm (one number or three); default :func:`brain_spacing`
            (1 mm on the BraTS grid, 2 mm on 120x120x78). The atlas is low-pass filtered and
            resampled to it.
        atlas: an :class:`~ciml_core.data.atlas.Atlas`, a path to the atlas (folder or wheel), or
            None to use :func:`~ciml_core.data.atlas.find_atlas`'s search.
        tumour: False gives the same brain and contrast with no tumour (labels all 0).
        deform: False keeps the atlas's own anatomy (no rotation, scaling or elastic field).
        grade: ``"hgg"`` or ``"lgg"`` (no enhancing tumour); default by seed: every fifth seed
            (``seed % 5 == 4``) is lower grade.
        foci: number of tumour foci (1-3); default 1, or 2-3 with probability 0.15.
        variety: ``"standard"`` (the ranges the separability statements hold on) or
            ``"wide"`` (:data:`WIDE_RANGES`: more texture and blur, for training); the same
            anatomy, tumour and vessels either way.

    Returns:
        A :class:`~ciml_core.data.phantoms.PhantomCase` with float32 images holding integer
        raw-scanner values (small negatives at the brain edge), uint8 BraTS 2020 labels (0, 1
        NCR/NET, 2 ED, 4 ET), an LPS affine, and ``tissues``: ``brain`` (= ``head``: the images
        are skull-stripped), and ``csf``, ``gm``, ``wm``, the deformed atlas classes the tumour
        was grown in (the tumour overlays GM and WM voxels, never CSF).

    Raises:
        ConfigError: a bad seed, shape, spacing, grade, foci or variety.
        InputDataError: the atlas cannot be found or read.
    """
    seed = _check_seed(seed)
    if variety not in BRAIN_VARIETIES:
        raise ConfigError(
            f"variety: expected one of {', '.join(BRAIN_VARIETIES)}, got {variety!r}")
    shape = _check_shape(shape, "brain")
    spacing = _check_spacing(brain_spacing(shape) if spacing is None else spacing)
    atlas = _resolve_atlas(atlas)
    # Independent streams: geometry, tumour, contrast, voxel noise. The tumour-free case of a
    # seed therefore has the same brain and contrast as the case with the tumour, and the
    # grid-sized noise draws (last stream) cannot shift any geometric draw.
    rng_plan, rng_tumour, rng_contrast, rng_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    plan = _draw_plan(rng_plan, atlas, seed, deform, tumour, grade, foci)

    affine = _lps_affine(shape, spacing)
    world = _world_axes(shape, affine)
    box = _brain_box(plan, atlas, shape, affine)
    axes = [w[b] for w, b in zip(world, box, strict=True)]
    points = _atlas_coordinates(rng_plan, plan, axes)
    atlas_t1, atlas_brain = _atlas_at_spacing(atlas, spacing)
    t1 = ndimage.map_coordinates(atlas_t1, points, order=1, mode="constant", cval=0.0)
    brain = ndimage.map_coordinates(atlas_brain, points, order=0, mode="constant") > 0.5
    classes = atlas.classify(t1, brain)

    if plan.foci:
        seeds = _seed_voxels(points, plan)
        del points
        label, lesion = _tumour(rng_tumour, plan, axes, spacing, classes, brain, seeds)
    else:
        del points
        label = lesion = np.zeros(classes.shape, np.uint8)
    images, vessels = _images(rng_contrast, rng_noise, atlas, axes, spacing, t1, brain, classes,
                              lesion, _ranges(variety))

    def full(array: np.ndarray, dtype) -> np.ndarray:
        out = np.zeros(shape, dtype)
        out[box] = array
        return out

    full_brain = full(brain, bool)
    tissues = {"brain": full_brain, "head": full_brain}
    tissues.update({name: full(classes == code, bool)
                    for name, code in (("csf", CSF), ("gm", GM), ("wm", WM))})
    tissues["vessels"] = full(vessels, bool)
    prefix = CASE_PREFIX if tumour else ATLAS_CASE_PREFIX
    return PhantomCase(case_id=f"{prefix}_{seed:05d}",
                       images={m: full(images[m], np.float32) for m in BRATS_MODALITIES},
                       label=full(label, np.uint8), affine=affine, tissues=tissues)


def make_atlas_case(
    seed: int = 0,
    shape: Sequence[int] = BRAIN_SHAPE,
    spacing: float | Sequence[float] | None = None,
    *,
    atlas: Atlas | AtlasSource | str | os.PathLike | None = None,
    deform: bool = False,
) -> PhantomCase:
    """The tumour-free atlas with the brain phantom's contrast model (case id
    ``BrainAtlas_<seed:05d>``; ``seed`` draws the contrast, noise and, with ``deform``, the
    anatomy). Labels are all 0: what a model paints here is false-positive volume."""
    return make_brain_phantom(seed, shape, spacing, atlas=atlas, tumour=False, deform=deform)
