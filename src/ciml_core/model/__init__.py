"""The CIML network, its ablations, the comparison baseline and the loss (SPEC 4, paper 3).

Start with :class:`TaskDecomposition` and :class:`ModelConfig`, build a network with
:func:`build_model`, train it with :class:`CIMLLoss`, and turn its :class:`CIMLOutput` into
region probabilities with :func:`ensemble_region_probabilities`. docs/method.md explains the
architecture and every choice the paper leaves open.
"""

from ciml_core.model.build import (
    build_model,
    count_parameters,
    flop_matched_width,
    window_flops,
)
from ciml_core.model.calibration import recalibrate_batch_norm
from ciml_core.model.cig import (
    ComplementaryInformationGate,
    CrossModalAttention,
    kl_to_standard_normal,
)
from ciml_core.model.ciml import CIMLNetwork
from ciml_core.model.config import CIML_VARIANTS, VARIANTS, ModelConfig
from ciml_core.model.decomposition import Task, TaskDecomposition
from ciml_core.model.dynunet import EarlyFusionDynUNet
from ciml_core.model.interface import CIMLOutput
from ciml_core.model.loss import CIMLLoss
from ciml_core.model.prediction import ensemble_region_probabilities, probabilities_to_region_masks
from ciml_core.model.segmentor import Segmentor
from ciml_core.model.shape_composition import ShapeCompositionNet

__all__ = [
    "CIML_VARIANTS",
    "VARIANTS",
    "CIMLLoss",
    "CIMLNetwork",
    "CIMLOutput",
    "ComplementaryInformationGate",
    "CrossModalAttention",
    "EarlyFusionDynUNet",
    "ModelConfig",
    "Segmentor",
    "ShapeCompositionNet",
    "Task",
    "TaskDecomposition",
    "build_model",
    "count_parameters",
    "ensemble_region_probabilities",
    "flop_matched_width",
    "kl_to_standard_normal",
    "probabilities_to_region_masks",
    "recalibrate_batch_norm",
    "window_flops",
]
