r"""Sharpness-aware optimizers: SAM and CR-SAM as wrappers around a base optimizer.

Both optimizers take ``step(closure)``: the closure zeroes the gradients, runs the forward and
backward pass on the current batch and returns the loss. The optimizer calls it at the weights
``w`` and at perturbed weights, restores ``w`` from a saved copy, writes the combined gradient
into ``p.grad`` and lets the base optimizer (``torch.optim.SGD``, ``torch.optim.AdamW``, ...)
take its step at ``w``. CR-SAM can instead evaluate its two perturbed passes as one batched pass
(``step(FunctionalClosure(...), parallel=True)``).

Guarantees that hold for both classes:

* Every pass starts from the same torch random state (so dropout draws the same masks), and after the
  step the random state is as if the closure had run once.
* Weights are saved once and restored by copy in a ``finally`` block, also when the closure
  raises.
* Given ``model=``, the running statistics and batch counters of BatchNorm (and other ``_NormBase``
  layers that track statistics) end the step as the pass at ``w`` alone left them.
* ``rho = 0`` in every group, or a model whose gradient at ``w`` is zero, gives exactly the base
  optimizer's step.
* All hyperparameters live in ``param_groups``, which the base optimizer shares, so LR schedulers
  built on the wrapper drive the base optimizer and ``state_dict`` round-trips.
* The optimizer's own work (norm, perturbation, save and restore, combination, clipping) runs as
  ``torch._foreach_*`` operations, or as one operation per tensor with ``out=`` where that saves
  a pass over the memory (moving large tensors to ``w - eps``, adding the g0 term of CR-SAM,
  the batched path). Buffers are allocated on first use and reused: the copy of the weights,
  copies of the BatchNorm statistics, the buffers of the batched passes and of the DDP
  all-reduce. CR-SAM keeps g0 and g+ in the tensors that autograd allocated for them (unless
  ``copy_gradients=True``), builds the update in place, and holds the last step's g+ and g-
  until the next step's passes reuse their memory. Each step synchronizes the host with the
  device once, in the finiteness check of the losses and the gradient norm (with a
  GradScaler, the scaler's own overflow check instead).

References:
    Foret, P., Kleiner, A., Mobahi, H., Neyshabur, B. (2021). Sharpness-Aware Minimization for
    Efficiently Improving Generalization. ICLR. arXiv:2010.01412.

    Wu, T., Luo, T., Wunsch II, D. C. (2024). CR-SAM: Curvature Regularized Sharpness-Aware
    Minimization. AAAI. arXiv:2312.13555.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from crsam._optim_state import (
    _Coefficients,
    _CommunicationBuffer,
    _global_norm,
    _GroupBuffers,
    _NormBuffers,
    _RandomState,
    _StepStorage,
    _Unscaler,
)

__all__ = ["SAM", "CRSAM", "FunctionalClosure", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A pass of a sharpness-aware step returned a NaN or infinite loss or gradient norm."""


def _check_hyperparameter(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite, non-negative real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a non-negative real number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def _check_max_grad_norm(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a finite, positive real number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"max_grad_norm must be None or a positive real number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"max_grad_norm must be finite and > 0, or None to turn clipping off, got {value!r}")


def _with_grad_enabled(closure: Callable[[], Tensor | float]) -> Callable[[], Tensor | float]:
    """Return the closure run with gradients enabled, for a caller that runs with them disabled.

    The C setter that ``torch.enable_grad`` calls is called directly: the context manager's Python
    code cost an estimated 5 us per pass after a backward pass, about a twentieth of the step's own work on a
    small model.
    """

    def run() -> Tensor | float:
        torch._C._set_grad_enabled(True)
        try:
            return closure()
        finally:
            torch._C._set_grad_enabled(False)

    return run


_TINY: dict[torch.dtype, float] = {}


def _tiny(dtype: torch.dtype) -> float:
    """Return the smallest normal number of a floating dtype (``torch.finfo`` built once per dtype)."""
    tiny = _TINY.get(dtype)
    if tiny is None:
        tiny = _TINY[dtype] = torch.finfo(dtype).tiny
    return tiny


def _read_on_host(values: list[Tensor | float]) -> list[float]:
    """Return the values as Python numbers, read from the device with one synchronization.

    Values are normally 0-dim tensors, on one device. The step runs under no_grad, so stacking
    needs no detach, and stacking promotes mixed dtypes.
    """
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]
    stacked = None
    if all(t.dim() == 0 for t in tensors):
        try:
            stacked = torch.stack(tensors)
        except RuntimeError:
            # Values on several devices.
            pass
    if stacked is None:
        device = tensors[0].device
        stacked = torch.stack([t.reshape(()).to(device) for t in tensors])
    on_host = iter(stacked.tolist())
    return [next(on_host) if isinstance(v, Tensor) else float(v) for v in values]


def _release(spare: list[tuple[list[Tensor], list[Tensor]]], index: int) -> None:
    """Drop the references to one kind of spare gradient tensors (0: g+, 1: g-)."""
    for pair in spare:
        pair[index].clear()


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside a DistributedDataParallel wrapper, or the model itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


class FunctionalClosure:
    """The loss of a model on one batch, usable as a closure and as a function of the weights.

    Calling the object does what a hand-written closure does: it sets the gradients of the
    model's parameters to None, runs ``loss_fn(model(*inputs), targets)``, calls ``backward`` and
    returns the loss, detached. Any optimizer's ``step`` accepts it. :meth:`CRSAM.step` with
    ``parallel=True`` instead evaluates the loss at ``w + eps`` and ``w - eps`` in one batched
    pass (``torch.func.functional_call`` under ``torch.func.vmap``), so a trainer switches between
    the sequential and the batched passes with one flag.

    Args:
        model: the module being trained, or its ``DistributedDataParallel`` wrapper. It must own
            every parameter of the optimizer that receives a gradient.
        loss_fn: maps ``(output, targets)`` to a scalar loss, such as
            ``torch.nn.functional.cross_entropy``.
        inputs: the model's input, or a tuple of positional inputs.
        targets: the second argument of ``loss_fn``.

    NOTE: the loss is not scaled, so a ``GradScaler`` cannot drive it; :meth:`step` rejects the
    pair. Write a closure that calls ``scaler.scale(loss).backward()`` for float16 training.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Any, targets: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(output, targets), got {loss_fn!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        self.targets = targets

    def __call__(self) -> Tensor:
        """Zero the model's gradients, run forward and backward, and return the loss."""
        for param in self.model.parameters():
            param.grad = None
        with torch.enable_grad():
            loss = self.loss_fn(self.model(*self.inputs), self.targets)
            loss.backward()
        return loss.detach()

    def loss_at(self, parameters: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        """Return the loss with the model's parameters and buffers replaced by the given ones."""
        module = _unwrap(self.model)
        output = torch.func.functional_call(module, (parameters, buffers), self.inputs, strict=True)
        return self.loss_fn(output, self.targets)


class _SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Shared machinery of SAM and CR-SAM: wrapping, state, random state, restore, checks."""

    # Names of the non-negative hyperparameters this wrapper adds to every parameter group.
    _own_hyperparameters: tuple[str, ...] = ("rho",)
    # Whether step(parallel=True) can batch the perturbed passes.
    _supports_parallel = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        model: nn.Module | None,
        perturbation: str,
        own_defaults: dict[str, float],
        max_grad_norm: float | None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD, "
                f"got {base_optimizer!r}; pass the class and its arguments as keywords, "
                "for example base_optimizer=torch.optim.SGD, lr=0.1"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if perturbation not in ("global", "local"):
            raise ValueError(f"perturbation must be 'global' or 'local', got {perturbation!r}")
        for name, value in own_defaults.items():
            _check_hyperparameter(name, value)
        _check_max_grad_norm(max_grad_norm)
        own_defaults = {**own_defaults, "max_grad_norm": max_grad_norm}
        clashes = sorted(set(own_defaults) & set(base_kwargs))
        if clashes:
            raise ValueError(f"hyperparameters {clashes} are given twice; pass each once")

        self._init_working_state()
        super().__init__(params, {**own_defaults, **base_kwargs})

        # The base optimizer shares the wrapper's group dicts and per-parameter state, so an LR
        # scheduler attached to the wrapper changes the base optimizer's learning rate.
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._link_base_optimizer()
        self.defaults = {**self.base_optimizer.defaults, **self.defaults}
        self.model = model
        self.perturbation = perturbation
        self.num_steps = 0

    # Attributes that pickling and deep copies leave out: working tensors, which the next step
    # rebuilds, and the hooks, which torch.optim.Optimizer leaves out as well (they may be lambdas).
    _TRANSIENT = (
        "_storage",
        "_norm_buffers",
        "_communication",
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks",
    )

    def _init_working_state(self) -> None:
        """Create the working state that steps fill and reuse: buffers keyed by parameter."""
        self._storage = _StepStorage()
        self._norm_buffers = _NormBuffers()
        self._communication = _CommunicationBuffer()

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key not in self._TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's own __setstate__ creates empty hook registries.
        super().__setstate__(state)
        self._init_working_state()

    def _link_base_optimizer(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; hyperparameters it leaves out take the constructor's values."""
        for name in self._own_hyperparameters:
            if name in param_group:
                _check_hyperparameter(name, param_group[name])
        if "max_grad_norm" not in param_group and self.param_groups:
            # One bound for all parameters: a later group takes the first group's.
            param_group = {**param_group, "max_grad_norm": self.param_groups[0]["max_grad_norm"]}
        if "max_grad_norm" in param_group:
            _check_max_grad_norm(param_group["max_grad_norm"])
            # Clipping scales the direction of all parameters by one factor, so one bound applies.
            if self.param_groups and param_group["max_grad_norm"] != self.param_groups[0]["max_grad_norm"]:
                raise ValueError(
                    f"max_grad_norm {param_group['max_grad_norm']!r} of the new group differs from "
                    f"{self.param_groups[0]['max_grad_norm']!r} of the first group; clipping uses one "
                    "norm over all parameters, so leave max_grad_norm out of the group"
                )
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """Return the base optimizer's state dict, whose groups also hold the wrapper's hyperparameters.

        State-dict hooks registered on the wrapper run as ``torch.optim.Optimizer.state_dict``
        runs them, around the base optimizer's state dict.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.base_optimizer.state_dict()
        state["sharpness_aware"] = {"num_steps": self.num_steps}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict` of the same class and parameters.

        Load-state-dict hooks registered on the wrapper run as in ``torch.optim.Optimizer``: the
        pre-hooks may return a replacement state dict.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        extra = state_dict.pop("sharpness_aware", {"num_steps": 0})
        groups = []
        for group in state_dict.get("param_groups", []):
            for name in self._own_hyperparameters:
                if name not in group:
                    raise ValueError(
                        f"the state dict's parameter groups have no {name!r}: it was not written "
                        f"by {type(self).__name__}.state_dict(); load it into the base optimizer"
                    )
                _check_hyperparameter(name, group[name])
            # State dicts written before clipping existed have no max_grad_norm: no clipping.
            group = {"max_grad_norm": None, **group}
            _check_max_grad_norm(group["max_grad_norm"])
            groups.append(group)
        if groups:
            state_dict["param_groups"] = groups
        self.base_optimizer.load_state_dict(state_dict)
        self._link_base_optimizer()
        self.num_steps = int(extra["num_steps"])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ the step

    def _perturbed_passes(self, groups: list[_GroupBuffers], run: Callable[[], Tensor | float]) -> list[Tensor | float]:
        """Run the perturbed passes and leave the local direction in each group.

        Each group arrives with the clamped norm ``g.grad_norm = ||g0||``, ``g.grads`` = g0,
        and the weights at ``w`` saved in ``g.weights()``. ``run()`` calls the closure where the
        weights are and returns the loss. Each subclass sets ``g.direction`` to its update
        direction, in tensors the step owns, in which the
        gradient at ``w`` (the only one that may already be averaged over processes) enters
        through :meth:`_add_gradient_at_w`: after the all-reduce with the global perturbation,
        before it with the local one.
        """
        raise NotImplementedError

    def _parallel_passes(self, groups: list[_GroupBuffers], closure: FunctionalClosure) -> list[Tensor]:
        """Run the perturbed passes as one batched evaluation and leave the direction in each group."""
        raise NotImplementedError

    def _add_gradient_at_w(self, groups: list[_GroupBuffers]) -> None:
        """Add the gradient-at-w term of the direction (none for SAM)."""

    @staticmethod
    def _perturb(targets: list[Tensor], g: _GroupBuffers, sign: float, grad_at_w: list[Tensor]) -> None:
        """Add ``sign * eps = sign * rho * g0 / ||g0||`` to tensors that contain ``w``.

        ``addcdiv`` forms eps inside the addition, so eps needs no buffer of its own, and the
        norm stays a tensor on the device. Every path (SAM, CR-SAM sequential and batched)
        perturbs with this one operation, so all of them round ``w + eps`` alike.
        """
        if g.rho > 0:
            norms = [g.grad_norm] * len(targets)
            torch._foreach_addcdiv_(targets, grad_at_w, norms, value=sign * g.rho)

    @classmethod
    def _write_perturbed(
        cls, targets: list[Tensor], g: _GroupBuffers, sign: float, weights: list[Tensor], small: bool
    ) -> None:
        """Write ``weights + sign * rho * g0 / ||g0||`` into ``targets``.

        Large tensors take one ``addcdiv`` with ``out=`` per tensor, one pass over the memory
        fewer than copying ``weights`` and calling :meth:`_perturb`; no foreach operation takes
        ``out=``. Small ones (``small``) take the copy and :meth:`_perturb`, two foreach calls
        instead of one Python call per tensor. Both compute ``weights + (sign * rho) * g0 / ||g0||``
        with the same operations, so they give the same values.
        """
        if g.rho == 0 or small:
            torch._foreach_copy_(targets, weights)
            cls._perturb(targets, g, sign, g.grad_at_w)
            return
        value = sign * g.rho
        for target, weight, grad in zip(targets, weights, g.grad_at_w):
            torch.addcdiv(weight, grad, g.grad_norm, value=value, out=target)

    def _move(self, groups: list[_GroupBuffers], sign: float) -> None:
        """Set the weights to ``w + sign * eps`` from the saved copy of ``w``."""
        for g in groups:
            copies = g.weights()
            self._write_perturbed(g.params, g, sign, copies.copies, copies.small)

    def step(self, *args: Any, **kwargs: Any) -> Tensor | float:  # type: ignore[override]
        """Run the passes, combine their gradients and take the base optimizer's step at ``w``.

        Args:
            closure: zeroes the gradients, runs forward and backward on the batch and returns the
                loss. It is called once at ``w`` and once per perturbed point. With a ``scaler``
                it calls ``scaler.scale(loss).backward()`` and returns the unscaled loss. A
                :class:`FunctionalClosure` works as a closure and is required by ``parallel``.
            scaler: a ``torch.amp.GradScaler`` for float16 training, which the optimizer drives
                itself, because ``GradScaler.step`` rejects closures. Each pass's gradients are
                unscaled before any norm is taken. On an overflow in any pass the weights are
                restored, the step is skipped and the scale backs off, as in ``GradScaler.step``.
                ``scaler.update()`` runs inside this call: do not call it again.
            parallel: CR-SAM only. Evaluate the loss at ``w + eps`` and ``w - eps`` in one batched
                pass of ``closure``, a :class:`FunctionalClosure`, instead of two closure calls.
                The pass at ``w`` stays a closure call.

        Returns:
            The loss at ``w`` as returned by the closure.

        Raises:
            NonFiniteLossError: without a scaler, a pass returned a NaN or infinite loss, or the
                gradient at ``w`` has a non-finite norm. The weights are restored and no step is
                taken.
            RuntimeError: CR-SAM only, the closure wrote into a gradient that the step keeps
                (see ``copy_gradients``). The weights are restored and no step is taken.
            TypeError, ValueError: no closure, a closure that returns None, or a closure that
                does not fit ``parallel`` or ``scaler``.
        """
        if (
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks
            or _global_optimizer_post_hooks
            or torch.autograd._profiler_enabled()
        ):
            # torch's wrapper hands the hooks the arguments as the caller gave them.
            return self._profiled_step(*args, **kwargs)
        return self._step(*args, **kwargs)

    # torch.optim.Optimizer wraps step() in a profiler range and the step hooks unless the method
    # is marked as wrapped. That wrapper cost an estimated 20 to 30 us per step on the CPU even
    # with no hook and no profiler (torch 2.13, timed outside the benchmarks), about 0.5 % of a
    # small model's step. So step() runs torch's
    # own wrapper, _profiled_step, only when a hook is registered or a profiler records.
    step.hooked = True  # type: ignore[attr-defined]

    def _step(
        self,
        closure: Callable[[], Tensor | float] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        *,
        parallel: bool = False,
    ) -> Tensor | float:
        """Run the step that :meth:`step` describes, with gradients disabled outside the closure."""
        # The C setter that torch.no_grad calls, as in _with_grad_enabled: the decorator's Python
        # code cost an estimated 10 us per step after a backward pass.
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self._step_without_grad(closure, scaler, parallel=parallel)
        finally:
            torch._C._set_grad_enabled(grad_enabled)

    def _step_without_grad(
        self,
        closure: Callable[[], Tensor | float] | None,
        scaler: torch.amp.GradScaler | None,
        *,
        parallel: bool,
    ) -> Tensor | float:
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step needs a closure that zeroes the gradients, runs the "
                "forward and backward pass and returns the loss"
            )
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        self._check_closure(closure, scaler, parallel)
        functional_closure = closure if parallel else None
        closure = _with_grad_enabled(closure)
        self.num_steps += 1
        unscaler = _Unscaler(scaler) if scaler is not None else None

        # Pass at w, remembering the random state before and after it.
        distributed = self._distributed_group() is not None
        random_before = _RandomState()
        if distributed and self.perturbation == "local":
            with self._no_sync():
                loss_at_w = closure()
        else:
            loss_at_w = closure()
        if loss_at_w is None:
            raise TypeError(f"the closure passed to {type(self).__name__}.step returned None; return the loss")
        random_after = _RandomState()
        if unscaler is not None:
            unscaler.unscale([p for group in self.param_groups for p in group["params"]])

        groups = [_GroupBuffers(group, index, self._storage) for index, group in enumerate(self.param_groups)]
        groups = [g for g in groups if g.params]
        if not groups:
            # No parameter received a gradient: nothing to perturb and nothing to update.
            if unscaler is None:
                self._check_finite([loss_at_w], None)
            return loss_at_w
        if all(g.rho == 0.0 for g in groups):
            # Without a perturbation every pass would return the gradient at w: skip them.
            for g in groups:
                g.direction = g.grads
            if distributed and self.perturbation == "local":
                self._all_reduce_mean([d for g in groups for d in g.direction])
            self._finish(groups, [loss_at_w], None, unscaler)
            return loss_at_w

        # eps = rho * g0 / ||g0|| with the norm over every group. The division stays on the
        # device, so no value reaches the host before the end. Clamping the norm to at least the
        # smallest normal float keeps every |g0_i| / ||g0|| at most 1 (its reciprocal is finite
        # in every float dtype), so a zero gradient gives eps = 0, not NaN.
        # The check at the end reads the clamped norm, which is NaN or infinite when ||g0|| is.
        grad_norm = _global_norm([grad for g in groups for grad in g.grads])
        grad_norm.clamp_(min=_tiny(grad_norm.dtype))
        for g in groups:
            g.grad_norm = grad_norm

        if functional_closure is not None:
            losses = self._run_parallel(groups, functional_closure, random_before, random_after, loss_at_w)
        else:
            losses = self._run_sequential(groups, closure, random_before, random_after, loss_at_w, unscaler, distributed)

        # Gradients of the perturbed passes are local to this process: average them once. With
        # the global perturbation g0 is already the average and joins afterwards. With the local
        # one g0 is this process's own, so it joins before, or the replicas would drift apart.
        if distributed and self.perturbation == "local":
            self._add_gradient_at_w(groups)
            self._all_reduce_mean([d for g in groups for d in g.direction])
        else:
            if distributed:
                self._all_reduce_mean([d for g in groups for d in g.direction])
            self._add_gradient_at_w(groups)
        self._finish(groups, losses, grad_norm, unscaler)
        return loss_at_w

    _profiled_step = torch.optim.Optimizer.profile_hook_step(_step)
    step.__signature__ = inspect.signature(_step)  # type: ignore[attr-defined]

    def _check_closure(self, closure: Any, scaler: torch.amp.GradScaler | None, parallel: bool) -> None:
        """Reject a closure that cannot serve the requested kind of step."""
        if not isinstance(parallel, bool):
            raise TypeError(f"parallel must be True or False, got {parallel!r}")
        if isinstance(closure, FunctionalClosure) and scaler is not None:
            raise ValueError(
                "a FunctionalClosure does not scale its loss, so a GradScaler cannot drive it; "
                "pass a closure that calls scaler.scale(loss).backward(), or drop the scaler"
            )
        if not parallel:
            return
        if not self._supports_parallel:
            raise ValueError(
                f"{type(self).__name__} has one perturbed pass, so there is nothing to batch; "
                "call step without parallel=True, or use CRSAM"
            )
        if not isinstance(closure, FunctionalClosure):
            raise TypeError(
                "parallel=True needs a crsam.optim.FunctionalClosure(model, loss_fn, inputs, targets), "
                f"because a plain closure cannot be evaluated at stacked weights; got {type(closure).__name__}"
            )
        if self.model is not None and _unwrap(closure.model) is not _unwrap(self.model):
            raise ValueError(
                "the FunctionalClosure's model is not the model given to the optimizer; "
                "build both from the same module"
            )

    def _run_sequential(
        self,
        groups: list[_GroupBuffers],
        closure: Callable[[], Tensor | float],
        random_before: _RandomState,
        random_after: _RandomState,
        loss_at_w: Tensor | float,
        unscaler: _Unscaler | None,
        distributed: bool,
    ) -> list[Tensor | float]:
        """Run the perturbed passes one closure call at a time; restore w, RNG and statistics."""
        self._norm_buffers.save(self.model)
        for g in groups:
            torch._foreach_copy_(g.weights().copies, g.params)

        def run() -> Tensor | float:
            random_before.restore()
            if distributed:
                with self._no_sync():
                    loss = closure()
            else:
                loss = closure()
            # Only the value is needed: detaching frees the pass's autograd graph now.
            if isinstance(loss, Tensor):
                loss = loss.detach()
            self._norm_buffers.restore()
            if unscaler is not None:
                unscaler.unscale([p for g in groups for p in g.params])
            return loss

        try:
            return [loss_at_w, *self._perturbed_passes(groups, run)]
        finally:
            for g in groups:
                torch._foreach_copy_(g.params, g.weights().copies)
            random_after.restore()
            self._norm_buffers.restore()

    def _run_parallel(
        self,
        groups: list[_GroupBuffers],
        closure: FunctionalClosure,
        random_before: _RandomState,
        random_after: _RandomState,
        loss_at_w: Tensor | float,
    ) -> list[Tensor | float]:
        """Run the perturbed passes as one batched evaluation from the random state before w."""
        random_before.restore()
        try:
            return [loss_at_w, *self._parallel_passes(groups, closure)]
        finally:
            random_after.restore()

    def _distributed_group(self) -> Any:
        """Return the DDP model's process group, or None when not training with DDP."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.process_group
        return None

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """Return DDP's ``no_sync`` context for passes whose gradients stay local."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _all_reduce_mean(self, tensors: list[Tensor]) -> None:
        """Average tensors over the DDP process group with one all-reduce per dtype and device."""
        self._communication.all_reduce_mean(tensors, self._distributed_group())

    def _finish(
        self,
        groups: list[_GroupBuffers],
        losses: list[Tensor | float],
        grad_norm: Tensor | None,
        unscaler: _Unscaler | None,
    ) -> None:
        """Check the passes, hand the directions to ``.grad``, clip, and take the base step."""
        if unscaler is None:
            self._check_finite(losses, grad_norm)
        # The direction tensors belong to the step (see _GroupBuffers.direction): hand them over.
        for g in groups:
            for param, direction in zip(g.params, g.direction):
                if param.grad is not direction:
                    param.grad = direction

        # A parameter without a gradient at w takes no step, even if a perturbed pass reached it.
        if sum(len(g.params) for g in groups) < sum(len(group["params"]) for group in self.param_groups):
            moved = {id(param) for g in groups for param in g.params}
            for group in self.param_groups:
                for param in group["params"]:
                    if id(param) not in moved:
                        param.grad = None

        # Clip the final direction, averaged and unscaled, with one norm over all parameters.
        params = [p for g in groups for p in g.params]
        max_grad_norm = self.param_groups[0]["max_grad_norm"]
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)

        if unscaler is None:
            self.base_optimizer.step()
        else:
            unscaler.step(self.base_optimizer, params)

    def _check_finite(self, losses: list[Tensor | float], grad_norm: Tensor | None) -> None:
        """Raise NonFiniteLossError naming the step and the pass; one host sync for all values."""
        values = _read_on_host([*losses, grad_norm] if grad_norm is not None else list(losses))
        finite = [math.isfinite(v) for v in values]
        if all(finite):
            return

        pass_names = ["w", "w + eps", "w - eps"]
        for index, ok in enumerate(finite[: len(losses)]):
            if not ok:
                raise NonFiniteLossError(
                    f"{type(self).__name__} step {self.num_steps}: the loss at {pass_names[index]} "
                    f"is {float(values[index])}; the weights were restored and no step was taken. "
                    "Lower the learning rate or rho, or check the data for NaN values"
                )
        raise NonFiniteLossError(
            f"{type(self).__name__} step {self.num_steps}: the gradient norm at w is "
            f"{float(values[-1])}; the weights were restored and no step was taken. "
            "Lower the learning rate, or clip the loss scale when training in low precision"
        )


class SAM(_SharpnessAwareOptimizer):
    r"""Sharpness-Aware Minimization around a base optimizer.

    With :math:`g_0 = \nabla L(w)` and :math:`\epsilon = \rho\, g_0 / \lVert g_0 \rVert_2` (norm over
    all parameters, :math:`\rho` per parameter group), the base optimizer receives
    :math:`\nabla L(w + \epsilon)` at the original weights :math:`w`. To first order this
    minimizes :math:`\max_{\lVert \epsilon \rVert \le \rho} L(w + \epsilon)`. Two passes per step.

    Args:
        params: parameters or parameter groups; a group may set its own ``rho``.
        base_optimizer: the optimizer class that takes the step, such as ``torch.optim.SGD``.
        rho: radius of the perturbation (default 0.05), >= 0.
        model: the module being trained; given it, normalization layers' running statistics are
            restored after the perturbed pass. Without it the perturbed pass updates them too.
            A ``DistributedDataParallel`` model gets its perturbed passes run inside
            ``no_sync()`` and their combined gradient averaged with one all-reduce.
        perturbation: how DDP perturbs. ``"global"`` (default) uses the gradient averaged over
            all processes, at two gradient all-reduces per step, so the update does not depend
            on the number of processes. ``"local"`` uses each process's own gradient, as in
            SAM's m-sharpness, at one all-reduce per step. Without DDP the two are the same.
        max_grad_norm: if given (> 0), the final update direction, after the all-reduce and the
            GradScaler's unscaling, is clipped as by ``torch.nn.utils.clip_grad_norm_`` with this
            bound on its L2 norm over all parameters, right before the base optimizer's step.
            Every parameter group shares the one value: a group that leaves it out takes the
            first group's. Default None: no clipping.
        **base_kwargs: arguments of ``base_optimizer`` (``lr``, ``momentum``, ...).

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> opt.param_groups[0]["rho"], opt.param_groups[0]["lr"]
        (0.05, 0.1)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.05,
        model: nn.Module | None = None,
        perturbation: str = "global",
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            model=model,
            perturbation=perturbation,
            own_defaults={"rho": rho},
            max_grad_norm=max_grad_norm,
            **base_kwargs,
        )

    def _perturbed_passes(self, groups: list[_GroupBuffers], run: Callable[[], Tensor | float]) -> list[Tensor | float]:
        # The weights are still at w, so adding eps gives w + eps. Dropping the references to g0
        # lets the next pass reuse its memory once the closure clears .grad.
        for g in groups:
            self._perturb(g.params, g, 1.0, g.grads)
            g.grads = g.grad_at_w = []
        loss_plus = run()
        for g in groups:
            g.direction = g.current_grads()
        return [loss_plus]


class CRSAM(_SharpnessAwareOptimizer):
    r"""Curvature-Regularized SAM: SAM plus finite-difference curvature and gradient-norm terms.

    With :math:`g_0 = \nabla L(w)`, :math:`\epsilon = \rho\, g_0 / \lVert g_0 \rVert_2` (global
    norm, :math:`\rho` per group), :math:`g_\pm = \nabla L(w \pm \epsilon)`, the base optimizer
    receives at the original weights :math:`w`

    .. math::

        d = g_+ + \alpha\,(g_+ + g_- - 2 g_0) + \beta\,(g_+ - g_-)
          = (1 + \alpha + \beta)\, g_+ + (\alpha - \beta)\, g_- - 2 \alpha\, g_0 .

    Three forward-backward passes per step. With :math:`\epsilon` held fixed, as in SAM's gradient,
    Taylor expansion gives :math:`g_+ + g_- - 2 g_0 = \nabla_w (\epsilon^\top H(w)\, \epsilon)
    + O(\rho^4)` and :math:`g_+ - g_- = 2 H \epsilon + O(\rho^3) = 2\rho\,\nabla_w \lVert \nabla L(w)
    \rVert + O(\rho^3)`, so to leading order :math:`d` is the gradient of

    .. math::

        L(w + \epsilon) + \alpha \rho^2\, \hat g^\top H(w)\, \hat g
        + 2 \beta \rho\, \lVert \nabla L(w) \rVert, \qquad \hat g = g_0 / \lVert g_0 \rVert,

    a curvature penalty along the gradient direction (one deterministic probe, not a Hutchinson
    estimate of the trace) plus a gradient-norm penalty.

    The authors' released code (github.com/TrustAIoT/CR-SAM) computes this same combination and
    calls ``alpha`` ``gamma``; ``beta`` keeps its name there. Its defaults are rho = 0.1,
    gamma = alpha = 0.1 and beta = 0.01, the defaults here.

    Args:
        params: parameters or parameter groups; a group may set its own ``rho``, ``alpha`` and
            ``beta``.
        base_optimizer: the optimizer class that takes the step, such as ``torch.optim.SGD``.
        rho: radius of the perturbation, >= 0.
        alpha: weight of the curvature term ``g+ + g- - 2 g0``, >= 0 (``gamma`` in the authors'
            code).
        beta: weight of the gradient-norm term ``g+ - g-``, >= 0.
        model: the module being trained; given it, normalization layers' running statistics are
            restored after each perturbed pass. Without it the perturbed passes update them too.
            A ``DistributedDataParallel`` model gets its perturbed passes run inside
            ``no_sync()`` and their combined gradient averaged with one all-reduce.
        perturbation: how DDP perturbs. ``"global"`` (default) uses the gradient averaged over
            all processes, at two gradient all-reduces per step, so the update does not depend
            on the number of processes. ``"local"`` uses each process's own gradient, as in
            SAM's m-sharpness, at one all-reduce per step. Without DDP the two are the same.
        max_grad_norm: if given (> 0), the final update direction ``d``, after the all-reduce and
            the GradScaler's unscaling, is clipped as by ``torch.nn.utils.clip_grad_norm_`` with
            this bound on its L2 norm over all parameters, right before the base optimizer's
            step. Every parameter group shares the one value: a group that leaves it out takes
            the first group's. Default None: no clipping.
        copy_gradients: CR-SAM keeps g0 and g+ in the tensors that backward left in ``.grad``,
            without copying them. It sets ``.grad`` to None before the next closure call, so
            ``zero_grad`` in either form cannot reach them. A closure that writes into gradient
            tensors of an earlier call anyway, because it reuses its own tensors as ``.grad``,
            makes the step raise ``RuntimeError``. ``copy_gradients=True`` clones g0 and g+
            instead, for such closures, at two allocations of parameter size per step. ``.grad``
            is then a new tensor after every step. Default False.
        **base_kwargs: arguments of ``base_optimizer`` (``lr``, ``momentum``, ...).

    With ``alpha = beta = 0`` the step equals :class:`SAM`'s (it still runs the third pass).

    ``step(FunctionalClosure(model, loss_fn, inputs, targets), parallel=True)`` computes
    :math:`g_+` and :math:`g_-` in one batched evaluation: ``torch.func.functional_call`` under
    ``torch.func.vmap`` over the two weight vectors stacked along a new dimension, followed by
    one backward pass. It gives the sequential update up to float round-off (the batched kernels
    sum in another order). Random operations use ``randomness="same"``, starting from the random
    state before the pass at ``w``, so dropout draws for both weight vectors the masks that the
    sequential passes draw. Normalization layers in training mode update scratch copies of their
    running statistics, which are then discarded, so the model's statistics end the step as the
    pass at ``w`` left them, with or without ``model=``. The model's forward pass must be
    vmappable: other modules that write into buffers make ``vmap`` raise.

    References:
        Wu, T., Luo, T., Wunsch II, D. C. (2024). CR-SAM: Curvature Regularized Sharpness-Aware
        Minimization. AAAI. arXiv:2312.13555.
    """

    _own_hyperparameters = ("rho", "alpha", "beta")
    _supports_parallel = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.1,
        alpha: float = 0.1,
        beta: float = 0.01,
        model: nn.Module | None = None,
        perturbation: str = "global",
        max_grad_norm: float | None = None,
        copy_gradients: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(copy_gradients, bool):
            raise TypeError(f"copy_gradients must be True or False, got {copy_gradients!r}")
        super().__init__(
            params,
            base_optimizer,
            model=model,
            perturbation=perturbation,
            own_defaults={"rho": rho, "alpha": alpha, "beta": beta},
            max_grad_norm=max_grad_norm,
            **base_kwargs,
        )
        self.copy_gradients = copy_gradients

    _TRANSIENT = (*_SharpnessAwareOptimizer._TRANSIENT, "_spare", "_scratch_buffers", "_coefficients")

    def _init_working_state(self) -> None:
        super()._init_working_state()
        # The gradient tensors of the last step's perturbed passes, (g+, g-) per group. Each set
        # is released right before the pass of the next step that allocates its successor, so
        # the allocator hands back the same memory, as it does when a training loop frees .grad
        # before each backward pass. Freed at the end of the step instead, 45 MB of ResNet-18
        # gradients went back to the system and cost about 8 700 minor page faults per step
        # (glibc, 2-core CPU machine, counted by benchmarks/bench_optimizer.py).
        self._spare: list[tuple[list[Tensor], list[Tensor]]] = []
        # Scratch copies (2, *shape) of the running statistics for batched passes, by id(buffer).
        self._scratch_buffers: dict[int, tuple[Tensor, Tensor]] = {}
        self._coefficients = _Coefficients()

    def _combine_perturbed(
        self, g: _GroupBuffers, grads_plus: list[Tensor], grads_minus: list[Tensor], into: list[Tensor] | None
    ) -> None:
        """Set the direction to (1 + alpha + beta) g+ + (alpha - beta) g-.

        The sum goes into ``into``, or with None into ``grads_plus`` itself, which must then be
        tensors the step owns, each with its own memory. :meth:`_add_gradient_at_w` adds the
        last term, -2 alpha g0.
        """
        alpha, beta = float(g.group["alpha"]), float(g.group["beta"])
        if into is None:
            # The sequential path: g.weights() recorded the parameters' (and gradients') dtype.
            copies = g.weights()
            coefficient = self._coefficients.get(1.0 + alpha + beta, copies.dtype, copies.device)
            torch._foreach_mul_(grads_plus, coefficient)
            into = grads_plus
        else:
            coefficient = self._coefficients.like(1.0 + alpha + beta, grads_plus)
            for buffer, grad in zip(into, grads_plus):
                torch.mul(grad, coefficient, out=buffer)
        if alpha != beta:
            torch._foreach_add_(into, grads_minus, alpha=alpha - beta)
        g.direction = into

    def _check_kept(self, groups: list[_GroupBuffers], point: str) -> None:
        """Raise if the pass at ``point`` wrote into a gradient that the step keeps without a copy."""
        if all(g.kept_unchanged() for g in groups):
            return
        raise RuntimeError(
            f"CRSAM step {self.num_steps}: the closure call at {point} wrote into the gradient of an "
            "earlier pass, which CR-SAM keeps without copying it (the closure reuses its own "
            "tensors as .grad). The weights were restored and no step was taken. Let backward "
            "allocate .grad in each call (optimizer.zero_grad() sets it to None), or build the "
            "optimizer with copy_gradients=True"
        )

    def _perturbed_passes(self, groups: list[_GroupBuffers], run: Callable[[], Tensor | float]) -> list[Tensor | float]:
        # Each pass's gradients are taken from .grad before the next closure call, which would
        # replace them, so g0 and g+ need no copies.
        copy = self.copy_gradients
        spare, self._spare = self._spare, []
        for g in groups:
            g.grad_at_w = g.take_grads(copy)
            g.grads = []
            self._perturb(g.params, g, 1.0, g.grad_at_w)
        _release(spare, 0)
        loss_plus = run()
        self._check_kept(groups, "w + eps")
        grads_plus = [g.take_grads(copy) for g in groups]

        self._move(groups, -1.0)
        _release(spare, 1)
        loss_minus = run()
        self._check_kept(groups, "w - eps")
        for g, plus in zip(groups, grads_plus):
            minus = g.current_grads()
            self._combine_perturbed(g, plus, minus, into=None)
            self._spare.append((plus, minus))
        return [loss_plus, loss_minus]

    def _parallel_passes(self, groups: list[_GroupBuffers], closure: FunctionalClosure) -> list[Tensor]:
        # The batched pass allocates its gradients in one piece, so a sequential step's kept
        # gradients are of no use here.
        _release(self._spare, 0)
        _release(self._spare, 1)
        self._spare = []
        module = _unwrap(closure.model)
        names = {id(param): name for name, param in module.named_parameters()}

        # Stack w + eps and w - eps of every parameter with a gradient at w into leaf tensors
        # (2, *shape). The model's own weights stay at w, and g0 stays in .grad untouched.
        batched: dict[str, Tensor] = {}
        leaves: list[Tensor] = []
        for g in groups:
            stacked, plus, minus = g.stacked()
            self._write_perturbed(plus, g, 1.0, g.params, small=False)
            self._write_perturbed(minus, g, -1.0, g.params, small=False)
            for param, leaf in zip(g.params, stacked):
                name = names.get(id(param))
                if name is None:
                    raise ValueError(
                        f"a parameter of shape {tuple(param.shape)} in the optimizer is not a parameter "
                        "of the FunctionalClosure's model; build the optimizer from model.parameters()"
                    )
                batched[name] = leaf
            leaves += stacked
        fixed = {name: param.detach() for name, param in module.named_parameters() if name not in batched}
        self._split_buffers(module, batched, fixed)

        # One batched forward pass over the two weight vectors, then one backward pass.
        with torch.enable_grad():
            losses = torch.func.vmap(closure.loss_at, in_dims=(0, None), randomness="same")(batched, fixed)
            if losses.shape != (2,):
                raise ValueError(
                    f"loss_fn returned a tensor of shape {tuple(losses.shape[1:])}; return a scalar, "
                    "for example with reduction='mean'"
                )
            grads = torch.autograd.grad(losses.sum(), leaves)

        offset = 0
        for g in groups:
            group_grads = grads[offset : offset + len(g.params)]
            offset += len(g.params)
            # The batched gradients may share memory or have zero strides (a parameter used
            # twice, or only through a sum), so the sum goes into buffers of its own.
            plus, minus = [grad[0] for grad in group_grads], [grad[1] for grad in group_grads]
            self._combine_perturbed(g, plus, minus, into=g.directions())
        losses = losses.detach()
        return [losses[0], losses[1]]

    def _split_buffers(self, module: nn.Module, batched: dict[str, Tensor], fixed: dict[str, Tensor]) -> None:
        """Add the module's buffers to the batched or the fixed inputs of the batched pass.

        Normalization layers in training mode write their running statistics in place, which
        ``vmap`` rejects for a tensor shared by both weight vectors, so they get scratch copies
        (2, *shape). In training mode the layers normalize with batch statistics, so the values
        of the copies do not change the loss. The copies are discarded after the pass.
        """
        scratch_ids = set()
        for layer in module.modules():
            if isinstance(layer, _NormBase) and layer.track_running_stats and layer.training:
                for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
                    if buffer is not None:
                        scratch_ids.add(id(buffer))
        scratch = {}
        for name, buffer in module.named_buffers():
            if id(buffer) not in scratch_ids:
                fixed[name] = buffer
                continue
            entry = self._scratch_buffers.get(id(buffer))
            if entry is None or entry[0] is not buffer or entry[1].shape[1:] != buffer.shape:
                entry = (buffer, buffer.detach().unsqueeze(0).repeat(2, *([1] * buffer.dim())))
            scratch[id(buffer)] = entry
            batched[name] = entry[1]
        self._scratch_buffers = scratch

    def _add_gradient_at_w(self, groups: list[_GroupBuffers]) -> None:
        # The sum goes into g0's tensor, which is .grad of the pass at w: a closure that zeroes
        # .grad in place keeps the same .grad tensor from step to step, as with a plain optimizer.
        for g in groups:
            alpha = float(g.group["alpha"])
            for direction, grad_at_w in zip(g.direction, g.grad_at_w):
                torch.add(direction, grad_at_w, alpha=-2.0 * alpha, out=grad_at_w)
            g.direction = g.grad_at_w
