"""Exceptions raised on bad input.

Every error names the file or field at fault and what was expected, so that the CLI can print
it as is and the napari plugin can show it as a notification.
"""


class CimlError(Exception):
    """Base class of every error ciml_core raises on purpose."""


class InputDataError(CimlError, ValueError):
    """An input volume, label file, folder or manifest is unusable (shape, values, format...)."""


class GeometryError(InputDataError):
    """Modalities of one case disagree in shape or affine, or a volume has the wrong dimensionality."""


class LabelError(InputDataError):
    """A label volume holds values outside the selected label convention."""


class ConfigError(CimlError, ValueError):
    """A configuration (task decomposition, network hyper-parameters, CLI option) is invalid."""


class CheckpointError(CimlError, ValueError):
    """A model checkpoint is missing, edited, or does not match the data it is used with."""


class OutputError(CimlError, OSError):
    """An output cannot be written where asked: the folder is a file, not writable, or a name
    would land outside it."""


class Cancelled(CimlError):
    """Raised inside a run when the user asked to stop (Cancel button, progress callback);
    nothing is written."""
