"""The GPU check script's CPU smoke path, its report and its step budget."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script times the GPU instead of the CPU smoke path")
def test_cpu_smoke_report(gpu_check, capsys):
    status = gpu_check.main(["--json"])
    captured = capsys.readouterr()
    assert status == 0
    assert "CUDA is not available on this machine; running the 5-step CPU smoke version" in captured.err
    report = json.loads(captured.out)
    assert report["smoke"] is True
    names = [row["variant"] for row in report["variants"]]
    assert names[:4] == ["sgd fp32", "sgd", "sam", "crsam"]
    for row in report["variants"]:
        assert row["steps"] == 5
        assert math.isfinite(row["final_loss"])
        assert row["peak_memory_mib"] is None
    sgd = next(row for row in report["variants"] if row["variant"] == "sgd")
    assert sgd["ratio_to_sgd"] == 1.0
    if "crsam parallel" not in names:
        assert any(note.startswith("CR-SAM parallel skipped") for note in report["notes"])


def test_fit_steps_budget(gpu_check):
    # 10 ms per SGD step and 10 SGD-step units per round of variants: 200 s allow 2000 steps.
    assert gpu_check.fit_steps(300, 0.010, 200.0) == 300
    assert gpu_check.fit_steps(5000, 0.010, 200.0) == math.floor(200.0 / (0.010 * sum(gpu_check.PASSES.values())))
    assert gpu_check.fit_steps(300, 100.0, 1.0) == 1


def test_invalid_arguments(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.parse_arguments(["--steps", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_arguments(["--max-seconds", "-1"])
