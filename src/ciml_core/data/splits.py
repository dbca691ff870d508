"""Deterministic k-fold cross-validation splits, kept in ``splits.json`` like nnU-Net's."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ciml_core.errors import ConfigError, InputDataError
from ciml_core.io import atomic_write_text


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
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputDataError(f"{path}: not readable JSON ({err}); delete the file to "
                                 "re-split") from err
        if not isinstance(splits, list) or not all(
                isinstance(s, dict) and all(isinstance(s.get(p), list) for p in ("train", "val"))
                for s in splits):
            raise InputDataError(f"{path}: expected a list of {{'train': [...], 'val': [...]}} "
                                 "folds; delete the file to re-split")
        known = {c for s in splits for part in ("train", "val") for c in s[part]}
        unknown = sorted(set(case_ids) - known)
        if unknown:
            raise InputDataError(
                f"{path}: cases {unknown[:5]} are not in the existing splits; delete the file to "
                "re-split, or train on the same data"
            )
        return splits
    splits = make_splits(case_ids, folds)
    atomic_write_text(path, json.dumps(splits, indent=2) + "\n", overwrite=True)
    return splits


def fold_cases(splits: list[dict], fold: int) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) of ``fold``; fold -1 trains on every case (no validation)."""
    if fold == -1:
        everything = sorted({c for s in splits for part in ("train", "val") for c in s[part]})
        return everything, []
    if not 0 <= fold < len(splits):
        raise ConfigError(f"--fold {fold} is out of range; expected 0..{len(splits) - 1} or -1 (all)")
    return list(splits[fold]["train"]), list(splits[fold]["val"])
