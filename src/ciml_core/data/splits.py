"""Deterministic k-fold cross-validation splits, kept in ``splits.json`` like nnU-Net's."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ciml_core.errors import ConfigError, InputDataError


def make_splits(case_ids: Sequence[str], folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """Shuffle the sorted case ids with ``seed`` and deal them into ``folds`` validation sets.

    With fewer cases than folds, the folds that would get no validation case reuse the first
    cases so that every fold still validates on something (documented, not silently skipped).
    """
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise InputDataError(f"need at least 2 cases for a train/validation split, found {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    splits = []
    for k in range(folds):
        val = shuffled[k::folds] or [shuffled[k % len(shuffled)]]
        train = [c for c in ids if c not in val]
        splits.append({"train": train, "val": sorted(val)})
    return splits


def load_or_make_splits(path: Path, case_ids: Sequence[str], folds: int = 5) -> list[dict]:
    """Read ``splits.json`` if it exists (checking it covers ``case_ids``), else create it."""
    if path.is_file():
        splits = json.loads(path.read_text())
        known = {c for s in splits for part in ("train", "val") for c in s[part]}
        unknown = sorted(set(case_ids) - known)
        if unknown:
            raise InputDataError(
                f"{path}: cases {unknown[:5]} are not in the existing splits; delete the file to "
                "re-split, or train on the same data"
            )
        return splits
    splits = make_splits(case_ids, folds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(splits, indent=2) + "\n")
    os.replace(tmp, path)
    return splits


def fold_cases(splits: list[dict], fold: int) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) of ``fold``; fold -1 trains on every case (no validation)."""
    if fold == -1:
        everything = sorted({c for s in splits for part in ("train", "val") for c in s[part]})
        return everything, []
    if not 0 <= fold < len(splits):
        raise ConfigError(f"--fold {fold} is out of range; expected 0..{len(splits) - 1} or -1 (all)")
    return list(splits[fold]["train"]), list(splits[fold]["val"])
