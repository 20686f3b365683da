"""Label smoothing, the warmup-plus-cosine schedule and torch.compile in training runs."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import crsam.steps
from crsam.checkpoint import load_checkpoint
from crsam.data import load_mnist1d
from crsam.errors import UsageError
from crsam.models import build_model
from crsam.steps import StepRecipe, compile_model, make_closure, take_step
from crsam.train import build_scheduler, resolve_options, train, warmup_cosine_factor

TINY = {"num_samples": 500, "batch_size": 64, "epochs": 3, "seed": 6, "device": "cpu"}


def timeless(metrics):
    return [{key: value for key, value in record.items() if key != "seconds"} for record in metrics]


@pytest.fixture(scope="module")
def batch():
    data = load_mnist1d(num_samples=500)
    return data.x_train[:64], data.y_train[:64]


# ---------------------------------------------------------------------------- label smoothing


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_smoothed_loss_closed_form(batch, eps):
    x, y = batch
    torch.manual_seed(0)
    model = build_model("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = make_closure(model, optimizer, x, y, StepRecipe(device_type="cpu", label_smoothing=eps))()

    # Cross-entropy against (1 - eps) one-hot + eps / C uniform, in float64 from the same logits.
    with torch.no_grad():
        log_p = torch.log_softmax(model(x).double(), dim=1)
    exact = -((1 - eps) * log_p.gather(1, y[:, None]).squeeze(1) + eps * log_p.mean(dim=1)).mean()
    # Float32 log-softmax and a mean of 64 terms of size up to about 3: error below 1e-5.
    assert float(loss) == pytest.approx(float(exact), abs=1e-5)


def test_smoothing_changes_training_not_metrics(tmp_path):
    train({**TINY, "epochs": 1, "label_smoothing": 0.2}, out=tmp_path / "smooth", progress=False)
    payload = load_checkpoint(tmp_path / "smooth" / "checkpoint.pt")
    from crsam.train import evaluate, restore_run

    run = restore_run(tmp_path / "smooth" / "checkpoint.pt")
    loss, _ = evaluate(run.model, run.data.x_train, run.data.y_train)
    # The logged training loss is the plain cross-entropy at w, whatever the training targets.
    assert payload["metrics"][0]["train_loss"] == loss
    train({**TINY, "epochs": 1}, out=tmp_path / "plain", progress=False)
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    assert any(not torch.equal(plain["model"][key], payload["model"][key]) for key in plain["model"])


# ---------------------------------------------------------------------------- schedule


def closed_form_lr(step, lr, warmup_steps, total_steps):
    """Return lr (step + 1) / W during warmup, then lr (1 + cos(pi t / T)) / 2.

    The cosine's argument is rounded as pi * (t / T), like the code's. Near the end 1 + cos is
    small, and a different rounding of the argument would be amplified there by the cancellation.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * 0.5 * (1 + math.cos(math.pi * ((step - warmup_steps) / (total_steps - warmup_steps))))


def test_schedule_curve_closed_form():
    # 7 steps per epoch, 2 warmup epochs of 10: the rate of every step against the closed form.
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.4)
    scheduler = build_scheduler(optimizer, 10, warmup_epochs=2, steps_per_epoch=7)
    rates = []
    for _ in range(70):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [closed_form_lr(step, 0.4, 14, 70) for step in range(70)]
    # LambdaLR multiplies the initial rate by the factor. The halving is exact, so both sides
    # round the same product once. Being one step off would change a rate by at least 7e-4 relative.
    assert rates == pytest.approx(expected, rel=1e-15, abs=0)
    assert rates[13] == 0.4
    assert rates[0] == pytest.approx(0.4 / 14, rel=1e-15)
    assert rates[-1] > 0


@pytest.mark.parametrize(("step", "expected"), [(0, 0.25), (3, 1.0), (4, 1.0), (6, 0.5), (7, 0.5 * (1 + math.cos(math.pi * 3 / 4)))])
def test_warmup_factor_values(step, expected):
    assert warmup_cosine_factor(step, warmup_steps=4, total_steps=8) == pytest.approx(expected, rel=1e-15)


def test_run_logs_warmup_rates(tmp_path):
    # 400 examples in batches of 64 are 7 steps per epoch, so epoch e starts at step 7 (e - 1).
    train({**TINY, "warmup_epochs": 1, "lr": 0.3}, out=tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [closed_form_lr(7 * epoch, 0.3, 7, 21) for epoch in range(3)]
    assert [record["lr"] for record in records] == pytest.approx(expected, rel=1e-15, abs=0)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["schedule"] == "linear warmup over 1 epochs, then cosine, stepped per step"


def test_warmup_run_resumes_exactly(tmp_path):
    options = {**TINY, "warmup_epochs": 1}
    train(options, out=tmp_path / "whole", progress=False)
    train(options, out=tmp_path / "parts", progress=False, stop_after_epoch=1)
    train({}, out=tmp_path / "parts", resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    parts = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for key, value in whole["model"].items():
        assert torch.equal(parts["model"][key], value), key
    assert timeless(parts["metrics"]) == timeless(whole["metrics"])
    assert parts["scheduler"]["last_epoch"] == whole["scheduler"]["last_epoch"] == 21


# ---------------------------------------------------------------------------- torch.compile


def two_steps(model, step_model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    recipe = StepRecipe(device_type="cpu")
    for half in (slice(0, 32), slice(32, 64)):
        take_step(optimizer, make_closure(step_model, optimizer, x[half], y[half], recipe), recipe)
    return [p.detach().clone() for p in model.parameters()]


def compare_with_eager(batch, backend, monkeypatch):
    """Train a small MLP two steps eagerly, compiled with ``backend`` and in float64; return the weights."""
    x, y = batch
    monkeypatch.setattr(crsam.steps, "COMPILE_BACKEND", backend)
    torch.manual_seed(1)
    eager_model = build_model("mlp")
    reference_model = build_model("mlp").double()
    reference_model.load_state_dict(eager_model.state_dict())
    torch.manual_seed(1)
    compiled_model = build_model("mlp")
    eager = two_steps(eager_model, eager_model, x, y)
    compiled = two_steps(compiled_model, compile_model(compiled_model), x, y)
    reference = two_steps(reference_model, reference_model, x.double(), y)

    # Both float32 runs compute the same function with reordered or fused operations, so each is
    # as far from the float64 result as float32 round-off makes it. Per tensor, the compiled
    # error may exceed the eager one by a factor 4, plus 4 units of round-off of the weights.
    for e, c, r in zip(eager, compiled, reference):
        eager_error = torch.linalg.vector_norm(e.double() - r)
        compiled_error = torch.linalg.vector_norm(c.double() - r)
        floor = 4 * 2.0**-24 * torch.linalg.vector_norm(r)
        assert compiled_error <= 4 * eager_error + floor
    return eager, compiled


def test_compiled_steps_match_eager(batch, monkeypatch):
    # "aot_eager" traces forward and backward through TorchDynamo and AOTAutograd, as inductor
    # does, but runs the traced graphs with the eager kernels, which takes about a second.
    eager, compiled = compare_with_eager(batch, "aot_eager", monkeypatch)
    assert len(compiled) == len(eager)


@pytest.mark.skipif(
    os.environ.get("CRSAM_TEST_INDUCTOR") != "1",
    reason="inductor compiles C++ kernels, about 30 s for a small MLP on a 2-core CPU; "
    "set CRSAM_TEST_INDUCTOR=1 to run this test",
)
def test_inductor_steps_match_eager(batch, monkeypatch):
    compare_with_eager(batch, "inductor", monkeypatch)


def test_compiled_run_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(crsam.steps, "COMPILE_BACKEND", "aot_eager")
    options = {**TINY, "epochs": 2, "compile": True}
    train(options, out=tmp_path / "whole", progress=False)
    train(options, out=tmp_path / "parts", progress=False, stop_after_epoch=1)
    train({}, out=tmp_path / "parts", resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    parts = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    # The checkpoint stores the eager model's keys, without the "_orig_mod." prefix of torch.compile.
    assert not any(key.startswith("_orig_mod") for key in whole["model"])
    for key, value in whole["model"].items():
        assert torch.equal(parts["model"][key], value), key


# ---------------------------------------------------------------------------- option errors


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"label_smoothing": 1.0}, r"--label-smoothing 1.0 must be below 1; pass a label-smoothing weight such as 0.1"),
        ({"label_smoothing": -0.1}, r"--label-smoothing -0.1 is negative"),
        ({"label_smoothing": float("nan")}, r"--label-smoothing nan is not a finite number"),
        ({"warmup_epochs": -1}, r"--warmup-epochs -1 is below 0"),
        ({"warmup_epochs": 3, "epochs": 3}, r"--warmup-epochs 3 leaves no epoch of the cosine decay in --epochs 3"),
        ({"warmup_epochs": 0.5}, r"--warmup-epochs 0.5 is not an integer"),
        ({"compile": "yes"}, r"--compile 'yes' is not a flag"),
    ],
)
def test_invalid_recipe_options(options, message):
    with pytest.raises(UsageError, match=message):
        resolve_options(options)
