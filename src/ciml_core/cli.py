"""The ``ciml-core`` command line.

Each subcommand is a small function ``_cmd_<name>(args)`` over the library; parsing lives in
``build_parser`` so that later subcommands (train, predict, evaluate, explain, info) plug in the
same way. Errors raised on bad input (:class:`ciml_core.errors.CimlError`) are printed as one line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ciml_core import __version__
from ciml_core.errors import CimlError


def _cmd_phantom(args: argparse.Namespace) -> int:
    from ciml_core.data.phantoms import write_phantom_dataset

    written = write_phantom_dataset(
        kind=args.kind,
        cases=args.cases,
        out=Path(args.out),
        seed=args.seed,
        shape=tuple(args.shape) if args.shape else None,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(written)} {args.kind} phantom case(s) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ciml-core",
        description="Train, evaluate and run CIML multimodal segmentation models.",
    )
    parser.add_argument("--version", action="version", version=f"ciml-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "phantom",
        help="write synthetic multimodal cases (BraTS-like glioma, ShapeComposition, PET/CT)",
        description="Write synthetic NIfTI cases with real affines. brats: BraTS 2020 layout "
        "(flair, t1, t1ce, t2, seg; labels 0/1/2/4); shapes: ShapeComposition pairs "
        "(primary triangle, auxiliary ellipse, union target); petct: autoPET layout "
        "(CTres, SUV, SEG).",
    )
    p.add_argument("--kind", choices=["brats", "shapes", "petct"], required=True)
    p.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed; case i uses seed+i")
    p.add_argument(
        "--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
        help="volume shape in voxels (brats default 96 96 64 at 2 mm; 240 240 155 is the BraTS grid)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace cases that already exist")
    p.set_defaults(func=_cmd_phantom)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CimlError as err:
        print(f"ciml-core {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ciml-core {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
