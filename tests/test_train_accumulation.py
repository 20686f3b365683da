"""Gradient accumulation: K micro-batches give the gradient and the update of the whole batch."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from crsam.checkpoint import load_checkpoint
from crsam.data import load_mnist1d
from crsam.errors import UsageError
from crsam.models import build_model
from crsam.steps import StepRecipe, make_closure, take_step
from crsam.train import build_optimizer, resolve_options, train

# Unit round-off of float32 and of float64.
U32 = 2.0**-24
U64 = 2.0**-53


def gamma(n, u):
    """Higham's gamma_n = n u / (1 - n u), the relative error bound of a sum of n + 1 terms."""
    return n * u / (1 - n * u)


@pytest.fixture(scope="module")
def batch():
    data = load_mnist1d(num_samples=500)
    return data.x_train[:64], data.y_train[:64]


def fresh_mlp(dtype=torch.float32):
    # An MLP has no BatchNorm, so micro-batches change nothing but the summation order.
    torch.manual_seed(4)
    return build_model("mlp").to(dtype)


def accumulated_gradient(model, x, y, steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    closure = make_closure(model, optimizer, x, y, StepRecipe(device_type="cpu", accumulation_steps=steps))
    loss = closure()
    return loss, [p.grad.clone() for p in model.parameters()]


def test_closure_gradient_float32(batch):
    x, y = batch
    model = fresh_mlp()

    # Premise of the bound: each example's logits are computed bit for bit the same in a batch of
    # 64 and in a micro-batch of 16, so the runs differ only in how the batch sum is grouped.
    with torch.no_grad():
        assert torch.equal(model(x)[16:32], model(x[16:32]))

    loss_whole, whole = accumulated_gradient(model, x, y, 1)
    loss_parts, parts = accumulated_gradient(model, x, y, 4)

    # Per-example gradients in float64 give S = (1/n) sum_e |g_e|. The weights 1/64 and 16/64 are
    # powers of two, so scaling is exact, and any grouping of the n = 64 contributions has an
    # error below gamma_63 * S. Two such sums differ by at most 2 gamma_63 S, and the factor 2
    # below covers the float32 contributions exceeding their float64 values (by far less than 1 %).
    reference = copy.deepcopy(model).double()
    parameters = {name: p.detach() for name, p in reference.named_parameters()}

    def example_loss(params, xe, ye):
        return F.cross_entropy(functional_call(reference, params, (xe[None],)), ye[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(parameters, x.double(), y)
    for (name, _), g_whole, g_parts in zip(reference.named_parameters(), whole, parts):
        scale = per_example[name].abs().mean(dim=0)
        bound = 2 * 2 * gamma(63, U32) * scale
        difference = (g_whole.double() - g_parts.double()).abs()
        assert bool((difference <= bound).all()), (name, float((difference - bound).max()))

    # The losses: 64 terms of size ln 10 at most, the same argument.
    assert abs(float(loss_whole) - float(loss_parts)) <= 2 * 2 * gamma(63, U32) * 3.0


@pytest.mark.parametrize("optimizer_name", ["sgd", "sam", "crsam"])
@pytest.mark.parametrize(("batch_size", "steps"), [(64, 4), (10, 4), (7, 7)])
def test_update_matches_whole_batch(batch, optimizer_name, batch_size, steps):
    # Float64, and uneven micro-batches (10 = 3 + 3 + 2 + 2) whose weights 0.3 and 0.2 are
    # inexact. The whole-batch and accumulated updates agree to round-off: the float32 bound
    # above, scaled to float64, is about 1e-14 of the gradient's scale. The perturbed passes of
    # SAM and CR-SAM see eps moved by rho |dg0| / ||g0||, which at most multiplies that by the
    # Hessian norm times rho / ||g0|| (below 100 here). A relative 1e-10 is far above both and
    # far below the O(1) error of a wrong micro-batch weight.
    x, y = batch[0][:batch_size].double(), batch[1][:batch_size]
    updates = []
    for accumulation_steps in (1, steps):
        model = fresh_mlp(torch.float64)
        config = resolve_options({"optimizer": optimizer_name})
        optimizer = build_optimizer(config, model)
        before = [p.detach().clone() for p in model.parameters()]
        recipe = StepRecipe(device_type="cpu", accumulation_steps=accumulation_steps)
        take_step(optimizer, make_closure(model, optimizer, x, y, recipe), recipe)
        updates.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    for whole, parts in zip(*updates):
        assert torch.allclose(parts, whole, rtol=0, atol=1e-10 * float(whole.abs().max()))
        assert float(whole.abs().max()) > 0


def test_wrong_weight_would_fail(batch):
    # The check above can fail: an unweighted sum of micro-batch means is K times too large.
    x, y = batch
    model = fresh_mlp(torch.float64)
    _, whole = accumulated_gradient(model, x.double(), y, 1)
    parts = [torch.zeros_like(g) for g in whole]
    for x_part, y_part in zip(torch.tensor_split(x.double(), 4), torch.tensor_split(y, 4)):
        model.zero_grad()
        F.cross_entropy(model(x_part), y_part).backward()
        for total, p in zip(parts, model.parameters()):
            total += p.grad
    assert not torch.allclose(parts[0], whole[0], rtol=0, atol=1e-10 * float(whole[0].abs().max()))


def test_accumulated_run_resumes_exactly(tmp_path):
    options = {"num_samples": 500, "batch_size": 64, "epochs": 2, "seed": 5, "accumulation_steps": 3}
    train(options, out=tmp_path / "whole", progress=False)
    train(options, out=tmp_path / "parts", progress=False, stop_after_epoch=1)
    train({}, out=tmp_path / "parts", resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    parts = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for key, value in whole["model"].items():
        assert torch.equal(parts["model"][key], value), key


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"accumulation_steps": 0}, r"--accumulation-steps 0 is below 1; pass a whole number such as 2"),
        ({"accumulation_steps": 1.5}, r"--accumulation-steps 1.5 is not an integer"),
        ({"accumulation_steps": 9, "batch_size": 8}, r"--accumulation-steps 9 is larger than --batch-size 8, so some "
                                                     r"micro-batches would be empty"),
    ],
)
def test_invalid_accumulation(options, message):
    with pytest.raises(UsageError, match=message):
        resolve_options(options)
