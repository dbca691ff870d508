"""ciml_core: Complementary Information Mutual Learning for multimodal medical image segmentation.

The package is laid out along the data flow: ``data`` (loading, preprocessing, phantoms) ->
``model`` (the CIML network) -> training / inference / interpretability -> ``cli``.
It never imports Qt; the napari plugin lives in ``napari_ciml`` and is a thin layer over it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-ciml")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
