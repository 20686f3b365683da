"""crsam.verification.run_checks: the report of the ``crsam verify`` command."""

import json

import pytest
import torch
from torch import nn

from crsam.verification import run_checks
from crsam.verify import random_classification_data, smooth_mlp


@pytest.fixture(scope="module")
def builtin_report():
    return run_checks()


def test_builtin_networks_pass(builtin_report):
    checks = builtin_report["checks"]
    assert builtin_report["passed"] is True
    # Every smooth network gets every check, and all of them pass.
    for label in ("tanh MLP", "GELU CNN"):
        rows = [c for c in checks if c["name"].startswith(label)]
        assert len(rows) == 6
        assert all(c["passed"] is True for c in rows)
        assert all(c["error"] <= c["tolerance"] for c in rows)
    json.dumps(builtin_report, allow_nan=False)


def test_report_rows_have_contract_keys(builtin_report):
    for check in builtin_report["checks"]:
        assert set(check) == {"name", "error", "tolerance", "passed", "reason"}
        assert check["reason"]


def test_kinked_network_reports_not_applicable(builtin_report):
    # The ReLU network's CR-SAM check straddles kinks at rho = 0.01 (seed 0): not applicable,
    # with the reason, and it does not make the report fail.
    rows = {c["name"]: c for c in builtin_report["checks"] if c["name"].startswith("ReLU MLP")}
    combination = rows["ReLU MLP: CR-SAM gradient combination"]
    assert combination["passed"] is None
    assert combination["error"] is None
    assert "kink" in combination["reason"]
    assert rows["ReLU MLP: Hessian-vector product"]["passed"] is True


def test_user_model_checked_on_output_block():
    model = smooth_mlp([12, 40, 40, 3], "gelu", seed=1, dtype=torch.float32)
    X, y = random_classification_data(300, 12, 3, seed=2, dtype=torch.float32)
    report = run_checks(model, (X, y), max_block_parameters=150, max_examples=64)
    names = [c["name"] for c in report["checks"]]

    # The output layer has 40 * 3 + 3 = 123 parameters, and adding the 40 biases before it would
    # exceed 150, so the block is the output layer.
    assert names[0] == "model: gradient (block 4.weight, 4.bias)"
    assert report["passed"] is True
    # The user's model is untouched: still float32, every parameter still trainable.
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())


def test_broken_estimator_fails_check(monkeypatch):
    # A Hessian-vector product that is off by 1% must make the report fail.
    from crsam.curvature import EmpiricalLoss

    original = EmpiricalLoss.matmat
    monkeypatch.setattr(EmpiricalLoss, "matmat", lambda self, V, w=None: 1.01 * original(self, V, w))
    model = smooth_mlp([4, 5, 3], "tanh", seed=3)
    X, y = random_classification_data(20, 4, 3, seed=4)
    report = run_checks(model, (X, y))
    failed = [c["name"] for c in report["checks"] if c["passed"] is False]
    assert report["passed"] is False
    assert "model: Hessian-vector product" in failed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": nn.Linear(2, 2)}, r"data is missing"),
        ({"rho": 0.0}, r"rho=0.0 is invalid"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_checks(**kwargs)
