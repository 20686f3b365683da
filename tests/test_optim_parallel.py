"""CR-SAM's batched perturbed passes (``parallel=True``) against its sequential passes.

Both paths get the same :class:`FunctionalClosure`. The pass at w is the same closure call in
both, so g0, eps, the BatchNorm statistics and the random state after the step are the same. The
two perturbed gradients differ only in the summation order of the batched kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from crsam.optim import CRSAM, SAM, FunctionalClosure

SGD_ARGS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
HYPERPARAMETERS = {"rho": 0.2, "alpha": 0.3, "beta": 0.1}


def make_mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def make_cnn(dtype: torch.dtype) -> nn.Module:
    """A 1-D CNN with BatchNorm and dropout, on inputs of shape (batch, 2, 12)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 6, kernel_size=3, padding=1),
        nn.BatchNorm1d(6),
        nn.GELU(),
        nn.Dropout(0.3),
        nn.Conv1d(6, 4, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm1d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(24, 3),
    ).to(dtype)


def make_batch(kind: str, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (16, 5) if kind == "mlp" else (16, 2, 12)
    return torch.randn(*shape, generator=generator, dtype=dtype), torch.randint(0, 3, (16,), generator=generator)


def train(kind: str, dtype: torch.dtype, parallel: bool, steps: int, give_model: bool = True):
    """Train from a fixed seed; return the model, the losses and the next random draw."""
    model = make_mlp(dtype) if kind == "mlp" else make_cnn(dtype)
    optimizer = CRSAM(
        model.parameters(), torch.optim.SGD, model=model if give_model else None, **HYPERPARAMETERS, **SGD_ARGS
    )
    torch.manual_seed(5)
    losses = []
    for step in range(steps):
        x, y = make_batch(kind, dtype, seed=step)
        closure = FunctionalClosure(model, nn.functional.cross_entropy, x, y)
        losses.append(optimizer.step(closure, parallel=parallel))
    return model, torch.stack(losses), torch.rand(4)


# Tolerances. Both paths compute g+ and g- as sums over the batch and the kernel window, in
# different orders. Reordering a sum of n terms in precision u changes it by at most n * u times
# the sum of |terms|, and by about sqrt(n) * u when the round-off errors have random signs; here
# n <= 16 * 12 * 6 = 1152 (the first convolution's weight gradient), so sqrt(n) is about 34.
# BatchNorm divides by batch standard deviations down to about 0.1 (a factor 10), and three steps
# of lr 0.1 add up their errors: about 34 * 10 * 3 * u = 1e3 * u on O(1) weights, which is 1.1e-13
# in float64 and 6e-5 in float32. The tolerances 1e-10 and 1e-4 sit above these estimates and far
# below the change of a wrong coefficient or another dropout mask (1e-2 or more). Measured
# differences: 1.1e-16 (float64) and 1.2e-7 (float32).
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_parallel_matches_sequential(kind, dtype):
    sequential, losses_sequential, draw_sequential = train(kind, dtype, parallel=False, steps=3)
    parallel, losses_parallel, draw_parallel = train(kind, dtype, parallel=True, steps=3)

    tolerance = TOLERANCES[dtype]
    for (name, value), other in zip(sequential.state_dict().items(), parallel.state_dict().values()):
        torch.testing.assert_close(other, value, rtol=tolerance, atol=tolerance, msg=name)
    # The losses at w come from the same closure call, so the first one is identical.
    assert losses_parallel[0] == losses_sequential[0]
    torch.testing.assert_close(losses_parallel, losses_sequential, rtol=tolerance, atol=tolerance)
    # The random state after each step is as if the closure had run once, on both paths.
    assert torch.equal(draw_parallel, draw_sequential)


def test_parallel_update_matches_definition():
    model = make_mlp(torch.float64)
    x, y = make_batch("mlp", torch.float64)
    names = [name for name, _ in model.named_parameters()]
    w = {name: p.detach().clone() for name, p in model.named_parameters()}

    def loss(params):
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    rho, alpha, beta = HYPERPARAMETERS["rho"], HYPERPARAMETERS["alpha"], HYPERPARAMETERS["beta"]
    g0 = grad(loss)(w)
    norm = torch.sqrt(sum((g0[n] ** 2).sum() for n in names))
    g_plus = grad(loss)({n: w[n] + rho * g0[n] / norm for n in names})
    g_minus = grad(loss)({n: w[n] - rho * g0[n] / norm for n in names})

    optimizer = CRSAM(model.parameters(), torch.optim.SGD, model=model, lr=1.0, **HYPERPARAMETERS)
    optimizer.step(FunctionalClosure(model, nn.functional.cross_entropy, x, y), parallel=True)

    # Float64 round-off of a few operations on O(1) numbers, as in test_optim.py.
    for name, param in model.named_parameters():
        expected = (1 + alpha + beta) * g_plus[name] + (alpha - beta) * g_minus[name] - 2 * alpha * g0[name]
        torch.testing.assert_close(w[name] - param.detach(), expected, rtol=1e-12, atol=1e-13)


def test_dropout_masks_same_as_sequential():
    # y = sum(dropout(x) * w): g+ and g- are dropout(x) for any w, so the update reveals the mask.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(64, 1, bias=False)).double()
    x = torch.ones(1, 64, dtype=torch.float64)
    updates = []
    for parallel in (False, True):
        net = copy.deepcopy(model)
        optimizer = CRSAM(net.parameters(), torch.optim.SGD, model=net, lr=1.0, rho=0.1, alpha=0.0, beta=0.0)
        before = net[1].weight.detach().clone()
        torch.manual_seed(3)
        optimizer.step(FunctionalClosure(net, lambda out, _: out.sum(), x, None), parallel=parallel)
        updates.append(before - net[1].weight.detach())

    # Dropout with p = 0.5 scales kept entries by 2: the update is the mask times 2.
    mask = updates[0] / 2
    assert set(mask.flatten().tolist()) == {0.0, 1.0}
    assert torch.equal(updates[1], updates[0])


@pytest.mark.parametrize("give_model", [True, False])
def test_parallel_leaves_batchnorm_as_pass_at_w(give_model):
    model = make_cnn(torch.float32)
    reference = copy.deepcopy(model)
    x, y = make_batch("cnn", torch.float32)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, model=model if give_model else None, lr=0.1)

    torch.manual_seed(0)
    optimizer.step(FunctionalClosure(model, nn.functional.cross_entropy, x, y), parallel=True)
    torch.manual_seed(0)
    reference(x)

    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name


def test_parallel_in_eval_mode_uses_running_statistics():
    # In eval mode BatchNorm normalizes with its running statistics, which the batched pass
    # must read as the sequential passes do.
    results = []
    for parallel in (False, True):
        model = make_cnn(torch.float64)
        model.train()
        model(make_batch("cnn", torch.float64, seed=7)[0])  # move the statistics off their defaults
        model.eval()
        optimizer = CRSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1, **HYPERPARAMETERS)
        x, y = make_batch("cnn", torch.float64)
        optimizer.step(FunctionalClosure(model, nn.functional.cross_entropy, x, y), parallel=parallel)
        results.append(model.state_dict())

    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-10, atol=1e-10, msg=name)


def test_parallel_keeps_stacked_buffers():
    model = make_mlp(torch.float32)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    x, y = make_batch("mlp", torch.float32)
    closure = FunctionalClosure(model, nn.functional.cross_entropy, x, y)

    optimizer.step(closure, parallel=True)
    first = {key: record.stacked.data_ptr() for key, record in optimizer._storage.records.items()}
    optimizer.step(closure, parallel=True)

    assert len(first) == len(list(model.parameters()))
    assert {key: record.stacked.data_ptr() for key, record in optimizer._storage.records.items()} == first


def test_parallel_with_frozen_parameter_and_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    results = []
    for parallel in (False, True):
        net = copy.deepcopy(model)
        groups = [
            {"params": [net[0].weight], "rho": 0.3, "alpha": 0.5},
            {"params": list(net[2].parameters()), "beta": 0.2},
        ]
        optimizer = CRSAM(groups, torch.optim.SGD, model=net, lr=0.5, rho=0.1)
        optimizer.step(FunctionalClosure(net, nn.functional.cross_entropy, x, y), parallel=parallel)
        results.append(net.state_dict())

    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-12, atol=1e-13, msg=name)
    assert torch.equal(results[1]["0.bias"], model[0].bias)


def test_functional_closure_drives_plain_optimizer():
    model = make_mlp(torch.float64)
    twin = copy.deepcopy(model)
    x, y = make_batch("mlp", torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)

    loss = optimizer.step(FunctionalClosure(model, nn.functional.cross_entropy, (x,), y))
    twin_optimizer.zero_grad()
    twin_loss = nn.functional.cross_entropy(twin(x), y)
    twin_loss.backward()
    twin_optimizer.step()

    assert loss == twin_loss
    assert not loss.requires_grad
    for param, twin_param in zip(model.parameters(), twin.parameters()):
        assert torch.equal(param, twin_param)


def test_parallel_needs_functional_closure():
    model = make_mlp(torch.float32)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=r"parallel=True needs a crsam\.optim\.FunctionalClosure"):
        optimizer.step(lambda: torch.tensor(1.0), parallel=True)


def test_parallel_rejected_for_sam():
    model = make_mlp(torch.float32)
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = make_batch("mlp", torch.float32)
    with pytest.raises(ValueError, match="SAM has one perturbed pass, so there is nothing to batch"):
        optimizer.step(FunctionalClosure(model, nn.functional.cross_entropy, x, y), parallel=True)


def test_parallel_flag_must_be_bool():
    model = make_mlp(torch.float32)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = make_batch("mlp", torch.float32)
    with pytest.raises(TypeError, match="parallel must be True or False, got 'yes'"):
        optimizer.step(FunctionalClosure(model, nn.functional.cross_entropy, x, y), parallel="yes")


def test_functional_closure_with_scaler_rejected():
    model = make_mlp(torch.float32)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = make_batch("mlp", torch.float32)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="a FunctionalClosure does not scale its loss"):
        optimizer.step(FunctionalClosure(model, nn.functional.cross_entropy, x, y), scaler=scaler)


def test_closure_of_other_model_rejected():
    model = make_mlp(torch.float32)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    x, y = make_batch("mlp", torch.float32)
    with pytest.raises(ValueError, match="the FunctionalClosure's model is not the model given to the optimizer"):
        optimizer.step(FunctionalClosure(make_mlp(torch.float32), nn.functional.cross_entropy, x, y), parallel=True)


def test_parameter_outside_model_rejected():
    model = make_mlp(torch.float32)
    stranger = nn.Parameter(torch.ones(3))
    optimizer = CRSAM([*model.parameters(), stranger], torch.optim.SGD, lr=0.1)
    x, y = make_batch("mlp", torch.float32)

    def loss_fn(output, targets):
        return nn.functional.cross_entropy(output, targets) + stranger.sum()

    with pytest.raises(ValueError, match=r"a parameter of shape \(3,\) in the optimizer is not a parameter"):
        optimizer.step(FunctionalClosure(model, loss_fn, x, y), parallel=True)


def test_non_scalar_loss_rejected():
    model = make_mlp(torch.float32)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = make_batch("mlp", torch.float32)

    def per_example_loss(output, targets):
        return nn.functional.cross_entropy(output, targets, reduction="none")

    class SummingClosure(FunctionalClosure):
        """Backpropagate the sum of the per-example losses at w, as a hand-written closure might."""

        def __call__(self):
            model.zero_grad()
            loss = self.loss_fn(self.model(*self.inputs), self.targets).sum()
            loss.backward()
            return loss.detach()

    closure = SummingClosure(model, per_example_loss, x, y)
    with pytest.raises(ValueError, match=r"loss_fn returned a tensor of shape \(16,\); return a scalar"):
        optimizer.step(closure, parallel=True)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (("not a module", nn.functional.mse_loss), TypeError, "model must be a torch.nn.Module, got str"),
        ((nn.Linear(2, 1), "mse"), TypeError, "loss_fn must be callable"),
    ],
)
def test_functional_closure_checks_arguments(arguments, error, message):
    with pytest.raises(error, match=message):
        FunctionalClosure(*arguments, torch.zeros(1, 2), torch.zeros(1, 1))
