"""Reproduction study: SGD, SAM and CR-SAM on MNIST-1D, several seeds, with confidence intervals.

One command reruns everything. The runs, certificates and logs go to ``--work-dir``, and the
tables, ``study.json`` and the plots to ``--out`` (``docs/results/`` for the recorded study)::

    python benchmarks/reproduce_study.py --out docs/results --jobs 2

Steps, each skipped when its output already exists, so an interrupted study continues where it
stopped:

1. **rho selection.** For SAM and CR-SAM and each model, runs for each rho of ``--rho-grid`` and
   each of ``--selection-seeds`` on a fresh MNIST-1D sample (``--validation-data-seed``), whose
   held-out 20 % is the validation set. The rho with the highest mean final validation accuracy
   is kept. The test set of the main runs
   (data seed 42) plays no part in the choice.
2. **Main runs.** Every (model, optimizer, seed) cell trains for the same ``--epochs`` with the
   chosen rho, the CR-SAM authors' default alpha = 0.1 and beta = 0.01, and ``crsam train
   --track-curvature``, which logs the Hessian trace, its standard error, the top eigenvalue, the
   gradient norm and the normalized trace on fixed train and test subsets.
3. **Certificates.** For ``--certify-seed``, each (model, optimizer) cell gets the data-dependent
   certificate of :func:`crsam.certificate.tight_certificate_for_run`, as ``crsam bound --prior
   learned`` computes it but with the prior trained by the cell's own optimizer and learning
   rate on half of the training set. The posterior starts at the prior and is fitted on the
   other half, which n counts. It certifies that stochastic network, trained by the cell's
   recipe, not the checkpoint's own weights: a posterior started at the checkpoint, which saw the
   bound's half, sits too far from the prior and gave vacuous bounds near 1.
4. **Summary.** ``study.json`` (every number), ``study.md`` (tables with means and 95 %
   Student-t intervals over seeds, paired differences CR-SAM - SAM, the command, versions and
   machine) and PNG plots: test accuracy, trace over epochs, certificate against test error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import stats

MODELS = ("mlp", "cnn1d")
OPTIMIZERS = ("sgd", "sam", "crsam")
SHARPNESS_AWARE = ("sam", "crsam")

# Final-epoch metrics summarised per cell; curvature keys come from --track-curvature.
CURVATURE_KEYS = ("trace", "normalized_trace", "top_eigenvalue", "grad_norm")
SUMMARY_KEYS = (
    "test_acc",
    "train_loss",
    *(f"curvature_{split}_{key}" for split in ("train", "test") for key in CURVATURE_KEYS),
)


# ---------------------------------------------------------------------------- running


def crsam_command(*arguments: str) -> list[str]:
    """Return the command line that runs ``crsam`` with this interpreter."""
    return [sys.executable, "-c", "import sys; from crsam.cli import main; sys.exit(main())", *arguments]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_training(run_dir: Path, options: dict, epochs: int, log_dir: Path) -> list[dict]:
    """Train (or resume, or skip a finished run) into ``run_dir``; return its metrics."""
    metrics = read_metrics(run_dir)
    if len(metrics) >= epochs:
        return metrics
    arguments = ["train", "--out", str(run_dir), "--epochs", str(epochs)]
    for name, value in options.items():
        arguments += [f"--{name.replace('_', '-')}", str(value)]
    if (run_dir / "checkpoint.pt").exists():
        # A resumed run takes its options from the checkpoint; passing the same values is allowed.
        arguments.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{run_dir.name}.log"
    with open(log_path, "w") as log:
        result = subprocess.run(crsam_command(*arguments), stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"training {run_dir} failed with exit status {result.returncode}; see {log_path}")
    return read_metrics(run_dir)


def certify_run(run_dir: Path, out_path: Path, log_dir: Path) -> dict:
    """Compute the data-dependent certificate of ``run_dir`` in a subprocess; return the report."""
    if out_path.exists():
        return json.loads(out_path.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    log_path = log_dir / f"{run_dir.name}-certificate.log"
    with open(log_path, "w") as log:
        result = subprocess.run(
            [sys.executable, __file__, "certify-one", str(run_dir), str(out_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    if result.returncode != 0:
        raise RuntimeError(f"certifying {run_dir} failed with exit status {result.returncode}; see {log_path}")
    return json.loads(out_path.read_text())


def certify_one(run_dir: str, out_path: str) -> None:
    """Worker of :func:`certify_run`: the prior is trained with the run's own optimizer and lr."""
    import torch

    from crsam.certificate import tight_certificate_for_run
    from crsam.checkpoint import json_safe, write_text_atomic
    from crsam.train import restore_run

    torch.set_num_threads(1)
    run = restore_run(Path(run_dir) / "checkpoint.pt")
    config = run.config
    started = time.perf_counter()
    report = tight_certificate_for_run(
        run,
        prior_optimizer=config["optimizer"],
        prior_lr=config["lr"],
        posterior_init="prior",
        seed=config["seed"],
    )
    report["seconds"] = time.perf_counter() - started
    write_text_atomic(json.dumps(json_safe(report), indent=1), out_path)


# ---------------------------------------------------------------------------- statistics


def mean_interval(values: list[float], confidence: float = 0.95) -> dict:
    """Return the mean and the two-sided Student-t interval of ``values`` (None where undefined)."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(data.mean())
    if data.size < 2:
        return {"mean": mean, "low": None, "high": None, "n": int(data.size)}
    half = float(stats.t.ppf(0.5 + confidence / 2, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(data.size)}


def final_value(metrics: list[dict], key: str) -> float | None:
    """Return the last logged value of ``key`` (curvature is logged on tracked epochs only)."""
    for record in reversed(metrics):
        if record.get(key) is not None:
            return float(record[key])
    return None


# ---------------------------------------------------------------------------- study


def select_rho(args, log_dir: Path) -> dict:
    """Train validation runs per (model, optimizer, rho, seed) and keep the best mean rho of each pair."""
    jobs = []
    for model in args.models:
        for optimizer in SHARPNESS_AWARE:
            for rho in args.rho_grid:
                for seed in args.selection_seeds:
                    run_dir = args.work_dir / "selection" / f"{model}-{optimizer}-rho{rho:g}-seed{seed}"
                    options = {"model": model, "optimizer": optimizer, "rho": rho, "seed": seed,
                               "data_seed": args.validation_data_seed, "num_samples": args.num_samples}
                    jobs.append(((model, optimizer, rho), run_dir, options))
    results = parallel_map(lambda job: run_training(job[1], job[2], args.epochs, log_dir), jobs, args.jobs)

    per_rho: dict = {}
    for ((model, optimizer, rho), _, _), metrics in zip(jobs, results):
        per_rho.setdefault((model, optimizer), {}).setdefault(f"{rho:g}", []).append(metrics[-1]["test_acc"])
    selection: dict = {}
    for (model, optimizer), accuracies in per_rho.items():
        means = {rho: float(np.mean(values)) for rho, values in accuracies.items()}
        # Ties go to the smaller rho, the one closer to plain SGD.
        best = max(sorted(means, key=float), key=lambda rho: means[rho])
        selection.setdefault(model, {})[optimizer] = {"validation_acc": means, "rho": float(best)}
    return selection


def train_cells(args, selection: dict, log_dir: Path) -> dict:
    jobs = []
    for model in args.models:
        for optimizer in OPTIMIZERS:
            for seed in args.seeds:
                options = {"model": model, "optimizer": optimizer, "seed": seed,
                           "num_samples": args.num_samples}
                if args.track_curvature:
                    options["track_curvature"] = args.track_curvature
                if optimizer in SHARPNESS_AWARE:
                    options["rho"] = selection[model][optimizer]["rho"]
                run_dir = args.work_dir / "main" / f"{model}-{optimizer}-seed{seed}"
                jobs.append(((model, optimizer, seed), run_dir, options))
    # The slowest runs first, so that the pool does not end on one long CNN run.
    jobs.sort(key=lambda job: (job[0][0] != "cnn1d", job[0][1] != "crsam"))
    results = parallel_map(lambda job: run_training(job[1], job[2], args.epochs, log_dir), jobs, args.jobs)
    cells: dict = {}
    for ((model, optimizer, seed), run_dir, _), metrics in zip(jobs, results):
        cells.setdefault(model, {}).setdefault(optimizer, {})[seed] = {"run": str(run_dir), "metrics": metrics}
    return cells


def certify_cells(args, cells: dict, log_dir: Path) -> dict:
    jobs = []
    for model, per_optimizer in cells.items():
        for optimizer, per_seed in per_optimizer.items():
            run_dir = Path(per_seed[args.certify_seed]["run"])
            out_path = args.work_dir / "certificates" / f"{model}-{optimizer}-seed{args.certify_seed}.json"
            jobs.append(((model, optimizer), run_dir, out_path))
    (args.work_dir / "certificates").mkdir(parents=True, exist_ok=True)
    results = parallel_map(lambda job: certify_run(job[1], job[2], log_dir), jobs, args.jobs)
    certificates: dict = {}
    for ((model, optimizer), _, _), report in zip(jobs, results):
        stochastic = report["posterior"]["errors"]["stochastic"]["test"]["mean"]
        certificates.setdefault(model, {})[optimizer] = {
            "seed": args.certify_seed,
            "best_bound": report["best_bound"],
            "kl_bound": next(row["value"] for row in report["bounds"] if row["name"] == "kl"),
            "stochastic_test_error": stochastic,
            "network_test_error": report["test_error"],
            "n_bound": report["n_train"],
            "seconds": report.get("seconds"),
        }
    return certificates


def summarise(cells: dict) -> dict:
    summary: dict = {}
    for model, per_optimizer in cells.items():
        for optimizer, per_seed in per_optimizer.items():
            seeds = sorted(per_seed)
            record = {"seeds": seeds}
            for key in SUMMARY_KEYS:
                values = [final_value(per_seed[seed]["metrics"], key) for seed in seeds]
                record[key] = {"values": values, **mean_interval(values)}
            summary.setdefault(model, {})[optimizer] = record
        # Paired over seeds: the same seed gives the same initial weights and data order.
        if "sam" in per_optimizer and "crsam" in per_optimizer:
            common = sorted(set(per_optimizer["sam"]) & set(per_optimizer["crsam"]))
            paired = {}
            for key in SUMMARY_KEYS:
                differences = []
                for seed in common:
                    crsam_value = final_value(per_optimizer["crsam"][seed]["metrics"], key)
                    sam_value = final_value(per_optimizer["sam"][seed]["metrics"], key)
                    if crsam_value is not None and sam_value is not None:
                        differences.append(crsam_value - sam_value)
                paired[key] = mean_interval(differences)
            summary[model]["crsam_minus_sam"] = paired
    return summary


def parallel_map(function, items, jobs: int) -> list:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(function, items))


# ---------------------------------------------------------------------------- output


def format_interval(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["low"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"


def machine_description() -> dict:
    import torch

    import crsam

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "crsam": crsam.__version__,
    }


def write_markdown(args, study: dict, path: Path) -> None:
    lines = [
        "# Reproduction study: SGD, SAM and CR-SAM on MNIST-1D",
        "",
        "Written by `benchmarks/reproduce_study.py`; rerun with:",
        "",
        "```",
        study["command"],
        "```",
        "",
        f"Machine: {study['machine']['cpu']}, {study['machine']['cores']} cores, no GPU; "
        f"torch {study['machine']['torch']}, crsam {study['machine']['crsam']}, "
        f"Python {study['machine']['python']}, commit {study['machine']['commit']}. "
        f"Wall time of this invocation {study['seconds'] / 60:.0f} minutes (steps already done are skipped).",
        "",
        f"Each cell: {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.epochs} epochs, "
        f"MNIST-1D with {args.num_samples} examples (80 % train), batch 128, SGD momentum 0.9 and weight "
        "decay 5e-4 as the base optimizer, cosine schedule, crsam's default learning rate per model. "
        "Intervals are 95 % Student-t intervals over seeds. Curvature is the final logged value of "
        f"`--track-curvature {args.track_curvature}` on fixed subsets (eval mode, mean cross-entropy "
        "without weight decay).",
        "",
        "## rho chosen on the validation sample",
        "",
        f"Validation data: MNIST-1D generated with data seed {args.validation_data_seed} (a fresh sample). "
        f"The figure is the final-epoch accuracy on its held-out split, averaged over seeds "
        f"{', '.join(map(str, args.selection_seeds))}.",
        "",
        "| model | optimizer | validation accuracy per rho | chosen rho |",
        "|---|---|---|---|",
    ]
    for model, per_optimizer in study["selection"].items():
        for optimizer, record in per_optimizer.items():
            accuracies = ", ".join(f"{rho}: {acc:.3f}" for rho, acc in record["validation_acc"].items())
            lines.append(f"| {model} | {optimizer} | {accuracies} | {record['rho']:g} |")

    columns = [
        ("test_acc", "test accuracy", 3),
        ("train_loss", "train loss", 4),
        ("curvature_train_trace", "trace (train)", 2),
        ("curvature_test_trace", "trace (test)", 2),
        ("curvature_train_normalized_trace", "normalized trace (train)", 0),
        ("curvature_train_top_eigenvalue", "top eigenvalue (train)", 3),
    ]
    lines += ["", "## Final metrics, mean [95 % interval]", "",
              "| model | optimizer | " + " | ".join(title for _, title, _ in columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    for model, per_optimizer in study["summary"].items():
        for optimizer in (*OPTIMIZERS, "crsam_minus_sam"):
            if optimizer not in per_optimizer:
                continue
            record = per_optimizer[optimizer]
            label = "CR-SAM - SAM (paired)" if optimizer == "crsam_minus_sam" else optimizer
            cells = " | ".join(format_interval(record[key], digits) for key, _, digits in columns)
            lines.append(f"| {model} | {label} | {cells} |")

    if study.get("certificates"):
        lines += ["", f"## Certificates (seed {args.certify_seed})", "",
                  "Data-dependent prior trained with the cell's optimizer and learning rate on half of the "
                  "training set, posterior started at the prior and fitted on the other half, which n counts. "
                  "The certified quantity is the expected 0-1 error of that stochastic network, trained by "
                  "the cell's recipe; 'network test error' is the checkpoint's own, for comparison.", "",
                  "| model | optimizer | best bound | kl bound | stochastic test error | network test error | n |",
                  "|---|---|---|---|---|---|---|"]
        for model, per_optimizer in study["certificates"].items():
            for optimizer, record in per_optimizer.items():
                lines.append(
                    f"| {model} | {optimizer} | {record['best_bound']['value']:.4f} ({record['best_bound']['name']}) "
                    f"| {record['kl_bound']:.4f} | {record['stochastic_test_error']:.4f} "
                    f"| {record['network_test_error']:.4f} | {record['n_bound']} |"
                )
    lines += ["", "Plots: `accuracy.png`, `trace.png`, `certificates.png`.", ""]
    path.write_text("\n".join(lines))


def write_plots(args, study: dict, cells: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sgd": "tab:gray", "sam": "tab:blue", "crsam": "tab:red"}

    # Test accuracy per cell with its interval and the individual seeds.
    figure, axes = plt.subplots(1, len(args.models), figsize=(4 * len(args.models), 3.2), squeeze=False)
    for axis, model in zip(axes[0], args.models):
        for position, optimizer in enumerate(OPTIMIZERS):
            stat = study["summary"][model][optimizer]["test_acc"]
            values = [v for v in stat["values"] if v is not None]
            axis.scatter([position] * len(values), values, color=colors[optimizer], alpha=0.5, s=12)
            if stat["low"] is not None:
                axis.errorbar(position + 0.15, stat["mean"], yerr=[[stat["mean"] - stat["low"]], [stat["high"] - stat["mean"]]],
                              fmt="o", color=colors[optimizer], capsize=4)
        axis.set_xticks(range(len(OPTIMIZERS)), OPTIMIZERS)
        axis.set_title(f"{model}: test accuracy (95 % CI)")
    figure.tight_layout()
    figure.savefig(args.out / "accuracy.png", dpi=120)
    plt.close(figure)

    if args.track_curvature:
        write_trace_plot(args, cells, colors, plt)

    if study.get("certificates"):
        figure, axis = plt.subplots(figsize=(4.5, 4))
        markers = {"mlp": "o", "cnn1d": "s"}
        for model, per_optimizer in study["certificates"].items():
            for optimizer, record in per_optimizer.items():
                axis.scatter(record["stochastic_test_error"], record["best_bound"]["value"], color=colors[optimizer],
                             marker=markers.get(model, "o"), label=f"{model} {optimizer}")
        limit = max(1e-3, max(r["best_bound"]["value"] for p in study["certificates"].values() for r in p.values()))
        axis.plot([0, limit], [0, limit], color="black", linewidth=0.8, linestyle="--", label="bound = error")
        axis.set_xlabel("stochastic test error")
        axis.set_ylabel("certificate (upper bound)")
        axis.set_title("Certificate against test error")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(args.out / "certificates.png", dpi=120)
        plt.close(figure)


def write_trace_plot(args, cells: dict, colors: dict, plt) -> None:
    """Plot the Hessian trace on the training subset over epochs: mean over seeds with a 95 % band."""
    figure, axes = plt.subplots(1, len(args.models), figsize=(4 * len(args.models), 3.2), squeeze=False)
    for axis, model in zip(axes[0], args.models):
        for optimizer in OPTIMIZERS:
            per_seed = cells[model][optimizer]
            epochs = sorted({r["epoch"] for s in per_seed.values() for r in s["metrics"]
                             if r.get("curvature_train_trace") is not None})
            means, lows, highs = [], [], []
            for epoch in epochs:
                values = [r["curvature_train_trace"] for s in per_seed.values() for r in s["metrics"]
                          if r["epoch"] == epoch and r.get("curvature_train_trace") is not None]
                stat = mean_interval(values)
                means.append(stat["mean"])
                lows.append(stat["low"] if stat["low"] is not None else stat["mean"])
                highs.append(stat["high"] if stat["high"] is not None else stat["mean"])
            axis.plot(epochs, means, marker="o", color=colors[optimizer], label=optimizer)
            axis.fill_between(epochs, lows, highs, color=colors[optimizer], alpha=0.2)
        axis.set_xlabel("epoch")
        axis.set_yscale("log")
        axis.set_title(f"{model}: Hessian trace (train subset)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "trace.png", dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------- main


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="output folder [docs/results]")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/study"),
                        help="folder for the runs, certificates and logs; kept so that a rerun skips finished steps "
                        "[runs/study]")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds [0 1 2 3 4]")
    parser.add_argument("--epochs", type=int, default=60, help="epochs of every run [60]")
    parser.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D examples per data set [5000]")
    parser.add_argument("--rho-grid", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                        help="rho values tried on the validation sample [0.05 0.1 0.2]")
    parser.add_argument("--selection-seeds", type=int, nargs="+", default=[0, 1],
                        help="training seeds of the validation runs, whose accuracies are averaged [0 1]")
    parser.add_argument("--validation-data-seed", type=int, default=1042,
                        help="data seed of the fresh MNIST-1D sample used to choose rho [1042]")
    parser.add_argument("--track-curvature", type=int, default=10, help="epochs between curvature logs; 0 turns tracking off [10]")
    parser.add_argument("--certify-seed", type=int, default=0, help="seed whose runs get a certificate [0]")
    parser.add_argument("--no-certificates", action="store_true", help="skip the certificates")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each [2]")
    args = parser.parse_args(argv)
    if args.certify_seed not in args.seeds:
        parser.error(f"--certify-seed {args.certify_seed} is not among --seeds {args.seeds}; pass one of them")
    if args.epochs < 1 or args.jobs < 1 or args.track_curvature < 0:
        parser.error("--epochs and --jobs must be at least 1, and --track-curvature at least 0")
    return args


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "certify-one":
        certify_one(sys.argv[2], sys.argv[3])
        return 0
    args = parse_arguments(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.work_dir / "logs"

    selection = select_rho(args, log_dir)
    print(f"rho chosen on the validation sample: {json.dumps({m: {o: r['rho'] for o, r in p.items()} for m, p in selection.items()})}")
    cells = train_cells(args, selection, log_dir)
    certificates = None if args.no_certificates else certify_cells(args, cells, log_dir)
    study = {
        "command": "python benchmarks/reproduce_study.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_description(),
        "seconds": time.perf_counter() - started,
        "options": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "selection": selection,
        "summary": summarise(cells),
        "certificates": certificates,
    }
    (args.out / "study.json").write_text(json.dumps(study, indent=1))
    write_markdown(args, study, args.out / "study.md")
    write_plots(args, study, cells)
    print(f"wrote {args.out / 'study.md'}, study.json and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
