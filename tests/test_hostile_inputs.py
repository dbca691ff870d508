"""Hostile inputs over the whole command line (issue 12), in-process.

Every row of the table is a command line built inside a fresh sandbox (``tmp_path``: inputs under
``in/``, outputs under ``out/``) and run through ``ciml_core.cli.main``. For every row the runner
asserts:

- the exit status (2 for a refused input, 0 where the input is odd but legitimate);
- on refusal exactly one ``ciml-core CMD: error: ...`` line on stderr, matching the row's pattern,
  which names the file or field at fault; on success no error line (warnings may be expected);
- no traceback on stderr;
- no file or folder created anywhere in the sandbox outside ``--out`` (paths are chosen so that an
  escape such as ``../../x`` or an absolute case id would land inside the sandbox, where it is
  seen), nothing created at all on refusal;
- no input changed or removed: every file is hashed before and after (and ``--out`` too, unless
  the row passes ``--overwrite`` and succeeds).

Volumes are tiny (12x10x8, see ``conftest.tiny_case_arrays``) and the model is the bundled demo,
so a prediction takes about a second and a refusal a fraction of one. Rows whose result has a value
to check (shuffled files give the same labels, a huge scale slope gives the same labels as none)
carry an extra ``check``.

The concurrency tests at the end race two predictions (and many raw writers) for one output.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from safetensors.torch import load_file

import ciml_core.io as ciml_io
from ciml_core.checkpoint import DEMO_CHECKPOINT, seal_config, sha256_file
from ciml_core.cli import main
from conftest import LPS_AFFINE, tiny_case_arrays, write_nifti

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODS = ("flair", "t1", "t1ce", "t2")
B23 = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}


# -- the sandbox ---------------------------------------------------------------------------------


class Sandbox:
    """A fresh tree per row: ``in/`` holds the inputs, ``out/`` is the output folder."""

    def __init__(self, root: Path, phantom: Path, phantom_labels: np.ndarray | None = None
                 ) -> None:
        self.root = root
        self.phantom_labels = phantom_labels  # the demo model's labels of the phantom case
        self.inp = root / "in"
        self.out = root / "out"
        self.phantom_root = phantom
        self.expect_name = ""  # a file the error line must name (set by some setups)
        self.inp.mkdir(parents=True)

    def case(self, cid: str = "C1", layout: str = "brats2020", *, seed: int = 0,
             folder: Path | None = None, label: bool = True) -> dict[str, Path]:
        """A tiny 4-modality case; returns modality (and "seg") -> file."""
        images, lab = tiny_case_arrays(seed)
        folder = folder or self.inp / cid
        files = {}
        for m in MODS:
            name = f"{cid}_{m}" if layout == "brats2020" else f"{cid}-{B23[m]}"
            files[m] = write_nifti(folder / f"{name}.nii.gz", images[m])
        if label:
            if layout == "brats2020":
                files["seg"] = write_nifti(folder / f"{cid}_seg.nii.gz", lab)
            else:
                files["seg"] = write_nifti(folder / f"{cid}-seg.nii.gz",
                                           np.where(lab == 4, 3, lab).astype(np.uint8))
        return files

    def phantom(self, cid: str = "P1", folder: Path | None = None) -> dict[str, Path]:
        """A 48x48x32 BraTS-like phantom at 2 mm (a small head: the 1 mm demo finds its tumour
        in few windows), copied in."""
        folder = folder or self.inp / cid
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for key in (*MODS, "seg"):
            files[key] = folder / f"{cid}_{key}.nii.gz"
            shutil.copyfile(self.phantom_root / f"Phantom_00000_{key}.nii.gz", files[key])
        return files

    def manifest(self, rows: list[dict[str, str]], name: str = "m.csv", *,
                 columns: list[str] | None = None) -> Path:
        path = self.inp / name
        columns = columns or list(rows[0])
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([row.get(c, "") for c in columns])
        return path

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.inp)

    def row(self, files: dict[str, Path], **extra: str) -> dict[str, str]:
        row = {m: self.rel(files[m]) for m in MODS if m in files}
        return {**extra, **row}

    def checkpoint(self, edit: Callable[[dict], object] | None = None, *, seal: bool = True,
                   name: str = "ckpt") -> Path:
        """A copy of the demo checkpoint whose config.json went through ``edit`` (in place),
        then re-sealed (``seal``: a consistent but hostile config) or left as edited."""
        folder = self.inp / name
        shutil.copytree(DEMO_CHECKPOINT, folder)
        if edit is not None:
            doc = json.loads((folder / "config.json").read_text())
            result = edit(doc)
            doc = doc if result is None else result
            if seal:
                doc = seal_config(doc)
            (folder / "config.json").write_text(json.dumps(doc, indent=2))
        return folder


def _args(sb: Sandbox, *argv: object) -> list[str]:
    return [str(a) for a in argv]


# -- NIfTI corruptions (each returns the path of the hostile file) --------------------------------


def _header_patch(path: Path, offset: int, fmt: str, values: tuple, *, ext: str | None = None
                  ) -> Path:
    """Patch bytes of a NIfTI-1 header (gzip or not), optionally re-saving under another
    extension."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    raw = bytearray(raw)
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack("<" + fmt, *values)
    target = path
    if ext is not None:
        stem = re.sub(r"\.nii(\.gz)?$", "", path.name)
        target = path.with_name(stem + ext)
        path.unlink()
    target.write_bytes(gzip.compress(bytes(raw)) if target.name.endswith(".gz") else bytes(raw))
    return target


def _resave(path: Path, data: np.ndarray, affine: np.ndarray = LPS_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _truncated(p: Path) -> Path:
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return p


def _with(p: Path, index: tuple, value: float) -> Path:
    x = _data(p).astype(np.float32)
    x[index] = value
    return _resave(p, x)


def _huge_slope(p: Path) -> Path:
    img = nib.Nifti1Image((_data(p) * 1000).astype(np.int16), LPS_AFFINE)
    img.header.set_slope_inter(1e36, 0.0)
    nib.save(img, str(p))
    return p


def _rgb(p: Path) -> Path:
    x = np.zeros(_data(p).shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    x["R"] = 1
    nib.save(nib.Nifti1Image(x, LPS_AFFINE), str(p))
    return p


def _sform(p: Path, row: tuple) -> Path:
    p = _header_patch(p, 252, "hh", (0, 1))  # qform_code 0, sform_code 1: the sform is used
    return _header_patch(p, 280, "ffff", row)


def _shifted(p: Path) -> Path:
    affine = LPS_AFFINE.copy()
    affine[0, 3] = 0.5
    return _resave(p, _data(p), affine)


#: kind -> (corrupt the file, error pattern after the file name, applies to the label)
NIFTI_KINDS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated_gzip": (_truncated, "truncated or corrupt|not a readable NIfTI"),
    "not_gzip": (lambda p: (p.write_text("not a volume\n"), p)[1], "not a readable NIfTI"),
    "empty_file": (lambda p: (p.write_bytes(b""), p)[1], "not a readable NIfTI|truncated"),
    "huge_header_nii": (lambda p: _header_patch(p, 42, "hhh", (4000, 4000, 4000), ext=".nii"),
                        r"header claims a 4000x4000x4000 volume .*truncated or corrupt"),
    "huge_header_gz": (lambda p: _header_patch(p, 42, "hhh", (4000, 4000, 4000)),
                       r"header claims a 4000x4000x4000 volume .*gzip"),
    "negative_dim": (lambda p: _header_patch(p, 42, "h", (-12,)), "negative dimension"),
    "bad_datatype": (lambda p: _header_patch(p, 70, "h", (9999,)), "not a readable NIfTI"),
    "dim0_zero": (lambda p: _header_patch(p, 40, "h", (0,)), "expected a 3-D volume"),
    "nan_voxel": (lambda p: _with(p, (5, 5, 4), np.nan), r"NaN or Inf"),
    "inf_voxel": (lambda p: _with(p, (5, 5, 4), np.inf), r"NaN or Inf"),
    "all_zero": (lambda p: _resave(p, np.zeros(_data(p).shape, np.float32)), "every voxel is zero"),
    "two_d": (lambda p: _resave(p, _data(p)[:, :, 4]), "expected a 3-D volume"),
    "four_d_frames": (lambda p: _resave(p, np.stack([_data(p)] * 3, axis=-1)),
                      "expected a 3-D volume"),
    "complex": (lambda p: _resave(p, _data(p).astype(np.complex64)), "not a real number type"),
    "rgb": (_rgb, "not a real number type"),
    "nan_affine": (lambda p: _sform(p, (np.nan, 0, 0, 0)), "affine|not a readable"),
    "singular_affine": (lambda p: _sform(p, (0, 0, 0, 0)), "affine|not a readable"),
    "huge_scale_slope": (_huge_slope, "beyond the float32 range"),
    "other_shape": (lambda p: _resave(p, np.ones((12, 10, 9), np.float32)),
                    r"has shape \(12, 10, \d+\) but .* has shape \(12, 10, \d+\)"),
    "shifted_affine": (_shifted, r"differ by up to 0\.5 mm"),
}
LABEL_KINDS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "label_value_300": (lambda p: _resave(p, np.full(_data(p).shape, 300, np.int16)),
                        r"integer label values in 0\.\.255"),
    "label_fraction": (lambda p: _resave(p, np.full(_data(p).shape, 2.5, np.float32)),
                       r"integer label values in 0\.\.255"),
    "label_other_shape": (lambda p: _resave(p, np.zeros((12, 10, 9), np.uint8)),
                          r"has shape \(12, 10, 9\) but"),
    "label_truncated": (_truncated, "truncated or corrupt|not a readable NIfTI"),
}


def _nifti_row(kind: str, layout: str) -> Hostile:
    corrupt, pattern = {**NIFTI_KINDS, **LABEL_KINDS}[kind]
    key = "seg" if kind in LABEL_KINDS else "flair"

    def setup(sb: Sandbox) -> list[str]:
        files = sb.case("C1", "brats2023" if layout == "brats2023" else "brats2020",
                        label=layout != "files")
        hostile = corrupt(files[key])
        files[key] = hostile
        sb.expect_name = hostile.name
        if layout in ("brats2020", "brats2023"):
            inputs = [sb.inp / "C1"]
        elif layout == "manifest":
            inputs = [sb.manifest([sb.row(files, case_id="C1", label=sb.rel(files["seg"]))])]
        else:
            inputs = [files[m] for m in ("t2", "flair", "t1ce", "t1")]  # any order
        return _args(sb, "predict", *inputs, "--out", sb.out)

    return Hostile(f"nifti-{kind}-{layout}", setup, 2, pattern)


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    name: str
    setup: Callable[[Sandbox], list[str]]
    code: int = 2
    #: regex the error line (exit 2) or stderr (exit 0) must match; ``{name}`` = the file the
    #: setup named in ``sb.expect_name``
    pattern: str = ""
    #: files that must exist in --out afterwards (exit 0)
    outputs: tuple[str, ...] = ()
    check: Callable[[Sandbox], None] | None = None
    #: apply before running (e.g. pretend memory is short)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


def _predict(sb: Sandbox, *inputs: object, extra: tuple = ()) -> list[str]:
    return _args(sb, "predict", *inputs, "--out", sb.out, *extra)


def _case_id_row(kind: str, case_id: str, source: str) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        files = sb.case("C1", label=False)
        cid = case_id.replace("ABS", str(sb.root / "abs_target"))
        if source == "csv":
            return _predict(sb, sb.manifest([sb.row(files, case_id=cid)]))
        if source == "json":
            path = sb.inp / "m.json"
            path.write_text(json.dumps([sb.row(files, case_id=cid)]))
            return _predict(sb, path)
        return _predict(sb, *(f"{m}={files[m]}" for m in MODS), extra=("--case-id", cid))

    where = {"csv": r"m\.csv: row 1", "json": r"m\.json: entry 1", "option": "--case-id"}[source]
    return Hostile(f"case-id-{kind}-{source}", setup, 2, where + r".*case id .*(" + {
        "parent": "path separator", "absolute": "path separator", "dotdot": "relative folder",
        "dot": "relative folder", "backslash": "path separator", "tab": "control character",
        "newline": "control character", "nul": "control character", "hidden": r"starts with '\.'",
        "colon": "':'", "long": "longer than 200 bytes", "empty": "is empty",
        "blank": "is empty"}[kind] + ")")


CASE_IDS = {
    "parent": "../../escaped", "absolute": "ABS/escaped", "dotdot": "..", "dot": ".",
    "backslash": "a\\b", "tab": "a\tb", "newline": "a\nb", "nul": "a\x00b", "hidden": ".hidden",
    "colon": "C:x", "long": "x" * 300, "empty": "", "blank": "  ",
}
CASE_ID_ROWS = [
    _case_id_row(kind, value, source)
    for kind, value in CASE_IDS.items() for source in ("csv", "json", "option")
    # a CSV cell cannot hold NUL, and an empty case_id cell means "number the rows" (allowed)
    if not (source == "csv" and kind in ("nul", "empty", "blank", "newline"))
    and not (source == "json" and kind in ("empty", "blank"))
]


def _ckpt_row(kind: str, command: str, edit, pattern: str, *, seal: bool = True,
              after: Callable[[Path], None] | None = None, code: int = 2) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        ckpt = sb.checkpoint(edit, seal=seal)
        if after is not None:
            after(ckpt)
        if command == "info":
            return _args(sb, "info", ckpt)
        folder = sb.inp / "C1"
        sb.case("C1")
        if command == "predict":
            return _predict(sb, folder, extra=("--model", ckpt))
        return _args(sb, "explain", folder, "--out", sb.out, "--model", ckpt,
                     "--pairs", "FLAIR:WT")

    return Hostile(f"checkpoint-{kind}-{command}", setup, code, pattern,
                   outputs=("C1.nii.gz",) if code == 0 and command == "predict" else ())


def _set(path: str, value):
    def edit(doc: dict) -> None:
        keys = path.split(".")
        node = doc
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


def _swap_primaries(doc: dict) -> None:
    tasks = doc["model"]["decomposition"]["tasks"]
    tasks[0]["primary"], tasks[1]["primary"] = tasks[1]["primary"], tasks[0]["primary"]


def _garbage_weights_rehashed(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x80\x04K\x01." * 10)  # a pickle, not safetensors
    doc = json.loads((folder / "config.json").read_text())
    doc["weights_sha256"] = sha256_file(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(seal_config(doc)))


def _legacy_v1(doc: dict) -> dict:
    doc = {k: v for k, v in doc.items() if k != "config_sha256"}
    doc["format_version"] = 1
    return doc


def _legacy_v1_binary(doc: dict) -> dict:
    return {**_legacy_v1(doc), "label_convention": "binary"}


CFG = r"config\.json"
WTS = r"model\.safetensors"
CHECKPOINT_KINDS = [
    # (kind, edit, pattern, seal, after, commands, code)
    ("edited-label-convention", _set("label_convention", "brats2023"),
     CFG + r": config_sha256 .* does not match its content", False, None),
    ("swapped-primaries", _swap_primaries, CFG + r": config_sha256 .* does not match", False, None),
    ("hash-field-removed", lambda d: {k: v for k, v in d.items() if k != "config_sha256"},
     CFG + r": missing key.*config_sha256", False, None),
    ("format-version-string", _set("format_version", "2"), CFG + r": format .*version '2'",
     False, None),
    ("format-version-bool", _set("format_version", True), CFG + r": format .*version True",
     False, None),
    ("format-version-99", _set("format_version", 99), CFG + r": format .*version 99", False, None),
    ("format-other", _set("format", "other"), CFG + r": format 'other'", False, None),
    ("normalisation-string", _set("normalisation", "log"), CFG + r": field 'normalisation'",
     True, None),
    ("pet-method-unknown", _set("normalisation", {"pet_method": "sqrt"}),
     CFG + r": field 'normalisation\.pet_method'", True, None),
    ("label-convention-unknown", _set("label_convention", "brats1999"),
     CFG + r": field 'label_convention'", True, None),
    ("label-convention-list", _set("label_convention", ["brats2020"]),
     CFG + r": field 'label_convention'", True, None),
    ("label-convention-other-regions", _set("label_convention", "binary"),
     CFG + r": field 'label_convention' = 'binary' needs regions", True, None),
    ("huge-width", _set("model.width", 1_000_000), WTS + r" does not match its config\.json",
     True, None),
    ("width-3", _set("model.width", 3), WTS + r" does not match its config\.json: .* has shape",
     True, None),
    ("width-string", _set("model.width", "8"), CFG + r": invalid 'model' section", True, None),
    ("huge-patch", _set("model.patch_size", [16000, 16000, 16000]),
     CFG + r": field 'model\.patch_size'", True, None),
    ("model-string", _set("model", "full"), CFG + r": field 'model'", True, None),
    ("decomposition-string", _set("model.decomposition", "brats"),
     CFG + r": invalid 'model' section", True, None),
    ("model-unknown-key", _set("model.depth", 9), CFG + r": invalid 'model' section", True, None),
    ("modalities-disagree", _set("modalities", ["t1", "flair", "t1ce", "t2"]),
     CFG + r": field 'modalities'", True, None),
    ("training-string", _set("training", "yes"), CFG + r": field 'training'", True, None),
    ("weights-sha-number", _set("weights_sha256", 5), CFG + r": 'weights_sha256'", True, None),
    ("config-not-json", None, CFG + r": not valid JSON", False,
     lambda f: (f / "config.json").write_text("{not json")),
    ("config-a-list", None, CFG + r": expected a JSON object", False,
     lambda f: (f / "config.json").write_text("[1, 2]")),
    ("config-missing", None, CFG + r" is missing", False, lambda f: (f / "config.json").unlink()),
    ("weights-missing", None, WTS + r" is missing", False,
     lambda f: (f / "model.safetensors").unlink()),
    ("weights-edited", None, WTS + r": sha256 .* does not match", False,
     lambda f: (f / "model.safetensors").write_bytes(b"garbage")),
    ("weights-pickle-rehashed", None, WTS + r": unreadable safetensors", False,
     _garbage_weights_rehashed),
    ("legacy-v1-edited", _legacy_v1_binary, CFG + r": field 'label_convention' = 'binary'",
     False, None),
]
CHECKPOINT_ROWS = [
    _ckpt_row(kind, "info", edit, pattern, seal=seal, after=after)
    for kind, edit, pattern, seal, after in CHECKPOINT_KINDS
] + [
    _ckpt_row(kind, "predict", edit, pattern, seal=seal, after=after)
    for kind, edit, pattern, seal, after in CHECKPOINT_KINDS
    if kind in ("edited-label-convention", "swapped-primaries", "format-version-string",
                "normalisation-string", "label-convention-other-regions", "huge-width",
                "huge-patch", "weights-edited", "weights-pickle-rehashed", "legacy-v1-edited")
] + [
    _ckpt_row(kind, "explain", edit, pattern, seal=seal, after=after)
    for kind, edit, pattern, seal, after in CHECKPOINT_KINDS
    if kind in ("edited-label-convention", "huge-width", "normalisation-string",
                "format-version-string", "weights-edited")
] + [
    _ckpt_row("legacy-v1", "info", _legacy_v1, "", seal=False, code=0),
    _ckpt_row("legacy-v1", "predict", _legacy_v1, "", seal=False, code=0),
    Hostile("checkpoint-not-a-folder-predict",
            lambda sb: (sb.case("C1"), (sb.inp / "model.bin").write_bytes(b"x"),
                        _predict(sb, sb.inp / "C1", extra=("--model", sb.inp / "model.bin")))[-1],
            2, r"model\.bin: no checkpoint folder"),
]


def _option_row(command: str, option: str, value: str) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        if command == "train":
            return _args(sb, "train", "--demo", "--out", sb.out, option, value)
        if command == "phantom":
            values = value.split() if option == "--shape" else [value]
            return _args(sb, "phantom", "--kind", "brats", "--out", sb.out, option, *values)
        if command == "predict":
            sb.case("C1")
            return _predict(sb, sb.inp / "C1", extra=(option, value))
        return _args(sb, "shapes", "--out", sb.out, option, value)

    return Hostile(f"option-{command}{option}={value}", setup, 2,
                   rf"^ciml-core {command}: error: argument {option}: expected ")


OPTION_ROWS = [_option_row(c, o, v) for c, o, v in [
    ("train", "--epochs", "0"), ("train", "--epochs", "-3"), ("train", "--epochs", "many"),
    ("train", "--batch", "0"), ("train", "--lr", "-0.001"), ("train", "--lr", "0"),
    ("train", "--lr", "nan"), ("train", "--lr", "inf"), ("train", "--workers", "-1"),
    ("train", "--val-every", "0"), ("train", "--iters-per-epoch", "0"), ("train", "--patch", "40"),
    ("train", "--patch", "0"), ("train", "--width", "0"), ("train", "--fold", "5"),
    ("train", "--fold", "-2"), ("train", "--beta", "-0.5"), ("train", "--demo-cases", "0"),
    ("train", "--seed", "-1"),
    ("phantom", "--cases", "0"), ("phantom", "--shape", "0 48 32"),
    ("phantom", "--shape", "100000 48 32"), ("phantom", "--seed", "-1"),
    ("predict", "--overlap", "1"), ("predict", "--overlap", "-0.1"), ("predict", "--overlap", "nan"),
    ("shapes", "--steps", "0"), ("shapes", "--size", "40"), ("shapes", "--width", "0"),
    ("shapes", "--beta", "-1"), ("shapes", "--train-pairs", "0"), ("shapes", "--eval-pairs", "0"),
]]


def _resume_row(name: str, content: str) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        sb.out.mkdir()
        (sb.out / "train_config.json").write_text(content)
        return _args(sb, "train", "--out", sb.out, "--resume")

    return Hostile(f"train-resume-{name}", setup, 2, r"train_config\.json")


# -- --out problems, for every command that writes -----------------------------------------------


def _command_writing_to(sb: Sandbox, command: str, out: Path) -> list[str]:
    if command == "predict":
        sb.case("C1")
        return _args(sb, "predict", sb.inp / "C1", "--out", out)
    if command == "explain":
        sb.case("C1")
        return _args(sb, "explain", sb.inp / "C1", "--out", out, "--pairs", "FLAIR:WT")
    if command == "evaluate":
        sb.case("C1")
        (sb.inp / "pred").mkdir()
        shutil.copyfile(sb.inp / "C1" / "C1_seg.nii.gz", sb.inp / "pred" / "C1.nii.gz")
        return _args(sb, "evaluate", sb.inp / "pred", sb.inp, "--out", out)
    if command == "phantom":
        return _args(sb, "phantom", "--kind", "brats", "--out", out, "--shape", "32", "32", "24")
    if command == "train":
        return _args(sb, "train", "--demo", "--out", out, "--epochs", "1")
    return _args(sb, "shapes", "--out", out, "--steps", "1")


def _out_row(kind: str, command: str) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        blocker = sb.root / "blocker.txt"
        blocker.write_text("a file\n")
        if kind == "out-is-a-file":
            out = blocker
        elif kind == "out-below-a-file":
            out = blocker / "sub" / ("r.csv" if command == "evaluate" else "x")
        else:  # a dangling symbolic link
            out = sb.root / "dangling"
            out.symlink_to(sb.root / "nowhere" / "x")
            out = out / "r.csv" if command == "evaluate" else out
        return _command_writing_to(sb, command, out)

    pattern = {"out-is-a-file": r"--out .*blocker\.txt.*(not a folder|is a file)",
               "out-below-a-file": r"--out .*blocker\.txt.* is a file",
               "out-dangling-link": r"--out .*dangling.*broken symbolic link"}[kind]
    return Hostile(f"{kind}-{command}", setup, 2, pattern)


OUT_ROWS = [_out_row(kind, command)
            for kind in ("out-is-a-file", "out-below-a-file", "out-dangling-link")
            for command in ("predict", "explain", "evaluate", "phantom", "train", "shapes")
            if not (kind == "out-is-a-file" and command == "evaluate")]


def _existing_output_row(command: str, existing: str, extra: tuple = ()) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        argv = _command_writing_to(sb, command, sb.out / "r.csv" if command == "evaluate"
                                   else sb.out) + list(extra)
        sb.out.mkdir(exist_ok=True)
        (sb.out / existing).parent.mkdir(parents=True, exist_ok=True)
        (sb.out / existing).write_bytes(b"precious")
        return argv

    return Hostile(f"existing-output-{command}-{existing}", setup, 2,
                   re.escape(existing) + r" already exists \(use --overwrite")


EXISTING_ROWS = [
    _existing_output_row("predict", "C1.nii.gz"),
    _existing_output_row("predict", "C1_prob_ET.nii.gz", ("--probabilities",)),
    _existing_output_row("explain", "weights.json"),
    _existing_output_row("explain", "C1_gradcam.png"),
    _existing_output_row("evaluate", "r.json"),
    _existing_output_row("phantom", "Phantom_00000/Phantom_00000_t1.nii.gz"),
    _existing_output_row("shapes", "shapes_result.json"),
]


def _symlink_target(overwrite: bool) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        sb.case("C1")
        sb.out.mkdir()
        victim = sb.root / "victim.nii.gz"
        victim.write_bytes(b"precious")
        (sb.out / "C1.nii.gz").symlink_to(victim)
        return _predict(sb, sb.inp / "C1", extra=("--overwrite",) if overwrite else ())

    # the link is refused for leading out of --out, with or without --overwrite
    pattern = r"'C1\.nii\.gz' would be written outside the output folder"
    return Hostile(f"output-is-symlink-out{'-overwrite' if overwrite else ''}", setup, 2, pattern)


def _inside_row(command: str, where: str) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        files = sb.case("C1")
        folder = sb.inp / "C1"
        out = {"case": folder, "below-case": folder / "results"}[where]
        sb.out = out  # the runner allows nothing new outside it
        if command == "predict":
            return _args(sb, "predict", folder, "--out", out)
        if command == "predict-manifest":  # the manifest lives elsewhere, its images here
            other = sb.root / "lists"
            other.mkdir()
            m = other / "m.csv"
            m.write_text("case_id,flair,t1,t1ce,t2\nC1," + ",".join(str(files[k]) for k in MODS)
                         + "\n")
            return _args(sb, "predict", m, "--out", out)
        return _args(sb, "explain", folder, "--out", out, "--pairs", "FLAIR:WT")

    return Hostile(f"out-inside-input-{command}-{where}", setup, 2,
                   r"--out .* is inside the input folder")


def _inside_dataset_root(sb: Sandbox) -> list[str]:
    sb.case("C1")
    sb.out = sb.inp / "predictions"
    return _args(sb, "predict", sb.inp, "--out", sb.out)


def _output_is_a_folder(sb: Sandbox) -> list[str]:
    sb.case("C1")
    (sb.out / "C1.nii.gz").mkdir(parents=True)
    return _predict(sb, sb.inp / "C1", extra=("--overwrite",))


INSIDE_ROWS = [_inside_row(c, w) for c in ("predict", "predict-manifest", "explain")
               for w in ("case", "below-case")] + [
    Hostile("out-inside-input-predict-dataset-root", _inside_dataset_root, 2,
            r"--out .* is inside the input folder"),
    Hostile("output-is-a-folder-overwrite", _output_is_a_folder, 2,
            r"C1\.nii\.gz: is a folder; expected a file path"),
]


def _replace_input_row() -> Hostile:
    # The original incident: --overwrite --allow-input-dir and a case id naming an input image.
    def setup(sb: Sandbox) -> list[str]:
        files = sb.case("C1", label=False)
        m = sb.root / "m.csv"
        m.write_text("case_id,flair,t1,t1ce,t2\nC1_flair," + ",".join(str(files[k]) for k in MODS)
                     + "\n")
        sb.out = sb.inp / "C1"
        return _args(sb, "predict", m, "--out", sb.out, "--overwrite", "--allow-input-dir")

    return Hostile("case-id-names-an-input-image-overwrite", setup, 2,
                   r"C1_flair\.nii\.gz is an input file of this run")


# -- layouts: stray files, duplicates, bare files ------------------------------------------------


def _stray(layout: str) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        sb.case("C1", layout)
        other = sb.case("C2", layout, seed=1, folder=sb.root / "elsewhere")
        shutil.copyfile(other["flair"], sb.inp / "C1" / other["flair"].name)
        return _predict(sb, sb.inp / "C1")

    name = "C2_flair" if layout == "brats2020" else "C2-t2f"
    return Hostile(f"stray-file-of-another-case-{layout}", setup, 2,
                   r"files of two cases in one case folder: .*" + name)


def _duplicate_in_folder(name: str, extra_file: str, pattern: str, layout: str = "brats2020"
                         ) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        files = sb.case("C1", layout)
        src = files["seg"] if "seg" in extra_file else files["flair"]
        shutil.copyfile(src, sb.inp / "C1" / extra_file)
        return _predict(sb, sb.inp / "C1")

    return Hostile(f"duplicate-in-folder-{name}", setup, 2, r"two files for " + pattern)


def _autopet_duplicate() -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        for name in ("CTres.nii.gz", "SUV.nii.gz", "ctres.nii"):
            write_nifti(sb.inp / "P1" / name, np.ones((4, 4, 4), np.float32))
        return _predict(sb, sb.inp / "P1")

    return Hostile("duplicate-in-folder-autopet-ctres", setup, 2,
                   r"two files for CTRES: .*CTres\.nii\.gz and ctres\.nii")


def _duplicate_ids(source: str) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        a = sb.case("C1", label=False)
        if source in ("csv", "json"):
            b = sb.case("C2", seed=1, label=False)
            rows = [sb.row(a, case_id="X"), sb.row(b, case_id="X")]
            if source == "csv":
                return _predict(sb, sb.manifest(rows))
            (sb.inp / "m.json").write_text(json.dumps(rows))
            return _predict(sb, sb.inp / "m.json")
        if source == "two-roots":
            sb.case("C1", folder=sb.inp / "root2" / "C1", seed=1)
            (sb.inp / "root1").mkdir()
            shutil.move(str(sb.inp / "C1"), str(sb.inp / "root1" / "C1"))
            return _predict(sb, sb.inp / "root1", sb.inp / "root2")
        # two case folders whose files carry one case name
        sb.case("C1", folder=sb.inp / "copy", seed=1)
        return _predict(sb, sb.inp)

    pattern = {"csv": r"row 1 .* and row 2 .* both have case id 'X'",
               "json": r"entry 1 and entry 2 both have case id 'X'",
               "two-roots": r"two cases have the id 'C1'",
               "two-folders": r"two cases have the id 'C1'"}[source]
    return Hostile(f"duplicate-case-ids-{source}", setup, 2, pattern)


def _discovered_bad_id(name: str, cid: str, layout: str) -> Hostile:
    def setup(sb: Sandbox) -> list[str]:
        if layout == "nnunet":
            (sb.inp / "dataset.json").write_text(json.dumps(
                {"channel_names": {str(i): m for i, m in enumerate(MODS)}}))
            images, _ = tiny_case_arrays()
            for i, m in enumerate(MODS):
                write_nifti(sb.inp / "imagesTr" / f"{cid}_{i:04d}.nii.gz", images[m])
            return _predict(sb, sb.inp)
        sb.case(cid, layout, folder=sb.inp / "case")
        return _predict(sb, sb.inp / "case")

    return Hostile(f"discovered-case-id-{name}-{layout}", setup, 2, r"case id .*" + {
        "colon": "':'", "tab": "control character"}[name])


def _bare_files(name: str, names: list[str], pattern: str, code: int = 2,
                check: Callable | None = None, outputs: tuple = ()) -> Hostile:
    """Files named ``names`` (with {cid}) holding flair, t1, t1ce, t2 (in that order), given
    shuffled on the command line (MOD=PATH allowed in names as 'mod=name')."""

    def setup(sb: Sandbox) -> list[str]:
        files = sb.phantom("P1") if check is not None else sb.case("C1", label=False)
        argv = []
        for m, n in zip(MODS, names, strict=False):
            mod, _, fname = n.rpartition("=")
            target = sb.inp / "files" / fname
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(files[m], target)
            argv.append(f"{mod}={target}" if mod else str(target))
        for extra in names[len(MODS):]:  # a fifth file
            mod, _, fname = extra.rpartition("=")
            target = sb.inp / "files" / fname
            shutil.copyfile(files["flair"], target)
            argv.append(f"{mod}={target}" if mod else str(target))
        rng = np.random.default_rng(len(name))
        order = rng.permutation(len(argv))
        return _predict(sb, *(argv[i] for i in order))

    return Hostile(f"bare-files-{name}", setup, code, pattern, outputs, check)


def _same_as_folder_prediction(sb: Sandbox) -> None:
    """The shuffled files gave exactly the labels of the same case given as a folder, and the
    demo model does find the phantom's tumour in them (so a swap would show)."""
    got = next(p for p in sb.out.iterdir() if p.name.endswith(".nii.gz"))
    got_labels, ref_labels = _data(got), sb.phantom_labels
    assert (ref_labels > 0).sum() > 100
    assert np.array_equal(got_labels, ref_labels)


BARE_ROWS = [
    _bare_files("brats2020-names-shuffled", ["X_flair.nii.gz", "X_t1.nii.gz", "X_t1ce.nii.gz",
                                             "X_t2.nii.gz"], "", 0, _same_as_folder_prediction,
                ("X.nii.gz",)),
    _bare_files("brats2023-names-shuffled", ["X-t2f.nii.gz", "X-t1n.nii.gz", "X-t1c.nii.gz",
                                             "X-t2w.nii.gz"], "", 0, _same_as_folder_prediction,
                ("X.nii.gz",)),
    _bare_files("mixed-pairs-and-names", ["flair=a.nii.gz", "X_t1.nii.gz", "t1ce=c.nii.gz",
                                          "X_t2.nii.gz"], "", 0, None, ("X.nii.gz",)),
    _bare_files("names-say-nothing", ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"],
                r"[abcd]\.nii\.gz: cannot tell the modality from the file name"),
    _bare_files("two-flair", ["X_flair.nii.gz", "X_t1.nii.gz", "X_t1ce.nii.gz", "X_t2.nii.gz",
                              "Y_FLAIR.nii"], r"are both flair images"),
    _bare_files("ambiguous-name", ["X_t1_t2.nii.gz", "X_t1.nii.gz", "X_t1ce.nii.gz",
                                   "X_flair.nii.gz"], r"X_t1_t2\.nii\.gz: the file name is ambiguous"),
    _bare_files("two-cases", ["A_flair.nii.gz", "A_t1.nii.gz", "B_t1ce.nii.gz", "A_t2.nii.gz"],
                r"belong to two cases"),
    _bare_files("modality-not-in-model", ["X_flair.nii.gz", "X_t1.nii.gz", "X_t1ce.nii.gz",
                                          "X_ct.nii.gz"], r"X_ct\.nii\.gz is a ct image, but"),
    _bare_files("three-files", ["X_flair.nii.gz", "X_t1.nii.gz", "X_t1ce.nii.gz"],
                r"case X: modality \['t2'\] missing"),
    _bare_files("unknown-mod-key", ["flair=a.nii.gz", "t1=b.nii.gz", "t1ce=c.nii.gz",
                                    "weird=d.nii.gz"], r"'weird' is not a modality name"),
    _bare_files("pair-synonyms", ["flair=a.nii.gz", "t1=b.nii.gz", "t1ce=c.nii.gz",
                                  "t2f=d.nii.gz"], r"are both flair images"),
]


def _manifest_row(name: str, text: str | bytes, pattern: str, code: int = 2,
                  suffix: str = ".csv", outputs: tuple = ()) -> Hostile:
    """A manifest whose text refers to {flair} {t1} {t1ce} {t2} {seg} (paths relative to it)."""

    def setup(sb: Sandbox) -> list[str]:
        files = sb.case("C1")
        rel = {k: sb.rel(v) for k, v in files.items()}
        path = sb.inp / f"m{suffix}"
        if isinstance(text, bytes):
            path.write_bytes(text.replace(b"{flair}", rel["flair"].encode()))
        else:
            body = text.format(**rel, dir=sb.rel(sb.inp / "C1"))
            path.write_bytes(body.encode("utf-8-sig" if name.startswith("bom") else "utf-8"))
        return _predict(sb, path)

    return Hostile(f"manifest-{name}", setup, code, pattern, outputs)


HEAD = "case_id,flair,t1,t1ce,t2"
ROW = "C1,{flair},{t1},{t1ce},{t2}"
MANIFEST_ROWS = [
    _manifest_row("flair-and-t2f", "case_id,flair,t2f,t1,t1ce,t2\nC1,{flair},{flair},{t1},{t1ce},"
                  "{t2}\n", r"m\.csv: columns 'flair' and 't2f' both give the modality flair"),
    _manifest_row("label-and-seg", HEAD + ",label,seg\n" + ROW + ",{seg},{seg}\n",
                  r"columns 'label' and 'seg' both give the label"),
    _manifest_row("case-id-and-case", "case_id,case,flair,t1,t1ce,t2\nC1,C9,{flair},{t1},{t1ce},"
                  "{t2}\n", r"columns 'case_id' and 'case' both give the case_id"),
    _manifest_row("header-twice", "case_id,flair,flair,t1,t1ce,t2\nC1,{flair},{flair},{t1},"
                  "{t1ce},{t2}\n", r"m\.csv: column\(s\) \['flair'\] appear twice"),
    _manifest_row("bom-csv", HEAD + "\n" + ROW + "\n", "", 0, outputs=("C1.nii.gz",)),
    _manifest_row("bom-json", '[{{"case_id": "C1", "flair": "{flair}", "t1": "{t1}", "t1ce": '
                  '"{t1ce}", "t2": "{t2}"}}]', "", 0, ".json", ("C1.nii.gz",)),
    _manifest_row("blank-lines", "\n" + HEAD + "\n\n" + ROW + "\n\n", "", 0,
                  outputs=("C1.nii.gz",)),
    _manifest_row("ragged-long", HEAD + "\n" + ROW + ",extra\n",
                  r"m\.csv: row 1 \(line 2\) has 6 field\(s\), the header has 5"),
    _manifest_row("ragged-short", HEAD + "\n" + ROW + "\nC2,{flair},{t1}\n",
                  r"m\.csv: row 2 \(line 3\) has 3 field\(s\), the header has 5"),
    _manifest_row("unknown-column", HEAD + ",weight\n" + ROW + ",3\n",
                  r"m\.csv: unknown column\(s\) \['weight'\]"),
    _manifest_row("header-only", HEAD + "\n", r"m\.csv: manifest has no rows"),
    _manifest_row("json-not-a-list", '{{"flair": "{flair}"}}', r"m\.json: expected a JSON list",
                  suffix=".json"),
    _manifest_row("json-invalid", "[{{", r"m\.json: cannot read manifest", suffix=".json"),
    _manifest_row("json-value-list", '[{{"case_id": "C1", "flair": ["{flair}"]}}]',
                  r"m\.json: entry 1, column 'flair': expected a file path", suffix=".json"),
    _manifest_row("json-value-bool", '[{{"case_id": "C1", "flair": true}}]',
                  r"m\.json: entry 1, column 'flair'", suffix=".json"),
    _manifest_row("same-file-twice", HEAD + "\nC1,{flair},{flair},{t1ce},{t2}\n",
                  r"row 1 \(line 2\) \(C1\) uses the file .*C1_flair\.nii\.gz for both flair and t1"),
    _manifest_row("image-missing", HEAD + "\nC1,C1/nope_flair.nii.gz,{t1},{t1ce},{t2}\n",
                  r"nope_flair\.nii\.gz: file not found"),
    _manifest_row("image-is-a-folder", HEAD + "\nC1,{dir},{t1},{t1ce},{t2}\n",
                  r"C1: file not found"),
    _manifest_row("no-image", "case_id,flair\nC1,\n", r"row 1 \(line 2\) \(C1\) names no image"),
    _manifest_row("latin1", b"case_id,flair\nC\xe91,{flair}\n", r"m\.csv: cannot read manifest"),
]


# -- evaluate, explain, distribution warnings ------------------------------------------------------


def _evaluate_row(name: str, build: Callable[[Sandbox], list[str]], pattern: str,
                  code: int = 2, outputs: tuple = ()) -> Hostile:
    return Hostile(f"evaluate-{name}", build, code, pattern, outputs)


def _preds(sb: Sandbox, labels: dict[str, np.ndarray | None], affine=LPS_AFFINE) -> Path:
    folder = sb.inp / "pred"
    folder.mkdir(exist_ok=True)
    for cid, label in labels.items():
        write_nifti(folder / f"{cid}.nii.gz", label, affine)
    return folder


def _refs(sb: Sandbox) -> tuple[Path, np.ndarray]:
    _, label = tiny_case_arrays()
    folder = sb.inp / "ref"
    write_nifti(folder / "C1.nii.gz", label)
    return folder, label


def _eval_self(sb: Sandbox) -> list[str]:
    ref, _ = _refs(sb)
    return _args(sb, "evaluate", ref, ref, "--out", sb.out / "r.csv")


def _eval_ok(sb: Sandbox) -> list[str]:
    ref, label = _refs(sb)
    return _args(sb, "evaluate", _preds(sb, {"C1": label}), ref, "--out", sb.out / "r.csv")


def _eval_check(sb: Sandbox) -> None:
    rows = list(csv.DictReader((sb.out / "r.csv").open()))
    assert rows[0]["case_id"] == "C1" and float(rows[0]["WT_dice"]) == 1.0


def _eval_with(labels_fn, affine=LPS_AFFINE):
    def build(sb: Sandbox) -> list[str]:
        ref, label = _refs(sb)
        return _args(sb, "evaluate", _preds(sb, labels_fn(label), affine), ref, "--out",
                     sb.out / "r.csv")
    return build


def _eval_dup(sb: Sandbox) -> list[str]:
    ref, label = _refs(sb)
    pred = _preds(sb, {"C1": label})
    write_nifti(pred / "C1.nii", label)
    return _args(sb, "evaluate", pred, ref)


_shifted_affine = LPS_AFFINE.copy()
_shifted_affine[0, 3] = 2.0
EVALUATE_ROWS = [
    _evaluate_row("folder-against-itself", _eval_self,
                  r"case C1: the prediction .*C1\.nii\.gz is the reference label itself"),
    Hostile("evaluate-ok", _eval_ok, 0, "", ("r.csv", "r.json"), _eval_check),
    _evaluate_row("out-json", lambda sb: _eval_ok(sb)[:-1] + [str(sb.out / "r.json")],
                  r"--out .*r\.json: expected the CSV path"),
    _evaluate_row("out-is-a-folder", lambda sb: (sb.out.mkdir(), _eval_ok(sb)[:-1] + [str(sb.out)])
                  [1], r"--out .*out: is a folder"),
    _evaluate_row("label-values", _eval_with(lambda lab: {"C1": np.where(lab == 4, 3, lab)}),
                  r"pred/C1\.nii\.gz: label values \[3\]"),
    _evaluate_row("other-grid", _eval_with(lambda lab: {"C1": lab}, _shifted_affine),
                  r"prediction .*C1\.nii\.gz and reference .*C1\.nii\.gz have affines"),
    _evaluate_row("missing-prediction", _eval_with(lambda lab: {"C2": lab}),
                  r"prediction\(s\) have no reference label: C2"),
    _evaluate_row("two-files-one-case", _eval_dup, r"two prediction files for case 'C1'"),
]


def _explain_zero_target(sb: Sandbox) -> list[str]:
    sb.case("C1")
    return _args(sb, "explain", sb.inp / "C1", "--out", sb.out, "--pairs", "FLAIR:WT")


def _predicts_nothing(mp: pytest.MonkeyPatch) -> None:
    """A model that finds no tumour (whatever the demo makes of random noise)."""
    import ciml_core.explain as explain

    mp.setattr(explain, "sliding_window_predict", lambda network, image, *a, **kw: np.zeros(
        (len(network.config.decomposition.regions), *image.shape[1:]), np.float32))


def _explain_two_cases(sb: Sandbox) -> list[str]:
    sb.case("C1")
    sb.case("C2", seed=1)
    return _args(sb, "explain", sb.inp, "--out", sb.out)


def _odd_shape(shape: tuple[int, ...], spacing=(1.0, 1.0, 1.0)):
    def setup(sb: Sandbox) -> list[str]:
        rng = np.random.default_rng(0)
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        for m in MODS:
            write_nifti(sb.inp / "C1" / f"C1_{m}.nii.gz",
                        rng.uniform(1, 2, shape).astype(np.float32), affine)
        return _predict(sb, sb.inp / "C1")
    return setup


def _slope_case(slope: float):
    """The phantom with FLAIR stored as int16 with a scale slope (as some scanners export)."""

    def setup(sb: Sandbox) -> list[str]:
        files = sb.phantom("P1")
        x = _data(files["flair"]).astype(np.float64)
        img = nib.Nifti1Image(np.round(x / x.max() * 30000).astype(np.int16),
                              nib.load(str(files["flair"])).affine)
        img.header.set_slope_inter(slope, 0.0)
        nib.save(img, str(files["flair"]))
        return _predict(sb, sb.inp / "P1")
    return setup


def _same_labels_as_slope_one(sb: Sandbox) -> None:
    """A z-score is scale-free: the labels equal those of the same integers without a slope."""
    flair = sb.inp / "P1" / "P1_flair.nii.gz"
    img = nib.load(str(flair))
    ref_in = sb.root / "ref_in" / "P1"
    shutil.copytree(sb.inp / "P1", ref_in)
    plain = nib.Nifti1Image(np.asarray(img.dataobj.get_unscaled()), img.affine)
    plain.header.set_slope_inter(1.0, 0.0)
    nib.save(plain, str(ref_in / "P1_flair.nii.gz"))
    assert main(["predict", str(ref_in), "--out", str(sb.root / "ref_out")]) == 0
    got, ref = _data(sb.out / "P1.nii.gz"), _data(sb.root / "ref_out" / "P1.nii.gz")
    assert (ref > 0).sum() > 100 and np.array_equal(got, ref)


def _short_memory(mp: pytest.MonkeyPatch) -> None:
    import ciml_core.data.nifti as nifti

    mp.setattr(nifti, "_available_memory", lambda: 1000)


def _hidden_files_ignored(sb: Sandbox) -> list[str]:
    files = sb.case("C1")
    (sb.inp / "C1" / "._C1_flair.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    (sb.inp / "C1" / ".C1_t1.nii.gz.x1.tmp").write_bytes(b"partial")
    assert files
    return _predict(sb, sb.inp / "C1")


THIN = r"warning: case C1: the imaged region is .* thinnest axis"
MISC_ROWS = [
    Hostile("explain-zero-target-voxels", _explain_zero_target, 0,
            r"warning: case C1, pair FLAIR:WT: the model predicts no WT voxel.*equal-share default",
            ("C1_heatmap_FLAIR-WT_from_T1.nii.gz", "weights.json", "C1_gradcam.png"),
            patch=_predicts_nothing),
    Hostile("explain-two-cases", _explain_two_cases, 2, r"holds 2 cases; explain takes one"),
    Hostile("shape-tiny-4x4x4", _odd_shape((4, 4, 4)), 0, THIN, ("C1.nii.gz",)),
    Hostile("shape-one-voxel-thick", _odd_shape((24, 24, 1)), 0,
            r"warning: case C1: the imaged region is 24x24x1 voxels, 1 along its thinnest axis",
            ("C1.nii.gz",)),
    Hostile("shape-flat-slab-40x40x3", _odd_shape((40, 40, 3)), 0, THIN, ("C1.nii.gz",)),
    Hostile("spacing-very-anisotropic", _odd_shape((24, 24, 16), (1.0, 1.0, 6.0)), 0,
            r"warning: case C1: voxels of 1 x 1 x 6 mm are very anisotropic", ("C1.nii.gz",)),
    Hostile("int16-large-slope-within-float32", _slope_case(1e30), 0, "", ("P1.nii.gz",),
            _same_labels_as_slope_one),
    Hostile("nifti-exceeds-available-memory", lambda sb: (sb.case("C1"),
                                                         _predict(sb, sb.inp / "C1"))[1],
            2, r"C1_flair\.nii\.gz: header claims a 12x10x8 volume, which would need about",
            patch=_short_memory),
    Hostile("hidden-files-in-case-folder-ignored", _hidden_files_ignored, 0, "", ("C1.nii.gz",)),
    _stray("brats2020"), _stray("brats2023"),
    _duplicate_in_folder("nii-and-nii-gz", "C1_flair.nii", r"modality flair: .*C1_flair\.nii"),
    _duplicate_in_folder("upper-case", "C1_FLAIR.nii.gz", r"modality flair: .*C1_FLAIR"),
    _duplicate_in_folder("seg", "C1_SEG.nii", r"the label: .*C1_SEG\.nii"),
    _duplicate_in_folder("brats2023", "C1-T2F.nii.gz", r"modality flair: .*C1-T2F", "brats2023"),
    _autopet_duplicate(),
    *(_duplicate_ids(s) for s in ("csv", "json", "two-roots", "two-folders")),
    _discovered_bad_id("colon", "A:B", "brats2020"),
    _discovered_bad_id("tab", "A\tB", "brats2020"),
    _discovered_bad_id("colon", "A:B", "nnunet"),
    _symlink_target(False), _symlink_target(True), _replace_input_row(),
    _resume_row("corrupt-json", "{ not json"), _resume_row("json-list", "[]"),
]

#: The corruptions tried through every way of naming a case's files (the others: a case folder).
EVERY_LAYOUT = ("truncated_gzip", "huge_header_nii", "negative_dim", "bad_datatype", "nan_voxel",
                "complex", "huge_scale_slope", "other_shape")
ROWS: list[Hostile] = [
    *(_nifti_row(kind, "brats2020") for kind in NIFTI_KINDS),
    *(_nifti_row(kind, layout) for kind in EVERY_LAYOUT for layout in ("manifest", "files")),
    *(_nifti_row(kind, "brats2023") for kind in ("truncated_gzip", "huge_header_gz", "nan_voxel",
                                                 "huge_scale_slope", "other_shape")),
    *(_nifti_row(kind, "brats2020") for kind in LABEL_KINDS),
    *(_nifti_row(kind, "manifest") for kind in ("label_value_300", "label_other_shape")),
    *CASE_ID_ROWS, *CHECKPOINT_ROWS, *OPTION_ROWS, *OUT_ROWS, *EXISTING_ROWS, *INSIDE_ROWS,
    *BARE_ROWS, *MANIFEST_ROWS, *EVALUATE_ROWS, *MISC_ROWS,
]


def test_the_table_is_large_and_unique():
    names = [r.name for r in ROWS]
    assert len(names) == len(set(names))
    assert len(names) >= 120


# -- the runner -----------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` -> its content hash ("dir" for folders, "link:" + target)."""
    state = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory) -> Path:
    from ciml_core.data.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    (folder,) = write_phantom_dataset("brats", 1, root, seed=0, shape=(48, 48, 32), spacing=2.0)
    return folder


@pytest.fixture(scope="module")
def phantom_labels(phantom_case, tmp_path_factory) -> np.ndarray:
    """The demo model's labels of the phantom case, given as its folder."""
    out = tmp_path_factory.mktemp("phantom_prediction")
    assert main(["predict", str(phantom_case), "--out", str(out)]) == 0
    return _data(out / f"{phantom_case.name}.nii.gz")


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_hostile_input(row: Hostile, tmp_path, phantom_case, phantom_labels, capsys, monkeypatch):
    sb = Sandbox(tmp_path / "box", phantom_case, phantom_labels)
    sb.expect_name = ""
    argv = row.setup(sb)
    if row.patch is not None:
        row.patch(monkeypatch)
    capsys.readouterr()
    before = _snapshot(sb.root)

    code = main(argv)

    err = capsys.readouterr().err
    after = _snapshot(sb.root)
    out_rel = os.path.relpath(sb.out, sb.root)

    def in_out(rel: str) -> bool:
        return rel == out_rel or rel.startswith(out_rel + os.sep)

    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert code == row.code, err
    if code == 2:
        assert len(errors) == 1, err
        assert errors[0].startswith("ciml-core "), errors
        assert re.search(row.pattern, errors[0]), (row.pattern, errors[0])
        assert sb.expect_name in errors[0], (sb.expect_name, errors[0])
    else:
        assert not errors, err
        if row.pattern:
            assert re.search(row.pattern, err), (row.pattern, err)
        for name in row.outputs:
            assert (sb.out / name).is_file(), sorted(after)
    # nothing outside --out; on refusal nothing at all
    created = sorted(set(after) - set(before))
    assert not [c for c in created if not in_out(c)], created
    if code != 0:
        assert not created, created
    # no input changed or removed (and nothing in --out, unless asked to overwrite)
    overwrite = code == 0 and "--overwrite" in argv
    changed = [p for p in before if after.get(p) != before[p] and not (overwrite and in_out(p))]
    assert not changed, changed
    assert not [c for c in created if Path(c).name.startswith(".")], created  # no temp files
    if row.check is not None:
        row.check(sb)


# -- concurrency ------------------------------------------------------------------------------------


def _racing_writer(i: int, target: Path, barrier: threading.Barrier, results: dict) -> None:
    def fill(tmp: Path) -> None:
        tmp.write_text(f"writer {i}\n")
        barrier.wait(timeout=30)  # everyone has passed the early existence check

    try:
        ciml_io.write_file(target, fill)
        results[i] = "ok"
    except FileExistsError as err:
        results[i] = str(err)


def test_concurrent_writers_exactly_one_wins(tmp_path):
    """Many threads create one file at once through ciml_core.io: exactly one succeeds, the
    file holds its content, everyone else gets FileExistsError, no temporary file is left."""
    for trial in range(20):
        target = tmp_path / f"t{trial}" / "report.csv"
        barrier = threading.Barrier(8)
        results: dict[int, str] = {}
        threads = [threading.Thread(target=_racing_writer, args=(i, target, barrier, results))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, r in results.items() if r == "ok"]
        assert len(results) == 8 and len(winners) == 1, results
        assert target.read_text() == f"writer {winners[0]}\n"
        assert all("already exists" in r for i, r in results.items() if i not in winners)
        assert sorted(p.name for p in target.parent.iterdir()) == ["report.csv"]


def test_overwrite_replaces_and_keeps_the_policy(tmp_path):
    target = tmp_path / "a.txt"
    ciml_io.atomic_write_text(target, "one")
    with pytest.raises(FileExistsError, match=r"a\.txt already exists"):
        ciml_io.atomic_write_text(target, "two")
    assert target.read_text() == "one"
    ciml_io.atomic_write_text(target, "two", overwrite=True)
    assert target.read_text() == "two" and target.stat().st_mode & 0o777 == 0o644


def test_two_predicts_into_one_folder(tmp_path, capsys, monkeypatch):
    """Two ``predict`` runs of two different cases with the same case id into one folder, both
    held at the moment of publishing (so both passed every existence check): in every trial
    exactly one succeeds, the other is refused with "already exists", and the output is exactly
    the winner's (its probability maps equal a reference run of the winner's input)."""
    sb = Sandbox(tmp_path / "box", tmp_path)
    for seed in (0, 1):
        sb.case("C1", folder=sb.inp / f"src{seed}" / "C1", seed=seed, label=False)
    references = {}
    for seed in (0, 1):
        ref = tmp_path / f"ref{seed}"
        assert main(["predict", str(sb.inp / f"src{seed}" / "C1"), "--out", str(ref),
                     "--probabilities"]) == 0
        references[seed] = {p.name: _data(p) for p in ref.iterdir()}
    assert not np.array_equal(references[0]["C1_prob_WT.nii.gz"],
                              references[1]["C1_prob_WT.nii.gz"])

    real_publish = ciml_io.publish
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        barrier = threading.Barrier(2)

        def held_publish(tmp, target, *, overwrite, barrier=barrier):
            if Path(target).name == "C1.nii.gz":
                barrier.wait(timeout=120)
            real_publish(tmp, target, overwrite=overwrite)

        monkeypatch.setattr(ciml_io, "publish", held_publish)
        codes: dict[int, int] = {}

        def run(seed: int, out: Path = out, codes: dict = codes) -> None:
            codes[seed] = main(["predict", str(sb.inp / f"src{seed}" / "C1"), "--out", str(out),
                                "--probabilities"])

        threads = [threading.Thread(target=run, args=(s,)) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        monkeypatch.setattr(ciml_io, "publish", real_publish)
        err = capsys.readouterr().err
        assert sorted(codes.values()) == [0, 2], (codes, err)
        assert err.count("C1.nii.gz already exists") == 1 and "Traceback" not in err
        winner = next(s for s, c in codes.items() if c == 0)
        written = {p.name: _data(p) for p in out.iterdir()}
        assert sorted(written) == sorted(references[winner])  # nothing lost, no temp file
        for name, data in written.items():
            assert np.array_equal(data, references[winner][name]), name


# -- a few direct checks of the pieces ------------------------------------------------------------


def test_output_path_refuses_escapes(tmp_path):
    for name in ("../x.nii.gz", "/etc/x", "a/b", "..", "", "a\\b"):
        with pytest.raises(ciml_io.OutputError, match="outside the output folder"):
            ciml_io.output_path(tmp_path, name)
    assert ciml_io.output_path(tmp_path, "C1.nii.gz") == tmp_path / "C1.nii.gz"


def test_seal_covers_every_field():
    doc = json.loads((DEMO_CHECKPOINT / "config.json").read_text())
    assert doc["format_version"] == 2 and doc["config_sha256"] == seal_config(doc)["config_sha256"]
    edited = {**doc, "label_convention": "brats2023"}
    assert seal_config(edited)["config_sha256"] != doc["config_sha256"]
    # the demo's weights are untouched by the re-seal
    assert sha256_file(DEMO_CHECKPOINT / "model.safetensors") == doc["weights_sha256"]
    assert len(load_file(str(DEMO_CHECKPOINT / "model.safetensors"))) > 0


def test_manifest_with_bom_names_its_first_column(tmp_path):
    from ciml_core.data.layouts import discover_cases

    path = tmp_path / "m.csv"
    path.write_bytes("case_id,flair\nA,a.nii.gz\n".encode("utf-8-sig"))
    (case,) = discover_cases(path)
    assert case.case_id == "A" and case.images == {"flair": tmp_path / "a.nii.gz"}


def test_float64_statistics_survive_a_huge_scale(tmp_path):
    from ciml_core.data.preprocess import normalize_mri

    x = np.zeros((6, 6, 6), np.float32)
    x[1:5, 1:5, 1:5] = np.arange(64, dtype=np.float32).reshape(4, 4, 4) * np.float32(1e30)
    z = normalize_mri(x, x != 0)
    assert np.all(np.isfinite(z)) and abs(float(z[x != 0].mean())) < 1e-5
    assert float(z[x != 0].std()) == pytest.approx(1.0, rel=1e-4)


def test_one_line_for_a_newline_in_a_file_name(tmp_path, capsys):
    bad = tmp_path / "a\nb"
    bad.mkdir()
    code = main(["predict", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "a\\nb" in err



@pytest.mark.parametrize("content", ["{ not json", '{"train": []}', '[{"train": "a"}]'])
def test_corrupt_splits_json_is_a_clean_error(tmp_path, content):
    from ciml_core.data.splits import load_or_make_splits
    from ciml_core.errors import InputDataError

    path = tmp_path / "splits.json"
    path.write_text(content)
    with pytest.raises(InputDataError, match=r"splits\.json: .*delete the file to re-split"):
        load_or_make_splits(path, ["a", "b"])
    assert path.read_text() == content
    fresh = load_or_make_splits(tmp_path / "new" / "splits.json", ["a", "b", "c"])
    assert len(fresh) == 5 and json.loads((tmp_path / "new" / "splits.json").read_text()) == fresh
