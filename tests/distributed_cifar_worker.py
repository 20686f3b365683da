"""Run ``crsam train`` jobs on a tiny CIFAR-10 folder in one torchrun worker.

Usage: ``torchrun --standalone --nproc_per_node 2 tests/distributed_cifar_worker.py OUT JOB...``,
as for tests/distributed_train_worker.py, whose recording this reuses. The tiny folders do not
have the official 50000/10000 split, so the worker lifts the split-size check of
``crsam.train`` before it runs the jobs. It also evaluates in batches of
``EVAL_BATCH_SIZE = 4`` images, so that both ranks evaluate some of the 24 training and 8 test
images. pytest does not collect this file; tests/test_distributed_cifar.py starts it.
"""

from __future__ import annotations

import crsam.train
from distributed_train_worker import main

EVAL_BATCH_SIZE = 4

if __name__ == "__main__":
    crsam.train.CIFAR_SPLIT_SIZES = None
    crsam.train.EVAL_BATCH_SIZE = EVAL_BATCH_SIZE
    main()
