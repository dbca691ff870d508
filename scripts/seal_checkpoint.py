"""Bring a checkpoint's config.json to the current format: ``format_version`` 2 and
``config_sha256`` (the sha256 of the canonical JSON of every other field), so that an edit of
config.json is refused like an edit of the weights. The weights are not touched; their hash is
verified first. Used once for the bundled demo model::

    python scripts/seal_checkpoint.py src/ciml_core/assets/demo

Only seal a config.json whose content you trust: sealing makes its current fields authoritative.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ciml_core.checkpoint import CONFIG, load_checkpoint, read_checkpoint_config, seal_config
from ciml_core.errors import CimlError
from ciml_core.io import atomic_write_text


def seal(folder: Path) -> Path:
    document = read_checkpoint_config(folder)  # verifies the weights' hash (and a v2 seal)
    atomic_write_text(folder / CONFIG, json.dumps(seal_config(document), indent=2) + "\n",
                      overwrite=True)
    load_checkpoint(folder)  # the sealed checkpoint loads, tensors checked against the config
    return folder / CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folder(s)")
    args = parser.parse_args(argv)
    try:
        for folder in args.checkpoints:
            print(f"sealed {seal(folder)}")
    except CimlError as err:
        print(f"seal_checkpoint: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
