"""Find the cases of a dataset on disk, whatever layout it was published in.

Every layout resolves to the same thing: a list of :class:`CaseFiles`, each mapping canonical
modality names ("flair", "t1", "t1ce", "t2", "ct", "pet", ...) to files, plus an optional label
file. Loading and validation happen later (:mod:`ciml_core.data.dataset`); discovery only looks at
names, so it is cheap on thousands of cases.

Supported layouts (SPEC 3.1):

- ``brats2020``: ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (BraTS 2018-2021)
- ``brats2023``: ``<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz``
- ``nnunet``: ``dataset.json`` + ``imagesTr/<case>_000X.nii.gz`` + ``labelsTr/<case>.nii.gz``
- ``autopet``: ``<case>/{CTres,SUV,SEG}.nii.gz``
- ``hecktor``: ``<case>__CT.nii.gz``, ``<case>__PT.nii.gz``, label ``<case>.nii.gz`` (flat, or in
  ``imagesTr``/``labelsTr``)
- ``shapes``: this project's ShapeComposition phantoms, ``<case>/<case>_{primary,auxiliary,seg}``
- ``manifest``: a .json or .csv file, one row per case, one column per modality, optional ``label``
  and ``case_id`` columns; relative paths are relative to the manifest.

A root may also be a single case folder of a per-case-folder layout.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ciml_core.data.nifti import is_nifti_path
from ciml_core.errors import ConfigError, InputDataError

LAYOUTS = ("brats2020", "brats2023", "nnunet", "autopet", "hecktor", "shapes", "manifest")

#: Names seen in the wild -> canonical modality names.
MODALITY_ALIASES = {
    "flair": "flair", "t2f": "flair", "t2-flair": "flair", "t2flair": "flair",
    "t1": "t1", "t1n": "t1", "t1w": "t1", "native t1": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1-ce": "t1ce", "t1post": "t1ce",
    "t2": "t2", "t2w": "t2",
    "ct": "ct", "ctres": "ct",
    "pet": "pet", "pt": "pet", "suv": "pet",
    "primary": "primary", "auxiliary": "auxiliary",
}
KNOWN_MODALITIES = tuple(dict.fromkeys(MODALITY_ALIASES.values()))

#: Label convention each layout uses unless told otherwise.
DEFAULT_LABEL_CONVENTION = {
    "brats2020": "brats2020", "brats2023": "brats2023", "nnunet": "brats2020",
    "autopet": "binary", "hecktor": "hecktor", "shapes": "shapes", "manifest": "binary",
}


def canonical_modality(name: str) -> str:
    """Map a modality name as written in a dataset to its canonical name."""
    key = name.strip().lower()
    return MODALITY_ALIASES.get(key, key)


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: canonical modality name -> image file, plus an optional label."""

    case_id: str
    images: dict[str, Path] = field(hash=False)
    label: Path | None
    layout: str

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.images)


def _strip_nifti(name: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_path(p))


# -- per-case-folder layouts: a pattern that splits a file name into (case, key) -----------------

_SUFFIX_LAYOUTS = {
    # layout: (separator regex, modality keys, label key)
    "brats2020": (r"^(?P<case>.+)_(?P<key>flair|t1ce|t1|t2|seg)$", ("flair", "t1", "t1ce", "t2"), "seg"),
    "brats2023": (r"^(?P<case>.+)-(?P<key>t2f|t1n|t1c|t2w|seg)$", ("t2f", "t1n", "t1c", "t2w"), "seg"),
    "shapes": (r"^(?P<case>.+)_(?P<key>primary|auxiliary|seg)$", ("primary", "auxiliary"), "seg"),
}
_AUTOPET_FILES = {"ctres": "ct", "suv": "pet"}


def _case_from_folder(folder: Path, layout: str) -> CaseFiles | None:
    """Read one case folder; None when it holds no file of this layout."""
    files = _nifti_files(folder)
    if layout == "autopet":
        found = {_strip_nifti(p.name).lower(): p for p in files}
        if not set(_AUTOPET_FILES) & set(found):
            return None
        images = {mod: found[key] for key, mod in _AUTOPET_FILES.items() if key in found}
        return CaseFiles(folder.name, images, found.get("seg"), layout)
    pattern, keys, label_key = _SUFFIX_LAYOUTS[layout]
    images: dict[str, Path] = {}
    label = None
    case_id = None
    for p in files:
        m = re.match(pattern, _strip_nifti(p.name), flags=re.IGNORECASE)
        if not m:
            continue
        case_id = case_id or m["case"]
        key = m["key"].lower()
        if key == label_key:
            label = p
        else:
            images[canonical_modality(key)] = p
    if case_id is None:
        return None
    order = [canonical_modality(k) for k in keys]
    images = {mod: images[mod] for mod in order if mod in images}
    return CaseFiles(case_id, images, label, layout)


def _discover_case_folders(root: Path, layout: str) -> list[CaseFiles]:
    single = _case_from_folder(root, layout)
    if single is not None:
        return [single]
    cases = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        case = _case_from_folder(sub, layout)
        if case is not None:
            cases.append(case)
    return cases


def _discover_nnunet(root: Path) -> list[CaseFiles]:
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputDataError(f"{meta_path}: cannot read nnU-Net dataset.json ({err})") from err
    channels = meta.get("channel_names") or meta.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise InputDataError(
            f"{meta_path}: expected a 'channel_names' (nnU-Net v2) or 'modality' (v1) mapping "
            "like {\"0\": \"FLAIR\", ...}"
        )
    channel_to_modality = {int(k): canonical_modality(str(v)) for k, v in channels.items()}
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise InputDataError(f"{images_dir}: folder not found (nnU-Net layout needs imagesTr/)")
    by_case: dict[str, dict[str, Path]] = {}
    for p in _nifti_files(images_dir):
        m = re.match(r"^(?P<case>.+)_(?P<ch>\d{4})$", _strip_nifti(p.name))
        if not m:
            continue
        ch = int(m["ch"])
        if ch not in channel_to_modality:
            raise InputDataError(
                f"{p}: channel {ch:04d} is not listed in {meta_path} "
                f"(channels {sorted(channel_to_modality)})"
            )
        by_case.setdefault(m["case"], {})[channel_to_modality[ch]] = p
    cases = []
    for case_id, images in sorted(by_case.items()):
        ordered = {channel_to_modality[c]: images[channel_to_modality[c]]
                   for c in sorted(channel_to_modality) if channel_to_modality[c] in images}
        label = next((p for p in (labels_dir / f"{case_id}.nii.gz", labels_dir / f"{case_id}.nii")
                      if p.is_file()), None)
        cases.append(CaseFiles(case_id, ordered, label, "nnunet"))
    return cases


def _discover_hecktor(root: Path) -> list[CaseFiles]:
    image_dirs = [d for d in (root, root / "imagesTr") if d.is_dir()]
    label_dirs = [d for d in (root, root / "labelsTr") if d.is_dir()]
    by_case: dict[str, dict[str, Path]] = {}
    for folder in image_dirs:
        for p in _nifti_files(folder):
            m = re.match(r"^(?P<case>.+)__(?P<key>CT|PT)$", _strip_nifti(p.name), re.IGNORECASE)
            if m:
                by_case.setdefault(m["case"], {})[canonical_modality(m["key"])] = p
    cases = []
    for case_id, images in sorted(by_case.items()):
        ordered = {mod: images[mod] for mod in ("ct", "pet") if mod in images}
        label = next((d / f"{case_id}{ext}" for d in label_dirs for ext in (".nii.gz", ".nii")
                      if (d / f"{case_id}{ext}").is_file()), None)
        cases.append(CaseFiles(case_id, ordered, label, "hecktor"))
    return cases


_MANIFEST_ID_COLUMNS = ("case_id", "case")
_MANIFEST_LABEL_COLUMNS = ("label", "seg")


def _discover_manifest(path: Path) -> list[CaseFiles]:
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text())
            if isinstance(rows, dict):
                rows = rows.get("cases", rows)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise InputDataError(
                    f"{path}: expected a JSON list of objects (one per case), or {{'cases': [...]}}"
                )
        else:
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
    except (OSError, json.JSONDecodeError, csv.Error, UnicodeDecodeError) as err:
        raise InputDataError(f"{path}: cannot read manifest ({err})") from err
    if not rows:
        raise InputDataError(f"{path}: manifest has no rows")
    allowed = set(_MANIFEST_ID_COLUMNS) | set(_MANIFEST_LABEL_COLUMNS) | set(MODALITY_ALIASES)
    cases = []
    for i, row in enumerate(rows):
        unknown = sorted(k for k in row if k is None or k.strip().lower() not in allowed)
        if unknown:
            raise InputDataError(
                f"{path}: unknown column(s) {unknown}; expected modality columns "
                f"{list(KNOWN_MODALITIES)} (or their aliases), optional 'case_id' and 'label'"
            )
        norm = {k.strip().lower(): (str(v).strip() if v is not None else "") for k, v in row.items()}
        case_id = next((norm[c] for c in _MANIFEST_ID_COLUMNS if norm.get(c)), f"case_{i:04d}")
        label_value = next((norm[c] for c in _MANIFEST_LABEL_COLUMNS if norm.get(c)), "")
        images = {
            canonical_modality(k): (path.parent / v) for k, v in norm.items()
            if k not in _MANIFEST_ID_COLUMNS + _MANIFEST_LABEL_COLUMNS and v
        }
        if not images:
            raise InputDataError(f"{path}: row {i + 1} ({case_id}) names no image file")
        label = (path.parent / label_value) if label_value else None
        cases.append(CaseFiles(case_id, images, label, "manifest"))
    return cases


def detect_layout(root: Path) -> str:
    """Guess the layout of ``root`` from file names; InputDataError when nothing matches."""
    if root.is_file():
        if root.suffix.lower() in (".json", ".csv"):
            return "manifest"
        raise InputDataError(f"{root}: expected a dataset folder, a case folder or a .json/.csv manifest")
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "nnunet"
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for folder in folders[:50]:  # look at a few case folders, not the whole dataset
        names = [_strip_nifti(p.name).lower() for p in _nifti_files(folder)]
        if any(n.endswith("_flair") for n in names):
            return "brats2020"
        if any(n.endswith("-t2f") for n in names):
            return "brats2023"
        if "ctres" in names or "suv" in names:
            return "autopet"
        if any(n.endswith("__ct") or n.endswith("__pt") for n in names):
            return "hecktor"
        if any(n.endswith("_primary") for n in names):
            return "shapes"
    raise InputDataError(
        f"{root}: no known dataset layout found (looked for BraTS 2020/2023, nnU-Net, autoPET, "
        "HECKTOR and ShapeComposition file names, see the README's data section)"
    )


def discover_cases(root: str | Path, layout: str = "auto") -> list[CaseFiles]:
    """List the cases under ``root`` (a dataset folder, a case folder or a manifest file).

    Raises:
        InputDataError: ``root`` does not exist, is empty, or holds no case of the layout.
        ConfigError: ``layout`` is not one of :data:`LAYOUTS` or "auto".
    """
    root = Path(root)
    if not root.exists():
        raise InputDataError(f"{root}: no such file or folder")
    if root.is_dir() and not any(root.iterdir()):
        raise InputDataError(f"{root}: folder is empty; expected cases of a dataset layout")
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is unknown; expected 'auto' or one of {list(LAYOUTS)}")

    if layout == "manifest":
        cases = _discover_manifest(root)
    elif layout == "nnunet":
        cases = _discover_nnunet(root)
    elif layout == "hecktor":
        cases = _discover_hecktor(root)
    else:
        cases = _discover_case_folders(root, layout)
    if not cases:
        raise InputDataError(f"{root}: no case of layout {layout!r} found")
    return cases
