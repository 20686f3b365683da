"""The crsam command line: exit statuses, one-line errors that overwrite nothing, and JSON output."""

import copy
import functools
import importlib.util
import io
import json
import math
import random
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from crsam.checkpoint import load_checkpoint
from crsam.cli import format_json, main
from crsam.train import train

# A tiny run: 500 examples, 1 epoch; the commands below only read it.
TINY = {"num_samples": 500, "batch_size": 64, "epochs": 1, "optimizer": "sgd"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    train(TINY, out=out, progress=False)
    return out


def snapshot(folder):
    """Return every file's bytes and modification time below ``folder``, and every subfolder."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else "folder"
        for path in sorted(folder.rglob("*"))
    }


def run_cli(argv, capsys):
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def strict_json(text):
    """Parse JSON, failing on NaN and Infinity, which standard JSON does not have."""

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


# Each case: arguments after 'crsam' (RUN stands for the run folder, CKPT for its checkpoint)
# and the expected error message as a regular expression.
BAD_INPUT = [
    (["train", "--out", "RUN", "--overwrite", "--model", "transformer"], r"--model 'transformer' is unknown; choose one of mlp, cnn1d"),
    (["train", "--out", "RUN", "--overwrite", "--model", "vit"], r"--model vit takes 3x32x32 images, but --data mnist1d has sequences"),
    (["train", "--out", "RUN", "--overwrite", "--optimizer", "adam"], r"--optimizer 'adam' is unknown; choose one of sgd, sam, crsam"),
    (["train", "--out", "RUN", "--overwrite", "--rho", "-0.1"], r"--rho -0.1 is negative; pass a perturbation radius >= 0"),
    (["train", "--out", "RUN", "--overwrite", "--optimizer", "sgd", "--rho", "0.1"], r"--rho 0.1 has no effect with --optimizer sgd"),
    (["train", "--out", "RUN", "--overwrite", "--data", "cifar10"], r"--model mlp takes MNIST-1D sequences, not the images of --data cifar10; pass --model resnet18"),
    (["train", "--out", "RUN", "--overwrite", "--data-dir", "RUN/nowhere"], r"--data-dir '.*nowhere' does not exist; pass an existing folder"),
    (["train", "--out", "RUN", "--overwrite", "--num-samples", "15"], r"--num-samples 15 is invalid; pass a positive multiple of 10"),
    (["train", "--out", "RUN", "--overwrite", "--lr", "nan"], r"--lr nan is not a finite number"),
    (["train", "--out", "RUN", "--overwrite", "--epochs", "two"], r"argument --epochs: 'two' is not a whole number; see 'crsam train --help'"),
    (["train", "--out", "RUN", "--overwrite", "--optimizer", "sgd", "--perturbation", "local"], r"--perturbation local has no effect with --optimizer sgd"),
    (["train", "--out", "RUN", "--overwrite", "--amp", "fp32"], r"--amp 'fp32' is unknown; choose one of bf16, fp16"),
    (["train", "--out", "RUN", "--overwrite", "--perturbation", "layerwise"], r"--perturbation 'layerwise' is unknown; choose one of global, local"),
    (["train", "--out", "RUN", "--overwrite", "--parallel", "--optimizer", "sam"], r"--parallel applies to --optimizer crsam only"),
    (["train", "--out", "RUN", "--overwrite", "--clip-grad-norm", "0"], r"--clip-grad-norm 0.0 must be greater than 0"),
    (["train", "--out", "RUN"], r"--out '.*run' already contains a run \(checkpoint.pt, config.json, metrics.jsonl\); pass --resume"),
    (["train", "--out", "RUN", "--resume", "--overwrite"], r"--resume and --overwrite contradict each other"),
    (["train", "--out", "RUN", "--resume", "--epochs", "5"], r"--epochs 5 differs from the resumed run's 1"),
    (["train", "--out", "RUN/sub", "--resume"], r"--resume found no checkpoint at"),
    (["train"], r"the following arguments are required: --out"),
    (["bound", "RUN/missing.pt"], r"checkpoint '.*missing.pt' not found; pass the checkpoint.pt"),
    (["bound", "RUN"], r"checkpoint '.*run' is a folder; pass a file such as"),
    (["bound", "RUN/config.json"], r"checkpoint '.*config.json' is truncated or corrupt"),
    (["bound", "CKPT", "--delta", "0"], r"--delta 0.0 is outside \(0, 1\); pass a failure probability such as 0.05"),
    (["bound", "CKPT", "--delta", "1.5"], r"--delta 1.5 is outside \(0, 1\)"),
    (["bound", "CKPT", "--delta", "-0.1"], r"--delta -0.1 is outside \(0, 1\)"),
    (["bound", "CKPT", "--delta", "1"], r"--delta 1.0 is outside \(0, 1\)"),
    (["bound", "CKPT", "--delta", "nan"], r"--delta nan is outside \(0, 1\)"),
    (["bound", "CKPT", "--delta", "inf"], r"--delta inf is outside \(0, 1\)"),
    (["bound", "CKPT", "--mc-samples", str(2**53)],
     r"--mc-samples 9007199254740992 is too large for 400 examples: .* exceed 2\*\*53; pass --mc-samples 22517998136852 or less"),
    (["bound", "CKPT", "--sigma-grid", "0.1,x"], r"argument --sigma-grid: 'x' in '0.1,x' is not a number"),
    (["bound", "CKPT", "--sigma-grid", "0.1,-1"], r"--sigma-grid contains -1.0, which is not a finite number > 0"),
    (["bound", "CKPT", "--sigma-grid", "0.1,0.1"], r"--sigma-grid 0.1,0.1 repeats a value"),
    (["bound", "CKPT", "--sigma-grid", "1e-320"], r"--sigma-grid contains 9.99989e-321, outside \[1e-100, 1e\+30\]"),
    (["bound", "CKPT", "--sigma-grid", "0.1,1e300"], r"--sigma-grid contains 1e\+300, outside \[1e-100, 1e\+30\]"),
    (["bound", "CKPT", "--prior-variance-c", "0"], r"--prior-variance-c 0.0 is not a finite number > 0; pass a scale such as 0.1"),
    (["bound", "CKPT", "--delta", "1e-320"], r"delta 1e-320 is too small: .* Pass a delta of at least 1e-30\d\."),
    (["bound", "CKPT", "--mc-samples", "0"], r"--mc-samples 0 must be at least 1"),
    (["bound", "CKPT", "--data-dir", "RUN/nowhere"], r"--data-dir '.*nowhere' does not exist"),
    (["curvature", "RUN/missing.pt"], r"checkpoint '.*missing.pt' not found"),
    (["curvature", "CKPT", "--split", "valid"], r"argument --split: invalid choice: 'valid'"),
    (["curvature", "CKPT", "--probes", "0"], r"--probes 0 must be at least 1"),
    (["curvature", "CKPT", "--method", "lanczos"], r"--method 'lanczos' is unknown; choose one of hutchinson"),
    (["frobnicate"], r"argument COMMAND: invalid choice: 'frobnicate'"),
    # Values that used to pass the checks and then fail with a traceback, or leave files behind.
    (["train", "--out", ""], r"--out is empty; pass a folder"),
    (["train", "--out", "RUN/config.json/sub"], r"--out '.*sub' cannot be created because '.*config.json' is a file"),
    (["train", "--out", "RUN/new", "--num-samples", "10000000"], r"--num-samples 10000000 is above the limit of 1,000,000"),
    (["train", "--out", "RUN/new", "--alpha", "1e308"], r"--alpha 1e\+308 is too large for float32 weights"),
    (["train", "--out", "RUN/new", "--weight-decay", "1e39"], r"--weight-decay 1e\+39 is too large for float32 weights"),
    (["train", "--out", "RUN/new", "--alpha", "3e38", "--beta", "3e38"], r"--alpha 3e\+38 with --beta 3e\+38 is too large"),
    (["train", "--out", "RUN/new/deeper", "--num-samples", "500", "--prior-split", "0.001"],
     r"--prior-split 0.001 leaves 0 of 400 training examples for the prior"),
    (["train", "--out", "RUN/new/deeper", "--num-samples", "500", "--optimizer", "sgd", "--momentum", "0", "--lr", "1e10"],
     r"training diverged in epoch 1"),
    (["train", "--out", "RUN", "--overwrite", "--num-samples", "500", "--optimizer", "sgd", "--momentum", "0", "--lr", "1e10"],
     r"training diverged in epoch 1"),
    (["bound", "CKPT", "--seed", "-1"], r"--seed -1 is outside \[0, 2\*\*63\); pass a whole number such as 0"),
    (["curvature", "CKPT", "--seed", str(2**64)], r"--seed 18446744073709551616 is outside \[0, 2\*\*63\)"),
]


@pytest.fixture
def no_progress_bar(monkeypatch):
    """Train without the progress bar, so that stderr holds only crsam's own lines."""
    import crsam.train

    monkeypatch.setattr(crsam.train, "train", functools.partial(crsam.train.train, progress=False))


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(argv[:6]) for argv, _ in BAD_INPUT])
@pytest.mark.usefixtures("no_progress_bar")
def test_bad_input(run_dir, capsys, argv, message):
    argv = [arg.replace("RUN", str(run_dir)).replace("CKPT", str(run_dir / "checkpoint.pt")) for arg in argv]
    before = snapshot(run_dir)
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    assert out == ""
    assert err.startswith("crsam: error: ")
    assert err.count("\n") == 1
    assert re.search(message, err), err
    assert snapshot(run_dir) == before


def test_bad_input_exit_status_in_process(run_dir):
    # The console script's real exit status, through a fresh interpreter.
    result = subprocess.run(
        [sys.executable, "-m", "crsam.cli", "train", "--out", str(run_dir), "--model", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("crsam: error: --model 'nope' is unknown")


def test_corrupt_checkpoint_exit(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x80\x02garbage")
    status, _, err = run_cli(["curvature", path], capsys)
    assert status == 2
    assert "is truncated or corrupt" in err


def test_format_json_replaces_non_finite():
    text = format_json({"a": float("nan"), "b": [float("inf"), 2.0], "c": {"d": -float("inf")}})
    assert strict_json(text) == {"a": None, "b": [None, 2.0], "c": {"d": None}}


def test_train_json(tmp_path, capsys):
    status, out, _ = run_cli(["train", "--out", tmp_path / "run", "--json", "--num-samples", "500",
                              "--epochs", "1", "--optimizer", "sam"], capsys)
    report = strict_json(out)
    assert status == 0
    assert report["epochs_completed"] == 1
    assert report["config"]["optimizer"] == "sam"
    assert set(report["final"]) >= {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}


def test_train_table(tmp_path, capsys):
    status, out, _ = run_cli(["train", "--out", tmp_path / "run", "--num-samples", "500", "--epochs", "1"], capsys)
    assert status == 0
    assert "test loss / acc" in out
    assert "checkpoint" in out


def test_version(capsys):
    status, out, _ = run_cli(["--version"], capsys)
    assert status == 0
    assert out.startswith("crsam ")


needs_curvature = pytest.mark.skipif(importlib.util.find_spec("crsam.curvature") is None, reason="crsam.curvature is missing")
needs_certificate = pytest.mark.skipif(importlib.util.find_spec("crsam.certificate") is None, reason="crsam.certificate is missing")


@needs_curvature
def test_curvature_json(run_dir, capsys):
    status, out, _ = run_cli(["curvature", run_dir / "checkpoint.pt", "--json", "--probes", "4", "--split", "test"], capsys)
    report = strict_json(out)
    assert status == 0
    assert report["split"] == "test"
    assert report["method"] == "hutch++"
    assert set(report) >= {"trace", "grad_norm", "normalized_trace", "top_eigenvalue", "loss", "mode"}
    assert set(report["trace"]) >= {"estimate", "stderr", "probes"}


@needs_certificate
def test_bound_json(run_dir, capsys):
    status, out, _ = run_cli(["bound", run_dir / "checkpoint.pt", "--json", "--mc-samples", "20", "--delta", "0.1"], capsys)
    report = strict_json(out)
    assert status == 0
    assert report["delta"] == 0.1
    assert report["n_train"] == 400
    assert {"kl", "mcallester"} <= {row["name"] for row in report["bounds"]}
    for row in report["bounds"]:
        assert set(row) >= {"name", "value", "delta", "n", "rigorous"}


@needs_certificate
def test_bound_grid_options(run_dir, capsys):
    argv = ["bound", run_dir / "checkpoint.pt", "--json", "--mc-samples", "10", "--sigma-grid", "0.001,0.002",
            "--prior-variance-c", "0.5"]
    status, out, err = run_cli(argv, capsys)
    report = strict_json(out)
    assert status == 0
    assert report["sigma_grid"] == [0.001, 0.002]
    row = next(row for row in report["bounds"] if row["name"] == "dziugaite-roy")
    # The first grid point is c exp(-1 / 100).
    assert row["prior_variance"] <= 0.5 * math.exp(-1 / 100) * (1 + 1e-15)
    # Tiny scales put sigma on the grid's edge, and the report's warning names the option just
    # used. The report lists it, so it is not repeated on stderr.
    assert any("Pass a grid that extends past it: --sigma-grid of 'crsam bound'" in message
               for message in report["warnings"])
    assert "--sigma-grid" not in err


def test_verify_without_module(capsys, monkeypatch):
    original = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "crsam.verification" else original(name, *rest))
    status, _, err = run_cli(["verify"], capsys)
    assert status == 2
    assert "'crsam verify' is not available yet" in err


needs_verification = pytest.mark.skipif(importlib.util.find_spec("crsam.verification") is None, reason="crsam.verification is missing")


@needs_verification
def test_verify_checkpoint_json(run_dir, capsys):
    status, out, _ = run_cli(["verify", run_dir / "checkpoint.pt", "--json"], capsys)
    report = strict_json(out)
    assert status == 0
    assert report["checks"]
    for check in report["checks"]:
        assert set(check) >= {"name", "error", "tolerance", "passed"}


@needs_verification
def test_verify_failure_exits_1(capsys, monkeypatch):
    import crsam.verification

    failing = {"checks": [{"name": "trace", "error": 2.0, "tolerance": 1.0, "passed": False, "reason": "absolute error"}]}
    monkeypatch.setattr(crsam.verification, "run_checks", lambda *args, **kwargs: failing)
    status, out, _ = run_cli(["verify"], capsys)
    assert status == 1
    assert "FAIL" in out
    assert "1 check, 1 failed" in out


def test_verify_missing_checkpoint(tmp_path, capsys):
    status, _, err = run_cli(["verify", tmp_path / "missing.pt"], capsys)
    assert status == 2
    assert "not found" in err


def test_prior_split_error_one_line(tmp_path, capsys):
    status, _, err = run_cli(["train", "--out", tmp_path / "run", "--prior-split", "1.5"], capsys)
    assert status == 2
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@needs_certificate
def test_bound_uses_examples_outside_prior_split(tmp_path, capsys):
    out = tmp_path / "run"
    train({**TINY, "prior_split": 0.25}, out=out, progress=False)
    status, report_text, _ = run_cli(["bound", out / "checkpoint.pt", "--json", "--mc-samples", "20"], capsys)
    report = strict_json(report_text)
    assert status == 0
    assert report["n_train"] == 300
    assert report["prior"]["split"]["n_prior"] == 100


# ---------------------------------------------------------------------------- hostile checkpoints


class ShellCommand:
    """An object whose unpickling runs a shell command, as a hostile checkpoint would carry."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def save_bytes(payload):
    """Return ``payload`` as the bytes torch.save writes."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def edited(change):
    """Return a case builder that applies ``change`` to a copy of the checkpoint's payload."""

    def build(data, payload):
        payload = copy.deepcopy(payload)
        change(payload)
        return save_bytes(payload)

    return build


def flip_byte_in_weights(data, payload):
    """Flip one byte inside the first tensor storage of a zip-format checkpoint."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        member = next(info for info in archive.infolist() if "/data/" in info.filename)
    # A zip local header is 30 bytes, then the file name and the extra field, whose lengths it holds.
    header = member.header_offset
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    changed = bytearray(data)
    changed[header + 30 + name_length + extra_length] ^= 0xFF
    return bytes(changed)


def set_key(*keys_and_value):
    *keys, value = keys_and_value

    def change(payload):
        for key in keys[:-1]:
            payload = payload[key]
        payload[keys[-1]] = value

    return change


def fill_weights_with_nan(payload):
    for tensor in payload["model"].values():
        tensor.fill_(float("nan"))


def shrink_prior(payload):
    name = next(iter(payload["prior"]["state"]))
    payload["prior"]["state"][name] = torch.zeros(1)


def unfinished_run_without_optimizer_state(payload):
    payload["config"]["epochs"] = 2
    payload["optimizer"] = {}


def prior_set_to_trained_weights(payload):
    payload["prior"]["state"] = copy.deepcopy(payload["model"])


def unfinished_run_with_scheduler(scheduler_state):
    def change(payload):
        payload["config"]["epochs"] = 3
        payload["scheduler"] = {**payload["scheduler"], **scheduler_state}

    return change


ALL_COMMANDS = ("bound", "curvature", "verify", "resume")

# Each case: an id, a function from (checkpoint bytes, payload) to the hostile file's bytes, the
# commands it is passed to, and the expected error message as a regular expression.
BAD_CHECKPOINTS = [
    ("truncated", lambda data, payload: data[: len(data) // 2], ALL_COMMANDS,
     r"is truncated or corrupt \(the zip archive has no central directory; the file was cut short\)"),
    ("flipped-byte", flip_byte_in_weights, ALL_COMMANDS, r"is corrupt \(member '.*' fails its CRC-32 check\)"),
    ("random-bytes", lambda data, payload: bytes(random.Random(0).randrange(256) for _ in range(4096)), ALL_COMMANDS,
     r"is truncated or corrupt"),
    ("state-dict", lambda data, payload: save_bytes(payload["model"]), ALL_COMMANDS,
     r"is not a crsam checkpoint \(no format 'crsam-checkpoint' entry\)"),
    ("model-list", edited(set_key("model", [1, 2])), ALL_COMMANDS, r"is invalid: model is not a non-empty dict of tensors"),
    ("epoch-text", edited(set_key("epoch", "x")), ALL_COMMANDS, r"is invalid: epoch is 'x', expected a whole number >= 0"),
    ("version-text", edited(set_key("format_version", "1")), ALL_COMMANDS, r"is invalid: format_version is '1'"),
    ("metrics-count", edited(set_key("epoch", 5)), ALL_COMMANDS, r"is invalid: metrics has 1 entries for 5 completed epochs"),
    ("nan-weights", edited(fill_weights_with_nan), ALL_COMMANDS, r"is invalid: model tensor '.*' contains NaN or infinity"),
    ("no-prior-state", edited(set_key("prior", "state", None)), ALL_COMMANDS, r"is invalid: prior has no dict of tensors"),
    ("rng-float", edited(set_key("rng", "torch", torch.zeros(3))), ALL_COMMANDS, r"is invalid: rng\['torch'\] is not a uint8 tensor"),
    ("config-model", edited(set_key("config", "model", "zzz")), ALL_COMMANDS,
     r"stores an invalid configuration \(--model 'zzz' is unknown\)"),
    ("config-optimizer", edited(set_key("config", "optimizer", "adam")), ALL_COMMANDS,
     r"stores an invalid configuration \(--optimizer 'adam' is unknown\)"),
    ("config-huge-data", edited(set_key("config", "num_samples", 10**12)), ALL_COMMANDS,
     r"stores an invalid configuration \(--num-samples 1000000000000 is above the limit"),
    ("config-data-seed", edited(set_key("config", "data_seed", "x")), ALL_COMMANDS,
     r"stores an invalid configuration \(--data-seed 'x' is not an integer"),
    ("config-missing", edited(set_key("config", {"model": "mlp"})), ALL_COMMANDS,
     r"stores an invalid configuration \(it lacks data, activation, optimizer, lr"),
    ("prior-shape", edited(shrink_prior), ("bound", "curvature", "verify"),
     r"is invalid: the prior's tensors do not match the parameters of the model 'mlp'"),
    ("short-text", lambda data, payload: b"hello\n", ALL_COMMANDS,
     r"is truncated or corrupt \(not a zip archive or pickle\)"),
    ("prior-trained", edited(prior_set_to_trained_weights), ("bound", "curvature", "verify"),
     r"is invalid: its prior centre \('.*'\) differs from the initial weights of seed 0"),
    ("scheduler-behind", edited(unfinished_run_with_scheduler({"last_epoch": 0})), ("resume",),
     r"is invalid: its learning-rate schedule is at step 0, but 1 completed epochs put it at 1"),
    ("scheduler-text", edited(unfinished_run_with_scheduler({"last_epoch": "x"})), ("resume",),
     r"does not fit the 'mlp' run it describes|is invalid: its learning-rate schedule is at step 'x'"),
    ("optimizer-state", edited(unfinished_run_without_optimizer_state), ("resume",),
     r"does not fit the 'mlp' run it describes \(an entry lacks the key 'param_groups'\)"),
]


@pytest.fixture(scope="module")
def bad_checkpoints(run_dir, tmp_path_factory):
    """Write each case of BAD_CHECKPOINTS to its own folder as checkpoint.pt; return the folders."""
    data = (run_dir / "checkpoint.pt").read_bytes()
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    root = tmp_path_factory.mktemp("bad")
    folders = {}
    for case, build, _, _ in BAD_CHECKPOINTS:
        folders[case] = root / case
        folders[case].mkdir()
        (folders[case] / "checkpoint.pt").write_bytes(build(data, payload))
    return folders


def checkpoint_argv(command, folder):
    if command == "resume":
        return ["train", "--out", folder, "--resume"]
    return [command, folder / "checkpoint.pt"]


@pytest.mark.parametrize(
    ("case", "command", "message"),
    [(case, command, message) for case, _, commands, message in BAD_CHECKPOINTS for command in commands],
)
@pytest.mark.usefixtures("no_progress_bar")
def test_bad_checkpoint(bad_checkpoints, capsys, case, command, message):
    folder = bad_checkpoints[case]
    before = snapshot(folder)
    status, out, err = run_cli(checkpoint_argv(command, folder), capsys)
    assert status == 2
    assert out == ""
    assert err.startswith("crsam: error: ")
    assert err.count("\n") == 1
    assert re.search(message, err), err
    assert snapshot(folder) == before


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_code_in_checkpoint_never_runs(run_dir, tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    payload["config"]["note"] = ShellCommand(f"touch {marker}")
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save(payload, folder / "checkpoint.pt")

    status, _, err = run_cli(checkpoint_argv(command, folder), capsys)
    assert status == 2
    assert "was rejected: it contains objects other than tensors and plain data" in err
    assert "GLOBAL posix.system" in err or "GLOBAL nt.system" in err
    assert "weights_only" not in err
    assert not marker.exists()


def test_unreadable_checkpoint(run_dir, capsys, monkeypatch):
    import crsam.checkpoint

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Root reads any file, so the denial is simulated where crsam opens the checkpoint.
    monkeypatch.setattr(crsam.checkpoint, "open", denied, raising=False)
    status, _, err = run_cli(["bound", run_dir / "checkpoint.pt"], capsys)
    assert status == 2
    assert re.search(r"checkpoint '.*' cannot be read \(Permission denied\); check the file's permissions", err)


def test_unwritable_out(tmp_path, capsys, monkeypatch):
    import os

    # Root may write anywhere, so the permission check is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    status, _, err = run_cli(["train", "--out", tmp_path / "run", "--num-samples", "500"], capsys)
    assert status == 2
    assert re.search(r"--out '.*run' is not writable \(no write permission in '.*'\); pass a folder you can write to", err)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- interruptions


def interrupt_in_epoch(monkeypatch, epoch):
    """Make the training loop raise KeyboardInterrupt (Ctrl-C) in the middle of ``epoch``."""
    import crsam.train

    original = crsam.train.train_one_epoch

    def train_one_epoch(*args, **kwargs):
        if kwargs["epoch"] == epoch:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(crsam.train, "train_one_epoch", train_one_epoch)


@pytest.mark.usefixtures("no_progress_bar")
def test_interrupt_in_first_epoch_writes_nothing(tmp_path, capsys, monkeypatch):
    interrupt_in_epoch(monkeypatch, 1)
    status, _, err = run_cli(["train", "--out", tmp_path / "new" / "run", "--num-samples", "500", "--epochs", "2"], capsys)
    assert status == 130
    assert re.search(r"^crsam: interrupted; no epoch had completed, so nothing was written to '.*run'", err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_progress_bar")
def test_interrupt_keeps_overwritten_run(run_dir, capsys, monkeypatch):
    interrupt_in_epoch(monkeypatch, 1)
    before = snapshot(run_dir)
    status, _, _ = run_cli(["train", "--out", run_dir, "--overwrite", "--num-samples", "500", "--epochs", "2"], capsys)
    assert status == 130
    assert snapshot(run_dir) == before


@pytest.mark.usefixtures("no_progress_bar")
def test_interrupt_then_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", "--out", out, "--num-samples", "500", "--epochs", "3", "--optimizer", "sgd"]
    interrupt_in_epoch(monkeypatch, 2)
    status, _, err = run_cli(argv, capsys)
    assert status == 130
    assert f"continues with 'crsam train --out {out} --resume'" in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    monkeypatch.undo()
    status, report_text, _ = run_cli(["train", "--out", out, "--resume", "--json"], capsys)
    assert status == 0
    assert strict_json(report_text)["epochs_completed"] == 3
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_run_files_follow_umask(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        train(TINY, out=tmp_path / "run", progress=False)
    finally:
        os.umask(previous)
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name


def test_config_without_later_flags_loads(run_dir, tmp_path, capsys):
    # A configuration written before a flag existed lacks its key; the flag's default applies.
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for key in ("perturbation", "amp", "track_curvature", "prior_split"):
        del payload["config"][key]
    torch.save(payload, tmp_path / "checkpoint.pt")
    status, out, _ = run_cli(["curvature", tmp_path / "checkpoint.pt", "--json", "--probes", "3"], capsys)
    assert status == 0
    assert strict_json(out)["trace"]["estimate"] is not None


@pytest.mark.usefixtures("no_progress_bar")
def test_interrupt_during_bound(run_dir, capsys, monkeypatch):
    import crsam.certificate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(crsam.certificate, "certify", interrupted)
    before = snapshot(run_dir)
    status, out, err = run_cli(["bound", run_dir / "checkpoint.pt"], capsys)
    assert status == 130
    assert out == ""
    assert err == "crsam: interrupted; nothing was written; run the same command again\n"
    assert snapshot(run_dir) == before
