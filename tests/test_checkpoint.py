"""Checkpoint files: weights-only round trip, atomic writes and one-line errors for bad files."""

import argparse
import os

import pytest
import torch

from crsam import checkpoint
from crsam.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    REQUIRED_KEYS,
    json_safe,
    load_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from crsam.errors import UsageError


def make_payload(**changes):
    """Return a minimal valid checkpoint payload with some values replaced."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "crsam_version": "0.1.0",
        "epoch": 2,
        "config": {"model": "mlp", "lr": 0.1, "prior_split": None, "parallel": False},
        "data": {"name": "mnist1d", "sha256": "0" * 64},
        "model": model.state_dict(),
        "prior": {"kind": "init", "seed": 0, "state": model.state_dict(), "split": None},
        "optimizer": optimizer.state_dict(),
        "scheduler": {"last_epoch": 2, "base_lrs": [0.1]},
        "metrics": [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.6}],
        "rng": {"torch": torch.get_rng_state(), "data_order": torch.Generator().manual_seed(1).get_state()},
    }
    payload.update(changes)
    return payload


class Opaque:
    """A class that a weights-only load must reject."""


def test_round_trip_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    payload = make_payload()
    save_checkpoint(payload, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["model"]["weight"], payload["model"]["weight"])
    assert torch.equal(loaded["rng"]["torch"], payload["rng"]["torch"])
    assert loaded["metrics"] == payload["metrics"]
    assert loaded["config"] == payload["config"]


def test_round_trip_optimizer_state(tmp_path):
    path = tmp_path / "checkpoint.pt"
    payload = make_payload()
    save_checkpoint(payload, path)
    loaded = load_checkpoint(path)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.load_state_dict(loaded["optimizer"])
    assert optimizer.param_groups[0]["momentum"] == 0.9


def test_no_temporary_files_left(tmp_path):
    save_checkpoint(make_payload(), tmp_path / "checkpoint.pt")
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(make_payload(epoch=1), path)
    before = path.read_bytes()

    def failing_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(make_payload(epoch=2), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_unsafe_payload_rejected_before_writing(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]\['object'\] \(Opaque\) is not plain data"):
        save_checkpoint(make_payload(config={"object": Opaque()}), path)
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_write_text_atomic(tmp_path):
    path = tmp_path / "config.json"
    write_text_atomic("first\n", path)
    write_text_atomic("second\n", path)
    assert path.read_text() == "second\n"
    assert os.listdir(tmp_path) == ["config.json"]


def test_missing_file(tmp_path):
    path = tmp_path / "missing.pt"
    with pytest.raises(UsageError, match=rf"checkpoint '{path}' not found; pass the checkpoint.pt"):
        load_checkpoint(path)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(UsageError, match=r"is a folder; pass a file such as .*checkpoint.pt"):
        load_checkpoint(tmp_path)


def test_truncated_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(make_payload(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=r"is truncated or corrupt \(.*\); train again or restore an intact copy"):
        load_checkpoint(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UsageError, match=r"is truncated or corrupt"):
        load_checkpoint(path)


def test_empty_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"")
    with pytest.raises(UsageError, match=r"is empty; train again"):
        load_checkpoint(path)


def test_pickled_class_rejected(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": FORMAT_NAME, "payload": argparse.Namespace(x=1)}, path)
    with pytest.raises(UsageError, match=r"was rejected: it contains objects other than tensors and plain data"):
        load_checkpoint(path)


def test_other_torch_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(UsageError, match=r"is not a crsam checkpoint \(no format 'crsam-checkpoint' entry\)"):
        load_checkpoint(path)


def test_missing_keys(tmp_path):
    path = tmp_path / "checkpoint.pt"
    payload = make_payload()
    del payload["optimizer"], payload["rng"]
    save_checkpoint(payload, path)
    with pytest.raises(UsageError, match=r"lacks optimizer, rng; it is incomplete"):
        load_checkpoint(path)


def test_newer_format_version(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(make_payload(format_version=FORMAT_VERSION + 1), path)
    with pytest.raises(UsageError, match=r"newer than this crsam's"):
        load_checkpoint(path)


def test_errors_are_one_line(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(UsageError) as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_required_keys_documented():
    for key in REQUIRED_KEYS:
        assert f"``{key}``" in checkpoint.__doc__


def test_json_safe_replaces_non_finite():
    value = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": (1, "x", None, True)}
    assert json_safe(value) == {"a": None, "b": [None, None, 1.5], "c": [1, "x", None, True]}


def test_json_safe_converts_tensors():
    assert json_safe({"t": torch.tensor([1.0, float("nan")]), "s": torch.tensor(2)}) == {"t": [1.0, None], "s": 2}
