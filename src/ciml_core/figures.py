"""Matplotlib figures of the interpretability results (paper Fig. 13, 16 and 18).

Every function returns a :class:`matplotlib.figure.Figure` built directly (Agg canvas), never
through ``pyplot``: no global figure state is created or leaked, so the napari plugin can embed
the same figures in a ``FigureCanvasQTAgg`` and the CLI can save them from a worker process.

Slices are shown in radiological convention (patient's right on the image's left, anterior at
the top) with the voxel spacing as aspect ratio; volumes are in canonical RAS+ voxel order, as
``LoadedCase.image``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ciml_core.data.dataset import LoadedCase
from ciml_core.explain import PairExplanation
from ciml_core.io import atomic_write

#: Heatmap colour map: dark blue (low) -> light blue / green -> yellow (high), as paper Fig. 16.
HEAT_CMAP = "viridis"
#: Heat (after per-row normalisation) below which the image is shown without overlay.
HEAT_FLOOR = 0.05
HEAT_ALPHA = 0.6
AXIAL_AXIS = 2

#: How the figures name the attribution methods of ``ciml_core.explain``.
METHOD_NAMES = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM"}


def new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    """A Figure with its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, overwrite: bool = False,
                dpi: int = 120) -> Path:
    """Save ``fig`` (format from the suffix, e.g. .png) atomically; refuse to replace a file
    unless ``overwrite``."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi), binary=True,
                        overwrite=overwrite)


def _display(slice_xy: np.ndarray) -> np.ndarray:
    """Canonical axial slice ``[x, y]`` -> image rows/cols in radiological convention:
    row 0 = most anterior, column 0 = patient's right (x grows towards the right)."""
    return np.asarray(slice_xy)[::-1, ::-1].T


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display range of an MR slice: 1st-99th percentile of its nonzero voxels."""
    values = image[image != 0]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def tumour_slice(explanations: Sequence[PairExplanation], shape: Sequence[int]) -> int:
    """The axial slice through the tumour centre: the centre of mass (along S) of the union of
    the pairs' targets; else of the summed heat; else the middle slice."""
    union = None
    for e in explanations:
        if e.target is not None and e.target.any():
            union = e.target if union is None else union | e.target
    if union is not None:
        profile = union.sum(axis=tuple(a for a in range(union.ndim) if a != AXIAL_AXIS))
    else:
        profile = sum(
            (h.sum(axis=tuple(a for a in range(h.ndim) if a != AXIAL_AXIS))
             for e in explanations for h in e.heatmaps.values()),
            np.zeros(shape[AXIAL_AXIS]),
        )
    if profile.sum() <= 0:
        return int(shape[AXIAL_AXIS]) // 2
    return int(round(float((profile * np.arange(profile.size)).sum() / profile.sum())))


def _aspect(spacing: Sequence[float]) -> float:
    # Rows run along y, columns along x.
    return float(spacing[1]) / float(spacing[0])


def heatmap_grid_figure(
    explanations: Sequence[PairExplanation],
    case: LoadedCase,
    *,
    slice_index: int | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
    title: str | None = None,
) -> Figure:
    """Paper Fig. 16: one row per pair, one column per modality (the model's modality order).

    The primary modality's cell shows its image plain; each auxiliary cell shows that modality's
    image with the pair's heatmap overlaid. Heatmaps are normalised *per row* (by the largest
    value of the row's auxiliary maps on the shown slice) so that the amount of information of
    the auxiliary modalities of a pair can be compared, as in the paper; the weight w of each
    auxiliary modality is printed in its cell. A "target" column outlines the voxels whose logits
    were explained (the predicted region or the ROI); a "reference" column shows the reference
    region when ``reference`` (region -> mask, full grid) is given.
    """
    if not explanations:
        raise ValueError("no explanation to draw")
    shape = case.image.shape[1:]
    z = tumour_slice(explanations, shape) if slice_index is None else int(slice_index)
    z = int(np.clip(z, 0, shape[AXIAL_AXIS] - 1))
    modalities = list(case.modalities)
    extra = ["target"] + (["reference"] if reference else [])
    n_rows, n_cols = len(explanations), len(modalities) + len(extra)
    fig = new_figure(1.9 * n_cols + 0.8, 1.9 * n_rows + 0.6)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    aspect = _aspect(case.spacing)
    images = {m: case.image[c][:, :, z] for c, m in enumerate(modalities)}
    windows = {m: _window(img) for m, img in images.items()}
    norm = Normalize(0.0, 1.0)
    mappable = None
    for r, e in enumerate(explanations):
        slices = {aux: e.heatmaps[aux][:, :, z] for aux in e.auxiliary}
        row_max = max((float(s.max()) for s in slices.values()), default=0.0)
        for c, modality in enumerate(modalities):
            ax = axes[r, c]
            lo, hi = windows[modality]
            ax.imshow(_display(images[modality]), cmap="gray", vmin=lo, vmax=hi, aspect=aspect,
                      interpolation="nearest")
            primary = modality in e.primary.split("+")
            aux = next((a for a in e.auxiliary if modality in a.split("+")), None)
            if aux is not None and row_max > 0:
                heat = _display(slices[aux]) / row_max
                mappable = ax.imshow(np.ma.masked_less(heat, HEAT_FLOOR), cmap=HEAT_CMAP,
                                     norm=norm, alpha=HEAT_ALPHA, aspect=aspect,
                                     interpolation="bilinear")
            if aux is not None:
                ax.text(0.02, 0.02, f"w={e.weights[aux]:.2f}", transform=ax.transAxes,
                        color="white", fontsize=8, va="bottom",
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
            elif primary:
                ax.text(0.02, 0.02, "primary", transform=ax.transAxes, color="white",
                        fontsize=8, va="bottom",
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
            if r == 0:
                ax.set_title(modality.upper(), fontsize=10)
            if c == 0:
                ax.set_ylabel(e.name, fontsize=10)
        base = images[modalities[0]]
        lo, hi = windows[modalities[0]]
        masks = [("target", e.target)]
        if reference:
            masks.append(("reference", reference.get(e.region)))
        for j, (label, mask) in enumerate(masks):
            ax = axes[r, len(modalities) + j]
            ax.imshow(_display(base), cmap="gray", vmin=lo, vmax=hi, aspect=aspect,
                      interpolation="nearest")
            if mask is not None and mask[:, :, z].any():
                colour = np.zeros(_display(mask[:, :, z]).shape + (4,))
                colour[_display(mask[:, :, z])] = to_rgba("tab:red", 0.45)
                ax.imshow(colour, aspect=aspect, interpolation="nearest")
            if r == 0:
                ax.set_title(label if label != "target" else f"target ({e.target_source})",
                             fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes, shrink=0.6, pad=0.01)
        bar.set_label("heat (normalised per row)")
    methods = sorted({METHOD_NAMES.get(e.method, e.method) for e in explanations})
    fig.suptitle(title or f"{case.case_id}: {'/'.join(methods)} of the complementary "
                 f"representations, axial slice {z}", fontsize=11)
    return fig


def pair_label(e: PairExplanation) -> str:
    """Pair name, and under it the smallest share of an auxiliary's heat inside the target."""
    fractions = [f for f in getattr(e, "inside_fraction", {}).values() if np.isfinite(f)]
    return f"{e.name}\nin target >= {min(fractions):.0%}" if fractions else e.name


def weights_chart_figure(explanations: Sequence[PairExplanation], *,
                         title: str | None = None) -> Figure:
    """Paper Fig. 18 (:func:`draw_weights_chart`) on a figure whose width grows with the number
    of pairs."""
    if not explanations:
        raise ValueError("no explanation to draw")
    fig = new_figure(max(4.5, 1.3 * len(explanations) + 1.5), 3.6)
    draw_weights_chart(fig.add_subplot(), explanations, title=title)
    return fig


def draw_weights_chart(ax: Axes, explanations: Sequence[PairExplanation], *,
                       title: str | None = None) -> None:
    """Paper Fig. 18 on ``ax`` (cleared first): grouped bars, one group per pair, one bar per
    auxiliary modality (its complementary-information weight in [0, 1]); a dashed line marks the
    equal share 1/K. Under each pair: the smallest fraction of an auxiliary map's heat that lies
    inside the (dilated) target (:func:`pair_label`), so that a weight measured mostly outside
    the tumour shows as such.

    ``ax.containers[g]`` holds pair ``g``'s bars, in its ``auxiliary`` order. The CLI's chart
    (:func:`weights_chart_figure`) and the napari plugin's chart are both drawn here.
    """
    if not explanations:
        raise ValueError("no explanation to draw")
    ax.clear()
    # One colour per modality for the whole chart, in task order (the pairs' primaries first),
    # so that e.g. FLAIR has the same colour in every group.
    auxiliaries = {a for e in explanations for a in e.auxiliary}
    order = [e.primary for e in explanations] + [a for e in explanations for a in e.auxiliary]
    names = [n for n in dict.fromkeys(order) if n in auxiliaries]
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    k = max(len(e.auxiliary) for e in explanations)
    width = 0.8 / k
    for g, e in enumerate(explanations):
        xs = g - 0.4 + width * (np.arange(len(e.auxiliary)) + 0.5)
        heights = [e.weights[aux] for aux in e.auxiliary]
        ax.bar(xs, heights, width=width * 0.92, color=[colours[a] for a in e.auxiliary],
               label=e.name)
        for x, h in zip(xs, heights, strict=True):
            ax.text(x, h + 0.01, f"{h:.2f}", ha="center", va="bottom", fontsize=7)
    share = ax.axhline(1.0 / k, color="grey", lw=0.8, ls="--", label=f"equal share 1/{k}")
    ax.set_xticks(range(len(explanations)), [pair_label(e) for e in explanations])
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("complementary information weight")
    ax.set_xlabel("pair (primary modality : target region)")
    handles = [Patch(color=colours[n], label=n.upper()) for n in names] + [share]
    # The legend sits in headroom above 1 (about 1.2 inch per entry), so it never hides a bar.
    ncols = max(1, min(len(handles), int(ax.figure.get_figwidth() / 1.2)))
    rows = -(-len(handles) // ncols)
    ax.set_ylim(0, 1.2 + 0.13 * rows)
    ax.legend(handles=handles, title="auxiliary modality", fontsize=8, title_fontsize=8,
              loc="upper center", ncols=ncols, frameon=False)
    ax.set_title(title or "Complementary information weights (Eq. 16-17)", fontsize=11)


def shape_composition_figure(
    primary: np.ndarray,
    auxiliary: np.ndarray,
    prediction: np.ndarray,
    truth: np.ndarray,
    complementary: np.ndarray,
    *,
    primary_masks: np.ndarray | None = None,
    auxiliary_masks: np.ndarray | None = None,
    title: str | None = None,
) -> Figure:
    """Paper Fig. 13: rows = examples; columns primary, auxiliary, prediction, truth and the
    complementary map (signed, symmetric colour scale shared by all rows). The shape outlines
    (triangle white, ellipse orange) are drawn on the complementary map when given, so that one
    sees where the map lies relative to (auxiliary minus primary)."""
    n = len(primary)
    fig = new_figure(2.0 * 5 + 0.8, 2.0 * n + 0.5)
    axes = fig.subplots(n, 5, squeeze=False)
    limit = float(np.abs(complementary).max()) or 1.0
    mappable = None
    for r in range(n):
        for c, (label, img) in enumerate((("primary", primary[r]), ("auxiliary", auxiliary[r]),
                                          ("prediction", prediction[r]), ("truth", truth[r]))):
            axes[r, c].imshow(img, cmap="gray", interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(label, fontsize=10)
        ax = axes[r, 4]
        mappable = ax.imshow(complementary[r], cmap="coolwarm", vmin=-limit, vmax=limit,
                             interpolation="nearest")
        for masks, colour in ((primary_masks, "white"), (auxiliary_masks, "orange")):
            if masks is not None:
                ax.contour(masks[r].astype(float), levels=[0.5], colors=colour, linewidths=0.8)
        if r == 0:
            ax.set_title("complementary map", fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if mappable is not None:
        fig.colorbar(mappable, ax=axes[:, 4], shrink=0.7, label="complementary feature")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
