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
import io
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


_FILE_MODALITY = re.compile(
    r"(?:^|[_\-. ])(?P<key>"
    + "|".join(re.escape(k) for k in sorted(MODALITY_ALIASES, key=len, reverse=True))
    + r")$",
    re.IGNORECASE,
)


def modality_from_filename(path: str | Path) -> tuple[str, str] | None:
    """(canonical modality, case prefix) from a file name such as ``Case_001_flair.nii.gz`` or
    ``Case-001-t2f.nii.gz`` (the last ``_``/``-``/``.``-separated token names the modality);
    None when the name does not end in a known modality name."""
    stem = _strip_nifti(Path(path).name)
    m = _FILE_MODALITY.search(stem)
    if m is None:
        return None
    return canonical_modality(m["key"]), stem[: m.start()]


#: Longest case id accepted (UTF-8 bytes): output names append up to ~50 characters to it and
#: most file systems allow 255.
MAX_CASE_ID_BYTES = 200
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def case_id_problem(case_id: object) -> str | None:
    """Why ``case_id`` cannot name an output file (``<case_id>.nii.gz`` in ``--out``), or None.

    A case id becomes a file name, so it may not be empty, hold a path separator or a control
    character, be ``.``/``..``, start with ``.`` (hidden and temporary files), hold ``:``
    (a drive or stream on Windows) or be longer than :data:`MAX_CASE_ID_BYTES`.
    """
    if not isinstance(case_id, str):
        return f"is a {type(case_id).__name__}, not a string"
    if not case_id.strip():
        return "is empty"
    if _CONTROL_CHARS.search(case_id):
        return "holds a control character"
    if "/" in case_id or "\\" in case_id:
        return "holds a path separator"
    if case_id in (".", ".."):
        return "is a relative folder name"
    if case_id.startswith("."):
        return "starts with '.' (hidden and temporary files do)"
    if ":" in case_id:
        return "holds ':' (a drive or stream separator on Windows)"
    if len(case_id.encode("utf-8", "surrogateescape")) > MAX_CASE_ID_BYTES:
        return f"is longer than {MAX_CASE_ID_BYTES} bytes"
    return None


def check_case_id(case_id: object, where: str) -> str:
    """Return ``case_id`` if it is a usable file name (see :func:`case_id_problem`), otherwise
    raise InputDataError naming ``where`` it came from (a file, a manifest row, an option)."""
    problem = case_id_problem(case_id)
    if problem is not None:
        raise InputDataError(
            f"{where}: case id {case_id!r} {problem}; a case id names the output file "
            "<case_id>.nii.gz, so it must be a plain file name (no '/', '\\', '..', ':' or "
            "control characters)"
        )
    return case_id


def check_unique_case_ids(cases: list[CaseFiles], where: str | Path) -> None:
    """Two cases with one id would write one output file: InputDataError naming both."""
    seen: dict[str, CaseFiles] = {}
    for case in cases:
        other = seen.get(case.case_id)
        if other is not None:
            raise InputDataError(
                f"{where}: two cases have the id {case.case_id!r} ({_case_source(other)} and "
                f"{_case_source(case)}); case ids name the output files, so they must be unique"
            )
        seen[case.case_id] = case


def _case_source(case: CaseFiles) -> str:
    first = next(iter(case.images.values()), None) or case.label
    return str(first) if first is not None else case.case_id


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
    """The NIfTI files directly in ``folder``; hidden ones (``.name``: macOS ``._`` resource
    forks, temporary files of an interrupted write) are not part of a dataset."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and is_nifti_path(p) and not p.name.startswith("."))


# -- per-case-folder layouts: a pattern that splits a file name into (case, key) -----------------

_SUFFIX_LAYOUTS = {
    # layout: (separator regex, modality keys, label key)
    "brats2020": (r"^(?P<case>.+)_(?P<key>flair|t1ce|t1|t2|seg)$", ("flair", "t1", "t1ce", "t2"), "seg"),
    "brats2023": (r"^(?P<case>.+)-(?P<key>t2f|t1n|t1c|t2w|seg)$", ("t2f", "t1n", "t1c", "t2w"), "seg"),
    "shapes": (r"^(?P<case>.+)_(?P<key>primary|auxiliary|seg)$", ("primary", "auxiliary"), "seg"),
}
_AUTOPET_FILES = {"ctres": "ct", "suv": "pet"}


def _put_once(found: dict[str, Path], key: str, path: Path, where: Path, what: str) -> None:
    """``found[key] = path``, refusing a second file for the same key (naming both files)."""
    if key in found:
        raise InputDataError(
            f"{where}: two files for {what}: {found[key].name} and {path.name}; keep one"
        )
    found[key] = path


def _case_from_folder(folder: Path, layout: str) -> CaseFiles | None:
    """Read one case folder; None when it holds no file of this layout.

    Raises:
        InputDataError: the folder holds files of two cases (a stray file of another case), or
            two files for one modality; both files are named.
    """
    files = _nifti_files(folder)
    if layout == "autopet":
        found: dict[str, Path] = {}
        for p in files:
            key = _strip_nifti(p.name).lower()
            if key in (*_AUTOPET_FILES, "seg"):
                _put_once(found, key, p, folder, key.upper())
        if not set(_AUTOPET_FILES) & set(found):
            return None
        images = {mod: found[key] for key, mod in _AUTOPET_FILES.items() if key in found}
        case_id = folder.resolve().name  # "." -> the folder's real name
        check_case_id(case_id, str(folder))
        return CaseFiles(case_id, images, found.get("seg"), layout)
    pattern, keys, label_key = _SUFFIX_LAYOUTS[layout]
    found = {}
    case_id = first = None
    for p in files:
        m = re.match(pattern, _strip_nifti(p.name), flags=re.IGNORECASE)
        if not m:
            continue
        if case_id is None:
            case_id, first = m["case"], p
        elif m["case"] != case_id:
            raise InputDataError(
                f"{folder}: files of two cases in one case folder: {first.name} (case "
                f"{case_id!r}) and {p.name} (case {m['case']!r}); a case folder holds the files "
                "of one case, move or remove the other"
            )
        key = m["key"].lower()
        name = "the label" if key == label_key else f"modality {canonical_modality(key)}"
        _put_once(found, label_key if key == label_key else canonical_modality(key), p, folder,
                  name)
    if case_id is None:
        return None
    check_case_id(case_id, str(first))
    order = [canonical_modality(k) for k in keys]
    images = {mod: found[mod] for mod in order if mod in found}
    return CaseFiles(case_id, images, found.get(label_key), layout)


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
        check_case_id(m["case"], str(p))
        _put_once(by_case.setdefault(m["case"], {}), channel_to_modality[ch], p, images_dir,
                  f"case {m['case']!r} channel {ch:04d}")
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
                check_case_id(m["case"], str(p))
                _put_once(by_case.setdefault(m["case"], {}), canonical_modality(m["key"]), p,
                          folder, f"case {m['case']!r} {m['key'].upper()}")
    cases = []
    for case_id, images in sorted(by_case.items()):
        ordered = {mod: images[mod] for mod in ("ct", "pet") if mod in images}
        label = next((d / f"{case_id}{ext}" for d in label_dirs for ext in (".nii.gz", ".nii")
                      if (d / f"{case_id}{ext}").is_file()), None)
        cases.append(CaseFiles(case_id, ordered, label, "hecktor"))
    return cases


_MANIFEST_ID_COLUMNS = ("case_id", "case")
_MANIFEST_LABEL_COLUMNS = ("label", "seg")


def _manifest_column_role(column: str) -> str:
    """What a manifest column holds: "case_id", "label" or a canonical modality name."""
    if column in _MANIFEST_ID_COLUMNS:
        return "case_id"
    if column in _MANIFEST_LABEL_COLUMNS:
        return "label"
    return canonical_modality(column)


def _check_manifest_columns(path: Path, columns: list, where: str) -> None:
    """Unknown columns, and two columns for one thing (``flair`` and ``t2f``), are errors."""
    allowed = set(_MANIFEST_ID_COLUMNS) | set(_MANIFEST_LABEL_COLUMNS) | set(MODALITY_ALIASES)
    unknown = sorted(str(k) for k in columns
                     if not isinstance(k, str) or k.strip().lower() not in allowed)
    if unknown:
        raise InputDataError(
            f"{path}: unknown column(s) {unknown}{where}; expected modality columns "
            f"{list(KNOWN_MODALITIES)} (or their aliases), optional 'case_id' and 'label'"
        )
    roles: dict[str, str] = {}
    for column in columns:
        role = _manifest_column_role(column.strip().lower())
        if role in roles:
            what = role if role in ("case_id", "label") else f"modality {role}"
            raise InputDataError(
                f"{path}: columns {roles[role]!r} and {column!r}{where} both give the {what}; "
                "keep one"
            )
        roles[role] = column


def _read_manifest_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs of a JSON or CSV manifest; ``where`` names the row for messages."""
    try:
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column name.
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                data = data.get("cases", data)
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise InputDataError(
                    f"{path}: expected a JSON list of objects (one per case), or {{'cases': [...]}}"
                )
            return [(f"entry {i + 1}", row) for i, row in enumerate(data)]
        reader = csv.reader(io.StringIO(text, newline=""))
        header = None
        rows = []
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue  # blank line
            if header is None:
                header = fields
                if len(set(h.strip().lower() for h in header)) != len(header):
                    dup = sorted({h for h in header
                                  if [x.strip().lower() for x in header].count(h.strip().lower()) > 1})
                    raise InputDataError(f"{path}: column(s) {dup} appear twice in the header")
                continue
            where = f"row {len(rows) + 1} (line {reader.line_num})"
            if len(fields) != len(header):
                raise InputDataError(
                    f"{path}: {where} has {len(fields)} field(s), the header has {len(header)} "
                    f"({', '.join(header)}); every row needs one value per column"
                )
            rows.append((where, dict(zip(header, fields, strict=True))))
        return rows
    except (OSError, json.JSONDecodeError, csv.Error, UnicodeDecodeError) as err:
        raise InputDataError(f"{path}: cannot read manifest ({err})") from err


def _discover_manifest(path: Path) -> list[CaseFiles]:
    rows = _read_manifest_rows(path)
    if not rows:
        raise InputDataError(f"{path}: manifest has no rows")
    cases = []
    row_of: dict[str, str] = {}
    for i, (where, row) in enumerate(rows):
        _check_manifest_columns(path, list(row), f" in {where}" if path.suffix.lower() == ".json"
                                else "")
        norm = {}
        for k, v in row.items():
            if v is not None and not isinstance(v, str | int | float) or isinstance(v, bool):
                raise InputDataError(f"{path}: {where}, column {k!r}: expected a file path or "
                                     f"name, got {json.dumps(v)}")
            norm[_manifest_column_role(k.strip().lower())] = "" if v is None else str(v).strip()
        case_id = norm.get("case_id") or f"case_{i:04d}"
        check_case_id(case_id, f"{path}: {where}")
        if case_id in row_of:
            raise InputDataError(
                f"{path}: {row_of[case_id]} and {where} both have case id {case_id!r}; case ids "
                "name the output files, so they must be unique"
            )
        row_of[case_id] = where
        images = {k: path.parent / v for k, v in norm.items() if k not in ("case_id", "label") and v}
        if not images:
            raise InputDataError(f"{path}: {where} ({case_id}) names no image file")
        label = (path.parent / norm["label"]) if norm.get("label") else None
        files = list(images.items()) + ([("label", label)] if label is not None else [])
        for a in range(len(files)):
            for b in range(a + 1, len(files)):
                if files[a][1] == files[b][1]:
                    raise InputDataError(
                        f"{path}: {where} ({case_id}) uses the file {files[a][1]} for both "
                        f"{files[a][0]} and {files[b][0]}; each needs its own file"
                    )
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
    check_unique_case_ids(cases, root)
    return cases
