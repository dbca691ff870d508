"""napari-ciml: a napari plugin over ciml_core (no segmentation logic lives here)."""

from ciml_core import __version__

__all__ = ["__version__"]
