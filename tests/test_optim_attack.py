"""Edge cases of the SAM and CR-SAM step that the gradient-handover and weight-cache paths must survive.

CR-SAM builds its direction in place in the gradient tensors of a pass, and the weight copies are
reused while each parameter keeps its data pointer, shape, dtype and device. These tests give the
step gradients that it does not own alone (aliased or expanded tensors from
``torch.autograd.grad``, tensors a closure keeps), parameters that change shape without changing
storage, and one-element losses. Every case passed with the copying step of commit 02d2a04.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from crsam.optim import CRSAM, SAM, FunctionalClosure

HYPERPARAMETERS = {"rho": 0.1, "alpha": 0.3, "beta": 0.05}
HYPERPARAMETERS_FOR = {SAM: {"rho": HYPERPARAMETERS["rho"]}, CRSAM: HYPERPARAMETERS}


class SumOfWeights(nn.Module):
    """A linear layer whose weight is the sum of two parameters of the same shape.

    The backward pass of the addition returns one gradient tensor for both parameters, so
    ``torch.autograd.grad`` in the batched path returns the same tensor twice.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.delta = nn.Parameter(0.1 * torch.randn(3, 4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + self.delta)


class ScaledBySum(nn.Module):
    """A linear layer scaled by the sum of a parameter, whose gradient autograd returns expanded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3, dtype=torch.float64)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale.sum()


def step_weights(model_class: type[nn.Module], parallel: bool) -> list[torch.Tensor]:
    model = model_class()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, lr=0.1, **HYPERPARAMETERS)
    optimizer.step(FunctionalClosure(model, F.mse_loss, x, y), parallel=parallel)
    return [param.detach().clone() for param in model.parameters()]


def test_parallel_step_with_aliased_gradients():
    sequential = step_weights(SumOfWeights, parallel=False)
    batched = step_weights(SumOfWeights, parallel=True)
    for a, b in zip(sequential, batched):
        # The two paths differ only in summation order: float64 round-off on values of order 1
        # is about 1e-16, and the copying step differed by 4e-17. Building the direction in place
        # in one gradient tensor shared by both parameters applies each term twice (3e-2 off).
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_parallel_step_with_expanded_gradient():
    sequential = step_weights(ScaledBySum, parallel=False)
    # The batched gradient of ``scale`` has stride 0, so writing into it in place raises.
    batched = step_weights(ScaledBySum, parallel=True)
    for a, b in zip(sequential, batched):
        # Summation order only, as in the test above (the copying step differed by 2e-16).
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def reusing_closure_run(optimizer_class, reuse: bool, **kwargs) -> list[torch.Tensor]:
    """Take one step with a closure that clones each gradient, or copies it into its own tensors."""
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = nn.Linear(3, 2, dtype=torch.float64)
    params = list(model.parameters())
    preallocated = [torch.zeros_like(param) for param in params]
    optimizer = optimizer_class(params, torch.optim.SGD, lr=0.1, **HYPERPARAMETERS_FOR[optimizer_class], **kwargs)

    def closure():
        loss = F.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params)
        for param, grad, tensor in zip(params, grads, preallocated):
            if reuse:
                tensor.copy_(grad)
                param.grad = tensor
            else:
                param.grad = grad.clone()
        return loss.detach()

    optimizer.step(closure)
    return [param.detach().clone() for param in params]


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_closure_reusing_gradient_tensors(optimizer_class):
    # A closure may hand .grad the same preallocated tensor in every pass, for example to avoid
    # allocations. SAM needs no gradient of an earlier pass. CR-SAM with copy_gradients=True
    # clones g0 and g+ before the next pass overwrites them. The direction is the same
    # arithmetic, so the weights must be equal.
    kwargs = {"copy_gradients": True} if optimizer_class is CRSAM else {}
    expected = reusing_closure_run(optimizer_class, reuse=False)
    found = reusing_closure_run(optimizer_class, reuse=True, **kwargs)
    for a, b in zip(expected, found):
        assert torch.equal(a, b)


def test_closure_reusing_gradient_tensors_is_rejected_without_copies():
    # Without copies, CR-SAM's kept g0 would be overwritten by the pass at w + eps: the version
    # counter of the kept tensor shows the write, and the step raises instead of using it, with
    # the weights restored.
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = nn.Linear(3, 2, dtype=torch.float64)
    params = list(model.parameters())
    before = [param.detach().clone() for param in params]
    preallocated = [torch.zeros_like(param) for param in params]
    optimizer = CRSAM(params, torch.optim.SGD, lr=0.1, **HYPERPARAMETERS)

    def closure():
        loss = F.mse_loss(model(x), y)
        for param, grad, tensor in zip(params, torch.autograd.grad(loss, params), preallocated):
            tensor.copy_(grad)
            param.grad = tensor
        return loss.detach()

    with pytest.raises(RuntimeError, match=r"CRSAM step 1: the closure call at w \+ eps wrote into .*copy_gradients=True"):
        optimizer.step(closure)
    for param, saved in zip(params, before):
        assert torch.equal(param.detach(), saved)


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_one_element_loss(optimizer_class, rho):
    # A loss of shape (1,) is a common closure output (``loss.reshape(1)``, ``loss.unsqueeze(0)``).
    # With rho = 0 the finiteness check gets the loss alone, stacks it to shape (1, 1), and
    # math.isfinite gets a list.
    torch.manual_seed(0)
    model = nn.Linear(3, 1, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 1, dtype=torch.float64)
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, lr=0.1, rho=rho)

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y).reshape(1)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.shape == (1,)


def test_one_element_loss_without_gradients():
    # No parameter receives a gradient, so the step only checks the loss and returns it.
    torch.manual_seed(0)
    model = nn.Linear(3, 1, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        optimizer.zero_grad()
        return model(x).sum().detach().reshape(1)

    loss = optimizer.step(closure)
    assert loss.shape == (1,)


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_weight_copies_follow_shape_change_in_place(optimizer_class):
    # ``param.data = param.data[:2]`` (pruning rows, say) keeps data_ptr() but changes the shape,
    # so the cached copies of w no longer fit. A fresh optimizer from the same weights gives the
    # same operations on the same values, so the weights must be equal.
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def make_closure(optimizer, weight):
        def closure():
            optimizer.zero_grad()
            loss = (x @ weight.t()).pow(2).mean()
            loss.backward()
            return loss

        return closure

    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    optimizer = optimizer_class([weight], torch.optim.SGD, lr=0.1, **HYPERPARAMETERS_FOR[optimizer_class])
    optimizer.step(make_closure(optimizer, weight))
    pointer = weight.data_ptr()
    weight.data = weight.data[:2]
    assert weight.data_ptr() == pointer

    fresh_weight = nn.Parameter(weight.detach().clone())
    fresh = optimizer_class([fresh_weight], torch.optim.SGD, lr=0.1, **HYPERPARAMETERS_FOR[optimizer_class])
    fresh.step(make_closure(fresh, fresh_weight))

    optimizer.step(make_closure(optimizer, weight))
    assert weight.shape == (2, 3)
    assert torch.equal(weight.detach(), fresh_weight.detach())


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_grad_tensor_kept_when_zeroing_in_place(optimizer_class):
    # With ``zero_grad(set_to_none=False)`` a user keeps one gradient tensor per parameter, for
    # example to read it after each step or to give CUDA graphs static addresses. The step must
    # leave the applied direction in that tensor, as SAM does and as CR-SAM did in commit 02d2a04.
    # NOTE: no docstring promises that .grad keeps its identity across steps. This test pins the
    # behaviour of commit 02d2a04.
    torch.manual_seed(0)
    model = nn.Linear(3, 2, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    optimizer = optimizer_class(
        model.parameters(), torch.optim.SGD, lr=0.1, **HYPERPARAMETERS_FOR[optimizer_class]
    )

    def closure():
        optimizer.zero_grad(set_to_none=False)
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    grads_after_first_step = [param.grad for param in model.parameters()]
    optimizer.step(closure)
    for param, grad in zip(model.parameters(), grads_after_first_step):
        assert param.grad is grad
