"""Time the Monte-Carlo step of ``crsam bound`` on MNIST-1D, as ratios within one run.

Usage::

    python benchmarks/bench_certificate.py            # about 2 to 4 minutes on 2 CPU cores
    python benchmarks/bench_certificate.py --quick    # fewer samples, under a minute
    python benchmarks/bench_certificate.py --tight    # the tight certificate, 1 to 3 minutes
    python benchmarks/bench_certificate.py --checkpoint runs/mlp/checkpoint.pt  # crsam bound

For the MNIST-1D MLP and 1-D CNN of ``crsam.models`` on the 4000 MNIST-1D training examples, it
prints:

1. Milliseconds per weight sample, on untrained weights, for each evaluation schedule: the
   ``vmap`` and ``loop`` schedules of ``crsam.certificate.count_errors`` and a plain baseline
   that copies each noisy weight vector into the model and evaluates it in mini-batches of 128
   examples. Each time is divided by the baseline's, and the line ends with the projected time
   of 10^4 samples.
2. Seconds for a full ``certify`` call at two numbers of Monte-Carlo samples, and the cost per
   extra sample from their difference. The network is trained for 5 epochs of Adam, and its
   initial weights are the prior centre. The call includes the default 25-value grid, the
   selection and certification samples and the test errors.

With ``--checkpoint PATH`` it times what ``crsam bound PATH`` computes instead: ``certify`` with
all bound families on the checkpoint's own training and test sets, at each Monte-Carlo sample
count of ``--mc-counts`` and on the first ``--example-counts`` training examples. Each line gives
the seconds of the sigma selection, of the certification samples and of the whole call. It also
gives the whole call in units of one deterministic pass of the network over the same train and
test examples (the best of 20, measured in the same run) and as a ratio to the first line.

With ``--tight`` it runs :func:`crsam.certificate.tight_certificate` on the 1-D CNN instead. It
generates ``--num-samples`` MNIST-1D examples (80 % for training) and trains the prior from seeded
initial weights with ``--prior-optimizer`` on half of the training set. The posterior is fitted
and certified on the other half, and its stochastic test error is measured on the test set. It
prints the seconds of each stage, the certificate table and the ratio of the certificate to the
stochastic test error.

The machine load is printed first: other processes on the same cores inflate every time, and the
ratios are measured back to back to limit that effect.
"""

from __future__ import annotations

import argparse
import os
import math
import time
import warnings

import torch

from crsam.certificate import (
    ParameterLayout,
    WeightSampler,
    certify,
    count_errors,
    format_certificate_table,
    tight_certificate,
)
from crsam.data import load_mnist1d
from crsam.models import build_model

PLAIN_BATCH_SIZE = 128


def plain_loop(model, weights, x, y):
    """Count errors the plain way: copy each weight vector into the model, then evaluate."""
    counts = []
    with torch.no_grad():
        for row in weights:
            torch.nn.utils.vector_to_parameters(row, model.parameters())
            errors = 0
            for start in range(0, x.shape[0], PLAIN_BATCH_SIZE):
                logits = model(x[start:start + PLAIN_BATCH_SIZE])
                errors += int((logits.argmax(dim=1) != y[start:start + PLAIN_BATCH_SIZE]).sum())
            counts.append(errors)
    return counts


def time_per_sample(run, num_samples, repeats):
    """Return the best of ``repeats`` timings of ``run()``, in milliseconds per weight sample."""
    run()  # warm-up: first calls pay for lazy initialization
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / num_samples


def bench_schedules(name, model, x, y, num_samples, repeats):
    """Print the per-sample time of each schedule and its ratio to the plain loop."""
    model.eval()
    layout = ParameterLayout.from_model(model)
    center = layout.flatten(dict(model.named_parameters()))
    weights = WeightSampler(center, 0.01, seed=0).draw(num_samples)
    original = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    schedules = {
        "plain loop, batches of 128": lambda: plain_loop(model, weights, x, y),
        "loop, batch 1000": lambda: count_errors(model, layout, weights, x, y, batch_size=1000,
                                                 method="loop"),
        "loop, batch 4000": lambda: count_errors(model, layout, weights, x, y, batch_size=4000,
                                                 method="loop"),
    }
    for sample_batch in (16, 32):
        def run_vmap(sample_batch=sample_batch):
            for start in range(0, num_samples, sample_batch):
                count_errors(model, layout, weights[start:start + sample_batch], x, y,
                             batch_size=1000, method="vmap")
        schedules[f"vmap, {sample_batch} samples x batch 1000"] = run_vmap

    times = {label: time_per_sample(run, num_samples, repeats) for label, run in schedules.items()}
    torch.nn.utils.vector_to_parameters(original, model.parameters())

    baseline = times["plain loop, batches of 128"]
    print(f"\n{name}: {layout.num_parameters} parameters, {x.shape[0]} examples, "
          f"{num_samples} weight samples, best of {repeats}")
    print(f"  {'schedule':<34} {'ms/sample':>10} {'vs plain':>9} {'10^4 samples':>13}")
    for label, milliseconds in times.items():
        print(f"  {label:<34} {milliseconds:>10.2f} {milliseconds / baseline:>9.2f} "
              f"{milliseconds * 10:>11.0f} s")


def train_briefly(model, data, epochs):
    """Train ``model`` with Adam for a few epochs, so that sigma selection scans several values.

    An untrained network errs at chance level already at the smallest sigma, and the selection
    scan would stop there.
    """
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(data.x_train.shape[0], generator=generator)
        for start in range(0, order.numel(), 128):
            batch = order[start:start + 128]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(data.x_train[batch]),
                                                     data.y_train[batch])
            loss.backward()
            optimizer.step()
    model.eval()


def bench_certify(name, model, data, sample_counts, selection_samples):
    """Print the time of full certificates of ``model`` at several Monte-Carlo sample counts.

    The prior centre is the model's weights on entry; the model is then trained briefly.
    """
    prior_state = {key: value.clone() for key, value in model.state_dict().items()}
    train_briefly(model, data, epochs=5)
    seconds = []
    for mc_samples in sample_counts:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an edge-of-grid warning is no concern here
            report = certify(model, prior_state, data.x_train, data.y_train, data.x_test,
                             data.y_test, mc_samples=mc_samples,
                             selection_samples=selection_samples)
        seconds.append(time.perf_counter() - start)
        evaluated = sum(c["evaluated"] for c in report["selection"]["candidates"])
        print(f"  {name} certify, {mc_samples:>5} samples (+ {evaluated} x {selection_samples} "
              f"selection, method {report['provenance']['method']}): {seconds[-1]:.1f} s; "
              f"sigma {report['sigma']:.3g}, kl bound {report['bounds'][0]['value']:.3f}, "
              f"stochastic test error "
              f"{report['posterior']['errors']['stochastic']['test']['mean']:.3f}")
    per_sample = (seconds[-1] - seconds[0]) / (sample_counts[-1] - sample_counts[0])
    projected = seconds[0] + per_sample * (10_000 - sample_counts[0])
    print(f"  {name} certify: {1e3 * per_sample:.2f} ms per extra sample (train and test), "
          f"10^4 samples projected at {projected:.0f} s")


def time_pass(model, x, y, repeats=20):
    """Return the best time in seconds of one evaluation of ``model`` at its weights on ``(x, y)``."""
    layout = ParameterLayout.from_model(model)
    center = layout.flatten(dict(model.named_parameters())).unsqueeze(0)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call pays for lazy initialization
        start = time.perf_counter()
        count_errors(model, layout, center, x, y, batch_size=1000, method="loop")
        best = min(best, time.perf_counter() - start)
    return best


def bench_checkpoint(args):
    """Print the time of ``crsam bound``'s certificate on a checkpoint at several sizes."""
    from crsam.certificate import BOUND_FAMILIES
    from crsam.train import restore_run

    run = restore_run(args.checkpoint)
    x_train, y_train = run.bound_data()
    x_test, y_test = run.data.x_test, run.data.y_test
    parameters = ParameterLayout.from_model(run.model).num_parameters
    print(f"checkpoint {args.checkpoint}: {run.checkpoint['config']['model']}, {parameters} "
          f"parameters, {x_train.shape[0]} training and {x_test.shape[0]} test examples")

    for examples in args.example_counts:
        x, y = x_train[:examples], y_train[:examples]
        floor = time_pass(run.model, torch.cat([x, x_test]), torch.cat([y, y_test]))
        print(f"\n{examples} training examples: one pass over train and test at w takes "
              f"{1e3 * floor:.1f} ms")
        print(f"  {'MC samples':>10} {'selection':>10} {'certification':>14} {'total':>9} "
              f"{'total / pass':>13} {'vs first row':>13}")
        first_total = None
        for mc_samples in args.mc_counts:
            stage_times = {}

            def progress(stage, done, total):
                # The last progress call of a stage marks its end.
                stage_times[stage] = time.perf_counter()

            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an edge-of-grid warning is no concern here
                certify(run.model, run.prior_state, x, y, x_test, y_test, mc_samples=mc_samples,
                        families=BOUND_FAMILIES, progress=progress)
            total = time.perf_counter() - start
            first_total = first_total or total
            selection = stage_times["selection"] - start
            certification = stage_times["certification"] - stage_times["selection"]
            print(f"  {mc_samples:>10} {selection:>9.1f}s {certification:>13.1f}s {total:>8.1f}s "
                  f"{total / floor:>13.0f} {total / first_total:>13.2f}")


def bench_tight(args):
    """Print the stage times and the table of one tight certificate of the MNIST-1D CNN."""
    started = time.perf_counter()
    data = load_mnist1d(num_samples=args.num_samples)
    generated = time.perf_counter() - started
    torch.manual_seed(0)
    model = build_model("cnn1d")
    init_state = {key: value.clone() for key, value in model.state_dict().items()}

    report = tight_certificate(
        model, init_state, data, prior_fraction=0.5, prior_epochs=args.prior_epochs,
        prior_lr=args.prior_lr, prior_optimizer=args.prior_optimizer,
        posterior_epochs=args.posterior_epochs,
        refit_epochs=args.refit_epochs, mc_samples=args.mc_samples, seed=0,
    )
    total = time.perf_counter() - started
    print(format_certificate_table(report))
    print()

    # Stage times; the certification stage is what is left of the certificate's runtime.
    prior_seconds = report["prior"]["training"]["seconds"]
    posterior_seconds = report["optimization"]["seconds"]
    certification_seconds = report["provenance"]["runtime_seconds"] - prior_seconds - posterior_seconds
    print(f"data generation {generated:.1f} s, prior training {prior_seconds:.1f} s, posterior fit "
          f"{posterior_seconds:.1f} s, certification and checks {certification_seconds:.1f} s, "
          f"total {total:.1f} s")
    stochastic_test = report["posterior"]["errors"]["stochastic"]["test"]["mean"]
    best = report["best_bound"]
    # Rounded up, as the table rounds bounds, so the printed value is still an upper bound.
    print(f"certificate {math.ceil(best['value'] * 1e4) / 1e4:.4f} ({best['name']}), stochastic test error "
          f"{stochastic_test:.4f}, ratio {best['value'] / stochastic_test:.2f}")


def _counts(text):
    """Parse comma-separated positive whole numbers."""
    values = [int(item) for item in text.split(",")]
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list whole numbers >= 1")
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--tight", action="store_true",
                        help="run the tight certificate of the 1-D CNN instead")
    parser.add_argument("--num-samples", type=int, default=50_000,
                        help="MNIST-1D examples to generate for --tight, 80 %% for training [50000]")
    parser.add_argument("--prior-optimizer", choices=("sgd", "sam", "crsam"), default="crsam",
                        help="optimizer of the prior for --tight [crsam]")
    parser.add_argument("--prior-epochs", type=int, default=20,
                        help="epochs of prior training for --tight [20]")
    parser.add_argument("--prior-lr", type=float, default=0.2,
                        help="initial learning rate of prior training for --tight, as 'crsam "
                             "train' uses for cnn1d [0.2]")
    parser.add_argument("--posterior-epochs", type=int, default=3,
                        help="epochs of the posterior fit with a learned prior scale [3]")
    parser.add_argument("--refit-epochs", type=int, default=2,
                        help="epochs of the posterior fit at the grid's prior scale [2]")
    parser.add_argument("--mc-samples", type=int, default=10,
                        help="rounds of per-example weight samples for --tight [10]")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="time crsam bound's certificate on this checkpoint instead")
    parser.add_argument("--mc-counts", type=_counts, default=[1000, 10_000], metavar="M1,M2",
                        help="Monte-Carlo sample counts for --checkpoint [1000,10000]")
    parser.add_argument("--example-counts", type=_counts, default=None, metavar="N1,N2",
                        help="first training examples to certify on for --checkpoint [all]")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.checkpoint is not None:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        if args.example_counts is None:
            from crsam.train import restore_run

            args.example_counts = [int(restore_run(args.checkpoint).bound_data()[1].shape[0])]
        bench_checkpoint(args)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        return
    if args.tight:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        bench_tight(args)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        return

    num_samples, repeats = (16, 1) if args.quick else (64, 3)
    sample_counts = (100, 300) if args.quick else (500, 2000)
    selection_samples = 8 if args.quick else 32

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    data = load_mnist1d()
    torch.manual_seed(0)
    models = {"mlp": build_model("mlp"), "cnn1d": build_model("cnn1d")}

    for name, model in models.items():
        bench_schedules(name, model, data.x_train, data.y_train, num_samples, repeats)
    print()
    for name, model in models.items():
        bench_certify(name, model, data, sample_counts, selection_samples)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
