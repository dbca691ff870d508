"""Exact resume: a run stopped by SIGINT, SIGTERM or a kill (at a step boundary, mid-epoch or
during validation) and resumed, in its own folder or a copy of it, ends with bit-identical
weights, optimiser state and learning rates to the run that was never stopped."""

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ciml_core.data.phantoms import write_phantom_dataset
from ciml_core.errors import ConfigError
from ciml_core.train import (
    TrainConfig,
    TrainingInterrupted,
    lr_factor,
    poly_lr,
    resume_config,
    train,
)

EPOCHS, ITERS = 3, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "data"
    write_phantom_dataset("brats", 3, root, seed=11, shape=(32, 32, 32))
    return root


def _config(out: Path, data: Path, variant: str) -> TrainConfig:
    # message dropout and warm-up on: the resumed run must also replay the sampled parts
    return TrainConfig(out=out, data=data, fold=0, epochs=EPOCHS, iters_per_epoch=ITERS, patch=16,
                       width=2, batch=2, variant=variant, lr=1e-3, device="cpu", workers=0,
                       val_every=2, seed=3, message_dropout=0.3, warmup_epochs=1,
                       region_weighting="region", bn_recalibration=2)


class Killed(Exception):
    """Stands in for SIGKILL: the process ends without any chance to save."""


def _final_state(run: Path) -> tuple[dict, dict]:
    weights = load_file(str(run / "latest" / "model.safetensors"))
    state = torch.load(run / "latest" / "training_state.pt", weights_only=True)
    return weights, state


def _assert_identical(run: Path, reference: Path) -> None:
    weights, state = _final_state(run)
    ref_weights, ref_state = _final_state(reference)
    assert weights.keys() == ref_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, ref_weights[name]), name
    assert state["scheduler"]["_last_lr"] == ref_state["scheduler"]["_last_lr"]
    assert (state["epoch"], state["step"]) == (ref_state["epoch"], ref_state["step"]) == (EPOCHS, 0)
    for key, moments in state["optimizer"]["state"].items():
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[m], ref_state["optimizer"]["state"][key][m])


@pytest.fixture(scope="module", params=["full", "baseline"])
def reference(request, data, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp(f"ref_{request.param}") / "run"
    train(_config(out, data, request.param))
    return request.param, out


def _signal_at(signum: int, event: str, epoch: int, step: int):
    def hook(e: str, ep: int, st: int) -> None:
        if (e, ep, st) == (event, epoch, step):
            os.kill(os.getpid(), signum)
    return hook


def _kill_at(event: str, epoch: int, step: int):
    def hook(e: str, ep: int, st: int) -> None:
        if (e, ep, st) == (event, epoch, step):
            raise Killed
    return hook


@pytest.mark.parametrize("stop", [
    ("SIGINT", "step", 1, 1),        # mid-epoch, at a step boundary
    ("SIGTERM", "step", 0, 2),
    ("SIGTERM", "validate", 1, 3),   # during end-of-epoch validation
    ("SIGINT", "saved", 2, 0),       # right after an epoch's checkpoint
    ("KILL", "step", 2, 2),          # killed mid-epoch: resumes from the last epoch's checkpoint
    ("KILL", "saved", 1, 0),
])
def test_interrupted_and_resumed_run_is_bit_identical(reference, data, tmp_path, stop):
    variant, ref = reference
    kind, event, epoch, step = stop
    out = tmp_path / "run"
    if kind == "KILL":
        with pytest.raises(Killed):
            train(_config(out, data, variant), hook=_kill_at(event, epoch, step))
    else:
        with pytest.raises(TrainingInterrupted):
            train(_config(out, data, variant),
                  hook=_signal_at(getattr(signal, kind), event, epoch, step))
        state = torch.load(out / "latest" / "training_state.pt", weights_only=True)
        expected = (epoch + 1, 0) if event == "validate" else (epoch, step)
        assert (state["epoch"], state["step"]) == expected
    # Resume in a copy of the run folder: the copy continues, the original stays as it was.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    before = (out / "latest" / "model.safetensors").read_bytes()
    train(resume_config(moved, device="cpu", workers=0))
    assert (out / "latest" / "model.safetensors").read_bytes() == before
    _assert_identical(moved, ref)


def test_resume_refuses_changed_settings_and_keeps_its_own_schedule(reference, data, tmp_path):
    variant, ref = reference
    with pytest.raises(ConfigError, match=r"epochs: run has 3, given 5"):
        resume_config(ref, epochs=5)
    with pytest.raises(ConfigError, match="data: run has"):
        resume_config(ref, data=tmp_path / "other")
    with pytest.raises(ConfigError, match="message_dropout"):
        resume_config(ref, message_dropout=0.0)  # equal to the default: still a change
    cfg = resume_config(ref, device="cpu", workers=1, epochs=EPOCHS)
    assert (cfg.out, cfg.workers, cfg.variant, cfg.resume) == (ref, 1, variant, True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        resume_config(tmp_path / "broken")
    with pytest.raises(ConfigError, match="nothing to resume"):
        resume_config(tmp_path / "empty")


def test_learning_rate_schedule_is_clamped_and_warms_up():
    assert poly_lr(10, 10) == 0.0 and poly_lr(12, 10) == 0.0  # never negative or complex
    assert lr_factor(0, 10, warmup_epochs=3) == pytest.approx(0.25 * poly_lr(0, 10))
    assert lr_factor(3, 10, warmup_epochs=3) == pytest.approx(poly_lr(3, 10))
    assert lr_factor(0, 10) == 1.0


def test_metrics_log_has_one_line_per_epoch_after_interruptions(reference, data, tmp_path):
    variant, _ = reference
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(_config(out, data, variant), hook=_signal_at(signal.SIGINT, "step", 1, 1))
    train(resume_config(out, device="cpu", workers=0))
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_augmentations_on_the_device_resume_bit_identically(data, tmp_path):
    # the batch augmentations are seeded by (seed, epoch, step, rank), not by a global stream
    def config(out: Path, **kw) -> TrainConfig:
        cfg = _config(out, data, "full")
        cfg.augment_on_device = True
        return dataclasses.replace(cfg, **kw)

    train(config(tmp_path / "ref"))
    with pytest.raises(TrainingInterrupted):
        train(config(tmp_path / "run"), hook=_signal_at(signal.SIGINT, "step", 1, 2))
    train(resume_config(tmp_path / "run", device="cpu", workers=0))
    _assert_identical(tmp_path / "run", tmp_path / "ref")
    # and they do augment: without any augmentation the same run ends elsewhere
    train(config(tmp_path / "plain", augment=False))
    plain, _ = _final_state(tmp_path / "plain")
    weights, _ = _final_state(tmp_path / "ref")
    assert any(not torch.equal(weights[k], plain[k]) for k in weights)


def test_fused_and_unfused_training_follow_the_same_path(data, tmp_path):
    # the fused training network has the unfused one's gradients (test_fused_training: equal in
    # float64); in float32 the two runs' losses agree to rounding over an epoch of Adam steps
    runs = {}
    for fused in (True, False):
        cfg = dataclasses.replace(_config(tmp_path / str(fused), data, "full"), epochs=1,
                                  iters_per_epoch=6, bn_recalibration=0, fused=fused)
        train(cfg)
        record = json.loads((cfg.out / "metrics.jsonl").read_text().splitlines()[-1])
        runs[fused] = record, _final_state(cfg.out)[0]
    (fused_log, fused_w), (plain_log, plain_w) = runs[True], runs[False]
    for term in ("dice", "bce", "kl", "total"):
        assert fused_log[term] == pytest.approx(plain_log[term], rel=1e-5), term
    assert fused_log["total"] != plain_log["total"]  # two code paths did run
    drift = torch.cat([(fused_w[k].float() - plain_w[k].float()).abs().flatten()
                       for k in fused_w]).mean().item()
    assert drift < 1e-4
    assert json.loads((tmp_path / "False" / "train_config.json").read_text())["fused"] is False
