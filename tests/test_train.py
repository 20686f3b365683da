"""Training runs: output files, metrics at w, exact resumption, folder safety and option errors."""

import json

import pytest
import torch

from crsam.checkpoint import load_checkpoint
from crsam.errors import UsageError
from crsam.train import DEFAULT_LR, DEFAULTS, evaluate, resolve_options, restore_run, train

# 500 examples (400 for training) and batches of 64 keep one epoch of CR-SAM well under a second.
TINY = {"num_samples": 500, "batch_size": 64, "epochs": 3, "seed": 1}


def tiny(**changes):
    return {**TINY, **changes}


def snapshot(folder):
    """Return every file's bytes and modification time in ``folder``."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


def without_seconds(metrics):
    return [{key: value for key, value in record.items() if key != "seconds"} for record in metrics]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A three-epoch CR-SAM run with a prior split, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("run")
    summary = train(tiny(prior_split=0.25), out=out, progress=False)
    return out, summary


def test_run_files_written(finished_run):
    out, _ = finished_run
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


def test_metrics_lines(finished_run):
    out, _ = finished_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3]
    for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"):
        assert key in records[0], key


def test_lr_follows_cosine(finished_run):
    out, _ = finished_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [record["lr"] for record in records]
    assert lrs[0] == DEFAULT_LR["mlp"]
    assert lrs[1] == pytest.approx(DEFAULT_LR["mlp"] * 0.75)
    assert lrs[2] == pytest.approx(DEFAULT_LR["mlp"] * 0.25)


def test_config_records_options(finished_run):
    out, _ = finished_run
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "crsam"
    assert config["crsam_version"]
    assert config["num_samples"] == 500
    assert config["rho"] == DEFAULTS["rho"]
    assert config["n_train"] == 400


def test_train_metrics_at_w(finished_run):
    out, summary = finished_run
    run = restore_run(out / "checkpoint.pt")
    loss, accuracy = evaluate(run.model, run.data.x_train, run.data.y_train)
    assert summary["final"]["train_loss"] == loss
    assert summary["final"]["train_acc"] == accuracy


def test_checkpoint_loads_weights_only(finished_run):
    out, _ = finished_run
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["epoch"] == 3
    assert len(payload["metrics"]) == 3


def test_prior_is_initial_weights(finished_run):
    out, _ = finished_run
    payload = load_checkpoint(out / "checkpoint.pt")
    torch.manual_seed(TINY["seed"])
    from crsam.models import build_model

    initial = build_model("mlp").state_dict()
    assert all(torch.equal(payload["prior"]["state"][key], initial[key]) for key in initial)
    assert payload["prior"]["kind"] == "init"


def test_prior_split_recorded(finished_run):
    out, _ = finished_run
    run = restore_run(out / "checkpoint.pt")
    x_bound, y_bound = run.bound_data()
    assert run.checkpoint["prior"]["split"]["n_prior"] == 100
    assert len(y_bound) == 300
    assert x_bound.shape == (300, 40)


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "crsam"])
def test_resume_matches_uninterrupted(tmp_path, optimizer):
    whole = train(tiny(optimizer=optimizer), out=tmp_path / "whole", progress=False)
    train(tiny(optimizer=optimizer), out=tmp_path / "parts", progress=False, stop_after_epoch=2)
    parts = train({}, out=tmp_path / "parts", resume=True, progress=False)

    first = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    second = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for key, value in first["model"].items():
        assert torch.equal(second["model"][key], value), key
    assert without_seconds(second["metrics"]) == without_seconds(first["metrics"])
    assert torch.equal(second["rng"]["torch"], first["rng"]["torch"])
    assert parts["epochs_completed"] == whole["epochs_completed"]


def test_resume_rewrites_metrics_file(tmp_path):
    out = tmp_path / "run"
    train(tiny(optimizer="sgd"), out=out, progress=False, stop_after_epoch=1)
    # A crash between the metrics and the checkpoint leaves an extra line behind.
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "stale": true}\n')
    train({}, out=out, resume=True, progress=False)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert "stale" not in lines[1]


def test_existing_run_not_overwritten(finished_run):
    out, _ = finished_run
    before = snapshot(out)
    with pytest.raises(UsageError, match=r"already contains a run \(checkpoint.pt, config.json, metrics.jsonl\); pass --resume"):
        train(tiny(), out=out, progress=False)
    assert snapshot(out) == before


def test_overwrite_replaces_run(tmp_path):
    out = tmp_path / "run"
    train(tiny(optimizer="sgd", epochs=1), out=out, progress=False)
    train(tiny(optimizer="sgd", epochs=2), out=out, overwrite=True, progress=False)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(UsageError, match=r"--resume found no checkpoint at .*; start a new run without --resume"):
        train({}, out=tmp_path, resume=True, progress=False)


def test_resume_with_different_flag(finished_run):
    out, _ = finished_run
    before = snapshot(out)
    with pytest.raises(UsageError, match=r"--lr 0.3 differs from the resumed run's 0.5; drop --lr"):
        train({"lr": 0.3}, out=out, resume=True, progress=False)
    assert snapshot(out) == before


def test_resume_finished_run_is_noop(finished_run):
    out, _ = finished_run
    summary = train({}, out=out, resume=True, progress=False)
    assert summary["epochs_completed"] == 3


def test_resume_and_overwrite_conflict(tmp_path):
    with pytest.raises(UsageError, match=r"--resume and --overwrite contradict each other"):
        train({}, out=tmp_path, resume=True, overwrite=True, progress=False)


def test_data_hash_mismatch(finished_run, tmp_path):
    out, _ = finished_run
    payload = load_checkpoint(out / "checkpoint.pt")
    payload["data"]["sha256"] = "f" * 64
    from crsam.checkpoint import save_checkpoint

    save_checkpoint(payload, tmp_path / "checkpoint.pt")
    with pytest.raises(UsageError, match=r"was trained on ffffffffffff\.\.\."):
        restore_run(tmp_path / "checkpoint.pt")


def test_divergence_reported(tmp_path):
    with pytest.raises(UsageError, match=r"training diverged in epoch 1"):
        train(tiny(optimizer="sgd", lr=1e12, momentum=0.0), out=tmp_path / "run", progress=False)


def test_defaults_resolved():
    config = resolve_options({})
    assert config["num_samples"] == 5000
    assert config["optimizer"] == "crsam"


@pytest.mark.parametrize("model", ["mlp", "cnn1d"])
def test_default_lr_per_model(model):
    assert resolve_options({"model": model})["lr"] == DEFAULT_LR[model]


def test_explicit_lr_kept():
    assert resolve_options({"model": "cnn1d", "lr": 0.01})["lr"] == 0.01


def test_data_seed_draws_fresh_sample(tmp_path):
    """Another --data-seed generates other examples, and the run records the seed and the hash."""
    default = train(tiny(epochs=1), out=tmp_path / "default", progress=False)
    fresh = train(tiny(epochs=1, data_seed=7), out=tmp_path / "fresh", progress=False)
    default_config = json.loads((tmp_path / "default" / "config.json").read_text())
    fresh_config = json.loads((tmp_path / "fresh" / "config.json").read_text())
    assert default["config"]["data_seed"] == DEFAULTS["data_seed"]
    assert fresh["config"]["data_seed"] == 7
    assert fresh_config["data_sha256"] != default_config["data_sha256"]
    assert restore_run(tmp_path / "fresh" / "checkpoint.pt").data.sha256 == fresh_config["data_sha256"]


def test_sgd_drops_sharpness_options():
    config = resolve_options({"optimizer": "sgd"})
    assert config["rho"] is None
    assert config["alpha"] is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rho": -0.1}, r"--rho -0.1 is negative; pass a perturbation radius >= 0 such as 0.1"),
        ({"alpha": float("nan")}, r"--alpha nan is not a finite number"),
        ({"lr": 0.0}, r"--lr 0.0 must be greater than 0; pass a learning rate"),
        ({"momentum": 1.0}, r"--momentum 1.0 must be below 1"),
        ({"weight_decay": -1.0}, r"--weight-decay -1.0 is negative"),
        ({"batch_size": 0}, r"--batch-size 0 is below 1"),
        ({"epochs": 0}, r"--epochs 0 is below 1"),
        ({"seed": -1}, r"--seed -1 is below 0"),
        ({"data_seed": -1}, r"--data-seed -1 is below 0"),
        ({"data_seed": 2**32}, r"--data-seed 4294967296 is too large; pass a seed below 2\*\*32"),
        ({"num_samples": 5}, r"--num-samples 5 is below 10"),
        ({"optimizer": "adam"}, r"--optimizer 'adam' is unknown; choose one of sgd, sam, crsam"),
        ({"optimizer": "sgd", "rho": 0.1}, r"--rho 0.1 has no effect with --optimizer sgd; drop --rho or pass --optimizer sam or crsam"),
        ({"optimizer": "sam", "beta": 0.1}, r"--beta 0.1 has no effect with --optimizer sam; drop --beta or pass --optimizer crsam"),
        ({"model": "resnet18"}, r"--model resnet18 takes 3x32x32 images, but --data mnist1d has sequences of length 40; "
                                r"pass --model mlp or cnn1d, or --data cifar10, cifar100 or imagefolder with --data-dir"),
        ({"data": "cifar100"}, r"--model mlp takes MNIST-1D sequences, not the images of --data cifar100; "
                               r"pass --model resnet18, resnet50, wrn28_10, vit"),
        ({"data": "cifar10", "model": "cnn1d"}, r"--model cnn1d takes MNIST-1D sequences"),
        ({"prior_split": 1.0}, r"--prior-split 1.0 is outside \(0, 1\)"),
        ({"perturbation": "local", "optimizer": "sgd"}, r"--perturbation local has no effect with --optimizer sgd"),
        ({"perturbation": "ball"}, r"--perturbation 'ball' is unknown; choose one of global, local"),
        ({"parallel": True, "optimizer": "sgd"}, r"--parallel applies to --optimizer crsam only"),
        ({"parallel": True, "accumulation_steps": 2}, r"--parallel cannot be combined with --accumulation-steps"),
        ({"parallel": True, "amp": "bf16"}, r"--parallel cannot be combined with --amp"),
        ({"parallel": True, "compile": True}, r"--parallel cannot be combined with --compile"),
        ({"clip_grad_norm": -1.0}, r"--clip-grad-norm -1.0 must be greater than 0"),
        ({"clip_grad_norm": float("inf")}, r"--clip-grad-norm inf is not a finite number"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(UsageError, match=message):
        resolve_options(options)


@pytest.mark.parametrize("optimizer", ["sam", "crsam"])
def test_local_perturbation_equals_global_in_one_process(tmp_path, optimizer):
    # Without DDP every process is the only one, so its own gradient is the averaged gradient.
    train(tiny(optimizer=optimizer, epochs=2), out=tmp_path / "global", progress=False)
    train(tiny(optimizer=optimizer, epochs=2, perturbation="local"), out=tmp_path / "local", progress=False)
    first = load_checkpoint(tmp_path / "global" / "checkpoint.pt")
    second = load_checkpoint(tmp_path / "local" / "checkpoint.pt")
    assert second["config"]["perturbation"] == "local"
    for key, value in first["model"].items():
        assert torch.equal(second["model"][key], value), key
    assert without_seconds(second["metrics"]) == without_seconds(first["metrics"])


def test_local_perturbation_reaches_optimizer():
    from crsam.models import build_model
    from crsam.train import build_optimizer

    optimizer = build_optimizer(resolve_options({"perturbation": "local"}), build_model("mlp"))
    assert optimizer.perturbation == "local"


def test_resume_cuda_run_on_cpu(tmp_path, monkeypatch):
    """A run stored with --device cuda resumes with --device cpu, and without it the error names that flag."""
    from crsam.checkpoint import save_checkpoint

    out = tmp_path / "run"
    train(tiny(), out=out, progress=False, stop_after_epoch=1)
    payload = load_checkpoint(out / "checkpoint.pt")
    payload["config"]["device"] = "cuda"
    save_checkpoint(payload, out / "checkpoint.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(UsageError, match=r"trained with --device cuda, and torch finds no CUDA device here; "
                                         r"pass --device cpu \(or auto\) with --resume"):
        train({}, out=out, resume=True, progress=False)
    summary = train({"device": "cpu"}, out=out, resume=True, progress=False)
    assert summary["epochs_completed"] == TINY["epochs"]
