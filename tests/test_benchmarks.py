"""The benchmark scripts' arithmetic: the accuracy table and the FLOP-matched baseline width."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(run: str, seed: int, dice: tuple[float, float, float], hd95: float = 2.0) -> dict:
    return {"run": run, "seed": seed,
            "mean": {r: {"dice": d, "hd95": hd95} for r, d in zip(("WT", "TC", "ET"), dice,
                                                                   strict=True)}}


def test_accuracy_table_means_sds_and_collapse_count():
    accuracy = _load("accuracy")
    results = [_result("full", 0, (0.9, 0.8, 0.3)), _result("full", 1, (0.9, 0.8, 0.9), 4.0),
               _result("baseline", 0, (0.5, 0.5, 0.7))]
    lines = accuracy.table(results, "budget").splitlines()
    assert lines[0] == "budget"
    rows = {line.split(" | ")[1]: line.split(" | ") for line in lines[4:]}
    assert list(rows) == [accuracy.LABELS["baseline"], accuracy.LABELS["full"]]  # RUNS order
    full = rows[accuracy.LABELS["full"]]
    # Dice in %, mean +- sample sd over seeds; mean column = mean of the three regions
    assert full[2:6] == ["90.0 ± 0.0", "80.0 ± 0.0", "60.0 ± 42.4", "76.7 ± 14.1"]
    assert full[6] == "3.0 ± 1.4"  # HD95 WT: (2 + 4) / 2
    assert full[10:] == ["1/2", "0,1 |"]  # seed 0 has ET Dice 0.3 < 0.6
    baseline = rows[accuracy.LABELS["baseline"]]
    assert baseline[2] == "50.0" and baseline[10] == "0/1"  # one seed: no sd


def test_dynunet_width_matching_ciml_flops():
    accuracy = _load("accuracy")
    # CIML C=8 is 18.4 GFLOP per 64^3 window, DynUNet C=6 17.2 (docs/performance.md)
    assert accuracy.flop_matched_dynunet_width(8, 32) == 6


def test_speed_report_renders_a_saved_run():
    speed = _load("speed")
    width = 4
    case = {"seconds": 10.0, "windows": 8, "gflop": 100.0, "gflops_per_s": 10.0, "peak_mib": 900.0}
    train = {"seconds": 2.0, "gflop": 20.0, "gflops_per_s": 10.0, "peak_mib": 1500.0}
    result = {"machine": "x86_64", "torch": "2.13.0", "threads": 2, "peak_gflops": 100.0,
              "peak_how": "test", "patch": 32, "case_shape": [64, 64, 48],
              "layers": [{"level": 0, "size": 32, "channels": width, "conv_separate": 0.002,
                          "conv_grouped": 0.001}],
              "window": {"CIML": {"plain": {"seconds": 0.25}}},
              "rows": [{"network": "CIML", "gflop_per_window": 12.5, "case": case, "train": train}],
              "ratios": ["CIML / DynUNet: whole case x1.00"]}
    text = speed.report(result)
    assert "| 0 | 32^3 | 4 | 2.0 | 1.0 | - | - |" in text
    assert "| CIML | 250 | - | - | - | - |" in text
    assert "| CIML | 12.5 | 2.00 | - | 10 (10%) | 10.0 | - | 10 (10%) | 1500 / 900 |" in text
    assert text.rstrip().endswith("- CIML / DynUNet: whole case x1.00")


def test_paired_comparison_of_two_runs_on_the_same_cases():
    accuracy = _load("accuracy")

    def run(name, seed, per_case):
        return {"run": name, "seed": seed, "per_case": {
            c: {r: {"dice": d, "hd95": 0.0} for r in ("WT", "TC", "ET")}
            for c, d in per_case.items()}}

    results = [run("full", 0, {"a": 0.9, "b": 0.8}), run("full", 1, {"a": 0.7, "b": 0.6}),
               run("dynunet", 0, {"a": 0.8, "b": 0.8}), run("dynunet", 1, {"a": 0.6, "b": 0.7})]
    c = accuracy.paired_comparison(results, "full", "dynunet", resamples=2000)
    # differences per (seed, case): +0.1, 0, +0.1, -0.1 -> mean +0.025
    assert c["pairs"] == 4 and c["seeds"] == [0, 1]
    assert abs(c["mean_difference"] - 0.025) < 1e-12
    assert -0.1 <= c["ci95"][0] <= 0.025 <= c["ci95"][1] <= 0.1
    assert 0 < c["wilcoxon_p"] <= 1
    assert accuracy.paired_comparison(results, "full", "baseline") is None
    assert "+2.50" in accuracy.comparison_table(results)
