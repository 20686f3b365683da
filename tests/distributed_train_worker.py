"""Run ``crsam train`` jobs in one torchrun worker and record what each rank synchronized.

Usage: ``torchrun --standalone --nproc_per_node 2 tests/distributed_train_worker.py OUT JOB...``
with each JOB a ``crsam train`` argument list joined by spaces. For job ``k`` every rank writes
``OUT/job{k}-rank{r}.pt``: the exit status, the final flat weights of its replica, the number of
backward passes whose gradients DDP all-reduced, and the number of flat-gradient all-reduces that
the optimizer issued itself. pytest does not collect this file; tests/test_distributed_train.py
starts it.
"""

from __future__ import annotations

import faulthandler
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from crsam import cli, distributed


def run_job(argv: list[str], path: str) -> int:
    counts = {"synchronized_backward": 0, "optimizer_all_reduces": 0}
    models = []
    in_ddp_hook = [False]
    plain_wrap_model = distributed.wrap_model
    plain_all_reduce = dist.all_reduce

    def counting_hook(process_group, bucket):
        # DDP calls the hook once per gradient bucket of a synchronized backward pass.
        if bucket.is_last():
            counts["synchronized_backward"] += 1
        in_ddp_hook[0] = True
        try:
            return default_hooks.allreduce_hook(process_group, bucket)
        finally:
            in_ddp_hook[0] = False

    def wrap_and_count(model):
        wrapped = plain_wrap_model(model)
        wrapped.register_comm_hook(None, counting_hook)
        models.append(model)
        return wrapped

    def counting_all_reduce(tensor, *args, **kwargs):
        # The optimizer averages all gradients in one flat tensor; metric sums are smaller.
        gradient_numel = sum(p.numel() for p in models[0].parameters()) if models else -1
        if not in_ddp_hook[0] and tensor.numel() == gradient_numel:
            counts["optimizer_all_reduces"] += 1
        return plain_all_reduce(tensor, *args, **kwargs)

    distributed.wrap_model = wrap_and_count
    dist.all_reduce = counting_all_reduce
    try:
        status = cli.main(argv)
    finally:
        distributed.wrap_model = plain_wrap_model
        dist.all_reduce = plain_all_reduce
    weights = torch.cat([p.detach().reshape(-1) for p in models[0].parameters()]) if models else None
    torch.save({"status": status, "weights": weights, **counts}, path)
    return status


def main() -> None:
    out, jobs = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    rank = os.environ["RANK"]
    # A rank stuck in a collective prints every thread's stack and exits, well before the test's
    # timeout, so that a hang shows where it waits.
    faulthandler.dump_traceback_later(float(os.environ.get("CRSAM_WORKER_TIMEOUT", "90")), exit=True)

    # One process group for all jobs: crsam train uses a group that is already initialized.
    dist.init_process_group("gloo", init_method="env://")
    try:
        for index, job in enumerate(jobs):
            status = run_job(job.split(), os.path.join(out, f"job{index}-rank{rank}.pt"))
            if status != 0:
                # The other rank may wait in a collective; exiting lets torchrun stop it.
                sys.exit(status)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
