"""Clipping of the final update direction by ``max_grad_norm`` in SAM and CR-SAM."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from crsam.optim import CRSAM, SAM

# Float64 round-off, as in test_optim.py. The direction and its clipping factor are each a few
# operations on O(1) numbers, computed in another order by the reference, so they agree to a few
# ulps (2.2e-16 each). 1e-12 leaves a margin of about 1000 ulps.
ROUND_OFF_RTOL = 1e-12
ROUND_OFF_ATOL = 1e-13


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(7, 2, generator=generator, dtype=torch.float64)
    return x, y


def closure_for(model, optimizer, x, y):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def reference_direction(model, x, y, rho, alpha, beta) -> list[torch.Tensor]:
    """Compute d = (1 + alpha + beta) g+ + (alpha - beta) g- - 2 alpha g0 from its definition."""
    names = [name for name, _ in model.named_parameters()]
    w = {name: p.detach().clone() for name, p in model.named_parameters()}

    def loss(params):
        return nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    g0 = grad(loss)(w)
    norm = torch.sqrt(sum((g0[n] ** 2).sum() for n in names))
    g_plus = grad(loss)({n: w[n] + rho * g0[n] / norm for n in names})
    g_minus = grad(loss)({n: w[n] - rho * g0[n] / norm for n in names})
    return [(1 + alpha + beta) * g_plus[n] + (alpha - beta) * g_minus[n] - 2 * alpha * g0[n] for n in names]


def clipped_by_torch(direction: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], float]:
    """Clip copies of the direction with torch.nn.utils.clip_grad_norm_; return them and the norm."""
    holders = [torch.zeros_like(d, requires_grad=True) for d in direction]
    for holder, d in zip(holders, direction):
        holder.grad = d.clone()
    total_norm = torch.nn.utils.clip_grad_norm_(holders, max_norm)
    return [holder.grad for holder in holders], float(total_norm)


@pytest.mark.parametrize(
    ("optimizer_class", "hyperparameters"),
    [(SAM, {"rho": 0.3}), (CRSAM, {"rho": 0.3, "alpha": 0.4, "beta": 0.2})],
)
def test_direction_clipped_like_clip_grad_norm(optimizer_class, hyperparameters):
    model = make_model()
    x, y = make_batch()
    alpha, beta = hyperparameters.get("alpha", 0.0), hyperparameters.get("beta", 0.0)
    direction = reference_direction(model, x, y, hyperparameters["rho"], alpha, beta)
    norm = float(torch.sqrt(sum((d**2).sum() for d in direction)))
    max_norm = 0.25 * norm
    expected, total_norm = clipped_by_torch(direction, max_norm)
    before = [p.detach().clone() for p in model.parameters()]

    # With plain SGD at lr = 1 the step is exactly w <- w - clipped d.
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, max_grad_norm=max_norm, lr=1.0, **hyperparameters)
    optimizer.step(closure_for(model, optimizer, x, y))

    assert total_norm == pytest.approx(norm, rel=1e-12)
    update = [b - p.detach() for b, p in zip(before, model.parameters())]
    for got, want in zip(update, expected):
        torch.testing.assert_close(got, want, rtol=ROUND_OFF_RTOL, atol=ROUND_OFF_ATOL)
    # The clipped update has norm max_norm up to clip_grad_norm_'s 1e-6 added to the norm.
    update_norm = float(torch.sqrt(sum((u**2).sum() for u in update)))
    assert update_norm == pytest.approx(max_norm * norm / (norm + 1e-6), rel=1e-12)


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_bound_above_norm_leaves_step_unchanged(optimizer_class):
    x, y = make_batch()
    runs = []
    for max_grad_norm in (None, 1e6):
        model = make_model()
        optimizer = optimizer_class(model.parameters(), torch.optim.SGD, max_grad_norm=max_grad_norm, lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.step(closure_for(model, optimizer, x, y))
        runs.append([p.detach().clone() for p in model.parameters()])

    # The clipping factor is clamped to exactly 1.0, and multiplying by 1.0 is exact.
    for clipped, unclipped in zip(*runs):
        assert torch.equal(clipped, unclipped)


def test_clipping_with_grad_scaler_uses_unscaled_direction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    kwargs = {"rho": 0.1, "max_grad_norm": 0.05, "lr": 0.1, "momentum": 0.9}
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, **kwargs)
    twin_optimizer = CRSAM(twin.parameters(), torch.optim.SGD, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)

    def scaled_closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        return loss

    for _ in range(3):
        optimizer.step(scaled_closure, scaler=scaler)
        twin_optimizer.step(closure_for(twin, twin_optimizer, x, y))

    # Scaling by powers of two is exact in float32, so the clipping factor, computed from the
    # unscaled direction, is the same in both runs, and they agree bit for bit. Clipping the
    # scaled direction instead would shrink it by another factor of up to 2**12.
    for param, twin_param in zip(model.parameters(), twin.parameters()):
        assert torch.equal(param, twin_param)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.0, r"max_grad_norm must be finite and > 0, or None to turn clipping off, got 0\.0"),
        (-1.0, r"max_grad_norm must be finite and > 0, or None to turn clipping off, got -1\.0"),
        (float("nan"), r"max_grad_norm must be finite and > 0, or None to turn clipping off, got nan"),
        (float("inf"), r"max_grad_norm must be finite and > 0, or None to turn clipping off, got inf"),
        ("1.0", r"max_grad_norm must be None or a positive real number, got '1\.0'"),
        (True, r"max_grad_norm must be None or a positive real number, got True"),
    ],
)
@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_invalid_max_grad_norm_rejected(optimizer_class, value, message):
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=message):
        optimizer_class(model.parameters(), torch.optim.SGD, max_grad_norm=value, lr=0.1)


def test_group_with_other_bound_rejected():
    model = nn.Linear(2, 1)
    optimizer = CRSAM([model.weight], torch.optim.SGD, max_grad_norm=1.0, lr=0.1)
    with pytest.raises(ValueError, match=r"max_grad_norm 2\.0 of the new group differs from 1\.0"):
        optimizer.add_param_group({"params": [model.bias], "max_grad_norm": 2.0})


def test_added_group_takes_bound():
    model = nn.Linear(2, 1)
    optimizer = SAM([model.weight], torch.optim.SGD, max_grad_norm=1.5, lr=0.1)
    optimizer.add_param_group({"params": [model.bias]})

    assert [group["max_grad_norm"] for group in optimizer.param_groups] == [1.5, 1.5]


def test_bound_survives_state_dict():
    model = make_model()
    x, y = make_batch()
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, max_grad_norm=0.7, lr=0.1, momentum=0.9)
    optimizer.step(closure_for(model, optimizer, x, y))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)

    other = CRSAM(make_model().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    other.load_state_dict(torch.load(buffer, weights_only=True))

    assert other.param_groups[0]["max_grad_norm"] == 0.7
    assert other.base_optimizer.param_groups[0]["max_grad_norm"] == 0.7


def test_state_dict_without_bound_loads_unclipped():
    model = make_model()
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, max_grad_norm=0.7, lr=0.1)
    state = optimizer.state_dict()
    # A state dict written before max_grad_norm existed has no such key in its groups.
    for group in state["param_groups"]:
        del group["max_grad_norm"]

    optimizer.load_state_dict(state)

    assert optimizer.param_groups[0]["max_grad_norm"] is None


def test_state_dict_with_invalid_bound_rejected():
    model = make_model()
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    state = optimizer.state_dict()
    state["param_groups"][0]["max_grad_norm"] = -3.0

    with pytest.raises(ValueError, match=r"max_grad_norm must be finite and > 0"):
        optimizer.load_state_dict(state)


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_later_groups_take_first_group_bound(optimizer_class):
    # One bound clips all parameters, so a group that leaves max_grad_norm out takes the first
    # group's value, and the state dict shows the bound that applies to it.
    model = nn.Linear(3, 2)
    optimizer = optimizer_class(
        [{"params": [model.weight], "max_grad_norm": 1.0}, {"params": [model.bias]}], torch.optim.SGD, lr=0.1
    )
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert [group["max_grad_norm"] for group in optimizer.param_groups] == [1.0, 1.0, 1.0]
    assert [group["max_grad_norm"] for group in optimizer.state_dict()["param_groups"]] == [1.0, 1.0, 1.0]
