"""Run by tests under `torchrun --nproc_per_node 2`: train briefly, then dump this rank's weights."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from ciml_core.train import TrainConfig, train

data, out = Path(sys.argv[1]), Path(sys.argv[2])
result = train(TrainConfig(out=out, data=data, epochs=1, iters_per_epoch=2, patch=32, batch=1,
                           width=2, device="cpu", workers=0, val_every=100, fold=-1))
params = {k: v.detach().contiguous() for k, v in result.model.named_parameters()}
save_file(params, str(out / f"rank{os.environ['RANK']}.safetensors"))
