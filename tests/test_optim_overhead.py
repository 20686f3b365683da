"""The optimizer's own work per step: allocations, host-device synchronizations, reused buffers.

A torch dispatch mode intercepts every aten operation that the step runs outside the closure,
with its outputs, so it can tell an operation that allocates a new tensor from one that writes in
place.
Host-device synchronizations are counted where Python code reads a tensor's value or copies it
to the CPU (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``numpy``, ``cpu``), and where an
aten operation reads a scalar (``_local_scalar_dense``, which ``.item()`` calls from C++ as well).
On the CPU these calls cost no synchronization, but each one would on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from crsam.optim import CRSAM, SAM

SGD_ARGS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


class StepRecorder(TorchDispatchMode):
    """Record the allocations and scalar reads of the aten operations run while not paused."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.allocations: list[tuple[str, tuple[int, ...]]] = []
        self.scalar_reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads.append(str(func))
        inputs = tree_flatten((args, kwargs))[0]
        input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in input_storages:
                self.allocations.append((str(func), tuple(tensor.shape)))
        return out


def make_model() -> nn.Module:
    # Every parameter has more elements (at least 8) than the model has parameter tensors (6),
    # so the small per-tensor vectors of norms cannot pass for parameter-sized allocations.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 12))


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=generator), torch.randint(0, 12, (16,), generator=generator)


def pause_base_step(optimizer, recorder: StepRecorder) -> None:
    """Hide the base optimizer's step from the recorder: it is part of the floor, not overhead.

    ``torch.optim.SGD`` with weight decay allocates ``grad + weight_decay * param`` itself.
    """
    base_step = optimizer.base_optimizer.step

    def step(*args, **kwargs):
        recorder.paused = True
        try:
            return base_step(*args, **kwargs)
        finally:
            recorder.paused = False

    optimizer.base_optimizer.step = step


def paused_closure(model, optimizer, recorder: StepRecorder, x, y):
    """Return a closure whose own operations (the passes) the recorder does not see."""

    def closure():
        recorder.paused = True
        try:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        finally:
            recorder.paused = False

    return closure


def plain_closure(model, optimizer, x, y):
    """Return the usual closure: zero the gradients, run forward and backward, return the loss."""

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
@pytest.mark.parametrize("max_grad_norm", [None, 0.01])
def test_step_allocates_only_scalars(optimizer_class, max_grad_norm):
    model = make_model()
    x, y = make_batch()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, model=model, max_grad_norm=max_grad_norm, **SGD_ARGS)
    recorder = StepRecorder()
    closure = paused_closure(model, optimizer, recorder, x, y)
    pause_base_step(optimizer, recorder)
    # The first step allocates the buffers and SGD's momentum; the later ones must reuse them.
    optimizer.step(closure)

    with recorder:
        optimizer.step(closure)
        optimizer.step(closure)

    num_params = len(list(model.parameters()))
    assert recorder.allocations, "the recorder saw no operation at all"
    for name, shape in recorder.allocations:
        # 0-dim norms and scales, and stacks of one value per parameter tensor or per pass.
        assert math.prod(shape) <= num_params, (name, shape)


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_step_reads_no_scalar_through_aten(optimizer_class):
    model = make_model()
    x, y = make_batch()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, model=model, max_grad_norm=1.0, **SGD_ARGS)
    recorder = StepRecorder()
    closure = paused_closure(model, optimizer, recorder, x, y)

    with recorder:
        optimizer.step(closure)

    assert recorder.scalar_reads == []


SYNCING_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_one_host_read_per_step(optimizer_class, rho, monkeypatch):
    model = make_model()
    x, y = make_batch()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, rho=rho, model=model, max_grad_norm=1.0, **SGD_ARGS)
    reads: list[str] = []
    inside_closure = [False]

    for name in SYNCING_METHODS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            if not inside_closure[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def closure():
        inside_closure[0] = True
        try:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        finally:
            inside_closure[0] = False

    optimizer.step(closure)
    reads.clear()
    optimizer.step(closure)

    # The finiteness check of the losses and the gradient norm reads them all at once.
    assert reads == ["tolist"]


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_buffers_keep_storage_across_steps(optimizer_class):
    model = make_model()
    x, y = make_batch()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, model=model, **SGD_ARGS)

    closure = plain_closure(model, optimizer, x, y)

    def pointers():
        found = {key: record.weights.data_ptr() for key, record in optimizer._storage.records.items()}
        found.update({("norm", index): copy.data_ptr() for index, (_, copy) in enumerate(optimizer._norm_buffers.pairs)})
        return found

    optimizer.step(closure)
    first = pointers()
    for _ in range(3):
        optimizer.step(closure)
        assert pointers() == first

    # Both keep a copy of the weights and of the 3 BatchNorm buffers, and nothing else: CR-SAM
    # keeps g0 and g+ in the tensors that autograd allocated for them.
    assert len(first) == len(list(model.parameters())) + 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_cuda_step_synchronizes_once(optimizer_class):
    model = make_model().cuda()
    x, y = (t.cuda() for t in make_batch())
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, model=model, max_grad_norm=1.0, **SGD_ARGS)

    closure = plain_closure(model, optimizer, x, y)

    optimizer.step(closure)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as caught:
            optimizer.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode(previous)

    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1


def run_steps(optimizer_class, closure_style: str, steps: int = 3, **kwargs) -> list[torch.Tensor]:
    """Train make_model() for a few steps and return the final weights."""
    model = make_model()
    x, y = make_batch()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, model=model, **SGD_ARGS, **kwargs)

    def closure():
        if closure_style == "set_to_none":
            optimizer.zero_grad()
        elif closure_style == "zero_in_place":
            optimizer.zero_grad(set_to_none=False)
        else:
            model.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return [param.detach().clone() for param in model.parameters()]


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
@pytest.mark.parametrize("closure_style", ["zero_in_place", "module_zero_in_place"])
def test_in_place_zeroing_same_steps(optimizer_class, closure_style):
    # CR-SAM keeps g0 and g+ in the tensors autograd allocated, so a closure that zeroes .grad in
    # place must not reach them. The operations and values are the same, so the weights must be
    # equal.
    expected = run_steps(optimizer_class, "set_to_none")
    found = run_steps(optimizer_class, closure_style)
    for a, b in zip(expected, found):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_move_paths_agree_exactly(optimizer_class, monkeypatch):
    # Small tensors move the weights with a foreach copy and addcdiv, large ones with one addcdiv
    # per tensor into the weights: the same arithmetic, so the results must be bit for bit equal.
    from crsam._optim_state import _StepStorage

    monkeypatch.setattr(_StepStorage, "SMALL_TENSOR_BYTES", 0)
    large = run_steps(optimizer_class, "set_to_none")
    monkeypatch.setattr(_StepStorage, "SMALL_TENSOR_BYTES", 2**40)
    small = run_steps(optimizer_class, "set_to_none")
    for a, b in zip(large, small):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_weight_copies_follow_new_data(optimizer_class):
    # The copies of w are reused while each parameter keeps its pointer, shape, dtype and device.
    # New data of another dtype must get new copies: a stale float32 copy would round the
    # restored float64 weights.
    model = make_model()
    x, y = make_batch()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, model=model, lr=0.0)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x).double(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    for param in model.parameters():
        param.data = param.data.double() + 1e-12
    model[1].double()
    before = [param.detach().clone() for param in model.parameters()]
    x = x.double()
    optimizer.step(closure)

    # With lr = 0 the step restores w exactly and leaves it there.
    for param, saved in zip(model.parameters(), before):
        assert param.dtype == torch.float64
        assert torch.equal(param.detach(), saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficient_rounds_like_number(dtype):
    from crsam._optim_state import _Coefficients

    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(50, generator=generator).to(dtype) for _ in range(3)]
    for value in (1.11, 0.09, -0.2, 1.0 + 0.3 + 0.04, 1e-3):
        by_number = [t.clone() for t in tensors]
        torch._foreach_mul_(by_number, value)
        by_tensor = [t.clone() for t in tensors]
        coefficient = _Coefficients().like(value, by_tensor)
        assert isinstance(coefficient, torch.Tensor)
        torch._foreach_mul_(by_tensor, coefficient)
        for a, b in zip(by_number, by_tensor):
            assert torch.equal(a, b), (dtype, value)


@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.float64), (torch.bfloat16,), (torch.float16, torch.float16)]
)
def test_coefficient_falls_back_to_number(dtypes):
    # Mixed dtypes have no one tensor dtype, and half-precision kernels may keep a Python number
    # in float32, so both get the number itself.
    from crsam._optim_state import _Coefficients

    tensors = [torch.ones(3, dtype=dtype) for dtype in dtypes]
    assert _Coefficients().like(1.11, tensors) == 1.11


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
@pytest.mark.parametrize("change", ["setitem", "insert", "delete"])
def test_norm_layers_follow_model_changes(optimizer_class, change):
    # The normalization layers are looked up again only when the module tree changed. Layers that
    # arrive after some steps, by assignment or by Sequential.insert (which writes _modules
    # directly), must end each step as the pass at w alone leaves them.
    import copy

    model = make_model()
    x, y = make_batch()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, model=model, **SGD_ARGS)

    closure = plain_closure(model, optimizer, x, y)

    optimizer.step(closure)
    if change == "setitem":
        model[2] = nn.Sequential(nn.BatchNorm1d(8, affine=False), nn.Tanh())
    elif change == "insert":
        model.insert(2, nn.BatchNorm1d(8, affine=False))
    else:
        del model[1]
        model.insert(1, nn.BatchNorm1d(8, affine=False))
    reference = copy.deepcopy(model)
    optimizer.step(closure)
    reference(x)

    # Every running statistic and batch counter, of the new layer and of the old ones, must be
    # what one forward pass at w leaves.
    expected = dict(reference.named_buffers())
    found = dict(model.named_buffers())
    assert found.keys() == expected.keys()
    assert len(found) >= 3
    for name, buffer in found.items():
        assert torch.equal(buffer, expected[name]), name


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_step_hooks_run_once_per_step(optimizer_class):
    # step() skips torch's profiling wrapper when nothing listens. Registered hooks, on the
    # optimizer or global, must still run once per step, with the pre-hook before the passes.
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = make_model()
    x, y = make_batch()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, model=model, **SGD_ARGS)
    events: list[str] = []

    def closure():
        events.append("pass")
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    handles = [
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: events.append("pre")),
        optimizer.register_step_post_hook(lambda opt, args, kwargs: events.append("post")),
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: events.append("global pre")),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: events.append("global post")),
    ]
    try:
        optimizer.step(closure)
    finally:
        for handle in handles:
            handle.remove()
    passes = ["pass"] * (2 if optimizer_class is SAM else 3)
    # The base optimizer's own step runs the global hooks too, inside the wrapper's step.
    assert events == ["global pre", "pre", *passes, "global pre", "global post", "post", "global post"]

    events.clear()
    optimizer.step(closure)
    assert events == passes


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
def test_step_named_in_profiler(optimizer_class):
    model = make_model()
    x, y = make_batch()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, model=model, **SGD_ARGS)
    closure = paused_closure(model, optimizer, StepRecorder(), x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        optimizer.step(closure)
    names = {event.name for event in profiler.events()}
    assert f"Optimizer.step#{optimizer_class.__name__}.step" in names


@pytest.mark.parametrize("optimizer_class", [SAM, CRSAM])
@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("failing_call", [None, 1, 2, 3])
def test_grad_mode_restored_after_step(optimizer_class, grad_enabled, failing_call):
    # The step switches grad mode with the C setter instead of torch.no_grad, so it must put
    # back the caller's mode after a normal step and after a closure that raises in any pass.
    model = make_model()
    x, y = make_batch()
    optimizer = optimizer_class(model.parameters(), torch.optim.SGD, model=model, **SGD_ARGS)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        if len(calls) == failing_call:
            raise KeyError("closure failed")
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if failing_call == 3 and optimizer_class is SAM:
        failing_call = None
    torch.set_grad_enabled(grad_enabled)
    try:
        if failing_call is None:
            optimizer.step(closure)
        else:
            with pytest.raises(KeyError, match="closure failed"):
                optimizer.step(closure)
        assert torch.is_grad_enabled() is grad_enabled
    finally:
        torch.set_grad_enabled(True)
    # Every closure call runs with gradients enabled, whatever the caller's mode.
    assert all(calls)


def test_kept_gradients_released_before_their_pass():
    # CR-SAM keeps the last step's g+ and g- and releases each right before the pass that
    # allocates its successor, so the allocator can hand the same memory back (see CRSAM._spare).
    import weakref

    model = make_model()
    x, y = make_batch()
    optimizer = CRSAM(model.parameters(), torch.optim.SGD, model=model, **SGD_ARGS)
    alive_at_call: list[tuple[bool, bool]] = []
    previous: list[list[weakref.ref]] = []

    def closure():
        if previous:
            alive_at_call.append(tuple(any(ref() is not None for ref in refs) for refs in previous))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    (plus, minus), = optimizer._spare
    assert len(plus) == len(minus) == len(list(model.parameters()))
    previous[:] = [[weakref.ref(t) for t in plus], [weakref.ref(t) for t in minus]]
    del plus, minus
    optimizer.step(closure)

    # Call 1 (at w): both kept. Call 2 (at w + eps): g+ released. Call 3 (at w - eps): both.
    assert alive_at_call == [(True, True), (False, True), (False, False)]
