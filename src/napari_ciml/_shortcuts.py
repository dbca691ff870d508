"""Keyboard shortcuts of the plugin, bound on the viewer when a CIML widget opens.

========================  ==============================================================
Ctrl+Alt+N                next region (all -> WT -> TC -> ET -> all) of the CIML label layer
Ctrl+Alt+B                previous region
Ctrl+Alt+H                hide / show the CIML overlays (labels, probabilities, heatmaps)
========================  ==============================================================

None of these is one of napari's defaults (``napari.utils.shortcuts.default_shortcuts`` and the
menu actions; tests/test_plugin_shortcuts.py checks), and Ctrl+Alt+letter is not taken by the
usual Linux desktops for N, B or H. Showing one region makes the labels outside it transparent and
selects the label value that region is painted with, so a correction can start right away.
"""

from __future__ import annotations

from napari.layers import Labels

from ciml_core.data.labels import get_convention
from napari_ciml._layers import REGION_KEY, ROLE, is_overlay, label_colormap, paint_value
from napari_ciml._session import get_session

NEXT_REGION = "Control-Alt-N"
PREVIOUS_REGION = "Control-Alt-B"
TOGGLE_OVERLAYS = "Control-Alt-H"
SHORTCUTS = {
    NEXT_REGION: "next region of the CIML label layer",
    PREVIOUS_REGION: "previous region of the CIML label layer",
    TOGGLE_OVERLAYS: "hide / show the CIML overlays",
}
_HIDDEN = "ciml_hidden_by_toggle"


def target_labels(viewer) -> Labels | None:
    """The label layer the region shortcuts act on: the selected one if it has a label
    convention, else the newest CIML prediction, else the newest labelled Labels layer."""
    active = viewer.layers.selection.active
    if isinstance(active, Labels) and active.metadata.get("label_convention"):
        return active
    labels = [layer for layer in reversed(viewer.layers)
              if isinstance(layer, Labels) and layer.metadata.get("label_convention")]
    predictions = [layer for layer in labels if layer.metadata.get(ROLE) == "prediction"]
    return (predictions or labels or [None])[0]


def show_region(layer: Labels, region: str | None) -> None:
    """Show only ``region`` of a label layer (None = every label) and select its paint value."""
    convention = layer.metadata["label_convention"]
    layer.metadata[REGION_KEY] = region
    layer.colormap = label_colormap(convention, region)
    if region is not None:
        layer.selected_label = paint_value(convention, region)


def cycle_region(viewer, step: int = 1) -> str | None:
    """Move the shown region of :func:`target_labels` by ``step``; returns the region shown."""
    layer = target_labels(viewer)
    if layer is None:
        viewer.status = "CIML: no label layer with a label convention to cycle through"
        return None
    names = [None, *get_convention(layer.metadata["label_convention"]).region_names]
    current = layer.metadata.get(REGION_KEY)
    index = names.index(current) if current in names else 0
    region = names[(index + step) % len(names)]
    show_region(layer, region)
    viewer.status = f"CIML: '{layer.name}' shows {region or 'all regions'}"
    return region


def next_region(viewer) -> None:
    cycle_region(viewer, +1)


def previous_region(viewer) -> None:
    cycle_region(viewer, -1)


def toggle_overlays(viewer) -> bool:
    """Hide every visible CIML overlay, or show again the ones hidden this way (when none is
    visible); returns whether overlays are now shown."""
    overlays = [layer for layer in viewer.layers if is_overlay(layer)]
    visible = [layer for layer in overlays if layer.visible]
    if visible:
        for layer in visible:
            layer.metadata[_HIDDEN] = True
            layer.visible = False
        viewer.status = f"CIML: {len(visible)} overlay(s) hidden"
        return False
    again = [layer for layer in overlays if layer.metadata.pop(_HIDDEN, False)]
    # nothing remembered (e.g. hidden by hand): show the label predictions and heatmaps
    again = again or [layer for layer in overlays
                      if layer.metadata.get(ROLE) in ("prediction", "heatmap")]
    for layer in again:
        layer.visible = True
    viewer.status = f"CIML: {len(again)} overlay(s) shown"
    return True


def install_shortcuts(viewer) -> None:
    """Bind the shortcuts on ``viewer`` (once per viewer)."""
    session = get_session(viewer)
    if session.shortcuts_installed:
        return
    viewer.bind_key(NEXT_REGION, next_region, overwrite=True)
    viewer.bind_key(PREVIOUS_REGION, previous_region, overwrite=True)
    viewer.bind_key(TOGGLE_OVERLAYS, toggle_overlays, overwrite=True)
    session.shortcuts_installed = True
