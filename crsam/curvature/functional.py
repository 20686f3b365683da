"""The training loss as a function of a model's flat parameter vector, with its derivatives.

:class:`EmpiricalLoss` evaluates L(w) = (1/N) sum_i l(f(x_i; w), y_i) over a whole data set in
batches, through ``torch.func.functional_call``, and returns gradients and Hessian-vector
products of that mean loss. Batches are summed and divided by the total example count N, so an
uneven last batch carries exactly its share and the result does not depend on the batch size
(in eval mode). With ``distributed=True`` each process holds a shard of the data, and the sums
and counts are added over the processes before the division, so every process gets the values
of the whole data set.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.modules.batchnorm import _NormBase

from crsam.distributed import all_reduce_sum

__all__ = ["EmpiricalLoss", "FiniteDifferenceHessian", "LossSpec", "finite_difference_step"]

# A loss name or a callable (outputs, targets) -> one loss per example.
LossSpec = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

_LOSS_NAMES = {"cross_entropy": "cross-entropy", "mse": "squared error"}
_BACKENDS = ("double-backward", "forward-over-reverse")
_MODES = ("eval", "train")


def finite_difference_step(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Return the step h for central differences of the gradient in ``dtype``.

    The central difference (g(w + h u) - g(w - h u)) / (2h) has a truncation error of about
    h^2 ||D^3 L|| / 6 and a round-off error of about eps ||g|| / h, with eps the machine epsilon
    of ``dtype``. The sum is smallest at h ~ (3 eps ||g|| / ||D^3 L||)^(1/3), so with no
    knowledge of the derivatives we take h = eps^(1/3) * scale: about 6e-6 in float64 and
    5e-3 in float32, times ``scale``, the typical size of a weight.
    """
    eps = torch.finfo(dtype).eps
    return eps ** (1.0 / 3.0) * scale


def _per_example_loss(loss: LossSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return a function (outputs, targets) -> losses of shape (batch,)."""
    if loss == "cross_entropy":
        return lambda outputs, targets: F.cross_entropy(outputs, targets, reduction="none")
    if loss == "mse":
        # Squared error summed over the outputs of each example.
        return lambda outputs, targets: (outputs - targets).pow(2).reshape(outputs.shape[0], -1).sum(1)
    if callable(loss):
        return loss
    raise ValueError(
        f"loss={loss!r} is invalid; use 'cross_entropy', 'mse' or a callable "
        "(outputs, targets) -> one loss per example"
    )


class EmpiricalLoss:
    """The mean (or summed) loss of ``model`` over a data set, as a function of its parameters.

    L(w) = (1/N) sum_{i=1}^{N} l(f(x_i; w), y_i) for ``reduction="mean"``, without the 1/N for
    ``"sum"``. Only parameters with ``requires_grad=True`` are variables. They are flattened into
    one vector w in ``named_parameters`` order (``num_parameters`` entries), and every method
    takes and returns flat vectors. Parameters that do not affect the loss get zero gradient
    and zero Hessian rows.

    Args:
        model: the network; it is called as ``model(x)`` and its own weights are never changed.
        inputs, targets: the whole data set, first dimension N (tensors), or ``None`` with
            ``batches`` given.
        loss: ``"cross_entropy"`` (integer class targets), ``"mse"`` (squared error summed over
            the outputs of an example), or a callable returning one loss per example.
        reduction: ``"mean"`` (divide the sum by N) or ``"sum"``.
        batch_size: examples per forward pass; ``None`` evaluates all N at once.
        batches: instead of tensors, a re-iterable of ``(x, y)`` pairs such as a ``DataLoader``
            (iterated once per evaluation; N is counted on the way).
        mode: ``"eval"`` (default) puts the model in eval mode for every evaluation. ``"train"``
            uses training behaviour with two changes that make L a deterministic function of w.
            Normalization layers use batch statistics without updating their running
            statistics. The random-number generator is reseeded per batch (from ``seed``), so
            dropout draws the same masks in every evaluation. The model's own mode is
            restored afterwards.
        seed: seed of the per-batch dropout masks in train mode.
        backend: how Hessian-vector products are computed. ``"double-backward"`` (default)
            differentiates the gradient's graph once more, once per product; on a 2-core CPU with
            torch 2.13 it was faster than ``"forward-over-reverse"`` (``torch.func.jvp`` of
            ``torch.func.grad``) for the MNIST-1D MLP and CNN. Both give the exact product.
        distributed: the data are this process's shard of the data set. Loss sums, gradients,
            Hessian-vector products and example counts are summed with an all-reduce over
            ``process_group`` before the division by N. Every process of the group must make the
            same calls with the same ``w`` and vectors. A shard may be empty.
        process_group: the ``torch.distributed`` group to reduce over, default all processes.

    .. note::
       In train mode with BatchNorm, L depends on how the data are split into batches, because
       each batch is normalized by its own statistics; only eval mode gives a loss that is
       independent of ``batch_size``.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        loss: LossSpec = "cross_entropy",
        reduction: str = "mean",
        batch_size: int | None = None,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
        mode: str = "eval",
        seed: int = 0,
        backend: str = "double-backward",
        distributed: bool = False,
        process_group: Any = None,
    ) -> None:
        # Check the arguments up front.
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} is invalid; use 'mean' or 'sum'")
        if mode not in _MODES:
            raise ValueError(
                f"mode={mode!r} is invalid; use 'eval' (default) or 'train' "
                "(batch statistics held fixed, dropout masks seeded per batch)"
            )
        if backend not in _BACKENDS:
            raise ValueError(f"backend={backend!r} is invalid; use one of {', '.join(_BACKENDS)}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} is invalid; use a positive integer or None")
        if (batches is None) == (inputs is None):
            raise ValueError("pass either inputs and targets (tensors) or batches (an iterable of (x, y)), not both")
        if inputs is not None:
            if targets is None:
                raise ValueError("targets is missing; pass one target per row of inputs")
            if inputs.shape[0] != targets.shape[0]:
                raise ValueError(
                    f"inputs has {inputs.shape[0]} rows but targets has {targets.shape[0]}; "
                    "pass one target per example"
                )
            if inputs.shape[0] == 0 and not distributed:
                raise ValueError("inputs is empty; pass at least one example")

        self.model = model
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.batches = batches
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom loss")
        self._per_example = _per_example_loss(loss)
        self.reduction = reduction
        self.mode = mode
        self.seed = seed
        self.backend = backend
        self.distributed = distributed
        self.process_group = process_group

        # The variables: trainable parameters, flattened in named_parameters order.
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True; there is nothing to differentiate")
        self.parameter_names = [name for name, _ in named]
        self._shapes = [p.shape for _, p in named]
        self._sizes = [p.numel() for _, p in named]
        self.num_parameters = sum(self._sizes)
        first = named[0][1]
        self.dtype = first.dtype
        self.device = first.device

    # ----------------------------------------------------------------------------------------
    # Parameters and data

    def parameters(self) -> torch.Tensor:
        """Return the model's current trainable parameters as one flat (detached) vector."""
        return torch.cat(
            [p.detach().reshape(-1) for p in self.model.parameters() if p.requires_grad]
        )

    def describe(self) -> str:
        """Return a one-line description of the loss, e.g. ``"mean cross-entropy, no weight decay"``."""
        name = _LOSS_NAMES.get(self.loss_name, self.loss_name)
        return f"{self.reduction} {name}, no weight decay"

    def _unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = torch.split(w, self._sizes)
        return {name: piece.view(shape) for name, piece, shape in zip(self.parameter_names, pieces, self._shapes)}

    def _check_vector(self, v: torch.Tensor, name: str) -> torch.Tensor:
        if v.ndim != 1 or v.numel() != self.num_parameters:
            raise ValueError(
                f"{name} has shape {tuple(v.shape)}; pass a flat vector of length "
                f"{self.num_parameters} (the number of trainable parameters)"
            )
        return v.to(device=self.device, dtype=self.dtype)

    def _iterate_batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (batch index, x, y) with floating tensors cast to the parameters' dtype."""
        if self.batches is not None:
            source: Iterable = self.batches
        else:
            n = self.inputs.shape[0]
            # An empty shard of a distributed loss has no batch (and range() rejects a step of 0).
            size = self.batch_size or max(n, 1)
            source = ((self.inputs[i : i + size], self.targets[i : i + size]) for i in range(0, n, size))
        for index, (x, y) in enumerate(source):
            x = x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)
            y = y.to(self.device, self.dtype) if y.is_floating_point() else y.to(self.device)
            yield index, x, y

    # ----------------------------------------------------------------------------------------
    # Model mode and randomness

    @contextlib.contextmanager
    def _evaluation_mode(self) -> Iterator[None]:
        """Put the model in the requested mode and restore every module's flags afterwards."""
        training = {module: module.training for module in self.model.modules()}
        tracking = {
            module: module.track_running_stats
            for module in self.model.modules()
            if isinstance(module, _NormBase)
        }
        try:
            if self.mode == "eval":
                self.model.eval()
            else:
                self.model.train()
                # With track_running_stats off, a training-mode norm layer normalizes by the batch
                # statistics and neither reads nor updates its running statistics.
                for module in tracking:
                    module.track_running_stats = False
            yield
        finally:
            for module, flag in training.items():
                module.training = flag
            for module, flag in tracking.items():
                module.track_running_stats = flag

    @contextlib.contextmanager
    def _batch_randomness(self, batch_index: int) -> Iterator[None]:
        """In train mode, seed the generators so that batch ``batch_index`` draws fixed masks."""
        if self.mode == "eval":
            yield
            return
        devices = [self.device] if self.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.manual_seed(self.seed * 1_000_003 + batch_index)
            yield

    def _batch_loss_sum(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch_index: int) -> torch.Tensor:
        """Return sum_{i in batch} l(f(x_i; w), y_i) for the flat parameters w."""
        with self._batch_randomness(batch_index):
            outputs = functional_call(self.model, self._unflatten(w), (x,))
        per_example = self._per_example(outputs, y)
        if per_example.shape != (x.shape[0],):
            raise ValueError(
                f"the loss returned shape {tuple(per_example.shape)} for a batch of {x.shape[0]}; "
                "a loss callable must return one loss per example (reduction='none')"
            )
        return per_example.sum()

    def _normalize(self, total: torch.Tensor, count: int) -> torch.Tensor:
        return total / count if self.reduction == "mean" else total

    def _sum_over_processes(self, total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
        """Add ``total`` and the example ``count`` over the process group when distributed.

        ``total`` is summed in place with one all-reduce, and the count with a second, exact
        int64 all-reduce.
        """
        if not self.distributed:
            return total, count
        all_reduce_sum(total, group=self.process_group)
        count_tensor = torch.tensor(count, dtype=torch.int64, device=total.device)
        count = int(all_reduce_sum(count_tensor, group=self.process_group))
        if count == 0:
            raise ValueError("every process's shard is empty; pass at least one example in total")
        return total, count

    # ----------------------------------------------------------------------------------------
    # Values and gradients

    def value(self, w: torch.Tensor | None = None) -> float:
        """Return L(w), at the model's parameters when ``w`` is None."""
        w = self.parameters() if w is None else self._check_vector(w, "w")
        total, count = torch.zeros((), dtype=self.dtype, device=self.device), 0
        with torch.no_grad(), self._evaluation_mode():
            for index, x, y in self._iterate_batches():
                total += self._batch_loss_sum(w, x, y, index)
                count += x.shape[0]
        total, count = self._sum_over_processes(total, count)
        return float(self._normalize(total, count))

    def value_and_gradient(self, w: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """Return L(w) and grad L(w) (a flat vector), at the model's parameters when ``w`` is None."""
        w = self.parameters() if w is None else self._check_vector(w, "w")
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        gradient = torch.zeros(self.num_parameters, dtype=self.dtype, device=self.device)
        count = 0
        with self._evaluation_mode():
            for index, x, y in self._iterate_batches():
                # One graph per batch, freed before the next batch.
                w_leaf = w.detach().requires_grad_(True)
                batch_loss = self._batch_loss_sum(w_leaf, x, y, index)
                (batch_gradient,) = torch.autograd.grad(
                    batch_loss, w_leaf, allow_unused=True, materialize_grads=True
                )
                total += batch_loss.detach()
                gradient += batch_gradient
                count += x.shape[0]

        # One all-reduce carries the loss and the gradient together.
        packed, count = self._sum_over_processes(torch.cat([total.reshape(1), gradient]), count)
        total, gradient = packed[0], packed[1:]
        return float(self._normalize(total, count)), self._normalize(gradient, count)

    def gradient(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """Return grad L(w) as a flat vector, at the model's parameters when ``w`` is None."""
        return self.value_and_gradient(w)[1]

    # ----------------------------------------------------------------------------------------
    # Hessian-vector products

    def hvp(self, v: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Return the exact Hessian-vector product H(w) v of the loss, a flat vector."""
        v = self._check_vector(v, "v")
        return self.matmat(v.unsqueeze(0), w)[0]

    def matmat(self, V: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Return H(w) V^T as rows: for V of shape (K, P), row k of the result is H(w) V[k].

        The K products of a batch are computed together. ``double-backward`` builds the gradient's
        graph once per batch, differentiates it along all K rows in one batched backward pass
        (``is_grads_batched``) and frees it. ``forward-over-reverse`` maps ``torch.func.jvp`` of
        ``torch.func.grad`` over the rows with ``vmap``. No graph outlives its batch.
        """
        if V.ndim != 2 or V.shape[1] != self.num_parameters:
            raise ValueError(
                f"V has shape {tuple(V.shape)}; pass a matrix of shape (K, {self.num_parameters}), "
                "one vector per row"
            )
        V = V.to(device=self.device, dtype=self.dtype)
        w = self.parameters() if w is None else self._check_vector(w, "w")
        product = torch.zeros_like(V)
        count = 0
        with self._evaluation_mode():
            for index, x, y in self._iterate_batches():
                if self.backend == "double-backward":
                    product += self._batch_matmat_double_backward(w, V, x, y, index)
                else:
                    product += self._batch_matmat_forward_over_reverse(w, V, x, y, index)
                count += x.shape[0]
        product, count = self._sum_over_processes(product, count)
        return self._normalize(product, count)

    def _batch_matmat_double_backward(self, w, V, x, y, index) -> torch.Tensor:
        w_leaf = w.detach().requires_grad_(True)
        batch_loss = self._batch_loss_sum(w_leaf, x, y, index)
        (g,) = torch.autograd.grad(batch_loss, w_leaf, create_graph=True, allow_unused=True, materialize_grads=True)
        if not g.requires_grad:
            # The gradient does not depend on w (a loss linear in every parameter): H = 0.
            return torch.zeros_like(V)
        if V.shape[0] == 1:
            (hv,) = torch.autograd.grad(g, w_leaf, grad_outputs=V[0], allow_unused=True, materialize_grads=True)
            return hv.unsqueeze(0)
        (HV,) = torch.autograd.grad(
            g, w_leaf, grad_outputs=V, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )
        return HV

    def _batch_matmat_forward_over_reverse(self, w, V, x, y, index) -> torch.Tensor:
        def batch_gradient(u: torch.Tensor) -> torch.Tensor:
            return grad(self._batch_loss_sum)(u, x, y, index)

        def product(v: torch.Tensor) -> torch.Tensor:
            return jvp(batch_gradient, (w.detach(),), (v,))[1]

        # "same": in train mode every probe uses the batch's one dropout mask.
        randomness = "same" if self.mode == "train" else "error"
        return vmap(product, randomness=randomness)(V)

    def hvp_finite_difference(
        self, v: torch.Tensor, w: torch.Tensor | None = None, *, step: float | None = None
    ) -> torch.Tensor:
        """Return H(w) v by central differences of the gradient along the unit vector u = v/||v||.

        H v = ||v|| (g(w + h u) - g(w - h u)) / (2h) + O(h^2 ||v||), with the step h from
        :func:`finite_difference_step` scaled by the root-mean-square weight (at least 1) unless
        ``step`` is given. Probing along a unit vector keeps the error independent of ||v||.
        """
        v = self._check_vector(v, "v")
        w = self.parameters() if w is None else self._check_vector(w, "w")
        v_norm = torch.linalg.vector_norm(v)
        if v_norm == 0:
            return torch.zeros_like(v)
        if step is None:
            rms_weight = float(torch.linalg.vector_norm(w)) / math.sqrt(self.num_parameters)
            step = finite_difference_step(self.dtype, max(1.0, rms_weight))
        if not step > 0:
            raise ValueError(f"step={step!r} is invalid; pass a positive finite-difference step or None")
        u = v / v_norm
        g_plus = self.gradient(w + step * u)
        g_minus = self.gradient(w - step * u)
        return v_norm * (g_plus - g_minus) / (2.0 * step)


class FiniteDifferenceHessian:
    """The Hessian of an :class:`EmpiricalLoss` accessed through finite-difference products.

    Has the ``matmat`` interface of the trace and eigenvalue estimators; each row costs two
    gradient evaluations (see :meth:`EmpiricalLoss.hvp_finite_difference`).
    """

    def __init__(self, loss: EmpiricalLoss, *, step: float | None = None) -> None:
        self.loss = loss
        self.step = step
        self.num_parameters = loss.num_parameters
        self.dtype = loss.dtype
        self.device = loss.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return the rows H V[k] by central differences."""
        w = self.loss.parameters()
        return torch.stack([self.loss.hvp_finite_difference(v, w, step=self.step) for v in V])
