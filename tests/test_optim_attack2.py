"""Second review of the SAM and CR-SAM step: hooks, copies of the optimizer, memory, scaler.

Each test here failed against commit 6549a8d. The hook and memory tests passed at commit
51949fe, before ``step()`` called torch's hook wrapper itself and before CR-SAM kept the last
step's gradients. The hook tests compare with torch's own optimizers, whose step pre-hooks receive
the arguments of the ``step`` call and may replace them.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from crsam.optim import CRSAM, SAM, FunctionalClosure

HYPERPARAMETERS = {"rho": 0.1, "alpha": 0.3, "beta": 0.05}
HYPERPARAMETERS_FOR = {SAM: {"rho": HYPERPARAMETERS["rho"]}, CRSAM: HYPERPARAMETERS}


def make_problem(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    x = torch.randn(8, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 3, dtype=dtype, generator=torch.Generator().manual_seed(2))
    return model, x, y


def make_closure(optimizer: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([param.detach().flatten() for param in model.parameters()])


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_step_pre_hook_arguments(optimizer_class):
    model, x, y = make_problem()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, lr=0.1, **HYPERPARAMETERS_FOR[optimizer_class])
    closure = make_closure(optimizer, model, x, y)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append((args, dict(kwargs))))

    optimizer.step(closure)
    optimizer.step(closure=closure)

    # torch.optim.SGD's hooks see (optimizer, closure), {} and then (optimizer,), {"closure": closure}.
    # Since step() calls torch's wrapper itself, the hooks see (optimizer, closure, None) and
    # {"parallel": False} for both calls, so a hook that reads kwargs["closure"] fails.
    assert seen[0][0] == (optimizer, closure)
    assert seen[0][1] == {}
    assert seen[1][0] == (optimizer,)
    assert seen[1][1] == {"closure": closure}


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_step_pre_hook_replacing_closure(optimizer_class):
    model, x, y = make_problem()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, lr=0.1, **HYPERPARAMETERS_FOR[optimizer_class])
    calls = []

    def count_closure_calls(opt, args, kwargs):
        closure = args[1] if len(args) > 1 else kwargs["closure"]

        def counted() -> torch.Tensor:
            calls.append(1)
            return closure()

        # The documented form: return the new (args, kwargs) that step() is called with.
        return (opt, counted), {}

    optimizer.register_step_pre_hook(count_closure_calls)
    # Fails with "TypeError: _step() missing 1 required positional argument: 'scaler'", because
    # the hook's arguments are passed to the internal _step, not to step().
    optimizer.step(make_closure(optimizer, model, x, y))

    passes = 2 if optimizer_class is SAM else 3
    assert len(calls) == passes


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_deepcopy_of_optimizer_steps(optimizer_class):
    model, x, y = make_problem()
    kwargs = HYPERPARAMETERS_FOR[optimizer_class]
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model, **kwargs)
    optimizer.step(make_closure(optimizer, model, x, y))

    # Copying model and optimizer together maps the optimizer's parameters to the copy's.
    # torch.optim.Optimizer.__getstate__ keeps only defaults, state and param_groups, so the copy
    # has no base_optimizer, num_steps or working storage and its step raises AttributeError.
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    optimizer_copy.step(make_closure(optimizer_copy, model_copy, x, y))
    optimizer.step(make_closure(optimizer, model, x, y))

    # The copy runs the same operations on the same values, so the results are bitwise equal.
    assert torch.equal(flat_weights(model_copy), flat_weights(model))
    assert optimizer_copy.num_steps == optimizer.num_steps


def count_gradient_sets(model: nn.Module, optimizer: CRSAM) -> int:
    """Count the distinct storages of live tensors shaped like the first weight, except weights.

    Storages of the parameter itself, of the saved weights and of the stacked weights of the
    batched passes are not gradients, so they are left out.
    """
    param = next(model.parameters())
    weight_storages = {param.untyped_storage().data_ptr()}
    record = optimizer._storage.records.get(id(param))
    if record is not None:
        for tensor in (record.weights, record.stacked):
            if tensor is not None:
                weight_storages.add(tensor.untyped_storage().data_ptr())
    gc.collect()
    storages = set()
    with warnings.catch_warnings():
        # isinstance() on some deprecated torch module attributes warns.
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.shape == param.shape and obj.dtype == param.dtype:
                storage = obj.untyped_storage().data_ptr()
                if storage not in weight_storages:
                    storages.add(storage)
    return len(storages)


def test_batched_step_after_sequential_step_memory():
    model, x, y = make_problem()
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model, **HYPERPARAMETERS)
    for _ in range(2):
        optimizer.step(make_closure(optimizer, model, x, y))
    # Between sequential steps: .grad, and g+ and g- of the last step in _spare.
    assert count_gradient_sets(model, optimizer) <= 3

    optimizer.step(FunctionalClosure(model, F.mse_loss, x, y), parallel=True)
    # After a batched step: .grad and the persistent direction buffer, but _spare still holds the
    # sequential step's g+ and g-, because no batched step releases them. So 4 sets remain.
    assert count_gradient_sets(model, optimizer) <= 3


def test_grad_scaler_with_float64_default_dtype():
    model, x, y = make_problem(torch.float32)
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, lr=0.1, **HYPERPARAMETERS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        return loss

    reference_model, _, _ = make_problem(torch.float32)
    reference = CRSAM(reference_model.parameters(), torch.optim.SGD, lr=0.1, **HYPERPARAMETERS)
    reference_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def reference_closure() -> torch.Tensor:
        reference.zero_grad()
        loss = F.mse_loss(reference_model(x), y)
        reference_scaler.scale(loss).backward()
        return loss

    reference.step(reference_closure, reference_scaler)

    # GradScaler itself works with a float64 default dtype. The optimizer's _Unscaler creates its
    # found_inf flag with torch.zeros((), device=...), which then is float64, and
    # torch._amp_foreach_non_finite_check_and_unscale_ raises "found_inf must be a float tensor".
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        optimizer.step(closure, scaler)
    finally:
        torch.set_default_dtype(previous)

    # The default dtype changes no float32 value of the step, so the weights are bitwise equal.
    assert torch.equal(flat_weights(model), flat_weights(reference_model))


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_state_dict_hooks_on_wrapper(optimizer_class):
    model, _, _ = make_problem()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, lr=0.1, **HYPERPARAMETERS_FOR[optimizer_class])
    calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("state_dict pre"))
    optimizer.register_state_dict_post_hook(lambda opt, state: calls.append("state_dict post"))
    optimizer.register_load_state_dict_pre_hook(lambda opt, state: calls.append("load_state_dict pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load_state_dict post"))

    optimizer.load_state_dict(optimizer.state_dict())

    # torch.optim.Optimizer.state_dict and load_state_dict run these hooks. The wrapper's
    # overrides call the base optimizer's methods, which run the base optimizer's hooks only,
    # so hooks registered on the wrapper never run.
    assert "state_dict pre" in calls
    assert "state_dict post" in calls
    assert "load_state_dict pre" in calls
    assert "load_state_dict post" in calls
