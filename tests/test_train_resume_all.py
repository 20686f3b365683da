"""Exact resumption with every training feature at once: a run stopped and resumed equals one run."""

import numpy as np
import pytest
import torch

import crsam.steps
import crsam.train
from crsam import cifar
from crsam.checkpoint import load_checkpoint
from crsam.train import train

# Each run trains 3 epochs and is also stopped after epoch 1 and resumed. The resumed part
# measures curvature at epoch 3, and MNIST-1D also at epoch 2.
MNIST_ALL = {
    "num_samples": 500, "batch_size": 64, "epochs": 3, "seed": 8, "device": "cpu", "optimizer": "crsam",
    "amp": "fp16", "accumulation_steps": 3, "label_smoothing": 0.1, "warmup_epochs": 1, "compile": True,
    "track_curvature": 2, "curvature_samples": 40,
}
CIFAR_ALL = {
    "data": "cifar10", "model": "resnet18", "width": 2, "batch_size": 8, "epochs": 3, "seed": 8, "device": "cpu",
    "optimizer": "sam", "amp": "bf16", "accumulation_steps": 2, "label_smoothing": 0.1, "warmup_epochs": 1,
    "cutout": 8, "track_curvature": 3, "curvature_samples": 4,
}


def timeless(metrics):
    return [{key: value for key, value in record.items() if key not in ("seconds", "curvature_seconds")}
            for record in metrics]


def assert_resumed_equals_whole(tmp_path, options, resume_options):
    train(options, out=tmp_path / "whole", progress=False)
    train(options, out=tmp_path / "parts", progress=False, stop_after_epoch=1)
    train(resume_options, out=tmp_path / "parts", resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    parts = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for key, value in whole["model"].items():
        assert torch.equal(parts["model"][key], value), key
    for key, value in whole["rng"].items():
        assert torch.equal(parts["rng"][key], value), key
    assert parts["scaler"] == whole["scaler"]
    assert parts["scheduler"] == whole["scheduler"]
    assert timeless(parts["metrics"]) == timeless(whole["metrics"])
    assert "curvature_train_trace" in whole["metrics"][-1]
    return whole


def test_mnist1d_all_features(tmp_path, monkeypatch):
    # aot_eager traces like inductor without generating C++ code (see crsam.steps).
    monkeypatch.setattr(crsam.steps, "COMPILE_BACKEND", "aot_eager")
    whole = assert_resumed_equals_whole(tmp_path, MNIST_ALL, {})
    assert whole["scaler"]["scale"] > 0


def test_cifar_all_features(tmp_path, monkeypatch):
    monkeypatch.setattr(crsam.train, "CIFAR_SPLIT_SIZES", None)
    rng = np.random.default_rng(1)
    cifar.write_cifar_folder(
        tmp_path / "data", "cifar10",
        x_train=rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8), y_train=rng.integers(0, 10, 20),
        x_test=rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8), y_test=rng.integers(0, 10, 6),
    )
    options = {**CIFAR_ALL, "data_dir": str(tmp_path / "data")}
    whole = assert_resumed_equals_whole(tmp_path, options, {"data_dir": str(tmp_path / "data")})
    # The augmentation generator advanced: each epoch draws crops, flips and Cutout squares.
    fresh = torch.Generator().manual_seed(crsam.train.augmentation_seed(CIFAR_ALL["seed"])).get_state()
    assert not torch.equal(whole["rng"]["augmentation"], fresh)
