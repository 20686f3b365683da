"""Training on CIFAR with the vision models: data wiring, augmentation, checkpoints and option errors.

Every test writes its own tiny CIFAR-10 folder in the official layout, so none needs the real
data set. The official split sizes are required of real folders, so the tests lift that check.
"""

import json

import pytest
import torch
from cifar_archives import write_tiny_cifar10

import crsam.train
from crsam import cifar, distributed
from crsam.checkpoint import load_checkpoint
from crsam.curvature import curvature_report
from crsam.distributed import shard_bounds
from crsam.errors import UsageError
from crsam.tracking import (
    CURVATURE_BATCH_SIZE,
    CURVATURE_METHOD,
    CURVATURE_PROBES,
    curvature_seed,
    curvature_subset_indices,
)
from crsam.train import evaluate, resolve_options, restore_run, run_device, train
from crsam.training_data import TrainingData

# A ResNet-18 with 4 channels in its first stage (about 44 thousand parameters) on 24 training
# and 8 test images trains an epoch in well under a second.
TINY_CIFAR = {"data": "cifar10", "model": "resnet18", "width": 4, "batch_size": 8, "epochs": 2, "seed": 3,
              "optimizer": "crsam", "device": "cpu"}


@pytest.fixture(autouse=True)
def any_split_sizes(monkeypatch):
    monkeypatch.setattr(crsam.train, "CIFAR_SPLIT_SIZES", None)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), num_train=24, num_test=8)


def options(cifar_dir, **changes):
    return {**TINY_CIFAR, "data_dir": str(cifar_dir), **changes}


def timeless(metrics):
    return [{key: value for key, value in record.items() if key not in ("seconds", "curvature_seconds")}
            for record in metrics]


def test_resnet_trains_and_records_hash(cifar_dir, tmp_path):
    summary = train(options(cifar_dir, cutout=8), out=tmp_path / "run", progress=False)
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    expected = cifar.load_cifar("cifar10", cifar_dir, expected_sizes=None).sha256
    assert payload["data"]["sha256"] == expected
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_sha256"] == expected
    assert summary["epochs_completed"] == 2
    assert summary["config"]["activation"] == "relu"
    assert summary["config"]["lr"] == 0.1
    assert all(torch.isfinite(torch.tensor(record["train_loss"])) for record in payload["metrics"])


def test_resume_with_augmentation_exact(cifar_dir, tmp_path):
    run = options(cifar_dir, cutout=8, epochs=3)
    train(run, out=tmp_path / "whole", progress=False)
    train(run, out=tmp_path / "parts", progress=False, stop_after_epoch=1)
    train({"data_dir": str(cifar_dir)}, out=tmp_path / "parts", resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    parts = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for key, value in whole["model"].items():
        assert torch.equal(parts["model"][key], value), key
    for key in ("torch", "data_order", "augmentation"):
        assert torch.equal(parts["rng"][key], whole["rng"][key]), key
    assert timeless(parts["metrics"]) == timeless(whole["metrics"])


def test_metrics_match_restored_run(cifar_dir, tmp_path):
    # Training evaluates uint8 images normalized chunk by chunk, and restore_run normalizes the
    # whole split at once with the same float32 operations, so the losses agree bit for bit.
    summary = train(options(cifar_dir, epochs=1), out=tmp_path / "run", progress=False)
    restored = restore_run(tmp_path / "run" / "checkpoint.pt")
    assert restored.data.x_train.dtype == torch.float32
    loss, accuracy = evaluate(restored.model, restored.data.x_train, restored.data.y_train)
    assert summary["final"]["train_loss"] == loss
    assert summary["final"]["train_acc"] == accuracy


def test_tracked_curvature_on_images(cifar_dir, tmp_path):
    run = options(cifar_dir, epochs=1, width=2, track_curvature=1, curvature_samples=6)
    train(run, out=tmp_path / "run", progress=False)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    restored = restore_run(tmp_path / "run" / "checkpoint.pt")
    indices = curvature_subset_indices(8, 6, seed=TINY_CIFAR["seed"], split="test")
    report = curvature_report(
        restored.model, restored.data.x_test[indices], restored.data.y_test[indices], method=CURVATURE_METHOD,
        probes=CURVATURE_PROBES, batch_size=CURVATURE_BATCH_SIZE, seed=curvature_seed(TINY_CIFAR["seed"], 1),
    )
    assert record["curvature_test_trace"] == report["trace"]["estimate"]
    assert record["curvature_test_top_eigenvalue"] == report["top_eigenvalue"]
    assert record["curvature_test_grad_norm"] == report["grad_norm"]


def test_training_batch_is_augmented(cifar_dir):
    data = cifar.load_cifar("cifar10", cifar_dir, expected_sizes=None)
    device_data = TrainingData(data, device=torch.device("cpu"), cutout=8)
    indices = torch.tensor([5, 0, 17])
    x, y = device_data.training_batch(indices, torch.Generator().manual_seed(11))
    expected = cifar.augment(data.x_train[indices], torch.Generator().manual_seed(11), mean=data.mean, std=data.std,
                             padding=4, cutout_size=8)
    assert torch.equal(x, expected)
    assert torch.equal(y, data.y_train[indices])


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_batch_matches_one_process(cifar_dir, world_size):
    # Every rank augments the whole global batch from the same generator state and keeps its
    # share. The shares must concatenate to the one-process batch, and all generators must end
    # in the one-process state, or the ranks' augmentation streams drift apart.
    data = cifar.load_cifar("cifar10", cifar_dir, expected_sizes=None)
    device_data = TrainingData(data, device=torch.device("cpu"), cutout=8)
    batch = torch.tensor([5, 0, 17, 3, 9, 22, 11])
    one_process = torch.Generator().manual_seed(11)
    expected_x, expected_y = device_data.training_batch(batch, one_process)

    shares_x, shares_y = [], []
    for rank in range(world_size):
        generator = torch.Generator().manual_seed(11)
        start, stop = shard_bounds(len(batch), rank, world_size)
        x, y = device_data.training_batch(batch, generator, share=slice(start, stop))
        assert torch.equal(generator.get_state(), one_process.get_state()), rank
        shares_x.append(x)
        shares_y.append(y)

    assert torch.equal(torch.cat(shares_x), expected_x)
    assert torch.equal(torch.cat(shares_y), expected_y)


def test_evaluation_inputs_normalized(cifar_dir):
    data = cifar.load_cifar("cifar10", cifar_dir, expected_sizes=None)
    device_data = TrainingData(data, device=torch.device("cpu"))
    inputs = device_data.model_inputs(data.x_test)
    mean = torch.tensor(data.mean, dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float64).reshape(1, 3, 1, 1)
    exact = (data.x_test.double() / 255 - mean) / std
    assert float(std.min()) > 0.25
    # u = 2**-24 is float32's unit round-off. x / 255 (in [0, 1]) is off by at most u, the float32
    # mean by at most u / 2, and the subtraction adds u, so before the division the error is
    # below 3u. Dividing by std > 0.25 (the case here) makes that 12u, and rounding the quotient
    # (below 4 in magnitude) and the float32 std add 2 * 4u. In all 20u, about 1.2e-6.
    assert torch.allclose(inputs.double(), exact, rtol=0, atol=20 * 2**-24)


def test_missing_files_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"CIFAR-10 was not found in '.*empty' \(no such folder\): expected "
                                         r"'.*cifar-10-batches-py' containing data_batch_1"):
        train({**TINY_CIFAR, "data_dir": str(empty)}, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cifar_without_data_dir(tmp_path):
    with pytest.raises(UsageError, match=r"--data cifar10 needs --data-dir: pass the folder that contains "
                                         r"'cifar-10-batches-py'"):
        train(TINY_CIFAR, out=tmp_path / "run", progress=False)


def test_cuda_request_without_gpu(cifar_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device, so --device cuda is valid")
    with pytest.raises(UsageError, match=r"--device cuda was passed, but torch finds no CUDA device"):
        train(options(cifar_dir, device="cuda"), out=tmp_path / "run", progress=False)


def test_device_mismatch_under_torchrun(monkeypatch):
    # A process group that picked cuda:1 for this rank, as torchrun on a GPU machine does: the
    # model would go to the GPU, so data placed on the CPU by --device cpu must be rejected.
    monkeypatch.setattr(distributed, "has_process_group", lambda: True)
    monkeypatch.setattr(distributed, "training_device", lambda: torch.device("cuda", 1))

    with pytest.raises(UsageError, match=r"--device cpu selects the cpu, but under torchrun this rank trains on "
                                         r"cuda:1 .*pass --device auto, or .*CUDA_VISIBLE_DEVICES"):
        run_device("cpu")


def test_device_of_cpu_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "has_process_group", lambda: True)
    monkeypatch.setattr(distributed, "training_device", lambda: torch.device("cpu"))

    assert run_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert run_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "mlp"}, r"--model mlp takes MNIST-1D sequences, not the images of --data cifar10; "
                           r"pass --model resnet18, resnet50, wrn28_10, vit"),
        ({"data": "mnist1d", "width": None}, r"--model resnet18 takes 3x32x32 images, but --data mnist1d"),
        ({"cutout": 0}, r"--cutout 0 is below 1; pass a whole number such as 16"),
        ({"cutout": 33}, r"--cutout 33 is larger than the 32-pixel images"),
        ({"model": "wrn28_10"}, r"--width applies to --model resnet18 and resnet50 only; drop it for --model wrn28_10"),
        ({"width": 0}, r"--width 0 is below 1"),
        ({"device": "tpu"}, r"--device 'tpu' is unknown; choose one of auto, cpu, cuda"),
        ({"model": "vit", "width": None}, r"--model vit has no default learning rate; pass --lr"),
    ],
)
def test_invalid_image_options(changes, message):
    with pytest.raises(UsageError, match=message):
        resolve_options({**TINY_CIFAR, **changes})


def test_cutout_rejected_for_mnist1d():
    with pytest.raises(UsageError, match=r"--cutout applies to image data only; drop it for --data mnist1d"):
        resolve_options({"cutout": 16})
