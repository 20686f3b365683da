"""Check one GPU: ResNet-18 steps of SGD, SAM and CR-SAM in bf16, their time ratios and peak memory.

Each variant trains a freshly seeded CIFAR ResNet-18 on synthetic CIFAR-shaped batches (random
normal images, random labels) through the same closure and step code as ``crsam train``
(``crsam.steps``), under bf16 autocast. The variants run one after another: SGD in float32 for
reference, then SGD, SAM, CR-SAM (sequential) and, when ``crsam.optim`` offers it, CR-SAM with
its parallel finite-difference path, all in bf16. For each the script prints the median step
time, its ratio to the bf16 SGD step, and the peak GPU memory (``torch.cuda.max_memory_allocated``
after resetting the peak before the variant).

On a machine without CUDA it prints that to stderr and runs a 5-step smoke version on the CPU with a narrow
network, whose times mean nothing but exercise every code path.

Run through ``benchmarks/gpu_check.sh`` or directly:

    python benchmarks/gpu_check.py [--steps 300] [--batch-size 128] [--max-seconds 200] [--json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import statistics
import sys
import time
from typing import Any

import torch

from crsam.steps import StepRecipe, make_closure, take_step
from crsam.vision_models import build_vision_model

SGD_ARGS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
RHO, ALPHA, BETA = 0.1, 0.1, 0.01

# Step cost of each variant in units of one SGD step (forward-backward passes), used only to
# fit the step count into --max-seconds.
PASSES = {"sgd fp32": 1.0, "sgd": 1.0, "sam": 2.0, "crsam": 3.0, "crsam parallel": 3.0}

# Steps before timing starts: CUDA kernels get selected and memory pools grow on the first steps.
WARMUP_STEPS = 10

# The CPU smoke version: steps, batch and ResNet width small enough for seconds on a laptop,
# with one untimed step first.
SMOKE = {"steps": 5, "batch_size": 8, "width": 8}
SMOKE_WARMUP_STEPS = 1


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per variant on the GPU [300]")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step [128]")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 channels of the first stage [64]")
    parser.add_argument("--max-seconds", type=float, default=200.0,
                        help="time budget of all timed steps; fewer steps are run when the first variant "
                        "shows that --steps would exceed it [200]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    arguments = parser.parse_args(argv)
    for name in ("steps", "batch_size", "width"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(arguments, name)} must be at least 1")
    if not arguments.max_seconds > 0:
        parser.error(f"--max-seconds {arguments.max_seconds} must be positive")
    return arguments


def find_parallel_api() -> tuple[Any, str] | tuple[None, str]:
    """Return (the functional-loss class, "") when CRSAM offers a parallel path, else (None, reason).

    The parallel path is recognized by a ``parallel`` argument of ``CRSAM.step`` and a class
    ``FunctionalClosure`` or ``FunctionalLoss`` in ``crsam.optim``.
    """
    import crsam.optim as optim

    if "parallel" not in inspect.signature(optim.CRSAM.step).parameters:
        return None, "crsam.optim.CRSAM.step takes no 'parallel' argument"
    for name in ("FunctionalClosure", "FunctionalLoss"):
        if hasattr(optim, name):
            return getattr(optim, name), ""
    return None, "crsam.optim has no FunctionalClosure or FunctionalLoss class"


def build_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    from crsam.optim import CRSAM, SAM

    if name.startswith("sgd"):
        return torch.optim.SGD(model.parameters(), **SGD_ARGS)
    if name == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, **SGD_ARGS)
    return CRSAM(model.parameters(), torch.optim.SGD, rho=RHO, alpha=ALPHA, beta=BETA, model=model, **SGD_ARGS)


def synthetic_batches(count: int, batch_size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch_size, 3, 32, 32, generator=generator).to(device),
         torch.randint(0, 10, (batch_size,), generator=generator).to(device))
        for _ in range(count)
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(
    name: str, steps: int, batches: list, width: int, device: torch.device, parallel_api: Any, warmup_steps: int
) -> dict[str, Any]:
    """Train ``steps`` timed steps after ``warmup_steps`` untimed ones of one variant; return its figures."""
    torch.manual_seed(0)
    model = build_vision_model("resnet18", width=width).to(device)
    optimizer = build_optimizer(name, model)
    recipe = StepRecipe(device_type=device.type, amp_dtype=None if name == "sgd fp32" else torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    times = []
    loss = torch.tensor(float("nan"))
    for step in range(warmup_steps + steps):
        x, y = batches[step % len(batches)]
        closure = make_closure(model, optimizer, x, y, recipe)
        synchronize(device)
        started = time.perf_counter()
        if name == "crsam parallel":
            # The functional closure runs the model itself, so autocast wraps the whole step to
            # give its forward passes the same bf16 precision as the sequential variant.
            functional = parallel_api(model, torch.nn.functional.cross_entropy, x, y)
            with torch.autocast(device.type, dtype=recipe.amp_dtype, enabled=recipe.amp_dtype is not None):
                loss = optimizer.step(functional, parallel=True)
        else:
            loss = take_step(optimizer, closure, recipe)
        synchronize(device)
        if step >= warmup_steps:
            times.append(time.perf_counter() - started)

    return {
        "variant": name,
        "precision": "fp32" if name == "sgd fp32" else "bf16",
        "steps": steps,
        "median_ms": 1e3 * statistics.median(times),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "final_loss": float(loss),
    }


def fit_steps(requested: int, seconds_per_sgd_step: float, budget: float) -> int:
    """Return the step count at which all variants together fit ``budget`` seconds, at most ``requested``."""
    cost = seconds_per_sgd_step * sum(PASSES.values())
    return max(1, min(requested, math.floor(budget / cost)))


def format_table(report: dict[str, Any]) -> str:
    lines = [f"device: {report['device']}, torch {report['torch']}, batch {report['batch_size']}, "
             f"ResNet-18 width {report['width']}"]
    if report["smoke"]:
        lines.append("CPU smoke version: the times exercise the code, they measure nothing")
    lines.append(f"{'variant':<16}{'precision':<11}{'steps':>6}{'ms/step':>10}{'vs sgd bf16':>13}{'peak MiB':>10}  loss")
    for row in report["variants"]:
        ratio = "-" if row.get("ratio_to_sgd") is None else f"{row['ratio_to_sgd']:.2f}"
        memory = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
        lines.append(f"{row['variant']:<16}{row['precision']:<11}{row['steps']:>6}{row['median_ms']:>10.2f}"
                     f"{ratio:>13}{memory:>10}  {row['final_loss']:.3f}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    notes = []
    if torch.cuda.is_available():
        device = torch.device("cuda")
        steps, batch_size, width = arguments.steps, arguments.batch_size, arguments.width
        smoke = False
        warmup_steps = WARMUP_STEPS
    else:
        print("gpu_check: CUDA is not available on this machine; running the 5-step CPU smoke version",
              file=sys.stderr)
        device = torch.device("cpu")
        steps, batch_size, width = SMOKE["steps"], SMOKE["batch_size"], SMOKE["width"]
        smoke = True
        warmup_steps = SMOKE_WARMUP_STEPS

    parallel_api, reason = find_parallel_api()
    variants = ["sgd fp32", "sgd", "sam", "crsam"]
    if parallel_api is not None:
        variants.append("crsam parallel")
    else:
        notes.append(f"CR-SAM parallel skipped: {reason}")

    batches = synthetic_batches(4, batch_size, device)
    rows = [run_variant("sgd fp32", steps, batches, width, device, parallel_api, warmup_steps)]
    if not smoke:
        fitted = fit_steps(steps, rows[0]["median_ms"] / 1e3, arguments.max_seconds)
        if fitted < steps:
            notes.append(f"steps lowered from {steps} to {fitted} to fit --max-seconds {arguments.max_seconds:g}")
            steps = fitted
    for name in variants[1:]:
        try:
            rows.append(run_variant(name, steps, batches, width, device, parallel_api, warmup_steps))
        except TypeError as error:
            if name != "crsam parallel":
                raise
            notes.append(f"CR-SAM parallel failed with this script's call ({error}); adapt run_variant to its API")

    sgd_bf16 = next(row["median_ms"] for row in rows if row["variant"] == "sgd")
    for row in rows:
        row["ratio_to_sgd"] = row["median_ms"] / sgd_bf16
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "batch_size": batch_size,
        "width": width,
        "smoke": smoke,
        "variants": rows,
        "notes": notes,
    }
    print(json.dumps(report, indent=2) if arguments.json else format_table(report))
    finite = all(math.isfinite(row["final_loss"]) for row in rows)
    if not finite:
        print("gpu_check: a variant ended with a non-finite loss", file=sys.stderr)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
