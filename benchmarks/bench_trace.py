"""Time and peak memory to reach a relative standard error on the Hessian trace, as ratios.

Compares crsam's trace estimators with Hutchinson's estimator as PyHessian runs it on one batch
(Yao et al., 2020): the gradient's graph is built once with ``create_graph=True`` and kept, and
every Rademacher probe costs one more backward pass through it. The baseline is written here,
with the same stopping rule as crsam (relative standard error at most ``--rel-tol`` after at
least 10 probes), so every estimator delivers the same precision and the times compare.

Each measurement runs in a fresh process, so that its peak resident memory (``ru_maxrss``)
minus the memory after setup is the estimator's own peak. The methods alternate over
``--repeats`` rounds, and the table shows medians.

Run: ``python benchmarks/bench_trace.py`` (MNIST-1D CNN trained briefly with SGD, batch 512),
or ``--checkpoint runs/x/checkpoint.pt`` for a trained crsam checkpoint.

References:
    Yao, Z., Gholami, A., Keutzer, K., Mahoney, M. W. (2020). PyHessian: Neural networks through
    the lens of the Hessian. IEEE International Conference on Big Data.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue as queue_module
import resource
import statistics
import time

import torch
import torch.nn.functional as F

METHODS = ("baseline", "hutchinson", "hutch++")


def _rss_mib() -> float:
    """Current resident memory of this process in MiB (Linux)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    """Peak resident memory of this process so far in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build_problem(args: argparse.Namespace):
    """Return (model, inputs, targets): a trained network and one batch of its training data."""
    if args.checkpoint:
        from crsam.train import restore_run

        run = restore_run(args.checkpoint)
        return run.model, run.data.x_train[: args.batch], run.data.y_train[: args.batch]

    from crsam.data import load_mnist1d
    from crsam.models import build_model

    torch.manual_seed(args.seed)
    data = load_mnist1d()
    model = build_model(args.model, activation="gelu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.train_epochs):
        order = torch.randperm(data.x_train.shape[0], generator=generator)
        for start in range(0, order.numel(), 128):
            batch = order[start : start + 128]
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()
    model.eval()
    return model, data.x_train[: args.batch], data.y_train[: args.batch]


def _baseline_trace(model, inputs, targets, rel_tol: float, max_probes: int, seed: int) -> dict:
    """Hutchinson with PyHessian's one-batch algorithm: one kept graph, one backward per probe."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(inputs), targets)
    gradients = torch.autograd.grad(loss, params, create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    rss = []
    while len(samples) < max_probes:
        v = [(2 * torch.randint(0, 2, p.shape, generator=generator) - 1).to(p.dtype) for p in params]
        Hv = torch.autograd.grad(gradients, params, grad_outputs=v, retain_graph=True)
        samples.append(float(sum((a * b).sum() for a, b in zip(Hv, v))))
        rss.append(_rss_mib())
        if len(samples) >= 10:
            stderr = statistics.stdev(samples) / len(samples) ** 0.5
            if stderr <= rel_tol * abs(statistics.fmean(samples)):
                break
    mean = statistics.fmean(samples)
    return {"estimate": mean, "stderr": statistics.stdev(samples) / len(samples) ** 0.5, "probes": len(samples), "rss": rss}


def _crsam_trace(method: str, model, inputs, targets, rel_tol: float, max_probes: int, seed: int) -> dict:
    from crsam.curvature import EmpiricalLoss, hutchinson_trace, hutchpp_trace

    loss = EmpiricalLoss(model, inputs, targets, batch_size=inputs.shape[0])
    rss: list[float] = []

    class RecordingLoss:
        """The loss's products, recording resident memory after each block."""

        num_parameters, dtype, device = loss.num_parameters, loss.dtype, loss.device

        def matmat(self, V):
            product = loss.matmat(V)
            rss.append(_rss_mib())
            return product

    estimator = hutchinson_trace if method == "hutchinson" else hutchpp_trace
    result = estimator(RecordingLoss(), rel_tol=rel_tol, max_probes=max_probes, seed=seed)
    return {"estimate": result.estimate, "stderr": result.stderr, "probes": result.probes, "rss": rss}


def _measure(method: str, args: argparse.Namespace, queue) -> None:
    """Child process: build the problem, then time one estimator and record its peak memory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs, targets = _build_problem(args)
    # Warm-up product so that one-time costs (allocator, kernels) do not count for either method.
    _crsam_trace("hutchinson", model, inputs, targets, 1.0, 10, args.seed + 1)
    _baseline_trace(model, inputs, targets, 1.0, 10, args.seed + 1)
    start_rss = _rss_mib()
    start = time.perf_counter()
    if method == "baseline":
        result = _baseline_trace(model, inputs, targets, args.rel_tol, args.max_probes, args.seed)
    else:
        result = _crsam_trace(method, model, inputs, targets, args.rel_tol, args.max_probes, args.seed)
    result["seconds"] = time.perf_counter() - start
    result["peak_mib"] = max(0.0, _peak_mib() - start_rss)
    rss = result.pop("rss")
    # Growth of resident memory from the first quarter of the run to the end: 0 when flat.
    result["rss_growth_mib"] = rss[-1] - rss[len(rss) // 4] if len(rss) >= 4 else 0.0
    queue.put(result)


def _result_of(child, queue, method: str) -> dict:
    """Wait for the child's result; raise if it exited without one (its traceback is on stderr)."""
    while True:
        try:
            return queue.get(timeout=5)
        except queue_module.Empty:
            if not child.is_alive():
                raise RuntimeError(f"the measurement of {method!r} failed with exit code {child.exitcode}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="crsam checkpoint to measure [a CNN trained here]")
    parser.add_argument("--model", default="cnn1d", choices=("cnn1d", "mlp"), help="model trained here [cnn1d]")
    parser.add_argument("--train-epochs", type=int, default=5, help="SGD epochs of the model trained here [5]")
    parser.add_argument("--batch", type=int, default=512, help="examples in the measured batch [512]")
    parser.add_argument("--rel-tol", type=float, default=0.01, help="relative standard error to reach [0.01]")
    parser.add_argument("--max-probes", type=int, default=3000, help="probe limit of every estimator [3000]")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all methods; medians are shown [3]")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process, 0 for torch's default")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and probes [0]")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    runs: dict[str, list[dict]] = {method: [] for method in METHODS}
    for repeat in range(args.repeats):
        for method in METHODS:
            queue = context.Queue()
            child = context.Process(target=_measure, args=(method, args, queue))
            child.start()
            runs[method].append(_result_of(child, queue, method))
            child.join()

    summary = {}
    for method, results in runs.items():
        summary[method] = {
            "seconds": statistics.median(r["seconds"] for r in results),
            "peak_mib": statistics.median(r["peak_mib"] for r in results),
            "rss_growth_mib": max(r["rss_growth_mib"] for r in results),
            "probes": results[0]["probes"],
            "estimate": results[0]["estimate"],
            "stderr": results[0]["stderr"],
        }
    for method in METHODS:
        summary[method]["time_ratio"] = summary[method]["seconds"] / summary["baseline"]["seconds"]
        base_peak = summary["baseline"]["peak_mib"]
        summary[method]["memory_ratio"] = summary[method]["peak_mib"] / base_peak if base_peak > 0 else None

    setup = {
        "checkpoint": args.checkpoint,
        "model": None if args.checkpoint else args.model,
        "batch": args.batch,
        "rel_tol": args.rel_tol,
        "threads": args.threads or torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps({"setup": setup, "methods": summary}, indent=2))
        return
    print(" ".join(f"{key}={value}" for key, value in setup.items()))
    print(f"{'method':<11} {'seconds':>8} {'ratio':>6} {'peak MiB':>9} {'ratio':>6} {'RSS growth':>10} {'probes':>7}  trace")
    for method, row in summary.items():
        memory_ratio = "n/a" if row["memory_ratio"] is None else f"{row['memory_ratio']:.2f}"
        print(
            f"{method:<11} {row['seconds']:>8.2f} {row['time_ratio']:>6.2f} {row['peak_mib']:>9.1f} "
            f"{memory_ratio:>6} {row['rss_growth_mib']:>10.1f} {row['probes']:>7}  "
            f"{row['estimate']:.4g} +- {row['stderr']:.2g}"
        )


if __name__ == "__main__":
    main()
