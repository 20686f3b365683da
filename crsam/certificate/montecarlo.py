"""Monte-Carlo 0-1 error of a network under Gaussian weight noise.

A weight sample is ``w_j = w + sigma * e_j`` with ``e_j ~ N(0, I)`` over all parameters. Its error
count on a data set is ``sum_i 1[argmax f(x_i; w_j) != y_i]``, and ``L_S(w_j) = count_j / n``.
The samples are i.i.d. given ``w`` and ``sigma``, so the mean of ``L_S(w_j)`` over ``m`` samples is
an unbiased estimate of the posterior's error ``L_S(Q)`` with ``Q = N(w, sigma^2 I)``.

Every evaluation goes through ``torch.func.functional_call``, so the model's own parameters are
never written. Two schedules compute the same counts, except where rounding differences between
their matrix kernels flip the argmax of nearly tied logits:

- ``"loop"``: one weight sample at a time, each over large data batches.
- ``"vmap"``: ``sample_batch_size`` weight samples at once through ``torch.func.vmap``, which
  turns each linear layer into one batched matrix product.

One run of ``benchmarks/bench_certificate.py`` (torch 2.13, 2 CPU cores shared with other jobs,
load average about 2, 4000 MNIST-1D examples, batches of 1000) measured these times per weight
sample: for the MLP, 1.5 ms with ``vmap`` and 2.1 ms with ``loop``; for the 1-D CNN, 15.5 ms with
``vmap`` and 7.8 ms with ``loop``. The CNN is slower under ``vmap`` because torch's batching rule
for a convolution with batched input and batched weights runs one grouped convolution with a
group per sample (``aten/src/ATen/functorch/BatchRulesConvolution.cpp``).
``"auto"`` therefore picks ``loop`` for models with convolutions and ``vmap`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from crsam.distributed import all_reduce_sum

METHODS = ("auto", "vmap", "loop")

# Largest number of 0-1 draws (weight samples times examples) in one estimate. The per-example
# scheme passes this count to the Monte-Carlo bound, which computes in float64, and every integer
# up to 2**53 is exact there.
MAX_DRAWS = 2**53

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)


@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes of a model's parameters, in the order of ``named_parameters()``.

    A flat weight vector is the concatenation of the flattened parameters in this order.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_model(cls, model: nn.Module) -> ParameterLayout:
        """Read the layout of ``model``'s parameters (tied parameters appear once)."""
        named = list(model.named_parameters())
        return cls(tuple(name for name, _ in named), tuple(p.shape for _, p in named))

    @property
    def numels(self) -> tuple[int, ...]:
        """Number of scalars in each parameter."""
        return tuple(shape.numel() for shape in self.shapes)

    @property
    def num_parameters(self) -> int:
        """Length of the flat weight vector."""
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``tensors[name]`` for every parameter name into one 1-D tensor."""
        return torch.cat([tensors[name].detach().reshape(-1) for name in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector ``(k,)`` or a stack ``(S, k)`` into parameter-shaped views."""
        leading = flat.shape[:-1]
        pieces = torch.split(flat, self.numels, dim=-1)
        return {
            name: piece.reshape(*leading, *shape)
            for name, shape, piece in zip(self.names, self.shapes, pieces)
        }


class WeightSampler:
    """Seeded stream of weight samples ``w + sigma * e_j``, ``e_j ~ N(0, I)``.

    Each ``e_j`` is drawn by its own ``torch.randn`` call, so the j-th sample is the same whatever
    the sizes of the chunks that ``draw`` is asked for. Two samplers with the same seed and centre
    produce the same ``e_j`` (common random numbers), whatever their ``sigma``.

    >>> center = torch.zeros(3)
    >>> whole = WeightSampler(center, 0.1, seed=0).draw(4)
    >>> sampler = WeightSampler(center, 0.1, seed=0)
    >>> torch.equal(whole, torch.cat([sampler.draw(1), sampler.draw(3)]))
    True
    """

    def __init__(self, center: torch.Tensor, sigma: float, seed: int):
        self.center = center
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.generator = torch.Generator(device=center.device).manual_seed(self.seed)
        self.drawn = 0

    def draw(self, count: int) -> torch.Tensor:
        """Return the next ``count`` weight samples as a ``(count, k)`` tensor."""
        noise = torch.empty((count, self.center.numel()), dtype=self.center.dtype,
                            device=self.center.device)
        for row in noise:
            torch.randn(row.shape, generator=self.generator, dtype=row.dtype, device=row.device,
                        out=row)
        self.drawn += count
        return noise.mul_(self.sigma).add_(self.center)


def resolve_method(model: nn.Module, method: str) -> str:
    """Map ``"auto"`` to ``"loop"`` for models with convolutions and to ``"vmap"`` otherwise."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "auto":
        return method
    has_convolution = any(isinstance(module, _CONVOLUTIONS) for module in model.modules())
    return "loop" if has_convolution else "vmap"


def count_errors(
    model: nn.Module,
    layout: ParameterLayout,
    weights: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    method: str,
    probability_sum: torch.Tensor | None = None,
    distributed: bool = False,
) -> torch.Tensor:
    """Count the 0-1 errors of each weight vector in ``weights`` ``(S, k)`` on ``(x, y)``.

    Returns an int64 tensor ``(S,)``. The counts are summed over data batches of ``batch_size``
    examples (the last one may be shorter), so they do not depend on the batch size. The model
    must be in the mode it should be evaluated in. When ``probability_sum`` ``(n, C)`` is given,
    the softmax outputs of all ``S`` networks are added to it in float64, for the ensemble error.
    With ``distributed=True``, ``(x, y)`` is this process's shard and the counts are summed over
    all processes, which must pass the same ``weights``.
    """
    device = weights.device
    counts = torch.zeros(weights.shape[0], dtype=torch.int64, device=device)
    if method == "vmap":
        logits_of = vmap(lambda params, inputs: functional_call(model, params, (inputs,)),
                         in_dims=(0, None))
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            inputs = x[start:start + batch_size].to(device)
            labels = y[start:start + batch_size].to(device)

            # Logits of every weight sample on this batch: (S, B, C).
            if method == "vmap":
                logits = logits_of(layout.unflatten(weights), inputs)
            elif method == "loop":
                logits = torch.stack([
                    functional_call(model, layout.unflatten(row), (inputs,)) for row in weights
                ])
            else:
                raise ValueError(f"method must be 'vmap' or 'loop' here, got {method!r}")

            counts += (logits.argmax(dim=-1) != labels).sum(dim=-1)
            if probability_sum is not None:
                stop = start + inputs.shape[0]
                probability_sum[start:stop] += torch.softmax(logits.double(), dim=-1).sum(dim=0)
    if distributed:
        all_reduce_sum(counts)
    return counts


@dataclass
class MonteCarloErrors:
    """Running totals of the per-sample error counts of one weight-sample stream on one data set.

    ``count_j`` is the number of misclassified examples among ``n`` for weight sample ``j``.
    ``error_total`` is the sum of ``count_j`` and ``error_square_total`` the sum of
    ``count_j ** 2``, both Python integers, so they are exact for any number of samples and the
    memory does not grow with it. ``ensemble_errors`` is the number of errors of the mean softmax
    output over all samples.
    """

    n: int
    samples: int = 0
    error_total: int = 0
    error_square_total: int = 0
    ensemble_errors: int | None = None

    def add(self, counts: np.ndarray | torch.Tensor) -> None:
        """Add the error counts of a chunk of weight samples to the totals."""
        values = [int(count) for count in counts.tolist()]
        self.samples += len(values)
        self.error_total += sum(values)
        self.error_square_total += sum(value * value for value in values)

    @property
    def mean(self) -> float:
        """Mean 0-1 error over samples and examples, ``sum_j count_j / (m n)``.

        Python divides the two exact integers with one rounding, so this is the correctly rounded
        float64 of the exact mean.
        """
        return self.error_total / (self.samples * self.n)

    @property
    def stderr(self) -> float | None:
        """Standard error of ``mean``: sample standard deviation of ``count_j / n`` over sqrt(m).

        The sample variance ``(m S2 - S1^2) / (m (m - 1) n^2)`` is formed from exact integers and
        rounded once. None for a single sample, whose spread is unknown.
        """
        m = self.samples
        if m < 2:
            return None
        variance = (m * self.error_square_total - self.error_total**2) / (m * (m - 1) * self.n**2)
        return math.sqrt(variance / m)


def check_sample_count(name: str, samples: int, n: int) -> None:
    """Raise ValueError when ``samples`` draws over ``n`` examples exceed ``MAX_DRAWS``."""
    if samples * n > MAX_DRAWS:
        raise ValueError(
            f"{name} {samples} is too large for {n} examples: {samples} x {n} draws exceed "
            f"2**53 = {MAX_DRAWS}, the largest count that float64 holds exactly. Pass {name} "
            f"<= {MAX_DRAWS // n}."
        )


def estimate_errors(
    model: nn.Module,
    layout: ParameterLayout,
    center: torch.Tensor,
    sigma: float,
    seed: int,
    num_samples: int,
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int,
    sample_batch_size: int,
    method: str,
    ensemble_classes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    distributed: bool = False,
) -> dict[str, MonteCarloErrors]:
    """Evaluate ``num_samples`` weight samples ``center + sigma * e_j`` on each data set.

    The same weight samples are evaluated on every data set. ``method`` is ``"vmap"`` or
    ``"loop"``. With
    ``ensemble_classes`` set to the number of classes, the ensemble error (argmax of the mean
    softmax output over samples) is counted too. ``progress(done, total)`` is called after each
    chunk of ``sample_batch_size`` samples. With ``distributed=True`` each data set is this
    process's shard; every process draws the same weight samples from ``seed``, and the error
    counts and ``n`` are summed over the processes.
    """
    sampler = WeightSampler(center, sigma, seed)
    totals = {name: MonteCarloErrors(int(x.shape[0])) for name, (x, _) in datasets.items()}
    probability_sums = {}
    if ensemble_classes is not None:
        probability_sums = {
            name: torch.zeros((x.shape[0], ensemble_classes), dtype=torch.float64,
                              device=center.device)
            for name, (x, _) in datasets.items()
        }

    # Draw each chunk of weight samples once, evaluate it on every data set and keep only the
    # running totals, so memory is bounded by one chunk whatever num_samples is.
    done = 0
    while done < num_samples:
        weights = sampler.draw(min(sample_batch_size, num_samples - done))
        for name, (x, y) in datasets.items():
            chunk_counts = count_errors(model, layout, weights, x, y, batch_size=batch_size,
                                        method=method, probability_sum=probability_sums.get(name),
                                        distributed=distributed)
            totals[name].add(chunk_counts.cpu())
        done += weights.shape[0]
        del weights
        if progress is not None:
            progress(done, num_samples)

    for name, (_, y) in datasets.items():
        if name in probability_sums:
            predictions = probability_sums[name].argmax(dim=-1).cpu()
            totals[name].ensemble_errors = int((predictions != y.cpu()).sum())
        if distributed:
            # Every process computes the ensemble flag, so every process joins this all-reduce.
            local = torch.tensor([totals[name].n, totals[name].ensemble_errors or 0], dtype=torch.int64,
                                 device=center.device)
            n, reduced_errors = all_reduce_sum(local).tolist()
            totals[name].n = int(n)
            if totals[name].ensemble_errors is not None:
                totals[name].ensemble_errors = int(reduced_errors)
    return totals
