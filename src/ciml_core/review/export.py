"""Back into training: a review session's accepted and corrected cases as a dataset.

``ciml-core review-export SESSION --out DATASET`` writes the cases whose latest decision is
*accepted* or *corrected* in the layout of the session's input dataset, so that
:func:`~ciml_core.data.layouts.discover_cases` (and ``ciml-core train``) read it like the
original:

- the images are copied (default), hard-linked or symbolically linked (``--link``) under the
  names the layout expects;
- the label of each case is the session's final mask (which carries the image's affine and
  header), converted to the layout's label convention when it differs (BraTS 2020 <-> 2023);
- ``review_export.json`` records where it came from (session, dataset, model sha256, decisions).

Per layout: BraTS 2020/2023, ShapeComposition and autoPET keep one folder per case; nnU-Net
gets ``dataset.json``, ``imagesTr/`` and ``labelsTr/``; HECKTOR keeps its flat or
``imagesTr``/``labelsTr`` arrangement; a manifest becomes ``images/<case>/``, ``labels/`` and a
``manifest.csv`` with relative paths (the dataset to train on is then that file).

The dataset is built in a temporary folder beside ``--out`` and renamed into place at the end: a
failed or interrupted export leaves no half dataset. ``--out`` must not exist (or be empty) and
may not lie inside the input dataset.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ciml_core.data.labels import labels_to_regions, regions_to_labels
from ciml_core.data.layouts import DEFAULT_LABEL_CONVENTION, CaseFiles, discover_cases
from ciml_core.data.nifti import load_volume, write_like
from ciml_core.errors import ConfigError, InputDataError
from ciml_core.io import (
    PLACE_MODES,
    already_exists_message,
    atomic_write_text,
    dir_output,
    is_inside,
    place_file,
)
from ciml_core.review.summary import summarize_session

LINK_MODES = PLACE_MODES
EXPORT_INFO = "review_export.json"
#: Label file name per case-folder layout (``{id}`` is the case id).
_LABEL_NAMES = {"brats2020": "{id}_seg.nii.gz", "brats2023": "{id}-seg.nii.gz",
                "shapes": "{id}_seg.nii.gz", "autopet": "SEG.nii.gz"}
#: How to get past an existing --out (an export never replaces a folder).
_NEW_FOLDER = "and is not an empty folder; choose a new folder for the exported dataset"


@dataclass
class ExportResult:
    dataset: Path  # what to give ``ciml-core train`` (the folder, or the manifest file)
    layout: str
    cases: list[str]
    link: str  # the mode used ("copy" when a link was impossible and copying was asked)
    label_convention: str


def _target_convention(layout: str, session_convention: str) -> str:
    if layout in ("brats2020", "brats2023"):
        return DEFAULT_LABEL_CONVENTION[layout]
    return session_convention


def _write_label(mask: Path, dst: Path, source_convention: str, convention: str) -> None:
    if convention == source_convention:
        place_file(mask, dst, "copy")
        return
    volume = load_volume(mask)
    regions = labels_to_regions(volume.data, source_convention)
    write_like(regions_to_labels(regions, convention), volume.source, dst, dtype=np.uint8)


def _case_relative(files: CaseFiles, root: Path) -> Path | None:
    """The case folder of a per-case-folder layout, relative to the dataset root ('.' when the
    dataset is one case folder)."""
    folder = next(iter(files.images.values())).parent
    try:
        return folder.relative_to(root)
    except ValueError:
        return None


def review_export(
    session_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    link: str = "copy",
) -> ExportResult:
    """Write the accepted and corrected cases of a session as a dataset (see the module doc).

    Raises:
        ConfigError: an unknown link mode, no accepted or corrected case, labels that cannot be
            converted to the layout's convention.
        InputDataError: the session or its dataset cannot be read, a final mask is missing,
            ``out`` lies inside the dataset.
        OutputError, FileExistsError: ``out`` exists and is not an empty folder.
    """
    if link not in LINK_MODES:
        raise ConfigError(f"link: expected one of {list(LINK_MODES)}, got {link!r}")
    summary = summarize_session(session_dir)
    meta = summary.meta
    chosen = [c for c in summary.cases if c.decision in ("accepted", "corrected")]
    if not chosen:
        raise ConfigError(f"session {session_dir} has no accepted or corrected case to export")
    for c in chosen:
        if c.mask is None or not c.mask.is_file():
            raise InputDataError(f"case {c.case_id} is {c.decision} but its final mask "
                                 f"{c.mask} is missing")
    dataset = Path(meta["dataset"])
    layout = meta["layout"]
    out = Path(out).expanduser()
    root = dataset if dataset.is_dir() else dataset.parent
    if is_inside(out, root):
        raise InputDataError(f"--out {out} is inside the input dataset {root}; the export never "
                             "writes into its inputs")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(already_exists_message(out, hint=_NEW_FOLDER))
    files = {c.case_id: c for c in discover_cases(dataset, layout)}
    absent = [c.case_id for c in chosen if c.case_id not in files]
    if absent:
        raise InputDataError(f"case(s) {absent} of the session are no longer in {dataset}")
    source_convention = meta["label_convention"]
    convention = _target_convention(layout, source_convention)
    if convention != source_convention:
        from ciml_core.data.labels import get_convention

        if get_convention(convention).region_names != get_convention(
                source_convention).region_names:
            raise ConfigError(f"the session's masks ({source_convention}) cannot be written as "
                              f"{layout} labels ({convention})")

    used = link
    # Built beside --out and moved into place at the end (refused, atomically, when --out has
    # meanwhile become a file or a non-empty folder).
    with dir_output(out, overwrite=False, hint=_NEW_FOLDER) as tmp:
        manifest_rows = []
        for c in chosen:
            case = files[c.case_id]
            try:
                placed = _export_case(case, c.mask, tmp, root, layout, link,
                                      source_convention, convention)
            except OSError:
                if link != "hardlink":
                    raise
                # Another file system (or none that links): copy this case and the rest.
                link = used = "copy"
                placed = _export_case(case, c.mask, tmp, root, layout, link,
                                      source_convention, convention, replace=True)
            if placed is not None:
                manifest_rows.append(placed)
        dataset_path = out
        if layout == "nnunet":
            doc = json.loads((root / "dataset.json").read_text())
            doc["numTraining"] = len(chosen)
            atomic_write_text(tmp / "dataset.json", json.dumps(doc, indent=2) + "\n")
        if layout == "manifest":
            dataset_path = out / "manifest.csv"
            modalities = list(dict.fromkeys(m for row in manifest_rows for m in row[1]))
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(["case_id", *modalities, "label"])
            for case_id, images, label in manifest_rows:
                writer.writerow([case_id, *[images.get(m, "") for m in modalities], label])
            atomic_write_text(tmp / "manifest.csv", buffer.getvalue())
        info = {"session": str(Path(session_dir).resolve()), "dataset": str(dataset),
                "layout": layout, "label_convention": convention,
                "model_sha256": meta.get("model_sha256"), "link": used,
                "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "cases": {c.case_id: c.decision for c in chosen}}
        atomic_write_text(tmp / EXPORT_INFO, json.dumps(info, indent=2) + "\n")
    return ExportResult(dataset_path, layout, [c.case_id for c in chosen], used, convention)


def _export_case(case: CaseFiles, mask: Path, tmp: Path, root: Path, layout: str, link: str,
                 source_convention: str, convention: str, *, replace: bool = False):
    """Place one case's images and label under ``tmp``; a manifest row for manifests."""
    cid = case.case_id
    targets: list[tuple[Path, Path]] = []  # (source image, destination)
    row = None
    if layout in _LABEL_NAMES:
        rel = _case_relative(case, root)
        folder = tmp / (rel if rel is not None and str(rel) != "." else Path(cid))
        targets = [(p, folder / p.name) for p in case.images.values()]
        label = folder / _LABEL_NAMES[layout].format(id=cid)
    elif layout == "nnunet":
        targets = [(p, tmp / "imagesTr" / p.name) for p in case.images.values()]
        label = tmp / "labelsTr" / f"{cid}.nii.gz"
    elif layout == "hecktor":
        nested = any(p.parent.name == "imagesTr" for p in case.images.values())
        targets = [(p, tmp / ("imagesTr" if nested else "") / p.name)
                   for p in case.images.values()]
        label = tmp / ("labelsTr" if nested else "") / f"{cid}.nii.gz"
    elif layout == "manifest":
        folder = tmp / "images" / cid
        names: dict[str, str] = {}
        for modality, p in case.images.items():
            name = p.name if p.name not in names.values() else f"{modality}_{p.name}"
            names[modality] = name
            targets.append((p, folder / name))
        label = tmp / "labels" / f"{cid}.nii.gz"
        row = (cid, {m: f"images/{cid}/{n}" for m, n in names.items()}, f"labels/{cid}.nii.gz")
    else:
        raise ConfigError(f"layout {layout!r}: export not supported")
    for src, dst in targets:
        if replace and (dst.exists() or dst.is_symlink()):
            dst.unlink()
        place_file(src, dst, link)
    if replace and label.exists():
        label.unlink()
    _write_label(mask, label, source_convention, convention)
    return row
