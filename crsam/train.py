"""Training runs: options, the epoch loop, checkpoints each epoch, and exact resumption.

A run lives in one output folder with three files:

- ``config.json``: every resolved option, crsam's and torch's versions, the data set's hash.
- ``metrics.jsonl``: one JSON object per completed epoch (``epoch``, ``lr``, ``train_loss``,
  ``train_acc``, ``test_loss``, ``test_acc``, ``seconds``, and on the epochs that
  ``--track-curvature`` selects the ``curvature_*`` figures of ``crsam.tracking`` with
  ``curvature_seconds``, which ``seconds`` excludes).
- ``checkpoint.pt``: the state after the last completed epoch (see ``crsam.checkpoint``).

The training loss and accuracy are measured at the weights w, never at a perturbed point. After
each epoch's updates, a separate pass over the whole training set in eval mode evaluates the
model, exactly as the test set is evaluated. The metrics therefore describe the weights that the
checkpoint stores, not an average over the epoch's changing weights.

A resumed run restores the model, optimizer, scheduler, the global torch random state (and the
GPU's), the state of the generator that shuffles the training set and that of the generator of
the image augmentation. On the same machine and torch version it
therefore reproduces the uninterrupted run bit for bit, apart from ``seconds``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crsam import __version__, distributed
from crsam.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    json_safe,
    load_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from crsam.cifar import CIFAR_SPECS, OFFICIAL_SIZES, CifarData, load_cifar
from crsam.data import (
    DATA_CHOICES,
    MNIST1D_MAX_NUM_SAMPLES,
    Dataset,
    PriorSplit,
    check_data_dir,
    load_data,
    split_for_prior,
)
from crsam.errors import UsageError
from crsam.models import ACTIVATIONS, MODEL_CHOICES, build_model, count_parameters
from crsam.steps import StepRecipe, build_scaler, build_step_recipe, compile_model, make_closure, take_step
from crsam.tracking import (
    CURVATURE_BATCH_SIZE,
    CURVATURE_METHOD,
    CURVATURE_PROBES,
    DEFAULT_CURVATURE_SAMPLES,
    curvature_subset_indices,
    is_tracked_epoch,
    measure_curvature,
)
from crsam.imagefolder import DEFAULT_IMAGE_SIZE, ImageFolderData, load_imagefolder
from crsam.training_data import IMAGE_DATA_TYPES, TrainingData, cifar_as_float_dataset
from crsam.vision_models import VISION_MODEL_CHOICES, build_vision_model

OPTIMIZER_CHOICES = ("sgd", "sam", "crsam")
PERTURBATION_CHOICES = ("global", "local")
AMP_CHOICES = ("bf16", "fp16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
RUN_FILES = ("checkpoint.pt", "config.json", "metrics.jsonl")

# Defaults for MNIST-1D on a CPU. rho, alpha and beta are the defaults of the CR-SAM authors'
# released code. The learning rate and the activation (None here) depend on the model, see
# DEFAULT_LR and DEFAULT_ACTIVATION.
DEFAULTS: dict[str, Any] = {
    "data": "mnist1d",
    "data_dir": None,
    "image_size": None,
    "num_samples": None,
    "data_seed": 42,
    "model": "mlp",
    "activation": None,
    "width": None,
    "optimizer": "crsam",
    "rho": 0.1,
    "alpha": 0.1,
    "beta": 0.01,
    "lr": None,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 128,
    "accumulation_steps": 1,
    "epochs": 60,
    "warmup_epochs": 0,
    "label_smoothing": 0.0,
    "compile": False,
    "seed": 0,
    "prior_split": None,
    "cutout": None,
    "device": "auto",
    "perturbation": "global",
    "parallel": False,
    "clip_grad_norm": None,
    "amp": None,
    "track_curvature": None,
    "curvature_samples": DEFAULT_CURVATURE_SAMPLES,
}

# Initial learning rate per model. In a sweep over 0.05 to 2 (60 epochs, momentum 0.9, GELU,
# 1-2 seeds) the MLP's test accuracy on MNIST-1D peaked at 0.5. cnn1d fell to chance accuracy
# at 0.5 and did best at 0.2 of the rates 0.1, 0.2 and 0.5.
# The CIFAR networks take 0.1, the usual SGD rate for batches of 128 on CIFAR. The ViT has no
# default because SGD rates for it vary widely with the recipe.
DEFAULT_LR = {"mlp": 0.5, "cnn1d": 0.2, "resnet18": 0.1, "resnet50": 0.1, "wrn28_10": 0.1}

# Activation per model: smooth GELU for the MNIST-1D networks, whose Hessian the curvature code
# measures, and the architectures' standard choices for the CIFAR networks.
DEFAULT_ACTIVATION = {
    "mlp": "gelu", "cnn1d": "gelu", "resnet18": "relu", "resnet50": "relu", "wrn28_10": "relu", "vit": "gelu",
}

# Data sets and the models that read them: MNIST-1D sequences of length 40, or images with 3
# channels, 32x32 for CIFAR and --image-size a side for image folders.
SEQUENCE_DATA = ("mnist1d",)
SEQUENCE_MODELS = ("mlp", "cnn1d")
IMAGE_DATA = (*CIFAR_SPECS, "imagefolder")

# Side of the ViT's square patches, so its input side must be a multiple of it.
VIT_PATCH_SIZE = 4

# Models whose base channel count --width sets (64 in the standard networks).
WIDTH_MODELS = ("resnet18", "resnet50")

# Split sizes that a CIFAR folder must have; None accepts any, for small folders in tests.
CIFAR_SPLIT_SIZES: tuple[int, int] | None = OFFICIAL_SIZES

# Options that only some optimizers use; passing one to another optimizer is an error.
OPTIMIZER_OPTIONS = {"sgd": (), "sam": ("rho",), "crsam": ("rho", "alpha", "beta")}

# Options that a checkpoint's configuration must contain to rebuild its run; the rest have defaults.
STORED_REQUIRED_OPTIONS = (
    "data", "model", "activation", "optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs", "seed",
)

# Options that may differ between a run and its resumption because they do not change the result.
RESUME_FREE_OPTIONS = ("out", "data_dir", "device")

# The largest finite float32, the dtype of the models' weights.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# Examples per forward pass when evaluating; evaluation keeps no graph, so larger is fine.
EVAL_BATCH_SIZE = 1000


# ---------------------------------------------------------------------------- options


def resolve_options(explicit: dict[str, Any]) -> dict[str, Any]:
    """Merge the options a user passed (``explicit``, None meaning not passed) with ``DEFAULTS``.

    Returns the full configuration, checked: invalid values raise UsageError naming the flag,
    the value and the fix. Options that the chosen optimizer does not use are stored as None.
    """
    unknown = sorted(set(explicit) - set(DEFAULTS) - {"out"})
    if unknown:
        raise ValueError(f"unknown training options {unknown}; known: {sorted(DEFAULTS)}")
    passed = {key: value for key, value in explicit.items() if value is not None}
    config = {**DEFAULTS, **passed}

    # Options of other optimizers: an explicit one is a mistake, a default one is dropped.
    optimizer = config["optimizer"]
    if optimizer not in OPTIMIZER_CHOICES:
        raise UsageError(f"--optimizer {optimizer!r} is unknown; choose one of {', '.join(OPTIMIZER_CHOICES)}")
    for name in ("rho", "alpha", "beta"):
        if name in OPTIMIZER_OPTIONS[optimizer]:
            continue
        if name in passed:
            users = [opt for opt, names in OPTIMIZER_OPTIONS.items() if name in names]
            raise UsageError(
                f"--{name} {passed[name]} has no effect with --optimizer {optimizer}; "
                f"drop --{name} or pass --optimizer {' or '.join(users)}"
            )
        config[name] = None
    _drop_untracked_curvature_options(config, passed)

    if config["lr"] is None and config["model"] in DEFAULT_LR:
        config["lr"] = DEFAULT_LR[config["model"]]
    if config["activation"] is None and config["model"] in DEFAULT_ACTIVATION:
        config["activation"] = DEFAULT_ACTIVATION[config["model"]]
    check_options(config)
    if config["lr"] is None:
        raise UsageError(
            f"--model {config['model']} has no default learning rate; pass --lr, such as --lr 0.01"
        )
    if config["data"] == "mnist1d" and config["num_samples"] is None:
        config["num_samples"] = 5000
    if config["data"] == "imagefolder" and config["image_size"] is None:
        config["image_size"] = DEFAULT_IMAGE_SIZE
    return config


def _drop_untracked_curvature_options(config: dict[str, Any], passed: dict[str, Any]) -> None:
    """Store ``--curvature-samples`` as None without ``--track-curvature``, and reject it when passed alone."""
    if config["track_curvature"] is not None:
        return
    if "curvature_samples" in passed:
        raise UsageError(
            f"--curvature-samples {passed['curvature_samples']} has no effect without --track-curvature; "
            "drop it or pass --track-curvature EPOCHS"
        )
    config["curvature_samples"] = None


def check_options(config: dict[str, Any]) -> None:
    """Raise UsageError for the first option in ``config`` that is invalid or not available yet."""
    if config["optimizer"] not in OPTIMIZER_CHOICES:
        raise UsageError(
            f"--optimizer {config['optimizer']!r} is unknown; choose one of {', '.join(OPTIMIZER_CHOICES)}"
        )
    if config["data"] not in DATA_CHOICES:
        raise UsageError(f"--data {config['data']!r} is unknown; choose one of {', '.join(DATA_CHOICES)}")
    if config["model"] not in MODEL_CHOICES:
        raise UsageError(f"--model {config['model']!r} is unknown; choose one of {', '.join(MODEL_CHOICES)}")
    _check_model_fits_data(config)
    if config["activation"] not in ACTIVATIONS:
        raise UsageError(
            f"--activation {config['activation']!r} is unknown; choose one of {', '.join(ACTIVATIONS)}"
        )
    check_data_dir(config["data_dir"])
    _check_image_options(config)

    # Real-valued hyperparameters: finite, and each within its range.
    _check_real(config, "rho", minimum=0.0, example="0.1", value_description="a perturbation radius")
    _check_real(config, "alpha", minimum=0.0, example="0.1", value_description="a curvature weight")
    _check_real(config, "beta", minimum=0.0, example="0.01", value_description="a gradient-norm weight")
    _check_real(config, "lr", minimum=0.0, exclusive=True, example="0.1", value_description="a learning rate")
    _check_real(config, "momentum", minimum=0.0, maximum=1.0, example="0.9", value_description="a momentum")
    _check_real(config, "weight_decay", minimum=0.0, example="5e-4", value_description="an L2 penalty")
    _check_real(config, "label_smoothing", minimum=0.0, maximum=1.0, example="0.1",
                value_description="a label-smoothing weight")
    alpha, beta = config["alpha"], config["beta"]
    if alpha is not None and beta is not None and max(2.0 * alpha, 1.0 + alpha + beta) > FLOAT32_MAX:
        # CR-SAM scales float32 gradients by 2 alpha and 1 + alpha + beta.
        raise UsageError(
            f"--alpha {alpha} with --beta {beta} is too large: 2 alpha and 1 + alpha + beta must stay "
            f"below {FLOAT32_MAX:.3g}; pass weights such as --alpha 0.1 --beta 0.01"
        )

    # Counts.
    _check_count(config, "batch_size", minimum=1, example="128")
    _check_count(config, "accumulation_steps", minimum=1, example="2")
    if config["accumulation_steps"] > config["batch_size"]:
        raise UsageError(
            f"--accumulation-steps {config['accumulation_steps']} is larger than --batch-size {config['batch_size']}, "
            "so some micro-batches would be empty; pass at most the batch size, such as 2 or 4"
        )
    _check_count(config, "epochs", minimum=1, example="60")
    _check_count(config, "warmup_epochs", minimum=0, example="5")
    if config["warmup_epochs"] >= config["epochs"]:
        raise UsageError(
            f"--warmup-epochs {config['warmup_epochs']} leaves no epoch of the cosine decay in --epochs "
            f"{config['epochs']}; pass fewer warmup epochs than epochs, such as 5 of 200"
        )
    if not isinstance(config.get("compile", False), bool):
        raise UsageError(f"--compile {config['compile']!r} is not a flag; pass --compile or leave it out")
    _check_count(config, "seed", minimum=0, example="0")
    if config["num_samples"] is not None:
        if config["data"] != "mnist1d":
            raise UsageError(
                f"--num-samples applies to --data mnist1d only; drop it for --data {config['data']}"
            )
        _check_count(config, "num_samples", minimum=10, example="5000")
        if config["num_samples"] > MNIST1D_MAX_NUM_SAMPLES:
            raise UsageError(
                f"--num-samples {config['num_samples']} is above the limit of {MNIST1D_MAX_NUM_SAMPLES:,}; "
                "pass a whole number such as 5000"
            )
    _check_count(config, "data_seed", minimum=0, example="42")
    if config["data_seed"] >= 2**32:
        # mnist1d seeds NumPy's legacy generator, which takes seeds below 2**32.
        raise UsageError(f"--data-seed {config['data_seed']} is too large; pass a seed below 2**32, such as 42")
    if config["data_seed"] != DEFAULTS["data_seed"] and config["data"] != "mnist1d":
        raise UsageError(
            f"--data-seed applies to --data mnist1d only, which is generated; drop it for --data {config['data']}"
        )
    if config["seed"] >= 2**63:
        raise UsageError(f"--seed {config['seed']} is too large; pass a seed below 2**63")

    # Prior split: a fraction strictly inside (0, 1).
    prior_split = config["prior_split"]
    if prior_split is not None and not (math.isfinite(prior_split) and 0.0 < prior_split < 1.0):
        raise UsageError(
            f"--prior-split {prior_split} is outside (0, 1); pass the fraction of the training set "
            "to hold out for the prior, such as 0.5"
        )

    # Flags of later work: accepted by the parser, rejected here with the way forward.
    if config["perturbation"] not in PERTURBATION_CHOICES:
        raise UsageError(
            f"--perturbation {config['perturbation']!r} is unknown; choose one of {', '.join(PERTURBATION_CHOICES)}"
        )
    if config["perturbation"] == "local" and config["optimizer"] == "sgd":
        raise UsageError(
            "--perturbation local has no effect with --optimizer sgd, which does not perturb; "
            "drop --perturbation or pass --optimizer sam or crsam"
        )
    _check_parallel_options(config)
    _check_real(config, "clip_grad_norm", minimum=0.0, exclusive=True, example="1.0",
                value_description="a maximum gradient norm")
    if config["amp"] is not None and config["amp"] not in AMP_CHOICES:
        raise UsageError(
            f"--amp {config['amp']!r} is unknown; choose one of {', '.join(AMP_CHOICES)}, or drop --amp to train in float32"
        )
    _check_curvature_options(config)


def _check_model_fits_data(config: dict[str, Any]) -> None:
    """Raise UsageError when ``--model`` cannot read the inputs of ``--data``, naming the fix."""
    data, model = config["data"], config["model"]
    if data in SEQUENCE_DATA and model not in SEQUENCE_MODELS:
        raise UsageError(
            f"--model {model} takes 3x32x32 images, but --data {data} has sequences of length 40; "
            f"pass --model {' or '.join(SEQUENCE_MODELS)}, or --data {', '.join(IMAGE_DATA[:-1])} or {IMAGE_DATA[-1]} "
            "with --data-dir"
        )
    if data in IMAGE_DATA and model not in VISION_MODEL_CHOICES:
        raise UsageError(
            f"--model {model} takes MNIST-1D sequences, not the images of --data {data}; "
            f"pass --model {', '.join(VISION_MODEL_CHOICES)}"
        )


def _check_image_options(config: dict[str, Any]) -> None:
    """Raise UsageError for an invalid ``--image-size``, ``--cutout``, ``--width`` or ``--device``."""
    if config.get("image_size") is not None:
        if config["data"] != "imagefolder":
            raise UsageError(
                f"--image-size applies to --data imagefolder only; drop it for --data {config['data']}"
            )
        _check_count(config, "image_size", minimum=1, example="32")
        if config["model"] == "vit" and config["image_size"] % VIT_PATCH_SIZE != 0:
            raise UsageError(
                f"--image-size {config['image_size']} is not a multiple of the ViT's {VIT_PATCH_SIZE}-pixel patches; "
                "pass a size such as 32 or 64"
            )
    if config.get("cutout") is not None:
        if config["data"] not in IMAGE_DATA:
            raise UsageError(f"--cutout applies to image data only; drop it for --data {config['data']}")
        _check_count(config, "cutout", minimum=1, example="16")
        side = config.get("image_size") or 32
        if config["cutout"] > side:
            raise UsageError(
                f"--cutout {config['cutout']} is larger than the {side}-pixel images; pass a side such as {side // 2}"
            )
    if config.get("width") is not None:
        if config["model"] not in WIDTH_MODELS:
            raise UsageError(
                f"--width applies to --model {' and '.join(WIDTH_MODELS)} only; drop it for --model {config['model']}"
            )
        _check_count(config, "width", minimum=1, example="64")
    if config.get("device", "auto") not in DEVICE_CHOICES:
        raise UsageError(f"--device {config['device']!r} is unknown; choose one of {', '.join(DEVICE_CHOICES)}")


def resolve_device(name: str) -> torch.device:
    """Return the torch device that ``--device`` names; ``auto`` is CUDA when it is available.

    NOTE: the test suite runs on CPUs only, so the CUDA paths are untested: data and model
    placement, the CUDA random state in checkpoints and GradScaler on "cuda".
    benchmarks/gpu_check.sh exercises the training step on a GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was passed, but torch finds no CUDA device (torch.cuda.is_available() is False); "
            "pass --device cpu, or install a CUDA build of torch on a machine with a GPU"
        )
    return torch.device(name)


def run_device(name: str) -> torch.device:
    """Return the device this process trains on: the one ``--device`` names, or this rank's under torchrun.

    In a process group, :func:`crsam.distributed.wrap_model` moves the model to the device that
    :func:`crsam.distributed.process_group_from_env` picked (``cuda:LOCAL_RANK`` when CUDA is
    available, else the CPU), so the data must go there as well. Raises UsageError when
    ``--device`` names another device type, which would leave the model and the data apart.
    """
    device = resolve_device(name)
    if not distributed.has_process_group():
        return device
    rank_device = distributed.training_device()
    if device.type != rank_device.type:
        raise UsageError(
            f"--device {name} selects the {device.type}, but under torchrun this rank trains on {rank_device} "
            "(CUDA ranks when torch finds a GPU, CPU ranks otherwise); pass --device auto, or to train on "
            "the CPU on a machine with GPUs, start torchrun with CUDA_VISIBLE_DEVICES set to an empty string"
        )
    return rank_device


def _check_parallel_options(config: dict[str, Any]) -> None:
    """Raise UsageError when ``--parallel`` is combined with an option its batched passes lack."""
    if not config["parallel"]:
        return
    if config["optimizer"] != "crsam":
        raise UsageError(
            f"--parallel applies to --optimizer crsam only, whose two perturbed passes it batches; "
            f"drop --parallel for --optimizer {config['optimizer']}"
        )
    conflicts = [
        ((config.get("accumulation_steps") or 1) > 1, "--accumulation-steps"),
        (config.get("amp") is not None, "--amp"),
        (bool(config.get("compile")), "--compile"),
    ]
    for present, flag in conflicts:
        if present:
            # The batched passes call the model through torch.func.functional_call under vmap, on
            # the whole batch in float32, so micro-batches, autocast and compiled modules are not
            # part of them.
            raise UsageError(
                f"--parallel cannot be combined with {flag}, because the batched passes run the whole "
                f"batch in float32 through torch.func; drop {flag} or drop --parallel"
            )


def _check_curvature_options(config: dict[str, Any]) -> None:
    """Raise UsageError unless ``--track-curvature`` and ``--curvature-samples`` are None or counts >= 1."""
    if config["track_curvature"] is not None:
        _check_count(config, "track_curvature", minimum=1, example="10")
    if config.get("curvature_samples") is not None:
        _check_count(config, "curvature_samples", minimum=1, example=str(DEFAULT_CURVATURE_SAMPLES))


def _check_real(
    config: dict[str, Any],
    name: str,
    *,
    minimum: float,
    example: str,
    value_description: str,
    maximum: float | None = None,
    exclusive: bool = False,
) -> None:
    """Raise UsageError unless ``config[name]`` is None or a finite number in the allowed range."""
    value = config[name]
    if value is None:
        return
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{flag} {value!r} is not a finite number; pass {value_description} such as {example}")
    if abs(value) > FLOAT32_MAX:
        # The optimizers pass these values to float32 tensor operations, which reject them.
        raise UsageError(
            f"{flag} {value} is too large for float32 weights (max {FLOAT32_MAX:.3g}); "
            f"pass {value_description} such as {example}"
        )
    if exclusive and value <= minimum:
        raise UsageError(f"{flag} {value} must be greater than {minimum:g}; pass {value_description} such as {example}")
    if value < minimum:
        raise UsageError(f"{flag} {value} is negative; pass {value_description} >= {minimum:g} such as {example}")
    if maximum is not None and value >= maximum:
        raise UsageError(f"{flag} {value} must be below {maximum:g}; pass {value_description} such as {example}")


def _check_count(config: dict[str, Any], name: str, *, minimum: int, example: str) -> None:
    """Raise UsageError unless ``config[name]`` is an integer of at least ``minimum``."""
    value = config[name]
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{flag} {value!r} is not an integer; pass a whole number such as {example}")
    if value < minimum:
        raise UsageError(f"{flag} {value} is below {minimum}; pass a whole number such as {example}")


# ---------------------------------------------------------------------------- building blocks


def build_optimizer(config: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer that ``config`` names, with SGD as the base optimizer of SAM and CR-SAM."""
    sgd_options = {"lr": config["lr"], "momentum": config["momentum"], "weight_decay": config["weight_decay"]}
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd_options)

    # Imported here so that a run with plain SGD does not need the sharpness-aware module.
    from crsam.optim import CRSAM, SAM

    # "local" perturbs each DDP process by its own gradient. In one process the gradient at w is
    # the batch's whole gradient either way, so both values give the same update.
    perturbation = config.get("perturbation") or "global"
    # Clipping of the final combined update direction; plain SGD clips in crsam.steps.take_step.
    max_grad_norm = config.get("clip_grad_norm")
    if config["optimizer"] == "sam":
        return SAM(
            model.parameters(), torch.optim.SGD, rho=config["rho"], model=model, perturbation=perturbation,
            max_grad_norm=max_grad_norm, **sgd_options,
        )
    return CRSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=config["rho"],
        alpha=config["alpha"],
        beta=config["beta"],
        model=model,
        perturbation=perturbation,
        max_grad_norm=max_grad_norm,
        **sgd_options,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    *,
    warmup_epochs: int = 0,
    steps_per_epoch: int = 1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Return the learning-rate schedule: cosine decay, after a linear warmup when ``warmup_epochs`` > 0.

    Without warmup the cosine runs from the initial rate towards 0 over ``epochs`` and is stepped
    per epoch. With warmup the schedule is stepped per optimizer step, with the factor
    :func:`warmup_cosine_factor` of the initial rate.
    """
    if warmup_epochs == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    warmup_steps = warmup_epochs * steps_per_epoch
    total_steps = epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps=warmup_steps, total_steps=total_steps)
    )


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Return the learning rate of optimizer step ``step`` (counted from 0) over the initial rate.

    The first ``warmup_steps`` steps rise linearly, (step + 1) / warmup_steps, up to 1. The
    remaining T = total_steps - warmup_steps steps follow the cosine (1 + cos(pi t / T)) / 2 with
    t = step - warmup_steps, from 1 towards 0 (its last value is (1 + cos(pi (T - 1) / T)) / 2 > 0).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_per_step(config: dict[str, Any]) -> bool:
    """Return whether the run's schedule is stepped after every optimizer step (with warmup)."""
    return bool(config.get("warmup_epochs"))


def _build_run_scheduler(
    config: dict[str, Any], optimizer: torch.optim.Optimizer, num_train: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Build the schedule of a run's ``config`` for ``num_train`` training examples."""
    return build_scheduler(
        optimizer,
        config["epochs"],
        warmup_epochs=config.get("warmup_epochs") or 0,
        steps_per_epoch=math.ceil(num_train / config["batch_size"]),
    )


def describe_schedule(config: dict[str, Any]) -> str:
    """Return a one-line description of the run's learning-rate schedule, for ``config.json``."""
    if schedule_per_step(config):
        return f"linear warmup over {config['warmup_epochs']} epochs, then cosine, stepped per step"
    return "cosine, stepped per epoch"


def build_run_model(config: dict[str, Any], data: Dataset | CifarData | ImageFolderData) -> nn.Module:
    """Build the model ``config`` names, sized for ``data``'s inputs and classes, on the CPU."""
    if config["model"] in VISION_MODEL_CHOICES:
        options = {} if config.get("width") is None else {"width": config["width"]}
        if config["model"] == "vit" and config.get("image_size") is not None:
            # The ViT's position embeddings fix its input size, while the convolutional models pool globally.
            options["image_size"] = config["image_size"]
        return build_vision_model(
            config["model"], num_classes=data.num_classes, activation=config["activation"], **options
        )
    return build_model(
        config["model"],
        activation=config["activation"],
        num_classes=data.num_classes,
        input_length=data.input_length,
    )


def load_run_data(
    config: dict[str, Any], *, data_dir: str | os.PathLike | None = None
) -> Dataset | CifarData | ImageFolderData:
    """Load the data set of a run's ``config``; ``data_dir`` overrides the folder it names.

    CIFAR comes back as ``CifarData`` and image folders as ``ImageFolderData``, both with uint8
    images, and MNIST-1D as a float ``Dataset``.
    """
    stored_dir = config.get("data_dir")
    if config["data"] == "mnist1d":
        # MNIST-1D is generated in memory, so a stored folder that has since moved does not matter.
        stored_dir = None
    if data_dir is None and stored_dir is not None and not os.path.isdir(stored_dir):
        raise UsageError(
            f"the run's data folder {stored_dir!r} is not an existing folder; "
            "pass --data-dir with the folder's current place"
        )
    if config["data"] == "imagefolder":
        image_size = config.get("image_size") or DEFAULT_IMAGE_SIZE
        return load_imagefolder(stored_dir if data_dir is None else data_dir, image_size=image_size)
    if config["data"] in IMAGE_DATA:
        return load_cifar(config["data"], stored_dir if data_dir is None else data_dir, expected_sizes=CIFAR_SPLIT_SIZES)
    return load_data(
        config["data"],
        data_dir=stored_dir if data_dir is None else data_dir,
        num_samples=config.get("num_samples"),
        seed=config.get("data_seed", DEFAULTS["data_seed"]),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Return the mean cross-entropy and the accuracy of ``model`` on the data, in eval mode.

    ``transform`` turns each chunk of stored inputs into model inputs (CIFAR normalizes uint8
    images). The model's previous train/eval mode is restored afterwards. Under torchrun every
    rank evaluates its share of the batches and the sums are added over the ranks, so each rank
    returns the one-process figures (up to the order of the float64 additions).
    """
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    device = next(model.parameters()).device
    try:
        for start in distributed.eval_batch_starts(len(targets), EVAL_BATCH_SIZE):
            x = inputs[start : start + EVAL_BATCH_SIZE].to(device)
            y = targets[start : start + EVAL_BATCH_SIZE].to(device)
            if transform is not None:
                x = transform(x)
            logits = model(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)

    # --- distributed: add the ranks' sums (no-op in one process).
    sums = torch.tensor([total_loss, correct], dtype=torch.float64, device=device)
    total_loss, correct = distributed.all_reduce_sum(sums).tolist()
    count = max(len(targets), 1)
    return total_loss / count, correct / count


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainingData,
    *,
    batch_size: int,
    generator: torch.Generator,
    epoch: int,
    augmentation: torch.Generator | None = None,
    recipe: StepRecipe | None = None,
    step_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """Run one pass over the training set in an order drawn from ``generator``.

    ``augmentation`` supplies the random draws of image augmentation, ``recipe`` sets mixed
    precision, micro-batches and label smoothing (default: float32, one pass per batch), and
    ``step_scheduler``, when given, is stepped after every optimizer step. ``model`` may be the
    compiled form of the run's model. Under torchrun each rank trains on its share of every
    global batch of ``batch_size`` examples (see :class:`crsam.distributed.ShardedBatchSampler`).

    Every optimizer is driven through ``step(closure)``, the torch convention that SAM and CR-SAM
    need. Raises UsageError when a loss becomes NaN or infinite, naming the epoch and the flags to
    lower.
    """
    from crsam.optim import NonFiniteLossError

    if recipe is None:
        recipe = StepRecipe(device_type=data.device.type)
    model.train()
    # --- distributed: each rank takes its share of every global batch, drawn in the same order.
    sampler = distributed.ShardedBatchSampler(data.num_train, batch_size, generator=generator)
    for step, batch in enumerate(sampler, start=1):
        x, y = data.training_batch(batch.global_indices, augmentation, share=batch.share)
        closure = make_closure(model, optimizer, x, y, recipe, loss_weight=batch.loss_weight)
        try:
            loss = take_step(optimizer, closure, recipe)
        except NonFiniteLossError as error:
            raise UsageError(f"training diverged in epoch {epoch}, step {step}: {error}") from None
        if not torch.isfinite(loss):
            raise UsageError(
                f"training diverged in epoch {epoch}, step {step}: the loss is {float(loss.detach())}; "
                "lower --lr and train again"
            )
        if step_scheduler is not None:
            step_scheduler.step()


def curvature_splits(config: dict[str, Any], data: TrainingData) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return the fixed training and test subsets that ``--track-curvature`` measures on, as model inputs."""
    splits = {}
    for split, (inputs, targets) in {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}.items():
        indices = curvature_subset_indices(len(targets), config["curvature_samples"], seed=config["seed"], split=split)
        indices = indices.to(inputs.device)
        splits[split] = (data.model_inputs(inputs[indices]), targets[indices])
    return splits


def describe_curvature_tracking(config: dict[str, Any]) -> dict[str, Any] | None:
    """Return how tracked epochs measure curvature, for ``config.json``, or None without tracking."""
    if config["track_curvature"] is None:
        return None
    return {
        "every_epochs": config["track_curvature"],
        "examples_per_split": config["curvature_samples"],
        "method": CURVATURE_METHOD,
        "probes": CURVATURE_PROBES,
        "batch_size": CURVATURE_BATCH_SIZE,
        "loss": "mean cross-entropy, no weight decay, eval mode",
    }


# ---------------------------------------------------------------------------- the run


@dataclass
class NewRunFiles:
    """A new run's folder changes, made only once its first epoch has succeeded.

    Until then the folder contains nothing of the new run. An invalid option found late, a
    diverging first epoch or Ctrl-C therefore leaves the folder and an earlier run in it
    (``replaced``) as they were.
    """

    config_record: dict[str, Any]
    replaced: list[str]
    created_folders: list[Path]
    written: list[Path] = field(default_factory=list)


@dataclass
class RunState:
    """Everything that changes during a run and goes into its checkpoint."""

    config: dict[str, Any]
    data: Dataset | CifarData | ImageFolderData
    device_data: TrainingData
    model: nn.Module
    # The module the training passes call: ``model``, wrapped in DistributedDataParallel under
    # torchrun and then in torch.compile with --compile. ``model`` itself is never wrapped, so
    # the checkpoint's keys have no "module." prefix.
    training_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_order: torch.Generator
    # Generator of the augmentation's random draws (crop offsets, flips, Cutout squares), on the CPU.
    augmentation: torch.Generator
    # Loss scaler of --amp fp16, else None.
    scaler: torch.amp.GradScaler | None
    prior: dict[str, Any]
    metrics: list[dict[str, Any]]
    epoch: int
    # Set for a new run until its first checkpoint is written, then None.
    new_run: NewRunFiles | None = None
    def checkpoint(self) -> dict[str, Any]:
        """Return the checkpoint payload of the current state (plain data, see crsam.checkpoint)."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "crsam_version": __version__,
            "epoch": self.epoch,
            "config": self.config,
            "data": self.data.describe(),
            "model": to_cpu(self.model.state_dict()),
            "prior": self.prior,
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "metrics": self.metrics,
            "rng": self.random_states(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }

    @property
    def recipe(self) -> StepRecipe:
        """The step settings of this run (mixed precision and its loss scaler)."""
        return build_step_recipe(self.config, self.device_data.device, self.scaler)

    def random_states(self) -> dict[str, torch.Tensor]:
        """Return the states of every generator the run draws from, as uint8 tensors."""
        states = {
            "torch": torch.get_rng_state(),
            "data_order": self.data_order.get_state(),
            "augmentation": self.augmentation.get_state(),
        }
        if self.device_data.device.type == "cuda":
            # Dropout on the GPU draws from the device's generator.
            states["cuda"] = torch.cuda.get_rng_state(self.device_data.device)
        return states


def to_cpu(value: Any) -> Any:
    """Return ``value`` with every tensor in its dicts, lists and tuples copied to the CPU.

    Checkpoints hold CPU tensors so that a machine without the training device can read them.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def augmentation_seed(seed: int) -> int:
    """Return the seed of a run's augmentation generator, a stream apart from the data order's."""
    # torch.Generator takes seeds below 2**64, and run seeds are below 2**63.
    return (seed + 2**63) % 2**64


def train(
    options: dict[str, Any],
    *,
    out: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Train the run that ``options`` describe into the folder ``out`` and return a summary.

    ``options`` are the flags the user passed (None for not passed). A new run rejects a folder
    that already contains run files unless ``overwrite`` is set. ``resume`` continues the run in
    ``out`` from its checkpoint with the options stored there, and a differing option is an error.
    ``stop_after_epoch`` ends the call after that epoch, as an interruption would, so that tests
    can resume from it.

    A new run writes nothing until its first epoch has succeeded. If it fails or is interrupted
    before that, the folders it created are removed and a run that ``overwrite`` would replace is
    kept.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")
    if not os.fspath(out):
        raise UsageError("--out is empty; pass a folder for the run's files, such as runs/mlp")
    out = Path(out)
    nothing_written = f"no epoch had completed, so nothing was written to {str(out)!r}; run the same command again"
    if resume:
        state = _resume_state(options, out)
    else:
        try:
            state = _new_state(options, out, overwrite=overwrite)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(nothing_written) from None

    # One progress bar over epochs on stderr, so stdout stays clean for --json.
    from tqdm import tqdm

    epochs = state.config["epochs"]
    # Without an explicit disable, tqdm lets the TQDM_DISABLE=1 environment variable hide the bar.
    hide = {} if progress and distributed.is_main_process() else {"disable": True}
    bar = tqdm(total=epochs, initial=state.epoch, unit="epoch", file=sys.stderr,
               desc=f"{state.config['optimizer']} {state.config['model']}", **hide)
    try:
        while state.epoch < epochs:
            if stop_after_epoch is not None and state.epoch >= stop_after_epoch:
                break
            record = _run_epoch(state)
            bar.update(1)
            bar.set_postfix(train_loss=f"{record['train_loss']:.3f}", test_acc=f"{record['test_acc']:.3f}")
    except BaseException as error:
        # Clear the bar on close, so that crsam's one-line message is all that stays on stderr.
        bar.leave = False
        # Covers KeyboardInterrupt: a new run that never finished an epoch leaves nothing behind.
        if state.new_run is None:
            raise
        _discard_new_run(state.new_run)
        if isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt(nothing_written) from None
        raise
    finally:
        bar.close()
    if state.new_run is not None:
        # stop_after_epoch=0 ends a new run before its first epoch.
        _discard_new_run(state.new_run)

    return {
        "out": str(out),
        "checkpoint": str(out / "checkpoint.pt"),
        "epochs_completed": state.epoch,
        "epochs": epochs,
        "parameters": count_parameters(state.model),
        "final": state.metrics[-1] if state.metrics else None,
        "config": state.config,
    }


def _run_epoch(state: RunState) -> dict[str, Any]:
    """Train one epoch, measure it, and write the metrics and the checkpoint; return the metrics."""
    started = time.perf_counter()
    epoch = state.epoch + 1
    lr = float(state.optimizer.param_groups[0]["lr"])

    # Updates, then the schedule's next learning rate.
    per_step = schedule_per_step(state.config)
    train_one_epoch(
        state.training_model,
        state.optimizer,
        state.device_data,
        batch_size=state.config["batch_size"],
        generator=state.data_order,
        epoch=epoch,
        augmentation=state.augmentation,
        recipe=state.recipe,
        step_scheduler=state.scheduler if per_step else None,
    )
    if not per_step:
        state.scheduler.step()

    # Metrics at the weights w that the checkpoint will store. The BatchNorm running statistics
    # differ per rank after DDP training, and the checkpoint stores rank 0's, so every rank takes those.
    distributed.broadcast_buffers(state.model)
    data = state.device_data
    train_loss, train_acc = evaluate(state.model, data.x_train, data.y_train, transform=data.input_transform)
    test_loss, test_acc = evaluate(state.model, data.x_test, data.y_test, transform=data.input_transform)
    if not math.isfinite(train_loss):
        raise UsageError(f"training diverged in epoch {epoch}: the training loss is {train_loss}; lower --lr")
    record = {
        "epoch": epoch,
        "lr": lr,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "seconds": time.perf_counter() - started,
    }
    if is_tracked_epoch(epoch, every=state.config["track_curvature"], epochs=state.config["epochs"]):
        # Measured after "seconds", which stays the time of training and evaluation alone.
        record.update(
            measure_curvature(state.model, curvature_splits(state.config, state.device_data), seed=state.config["seed"], epoch=epoch)
        )

    # Metrics first, then the checkpoint: a crash in between leaves metrics.jsonl one epoch
    # ahead, and resuming rewrites it from the checkpoint's list.
    state.metrics.append(record)
    state.epoch = epoch
    out = Path(state.config["out"])
    try:
        # --- distributed: rank 0 alone writes; the others wait at the barrier below.
        if state.new_run is not None and distributed.is_main_process():
            _start_run_files(state.new_run, out)
            # Listed before they exist, so that an interruption during a write still removes them.
            state.new_run.written += [out / "metrics.jsonl", out / "checkpoint.pt"]
        if distributed.is_main_process():
            _write_metrics(state.metrics, out)
            save_checkpoint(state.checkpoint(), out / "checkpoint.pt")
    except OSError as error:
        raise UsageError(
            f"writing the run files in {str(out)!r} failed ({error.strerror or error}); "
            "free disk space or pass another --out"
        ) from None
    distributed.barrier()
    state.new_run = None
    return record


def _new_state(options: dict[str, Any], out: Path, *, overwrite: bool) -> RunState:
    """Check the options and the folder, then build a fresh run seeded from ``--seed``.

    Nothing is written here; the folder is created last, after every check has passed.
    """
    config = resolve_options({key: value for key, value in options.items() if key != "out"})
    existing = _check_folder(out, overwrite=overwrite)
    config["out"] = str(out)

    # Data first: it does not touch torch's random state, so the weights depend on the seed alone.
    device = run_device(config["device"])
    data = load_run_data(config)
    if isinstance(data, Dataset):
        config["data_seed"] = data.generation["seed"]
    split = split_for_prior(len(data.y_train), config["prior_split"], seed=config["seed"]) if config["prior_split"] else None

    # Seeded initial weights, built on the CPU so that every device starts from the same ones.
    # They are also the prior centre.
    torch.manual_seed(config["seed"])
    model = build_run_model(config, data)
    prior = _describe_prior(model, seed=config["seed"], split=split)
    model.to(device)
    # --- distributed: the DDP wrapper trains; the checkpoint stores the unwrapped model.
    wrapped = distributed.wrap_model(model)
    optimizer = build_optimizer(config, wrapped)
    scheduler = _build_run_scheduler(config, optimizer, len(data.y_train))
    data_order = torch.Generator().manual_seed(config["seed"])
    augmentation = torch.Generator().manual_seed(augmentation_seed(config["seed"]))
    if device.type == "cuda":
        torch.cuda.manual_seed(config["seed"])
    device_data = TrainingData(data, device=device, cutout=config["cutout"])
    scaler = build_scaler(config["amp"], device)

    # The configuration file records the resolved options and the provenance of the run.
    config_record = {
        **config,
        "crsam_version": __version__,
        "torch_version": torch.__version__,
        "data_sha256": data.sha256,
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "parameters": count_parameters(model),
        "device_used": str(device),
        "schedule": describe_schedule(config),
        "curvature_tracking": describe_curvature_tracking(config),
        "world_size": distributed.world_size(),
        "prior": {key: value for key, value in prior.items() if key != "state"},
    }
    # --- distributed: rank 0 alone creates the folder, after every rank has checked it.
    distributed.barrier()
    created = _create_folder(out) if distributed.is_main_process() else []
    new_run = NewRunFiles(config_record, existing, created)
    training_model = compile_model(wrapped) if config["compile"] else wrapped
    return RunState(config, data, device_data, model, training_model, optimizer, scheduler, data_order, augmentation,
                    scaler, prior, [], 0, new_run)


def _resume_state(options: dict[str, Any], out: Path) -> RunState:
    """Rebuild a run from ``out/checkpoint.pt``; options passed now must match the stored ones.

    Nothing is written here. The first resumed epoch rewrites ``metrics.jsonl`` from the
    checkpoint's list, which drops a line written after the checkpoint by an interrupted epoch.
    """
    path = out / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(
            f"--resume found no checkpoint at {str(path)!r}; start a new run without --resume "
            "or pass the --out folder of an earlier run"
        )
    payload = load_checkpoint(path)
    config = check_stored_config(payload["config"], payload, path)

    # A resumed run continues the stored configuration; a differing flag would silently change it.
    for key, value in options.items():
        if value is None or key in RESUME_FREE_OPTIONS:
            continue
        if config.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(
                f"{flag} {value} differs from the resumed run's {config.get(key)!r}; drop {flag} "
                "(resume takes the options from the checkpoint) or start a new run in another --out"
            )
    config["out"] = str(out)

    # The device may change between a run and its resumption, as the data folder may.
    if options.get("device") is not None:
        config["device"] = options["device"]
    elif config["device"] == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"the run in {str(out)!r} trained with --device cuda, and torch finds no CUDA device here; "
            "pass --device cpu (or auto) with --resume to continue on the CPU"
        )
    device = run_device(config["device"])
    data = load_run_data(config, data_dir=options.get("data_dir"))
    _check_data_hash(data, payload, path)

    # Rebuild every stateful object, then overwrite its state with the checkpoint's.
    model = build_run_model(config, data)
    model.to(device)
    wrapped = distributed.wrap_model(model)
    optimizer = build_optimizer(config, wrapped)
    scheduler = _build_run_scheduler(config, optimizer, len(data.y_train))
    data_order = torch.Generator()
    augmentation = torch.Generator().manual_seed(augmentation_seed(config["seed"]))
    scaler = build_scaler(config["amp"], device)
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        _restore_random_states(payload["rng"], data_order, augmentation, device)
        if scaler is not None:
            _restore_scaler(scaler, payload.get("scaler"))
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as error:
        raise UsageError(
            f"checkpoint {str(path)!r} does not fit the {config['model']!r} run it describes "
            f"({_state_dict_problem(error)}); resume with the crsam version that wrote it, or train again"
        ) from None
    _check_schedule_position(scheduler, config, payload["epoch"], len(data.y_train), path)

    metrics = list(payload["metrics"])
    device_data = TrainingData(data, device=device, cutout=config["cutout"])
    training_model = compile_model(wrapped) if config["compile"] else wrapped
    return RunState(config, data, device_data, model, training_model, optimizer, scheduler, data_order, augmentation,
                    scaler, payload["prior"], metrics, payload["epoch"])


def _check_schedule_position(
    scheduler: torch.optim.lr_scheduler.LRScheduler, config: dict[str, Any], epoch: int, num_train: int, path: Path
) -> None:
    """Raise UsageError unless the restored schedule is at the step that ``epoch`` completed epochs reach.

    The schedule advances once per epoch, or once per step with warmup. A state from another
    epoch would train the remaining epochs at the wrong learning rates without any error.
    """
    steps = epoch * math.ceil(num_train / config["batch_size"]) if schedule_per_step(config) else epoch
    position = getattr(scheduler, "last_epoch", None)
    if not isinstance(position, int) or isinstance(position, bool) or position != steps:
        raise UsageError(
            f"checkpoint {str(path)!r} is invalid: its learning-rate schedule is at step {position!r}, but "
            f"{epoch} completed epochs put it at {steps}; pass a checkpoint that 'crsam train' wrote, or train again"
        )


def _restore_scaler(scaler: torch.amp.GradScaler, state: Any) -> None:
    """Load a checkpoint's loss-scaler state, or raise ValueError when it has none."""
    if not isinstance(state, dict) or "scale" not in state:
        raise ValueError("an --amp fp16 run needs the loss scaler's state, and the checkpoint has none")
    scaler.load_state_dict(state)


def _restore_random_states(
    states: dict[str, torch.Tensor], data_order: torch.Generator, augmentation: torch.Generator, device: torch.device
) -> None:
    """Set the generators to a checkpoint's states.

    Checkpoints written before augmentation existed lack its state, and the seeded one is kept.
    A CUDA state is restored only on a CUDA device, because a CPU run never draws from one.
    """
    data_order.set_state(states["data_order"])
    torch.set_rng_state(states["torch"])
    if "augmentation" in states:
        augmentation.set_state(states["augmentation"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def check_stored_config(config: dict[str, Any], payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """Return a checkpoint's configuration, or raise UsageError if ``crsam train`` could not have written it.

    ``load_checkpoint`` checks the entries' types. This function checks the training options
    with the same rules as the flags, so that an edited or foreign checkpoint fails in one line
    before its values build a model or generate data. Options that the rebuild can do without and that the
    configuration lacks, such as flags added after it was written, take their defaults.
    """
    def invalid(reason: str) -> UsageError:
        return UsageError(
            f"checkpoint {str(path)!r} stores an invalid configuration ({reason}); "
            "pass a checkpoint that 'crsam train' wrote, or train again"
        )

    missing = [key for key in STORED_REQUIRED_OPTIONS if key not in config]
    if missing:
        raise invalid(f"it lacks {', '.join(missing)}")
    config = {**DEFAULTS, "rho": None, "alpha": None, "beta": None, **config}
    try:
        # The stored data folder may have moved, which load_run_data reports with the way out.
        check_options({**config, "data_dir": None})
    except UsageError as error:
        # Keep the reason and drop the advice, which is about passing a flag.
        raise invalid(str(error).split(";", 1)[0]) from None
    optimizer = config["optimizer"]
    for name in ("lr", *OPTIMIZER_OPTIONS[optimizer]):
        if config[name] is None:
            raise invalid(f"{name} is missing for --optimizer {optimizer}")
    if config["data_dir"] is not None and not isinstance(config["data_dir"], str):
        raise invalid(f"data_dir is {config['data_dir']!r}, not a path")
    if payload["epoch"] > config["epochs"]:
        raise invalid(f"{payload['epoch']} epochs completed of {config['epochs']}")
    return config


def _check_folder(out: Path, *, overwrite: bool) -> list[str]:
    """Check that ``out`` can hold a new run; return the run files in it that ``overwrite`` replaces."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; pass a folder for the run's files")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise UsageError(
            f"--out {str(out)!r} already contains a run ({', '.join(existing)}); pass --resume to "
            "continue it, --overwrite to replace it, or another --out"
        )

    # The nearest existing folder must allow new entries (os.access also reports read-only mounts).
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(
            f"--out {str(out)!r} cannot be created because {str(ancestor)!r} is a file; pass a folder path"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out {str(out)!r} is not writable (no write permission in {str(ancestor)!r}); "
            "pass a folder you can write to"
        )
    return existing


def _create_folder(out: Path) -> list[Path]:
    """Create ``out`` with its missing parents; return the folders created, deepest first."""
    missing = []
    folder = out
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _remove_empty_folders(missing)
        raise UsageError(
            f"--out {str(out)!r} cannot be created ({error.strerror or error}); pass a folder you can write to"
        ) from None
    return missing


def _start_run_files(new_run: NewRunFiles, out: Path) -> None:
    """Replace an earlier run's files and write ``config.json``, once the first epoch succeeded."""
    # The old checkpoint must not survive next to the new run's configuration.
    for name in new_run.replaced:
        (out / name).unlink(missing_ok=True)
    new_run.replaced = []
    new_run.written.append(out / "config.json")
    write_text_atomic(
        json.dumps(json_safe(new_run.config_record), indent=2, sort_keys=True) + "\n", out / "config.json"
    )


def _discard_new_run(new_run: NewRunFiles) -> None:
    """Remove what a new run wrote before its first checkpoint, and the folders it created."""
    for path in new_run.written:
        path.unlink(missing_ok=True)
    _remove_empty_folders(new_run.created_folders)


def _remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) where they are empty; keep any that are not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _describe_prior(model: nn.Module, *, seed: int, split: PriorSplit | None) -> dict[str, Any]:
    """Return the prior centre: a copy of the seeded initial weights, and the held-out split if any.

    NOTE: with a split the prior is still the initial weights, because training a prior on the
    held-out examples is not implemented. The split only reserves them, and a bound uses the rest.
    """
    return {
        "kind": "init",
        "seed": seed,
        "state": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "split": None if split is None else split.describe(),
    }


def _write_metrics(metrics: list[dict[str, Any]], out: Path) -> None:
    """Rewrite ``metrics.jsonl`` with one JSON object per epoch, atomically."""
    lines = [json.dumps(json_safe(record), sort_keys=True) for record in metrics]
    write_text_atomic("".join(line + "\n" for line in lines), out / "metrics.jsonl")


def _check_data_hash(data: Dataset | CifarData | ImageFolderData, payload: dict[str, Any], path: Path) -> None:
    """Raise UsageError when regenerated data differ from the data the checkpoint was trained on."""
    expected = payload["data"].get("sha256")
    if data.sha256 != expected:
        if isinstance(data, ImageFolderData):
            source = payload["data"].get("source")
            pillow_version = source.get("pillow_version") if isinstance(source, dict) else None
            fix = (
                "pass --data-dir with the unchanged folder the run trained on, and decode it with Pillow "
                f"{pillow_version} as the run did (this is Pillow {data.source['pillow_version']})"
            )
        else:
            fix = "use the crsam and mnist1d versions that wrote it"
        raise UsageError(
            f"the data rebuilt for {str(path)!r} have SHA-256 {data.sha256[:12]}..., but the checkpoint "
            f"was trained on {str(expected)[:12]}...; {fix}"
        )


# ---------------------------------------------------------------------------- restoring a run


@dataclass
class RestoredRun:
    """A trained model with its data, rebuilt from a checkpoint for certificates and curvature."""

    path: Path
    checkpoint: dict[str, Any]
    config: dict[str, Any]
    model: nn.Module
    data: Dataset
    prior_state: dict[str, torch.Tensor]
    prior_split: PriorSplit | None

    def bound_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the training examples a bound may use: all, or those the prior did not see."""
        if self.prior_split is None:
            return self.data.x_train, self.data.y_train
        indices = self.prior_split.bound_indices
        return self.data.x_train[indices], self.data.y_train[indices]


def restore_run(path: str | os.PathLike, *, data_dir: str | os.PathLike | None = None) -> RestoredRun:
    """Load a checkpoint, rebuild its model (in eval mode) and regenerate its exact data split.

    Raises UsageError when the checkpoint is unreadable, when the regenerated data's hash differs
    from the stored one, or when the stored weights do not fit the rebuilt model.
    """
    path = Path(path)
    payload = load_checkpoint(path)
    config = check_stored_config(payload["config"], payload, path)
    check_data_dir(data_dir)
    data = load_run_data(config, data_dir=data_dir)
    _check_data_hash(data, payload, path)
    if isinstance(data, IMAGE_DATA_TYPES):
        data = cifar_as_float_dataset(data)

    # Rebuild the model and load the weights; a mismatch means the model code changed.
    model = build_run_model(config, data)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise UsageError(
            f"checkpoint {str(path)!r} does not fit the model {config['model']!r} ({_state_dict_problem(error)}); "
            "use the crsam version that wrote it"
        ) from None
    model.eval()

    # The prior centre must have the model's parameters, or the KL term has no meaning.
    prior = payload["prior"]
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    stored = {name: tuple(tensor.shape) for name, tensor in prior["state"].items()}
    if stored != expected:
        raise UsageError(
            f"checkpoint {str(path)!r} is invalid: the prior's tensors do not match the parameters of "
            f"the model {config['model']!r}; pass a checkpoint that 'crsam train' wrote, or train again"
        )

    if prior.get("kind") == "init":
        _check_initial_prior(config, data, prior, path)

    # Regenerate the prior's held-out split and check it against the stored hash.
    split = None
    if prior.get("split") is not None:
        stored_split = prior["split"]
        try:
            split = split_for_prior(len(data.y_train), stored_split["fraction"], seed=stored_split["seed"])
        except UsageError as error:
            raise UsageError(
                f"checkpoint {str(path)!r} stores an invalid prior split ({str(error).split(';', 1)[0]}); "
                "pass a checkpoint that 'crsam train' wrote, or train again"
            ) from None
        if split.indices_sha256 != stored_split["indices_sha256"]:
            raise UsageError(
                f"the prior split rebuilt for {str(path)!r} differs from the stored one; "
                "use the crsam and torch versions that wrote the checkpoint"
            )
    return RestoredRun(path, payload, config, model, data, prior["state"], split)


def _check_initial_prior(config: dict[str, Any], data: Any, prior: dict[str, Any], path: Path) -> None:
    """Raise UsageError unless the stored prior centre equals the seeded initial weights.

    A prior must not depend on the data the bound uses. A prior of kind "init" is the model built
    after ``torch.manual_seed(seed)``, so it is rebuilt here and compared bit for bit. An edited
    centre, for example the trained weights, would otherwise give a KL near 0 and an invalid bound.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(prior.get("seed", config["seed"]))
        initial = build_run_model(config, data).state_dict()
    for name, tensor in initial.items():
        stored = prior["state"][name]
        if stored.dtype != tensor.dtype or not torch.equal(stored, tensor):
            raise UsageError(
                f"checkpoint {str(path)!r} is invalid: its prior centre ({name!r}) differs from the initial "
                f"weights of seed {prior.get('seed', config['seed'])}, so a bound against it would not be valid; "
                "pass a checkpoint that 'crsam train' wrote with this crsam and torch version, or train again"
            )


def _state_dict_problem(error: BaseException) -> str:
    """Return the first specific problem of a ``load_state_dict`` error, on one line.

    torch's message starts with a header, ``Error(s) in loading state_dict for MLP:``, and lists
    the missing keys, unexpected keys and size mismatches on the following lines.
    """
    if isinstance(error, KeyError):
        return f"an entry lacks the key {error.args[0]!r}" if error.args else "an entry lacks a key"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1].rstrip(".")
    return lines[0] if lines else type(error).__name__
