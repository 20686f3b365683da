"""Curvature tracking in training runs: values, tracked epochs, seeds, resumption and bad options."""

import json

import pytest
import torch

from crsam.checkpoint import load_checkpoint
from crsam.cli import main
from crsam.curvature import curvature_report
from crsam.errors import UsageError
from crsam.tracking import (
    CURVATURE_BATCH_SIZE,
    CURVATURE_METHOD,
    CURVATURE_PROBES,
    curvature_seed,
    curvature_subset_indices,
    is_tracked_epoch,
)
from crsam.train import resolve_options, restore_run, train

# 500 MNIST-1D examples (400 train, 100 test). Curvature every 2 epochs of 3 tracks epochs 2 and
# 3 (the last). 60 examples per subset keep a measurement well under a second, and the test split
# of 100 is still subsampled.
TRACKED = {"num_samples": 500, "batch_size": 64, "epochs": 3, "seed": 1, "track_curvature": 2,
           "curvature_samples": 60}
CURVATURE_KEYS = {
    f"curvature_{split}_{name}"
    for split in ("train", "test")
    for name in ("trace", "trace_stderr", "trace_probes", "top_eigenvalue", "grad_norm", "normalized_trace",
                 "loss", "examples")
} | {"curvature_seconds"}


def timeless(metrics):
    """Drop the wall times, the only entries that differ between equal runs."""
    return [{key: value for key, value in record.items() if key not in ("seconds", "curvature_seconds")}
            for record in metrics]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tracked run trained in one go, and the same run stopped after epoch 2 and resumed."""
    root = tmp_path_factory.mktemp("tracked")
    train(TRACKED, out=root / "whole", progress=False)
    train(TRACKED, out=root / "parts", progress=False, stop_after_epoch=2)
    at_epoch_2 = load_checkpoint(root / "parts" / "checkpoint.pt")
    torch.save(at_epoch_2, root / "epoch2.pt")
    train({}, out=root / "parts", resume=True, progress=False)
    return root


def direct_report(checkpoint_path, split, epoch):
    """Measure a checkpoint's curvature with curvature_report, the code of 'crsam curvature'."""
    run = restore_run(checkpoint_path)
    if split == "train":
        inputs, targets = run.data.x_train, run.data.y_train
    else:
        inputs, targets = run.data.x_test, run.data.y_test
    indices = curvature_subset_indices(len(targets), TRACKED["curvature_samples"], seed=TRACKED["seed"], split=split)
    return curvature_report(
        run.model, inputs[indices], targets[indices], method=CURVATURE_METHOD, probes=CURVATURE_PROBES,
        batch_size=CURVATURE_BATCH_SIZE, seed=curvature_seed(TRACKED["seed"], epoch), split=split,
    )


def test_keys_only_on_tracked_epochs(runs):
    records = read_metrics(runs / "whole")
    assert [record["epoch"] for record in records] == [1, 2, 3]
    assert not CURVATURE_KEYS & set(records[0])
    assert CURVATURE_KEYS <= set(records[1])
    assert CURVATURE_KEYS <= set(records[2])


@pytest.mark.parametrize(("checkpoint", "epoch"), [("epoch2.pt", 2), ("whole/checkpoint.pt", 3)])
@pytest.mark.parametrize("split", ["train", "test"])
def test_logged_values_equal_direct_report(runs, checkpoint, epoch, split):
    # Same weights, subset, seed and batch size on the same machine: the figures agree bit for bit.
    record = read_metrics(runs / "whole")[epoch - 1]
    report = direct_report(runs / checkpoint, split, epoch)
    prefix = f"curvature_{split}_"
    assert record[prefix + "trace"] == report["trace"]["estimate"]
    assert record[prefix + "trace_stderr"] == report["trace"]["stderr"]
    assert record[prefix + "trace_probes"] == report["trace"]["probes"] == CURVATURE_PROBES
    assert record[prefix + "top_eigenvalue"] == report["top_eigenvalue"]
    assert record[prefix + "grad_norm"] == report["grad_norm"]
    assert record[prefix + "normalized_trace"] == report["normalized_trace"]
    assert record[prefix + "loss"] == report["loss_value"]
    assert record[prefix + "examples"] == TRACKED["curvature_samples"]


def test_normalized_trace_is_ratio(runs):
    # One float64 division of the logged numbers, so the relative error is at most 2**-53 each way.
    for record in read_metrics(runs / "whole")[1:]:
        for split in ("train", "test"):
            ratio = record[f"curvature_{split}_trace"] / record[f"curvature_{split}_grad_norm"]
            assert record[f"curvature_{split}_normalized_trace"] == pytest.approx(ratio, rel=1e-15)


def test_seconds_exclude_curvature(runs):
    record = read_metrics(runs / "whole")[1]
    assert record["curvature_seconds"] > 0
    assert record["seconds"] > 0


def test_resumed_tracked_run_is_exact(runs):
    whole = load_checkpoint(runs / "whole" / "checkpoint.pt")
    parts = load_checkpoint(runs / "parts" / "checkpoint.pt")
    for key, value in whole["model"].items():
        assert torch.equal(parts["model"][key], value), key
    assert torch.equal(parts["rng"]["torch"], whole["rng"]["torch"])
    assert timeless(parts["metrics"]) == timeless(whole["metrics"])
    assert timeless(read_metrics(runs / "parts")) == timeless(read_metrics(runs / "whole"))


def test_tracking_leaves_training_unchanged(runs, tmp_path):
    # The measurement forks the global random state, so weights and metrics match an untracked run.
    untracked = {key: value for key, value in TRACKED.items() if key not in ("track_curvature", "curvature_samples")}
    train(untracked, out=tmp_path / "plain", progress=False)
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    tracked = load_checkpoint(runs / "whole" / "checkpoint.pt")
    for key, value in tracked["model"].items():
        assert torch.equal(plain["model"][key], value), key
    assert torch.equal(plain["rng"]["torch"], tracked["rng"]["torch"])
    assert timeless(plain["metrics"]) == [
        {key: value for key, value in record.items() if not key.startswith("curvature_")}
        for record in timeless(tracked["metrics"])
    ]


def test_config_describes_tracking(runs):
    config = json.loads((runs / "whole" / "config.json").read_text())
    assert config["track_curvature"] == 2
    assert config["curvature_samples"] == 60
    assert config["curvature_tracking"]["method"] == CURVATURE_METHOD
    assert config["curvature_tracking"]["probes"] == CURVATURE_PROBES


@pytest.mark.parametrize(
    ("every", "epochs", "expected"),
    [(None, 4, []), (1, 3, [1, 2, 3]), (2, 5, [2, 4, 5]), (3, 6, [3, 6]), (10, 4, [4])],
)
def test_tracked_epochs(every, epochs, expected):
    assert [epoch for epoch in range(1, epochs + 1) if is_tracked_epoch(epoch, every=every, epochs=epochs)] == expected


def test_subset_is_fixed_sample():
    first = curvature_subset_indices(400, 60, seed=5, split="train")
    assert torch.equal(first, curvature_subset_indices(400, 60, seed=5, split="train"))
    assert first.shape == (60,)
    assert torch.equal(first, first.unique())
    assert int(first.min()) >= 0
    assert int(first.max()) < 400
    assert not torch.equal(first, curvature_subset_indices(400, 60, seed=6, split="train"))
    assert not torch.equal(first, curvature_subset_indices(400, 60, seed=5, split="test"))
    assert curvature_subset_indices(400, 60, seed=2**63 - 1, split="test").shape == (60,)


def test_subset_whole_small_split():
    assert torch.equal(curvature_subset_indices(100, 100, seed=0, split="test"), torch.arange(100))
    assert torch.equal(curvature_subset_indices(100, 1000, seed=0, split="test"), torch.arange(100))


def test_subset_leaves_global_rng():
    before = torch.get_rng_state()
    curvature_subset_indices(400, 60, seed=5, split="train")
    assert torch.equal(torch.get_rng_state(), before)


def test_curvature_seed_distinct_per_epoch():
    seeds = {curvature_seed(3, epoch) for epoch in range(1, 101)}
    assert len(seeds) == 100
    assert 0 <= curvature_seed(2**63 - 1, 7) < 2**63


def test_samples_dropped_without_tracking():
    assert resolve_options({})["curvature_samples"] is None
    assert resolve_options({"track_curvature": 5})["curvature_samples"] == 1000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"track_curvature": 0}, r"--track-curvature 0 is below 1; pass a whole number such as 10"),
        ({"track_curvature": -3}, r"--track-curvature -3 is below 1"),
        ({"track_curvature": 2.5}, r"--track-curvature 2.5 is not an integer"),
        ({"track_curvature": True}, r"--track-curvature True is not an integer"),
        ({"track_curvature": 1, "curvature_samples": 0}, r"--curvature-samples 0 is below 1; pass a whole number such as 1000"),
        ({"curvature_samples": 500}, r"--curvature-samples 500 has no effect without --track-curvature; "
                                     r"drop it or pass --track-curvature EPOCHS"),
    ],
)
def test_invalid_tracking_options(options, message):
    with pytest.raises(UsageError, match=message):
        resolve_options(options)


def test_cli_rejects_zero_interval(tmp_path, capsys):
    status = main(["train", "--out", str(tmp_path / "run"), "--track-curvature", "0"])
    assert status == 2
    assert "--track-curvature 0 is below 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
