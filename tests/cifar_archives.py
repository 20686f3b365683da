"""Tiny CIFAR-10 folders in the official python-pickle layout, for tests that must not need the real data.

pytest does not collect this module. Tests import it, and so do the torchrun workers, which run
with tests/ as their script folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crsam import cifar


def write_tiny_cifar10(root: Path, *, num_train: int = 24, num_test: int = 8, seed: int = 0) -> Path:
    """Write ``num_train`` and ``num_test`` random uint8 images with random labels under ``root``.

    Returns ``root``, the folder to pass as ``--data-dir``. The split sizes differ from the official
    50000 and 10000, so ``crsam train`` needs ``crsam.train.CIFAR_SPLIT_SIZES`` set to None.
    """
    rng = np.random.default_rng(seed)
    cifar.write_cifar_folder(
        root, "cifar10",
        x_train=rng.integers(0, 256, (num_train, 3, 32, 32), dtype=np.uint8), y_train=rng.integers(0, 10, num_train),
        x_test=rng.integers(0, 256, (num_test, 3, 32, 32), dtype=np.uint8), y_test=rng.integers(0, 10, num_test),
    )
    return root
