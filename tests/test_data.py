"""MNIST-1D generation, provenance hashes, the prior split and data-option errors."""

import random

import numpy as np
import pytest
import torch

from crsam.data import hash_tensors, load_data, load_mnist1d, split_for_prior
from crsam.errors import UsageError

# 500 examples generate in about 0.15 s; the standard 5000 take about 1 s.
SMALL = 500


@pytest.fixture(scope="module")
def small():
    return load_mnist1d(num_samples=SMALL)


def test_standard_split_sizes():
    data = load_data("mnist1d")
    assert data.x_train.shape == (4000, 40)
    assert data.x_test.shape == (1000, 40)
    assert data.y_train.shape == (4000,)
    assert data.y_test.shape == (1000,)


def test_dtypes(small):
    assert small.x_train.dtype == torch.float32
    assert small.y_train.dtype == torch.int64
    assert small.x_test.dtype == torch.float32
    assert small.y_test.dtype == torch.int64


def test_num_samples_split_80_20(small):
    assert len(small.y_train) == 400
    assert len(small.y_test) == 100


def test_labels_cover_ten_classes(small):
    assert set(small.y_train.tolist()) == set(range(10))


def test_hash_is_deterministic(small):
    again = load_mnist1d(num_samples=SMALL)
    assert again.sha256 == small.sha256
    assert torch.equal(again.x_train, small.x_train)


def test_hash_changes_with_num_samples(small):
    other = load_mnist1d(num_samples=SMALL + 10)
    assert other.sha256 != small.sha256


def test_hash_covers_dtype_and_shape():
    values = torch.arange(6, dtype=torch.int64)
    assert hash_tensors(values) != hash_tensors(values.reshape(2, 3))
    assert hash_tensors(values) != hash_tensors(values.to(torch.float64))


def test_global_random_state_untouched():
    np.random.seed(123)
    random.seed(123)
    expected_numpy = np.random.random()
    expected_python = random.random()
    np.random.seed(123)
    random.seed(123)
    load_mnist1d(num_samples=SMALL)
    assert np.random.random() == expected_numpy
    assert random.random() == expected_python


def test_describe_records_provenance(small):
    record = small.describe()
    assert record["sha256"] == small.sha256
    assert record["generation"]["num_samples"] == SMALL
    assert record["generation"]["seed"] == 42
    assert record["n_train"] == 400


@pytest.mark.parametrize("num_samples", [0, 15, -10, 5])
def test_invalid_num_samples(num_samples):
    with pytest.raises(UsageError, match=rf"--num-samples {num_samples} is invalid; pass a positive multiple of 10"):
        load_mnist1d(num_samples=num_samples)


def test_cifar_not_available():
    with pytest.raises(UsageError, match=r"--data cifar10 is not available yet; use --data mnist1d"):
        load_data("cifar10")


def test_unknown_data_name():
    with pytest.raises(UsageError, match=r"--data 'imagenet' is unknown; choose one of mnist1d, cifar10, cifar100"):
        load_data("imagenet")


def test_missing_data_dir_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UsageError, match=rf"--data-dir '{missing}' does not exist"):
        load_data("mnist1d", data_dir=missing)


def test_data_dir_that_is_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(UsageError, match=r"is a file, not a folder"):
        load_data("mnist1d", data_dir=path)


def test_prior_split_partitions_indices():
    split = split_for_prior(400, 0.25, seed=3)
    both = torch.cat([split.prior_indices, split.bound_indices]).sort().values
    assert torch.equal(both, torch.arange(400))
    assert split.prior_indices.numel() == 100
    assert split.bound_indices.numel() == 300


def test_prior_split_is_seeded():
    first = split_for_prior(400, 0.5, seed=3)
    again = split_for_prior(400, 0.5, seed=3)
    other = split_for_prior(400, 0.5, seed=4)
    assert first.indices_sha256 == again.indices_sha256
    assert first.indices_sha256 != other.indices_sha256


def test_prior_split_leaves_global_rng():
    before = torch.get_rng_state()
    split_for_prior(400, 0.5, seed=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_prior_split_describe():
    record = split_for_prior(400, 0.5, seed=3).describe()
    assert record == {
        "fraction": 0.5,
        "seed": 3,
        "n_prior": 200,
        "n_bound": 200,
        "indices_sha256": record["indices_sha256"],
    }


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_prior_split_outside_unit_interval(fraction):
    with pytest.raises(UsageError, match=r"--prior-split .* is outside \(0, 1\)"):
        split_for_prior(400, fraction, seed=0)


def test_prior_split_empty_part():
    with pytest.raises(UsageError, match=r"leaves 0 of 10 training examples for the prior"):
        split_for_prior(10, 0.05, seed=0)
