"""Measure the optimizer's own overhead: SAM and CR-SAM steps against their floors.

The floor of a CR-SAM step is three bare forward-backward passes plus one base-optimizer step on
the same model and batch (SAM: two passes plus one step). Everything above the floor is the
optimizer's own work: norms, perturbation, save and restore, combination. The benchmark also
times a straightforward sequential implementation, written below as the baseline, that clones
gradients and rebuilds the weights by +e, -2e, +e arithmetic in Python loops over the
parameters, as much research code does, and CR-SAM's batched passes (``parallel=True``).
A last variant runs only the tensor operations of crsam's CR-SAM step, with none of its checks
and restores, to show how much of crsam's overhead those operations themselves cost.

Each repeat times every variant once, in turn, so a slow moment of the machine hits all variants
alike. The figures are medians over repeats of per-repeat ratios and differences against the
floor timed in the same repeat, with interquartile ranges. By default the clock is the process's
CPU time, which leaves out the time other processes hold the core (with one thread it is the
time spent on this benchmark's work); ``--clock wall`` uses the wall clock. Models: the MNIST-1D MLP and 1-D CNN
of ``crsam.models`` (batch 128 of 40 features) and the CIFAR ResNet-18 of
``crsam.vision_models`` (batch 32 of random 3x32x32 images), all on the CPU with one thread.
Run:

    python benchmarks/bench_optimizer.py [--repeats 15] [--steps 10] [--resnet-repeats 5] [--clock cpu]
        [--models mlp cnn1d resnet18] [--ablation] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from crsam.models import build_model
import crsam._optim_state as crsam_state
import crsam.optim as crsam_optim
from crsam._optim_state import _StepStorage
from crsam.optim import CRSAM, SAM, FunctionalClosure
from crsam.vision_models import build_vision_model

RHO, ALPHA, BETA = 0.05, 0.1, 0.01
MODELS = ("mlp", "cnn1d", "resnet18")
SGD_ARGS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-3}


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


class OperationsOnly:
    """The tensor operations of CR-SAM's step in crsam, with nothing else around them.

    These are the foreach operations of ``crsam.optim.CRSAM``, on buffers of its own. The variant
    also makes crsam's choice between the two ways of moving the weights, and reuses the last
    step's gradient memory as crsam does. It leaves out the random-state and normalization
    restores, the finiteness check, the bookkeeping of parameter groups and the base optimizer
    wrapper. So its overhead above the floor is what the operations cost, and the difference to
    crsam's is the cost of the rest.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters()]
        self.base = torch.optim.SGD(self.params, **SGD_ARGS)
        self.weights = [torch.empty_like(p) for p in self.params]
        self.scale = torch.tensor(1.0 + ALPHA + BETA)
        total_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.small = total_bytes <= _StepStorage.SMALL_TENSOR_BYTES * len(self.params)
        self.spare: list[list[torch.Tensor]] = [[], []]

    def take(self) -> list[torch.Tensor]:
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    @torch.no_grad()
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.enable_grad():
            self.base.zero_grad()
            forward_backward(model, x, y)
        g0 = self.take()
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g0))).clamp_(min=1e-38)
        norms = [norm] * len(g0)

        # Pass at w + eps.
        torch._foreach_copy_(self.weights, self.params)
        torch._foreach_addcdiv_(self.params, g0, norms, value=RHO)
        self.spare[0].clear()
        with torch.enable_grad():
            self.base.zero_grad()
            forward_backward(model, x, y)
        g_plus = self.take()

        # Pass at w - eps.
        if self.small:
            torch._foreach_copy_(self.params, self.weights)
            torch._foreach_addcdiv_(self.params, g0, norms, value=-RHO)
        else:
            for p, w, g in zip(self.params, self.weights, g0):
                torch.addcdiv(w, g, norm, value=-RHO, out=p)
        self.spare[1].clear()
        with torch.enable_grad():
            self.base.zero_grad()
            forward_backward(model, x, y)
        torch._foreach_copy_(self.params, self.weights)

        # The direction, written into g0's tensors.
        g_minus = [p.grad for p in self.params]
        torch._foreach_mul_(g_plus, self.scale)
        torch._foreach_add_(g_plus, g_minus, alpha=ALPHA - BETA)
        for d, g in zip(g_plus, g0):
            torch.add(d, g, alpha=-2 * ALPHA, out=g)
        for p, g in zip(self.params, g0):
            p.grad = g
        self.spare = [g_plus, g_minus]
        self.base.step()


class _NoRandomState:
    """Stand-in for ``crsam.optim._RandomState`` that captures and restores nothing."""

    def restore(self) -> None:
        pass


# The guarantees of crsam's CR-SAM step that --ablation switches off, one at a time: for each,
# the internal of crsam that provides it and its replacement while the step runs. Measurement
# only, because each replacement breaks the guarantee it stands for.
ABLATIONS: dict[str, tuple[object, str, object]] = {
    "random_state": (crsam_optim, "_RandomState", _NoRandomState),
    "finiteness_check": (crsam_optim._SharpnessAwareOptimizer, "_check_finite", lambda self, losses, norm: None),
    "reuse_check": (crsam_state._GroupBuffers, "kept_unchanged", lambda self: True),
}


def without(target: object, name: str, replacement: object, step: Callable[[], object]) -> Callable[[], object]:
    """Return ``step`` run with ``target.name`` replaced (one attribute swap each way per call)."""

    def run() -> object:
        saved = getattr(target, name)
        setattr(target, name, replacement)
        try:
            return step()
        finally:
            setattr(target, name, saved)

    return run


def make_variants(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, ablation: bool = False
) -> dict[str, Callable[[], object]]:
    """Return one step function per variant, all on the same model and batch."""
    base = torch.optim.SGD(model.parameters(), **SGD_ARGS)
    crsam = CRSAM(model.parameters(), torch.optim.SGD, rho=RHO, alpha=ALPHA, beta=BETA, model=model, **SGD_ARGS)
    crsam_batched = CRSAM(model.parameters(), torch.optim.SGD, rho=RHO, alpha=ALPHA, beta=BETA, model=model, **SGD_ARGS)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, **SGD_ARGS)
    naive_crsam = NaiveCRSAM(model, sam_only=False)
    naive_sam = NaiveCRSAM(model, sam_only=True)
    operations_only = OperationsOnly(model)
    functional_closure = FunctionalClosure(model, nn.functional.cross_entropy, x, y)

    def floor(passes: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(passes):
                base.zero_grad()
                forward_backward(model, x, y)
            base.step()

        return run

    def wrapped(optimizer: torch.optim.Optimizer) -> Callable[[], object]:
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            return forward_backward(model, x, y)

        return lambda: optimizer.step(closure)

    variants = {
        "floor_crsam": floor(3),
        "crsam": wrapped(crsam),
        "naive_crsam": lambda: naive_crsam.step(model, x, y),
        "operations_crsam": lambda: operations_only.step(model, x, y),
        "crsam_parallel": lambda: crsam_batched.step(functional_closure, parallel=True),
        "floor_sam": floor(2),
        "sam": wrapped(sam),
        "naive_sam": lambda: naive_sam.step(model, x, y),
    }
    if ablation:
        for key, (target, name, replacement) in ABLATIONS.items():
            optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=RHO, alpha=ALPHA, beta=BETA, model=model, **SGD_ARGS)
            variants[f"crsam_without_{key}"] = without(target, name, replacement, wrapped(optimizer))
        # Without model= the step neither looks for normalization layers nor restores them.
        optimizer = CRSAM(model.parameters(), torch.optim.SGD, rho=RHO, alpha=ALPHA, beta=BETA, **SGD_ARGS)
        variants["crsam_without_normalization"] = wrapped(optimizer)
    return variants


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Return the first quartile, the median and the third quartile."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    first, median, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, median, third


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def measure(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    repeats: int,
    steps: int,
    clock: str,
    ablation: bool = False,
) -> dict:
    """Time every variant ``repeats`` times, interleaved, and summarize against the floors."""
    model.train()
    variants = make_variants(model, x, y, ablation)
    for run in variants.values():
        run()  # warm-up: allocator, thread pool, lazily allocated buffers
    seconds: dict[str, list[float]] = {key: [] for key in variants}
    wall_seconds: dict[str, list[float]] = {key: [] for key in variants}
    # Minor page faults: memory the allocator had to ask the system for again.
    faults: dict[str, list[float]] = {key: [] for key in variants}
    now = CLOCKS[clock]
    for _ in range(repeats):
        for key, run in variants.items():
            faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start, wall_start = now(), time.perf_counter()
            for _ in range(steps):
                run()
            seconds[key].append((now() - start) / steps)
            wall_seconds[key].append((time.perf_counter() - wall_start) / steps)
            faults[key].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start) / steps)

    def ratios(variant: str, reference: str) -> tuple[float, float, float]:
        return quartiles([a / b for a, b in zip(seconds[variant], seconds[reference])])

    def overheads(variant: str, floor: str) -> list[float]:
        return [a - b for a, b in zip(seconds[variant], seconds[floor])]

    def overhead_share(kind: str) -> float | None:
        # Median overhead of crsam's step above the floor over the baseline's median overhead.
        ours = statistics.median(overheads(kind, f"floor_{kind}"))
        baseline = statistics.median(overheads(f"naive_{kind}", f"floor_{kind}"))
        return ours / baseline if baseline > 0 else None

    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": int(x.shape[0]),
        "repeats": repeats,
        "steps": steps,
        "median_seconds": {key: statistics.median(values) for key, values in seconds.items()},
        "median_wall_seconds": {key: statistics.median(values) for key, values in wall_seconds.items()},
        "median_minor_faults_per_step": {key: statistics.median(values) for key, values in faults.items()},
        "crsam_over_floor": ratios("crsam", "floor_crsam"),
        "naive_crsam_over_floor": ratios("naive_crsam", "floor_crsam"),
        "sam_over_floor": ratios("sam", "floor_sam"),
        "naive_sam_over_floor": ratios("naive_sam", "floor_sam"),
        "parallel_over_sequential": ratios("crsam_parallel", "crsam"),
        "crsam_overhead_ms": [1e3 * v for v in quartiles(overheads("crsam", "floor_crsam"))],
        "naive_crsam_overhead_ms": [1e3 * v for v in quartiles(overheads("naive_crsam", "floor_crsam"))],
        "operations_crsam_overhead_ms": [1e3 * v for v in quartiles(overheads("operations_crsam", "floor_crsam"))],
        "sam_overhead_ms": [1e3 * v for v in quartiles(overheads("sam", "floor_sam"))],
        "naive_sam_overhead_ms": [1e3 * v for v in quartiles(overheads("naive_sam", "floor_sam"))],
        "crsam_overhead_share_of_naive": overhead_share("crsam"),
        "sam_overhead_share_of_naive": overhead_share("sam"),
        # Median overhead in ms of CR-SAM with one guarantee switched off (--ablation).
        "ablation_overhead_ms": {
            key.removeprefix("crsam_without_"): 1e3 * statistics.median(overheads(key, "floor_crsam"))
            for key in seconds
            if key.startswith("crsam_without_")
        },
    }


def format_ratio(quartile_triple: tuple[float, float, float]) -> str:
    first, median, third = quartile_triple
    return f"{median:.3f} [{first:.3f}, {third:.3f}]"


def format_milliseconds(quartile_triple: list[float]) -> str:
    first, median, third = quartile_triple
    return f"{median:.2f} [{first:.2f}, {third:.2f}]"


def format_share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def print_markdown(report: dict) -> None:
    print(f"{report['machine']}; torch {report['torch']}; {report['threads']} thread; {report['clock']} clock")
    print(f"load average before / after: {report['load_before']} / {report['load_after']}")
    print()
    print(
        "| model | params | batch | CR-SAM / floor | baseline / floor | SAM / floor | baseline SAM / floor "
        "| CR-SAM overhead / baseline's | SAM overhead / baseline's | parallel / sequential CR-SAM |"
    )
    print("|---|---:|---:|---|---|---|---|---:|---:|---|")
    for r in report["results"]:
        print(
            f"| {r['model']} | {r['params']} | {r['batch']} | {format_ratio(r['crsam_over_floor'])} "
            f"| {format_ratio(r['naive_crsam_over_floor'])} | {format_ratio(r['sam_over_floor'])} "
            f"| {format_ratio(r['naive_sam_over_floor'])} | {format_share(r['crsam_overhead_share_of_naive'])} "
            f"| {format_share(r['sam_overhead_share_of_naive'])} | {format_ratio(r['parallel_over_sequential'])} |"
        )

    print()
    print("Overhead above the floor in ms, median [first quartile, third quartile] of per-repeat differences:")
    print()
    print("| model | CR-SAM | CR-SAM operations only | baseline CR-SAM | SAM | baseline SAM |")
    print("|---|---|---|---|---|---|")
    keys = (
        "crsam_overhead_ms",
        "operations_crsam_overhead_ms",
        "naive_crsam_overhead_ms",
        "sam_overhead_ms",
        "naive_sam_overhead_ms",
    )
    for r in report["results"]:
        cells = [format_milliseconds(r[key]) for key in keys]
        print(f"| {r['model']} | " + " | ".join(cells) + " |")

    print()
    print(
        "| model | repeats x steps | floor CR-SAM (ms) | CR-SAM (ms) | floor SAM (ms) | SAM (ms) "
        "| parallel CR-SAM (ms) | wall/clock, floor CR-SAM | page faults per step: floor, CR-SAM, baseline |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in report["results"]:
        ms = {key: 1e3 * value for key, value in r["median_seconds"].items()}
        faults = r["median_minor_faults_per_step"]
        wall_share = r["median_wall_seconds"]["floor_crsam"] / r["median_seconds"]["floor_crsam"]
        print(
            f"| {r['model']} | {r['repeats']} x {r['steps']} | {ms['floor_crsam']:.2f} | {ms['crsam']:.2f} "
            f"| {ms['floor_sam']:.2f} | {ms['sam']:.2f} | {ms['crsam_parallel']:.2f} | {wall_share:.2f} "
            f"| {' / '.join(f'{faults[key]:.0f}' for key in ('floor_crsam', 'crsam', 'naive_crsam'))} |"
        )

    ablated = [r for r in report["results"] if r["ablation_overhead_ms"]]
    if ablated:
        names = list(ablated[0]["ablation_overhead_ms"])
        print()
        print("CR-SAM overhead above the floor in ms, median, with one guarantee switched off (--ablation):")
        print()
        print("| model | CR-SAM | " + " | ".join(f"without {name.replace('_', ' ')}" for name in names) + " | operations only |")
        print("|---|---:|" + "---:|" * len(names) + "---:|")
        for r in ablated:
            cells = [f"{r['ablation_overhead_ms'][name]:.3f}" for name in names]
            print(
                f"| {r['model']} | {r['crsam_overhead_ms'][1]:.3f} | " + " | ".join(cells)
                + f" | {r['operations_crsam_overhead_ms'][1]:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats for the MNIST-1D models")
    parser.add_argument("--steps", type=int, default=10, help="steps timed per repeat for the MNIST-1D models")
    parser.add_argument("--resnet-repeats", type=int, default=5, help="interleaved repeats of one step for ResNet-18")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time or wall clock [cpu]")
    parser.add_argument("--batch-size", type=int, default=128, help="MNIST-1D batch size")
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to time [all: mlp cnn1d resnet18]"
    )
    parser.add_argument(
        "--ablation", action="store_true",
        help="also time CR-SAM with each of its guarantees switched off in turn (measurement only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown tables")
    args = parser.parse_args()
    for flag in ("repeats", "steps", "resnet_repeats", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")

    # One thread: the machine's other jobs then slow each variant alike instead of stealing
    # some of several threads at random moments.
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 40)
    y = torch.randint(0, 10, (args.batch_size,))
    images = torch.randn(32, 3, 32, 32)
    labels = torch.randint(0, 10, (32,))
    results = []
    for name in args.models:
        if name == "resnet18":
            model = build_vision_model("resnet18")
            results.append(measure(name, model, images, labels, args.resnet_repeats, 1, args.clock, args.ablation))
        else:
            model = build_model(name, activation="gelu")
            results.append(measure(name, model, x, y, args.repeats, args.steps, args.clock, args.ablation))

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_markdown(report)


if __name__ == "__main__":
    main()
