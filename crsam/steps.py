"""One optimizer step of ``crsam train``: the closure's forward and backward passes, and the step.

Mixed precision (``--amp``) runs the forward passes under ``torch.autocast`` on the training
device's type, with bfloat16 or float16. The weights, their gradients and the optimizer state
stay float32, and the cross-entropy is computed in float32 because autocast runs it in float32.
float16 needs loss scaling, because small gradients underflow to 0 in float16 otherwise:

- SAM and CR-SAM receive the ``torch.amp.GradScaler`` in ``step(closure, scaler=scaler)``. They
  unscale each pass's gradients, skip the step on an overflow and update the scale themselves.
- SGD uses the scaler in the standard way: ``scaler.scale(loss).backward()`` in the closure,
  then ``scaler.step(optimizer)`` and ``scaler.update()``.

bfloat16 has float32's exponent range, so it needs no scaler.

Gradient accumulation (``--accumulation-steps K``) splits each batch of B examples into K
micro-batches of sizes that differ by at most one (``torch.tensor_split``) and runs forward and
backward on each in turn inside the closure. Micro-batch i with n_i examples contributes
(n_i / B) times its mean loss, so the accumulated gradient is the gradient of the batch's mean
loss, as without accumulation, while only one micro-batch's activations are alive at a time. SAM
and CR-SAM call the closure once per pass (at w, w + eps and w - eps), so each of their gradients
is accumulated over all micro-batches before they combine them.

Label smoothing (``--label-smoothing EPS``) trains on the cross-entropy against the targets
(1 - EPS) one-hot + EPS / C uniform over the C classes, as ``F.cross_entropy(label_smoothing=EPS)``
defines it. Evaluation and curvature measurements use the plain cross-entropy.

NOTE: BatchNorm normalizes each micro-batch by its own statistics and updates its running
statistics once per micro-batch, so with BatchNorm the result differs from the full batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Backend of ``--compile``: torch.compile's default, which generates fused C++ or Triton kernels.
# Tests replace it by "aot_eager", which traces the same graphs in seconds without generating code.
COMPILE_BACKEND = "inductor"


@dataclass
class StepRecipe:
    """Settings of each training step: autocast dtype, loss scaler and micro-batches."""

    device_type: str
    # The autocast dtype, or None for float32 throughout.
    amp_dtype: torch.dtype | None = None
    # Loss scaler of float16 training, or None.
    scaler: torch.amp.GradScaler | None = None
    # Micro-batches per batch, accumulated inside the closure.
    accumulation_steps: int = 1
    # Weight of the uniform distribution in the training targets.
    label_smoothing: float = 0.0
    # CR-SAM's two perturbed passes in one batched evaluation (torch.func.vmap).
    parallel: bool = False
    # Clipping norm of plain SGD's gradient; SAM and CR-SAM clip inside their own step.
    max_grad_norm: float | None = None


def build_scaler(amp: str | None, device: torch.device) -> torch.amp.GradScaler | None:
    """Return a ``GradScaler`` on ``device``'s type for ``--amp fp16``, or None for bf16 and float32."""
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def build_step_recipe(config: dict, device: torch.device, scaler: torch.amp.GradScaler | None) -> StepRecipe:
    """Return the step recipe of a run's resolved ``config`` on ``device``."""
    amp = config.get("amp")
    return StepRecipe(
        device_type=device.type,
        amp_dtype=None if amp is None else AMP_DTYPES[amp],
        scaler=scaler,
        accumulation_steps=config.get("accumulation_steps") or 1,
        label_smoothing=config.get("label_smoothing") or 0.0,
        parallel=bool(config.get("parallel")),
        max_grad_norm=config.get("clip_grad_norm"),
    )


def compile_model(model: nn.Module) -> nn.Module:
    """Return ``torch.compile(model)`` for the training passes; it shares the model's parameters.

    The run keeps the eager ``model`` for evaluation, curvature and ``state_dict``, whose keys
    the compiled wrapper would prefix with ``_orig_mod.``.
    """
    return torch.compile(model, backend=COMPILE_BACKEND)


def make_closure(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: StepRecipe,
    *,
    loss_weight: float = 1.0,
) -> Callable[[], torch.Tensor]:
    """Return the closure of one step on the batch (x, y): zero the gradients, forward, backward.

    The closure accumulates the gradient of ``loss_weight`` times the batch's mean loss over
    ``recipe``'s micro-batches and returns that loss, unscaled and detached. With a scaler each
    backward pass runs on the scaled loss. Under torchrun ``loss_weight`` makes the gradient
    averaged over the processes equal the global batch's mean gradient (see
    :class:`crsam.distributed.ShardedBatchSampler`). An empty share (x, y) gives a zero loss
    whose graph still reaches every parameter, so that every process takes part in the
    gradient all-reduce. With ``recipe.parallel`` the result is a
    :class:`crsam.optim.FunctionalClosure`, which CR-SAM can also evaluate batched.
    """
    batch_size = y.shape[0]
    if recipe.parallel:
        return _functional_closure(model, x, y, recipe, loss_weight)
    if batch_size == 0:
        def empty_closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, reduction="sum")
            loss.backward()
            return loss.detach()

        return empty_closure
    micro_batches = [
        (x_part, y_part)
        for x_part, y_part in zip(torch.tensor_split(x, recipe.accumulation_steps), torch.tensor_split(y, recipe.accumulation_steps))
        if y_part.shape[0] > 0
    ]

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        total = None
        for x_part, y_part in micro_batches:
            with torch.autocast(recipe.device_type, dtype=recipe.amp_dtype, enabled=recipe.amp_dtype is not None):
                loss = F.cross_entropy(model(x_part), y_part, label_smoothing=recipe.label_smoothing)
            if len(micro_batches) > 1:
                # The micro-batch's share of the batch's mean loss.
                loss = loss * (y_part.shape[0] / batch_size)
            if loss_weight != 1.0:
                loss = loss * loss_weight
            backward_loss = loss if recipe.scaler is None else recipe.scaler.scale(loss)
            backward_loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    return closure


def _functional_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: StepRecipe, loss_weight: float):
    """Return the :class:`crsam.optim.FunctionalClosure` of ``--parallel`` for the batch (x, y)."""
    from crsam.optim import FunctionalClosure

    label_smoothing = recipe.label_smoothing

    def loss_fn(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.shape[0] == 0:
            # An empty share: a zero loss whose graph still reaches every parameter.
            return F.cross_entropy(output, targets, reduction="sum")
        return F.cross_entropy(output, targets, label_smoothing=label_smoothing) * loss_weight

    return FunctionalClosure(model, loss_fn, x, y)


def take_step(optimizer: torch.optim.Optimizer, closure: Callable[[], torch.Tensor], recipe: StepRecipe) -> torch.Tensor:
    """Take one optimizer step with ``closure`` and return the loss at the current weights."""
    # Imported here so that a run with plain SGD does not need the sharpness-aware module.
    from crsam.optim import CRSAM, SAM

    if isinstance(optimizer, (SAM, CRSAM)):
        # The sharpness-aware optimizers clip, unscale, skip on overflow and update the scale
        # themselves.
        if recipe.parallel:
            return optimizer.step(closure, parallel=True)
        return optimizer.step(closure, scaler=recipe.scaler)

    if recipe.scaler is None and recipe.max_grad_norm is None:
        return optimizer.step(closure)

    # GradScaler.step rejects closures, and clipping needs the gradient before the step, so the
    # closure runs first.
    loss = closure()
    if recipe.scaler is not None:
        recipe.scaler.unscale_(optimizer)
    if recipe.max_grad_norm is not None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, recipe.max_grad_norm)
    if recipe.scaler is None:
        optimizer.step()
        return loss
    # The step is skipped when the unscaled gradients contain an infinity or NaN, and update()
    # then lowers the scale.
    recipe.scaler.step(optimizer)
    recipe.scaler.update()
    return loss
