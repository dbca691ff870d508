"""Post-processing of predicted BraTS region masks: enhancement with no tumour around it.

On a real T1CE, vessels, the dura and the choroid plexus enhance as brightly as a tumour's rim.
A model that learnt "bright on T1CE inside tumour = ET" still paints some of them as isolated
specks of ET far from any tumour (the bundled demo on the one real scan the project looked at,
and on brain phantoms with enhancing vessels, docs/phantoms.md). BraTS scores punish these
hard: one speck in a case without ET makes its ET Dice 0, and specks far away dominate HD95.

A radiologist reads enhancement as tumour only with abnormal tissue around it (oedema outside,
necrosis inside). :func:`remove_lone_enhancement` applies the same reading to a prediction: an
ET connected component whose surrounding shell is almost all non-tumour (under 10% predicted
tumour) is removed from every region (it becomes background). A lesion's rim has tumour on at
least one side (43% of the shell on the real scan looked at, where a rim at the lesion's edge
has little oedema outside), a vessel network along the brain surface almost none (2.6% there);
docs/method.md gives the measurements behind the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: Defaults: the shell is the ``SHELL_MM`` around a component (at least one voxel), and a
#: component is kept when at least ``MIN_CONTEXT`` of that shell is predicted tumour (WT).
#: The same on brain phantoms anywhere from 0.05 to 0.5; 0.5 deleted the real scan's rim.
SHELL_MM = 2.0
MIN_CONTEXT = 0.1


def remove_lone_enhancement(masks: np.ndarray, regions: Sequence[str],
                            spacing: Sequence[float], *, shell_mm: float = SHELL_MM,
                            min_context: float = MIN_CONTEXT) -> tuple[np.ndarray, int]:
    """Remove ET components with too little predicted tumour around them.

    Args:
        masks: ``(R, X, Y, Z)`` boolean region masks, nested (ET in TC in WT).
        regions: the region name of each mask; without both ``WT`` and ``ET`` nothing is done.
        spacing: voxel size (mm) along each spatial axis.
        shell_mm: thickness of the shell around each component.
        min_context: the fraction of the shell that must be WT without ET for the component
            to stay.

    Returns:
        (the masks with the removed components cleared from every region, a new array; the
        number of components removed).
    """
    masks = np.array(masks, dtype=bool, copy=True)
    if not {"WT", "ET"} <= set(regions):
        return masks, 0
    et = masks[list(regions).index("ET")]
    components, count = ndimage.label(et, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return masks, 0
    radius = [max(1, round(shell_mm / float(s))) for s in spacing]
    footprint = np.ones([2 * r + 1 for r in radius], bool)
    # Each shell voxel takes the label of a component it borders (the largest label where two
    # meet: rare, and either is a neighbour).
    grown = ndimage.grey_dilation(components, footprint=footprint)
    shell = (grown > 0) & ~et
    context = shell & masks[list(regions).index("WT")]
    total = np.bincount(grown[shell], minlength=count + 1)
    tumour = np.bincount(grown[context], minlength=count + 1)
    lone = np.flatnonzero(tumour[1:] < min_context * np.maximum(total[1:], 1)) + 1
    if lone.size:
        drop = np.isin(components, lone)
        masks[:, drop] = False
    return masks, int(lone.size)
