"""docs/images/brain_phantom_cases.png: the tumour-free atlas case and four brain phantoms.

    python scripts/brain_phantom_figure.py [--out docs/images/brain_phantom_cases.png]

Rows: ``make_atlas_case(0)``, then ``make_brain_phantom`` seeds 0, 4 (lower grade), 12 and 5 on
the BraTS grid. Columns: T1, T1CE, T2, FLAIR, labels over T1CE (NCR red, ED green, ET yellow)
and, on the T1CE, the enhancing vessels (cyan outline). Each row shows the axial slice with the
most tumour (the atlas: the middle slice) in radiological display (anterior up, the patient's
right on the left), each image windowed to its 99.5th percentile inside the brain. Needs the
atlas (docs/phantoms.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ciml_core.data.brain_phantoms import make_atlas_case, make_brain_phantom  # noqa: E402

MODALITIES = ("t1", "t1ce", "t2", "flair")
COLOURS = {1: (1.0, 0.1, 0.1), 2: (0.1, 0.8, 0.1), 4: (1.0, 0.9, 0.0)}


def radiological(axial: np.ndarray) -> np.ndarray:
    """An LPS (x, y) slice shown with anterior up and the patient's right on the left."""
    return axial.T[::-1, ::-1]


def show(ax, image: np.ndarray, brain: np.ndarray, box: tuple) -> None:
    """``image[box]`` in grey, windowed to its 99.5th percentile inside the brain."""
    ax.imshow(radiological(image[box]), cmap="gray", vmin=0,
              vmax=np.percentile(image[brain], 99.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/brain_phantom_cases.png"))
    args = parser.parse_args()
    cases = [("atlas, no tumour", make_atlas_case(0))]
    cases += [(f"seed {s}" + (" (lower grade)" if s % 5 == 4 else ""), make_brain_phantom(s))
              for s in (0, 4, 12, 5)]
    fig, axes = plt.subplots(len(cases), 5, figsize=(12.5, 3.1 * len(cases)), facecolor="black")
    for row, (title, case) in enumerate(cases):
        brain = case.tissues["brain"]
        tumour = (case.label > 0).sum(axis=(0, 1))
        z = int(np.argmax(tumour)) if tumour.any() else case.label.shape[2] // 2
        xs, ys = np.nonzero(brain.any(axis=2))
        # the slice z, cropped to the brain with a 4-voxel margin, in radiological display
        box = (slice(max(xs.min() - 4, 0), xs.max() + 5),
               slice(max(ys.min() - 4, 0), ys.max() + 5), z)
        for col, name in enumerate(MODALITIES):
            ax = axes[row, col]
            show(ax, case.images[name], brain, box)
            if name == "t1ce":
                ax.contour(radiological(case.tissues["vessels"][box]).astype(float),
                           levels=[0.5], colors="cyan", linewidths=0.6)
            if row == 0:
                ax.set_title(name.upper(), color="white")
        label = radiological(case.label[box])
        overlay = np.zeros((*label.shape, 4))
        for value, colour in COLOURS.items():
            overlay[label == value] = (*colour, 0.55)
        ax = axes[row, 4]
        show(ax, case.images["t1ce"], brain, box)
        ax.imshow(overlay)
        if row == 0:
            ax.set_title("labels", color="white")
        axes[row, 0].set_ylabel(title, color="white")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
    fig.tight_layout(pad=0.3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=64, facecolor="black")
    print(args.out)


if __name__ == "__main__":
    main()
