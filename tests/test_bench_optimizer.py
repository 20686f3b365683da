"""The optimizer benchmark's own variants: the operations-only step and a smoke run of the script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_optimizer  # noqa: E402

from crsam.models import build_model  # noqa: E402
from crsam.optim import CRSAM  # noqa: E402


@pytest.mark.parametrize("small", [True, False])
def test_operations_only_matches_crsam(small):
    # The variant claims to run crsam's tensor operations and nothing else, so on the same model
    # and batch its steps must give crsam's weights bit for bit, on both ways of moving the weights.
    torch.manual_seed(0)
    model = build_model("cnn1d", activation="gelu")
    twin = build_model("cnn1d", activation="gelu")
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    b = bench_optimizer
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=b.RHO, alpha=b.ALPHA, beta=b.BETA, model=model, **b.SGD_ARGS)
    operations = b.OperationsOnly(twin)
    operations.small = small

    def closure():
        optimizer.zero_grad()
        return b.forward_backward(model, x, y)

    for _ in range(3):
        optimizer.step(closure)
        operations.step(twin, x, y)
    for param, twin_param in zip(model.parameters(), twin.parameters()):
        assert torch.equal(param, twin_param)


def test_benchmark_runs_and_reports(monkeypatch, capsys):
    monkeypatch.setattr(
        sys, "argv", ["bench_optimizer.py", "--models", "cnn1d", "--repeats", "2", "--steps", "1", "--ablation", "--json"]
    )
    threads = torch.get_num_threads()
    try:
        bench_optimizer.main()
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    # The ablation swaps crsam internals only while its variants run.
    import crsam._optim_state
    import crsam.optim

    assert crsam.optim._RandomState is crsam._optim_state._RandomState
    (result,) = report["results"]
    assert result["model"] == "cnn1d"
    assert set(result["ablation_overhead_ms"]) == {"random_state", "finiteness_check", "reuse_check", "normalization"}
    assert result["crsam_over_floor"][1] > 0
    assert result["median_minor_faults_per_step"]["crsam"] >= 0
