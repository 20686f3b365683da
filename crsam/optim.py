r"""Sharpness-aware optimizers: SAM and CR-SAM as wrappers around a base optimizer.

Both optimizers take ``step(closure)``: the closure zeroes the gradients, runs the forward and
backward pass on the current batch and returns the loss. The optimizer calls it at the weights
``w`` and at perturbed weights, restores ``w`` from a saved copy, writes the combined gradient
into ``p.grad`` and lets the base optimizer (``torch.optim.SGD``, ``torch.optim.AdamW``, ...)
take its step at ``w``.

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

References:
    Foret, P., Kleiner, A., Mobahi, H., Neyshabur, B. (2021). Sharpness-Aware Minimization for
    Efficiently Improving Generalization. ICLR. arXiv:2010.01412.

    Wu, T., Luo, T., Wunsch II, D. C. (2024). CR-SAM: Curvature Regularized Sharpness-Aware
    Minimization. AAAI. arXiv:2312.13555.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["SAM", "CRSAM", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A pass of a sharpness-aware step returned a NaN or infinite loss or gradient norm."""


def _check_hyperparameter(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite, non-negative real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a non-negative real number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


class _RandomState:
    """Snapshot of torch's global generators: the CPU one and every initialized CUDA device.

    NOTE: Python's ``random`` and numpy's generators are not captured, so a closure that draws
    from them (data augmentation, say) sees different draws in each pass. Draw those outside.
    """

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class _NormBuffers:
    """Copy of the running statistics and batch counters of a model's normalization layers."""

    def __init__(self, model: nn.Module | None) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []
        if model is None:
            return
        for module in model.modules():
            if not (isinstance(module, _NormBase) and module.track_running_stats):
                continue
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buffer is not None:
                    self.pairs.append((buffer, buffer.detach().clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in self.pairs:
                buffer.copy_(saved)


class _SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Shared machinery of SAM and CR-SAM: wrapping, state, random state, restore, checks."""

    # Names of the hyperparameters this wrapper adds to every parameter group.
    _own_hyperparameters: tuple[str, ...] = ("rho",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        model: nn.Module | None,
        perturbation: str,
        own_defaults: dict[str, float],
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
        clashes = sorted(set(own_defaults) & set(base_kwargs))
        if clashes:
            raise ValueError(f"hyperparameters {clashes} are given twice; pass each once")

        super().__init__(params, {**own_defaults, **base_kwargs})

        # The base optimizer shares the wrapper's group dicts and per-parameter state, so an LR
        # scheduler attached to the wrapper changes the base optimizer's learning rate.
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._link_base_optimizer()
        self.defaults = {**self.base_optimizer.defaults, **self.defaults}
        self.model = model
        self.perturbation = perturbation
        self.num_steps = 0

    def _link_base_optimizer(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; hyperparameters it leaves out take the constructor's values."""
        for name in self._own_hyperparameters:
            if name in param_group:
                _check_hyperparameter(name, param_group[name])
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """Return the base optimizer's state dict, whose groups also hold rho, alpha and beta."""
        state = self.base_optimizer.state_dict()
        state["sharpness_aware"] = {"num_steps": self.num_steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict` of the same class and parameters."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("sharpness_aware", {"num_steps": 0})
        for group in state_dict.get("param_groups", []):
            for name in self._own_hyperparameters:
                if name not in group:
                    raise ValueError(
                        f"the state dict's parameter groups have no {name!r}: it was not written "
                        f"by {type(self).__name__}.state_dict(); load it into the base optimizer"
                    )
                _check_hyperparameter(name, group[name])
        self.base_optimizer.load_state_dict(state_dict)
        self._link_base_optimizer()
        self.num_steps = int(extra["num_steps"])

    # ------------------------------------------------------------------ the step

    def _perturbed_passes(self, groups: list[_GroupBuffers], run: Callable[[], Tensor | float]) -> list[Tensor | float]:
        """Run the perturbed passes and leave the local direction in each group.

        :meth:`_move` places the weights, and ``run()`` calls the closure there and returns the
        loss. Each subclass sets ``g.direction`` to its update direction, in which the gradient at
        ``w`` (the only one that may already be averaged over processes) enters through
        :meth:`_add_gradient_at_w` after the all-reduce.
        """
        raise NotImplementedError

    def _add_gradient_at_w(self, groups: list[_GroupBuffers]) -> None:
        """Add the gradient-at-w term of the direction (none for SAM)."""

    @staticmethod
    def _move(groups: list[_GroupBuffers], sign: float) -> None:
        """Set the weights to ``w + sign * eps`` from the saved copy of ``w``."""
        for g in groups:
            torch._foreach_copy_(g.params, g.weights)
            torch._foreach_add_(g.params, g.eps, alpha=sign)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor | float] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | float:
        """Run the passes, combine their gradients and take the base optimizer's step at ``w``.

        Args:
            closure: zeroes the gradients, runs forward and backward on the batch and returns the
                loss. It is called once at ``w`` and once per perturbed point. With a ``scaler``
                it calls ``scaler.scale(loss).backward()`` and returns the unscaled loss.
            scaler: a ``torch.amp.GradScaler`` for float16 training, which the optimizer drives
                itself, because ``GradScaler.step`` rejects closures. Each pass's gradients are
                unscaled before any norm is taken. On an overflow in any pass the weights are
                restored, the step is skipped and the scale backs off, as in ``GradScaler.step``.
                ``scaler.update()`` runs inside this call: do not call it again.

        Returns:
            The loss at ``w`` as returned by the closure.

        Raises:
            NonFiniteLossError: without a scaler, a pass returned a NaN or infinite loss, or the
                gradient at ``w`` has a non-finite norm. The weights are restored and no step is
                taken.
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step needs a closure that zeroes the gradients, runs the "
                "forward and backward pass and returns the loss"
            )
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        closure = torch.enable_grad()(closure)
        self.num_steps += 1
        unscaler = _Unscaler(scaler) if scaler is not None else None

        # Pass at w, remembering the random state before and after it.
        random_before = _RandomState()
        with self._no_sync() if self.perturbation == "local" else contextlib.nullcontext():
            loss_at_w = closure()
        if loss_at_w is None:
            raise TypeError(f"the closure passed to {type(self).__name__}.step returned None; return the loss")
        random_after = _RandomState()
        norm_buffers = _NormBuffers(self.model)
        if unscaler is not None:
            unscaler.unscale([p for group in self.param_groups for p in group["params"]])

        groups = [_GroupBuffers(group) for group in self.param_groups]
        groups = [g for g in groups if g.params]
        if not groups:
            # No parameter received a gradient: nothing to perturb and nothing to update.
            if unscaler is None:
                self._check_finite([loss_at_w], None)
            return loss_at_w
        if all(g.rho == 0.0 for g in groups):
            # Without a perturbation every pass would return the gradient at w: skip them.
            for g in groups:
                g.direction = [p.grad for p in g.params]
            if self.perturbation == "local" and self._distributed_group() is not None:
                self._all_reduce_mean([d for g in groups for d in g.direction])
            self._finish(groups, [loss_at_w], None, unscaler)
            return loss_at_w

        # eps = rho * g0 / ||g0|| with the norm over every group; a zero gradient gives eps = 0.
        grad_norm = _global_norm([g.grad_at_w for g in groups])
        safe_norm = torch.where(grad_norm > 0, grad_norm, torch.ones_like(grad_norm))
        for g in groups:
            scale = torch.where(grad_norm > 0, g.rho / safe_norm, torch.zeros_like(grad_norm))
            g.eps = torch._foreach_mul(g.grad_at_w, scale)
            g.weights = torch._foreach_mul(g.params, 1.0)

        def run() -> Tensor | float:
            random_before.restore()
            with self._no_sync():
                loss = closure()
            norm_buffers.restore()
            if unscaler is not None:
                unscaler.unscale([p for g in groups for p in g.params])
            return loss

        try:
            losses = [loss_at_w, *self._perturbed_passes(groups, run)]
        finally:
            for g in groups:
                torch._foreach_copy_(g.params, g.weights)
            random_after.restore()
            norm_buffers.restore()

        # Gradients of the perturbed passes are local to this process: average them once.
        if self._distributed_group() is not None:
            self._all_reduce_mean([d for g in groups for d in g.direction])
        self._add_gradient_at_w(groups)
        self._finish(groups, losses, grad_norm, unscaler)
        return loss_at_w

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
        process_group = self._distributed_group()
        world_size = torch.distributed.get_world_size(process_group)
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for tensor in tensors:
            buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for bucket in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in bucket])
            torch.distributed.all_reduce(flat, group=process_group)
            flat.div_(world_size)
            pieces = flat.split([t.numel() for t in bucket])
            torch._foreach_copy_(bucket, [piece.view_as(t) for piece, t in zip(pieces, bucket)])

    def _finish(
        self,
        groups: list[_GroupBuffers],
        losses: list[Tensor | float],
        grad_norm: Tensor | None,
        unscaler: _Unscaler | None,
    ) -> None:
        """Check the passes, hand the directions to ``.grad`` and take the base optimizer's step."""
        if unscaler is None:
            self._check_finite(losses, grad_norm)
        for g in groups:
            for param, direction in zip(g.params, g.direction):
                param.grad = direction

        # A parameter without a gradient at w takes no step, even if a perturbed pass reached it.
        moved = {id(param) for g in groups for param in g.params}
        for group in self.param_groups:
            for param in group["params"]:
                if id(param) not in moved:
                    param.grad = None

        if unscaler is None:
            self.base_optimizer.step()
        else:
            unscaler.step(self.base_optimizer, [p for g in groups for p in g.params])

    def _check_finite(self, losses: list[Tensor | float], grad_norm: Tensor | None) -> None:
        """Raise NonFiniteLossError naming the step and the pass; one host sync for all values."""
        values = [torch.as_tensor(loss, dtype=torch.float64).detach().cpu().reshape(()) for loss in losses]
        if grad_norm is not None:
            values.append(grad_norm.detach().to(torch.float64).cpu())
        finite = torch.isfinite(torch.stack(values)).tolist()
        pass_names = ["w", "w + eps", "w - eps"]
        for index, ok in enumerate(finite[: len(losses)]):
            if not ok:
                raise NonFiniteLossError(
                    f"{type(self).__name__} step {self.num_steps}: the loss at {pass_names[index]} "
                    f"is {float(values[index])}; the weights were restored and no step was taken. "
                    "Lower the learning rate or rho, or check the data for NaN values"
                )
        if grad_norm is not None and not finite[-1]:
            raise NonFiniteLossError(
                f"{type(self).__name__} step {self.num_steps}: the gradient norm at w is "
                f"{float(values[-1])}; the weights were restored and no step was taken. "
                "Lower the learning rate, or clip the loss scale when training in low precision"
            )


class _Unscaler:
    """Unscale each pass's gradients for a GradScaler and remember whether any overflowed.

    ``GradScaler.unscale_`` may run once per step, and ``GradScaler.step`` rejects closures, so
    the passes are unscaled here, and at the end the combined gradient is scaled back and handed
    to the scaler's own ``unscale_``, ``step`` and ``update`` on the base optimizer. An overflow in
    any pass is written into that gradient as an infinity, so the scaler skips the step and backs
    off exactly as it would for one pass.
    """

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self.found_inf: dict[torch.device, Tensor] = {}

    def unscale(self, params: list[Tensor]) -> None:
        by_device: dict[torch.device, list[Tensor]] = {}
        for param in params:
            if param.grad is not None:
                by_device.setdefault(param.grad.device, []).append(param.grad)
        for device, grads in by_device.items():
            found_inf = self.found_inf.setdefault(device, torch.zeros((), device=device))
            inv_scale = torch.full((), 1.0 / self.scaler.get_scale(), device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)

    def step(self, base_optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
        scale = self.scaler.get_scale()
        found_any = sum(found.to(params[0].device) for found in self.found_inf.values())
        grads = [param.grad for param in params]
        # Powers of two (GradScaler's default scales) make this product exact. An overflow turns
        # the first gradient into inf or NaN, which the scaler's own check then finds.
        torch._foreach_mul_(grads, scale)
        grads[0].mul_(torch.where(found_any > 0, torch.inf, 1.0))
        self.scaler.unscale_(base_optimizer)
        self.scaler.step(base_optimizer)
        self.scaler.update()


class _GroupBuffers:
    """Per-group working tensors of one step: gradient at w, saved weights, eps, direction."""

    def __init__(self, group: dict[str, Any]) -> None:
        self.group = group
        self.rho = float(group["rho"])
        self.params: list[Tensor] = []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError(
                    "sharpness-aware optimizers need dense gradients; "
                    "build embeddings with sparse=False"
                )
            self.params.append(param)
        # The pass at w leaves g0 in .grad; the next closure call zeroes or replaces it.
        self.grad_at_w: list[Tensor] = torch._foreach_mul([p.grad for p in self.params], 1.0) if self.params else []
        self.weights: list[Tensor] = []
        self.eps: list[Tensor] = []
        self.direction: list[Tensor] = []

    def current_grads(self) -> list[Tensor]:
        """Return the gradients the last pass left, zeros where it produced none."""
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]


def _global_norm(tensor_lists: list[list[Tensor]]) -> Tensor:
    """Return the L2 norm over all tensors of all lists, as a 0-dim tensor on the first device."""
    norms = [n for tensors in tensor_lists for n in torch._foreach_norm(tensors)]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


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
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params, base_optimizer, model=model, perturbation=perturbation, own_defaults={"rho": rho}, **base_kwargs
        )

    def _perturbed_passes(self, groups: list[_GroupBuffers], run: Callable[[], Tensor | float]) -> list[Tensor | float]:
        self._move(groups, 1.0)
        loss_plus = run()
        for g in groups:
            g.direction = g.current_grads()
            g.grad_at_w = []
            g.eps = []
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
        **base_kwargs: arguments of ``base_optimizer`` (``lr``, ``momentum``, ...).

    With ``alpha = beta = 0`` the step equals :class:`SAM`'s (it still runs the third pass).

    References:
        Wu, T., Luo, T., Wunsch II, D. C. (2024). CR-SAM: Curvature Regularized Sharpness-Aware
        Minimization. AAAI. arXiv:2312.13555.
    """

    _own_hyperparameters = ("rho", "alpha", "beta")

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
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            model=model,
            perturbation=perturbation,
            own_defaults={"rho": rho, "alpha": alpha, "beta": beta},
            **base_kwargs,
        )

    def _perturbed_passes(self, groups: list[_GroupBuffers], run: Callable[[], Tensor | float]) -> list[Tensor | float]:
        self._move(groups, 1.0)
        loss_plus = run()

        # Once the weights sit at w - eps, the buffer of eps keeps (1 + alpha + beta) g+.
        self._move(groups, -1.0)
        for g in groups:
            alpha, beta = float(g.group["alpha"]), float(g.group["beta"])
            torch._foreach_copy_(g.eps, g.current_grads())
            torch._foreach_mul_(g.eps, 1.0 + alpha + beta)
        loss_minus = run()
        for g in groups:
            alpha, beta = float(g.group["alpha"]), float(g.group["beta"])
            torch._foreach_add_(g.eps, g.current_grads(), alpha=alpha - beta)
            g.direction, g.eps = g.eps, []
        return [loss_plus, loss_minus]

    def _add_gradient_at_w(self, groups: list[_GroupBuffers]) -> None:
        for g in groups:
            alpha = float(g.group["alpha"])
            torch._foreach_add_(g.direction, g.grad_at_w, alpha=-2.0 * alpha)
            g.grad_at_w = []
