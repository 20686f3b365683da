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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepRecipe:
    """Settings of each training step: autocast dtype and loss scaler."""

    device_type: str
    # The autocast dtype, or None for float32 throughout.
    amp_dtype: torch.dtype | None = None
    # Loss scaler of float16 training, or None.
    scaler: torch.amp.GradScaler | None = None


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
    )


def make_closure(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: StepRecipe,
) -> Callable[[], torch.Tensor]:
    """Return the closure of one step on the batch (x, y): zero the gradients, forward, backward.

    The closure returns the unscaled mean loss of the batch, detached. With a scaler the
    backward pass runs on the scaled loss.
    """

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(recipe.device_type, dtype=recipe.amp_dtype, enabled=recipe.amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        backward_loss = loss if recipe.scaler is None else recipe.scaler.scale(loss)
        backward_loss.backward()
        return loss.detach()

    return closure


def take_step(optimizer: torch.optim.Optimizer, closure: Callable[[], torch.Tensor], recipe: StepRecipe) -> torch.Tensor:
    """Take one optimizer step with ``closure`` and return the loss at the current weights."""
    if recipe.scaler is None:
        return optimizer.step(closure)

    # Imported here so that a run with plain SGD does not need the sharpness-aware module.
    from crsam.optim import CRSAM, SAM

    if isinstance(optimizer, (SAM, CRSAM)):
        # The sharpness-aware optimizers unscale, skip on overflow and update the scale themselves.
        return optimizer.step(closure, scaler=recipe.scaler)

    # GradScaler.step rejects closures, so the closure runs first. The step is skipped when the
    # unscaled gradients contain an infinity or NaN, and update() then lowers the scale.
    loss = closure()
    recipe.scaler.step(optimizer)
    recipe.scaler.update()
    return loss
