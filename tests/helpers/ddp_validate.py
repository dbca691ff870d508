"""Run by tests under `torchrun --nproc_per_node 2`: train one epoch with validation, then record
what this rank preprocessed and the validation Dice computed by both ranks together and by this
rank alone over all validation cases."""

import json
import os
import sys
from pathlib import Path

from ciml_core.checkpoint import LoadedModel
from ciml_core.infer import InferenceSettings
from ciml_core.runtime import DistContext
from ciml_core.train import TrainConfig, train, validate

data, out = Path(sys.argv[1]), Path(sys.argv[2])
result = train(TrainConfig(out=out, data=data, epochs=1, iters_per_epoch=2, patch=32, batch=1,
                           width=2, device="cpu", workers=0, val_every=1, fold=0,
                           bn_recalibration=0, preprocess_workers=2))
rank = int(os.environ["RANK"])
report = result.cache_report
doc = {"built": None if report is None else report.built,
       "reused": None if report is None else report.reused}
if rank == 0:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    doc["distributed_val"] = metrics[-1]["val_dice"]
    info = json.loads((out / "latest" / "config.json").read_text())["training"]
    from ciml_core.data.cache import PreprocessSettings, wait_for_cases
    from ciml_core.model import ModelConfig

    saved = json.loads((out / "latest" / "config.json").read_text())
    model_config = ModelConfig.from_dict(saved["model"])
    settings = PreprocessSettings(model_config.decomposition.modalities,
                                  model_config.decomposition.regions, "brats2020",
                                  spacing=tuple(saved["target_spacing"]))
    cases = wait_for_cases(info["val_cases"], settings, out / "cache", timeout=5)
    loaded = LoadedModel(result.model, model_config, None, out, "")
    single = DistContext(0, 1, 0, result.model.parameters().__next__().device)
    doc["single_rank_val"] = validate(loaded, cases, InferenceSettings(device="cpu"), single)
    doc["val_cases"] = info["val_cases"]
(out / f"rank{rank}.json").write_text(json.dumps(doc))
