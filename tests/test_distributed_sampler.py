"""Batch shards, loss weights and the torchrun environment of crsam.distributed, in one process."""

from __future__ import annotations

import socket
from fractions import Fraction

import pytest
import torch

from crsam import distributed
from crsam.distributed import ShardedBatchSampler, read_torchrun_env, shard_bounds

TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def one_process_batches(num_examples, batch_size, seed, epochs):
    """Return the batches that the one-process training loop drew before the sampler existed."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(num_examples, generator=generator)
        batches += [order[start : start + batch_size] for start in range(0, num_examples, batch_size)]
    return batches


def sharded_batches(num_examples, batch_size, seed, epochs, world_size):
    """Return, per rank, the ShardedBatch list of ``epochs`` epochs, each rank with its own generator."""
    per_rank = []
    for rank in range(world_size):
        generator = torch.Generator().manual_seed(seed)
        sampler = ShardedBatchSampler(num_examples, batch_size, generator=generator, rank=rank, world_size=world_size)
        per_rank.append([batch for _ in range(epochs) for batch in sampler])
    return per_rank


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("size", [0, 1, 2, 4, 7, 13])
def test_shard_bounds_partition(size, world_size):
    bounds = [shard_bounds(size, rank, world_size) for rank in range(world_size)]
    shares = [stop - start for start, stop in bounds]

    assert bounds[0][0] == 0
    assert bounds[-1][1] == size
    for (_, stop), (start, _) in zip(bounds, bounds[1:]):
        assert stop == start
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 0, 2), r"size=-1 is negative"),
        ((4, 0, 0), r"world_size=0 must be at least 1"),
        ((4, 2, 2), r"rank=2 is outside \[0, world_size=2\)"),
        ((4, -1, 2), r"rank=-1 is outside"),
    ],
)
def test_shard_bounds_invalid(args, message):
    with pytest.raises(ValueError, match=message):
        shard_bounds(*args)


@pytest.mark.parametrize(
    ("num_examples", "batch_size", "world_size"),
    [(160, 32, 2), (136, 45, 2), (50, 7, 3), (10, 3, 4), (9, 1, 2), (12, 12, 5)],
)
def test_shards_rebuild_one_process_batches(num_examples, batch_size, world_size):
    expected = one_process_batches(num_examples, batch_size, seed=3, epochs=2)
    per_rank = sharded_batches(num_examples, batch_size, seed=3, epochs=2, world_size=world_size)

    assert all(len(batches) == len(expected) for batches in per_rank)
    for step, batch in enumerate(expected):
        shares = [batches[step] for batches in per_rank]
        assert torch.equal(torch.cat([share.indices for share in shares]), batch), step
        assert all(share.global_size == len(batch) for share in shares), step
        for share in shares:
            assert torch.equal(share.global_indices, batch), step
            assert torch.equal(share.global_indices[share.share], share.indices), step


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_examples": 0}, r"num_examples=0 must be at least 1; pass the size of the training set"),
        ({"batch_size": 0}, r"batch_size=0 must be at least 1; pass the examples per global batch"),
        ({"rank": 3}, r"rank=3 is outside \[0, world_size=2\); pass a rank from 0 to world_size - 1"),
        ({"world_size": 0, "rank": 0}, r"world_size=0 must be at least 1; pass the number of processes"),
    ],
)
def test_sampler_invalid(kwargs, message):
    arguments = {"num_examples": 10, "batch_size": 4, "rank": 0, "world_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        ShardedBatchSampler(generator=torch.Generator(), **arguments)


def test_sampler_length_counts_short_batch():
    sampler = ShardedBatchSampler(136, 45, generator=torch.Generator(), rank=0, world_size=2)

    assert len(sampler) == 4
    assert len(list(sampler)) == 4


@pytest.mark.parametrize(
    ("num_examples", "batch_size", "world_size"), [(136, 45, 2), (50, 7, 3), (10, 3, 4), (12, 12, 5)]
)
def test_loss_weights_exact(num_examples, batch_size, world_size):
    per_rank = sharded_batches(num_examples, batch_size, seed=0, epochs=1, world_size=world_size)
    for step in range(len(per_rank[0])):
        shares = [batches[step] for batches in per_rank]
        global_size = shares[0].global_size
        for share in shares:
            # The weight is n_r W / B, rounded once to the nearest float64.
            exact = Fraction(len(share.indices) * world_size, global_size)
            assert abs(Fraction(share.loss_weight) - exact) <= exact * Fraction(2) ** -53, step
        # With w_r = n_r W / B, (1/W) sum_r w_r (S_r / n_r) = (sum_r S_r) / B needs sum_r n_r = B.
        assert sum(len(share.indices) for share in shares) == global_size


def test_empty_share_weight_zero():
    # 136 examples in batches of 45 leave a last batch of one example: rank 1 gets none.
    per_rank = sharded_batches(136, 45, seed=0, epochs=1, world_size=2)
    last = [batches[-1] for batches in per_rank]

    assert [len(share.indices) for share in last] == [1, 0]
    assert last[1].loss_weight == 0.0
    assert last[0].loss_weight == 2.0


def test_even_shares_weight_one():
    per_rank = sharded_batches(160, 32, seed=0, epochs=1, world_size=2)

    assert {share.loss_weight for batches in per_rank for share in batches} == {1.0}


@pytest.mark.parametrize(("num_examples", "batch_size", "world_size"), [(23, 10, 3), (7, 5, 2), (9, 4, 4)])
def test_weighted_means_average_to_global_mean(num_examples, batch_size, world_size):
    # Per-example gradients of a fixed float64 table stand in for a model's. Each rank's
    # weighted mean, averaged over the ranks as DDP does, must give the global batch's mean.
    gradients = torch.randn(num_examples, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    per_rank = sharded_batches(num_examples, batch_size, seed=2, epochs=1, world_size=world_size)
    for step in range(len(per_rank[0])):
        shares = [batches[step] for batches in per_rank]
        batch = torch.cat([share.indices for share in shares])
        averaged = sum(
            gradients[share.indices].mean(dim=0) * share.loss_weight
            for share in shares
            if len(share.indices)
        ) / world_size
        expected = gradients[batch].mean(dim=0)
        # Each side is a mean of at most 10 values of size < 5 followed by at most three
        # rounded operations, so both are within about 16 ulps of the exact mean: 16 * 2**-53
        # * 5 < 1e-14. A wrong weight changes the result by a fraction of its size, 1e-2 or more.
        torch.testing.assert_close(averaged, expected, rtol=0.0, atol=1e-14)


def test_read_env_absent_without_world_size():
    assert read_torchrun_env({"RANK": "0"}) is None


def test_read_env_parses_torchrun_variables():
    env = read_torchrun_env(TORCHRUN_ENV)

    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 1)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 29500)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"MASTER_ADDR": ""}, r"WORLD_SIZE is set but MASTER_ADDR is missing; start the processes with torchrun"),
        ({"RANK": None, "LOCAL_RANK": None}, r"RANK, LOCAL_RANK are missing"),
        ({"RANK": "two"}, r"RANK='two' is not a whole number"),
        ({"RANK": "2"}, r"RANK=2 is outside \[0, WORLD_SIZE=2\)"),
        ({"WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be at least 1"),
        ({"LOCAL_RANK": "-1"}, r"LOCAL_RANK=-1 is negative"),
        ({"MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a TCP port"),
    ],
)
def test_read_env_invalid(changes, message):
    environ = {key: value for key, value in {**TORCHRUN_ENV, **changes}.items() if value is not None}
    with pytest.raises(ValueError, match=message):
        read_torchrun_env(environ)


def test_helpers_single_process():
    tensor = torch.tensor([1.5, 2.0])

    assert distributed.world_size() == 1
    assert distributed.rank() == 0
    assert distributed.is_main_process()
    assert not distributed.is_distributed()
    assert distributed.all_reduce_sum(tensor) is tensor
    assert tensor.tolist() == [1.5, 2.0]
    assert list(distributed.eval_batch_starts(2500, 1000)) == [0, 1000, 2000]


def test_process_group_skipped_without_torchrun(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with distributed.process_group_from_env() as device:
        assert device == torch.device("cpu")
        assert distributed.training_device() == torch.device("cpu")
        assert not distributed.is_distributed()


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_process_group_destroyed_on_error(monkeypatch):
    # A one-rank gloo group on this machine's loopback interface, as torchrun would describe it.
    environ = {**TORCHRUN_ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": str(free_local_port())}
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(KeyError, match="raised inside"):
        with distributed.process_group_from_env() as device:
            assert device == torch.device("cpu")
            assert torch.distributed.get_backend() == "gloo"
            raise KeyError("raised inside")
    assert not torch.distributed.is_initialized()
    assert distributed.training_device() == torch.device("cpu")


def test_wrap_model_single_process_is_identity():
    model = torch.nn.Linear(2, 2)

    assert distributed.wrap_model(model) is model
    assert distributed.unwrap_model(model) is model
