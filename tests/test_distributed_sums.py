"""Loss, gradient, Hessian-vector products and Monte-Carlo error counts over data shards.

Two gloo processes each hold a contiguous shard of the same data set, 5 and 4 examples of 9, or
all 9 and none. Every sharded value must equal the one-process value over all 9 examples. The
model runs in float64, so the only difference is the order in which per-example terms are added.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from crsam.certificate.montecarlo import ParameterLayout, WeightSampler, count_errors, estimate_errors
from crsam.curvature.functional import EmpiricalLoss
from crsam.distributed import shard_bounds

NUM_EXAMPLES = 9
NUM_CLASSES = 3
MC_SAMPLES = 6
MC_SIGMA = 0.5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_CLASSES)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_EXAMPLES, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (NUM_EXAMPLES,), generator=generator)
    probes = torch.randn(2, 43, generator=generator, dtype=torch.float64)
    return x, y, probes


def compute_sums(model, x, y, probes, *, distributed: bool) -> dict[str, torch.Tensor]:
    """Return every sum this test checks, over the examples ``x, y`` (a shard when distributed)."""
    loss = EmpiricalLoss(model, x, y, batch_size=2, distributed=distributed)
    value, gradient = loss.value_and_gradient()
    layout = ParameterLayout.from_model(model)
    center = layout.flatten(dict(model.named_parameters()))
    weights = WeightSampler(center, MC_SIGMA, seed=4).draw(MC_SAMPLES)
    counts = count_errors(model, layout, weights, x, y, batch_size=2, method="loop", distributed=distributed)
    estimate = estimate_errors(
        model, layout, center, MC_SIGMA, 4, MC_SAMPLES, {"train": (x, y)},
        batch_size=2, sample_batch_size=4, method="vmap", ensemble_classes=NUM_CLASSES, distributed=distributed,
    )["train"]
    return {
        "value": torch.tensor(value, dtype=torch.float64),
        "value_alone": torch.tensor(loss.value(), dtype=torch.float64),
        "gradient": gradient,
        "hvp": loss.hvp(probes[0]),
        "matmat": loss.matmat(probes),
        "counts": counts,
        "estimate_totals": torch.tensor([estimate.samples, estimate.error_total, estimate.error_square_total]),
        "estimate_n": torch.tensor(estimate.n),
        "ensemble_errors": torch.tensor(estimate.ensemble_errors),
    }


def worker(rank: int, world_size: int, out_dir: str) -> None:
    init_method = "file://" + os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        model = make_model()
        x, y, probes = make_data()
        results = {}

        # Uneven shards: 5 and 4 examples.
        start, stop = shard_bounds(NUM_EXAMPLES, rank, world_size)
        results["uneven"] = compute_sums(model, x[start:stop], y[start:stop], probes, distributed=True)

        # Every example on rank 0, none on rank 1.
        keep = slice(0, NUM_EXAMPLES) if rank == 0 else slice(0, 0)
        results["empty"] = compute_sums(model, x[keep], y[keep], probes, distributed=True)

        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    # NOTE: as in test_distributed.py, a gloo worker that crashes during start-up on a loaded
    # machine is retried once in a fresh folder. A wrong value is never retried.
    for attempt in range(2):
        folder = tmp_path_factory.mktemp(f"shards{attempt}")
        try:
            mp.spawn(worker, args=(2, str(folder)), nprocs=2, join=True)
        except mp.ProcessExitedException:
            if attempt == 1:
                raise
            continue
        return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def one_process():
    model = make_model()
    x, y, probes = make_data()
    return compute_sums(model, x, y, probes, distributed=False)


@pytest.mark.parametrize("layout", ["uneven", "empty"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("key", ["value", "value_alone", "gradient", "hvp", "matmat"])
def test_sharded_loss_matches_one_process(sharded_results, one_process, layout, rank, key):
    # float64: both sides add the same 9 per-example terms, of size below about 10, in a
    # different order (two partial sums added by the all-reduce, against one running sum).
    # Each order is within 9 * 2**-53 * 10 < 1e-14 of the exact sum, so 1e-13 covers both.
    # A shard left out of the sum moves the loss by about 4% here, far above the tolerance.
    torch.testing.assert_close(sharded_results[rank][layout][key], one_process[key], rtol=0.0, atol=1e-13)


@pytest.mark.parametrize("layout", ["uneven", "empty"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("key", ["counts", "estimate_totals", "estimate_n", "ensemble_errors"])
def test_sharded_error_counts_exact(sharded_results, one_process, layout, rank, key):
    # Integer counts: a float64 argmax flips only on an exact tie of two logits, which these
    # random weights do not produce, so the counts must agree exactly.
    assert torch.equal(sharded_results[rank][layout][key], one_process[key])


def test_error_counts_not_trivial(one_process):
    # Counts of 0 or n on every sample would agree even if the shards were ignored.
    counts = one_process["counts"]
    assert int(counts.max()) > 0
    assert int(counts.min()) < NUM_EXAMPLES
    assert int(one_process["estimate_n"]) == NUM_EXAMPLES
