"""Property tests of crsam.optim.SAM and CRSAM against direct float64 computations."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad

from crsam.optim import CRSAM, SAM, NonFiniteLossError

ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus}

# Float64 round-off: each update component is a sum of a handful of products of O(1) numbers,
# computed in a different order by the optimizer and by the reference, so they differ by a few
# ulps (2.2e-16 each). 1e-12 relative leaves a margin of about 1000 ulps and still fails on any
# wrong coefficient, which changes the result at the 1e-3 level or more.
ROUND_OFF_RTOL = 1e-12
ROUND_OFF_ATOL = 1e-13


def make_mlp(widths: list[int], activation: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers[:-1]).double()


def make_batch(widths: list[int], batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, widths[0], generator=generator, dtype=torch.float64)
    y = torch.randn(batch, widths[-1], generator=generator, dtype=torch.float64)
    return x, y


def closure_for(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, loss_fn=nn.functional.mse_loss):
    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def reference_direction(model, x, y, rho, alpha, beta):
    """Compute d = g+ + alpha (g+ + g- - 2 g0) + beta (g+ - g-) straight from the definition."""
    names = [name for name, _ in model.named_parameters()]
    w = {name: p.detach().clone() for name, p in model.named_parameters()}

    def loss(params):
        return nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    g0 = grad(loss)(w)
    norm = torch.sqrt(sum((g0[n] ** 2).sum() for n in names))
    eps = {n: rho * g0[n] / norm for n in names}
    g_plus = grad(loss)({n: w[n] + eps[n] for n in names})
    g_minus = grad(loss)({n: w[n] - eps[n] for n in names})
    return {
        n: g_plus[n] + alpha * (g_plus[n] + g_minus[n] - 2 * g0[n]) + beta * (g_plus[n] - g_minus[n])
        for n in names
    }


architectures = st.tuples(
    st.lists(st.integers(1, 6), min_size=2, max_size=4),
    st.sampled_from(sorted(ACTIVATIONS)),
    st.integers(0, 2**16),
    st.integers(1, 9),
)


@given(
    architecture=architectures,
    rho=st.floats(1e-3, 0.5),
    alpha=st.floats(0.0, 1.0),
    beta=st.floats(0.0, 1.0),
)
def test_crsam_update_matches_definition(architecture, rho, alpha, beta):
    widths, activation, seed, batch = architecture
    model = make_mlp(widths, activation, seed)
    x, y = make_batch(widths, batch, seed)
    expected = reference_direction(model, x, y, rho, alpha, beta)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # With plain SGD at lr = 1 the step is exactly w <- w - d.
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, beta=beta, lr=1.0)
    optimizer.step(closure_for(model, optimizer, x, y))

    for name, param in model.named_parameters():
        torch.testing.assert_close(
            before[name] - param.detach(), expected[name], rtol=ROUND_OFF_RTOL, atol=ROUND_OFF_ATOL
        )


@given(architecture=architectures, rho=st.floats(1e-3, 0.5))
def test_sam_update_matches_definition(architecture, rho):
    widths, activation, seed, batch = architecture
    model = make_mlp(widths, activation, seed)
    x, y = make_batch(widths, batch, seed)
    expected = reference_direction(model, x, y, rho, 0.0, 0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=1.0)
    optimizer.step(closure_for(model, optimizer, x, y))

    for name, param in model.named_parameters():
        torch.testing.assert_close(
            before[name] - param.detach(), expected[name], rtol=ROUND_OFF_RTOL, atol=ROUND_OFF_ATOL
        )


@given(architecture=architectures, rho=st.floats(1e-4, 10.0))
def test_perturbation_length_equals_rho(architecture, rho):
    widths, activation, seed, batch = architecture
    model = make_mlp(widths, activation, seed)
    x, y = make_batch(widths, batch, seed)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    seen: list[torch.Tensor] = []

    def closure():
        seen.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        return closure_for(model, optimizer, x, y)()

    optimizer.step(closure)

    # ||eps|| = rho * ||g0|| / ||g0||: the ratio is 1 up to the round-off of two norms and a
    # subtraction w + eps - w, whose error is relative to |w| (up to ~3 here) rather than |eps|.
    w, w_plus, w_minus = seen
    scale = max(1.0, float(w.abs().max()))
    tolerance = 64 * torch.finfo(torch.float64).eps * scale * math.sqrt(w.numel())
    assert seen[0].shape == w_plus.shape
    assert abs(float(torch.linalg.vector_norm(w_plus - w)) - rho) <= tolerance
    assert abs(float(torch.linalg.vector_norm(w - w_minus)) - rho) <= tolerance
    torch.testing.assert_close(w_plus - w, w - w_minus, rtol=0, atol=tolerance)


def test_group_rho_uses_global_norm():
    model = make_mlp([3, 4, 2], "tanh", seed=3)
    x, y = make_batch([3, 4, 2], 5, seed=3)
    first, second = list(model.children())[0], list(model.children())[2]
    optimizer = CRSAM(
        [{"params": first.parameters(), "rho": 0.2}, {"params": second.parameters()}],
        torch.optim.SGD,
        rho=0.05,
        lr=0.1,
    )
    closure = closure_for(model, optimizer, x, y)
    closure()
    g0 = [p.grad.detach().clone() for p in model.parameters()]
    global_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in g0]))
    seen = []

    def recording_closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        return closure()

    optimizer.step(recording_closure)

    # Group 0 (first layer) moves by 0.2 g0 / ||g0||, group 1 by 0.05 g0 / ||g0||.
    rhos = [0.2, 0.2, 0.05, 0.05]
    for index, rho in enumerate(rhos):
        eps = seen[1][index] - seen[0][index]
        torch.testing.assert_close(eps, rho * g0[index] / global_norm, rtol=1e-10, atol=1e-14)


def make_stochastic_model(seed: int, momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8, momentum=momentum),
        nn.GELU(),
        nn.Dropout(0.3),
        nn.Linear(8, 3),
    ).double()


def run_trajectory(optimizer_factory, steps: int, seed: int = 0):
    """Train the dropout + BatchNorm model; return final state, losses and the next random draw."""
    model = make_stochastic_model(seed)
    optimizer = optimizer_factory(model)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=generator)
        losses.append(optimizer.step(closure_for(model, optimizer, x, y, nn.functional.cross_entropy)).item())
    return model.state_dict(), losses, torch.rand(3)


def assert_same_run(a, b):
    state_a, losses_a, draw_a = a
    state_b, losses_b, draw_b = b
    assert losses_a == losses_b
    assert torch.equal(draw_a, draw_b)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


SGD_ARGS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}


def test_rho_zero_follows_base_optimizer_exactly():
    base = run_trajectory(lambda m: torch.optim.SGD(m.parameters(), **SGD_ARGS), steps=6)
    crsam = run_trajectory(lambda m: CRSAM(m.parameters(), torch.optim.SGD, rho=0.0, model=m, **SGD_ARGS), 6)
    sam = run_trajectory(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.0, model=m, **SGD_ARGS), 6)

    assert_same_run(base, crsam)
    assert_same_run(base, sam)


def test_alpha_beta_zero_follows_sam_exactly():
    sam = run_trajectory(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.1, model=m, **SGD_ARGS), 6)
    crsam = run_trajectory(
        lambda m: CRSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.0, beta=0.0, model=m, **SGD_ARGS), 6
    )

    assert_same_run(sam, crsam)


def test_random_state_as_if_closure_ran_once():
    model = make_stochastic_model(seed=5)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=0.1, model=model, lr=0.1)
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    masks = []

    def closure():
        optimizer.zero_grad()
        masks.append(torch.rand(5))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    torch.manual_seed(11)
    optimizer.step(closure)
    after_step = torch.rand(4)
    torch.manual_seed(11)
    torch.rand(5)
    model(x)
    after_one_closure = torch.rand(4)

    assert len(masks) == 3
    assert torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], masks[2])
    assert torch.equal(after_step, after_one_closure)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_batchnorm_buffers_as_after_pass_at_w(optimizer_class, momentum):
    model = make_stochastic_model(seed=2, momentum=momentum)
    reference = copy.deepcopy(model)
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, rho=0.5, model=model, lr=0.1)

    torch.manual_seed(0)
    optimizer.step(closure_for(model, optimizer, x, y, nn.functional.cross_entropy))
    torch.manual_seed(0)
    reference(x)

    batchnorm, expected = model[1], reference[1]
    assert torch.equal(batchnorm.running_mean, expected.running_mean)
    assert torch.equal(batchnorm.running_var, expected.running_var)
    assert torch.equal(batchnorm.num_batches_tracked, expected.num_batches_tracked)


def test_weights_restored_when_closure_raises():
    model = make_mlp([3, 5, 2], "tanh", seed=1)
    x, y = make_batch([3, 5, 2], 4, seed=1)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    inner = closure_for(model, optimizer, x, y)
    calls = []

    def failing_closure():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("data loader failed")
        return inner()

    with pytest.raises(RuntimeError, match="data loader failed"):
        optimizer.step(failing_closure)

    for param, saved in zip(model.parameters(), before):
        assert torch.equal(param.detach(), saved)


def test_parameter_reached_only_when_perturbed():
    torch.manual_seed(0)
    used, late = nn.Linear(3, 1).double(), nn.Linear(3, 1).double()
    params = list(used.parameters()) + list(late.parameters())
    optimizer = CRSAM(params, torch.optim.SGD, rho=0.2, lr=0.1)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    late_before = [p.detach().clone() for p in late.parameters()]
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        output = used(x) if len(calls) == 1 else used(x) + late(x)
        loss = nn.functional.mse_loss(output, y)
        loss.backward()
        return loss

    optimizer.step(closure)

    # `late` had no gradient at w, so it is neither perturbed nor updated.
    for param, saved in zip(late.parameters(), late_before):
        assert torch.equal(param.detach(), saved)
        assert param.grad is None


def test_no_gradient_is_a_no_op():
    model = make_mlp([2, 3, 1], "tanh", seed=0)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    loss = optimizer.step(lambda: torch.tensor(1.5))

    assert float(loss) == 1.5
    for param, saved in zip(model.parameters(), before):
        assert torch.equal(param.detach(), saved)


def test_zero_gradient_gives_no_nan():
    model = nn.Linear(3, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)

    # The loss (w . x)^2 has gradient 2 (w . x) x = 0 at w = 0.
    def closure():
        optimizer.zero_grad()
        loss = (model(x) ** 2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)

    assert torch.equal(model.weight.detach(), torch.zeros(1, 3, dtype=torch.float64))


@pytest.mark.parametrize("bad_pass", [1, 2, 3])
def test_non_finite_loss_names_step(bad_pass):
    model = make_mlp([3, 4, 1], "tanh", seed=0)
    x, y = make_batch([3, 4, 1], 4, seed=0)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    inner = closure_for(model, optimizer, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        loss = inner()
        return loss * float("nan") if len(calls) == bad_pass else loss

    where = ["w", r"w \+ eps", "w - eps"][bad_pass - 1]
    with pytest.raises(NonFiniteLossError, match=rf"CRSAM step 1: the loss at {where} is nan"):
        optimizer.step(closure)
    for param, saved in zip(model.parameters(), before):
        assert torch.equal(param.detach(), saved)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": -0.1}, r"rho must be finite and >= 0, got -0\.1"),
        ({"rho": float("nan")}, r"rho must be finite and >= 0, got nan"),
        ({"alpha": -1.0}, r"alpha must be finite and >= 0, got -1\.0"),
        ({"beta": float("inf")}, r"beta must be finite and >= 0, got inf"),
        ({"rho": "0.1"}, r"rho must be a non-negative real number, got '0\.1'"),
        ({"alpha": True}, r"alpha must be a non-negative real number, got True"),
    ],
)
def test_invalid_hyperparameter_rejected(kwargs, message):
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=message):
        CRSAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_invalid_group_rho_rejected():
    model = nn.Linear(2, 1)
    optimizer = CRSAM([model.weight], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"rho must be finite and >= 0, got -2"):
        optimizer.add_param_group({"params": [model.bias], "rho": -2})


def test_base_optimizer_instance_rejected():
    model = nn.Linear(2, 1)
    instance = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer class"):
        CRSAM(model.parameters(), instance, lr=0.1)


def test_step_without_closure_rejected():
    model = nn.Linear(2, 1)
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="needs a closure"):
        optimizer.step()


def test_added_group_takes_defaults():
    model = nn.Linear(2, 1)
    optimizer = CRSAM([model.weight], torch.optim.SGD, rho=0.2, alpha=0.3, beta=0.04, lr=0.5, momentum=0.9)
    optimizer.add_param_group({"params": [model.bias], "alpha": 0.7})

    group = optimizer.param_groups[1]
    assert (group["rho"], group["alpha"], group["beta"]) == (0.2, 0.7, 0.04)
    assert (group["lr"], group["momentum"]) == (0.5, 0.9)
    assert optimizer.base_optimizer.param_groups[1] is group


def test_scheduler_drives_base_optimizer():
    model = nn.Linear(2, 1).double()
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    optimizer.step(closure_for(model, optimizer, x, y))
    scheduler.step()

    assert optimizer.base_optimizer.param_groups[0]["lr"] == 0.5

    # The next step moves the weights by lr * d with the scheduled lr = 0.5.
    expected = reference_direction(model, x, y, 0.1, 0.1, 0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step(closure_for(model, optimizer, x, y))
    for name, param in model.named_parameters():
        torch.testing.assert_close(before[name] - param.detach(), 0.5 * expected[name], rtol=1e-12, atol=1e-14)


def test_resume_from_state_dict_is_exact():
    def build():
        model = make_stochastic_model(seed=7)
        optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=0.1, model=model, **SGD_ARGS)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
        return model, optimizer, scheduler

    generator = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(16, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(8)
    ]

    def train(model, optimizer, scheduler, batch_range):
        for x, y in batch_range:
            optimizer.step(closure_for(model, optimizer, x, y, nn.functional.cross_entropy))
            scheduler.step()

    torch.manual_seed(0)
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, batches)
    uninterrupted = model.state_dict()

    torch.manual_seed(0)
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, batches[:5])
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
         "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, optimizer, scheduler = build()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    train(model, optimizer, scheduler, batches[5:])

    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    assert optimizer.state is optimizer.base_optimizer.state
    assert optimizer.num_steps == 8
    for key, value in uninterrupted.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_state_dict_keeps_hyperparameters():
    model = nn.Linear(2, 1)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=0.3, alpha=0.2, beta=0.05, lr=0.1)
    state = optimizer.state_dict()
    other = CRSAM(nn.Linear(2, 1).parameters(), torch.optim.SGD, lr=0.9)
    other.load_state_dict(state)

    group = other.param_groups[0]
    assert (group["rho"], group["alpha"], group["beta"], group["lr"]) == (0.3, 0.2, 0.05, 0.1)


def test_base_state_dict_rejected_with_hint():
    model = nn.Linear(2, 1)
    base_state = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="no 'rho'"):
        optimizer.load_state_dict(base_state)


def test_adamw_base_optimizer_state_round_trips():
    model = make_mlp([3, 4, 2], "gelu", seed=4)
    x, y = make_batch([3, 4, 2], 6, seed=4)
    optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, weight_decay=0.01)
    optimizer.step(closure_for(model, optimizer, x, y))
    state = optimizer.state_dict()

    assert len(state["state"]) == 4
    assert all("exp_avg" in entry for entry in state["state"].values())


def scaled_closure(model, optimizer, x, y, scaler, poison_call=None):
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if len(calls) == poison_call:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        return loss

    return closure


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_grad_scaler_matches_unscaled_step(optimizer_class):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    twin_optimizer = optimizer_class(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)

    for _ in range(3):
        optimizer.step(scaled_closure(model, optimizer, x, y, scaler), scaler=scaler)
        twin_optimizer.step(closure_for(twin, twin_optimizer, x, y))

    # Scaling by a power of two is exact in float32, so both runs agree bit for bit.
    for param, twin_param in zip(model.parameters(), twin.parameters()):
        assert torch.equal(param, twin_param)
    assert scaler.get_scale() == 2.0**15


@pytest.mark.parametrize("poison_call", [1, 2, 3])
def test_grad_scaler_overflow_skips_step(poison_call):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = [p.detach().clone() for p in model.parameters()]

    optimizer.step(scaled_closure(model, optimizer, x, y, scaler, poison_call), scaler=scaler)

    for param, saved in zip(model.parameters(), before):
        assert torch.equal(param.detach(), saved)
    assert scaler.get_scale() == 2.0**11
    assert len(optimizer.state_dict()["state"]) == 0
