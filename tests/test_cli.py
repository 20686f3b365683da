"""The crsam command line: exit statuses, one-line errors that overwrite nothing, and JSON output."""

import importlib.util
import json
import subprocess
import sys

import pytest

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
    """Return every file's bytes and modification time below ``folder``."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
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
    (["train", "--out", "RUN", "--overwrite", "--model", "vit"], r"--model vit is not available yet"),
    (["train", "--out", "RUN", "--overwrite", "--optimizer", "adam"], r"--optimizer 'adam' is unknown; choose one of sgd, sam, crsam"),
    (["train", "--out", "RUN", "--overwrite", "--rho", "-0.1"], r"--rho -0.1 is negative; pass a perturbation radius >= 0"),
    (["train", "--out", "RUN", "--overwrite", "--optimizer", "sgd", "--rho", "0.1"], r"--rho 0.1 has no effect with --optimizer sgd"),
    (["train", "--out", "RUN", "--overwrite", "--data", "cifar10"], r"--data cifar10 is not available yet; use --data mnist1d"),
    (["train", "--out", "RUN", "--overwrite", "--data-dir", "RUN/nowhere"], r"--data-dir '.*nowhere' does not exist; pass an existing folder"),
    (["train", "--out", "RUN", "--overwrite", "--num-samples", "15"], r"--num-samples 15 is invalid; pass a positive multiple of 10"),
    (["train", "--out", "RUN", "--overwrite", "--lr", "nan"], r"--lr nan is not a finite number"),
    (["train", "--out", "RUN", "--overwrite", "--epochs", "two"], r"argument --epochs: 'two' is not a whole number; see 'crsam train --help'"),
    (["train", "--out", "RUN", "--overwrite", "--perturbation", "local"], r"--perturbation local is not available yet"),
    (["train", "--out", "RUN", "--overwrite", "--amp", "fp16"], r"--amp fp16 is not available yet"),
    (["train", "--out", "RUN", "--overwrite", "--parallel"], r"--parallel is not available yet"),
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
    (["bound", "CKPT", "--mc-samples", "0"], r"--mc-samples 0 must be at least 1"),
    (["bound", "CKPT", "--data-dir", "RUN/nowhere"], r"--data-dir '.*nowhere' does not exist"),
    (["curvature", "RUN/missing.pt"], r"checkpoint '.*missing.pt' not found"),
    (["curvature", "CKPT", "--split", "valid"], r"argument --split: invalid choice: 'valid'"),
    (["curvature", "CKPT", "--probes", "0"], r"--probes 0 must be at least 1"),
    (["curvature", "CKPT", "--method", "lanczos"], r"--method 'lanczos' is unknown; choose one of hutchinson"),
    (["frobnicate"], r"argument COMMAND: invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(argv[:4]) for argv, _ in BAD_INPUT])
def test_bad_input(run_dir, capsys, argv, message):
    argv = [arg.replace("RUN", str(run_dir)).replace("CKPT", str(run_dir / "checkpoint.pt")) for arg in argv]
    before = snapshot(run_dir)
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    assert out == ""
    assert err.startswith("crsam: error: ")
    assert err.count("\n") == 1
    assert __import__("re").search(message, err), err
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
