"""Curvature tracking during training (``crsam train --track-curvature EPOCHS``).

On tracked epochs the run measures the curvature of the mean cross-entropy (no weight decay,
model in eval mode) on two fixed subsets, one of the training set and one of the test set, with
:func:`crsam.curvature.curvature_report`, the function behind ``crsam curvature``. The figures
go into that epoch's ``metrics.jsonl`` record under ``curvature_train_*`` and ``curvature_test_*``.

Everything random here is derived from the run's seed, so that the figures of an epoch can be
recomputed from its checkpoint:

- the subsets are drawn once per run by :func:`curvature_subset_indices` from the run seed;
- the probes and the Lanczos start vector of epoch e come from :func:`curvature_seed` (run seed, e),
  through generators of their own.

The measurement runs with torch's global random state forked, so a tracked run trains exactly as
the same run without tracking, and a resumed run stays bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from crsam.curvature import curvature_report

# Trace estimator and its fixed budget of Hessian-vector products: Hutch++ with a 20-column
# sketch and 20 residual probes (60 products, see crsam.curvature.trace.hutchpp_trace). A fixed
# budget makes the cost of a tracked epoch predictable, unlike the adaptive stopping rule.
# NOTE: the sketch is a dense float64 matrix of 20 x (number of parameters), about 1.8 GB for
# ResNet-18's 11 million parameters, held on the model's device during the measurement.
CURVATURE_METHOD = "hutch++"
CURVATURE_PROBES = 60

# Examples per forward pass of a Hessian-vector product. The double backward pass keeps the
# graph of one batch, so this bounds the memory of a measurement.
CURVATURE_BATCH_SIZE = 250

# Default size of each subset. A split with fewer examples is used whole.
DEFAULT_CURVATURE_SAMPLES = 1000

# Offsets that give each split's subset, and the per-epoch probes, seeds of their own.
_SUBSET_SEED_OFFSETS = {"train": 1, "test": 2}
_EPOCH_SEED_MULTIPLIER = 1_000_003

# The report's fields that go into a metrics record, under curvature_{split}_{key}.
_RECORD_FIELDS = ("trace", "trace_stderr", "trace_probes", "top_eigenvalue", "grad_norm", "normalized_trace",
                  "loss", "examples")


def is_tracked_epoch(epoch: int, *, every: int | None, epochs: int) -> bool:
    """Return whether ``epoch`` (counted from 1) measures curvature: every ``every``-th and the last."""
    if every is None:
        return False
    return epoch % every == 0 or epoch == epochs


def curvature_subset_indices(n: int, size: int, *, seed: int, split: str) -> torch.Tensor:
    """Return the sorted indices of the fixed curvature subset of a split with ``n`` examples.

    The subset is ``size`` indices drawn without replacement by a ``torch.Generator`` seeded from
    the run seed and the split's name, or all ``n`` when ``size >= n``. The global random state is
    not touched.
    """
    if split not in _SUBSET_SEED_OFFSETS:
        raise ValueError(f"split={split!r} is invalid; use 'train' or 'test'")
    if size < 1:
        raise ValueError(f"size={size!r} is invalid; pass a positive number of examples")
    if size >= n:
        return torch.arange(n)
    # torch.Generator takes seeds below 2**64, and run seeds are below 2**63.
    generator = torch.Generator().manual_seed((2 * seed + _SUBSET_SEED_OFFSETS[split]) % 2**64)
    return torch.randperm(n, generator=generator)[:size].sort().values


def curvature_seed(seed: int, epoch: int) -> int:
    """Return the seed of epoch ``epoch``'s probes and Lanczos start vector for a run seeded ``seed``."""
    # Below 2**63, the range of the int64 seeds that the curvature code accepts.
    return (seed * _EPOCH_SEED_MULTIPLIER + epoch) % 2**63


def measure_curvature(
    model: nn.Module,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    seed: int,
    epoch: int,
) -> dict[str, Any]:
    """Measure the curvature on each split's fixed subset; return the metrics record's entries.

    ``splits`` maps "train" and "test" to the subsets' (inputs, targets). The keys are
    ``curvature_{split}_trace`` with ``_trace_stderr`` and ``_trace_probes``,
    ``_top_eigenvalue`` (Lanczos), ``_grad_norm``, ``_normalized_trace`` (None when the
    gradient is 0), ``_loss`` and ``_examples``, plus ``curvature_seconds``, the wall time of
    the measurement.
    """
    started = time.perf_counter()
    record: dict[str, Any] = {}
    device = next(model.parameters()).device
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=fork_devices, device_type="cuda"):
        for split, (inputs, targets) in splits.items():
            report = curvature_report(
                model,
                inputs,
                targets,
                method=CURVATURE_METHOD,
                probes=CURVATURE_PROBES,
                batch_size=CURVATURE_BATCH_SIZE,
                seed=curvature_seed(seed, epoch),
                mode="eval",
                split=split,
            )
            record.update(curvature_record(report, split))
    record["curvature_seconds"] = time.perf_counter() - started
    return record


def curvature_record(report: dict[str, Any], split: str) -> dict[str, Any]:
    """Return the metrics entries of one :func:`curvature_report`, keyed ``curvature_{split}_*``."""
    values = {
        "trace": report["trace"]["estimate"],
        "trace_stderr": report["trace"]["stderr"],
        "trace_probes": report["trace"]["probes"],
        "top_eigenvalue": report["top_eigenvalue"],
        "grad_norm": report["grad_norm"],
        "normalized_trace": report["normalized_trace"],
        "loss": report["loss_value"],
        "examples": report["n_examples"],
    }
    return {f"curvature_{split}_{name}": values[name] for name in _RECORD_FIELDS}
