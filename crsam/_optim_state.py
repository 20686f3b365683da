"""Working state of a sharpness-aware step: buffers, random state, normalization buffers, scaler.

Everything here serves ``crsam.optim``. The tensors that a step writes into are allocated on the
first step that needs them and reused by every later step. So a step allocates no tensor of
parameter size itself, and only autograd allocates the gradients of each pass, as in any training
step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase


class _RandomState:
    """Snapshot of torch's global generators: the CPU one and every initialized CUDA device.

    NOTE: Python's ``random`` and numpy's generators are not captured, so a closure that draws
    from them (data augmentation, say) gets different draws in each pass. Draw those outside.
    """

    def __init__(self) -> None:
        # The generator's own methods, which torch.get_rng_state and torch.set_rng_state wrap.
        self.cpu = torch.default_generator.get_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.default_generator.set_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class _NormLayers:
    """The model's normalization layers, found by walking its module tree only when it changed.

    The tree is described exactly by each module's children, so the walk is repeated when the
    model or any child of a module found by the last walk is another object. Comparing the
    children's identities costs a third of walking the tree with ``model.modules()``. Buffers are
    read from the layers at every step, so buffers that ``model.to()`` replaces are followed.
    """

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.modules: list[nn.Module] = []
        self.children: list[int] = []
        self.layers: list[_NormBase] = []

    @staticmethod
    def _children(modules: list[nn.Module]) -> list[int]:
        return [id(child) for module in modules for child in module._modules.values()]

    def buffers(self, model: nn.Module) -> list[Tensor]:
        """Return the running statistics and batch counters of the model's normalization layers."""
        if model is not self.model or self._children(self.modules) != self.children:
            self.model = model
            self.modules = list(model.modules())
            self.children = self._children(self.modules)
            self.layers = [module for module in self.modules if isinstance(module, _NormBase)]
        buffers = []
        for layer in self.layers:
            if layer.track_running_stats:
                for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
                    if buffer is not None:
                        buffers.append(buffer)
        return buffers


class _NormBuffers:
    """Saved copies of a model's normalization statistics, reused from step to step.

    The copies are keyed by the identity of the model's buffer, so a buffer that a module
    replaces (``module.running_mean = tensor``) gets a fresh copy, and copies of buffers that
    left the model are dropped at the next :meth:`save`.
    """

    def __init__(self) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.layers = _NormLayers()

    def save(self, model: nn.Module | None) -> None:
        if model is None:
            return
        buffers = self.layers.buffers(model)
        if not buffers and not self.pairs:
            return
        saved = {id(buffer): copy for buffer, copy in self.pairs}
        pairs = []
        for buffer in buffers:
            copy = saved.get(id(buffer))
            if copy is None or copy.shape != buffer.shape or copy.dtype != buffer.dtype or copy.device != buffer.device:
                copy = torch.empty_like(buffer)
            pairs.append((buffer, copy))
        self.pairs = pairs
        if not pairs:
            return
        with torch.no_grad():
            torch._foreach_copy_([copy for _, copy in pairs], [buffer for buffer, _ in pairs])

    def restore(self) -> None:
        if self.pairs:
            with torch.no_grad():
                torch._foreach_copy_([buffer for buffer, _ in self.pairs], [copy for _, copy in self.pairs])


class _ParamBuffers:
    """Working tensors of one parameter, allocated on first use and reused by every step.

    ``weights`` is the saved w. ``stacked`` contains the two weight vectors ``w + eps`` and
    ``w - eps`` of CR-SAM's batched passes along a new leading dimension, and ``direction`` the
    part of their direction that comes from the batched gradients. The sequential passes need no
    gradient buffers: a step keeps the tensors that autograd allocated for each pass.
    """

    __slots__ = ("weights", "direction", "stacked", "stacked_plus", "stacked_minus")

    def __init__(self) -> None:
        self.weights: Tensor | None = None
        self.direction: Tensor | None = None
        self.stacked: Tensor | None = None
        self.stacked_plus: Tensor | None = None
        self.stacked_minus: Tensor | None = None


def _fits(buffer: Tensor | None, param: Tensor) -> bool:
    """Return whether ``buffer`` can hold a copy of ``param`` (a parameter may move or change)."""
    return (
        buffer is not None
        and buffer.shape == param.shape
        and buffer.dtype == param.dtype
        and buffer.device == param.device
    )


class _WeightCopies:
    """Copies of one group's weights and what a step needs to know about the parameters.

    ``key``: each parameter's data pointer, shape, dtype and device when the copies were made.
    ``small``: whether
    the tensors average at most ``_StepStorage.SMALL_TENSOR_BYTES``. ``dtype`` and ``device``:
    shared by all parameters (and so by their gradients), or None when they differ.
    """

    __slots__ = ("key", "copies", "small", "dtype", "device")

    def __init__(self, params: list[Tensor], key: list[tuple[Any, ...]], copies: list[Tensor]) -> None:
        self.key = key
        self.copies = copies
        total_bytes = sum(param.numel() * param.element_size() for param in params)
        self.small = total_bytes <= _StepStorage.SMALL_TENSOR_BYTES * len(params)
        uniform = all(p.dtype == params[0].dtype and p.device == params[0].device for p in params)
        self.dtype = params[0].dtype if uniform else None
        self.device = params[0].device if uniform else None


class _StepStorage:
    """The optimizer's persistent working tensors: per-parameter records and lists of weight copies.

    ``weights`` maps a group's index to its :class:`_WeightCopies`, which stay valid while every
    parameter keeps its data pointer, shape, dtype and device. A parameter given new data
    (``param.data = ...``, ``model.to(...)``), even a view that starts at the same address, gets
    new copies.
    """

    # Average bytes per tensor up to which a step prefers one more pass over the memory to one
    # Python call per tensor (an estimate: about 2 us per call after a backward pass on the CPU).
    SMALL_TENSOR_BYTES = 16384

    def __init__(self) -> None:
        self.records: dict[int, _ParamBuffers] = {}
        self.weights: dict[int, _WeightCopies] = {}

    def record(self, param: Tensor) -> _ParamBuffers:
        record = self.records.get(id(param))
        if record is None:
            record = self.records[id(param)] = _ParamBuffers()
        return record


class _GroupBuffers:
    """Per-group view of one step: the parameters with a gradient at w and their buffers.

    The lists hold persistent tensors of :class:`_StepStorage`, so building them allocates no
    tensor memory.
    """

    def __init__(self, group: dict[str, Any], index: int, storage: _StepStorage) -> None:
        self.group = group
        self.index = index
        self.storage = storage
        self.rho = float(group["rho"])
        self.params: list[Tensor] = []
        # The pass at w leaves g0 in .grad; the next closure call zeroes or replaces it.
        self.grads: list[Tensor] = []
        for param in group["params"]:
            grad = param.grad
            if grad is not None:
                self.params.append(param)
                self.grads.append(grad)
        if any(grad.is_sparse for grad in self.grads):
            raise ValueError("sharpness-aware optimizers need dense gradients; build embeddings with sparse=False")
        # Where the passes leave g0 for the direction: .grad itself, or the tensors taken from it.
        self.grad_at_w: list[Tensor] = self.grads
        # ||g0|| over all groups, clamped away from 0: a 0-dim tensor on the device.
        self.grad_norm: Tensor | None = None
        # The update direction. It ends in tensors that the step owns (.grad itself, or gradients
        # taken from .grad), so that handing it to .grad needs no copy.
        self.direction: list[Tensor] = []
        self._weights: _WeightCopies | None = None
        # Gradients taken from .grad without a copy, and their version counters at that time.
        self.kept: list[Tensor] = []
        self.kept_versions: list[int] = []

    def weights(self) -> _WeightCopies:
        """Return the persistent copies of the weights; copies that do not fit are allocated anew."""
        if self._weights is not None:
            return self._weights
        key = [(param.data_ptr(), param.shape, param.dtype, param.device) for param in self.params]
        cached = self.storage.weights.get(self.index)
        if cached is None or cached.key != key:
            copies = self._persistent("weights")
            cached = self.storage.weights[self.index] = _WeightCopies(self.params, key, copies)
        self._weights = cached
        return cached

    def directions(self) -> list[Tensor]:
        """Return the persistent direction buffers of the batched passes."""
        return self._persistent("direction")

    def _persistent(self, name: str) -> list[Tensor]:
        """Return each parameter's buffer ``name`` of :class:`_ParamBuffers`, allocating those that do not fit."""
        buffers = []
        for param in self.params:
            record = self.storage.record(param)
            buffer = getattr(record, name)
            if not _fits(buffer, param):
                buffer = torch.empty_like(param)
                setattr(record, name, buffer)
            buffers.append(buffer)
        return buffers

    def stacked(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Return the stacked leaves ``(2, *shape)`` and their two halves for batched passes."""
        leaves, plus, minus = [], [], []
        for param in self.params:
            record = self.storage.record(param)
            if record.stacked is None or not _fits(record.stacked_plus, param):
                record.stacked = torch.empty((2, *param.shape), dtype=param.dtype, device=param.device)
                record.stacked.requires_grad_(True)
                record.stacked_plus, record.stacked_minus = record.stacked.detach().unbind(0)
            leaves.append(record.stacked)
            plus.append(record.stacked_plus)
            minus.append(record.stacked_minus)
        return leaves, plus, minus

    def current_grads(self) -> list[Tensor]:
        """Return the gradients the last pass left, zeros where it produced none."""
        grads = []
        for param in self.params:
            grad = param.grad
            grads.append(torch.zeros_like(param) if grad is None else grad)
        return grads

    def take_grads(self, copy: bool) -> list[Tensor]:
        """Return the gradients the last pass left and detach them from the parameters.

        With ``.grad`` set to None, the next closure call cannot zero these tensors in place
        (``zero_grad(set_to_none=False)``) or add to them, and its backward pass allocates new
        gradients, as it would after the usual ``zero_grad()``. So the step keeps each pass's
        gradient without copying it. A closure that reuses its own tensors as ``.grad`` may
        still write into them, which :meth:`kept_unchanged` detects. With ``copy`` the gradients
        are cloned instead, for such closures.
        """
        grads = self.current_grads()
        for param in self.params:
            param.grad = None
        if copy:
            return [grad.clone() for grad in grads]
        self.kept += grads
        self.kept_versions += [grad._version for grad in grads]
        return grads

    def kept_unchanged(self) -> bool:
        """Return whether no kept gradient was written since it was taken (its version counter)."""
        return [grad._version for grad in self.kept] == self.kept_versions


def _global_norm(tensors: list[Tensor]) -> Tensor:
    """Return the L2 norm over all tensors, as a 0-dim tensor on the first tensor's device."""
    norms = torch._foreach_norm(tensors)
    try:
        return torch.linalg.vector_norm(torch.stack(norms))
    except RuntimeError:
        # Parameters on several devices: gather the per-tensor norms on the first one.
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([norm.to(device) for norm in norms]))


class _Coefficients:
    """0-dim tensors holding the step's coefficients, one per value, dtype and device, reused.

    For float32 and float64 tensors, a foreach multiplication by a 0-dim tensor of the same dtype
    gives the same values as a multiplication by the Python number, which is rounded to that
    dtype as well. On the CPU it ran about three times faster (torch 2.13: 4 us against 13 us for
    eight small tensors, timed outside the repository's benchmarks). Half-precision tensors get the
    Python number, because kernels may keep it in float32 there.
    """

    # Coefficients change only when a schedule changes alpha or beta, so this bounds the cache.
    MAX_ENTRIES = 64
    DTYPES = (torch.float32, torch.float64)

    def __init__(self) -> None:
        self.tensors: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}

    def get(self, value: float, dtype: torch.dtype | None, device: torch.device | None) -> Tensor | float:
        """Return ``value`` as a 0-dim tensor of that dtype and device, or the number itself.

        The number comes back for None (mixed dtypes or devices) and for dtypes outside ``DTYPES``.
        """
        if dtype not in self.DTYPES or device is None:
            return value
        key = (value, dtype, device)
        tensor = self.tensors.get(key)
        if tensor is None:
            if len(self.tensors) >= self.MAX_ENTRIES:
                self.tensors.clear()
            tensor = self.tensors[key] = torch.full((), value, dtype=dtype, device=device)
        return tensor

    def like(self, value: float, tensors: list[Tensor]) -> Tensor | float:
        """Return ``value`` as a 0-dim tensor of the tensors' dtype and device, if they share both."""
        dtype, device = tensors[0].dtype, tensors[0].device
        if any(t.dtype != dtype or t.device != device for t in tensors):
            return value
        return self.get(value, dtype, device)


class _Unscaler:
    """Unscale each pass's gradients for a GradScaler and remember whether any overflowed.

    ``GradScaler.unscale_`` may run once per step, and ``GradScaler.step`` rejects closures, so
    the passes are unscaled here, and at the end the combined gradient is scaled back and handed
    to the scaler's own ``unscale_``, ``step`` and ``update`` on the base optimizer. An overflow in
    any pass is written into that gradient as an infinity, so the scaler skips the step and backs
    off exactly as it would for one pass.

    The scale is read as a tensor (``GradScaler._get_scale_async``, torch 2.x), not with
    ``get_scale()``, whose ``.item()`` would synchronize with the device in every pass. The one
    synchronization of a scaled step is the overflow check inside ``GradScaler.step``.
    """

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self.found_inf: dict[torch.device, Tensor] = {}
        self.inverse_scale: dict[torch.device, Tensor] = {}

    def _scale(self, device: torch.device) -> Tensor:
        scale = self.scaler._get_scale_async()
        if scale is None:
            # The closure never called scaler.scale(): the scale is still the initial value.
            scale = torch.full((), self.scaler.get_scale(), dtype=torch.float32)
        return scale.to(device)

    def unscale(self, params: list[Tensor]) -> None:
        by_device: dict[torch.device, list[Tensor]] = {}
        for param in params:
            if param.grad is not None:
                by_device.setdefault(param.grad.device, []).append(param.grad)
        for device, grads in by_device.items():
            # float32 whatever the default dtype: the overflow check accepts only that.
            found_inf = self.found_inf.setdefault(device, torch.zeros((), dtype=torch.float32, device=device))
            inverse_scale = self.inverse_scale.get(device)
            if inverse_scale is None:
                # The same reciprocal that GradScaler.unscale_ computes.
                inverse_scale = self._scale(device).double().reciprocal().float()
                self.inverse_scale[device] = inverse_scale
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inverse_scale)

    def step(self, base_optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
        device = params[0].device
        found_any = sum(found.to(device) for found in self.found_inf.values())
        grads = [param.grad for param in params]
        # Powers of two (GradScaler's default scales) make this product exact. An overflow turns
        # the first gradient into inf or NaN, which the scaler's own check then finds.
        torch._foreach_mul_(grads, self._scale(device))
        grads[0].mul_(torch.where(found_any > 0, torch.inf, 1.0))
        self.scaler.unscale_(base_optimizer)
        self.scaler.step(base_optimizer)
        self.scaler.update()


class _CommunicationBuffer:
    """Flat buffers for the all-reduce, one per dtype and device, grown when too small."""

    def __init__(self) -> None:
        self.flat: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def all_reduce_mean(self, tensors: list[Tensor], process_group: Any) -> None:
        """Average tensors over the process group with one all-reduce per dtype and device."""
        world_size = torch.distributed.get_world_size(process_group)
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for tensor in tensors:
            buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for key, bucket in buckets.items():
            sizes = [t.numel() for t in bucket]
            total = sum(sizes)
            flat = self.flat.get(key)
            if flat is None or flat.numel() < total:
                flat = torch.empty(total, dtype=key[0], device=key[1])
                self.flat[key] = flat
            pieces = [piece.view_as(t) for piece, t in zip(flat[:total].split(sizes), bucket)]
            torch._foreach_copy_(pieces, bucket)
            torch.distributed.all_reduce(flat[:total], group=process_group)
            flat[:total].div_(world_size)
            torch._foreach_copy_(bucket, pieces)
