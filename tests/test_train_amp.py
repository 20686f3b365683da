"""Mixed precision in training runs: bf16 and fp16 autocast, the loss scaler and exact resumption."""

import pytest
import torch

from crsam.checkpoint import load_checkpoint
from crsam.errors import UsageError
from crsam.train import resolve_options, train

# 500 MNIST-1D examples (400 for training) in batches of 64: 7 steps per epoch.
TINY = {"num_samples": 500, "batch_size": 64, "epochs": 3, "seed": 2, "device": "cpu"}


def timeless(metrics):
    return [{key: value for key, value in record.items() if key != "seconds"} for record in metrics]


def assert_same_run(first, second):
    for key, value in first["model"].items():
        assert torch.equal(second["model"][key], value), key
    assert torch.equal(second["rng"]["torch"], first["rng"]["torch"])
    assert timeless(second["metrics"]) == timeless(first["metrics"])


def whole_and_resumed(tmp_path, options):
    """Train ``options`` in one go and in two parts; return both final checkpoints."""
    train(options, out=tmp_path / "whole", progress=False)
    train(options, out=tmp_path / "parts", progress=False, stop_after_epoch=1)
    train({}, out=tmp_path / "parts", resume=True, progress=False)
    return load_checkpoint(tmp_path / "whole" / "checkpoint.pt"), load_checkpoint(tmp_path / "parts" / "checkpoint.pt")


@pytest.mark.parametrize("optimizer", ["sgd", "crsam"])
def test_bf16_trains_and_resumes(tmp_path, optimizer):
    whole, parts = whole_and_resumed(tmp_path, {**TINY, "optimizer": optimizer, "amp": "bf16"})
    assert_same_run(whole, parts)
    losses = [record["train_loss"] for record in whole["metrics"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    # Chance level on ten classes is ln 10 = 2.30; three epochs must get well below it.
    assert losses[-1] < 2.0
    assert whole["scaler"] is None


def test_bf16_changes_the_arithmetic(tmp_path):
    # Autocast must actually run the layers in bfloat16 (8 significant bits), so the weights differ
    # from a float32 run after the first epoch.
    train({**TINY, "epochs": 1}, out=tmp_path / "fp32", progress=False)
    train({**TINY, "epochs": 1, "amp": "bf16"}, out=tmp_path / "bf16", progress=False)
    fp32 = load_checkpoint(tmp_path / "fp32" / "checkpoint.pt")["model"]
    bf16 = load_checkpoint(tmp_path / "bf16" / "checkpoint.pt")["model"]
    assert any(not torch.equal(fp32[key], bf16[key]) for key in fp32)
    # Both stay float32 weights: autocast changes the computation, not the stored parameters.
    assert all(tensor.dtype == torch.float32 for tensor in bf16.values())


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "crsam"])
def test_fp16_scaler_round_trip(tmp_path, optimizer):
    whole, parts = whole_and_resumed(tmp_path, {**TINY, "optimizer": optimizer, "amp": "fp16"})
    assert_same_run(whole, parts)
    assert parts["scaler"] == whole["scaler"]
    assert set(whole["scaler"]) >= {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    # 21 steps leave the scale at its start of 2**16 unless an overflow halved it, and the growth
    # tracker counts the steps since the last change of scale, at most 21.
    assert 0 < whole["scaler"]["scale"] <= 2.0**16
    assert 0 < whole["scaler"]["_growth_tracker"] <= 21


def test_fp16_resume_restores_scale(tmp_path):
    # A scale that differs from the fresh scaler's must come back from the checkpoint.
    out = tmp_path / "run"
    train({**TINY, "amp": "fp16"}, out=out, progress=False, stop_after_epoch=1)
    payload = load_checkpoint(out / "checkpoint.pt")
    payload["scaler"]["scale"] = 1024.0
    torch.save(payload, out / "checkpoint.pt")
    train({}, out=out, resume=True, progress=False, stop_after_epoch=2)
    resumed = load_checkpoint(out / "checkpoint.pt")["scaler"]
    # 7 more steps without overflow keep 1024; an overflow could only lower it.
    assert resumed["scale"] <= 1024.0


def test_fp16_checkpoint_without_scaler(tmp_path):
    out = tmp_path / "run"
    train({**TINY, "amp": "fp16"}, out=out, progress=False, stop_after_epoch=1)
    payload = load_checkpoint(out / "checkpoint.pt")
    payload["scaler"] = None
    torch.save(payload, out / "checkpoint.pt")
    with pytest.raises(UsageError, match=r"needs the loss scaler's state, and the checkpoint has none"):
        train({}, out=out, resume=True, progress=False)


def test_unknown_amp_rejected():
    with pytest.raises(UsageError, match=r"--amp 'fp8' is unknown; choose one of bf16, fp16, or drop --amp"):
        resolve_options({"amp": "fp8"})
