"""Modality reliance: what each segmentor's prediction depends on.

For every segmentor (primary modality) and every region it predicts, the Dice of that head's
own mask (threshold 0.5, no ensemble, no nesting) and its mean probability inside the true
region, under:

- ``intact``: the case as it is;
- ``zero:<modality>``: one input modality replaced by zeros after normalisation (the mean
  intensity of the brain): the segmentor's *own* modality, or an *auxiliary* one that reaches it
  only through the messages;
- ``no messages``: every complementary representation c_s replaced by zeros (each segmentor
  alone on its own modality).

A faithful CIML model leans on its own modality for what that modality shows best: on the
BraTS phantom the T1CE segmentor's ET must fall most when T1CE is zeroed, since enhancement is
visible only there (docs/interpretability.md). ``benchmarks/reliance.py`` runs this over unseen
phantoms.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ciml_core.checkpoint import LoadedModel
from ciml_core.data.dataset import LoadedCase
from ciml_core.data.labels import get_convention, labels_to_regions
from ciml_core.data.preprocess import crop, preprocess_image
from ciml_core.errors import ConfigError, InputDataError
from ciml_core.infer import InferenceSettings, sliding_window_predict, spacing_plan
from ciml_core.metrics import dice
from ciml_core.model import CIMLNetwork

INTACT = "intact"
NO_MESSAGES = "no messages"


@dataclass(frozen=True)
class RelianceRow:
    """One (case, segmentor, region, condition) measurement."""

    case_id: str
    segmentor: str  # the segmentor's primary modalities, joined by "+"
    region: str
    condition: str  # INTACT, "zero:<modality>" or NO_MESSAGES
    role: str  # "intact", "own", "auxiliary" or "messages"
    dice: float
    mean_probability: float  # mean probability inside the true region (nan when it is empty)

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def messages_off(model: torch.nn.Module):
    """Run ``model`` (a CIML network) with every complementary representation set to zero."""
    segmentors = list(model.segmentors)
    for s in segmentors:
        s.messages_off = True
    try:
        yield model
    finally:
        for s in segmentors:
            s.messages_off = False


def modality_reliance(loaded: LoadedModel, case: LoadedCase,
                      settings: InferenceSettings | None = None) -> list[RelianceRow]:
    """Measure one labelled case under every condition (see the module docstring).
    ``settings``: how the windows run (None: the defaults; with messages off the network is
    never fused, the switch lives in the unfused segmentors). The windows run at the model's
    target spacing as in :func:`~ciml_core.infer.predict_case` (the conditions are applied to
    the resampled image, the probabilities come back to the case's grid before scoring)."""
    settings = settings or InferenceSettings()
    if not isinstance(loaded.model, CIMLNetwork) or loaded.model.config.gate_switches is None:
        raise ConfigError(f"modality reliance needs a CIML network with messages; "
                          f"{loaded.path} is variant {loaded.config.variant!r}")
    if case.label is None:
        raise InputDataError(f"case {case.case_id}: modality reliance needs a label")
    if tuple(case.modalities) != tuple(loaded.modalities):
        raise InputDataError(f"case {case.case_id}: modalities {list(case.modalities)}, the model "
                             f"expects {list(loaded.modalities)}")
    decomposition = loaded.config.decomposition
    pre = preprocess_image(case.image, case.modalities)
    plan = spacing_plan(loaded, case, pre.box.shape, settings)
    model_image = plan.to_model(pre.image)
    conv = get_convention(loaded.info.label_convention)
    truth = crop(labels_to_regions(case.label, conv), pre.box)
    truth = {r: truth[conv.region_names.index(r)] for r in decomposition.regions}

    conditions: list[tuple[str, np.ndarray, bool]] = [(INTACT, model_image, False)]
    for m, modality in enumerate(decomposition.modalities):
        image = model_image.copy()
        image[m] = 0.0
        conditions.append((f"zero:{modality}", image, False))
    conditions.append((NO_MESSAGES, model_image, True))

    rows = []
    for condition, image, no_messages in conditions:
        if no_messages:
            with messages_off(loaded.model):
                probs = sliding_window_predict(loaded.model, image, loaded.config.patch_size,
                                               settings.replace(fused=False), per_head=True)
        else:
            probs = sliding_window_predict(loaded.model, image, loaded.config.patch_size,
                                           settings, per_head=True)
        probs = plan.to_input(probs)
        channel = 0
        for task in decomposition.tasks:
            name = "+".join(task.primary)
            for region in task.regions:
                p, target = probs[channel], truth[region]
                channel += 1
                if condition == INTACT:
                    role = "intact"
                elif no_messages:
                    role = "messages"
                else:
                    role = "own" if condition.removeprefix("zero:") in task.primary else "auxiliary"
                rows.append(RelianceRow(
                    case.case_id, name, region, condition, role,
                    float(dice(p > 0.5, target)),
                    float(p[target].mean()) if target.any() else float("nan")))
    return rows


def summarise(rows: Iterable[RelianceRow]) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """Mean Dice and mean probability over cases: ``{(segmentor, region): {condition: {...}}}``."""
    groups: dict[tuple[str, str, str], list[RelianceRow]] = defaultdict(list)
    for row in rows:
        groups[(row.segmentor, row.region, row.condition)].append(row)
    summary: dict[tuple[str, str], dict[str, dict[str, float]]] = defaultdict(dict)
    for (segmentor, region, condition), members in groups.items():
        summary[(segmentor, region)][condition] = {
            "dice": float(np.mean([r.dice for r in members])),
            "mean_probability": float(np.nanmean([r.mean_probability for r in members]))
            if any(np.isfinite(r.mean_probability) for r in members) else float("nan"),
            "cases": len(members),
        }
    return dict(summary)


def largest_drop(summary_entry: dict[str, dict[str, float]]) -> str:
    """The single-input condition (``zero:<modality>``) that lowers the Dice the most."""
    zeroed = {c: v["dice"] for c, v in summary_entry.items() if c.startswith("zero:")}
    return min(zeroed, key=zeroed.get)
