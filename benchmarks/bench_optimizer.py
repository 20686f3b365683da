"""Measure the optimizer's own overhead: a SAM or CR-SAM step against its floor.

The floor of a CR-SAM step is three bare forward-backward passes plus one base-optimizer step on
the same model and batch (SAM: two passes plus one step). Everything above the floor is the
optimizer's own work: norms, perturbation, restore, combination. The benchmark also times a
straightforward sequential implementation, written below as the baseline, that clones gradients
and rebuilds the weights by +e, -2e, +e arithmetic, as much research code does.

Timings are the median over interleaved repeats (each repeat times every variant once, in turn),
so a slow moment of the machine hits every variant alike. Run:

    python benchmarks/bench_optimizer.py --repeats 15 --steps 10 [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from crsam.models import build_model
from crsam.optim import CRSAM, SAM

RHO, ALPHA, BETA = 0.05, 0.1, 0.01
SGD_ARGS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


class NaiveCRSAM:
    """Baseline: the sequential three-step rule with gradient clones and arithmetic restore."""

    def __init__(self, model: nn.Module, sam_only: bool) -> None:
        self.params = [p for p in model.parameters()]
        self.base = torch.optim.SGD(self.params, **SGD_ARGS)
        self.sam_only = sam_only

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.base.zero_grad()
        forward_backward(model, x, y)
        g0 = [p.grad.clone() for p in self.params]
        norm = torch.norm(torch.stack([g.norm() for g in g0]))
        eps = [RHO * g / norm for g in g0]
        with torch.no_grad():
            for p, e in zip(self.params, eps):
                p.add_(e)
        self.base.zero_grad()
        forward_backward(model, x, y)
        g_plus = [p.grad.clone() for p in self.params]
        if self.sam_only:
            with torch.no_grad():
                for p, e in zip(self.params, eps):
                    p.sub_(e)
            for p, gp in zip(self.params, g_plus):
                p.grad = gp
            self.base.step()
            return
        with torch.no_grad():
            for p, e in zip(self.params, eps):
                p.sub_(2 * e)
        self.base.zero_grad()
        forward_backward(model, x, y)
        g_minus = [p.grad.clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, eps):
                p.add_(e)
        for p, g, gp, gm in zip(self.params, g0, g_plus, g_minus):
            p.grad = gp + ALPHA * (gp + gm - 2 * g) + BETA * (gp - gm)
        self.base.step()


def make_variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Return one step function per variant, all on the same model and batch."""
    base = torch.optim.SGD(model.parameters(), **SGD_ARGS)
    crsam = CRSAM(model.parameters(), torch.optim.SGD, rho=RHO, alpha=ALPHA, beta=BETA, model=model, **SGD_ARGS)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, **SGD_ARGS)
    naive_crsam = NaiveCRSAM(model, sam_only=False)
    naive_sam = NaiveCRSAM(model, sam_only=True)

    def floor(passes: int):
        def run() -> None:
            for _ in range(passes):
                base.zero_grad()
                forward_backward(model, x, y)
            base.step()

        return run

    def wrapped(optimizer):
        def closure():
            optimizer.zero_grad()
            return forward_backward(model, x, y)

        return lambda: optimizer.step(closure)

    return {
        "floor_crsam": floor(3),
        "crsam": wrapped(crsam),
        "naive_crsam": lambda: naive_crsam.step(model, x, y),
        "floor_sam": floor(2),
        "sam": wrapped(sam),
        "naive_sam": lambda: naive_sam.step(model, x, y),
    }


def measure(name: str, model: nn.Module, x, y, repeats: int, steps: int) -> dict:
    variants = make_variants(model, x, y)
    for run in variants.values():
        run()  # warm-up: allocator, thread pool
    times: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(repeats):
        for key, run in variants.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            times[key].append((time.perf_counter() - start) / steps)
    median = {key: statistics.median(values) for key, values in times.items()}

    def overhead(kind: str) -> float:
        return median[kind] - median[f"floor_{kind.removeprefix('naive_')}"]

    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": int(x.shape[0]),
        "median_seconds": median,
        "crsam_over_floor": median["crsam"] / median["floor_crsam"],
        "sam_over_floor": median["sam"] / median["floor_sam"],
        "naive_crsam_over_floor": median["naive_crsam"] / median["floor_crsam"],
        "naive_sam_over_floor": median["naive_sam"] / median["floor_sam"],
        "crsam_overhead_vs_naive": overhead("crsam") / overhead("naive_crsam") if overhead("naive_crsam") > 0 else None,
        "sam_overhead_vs_naive": overhead("sam") / overhead("naive_sam") if overhead("naive_sam") > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats per variant")
    parser.add_argument("--steps", type=int, default=10, help="steps timed in each repeat")
    parser.add_argument("--batch-size", type=int, default=128, help="MNIST-1D batch size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 40)
    y = torch.randint(0, 10, (args.batch_size,))
    results = [
        measure(name, build_model(name, activation="gelu"), x, y, args.repeats, args.steps)
        for name in ("mlp", "cnn1d")
    ]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "repeats": args.repeats,
        "steps": args.steps,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['machine']}, torch {report['torch']}, median of {args.repeats} interleaved repeats")
    header = f"{'model':8} {'params':>8} {'crsam/floor':>12} {'naive/floor':>12} {'sam/floor':>10} {'naive/floor':>12}"
    print(header)
    for r in results:
        print(
            f"{r['model']:8} {r['params']:8d} {r['crsam_over_floor']:12.3f} {r['naive_crsam_over_floor']:12.3f} "
            f"{r['sam_over_floor']:10.3f} {r['naive_sam_over_floor']:12.3f}"
        )


if __name__ == "__main__":
    main()
