"""Predict a cohort of cases: the next case is read and the previous one written while the
current one computes.

Reading a case (gzip-decompressing four NIfTI files, validating them) and writing its label map
take seconds that a one-case-at-a-time loop adds to every case's compute. Here one reader
thread loads case i + 1 and one writer thread writes case i - 1 while case i runs through the
network (zlib, numpy and torch release the GIL). Outputs are the same as the sequential loop's:
``tests/test_cohort.py`` compares them byte for byte, and ``benchmarks/cohort_predict.py`` gives
the wall-time ratio. Under torchrun each rank runs this over its own share of the cases.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ciml_core.checkpoint import LoadedModel
from ciml_core.data.dataset import LoadedCase, load_case
from ciml_core.data.layouts import CaseFiles
from ciml_core.infer import (
    InferenceSettings,
    ProgressFn,
    input_warnings,
    predict_case,
    write_prediction,
)
from ciml_core.io import output_path, refuse_existing


def prediction_paths(case_id: str, regions: Sequence[str], out: Path,
                     probabilities: bool) -> list[Path]:
    """The files :func:`~ciml_core.infer.write_prediction` writes for a case."""
    names = [f"{case_id}.nii.gz", *(f"{case_id}_prob_{r}.nii.gz" for r in regions
                                    if probabilities)]
    return [output_path(out, name) for name in names]


@dataclass
class CohortReport:
    """What :func:`predict_cohort` did."""

    cases: int = 0
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cases_per_hour(self) -> float:
        return 3600.0 * self.cases / self.seconds if self.seconds > 0 else float("nan")


def _loaded_cases(cases: Sequence[CaseFiles], modalities: Sequence[str],
                  prefetch: bool) -> Iterator[tuple[CaseFiles, LoadedCase]]:
    """The cases loaded in order; with ``prefetch`` the next one loads while the caller works."""
    if not prefetch:
        for case in cases:
            yield case, load_case(case, modalities)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ciml-read") as reader:
        pending: Future | None = reader.submit(load_case, cases[0], modalities) if cases else None
        for i, case in enumerate(cases):
            loaded = pending.result()
            pending = (reader.submit(load_case, cases[i + 1], modalities)
                       if i + 1 < len(cases) else None)
            yield case, loaded


def predict_cohort(
    loaded: LoadedModel,
    cases: Sequence[CaseFiles],
    out: Path,
    settings: InferenceSettings | None = None,
    *,
    label_convention: Callable[[CaseFiles], str | None] | None = None,
    probabilities: bool = False,
    overwrite: bool = False,
    prefetch: bool = True,
    warn: Callable[[str], None] | None = None,
    case_progress: Callable[[str], ProgressFn | None] | None = None,
    case_done: Callable[[str], None] | None = None,
) -> CohortReport:
    """Predict every case of ``cases`` into ``out`` (``<case>.nii.gz``, and the probability maps
    with ``probabilities``), reading ahead and writing behind when ``prefetch``.

    ``label_convention(case)`` picks each case's output labels (None: the model's);
    ``warn`` receives :func:`~ciml_core.infer.input_warnings`; ``case_progress(case_id)`` may
    return a window-progress callback for that case; ``case_done(case_id)`` is called when its
    prediction is computed (its write may still run).

    Raises:
        FileExistsError: an output exists and ``overwrite`` is False; checked for every case
            before anything is computed.
        CimlError: a case cannot be read or predicted; the cases before it are written.
    """
    targets = [p for c in cases
               for p in prediction_paths(c.case_id, loaded.regions, out, probabilities)]
    refuse_existing(targets, overwrite)
    report = CohortReport()
    t0 = time.perf_counter()
    writes: list[Future] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ciml-write") as writer:
        try:
            for case_files, case in _loaded_cases(cases, loaded.modalities, prefetch):
                _raise_failed(writes)  # a failed write stops the cohort at the next case
                for warning in input_warnings(case, loaded):
                    if warn is not None:
                        warn(warning)
                progress = case_progress(case_files.case_id) if case_progress else None
                convention = label_convention(case_files) if label_convention else None
                prediction = predict_case(loaded, case, settings, progress=progress,
                                          label_convention=convention)
                write = (writer.submit if prefetch else _now)(
                    write_prediction, prediction, case, out, probabilities=probabilities,
                    overwrite=overwrite)
                writes.append(write)
                if case_done is not None:
                    case_done(case_files.case_id)
                del prediction, case  # the writer holds what it still needs
        finally:
            # Every write started is finished (each is atomic) before an error propagates.
            for write in writes:
                write.exception()
    for write in writes:
        report.files += write.result()
    report.cases = len(writes)
    report.seconds = time.perf_counter() - t0
    return report


def _raise_failed(writes: list[Future]) -> None:
    for write in writes:
        if write.done() and write.exception() is not None:
            raise write.exception()


def _now(fn, *args, **kwargs) -> Future:
    """Run ``fn`` at once; its result as a completed Future (the sequential path)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as err:  # noqa: BLE001 - re-raised by result(), like a thread's
        future.set_exception(err)
    return future
