"""Data sets for training and certification: MNIST-1D generated locally, with provenance hashes.

MNIST-1D (Greydanus, 2020) is produced by the ``mnist1d`` package from ten fixed templates and a
seeded random transformation, so the same arguments give the same arrays on every machine and no
download is needed. With the package's standard arguments (5000 samples, seed 42) the split is
4000 training and 1000 test examples of length 40.

Every loaded data set carries a SHA-256 hash of its arrays. A checkpoint stores it, and commands
that rebuild the data from a checkpoint's configuration compare the hashes before they report
numbers about that checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from crsam.errors import UsageError

# Names accepted by ``--data``. ``load_data`` generates MNIST-1D, and crsam.cifar and
# crsam.imagefolder read the others.
DATA_CHOICES = ("mnist1d", "cifar10", "cifar100", "imagefolder")
AVAILABLE_DATA = ("mnist1d",)

# The mnist1d package's standard arguments: 5000 samples, 80 % of them for training, seed 42.
MNIST1D_NUM_SAMPLES = 5000
MNIST1D_SEED = 42
MNIST1D_NUM_CLASSES = 10
MNIST1D_LENGTH = 40

# The mnist1d package builds every example in a Python loop and keeps it as its own array, so
# generation takes about 0.2 ms and 1.4 kB of peak memory per example (100000 examples on a
# shared 2-core x86-64 machine). A million examples, 200 times the standard set, take minutes and
# about 1.5 GB. The limit turns a mistyped count, or one stored in a checkpoint from elsewhere,
# into an error instead of a run that exhausts the memory.
MNIST1D_MAX_NUM_SAMPLES = 1_000_000


@dataclass(frozen=True)
class PriorSplit:
    """Training-set indices held out to choose a data-dependent prior.

    The bound may then use only ``bound_indices``, the examples the prior never saw.
    ``indices_sha256`` identifies the held-out set, so a checkpoint can record it without storing
    the indices themselves.
    """

    fraction: float
    seed: int
    prior_indices: torch.Tensor
    bound_indices: torch.Tensor
    indices_sha256: str

    def describe(self) -> dict:
        """Return the split's sizes, seed and index hash as plain data for a checkpoint."""
        return {
            "fraction": self.fraction,
            "seed": self.seed,
            "n_prior": int(self.prior_indices.numel()),
            "n_bound": int(self.bound_indices.numel()),
            "indices_sha256": self.indices_sha256,
        }


@dataclass(frozen=True)
class Dataset:
    """A classification data set as tensors: inputs float32, labels int64 class indices."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    sha256: str
    generation: dict

    @property
    def input_length(self) -> int:
        """Length of one input sequence (40 for MNIST-1D)."""
        return int(self.x_train.shape[-1])

    def describe(self) -> dict:
        """Return the data set's name, sizes, hash and generation arguments as plain data."""
        return {
            "name": self.name,
            "n_train": int(self.y_train.numel()),
            "n_test": int(self.y_test.numel()),
            "num_classes": self.num_classes,
            "input_length": self.input_length,
            "sha256": self.sha256,
            "generation": dict(self.generation),
        }


def hash_tensors(*tensors: torch.Tensor) -> str:
    """Return the SHA-256 hex digest of the tensors' dtypes, shapes and bytes, in order.

    Dtype and shape are part of the digest so that the same bytes read as another shape or type
    give another hash.
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype.str}{tuple(array.shape)};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def check_data_dir(data_dir: str | os.PathLike | None) -> None:
    """Raise UsageError when ``--data-dir`` was given but is not an existing folder."""
    if data_dir is None:
        return
    if not os.path.exists(data_dir):
        raise UsageError(
            f"--data-dir {os.fspath(data_dir)!r} does not exist; "
            "pass an existing folder or leave the flag out"
        )
    if not os.path.isdir(data_dir):
        raise UsageError(
            f"--data-dir {os.fspath(data_dir)!r} is a file, not a folder; pass the folder that contains the data"
        )


def load_data(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    num_samples: int | None = None,
    seed: int = MNIST1D_SEED,
) -> Dataset:
    """Load the data set ``name`` (see ``DATA_CHOICES``) as tensors with its SHA-256 hash.

    ``num_samples`` applies to MNIST-1D only: the total number of examples to generate, split
    80/20 into training and test sets as in the standard data set. ``data_dir`` must exist when
    given; MNIST-1D is generated in memory and does not read it.
    """
    check_data_dir(data_dir)
    if name not in DATA_CHOICES:
        raise UsageError(f"--data {name!r} is unknown; choose one of {', '.join(DATA_CHOICES)}")
    if name not in AVAILABLE_DATA:
        raise UsageError(
            f"--data {name} is not available yet; use --data mnist1d, which is generated locally"
        )
    return load_mnist1d(num_samples=MNIST1D_NUM_SAMPLES if num_samples is None else num_samples, seed=seed)


def load_mnist1d(*, num_samples: int = MNIST1D_NUM_SAMPLES, seed: int = MNIST1D_SEED) -> Dataset:
    """Generate MNIST-1D with the mnist1d package's standard arguments and ``num_samples`` examples.

    The package draws from Python's and NumPy's global random generators after seeding them, so
    their states are saved before and restored after, and a caller's random streams are unchanged.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise UsageError(f"--num-samples {num_samples!r} is not an integer; pass a multiple of 10 such as 5000")
    if num_samples < MNIST1D_NUM_CLASSES or num_samples % MNIST1D_NUM_CLASSES != 0:
        # The generator makes num_samples // 10 examples of each class, so other counts are rounded down.
        raise UsageError(
            f"--num-samples {num_samples} is invalid; pass a positive multiple of {MNIST1D_NUM_CLASSES} "
            f"such as {MNIST1D_NUM_SAMPLES}"
        )
    if num_samples > MNIST1D_MAX_NUM_SAMPLES:
        raise UsageError(
            f"--num-samples {num_samples} is above the limit of {MNIST1D_MAX_NUM_SAMPLES:,}; "
            f"pass a multiple of {MNIST1D_NUM_CLASSES} such as {MNIST1D_NUM_SAMPLES}"
        )

    # Imported here so that importing crsam.data stays cheap for commands that never generate data.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed

    # Generate with the caller's global random states saved and restored around the call.
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        arrays = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    # Convert to the dtypes the models and losses expect.
    x_train = torch.from_numpy(np.ascontiguousarray(arrays["x"], dtype=np.float32))
    y_train = torch.from_numpy(np.ascontiguousarray(arrays["y"], dtype=np.int64))
    x_test = torch.from_numpy(np.ascontiguousarray(arrays["x_test"], dtype=np.float32))
    y_test = torch.from_numpy(np.ascontiguousarray(arrays["y_test"], dtype=np.int64))

    generation = {
        "generator": "mnist1d",
        "num_samples": num_samples,
        "seed": seed,
        "train_split": float(args.train_split),
    }
    return Dataset(
        name="mnist1d",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=MNIST1D_NUM_CLASSES,
        sha256=hash_tensors(x_train, y_train, x_test, y_test),
        generation=generation,
    )


def split_for_prior(n_train: int, fraction: float, *, seed: int) -> PriorSplit:
    """Hold out a seeded random ``fraction`` of ``n_train`` training indices for a prior.

    The permutation comes from its own ``torch.Generator`` seeded with ``seed``, so the split is
    reproducible from the seed alone and leaves the global random state untouched. Both parts must
    be non-empty.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise UsageError(
            f"--prior-split {fraction!r} is outside (0, 1); pass the fraction of the training set "
            "to hold out for the prior, such as 0.5"
        )
    n_prior = int(fraction * n_train)
    if n_prior < 1 or n_prior >= n_train:
        raise UsageError(
            f"--prior-split {fraction} leaves {n_prior} of {n_train} training examples for the prior; "
            "both parts need at least one example, so pass a fraction nearer 0.5"
        )

    # Draw one permutation and cut it; each part is sorted so that its hash ignores draw order.
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n_train, generator=generator)
    prior_indices = permutation[:n_prior].sort().values
    bound_indices = permutation[n_prior:].sort().values
    return PriorSplit(
        fraction=float(fraction),
        seed=seed,
        prior_indices=prior_indices,
        bound_indices=bound_indices,
        indices_sha256=hash_tensors(prior_indices),
    )
