"""The ``crsam`` command: train, bound, curvature and verify.

Every command prints a readable table, or with ``--json`` one JSON object on stdout in which NaN
and infinities are null. Exit status: 0 on success, 1 when a verification check fails, 2 on
invalid input, with a one-line ``crsam: error: ...`` message on stderr that names the value and
the fix.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import shlex
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from crsam import __version__
from crsam.errors import UsageError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other crsam error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


# ---------------------------------------------------------------------------- argument types


def _float(text: str) -> float:
    """Parse a real number; range checks happen where the option is used."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _float_list(text: str) -> list[float]:
    """Parse comma-separated real numbers; range checks happen where the option is used."""
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not a number") from None
    return values


def _int(text: str) -> int:
    """Parse a whole number; range checks happen where the option is used."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


# ---------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``crsam`` and its four commands."""
    parser = _Parser(prog="crsam", description="CR-SAM training, PAC-Bayes certificates and curvature measurements.")
    parser.add_argument("--version", action="version", version=f"crsam {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    _add_train_parser(commands)
    _add_bound_parser(commands)
    _add_curvature_parser(commands)
    _add_verify_parser(commands)
    return parser


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    # Every training option defaults to None, meaning "not passed": crsam.train fills in its
    # defaults, and --resume can tell a passed flag from a default.
    from crsam.train import DEFAULT_LR, DEFAULTS

    train = commands.add_parser(
        "train",
        help="train a model and write checkpoint.pt, config.json and metrics.jsonl to --out",
        description="Train a model with SGD, SAM or CR-SAM. Defaults are shown in brackets.",
    )
    data = train.add_argument_group("data")
    data.add_argument("--data", metavar="NAME",
                      help=f"data set: mnist1d, cifar10, cifar100 or imagefolder [{DEFAULTS['data']}]")
    data.add_argument("--data-dir", metavar="PATH",
                      help="folder with the CIFAR 'python version' archive or its extracted folder; for "
                      "imagefolder, the folder with train/ and val/ (or test/), each with one subfolder of "
                      "images per class (must exist; MNIST-1D is generated and does not read it)")
    data.add_argument("--image-size", type=_int, metavar="S",
                      help="imagefolder only: side in pixels of the square images, each cropped to its central "
                      "square and resized (bilinear); memory is N x 3 x S x S bytes [32]")
    data.add_argument("--num-samples", type=_int, metavar="N",
                      help="MNIST-1D examples to generate, a multiple of 10, split 80/20 into train and test [5000]")
    data.add_argument("--data-seed", type=_int, metavar="SEED",
                      help="seed that generates the MNIST-1D examples; another seed gives a fresh sample of the "
                      f"same distribution [{DEFAULTS['data_seed']}]")
    data.add_argument("--prior-split", type=_float, metavar="FRACTION",
                      help="fraction of the training set held out for a data-dependent prior, in (0, 1) [none]")
    data.add_argument("--cutout", type=_int, metavar="SIZE",
                      help="image data only: zero one random SIZE x SIZE square per training image (Cutout), "
                      "after the random crop with 4 pixels of padding and the horizontal flip [off]")

    model = train.add_argument_group("model")
    model.add_argument("--model", metavar="NAME",
                       help="mlp or cnn1d for MNIST-1D; resnet18, resnet50, wrn28_10 or vit for CIFAR and imagefolder "
                       f"[{DEFAULTS['model']}]")
    model.add_argument("--activation", metavar="NAME",
                       help="relu, gelu, tanh, softplus or silu [gelu for mlp, cnn1d and vit, relu for the ResNets]")
    model.add_argument("--width", type=_int, metavar="N",
                       help="channels of the first stage of resnet18 and resnet50, doubled in each later stage [64]")
    model.add_argument("--device", metavar="NAME",
                       help="cpu, cuda, or auto (cuda when torch finds a GPU, else cpu) [auto]")

    optim = train.add_argument_group("optimizer")
    optim.add_argument("--optimizer", metavar="NAME", help=f"sgd, sam or crsam, each with SGD as the base optimizer [{DEFAULTS['optimizer']}]")
    optim.add_argument("--rho", type=_float, help=f"perturbation radius of sam and crsam, >= 0 [{DEFAULTS['rho']}]")
    optim.add_argument("--alpha", type=_float, help=f"crsam's weight of the curvature term, >= 0 [{DEFAULTS['alpha']}]")
    optim.add_argument("--beta", type=_float, help=f"crsam's weight of the gradient-norm term, >= 0 [{DEFAULTS['beta']}]")
    default_lr = ", ".join(f"{lr} for {model}" for model, lr in DEFAULT_LR.items())
    optim.add_argument("--lr", type=_float,
                       help=f"initial learning rate, decayed by a cosine schedule [{default_lr}; vit has none]")
    optim.add_argument("--momentum", type=_float, help=f"SGD momentum in [0, 1) [{DEFAULTS['momentum']}]")
    optim.add_argument("--weight-decay", type=_float, help=f"SGD's L2 penalty, >= 0 [{DEFAULTS['weight_decay']}]")
    optim.add_argument("--batch-size", type=_int, metavar="N", help=f"examples per step [{DEFAULTS['batch_size']}]")
    optim.add_argument("--warmup-epochs", type=_int, metavar="N",
                       help="raise the learning rate linearly over the first N epochs, step by step, then decay "
                       "it by a cosine over the rest, stepped per step; 0 keeps the per-epoch cosine "
                       f"[{DEFAULTS['warmup_epochs']}]")
    optim.add_argument("--label-smoothing", type=_float, metavar="EPS",
                       help="train on targets (1 - EPS) one-hot + EPS uniform, in [0, 1); evaluation and "
                       f"curvature use the plain cross-entropy [{DEFAULTS['label_smoothing']}]")
    optim.add_argument("--compile", action="store_true", default=None,
                       help="run the training passes through torch.compile (slow to start, faster per step "
                       "on GPUs) [off]")
    optim.add_argument("--accumulation-steps", type=_int, metavar="K",
                       help="split each batch into K micro-batches and accumulate their gradients, which saves "
                       "memory and keeps the update of the whole batch (BatchNorm sees micro-batches) "
                       f"[{DEFAULTS['accumulation_steps']}]")
    optim.add_argument("--epochs", type=_int, metavar="N", help=f"passes over the training set [{DEFAULTS['epochs']}]")
    optim.add_argument("--seed", type=_int, help=f"seed of the initial weights and the data order [{DEFAULTS['seed']}]")
    optim.add_argument("--perturbation", metavar="KIND",
                       help="how sam and crsam perturb under torchrun: global along the averaged gradient "
                       "(two gradient all-reduces per step), local along each process's own gradient (one). "
                       "The two are the same in one process [global]")
    optim.add_argument("--parallel", action="store_true", default=None,
                       help="crsam only: compute the gradients at w + eps and w - eps in one batched pass "
                       "(torch.func.vmap); the same update as the sequential passes up to float rounding [off]")
    optim.add_argument("--clip-grad-norm", type=_float, metavar="MAX",
                       help="clip the final update direction (for sam and crsam, the combined gradient) to this "
                       "L2 norm over all parameters, > 0 [off]")
    optim.add_argument("--amp", metavar="DTYPE",
                       help="mixed precision: forward passes under autocast in bf16 or fp16 (fp16 with a "
                       "loss scaler); weights, gradients and evaluation stay float32 [off]")
    optim.add_argument("--track-curvature", type=_int, metavar="EPOCHS",
                       help="every EPOCHS epochs and at the last, log the Hessian trace with its standard error, "
                       "top eigenvalue, gradient norm and normalized trace of the mean cross-entropy (eval mode, "
                       "no weight decay) on fixed training and test subsets to metrics.jsonl [off]")
    optim.add_argument("--curvature-samples", type=_int, metavar="N",
                       help="examples in each fixed subset of --track-curvature, drawn once from --seed; "
                       f"a smaller split is used whole [{DEFAULTS['curvature_samples']}]")

    run = train.add_argument_group("run folder")
    run.add_argument("--out", metavar="DIR", required=True, help="folder for checkpoint.pt, config.json and metrics.jsonl")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a run that --out already contains")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    train.set_defaults(handler=_run_train)


def _add_bound_parser(commands: argparse._SubParsersAction) -> None:
    bound = commands.add_parser(
        "bound",
        help="print PAC-Bayes bounds on the expected error of the checkpoint's Gaussian posterior",
        description="Certify a checkpoint: PAC-Bayes bounds on the expected 0-1 error of a Gaussian "
        "posterior centred at its weights, all holding together with probability at least 1 - delta.",
    )
    bound.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt written by 'crsam train'")
    bound.add_argument("--delta", type=_float, default=0.05,
                       help="total failure probability in (0, 1), shared by all bounds and Monte-Carlo steps; "
                       "values so small that a share falls below 2.2e-308 are rejected [0.05]")
    bound.add_argument("--mc-samples", type=_int, metavar="N",
                       help="fresh weight samples for the Monte-Carlo estimate of the posterior's training error; "
                       "with --prior learned, rounds of fresh weights for every example "
                       f"[{_certificate_default('DEFAULT_MC_SAMPLES')}; {_certificate_default('DEFAULT_TIGHT_MC_SAMPLES')} with --prior learned]")
    bound.add_argument("--seed", type=_int, default=0, help="seed of the Monte-Carlo weight samples [0]")
    bound.add_argument("--prior", choices=("init", "learned"), default="init",
                       help="init: certify N(w, sigma^2 I) around the checkpoint's weights w against a prior at "
                       "the seeded initial weights. learned: train a prior from the initial weights on half of "
                       "the training set, fit a per-layer Gaussian posterior on the other half and certify that "
                       "posterior with n = the other half only; it certifies a network trained by the same "
                       "recipe, not the checkpoint's own weights (slower, far tighter) [init]")
    bound.add_argument("--sigma-grid", type=_float_list, metavar="S1,S2,...",
                       help="comma-separated scales, fixed before seeing the data: the posterior's "
                       "sigma candidates with --prior init, the prior's scale candidates with "
                       "--prior learned; each value costs confidence [the certificate's grid]")
    bound.add_argument("--prior-variance-c", type=_float, metavar="C",
                       help="scale c of the Dziugaite-Roy prior-variance grid c exp(-j / 100), "
                       f"above every grid variance [{_certificate_default('DEFAULT_PRIOR_VARIANCE_C')}]")
    bound.add_argument("--data-dir", metavar="PATH", help="folder with the data set's files, if it moved")
    bound.add_argument("--json", action="store_true", help="print one JSON object")
    bound.set_defaults(handler=_run_bound)


def _certificate_default(name: str) -> str:
    """Return a default of crsam.certificate for help text, or a placeholder while it is missing."""
    if importlib.util.find_spec("crsam.certificate") is None:
        return "the certificate's default"
    return str(getattr(importlib.import_module("crsam.certificate"), name, "the certificate's default"))


def _add_curvature_parser(commands: argparse._SubParsersAction) -> None:
    curvature = commands.add_parser(
        "curvature",
        help="print the Hessian trace, gradient norm, normalized trace and top eigenvalue of the loss",
        description="Measure the curvature of a checkpoint's mean cross-entropy (without weight decay, "
        "model in eval mode) on the training or test set.",
    )
    curvature.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt written by 'crsam train'")
    curvature.add_argument("--split", choices=("train", "test"), default="train", help="data set to measure on [train]")
    curvature.add_argument("--method", default="hutch++", metavar="NAME",
                           help="trace estimator: hutchinson, hutch++, xtrace, finite-difference or exact [hutch++]")
    curvature.add_argument("--probes", type=_int, metavar="N", help="random probe vectors of the trace estimator [the estimator's default]")
    curvature.add_argument("--batch-size", type=_int, metavar="N", help="examples per forward pass of a Hessian-vector product [the estimator's default]")
    curvature.add_argument("--seed", type=_int, default=0, help="seed of the probe vectors [0]")
    curvature.add_argument("--data-dir", metavar="PATH", help="folder with the data set's files, if it moved")
    curvature.add_argument("--json", action="store_true", help="print one JSON object")
    curvature.set_defaults(handler=_run_curvature)


def _add_verify_parser(commands: argparse._SubParsersAction) -> None:
    verify = commands.add_parser(
        "verify",
        help="compare every estimator with an exact computation; exit 1 when a check fails",
        description="Compare the gradient, Hessian-vector products, finite differences, the Hutchinson trace, "
        "the top eigenvalue and the CR-SAM gradient combination with exact float64 computations, on small "
        "built-in networks or on a checkpoint's model over its first training examples. The bounds' terms "
        "are checked against high-precision values by the test suite (python -m pytest).",
    )
    verify.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?", help="checkpoint.pt to check on [a small built-in model]")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(handler=_run_verify)


# ---------------------------------------------------------------------------- output


def format_json(report: dict[str, Any]) -> str:
    """Return ``report`` as standard JSON: non-finite floats as null, tensors as numbers or lists."""
    from crsam.checkpoint import json_safe

    return json.dumps(json_safe(report), indent=2, allow_nan=False)


def _print_report(report: dict[str, Any], table: str, as_json: bool) -> None:
    print(format_json(report) if as_json else table)


def _format_train_table(summary: dict[str, Any]) -> str:
    """Return a readable summary of a finished (or interrupted) training run."""
    config = summary["config"]
    final = summary["final"] or {}
    rows = [
        ("run", summary["out"]),
        ("model", f"{config['model']} ({config['activation']}), {summary['parameters']:,} parameters"),
        ("optimizer", _describe_optimizer(config)),
        ("data", _describe_data(config)),
        ("epochs", f"{summary['epochs_completed']} of {summary['epochs']}"),
    ]
    if final:
        rows += [
            ("train loss / acc", f"{final['train_loss']:.4f} / {final['train_acc']:.4f}  (at w)"),
            ("test loss / acc", f"{final['test_loss']:.4f} / {final['test_acc']:.4f}"),
        ]
    rows.append(("checkpoint", summary["checkpoint"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _describe_data(config: dict[str, Any]) -> str:
    if config["data"] == "mnist1d":
        return f"{config['data']}, {config.get('num_samples')} examples, seed {config.get('data_seed')}"
    if config["data"] == "imagefolder":
        return f"{config['data']} from {config.get('data_dir')}, {config.get('image_size')}x{config.get('image_size')} pixels"
    return f"{config['data']} from {config.get('data_dir')}"


def _describe_optimizer(config: dict[str, Any]) -> str:
    text = f"{config['optimizer']}, lr {config['lr']:g} (cosine), momentum {config['momentum']:g}, weight decay {config['weight_decay']:g}"
    if config["optimizer"] in ("sam", "crsam"):
        text += f", rho {config['rho']:g}"
    if config["optimizer"] == "crsam":
        text += f", alpha {config['alpha']:g}, beta {config['beta']:g}"
    return text


# ---------------------------------------------------------------------------- commands


def _run_train(args: argparse.Namespace) -> int:
    from crsam import distributed
    from crsam.train import DEFAULTS, train

    options = {name: getattr(args, name) for name in DEFAULTS}
    # Under torchrun every rank trains, and rank 0 alone prints the summary.
    try:
        distributed.read_torchrun_env()
    except ValueError as error:
        raise UsageError(str(error)) from None
    with distributed.process_group_from_env():
        summary = train(options, out=args.out, resume=args.resume, overwrite=args.overwrite)
        main_process = distributed.is_main_process()
    if not main_process:
        return EXIT_OK
    _print_report(summary, _format_train_table(summary), args.json)
    if summary["config"]["prior_split"] is not None:
        print("crsam: note: --prior-split reserved the examples for a prior, but the prior is still the "
              "initial weights because training a prior on them is not implemented", file=sys.stderr)
    return EXIT_OK


def _check_probability(flag: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise UsageError(f"{flag} {value} is outside (0, 1); pass a failure probability such as 0.05")


def _check_positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value} must be at least 1; pass a positive whole number")


def _check_sigma_grid(values: list[float] | None) -> None:
    from crsam.certificate.gaussian import SCALE_GRID_MAX, SCALE_GRID_MIN

    if values is None:
        return
    for value in values:
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--sigma-grid contains {value}, which is not a finite number > 0; pass positive scales such as 0.01,0.03,0.1")
        if not SCALE_GRID_MIN <= value <= SCALE_GRID_MAX:
            raise UsageError(
                f"--sigma-grid contains {value:g}, outside [{SCALE_GRID_MIN:g}, {SCALE_GRID_MAX:g}], where the KL "
                "term and the sampled float32 weights stay finite; pass scales such as 0.01,0.03,0.1"
            )
    if len(set(values)) != len(values):
        raise UsageError(f"--sigma-grid {','.join(f'{value:g}' for value in values)} repeats a value; each repeat costs confidence for nothing, so pass distinct values")


def _check_mc_samples(value: int | None, n: int, max_draws: int) -> None:
    # The estimate keeps running totals only, so memory does not limit --mc-samples. The limit is
    # exactness: samples x examples must stay within 2**53, the largest exact float64 count.
    # --prior learned uses fewer examples than n, so this check is conservative there.
    if value is not None and value * n > max_draws:
        raise UsageError(
            f"--mc-samples {value} is too large for {n} examples: {value} x {n} draws exceed "
            f"2**53; pass --mc-samples {max_draws // n} or less"
        )


def _check_seed(value: int) -> None:
    # torch.Generator.manual_seed takes seeds below 2**64, but the curvature code converts them to int64.
    if not 0 <= value < 2**63:
        raise UsageError(f"--seed {value} is outside [0, 2**63); pass a whole number such as 0")


def _import_helper(module: str, command: str):
    """Import ``module``, or raise UsageError saying that ``command`` is not available yet."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{command} is not available yet in crsam {__version__} (module {module} is missing)")
    return importlib.import_module(module)


def _run_bound(args: argparse.Namespace) -> int:
    # Check the flags before the slower work of loading the checkpoint and the data.
    _check_probability("--delta", args.delta)
    _check_positive("--mc-samples", args.mc_samples)
    _check_seed(args.seed)
    _check_sigma_grid(args.sigma_grid)
    if args.prior_variance_c is not None and not (math.isfinite(args.prior_variance_c) and args.prior_variance_c > 0):
        raise UsageError(f"--prior-variance-c {args.prior_variance_c} is not a finite number > 0; pass a scale such as 0.1")
    certificate = _import_helper("crsam.certificate", "'crsam bound'")
    from crsam.train import restore_run

    run = restore_run(args.checkpoint, data_dir=args.data_dir)
    x_bound, y_bound = run.bound_data()
    _check_mc_samples(args.mc_samples, int(y_bound.shape[0]), certificate.MAX_DRAWS)
    prior = run.checkpoint["prior"]
    options: dict[str, Any] = {
        "delta": args.delta,
        "seed": args.seed,
        "prior_info": {key: value for key, value in prior.items() if key != "state"},
    }
    if args.mc_samples is not None:
        options["mc_samples"] = args.mc_samples
    if args.prior_variance_c is not None:
        options["prior_variance_c"] = args.prior_variance_c
    if args.sigma_grid is not None:
        options["prior_sigma_grid" if args.prior == "learned" else "sigma_grid"] = args.sigma_grid

    # Progress of the Monte-Carlo weight samples on stderr, one bar per stage.
    with _StageProgress() as progress:
        if args.prior == "learned":
            options.pop("prior_info")
            report = _call_helper(certificate.tight_certificate_for_run, run, size_flags="--mc-samples",
                                  progress=progress, **options)
        else:
            report = _call_helper(
                certificate.certify,
                run.model, run.prior_state, x_bound, y_bound, run.data.x_test, run.data.y_test,
                size_flags="--mc-samples", progress=progress, families=certificate.BOUND_FAMILIES, **options,
            )
    report = {"checkpoint": str(run.path), **report}
    _print_report(report, certificate.format_certificate_table(report), args.json)
    return EXIT_OK


def _run_curvature(args: argparse.Namespace) -> int:
    _check_positive("--probes", args.probes)
    _check_positive("--batch-size", args.batch_size)
    _check_seed(args.seed)
    curvature = _import_helper("crsam.curvature", "'crsam curvature'")
    methods = getattr(curvature, "METHODS", ())
    if methods and args.method not in methods:
        raise UsageError(f"--method {args.method!r} is unknown; choose one of {', '.join(methods)}")
    from crsam.train import restore_run

    run = restore_run(args.checkpoint, data_dir=args.data_dir)
    if args.split == "train":
        inputs, targets = run.data.x_train, run.data.y_train
    else:
        inputs, targets = run.data.x_test, run.data.y_test
    options: dict[str, Any] = {"method": args.method, "seed": args.seed, "split": args.split}
    if args.probes is not None:
        options["probes"] = args.probes
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    report = _call_helper(curvature.curvature_report, run.model, inputs, targets,
                          size_flags="--probes or --batch-size", **options)
    report = {"checkpoint": str(run.path), **report}
    _print_report(report, curvature.format_curvature_table(report), args.json)
    return EXIT_OK


def _call_helper(function, *args: Any, size_flags: str | None = None, **kwargs: Any) -> Any:
    """Call a certificate or curvature function and return its report.

    A ValueError (an invalid argument) becomes a UsageError, so it exits with 2, and so does a
    failed memory allocation, with advice to lower ``size_flags``. Warnings are printed as one
    ``crsam: warning:`` line each, unless the report's ``warnings`` list already contains them
    (the table prints that list) or they are deprecation notices.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = function(*args, **kwargs)
        except UsageError:
            raise
        except ValueError as error:
            raise UsageError(str(error)) from None
        except (MemoryError, RuntimeError) as error:
            # torch reports a failed CPU allocation as RuntimeError "... can't allocate memory ...".
            if isinstance(error, RuntimeError) and "can't allocate memory" not in str(error):
                raise
            advice = f"pass a smaller {size_flags}" if size_flags else "free memory and run it again"
            raise UsageError(f"the computation ran out of memory; {advice}") from None
    reported = {str(text) for text in report.get("warnings", [])} if isinstance(report, dict) else set()
    for warning in caught:
        # Deprecation notices from libraries concern crsam's code, not the user's input.
        if issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue
        message = " ".join(str(warning.message).split())
        if message not in reported:
            print(f"crsam: warning: {message}", file=sys.stderr)
            reported.add(message)
    return report


class _StageProgress:
    """A ``progress(stage, done, total)`` callback that shows one tqdm bar per stage on stderr."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar = None

    def __enter__(self) -> _StageProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self._close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=f"{stage} samples", unit="sample", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_verify(args: argparse.Namespace) -> int:
    verification = _import_helper("crsam.verification", "'crsam verify'")
    if args.checkpoint is None:
        report = _call_helper(verification.run_checks)
    else:
        # Check the checkpoint's own model on the first training examples.
        from crsam.train import restore_run

        run = restore_run(args.checkpoint)
        report = _call_helper(verification.run_checks, run.model, (run.data.x_train, run.data.y_train))
        report = {"checkpoint": str(run.path), **report}
    failed = [check for check in report.get("checks", []) if check.get("passed") is False]
    _print_report(report, format_checks_table(report), args.json)
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def format_checks_table(report: dict[str, Any]) -> str:
    """Return the verification checks as a table: name, error, tolerance, result and reason."""
    header = ("check", "error", "tolerance", "result", "reason")
    rows = [header]
    for check in report.get("checks", []):
        passed = check.get("passed")
        if passed is None:
            result = "n/a"
        elif passed:
            result = "pass"
        else:
            result = "FAIL"
        rows.append((
            str(check.get("name", "")),
            _format_number(check.get("error")),
            _format_number(check.get("tolerance")),
            result,
            str(check.get("reason") or ""),
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    failed = sum(1 for check in report.get("checks", []) if check.get("passed") is False)
    count = len(rows) - 1
    lines.append(f"{count} check{'' if count == 1 else 's'}, {failed} failed")
    return "\n".join(line.rstrip() for line in lines)


def _format_number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# ---------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``crsam`` with ``argv`` (default: the process's arguments) and return the exit status."""
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        return args.handler(args)
    except UsageError as error:
        # One line, whatever the message: join the lines a wrapped library message may carry.
        message = " ".join(str(error).split())
        print(f"crsam: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as interruption:
        # crsam.train passes a message when the interrupted run left nothing to resume.
        command = getattr(args, "command", None)
        if str(interruption):
            advice = str(interruption)
        elif command == "train":
            out = shlex.quote(str(args.out)) if getattr(args, "out", None) else "DIR"
            advice = f"the training run continues with 'crsam train --out {out} --resume'"
        else:
            advice = "nothing was written; run the same command again"
        print(f"crsam: interrupted; {advice}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exit_request:
        # --help and --version exit through argparse; keep main's promise to return a status.
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
