#!/usr/bin/env bash
# Train the bundled demo model from scratch on generated phantoms and install it into the package.
# On the 2-core CPU machine this takes about 30 minutes (60 epochs x 50 iterations, ~0.6 s/it).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo}
ciml-core train --demo --demo-cases 24 --out "$RUN" --epochs 60 --iters-per-epoch 50 \
  --patch 48 --width 8 --batch 2 --val-every 5 --workers 1
python -c "from ciml_core.checkpoint import export_checkpoint; \
export_checkpoint('$RUN/best', 'src/ciml_core/assets/demo', half=True)"
ciml-core info demo
