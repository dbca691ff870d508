"""Cohort prediction (issue 14): reading ahead and writing behind gives the same files as the
one-case-at-a-time loop; existing outputs are refused before anything runs; a bad case stops the
cohort with the cases before it written whole."""

import hashlib
import shutil

import pytest

from ciml_core.checkpoint import load_checkpoint
from ciml_core.cli import main
from ciml_core.cohort import predict_cohort, prediction_paths
from ciml_core.data.layouts import discover_cases
from ciml_core.errors import InputDataError
from ciml_core.infer import InferenceSettings

# Native spacing: the 48x48x32 phantoms (4 mm) run as one window each instead of being resampled
# to the demo's 2 mm; what is tested here is the loop around predict_case.
CPU = InferenceSettings(device="cpu", native_spacing=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort") / "data"
    assert main(["phantom", "--kind", "brats", "--cases", "3", "--out", str(root),
                 "--shape", "48", "48", "32", "--seed", "5000"]) == 0
    return root


@pytest.fixture(scope="module")
def demo():
    return load_checkpoint("demo", device="cpu")


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_prefetch_writes_the_same_files_as_the_sequential_loop(cohort, demo, tmp_path):
    cases = discover_cases(cohort)
    done = []
    sequential = predict_cohort(demo, cases, tmp_path / "seq", CPU, prefetch=False,
                                probabilities=True)
    overlapped = predict_cohort(demo, cases, tmp_path / "pre", CPU, prefetch=True,
                                probabilities=True, case_done=done.append)
    assert done == [c.case_id for c in cases]
    assert sequential.cases == overlapped.cases == 3 and len(overlapped.files) == 3 * 4
    assert digests(tmp_path / "seq") == digests(tmp_path / "pre")
    assert len(digests(tmp_path / "pre")) == 12
    assert overlapped.cases_per_hour == pytest.approx(3 * 3600 / overlapped.seconds)


def test_an_existing_output_is_refused_before_any_case_runs(cohort, demo, tmp_path):
    cases = discover_cases(cohort)
    out = tmp_path / "out"
    out.mkdir()
    last = prediction_paths(cases[-1].case_id, demo.regions, out, False)[0]
    last.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=last.name):
        predict_cohort(demo, cases, out, CPU)
    assert [p.name for p in out.iterdir()] == [last.name] and last.read_bytes() == b"keep me"


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_bad_case_stops_the_cohort_after_writing_the_cases_before_it(cohort, demo, tmp_path,
                                                                       prefetch):
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    cases = discover_cases(data)
    bad = cases[1]
    bad.images["t2"].write_bytes(b"\x1f\x8b broken gzip")
    out = tmp_path / "out"
    with pytest.raises(InputDataError, match=bad.images["t2"].name):
        predict_cohort(demo, cases, out, CPU, prefetch=prefetch)
    # case 0 is written whole, nothing of cases 1 and 2, no temporary file left behind
    assert sorted(p.name for p in out.iterdir()) == [f"{cases[0].case_id}.nii.gz"]


def test_cli_reports_cases_per_hour_and_no_prefetch_gives_the_same_labels(cohort, tmp_path,
                                                                           capsys):
    assert main(["predict", str(cohort), "--out", str(tmp_path / "a"), "--device", "cpu",
                 "--native-spacing"]) == 0
    printed = capsys.readouterr().out
    assert "3 case(s) in" in printed and "cases/hour" in printed
    assert main(["predict", str(cohort), "--out", str(tmp_path / "b"), "--device", "cpu",
                 "--native-spacing", "--no-prefetch"]) == 0
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
