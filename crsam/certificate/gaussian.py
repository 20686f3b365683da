r"""PAC-Bayes certificate for the Gaussian posterior around a trained network.

Posterior and prior are isotropic Gaussians with the same scale :math:`\sigma`:

.. math::

    Q_\sigma = \mathcal N(w, \sigma^2 I), \qquad P_\sigma = \mathcal N(w_0, \sigma^2 I), \qquad
    \mathrm{KL}(Q_\sigma \| P_\sigma) = \frac{\|w - w_0\|^2}{2 \sigma^2},

where :math:`w` are the trained weights and :math:`w_0` the prior centre, which must be chosen
without the bound's examples (the seeded initial weights, or weights trained on a disjoint split).
The certified quantity is :math:`L_D(Q_\sigma)`, the expected 0-1 error on the data distribution
of the stochastic predictor that draws fresh weights :math:`w + \sigma e`,
:math:`e \sim \mathcal N(0, I)`, for each prediction. It is not the error of the network at
:math:`w`.

Confidence accounting, with total failure probability
:math:`\delta = \delta_{MC} + \delta_{PB}` and :math:`\delta_{PB}` split evenly among the bound
families requested with ``families`` (:math:`F` of them, so each gets
:math:`\delta_f = \delta_{PB} / F`):

1. **kl family over the sigma grid.** :math:`\sigma` is one of :math:`K` values fixed before
   seeing the data (``DEFAULT_SIGMA_GRID``). The PAC-Bayes-kl theorem (Maurer 2004) is applied once
   per grid value with failure probability :math:`\delta_{kl}/K`: for each :math:`k`, with
   probability at least :math:`1 - \delta_{kl}/K`,

   .. math::

       \mathrm{kl}\big(L_S(Q_k) \,\|\, L_D(Q_k)\big) \le
       \frac{\mathrm{KL}(Q_k\|P_k) + \ln(2\sqrt{n} K / \delta_{kl})}{n}.

   By the union bound all :math:`K` inequalities hold together with probability at least
   :math:`1 - \delta_{kl}`, so a :math:`\sigma` chosen after looking at the data is covered. The
   grid costs :math:`\ln K` nats. The McAllester and quadratic bounds relax the kl inverse
   (Pinsker's inequality and :math:`\mathrm{kl}(q\|p) \ge (p - q)^2 / (2p)` for
   :math:`p \ge q`), so they follow from the same event, and the rows ``kl``, ``mcallester`` and
   ``quad`` share this confidence.

   ``catoni`` (optional): Catoni's bound is a separate event for each constant :math:`C`, so
   each pair of a grid value :math:`\sigma_k` and a constant from ``catoni_grid`` (:math:`G`
   values fixed in advance) gets :math:`\delta_{C}/(K G)`, and the row is the minimum over
   :math:`C` (:func:`crsam.theory.catoni_grid_bound` with :math:`\delta_C / K`).

   ``dziugaite-roy`` (optional): the prior :math:`\mathcal N(w_0, \lambda_j I)` takes its
   variance from the countable grid :math:`\lambda_j = c e^{-j/b}` of Dziugaite and Roy (2017),
   with :math:`6\delta_{DR}/(\pi^2 j^2)` for grid point :math:`j`
   (:func:`crsam.theory.dziugaite_roy_bound`). The posterior is the same
   :math:`\mathcal N(w, \sigma^2 I)`. The KL is smallest at :math:`\lambda^* = \sigma^2 +
   \|w - w_0\|^2 / k` for :math:`k` parameters, and both grid neighbours of :math:`\lambda^*`
   are evaluated (both are paid for), the smaller bound kept.

   A family's rows hold together with probability at least :math:`1 - \delta_{MC} - \delta_f`
   (their ``delta``). The minimum over all rows, reported as ``best_bound``, needs every family's
   event and holds at the total :math:`\delta`.
2. **Selection.** :math:`\sigma` minimizes the kl bound computed from ``selection_samples``
   weight samples per grid value. These samples only choose :math:`\sigma` and are never used in
   the certificate.
3. **Monte Carlo.** :math:`L_S(Q)` has no closed form. At the chosen :math:`\sigma`, ``mc_samples``
   fresh weight samples :math:`w_j` give i.i.d. values :math:`L_S(w_j) \in [0, 1]` with mean
   :math:`L_S(Q)`, given the data and :math:`\sigma`. With probability at least
   :math:`1 - \delta_{MC}` (Langford and Caruana 2001, one-sided),
   :math:`L_S(Q) \le \mathrm{kl}^{-1}_{+}(\hat L, \ln(1/\delta_{MC}) / m)`. Both bounds are
   nondecreasing in the empirical risk, so the certificate plugs in this upper value.

The network is evaluated in eval mode (BatchNorm uses its running statistics and dropout is off),
so each weight sample is a deterministic classifier. Floating-point buffers such as BatchNorm
running statistics are not perturbed and are not covered by the prior. When they differ from the
prior's buffers, they were computed from training data, and the bounds are reported with
``rigorous: false``.

References
----------
- Catoni, O. (2007). PAC-Bayesian supervised classification: the thermodynamics of statistical
  learning. IMS Lecture Notes Monograph Series 56.
- Dziugaite, G. K., & Roy, D. M. (2017). Computing nonvacuous generalization bounds for deep
  (stochastic) neural networks with many more parameters than training data. UAI.
- Langford, J., & Caruana, R. (2001). (Not) bounding the true error. NeurIPS 14.
- Maurer, A. (2004). A note on the PAC Bayesian theorem. arXiv:cs/0411099.
- Perez-Ortiz, M., Rivasplata, O., Shawe-Taylor, J., & Szepesvari, C. (2021). Tighter risk
  certificates for neural networks. JMLR 22.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

import crsam
from crsam.data import hash_tensors
from crsam.theory import (
    catoni_bound,
    catoni_grid_bound,
    dziugaite_roy_bound,
    gaussian_kl,
    kl_bound,
    mcallester_bound,
    quad_bound,
    round_prior_variance,
    sample_bound,
)

from .montecarlo import (
    ParameterLayout,
    check_sample_count,
    count_errors,
    estimate_errors,
    resolve_method,
)

# Geometric grid of 25 posterior scales from 1e-4 to 1, six per decade (ratio 10**(1/6), about
# 1.47). It is fixed here, before any data is seen, as the union bound requires. Choosing among
# the 25 values costs ln 25 = 3.2 nats, which is small next to typical KL values.
DEFAULT_SIGMA_GRID: tuple[float, ...] = tuple(float(s) for s in np.geomspace(1e-4, 1.0, 25))

DEFAULT_DELTA = 0.05
DEFAULT_MC_SAMPLES = 10_000
DEFAULT_SELECTION_SAMPLES = 64
# Fraction of delta spent on the Monte-Carlo bound; the rest goes to the PAC-Bayes bound.
DEFAULT_MONTE_CARLO_FRACTION = 0.5

# Bounds of the kl family, all implied by one PAC-Bayes-kl event, so their minimum costs nothing.
BOUND_NAMES = ("kl", "mcallester", "quad")

# Families of bounds, each with its own event and its own share of delta. "kl" gives the rows of
# BOUND_NAMES, the other two give one row each, named after the family.
BOUND_FAMILIES = ("kl", "catoni", "dziugaite-roy")
# NOTE: certify reports the kl family alone unless asked for more, so that its rows and deltas
# stay those of earlier versions. Pass families=BOUND_FAMILIES for all three.
DEFAULT_FAMILIES = ("kl",)

# Catoni's constants: 33 values from 0.01 to 100, eight per decade (ratio 1.33), fixed before any
# data is seen. The minimizing C is ln(p (1 - q) / (q (1 - p))) for empirical risk q and bound p,
# about 0.1 to 5 for errors between 0.01 and 0.5, well inside the grid. The grid costs ln 33 = 3.5
# nats.
DEFAULT_CATONI_GRID: tuple[float, ...] = tuple(float(c) for c in np.geomspace(1e-2, 1e2, 33))

# Dziugaite and Roy's prior-variance grid c * exp(-j / b): b = 100 points per factor e, and every
# variance below c = 0.1, as in their paper.
DEFAULT_PRIOR_VARIANCE_B = 100.0
DEFAULT_PRIOR_VARIANCE_C = 0.1


def noise_seeds(seed: int) -> tuple[int, int]:
    """Derive the seeds of the selection and the certification weight noise from ``seed``.

    The two streams come from independent children of ``numpy.random.SeedSequence(seed)``, so
    the certification samples do not repeat the selection samples.

    >>> selection_seed, certification_seed = noise_seeds(0)
    >>> selection_seed != certification_seed
    True
    """
    children = np.random.SeedSequence(seed).spawn(2)
    selection_seed, certification_seed = (int(child.generate_state(1)[0]) for child in children)
    return selection_seed, certification_seed


def certify(
    model: nn.Module,
    prior_state: Mapping[str, torch.Tensor],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    *,
    delta: float = DEFAULT_DELTA,
    mc_samples: int = DEFAULT_MC_SAMPLES,
    selection_samples: int = DEFAULT_SELECTION_SAMPLES,
    sigma_grid: Sequence[float] | None = None,
    monte_carlo_fraction: float = DEFAULT_MONTE_CARLO_FRACTION,
    seed: int = 0,
    batch_size: int = 1000,
    sample_batch_size: int = 16,
    method: str = "auto",
    prior_info: Mapping[str, object] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    families: Sequence[str] = DEFAULT_FAMILIES,
    catoni_grid: Sequence[float] | None = None,
    prior_variance_b: float = DEFAULT_PRIOR_VARIANCE_B,
    prior_variance_c: float = DEFAULT_PRIOR_VARIANCE_C,
) -> dict:
    r"""Certify the expected 0-1 error of the Gaussian posterior :math:`\mathcal N(w, \sigma^2 I)`.

    The procedure and its confidence accounting are in the module docstring: :math:`\sigma` is
    selected from ``sigma_grid`` on one set of weight samples, and the kl, McAllester and
    quadratic bounds are evaluated with fresh samples. Every bound holds with probability at
    least ``1 - delta``, with the grid's union bound and the Monte-Carlo step included.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier at the trained weights :math:`w`, mapping a batch of inputs to logits
        ``(batch, num_classes)``. Its parameters are never modified. It is put in eval mode
        during the call, and its previous mode is restored afterwards.
    prior_state : mapping of str to torch.Tensor
        State dict of the same model at the prior centre :math:`w_0`. It must contain every
        parameter and may contain buffers.
    x_train, y_train : torch.Tensor
        The ``n`` examples of the bound and their integer labels. They must not have been used
        to choose the prior.
    x_test, y_test : torch.Tensor, optional
        Held-out examples, for the reported test errors only.
    delta : float
        Total failure probability in (0, 1). Every share of it per event must be a normal
        float64 (at least 2.2e-308). A smaller delta raises ValueError, which names the smallest
        delta that fits the chosen grids (1e-303 for the defaults of ``crsam bound``).
    mc_samples : int
        Weight samples :math:`m` of the certification step.
    selection_samples : int
        Weight samples per grid value used to choose :math:`\sigma`.
    sigma_grid : sequence of float, optional
        Candidate posterior scales, positive and distinct. Defaults to ``DEFAULT_SIGMA_GRID``.
        The grid must be fixed before seeing the data.
    monte_carlo_fraction : float
        Share of ``delta`` spent on the Monte-Carlo bound, in (0, 1).
    seed : int
        Seed of the weight noise (selection and certification streams are derived from it).
    batch_size : int
        Examples per forward pass.
    sample_batch_size : int
        Weight samples drawn per chunk (and evaluated together with ``method="vmap"``).
    method : {"auto", "vmap", "loop"}
        Evaluation schedule (see :mod:`crsam.certificate.montecarlo`).
    prior_info : mapping, optional
        How the prior centre was chosen, copied into the report's ``prior`` section, for example
        ``{"kind": "init", "seed": 0}``. ``kind`` defaults to ``"init"``.
    progress : callable, optional
        Called as ``progress(stage, done, total)`` with stage ``"selection"`` or
        ``"certification"`` after each chunk of weight samples.
    families : sequence of str
        Bound families to report, from ``BOUND_FAMILIES``: ``"kl"`` (rows ``kl``,
        ``mcallester``, ``quad``), ``"catoni"`` and ``"dziugaite-roy"``. Each gets an equal share
        of the PAC-Bayes part of ``delta``.
    catoni_grid : sequence of float, optional
        Catoni's constants :math:`C`, positive and distinct, fixed before seeing the data.
        Defaults to ``DEFAULT_CATONI_GRID``.
    prior_variance_b, prior_variance_c : float
        Density and scale of the prior-variance grid :math:`c e^{-j/b}` of the
        ``dziugaite-roy`` row.

    Returns
    -------
    dict
        JSON-serializable report (no NaN or infinity). See ``crsam bound --json`` for the keys:
        ``train_error``, ``test_error``, ``n_train``, ``delta`` and ``bounds`` (one object per
        bound with ``name``, ``value``, ``delta``, ``n``, ``rigorous`` and the components
        ``empirical``, ``kl``, ``complexity``), plus ``confidence`` (with ``steps``, one entry per
        share of ``delta``), ``sigma``, ``selection``, ``monte_carlo``, ``posterior``, ``prior``,
        ``per_layer``, ``warnings`` and ``provenance``.

    Raises
    ------
    ValueError
        If an argument is invalid; the message names the value and the fix.

    Examples
    --------
    A linear model at its prior centre has KL 0, so only the Monte-Carlo error and the
    confidence terms remain:

    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Linear(4, 2)
    >>> prior_state = {name: value.clone() for name, value in model.state_dict().items()}
    >>> x = torch.randn(200, 4)
    >>> y = (x[:, 0] > 0).long()
    >>> report = certify(model, prior_state, x, y, mc_samples=100, selection_samples=10,
    ...                  sigma_grid=[0.01])
    >>> [(row["name"], row["kl"], row["rigorous"]) for row in report["bounds"]]
    [('kl', 0.0, True), ('mcallester', 0.0, True), ('quad', 0.0, True)]
    >>> report["monte_carlo"]["mean"] <= report["bounds"][0]["value"] <= 1.0
    True
    """
    started = time.perf_counter()

    # Check the arguments before any forward pass.
    grid = _check_options(delta, mc_samples, selection_samples, sigma_grid, monte_carlo_fraction,
                          seed, batch_size, sample_batch_size, method)
    families = check_families(families)
    catoni_constants = check_catoni_grid(catoni_grid)
    check_prior_variance_grid(prior_variance_b, prior_variance_c)
    layout = _check_model_and_data(model, prior_state, x_train, y_train, x_test, y_test)
    check_sample_count("mc_samples", mc_samples, int(x_train.shape[0]))
    check_sample_count("selection_samples", selection_samples, int(x_train.shape[0]))
    prior_section = _prior_section(prior_info)

    # Flat weight vectors of the posterior mean w and the prior centre w0.
    parameters = dict(model.named_parameters())
    center = layout.flatten(parameters)
    prior_center = layout.flatten({
        name: prior_state[name].to(device=center.device, dtype=center.dtype)
        for name in layout.names
    })

    budget = confidence_budget(delta, monte_carlo_fraction, families, len(grid),
                               len(catoni_constants))
    delta_monte_carlo = budget["monte_carlo"]
    delta_per_sigma = budget["pac_bayes_per_sigma"]
    datasets = {"train": (x_train, y_train)}
    if x_test is not None:
        datasets["test"] = (x_test, y_test)

    was_training = model.training
    model.eval()
    try:
        # The network at w: its errors, its number of classes and a check of the labels.
        num_classes = _check_outputs(model, layout, center, datasets, batch_size)
        mean_errors = {
            name: _error_rate(model, layout, center, x, y, batch_size)
            for name, (x, y) in datasets.items()
        }
        method = _resolve_method_with_fallback(model, layout, center, x_train, method)
        selection_seed, certification_seed = noise_seeds(seed)

        # KL pieces in float64: squared distance to the prior centre, per parameter tensor.
        squared_distances = {
            name: float(torch.sum((piece.double() - prior_piece.double()) ** 2))
            for (name, piece), prior_piece in zip(
                layout.unflatten(center).items(), layout.unflatten(prior_center).values()
            )
        }
        squared_distance = math.fsum(squared_distances.values())

        # Choose sigma on the selection samples.
        chance_error = 1.0 - 1.0 / num_classes
        n = int(x_train.shape[0])
        candidates = _select_sigma(
            model, layout, center, grid, squared_distance, n, x_train, y_train,
            selection_seed=selection_seed, selection_samples=selection_samples,
            delta_per_sigma=delta_per_sigma, delta_monte_carlo=delta_monte_carlo,
            chance_error=chance_error, batch_size=batch_size,
            sample_batch_size=sample_batch_size, method=method, progress=progress,
        )
        chosen = min((c for c in candidates if c["evaluated"]), key=_selection_key)
        sigma = chosen["sigma"]

        # Certify at the chosen sigma with fresh samples.
        report_progress = None
        if progress is not None:
            def report_progress(done, total):
                progress("certification", done, total)
        estimates = estimate_errors(
            model, layout, center, sigma, certification_seed, mc_samples, datasets,
            batch_size=batch_size, sample_batch_size=sample_batch_size, method=method,
            ensemble_classes=num_classes, progress=report_progress,
        )
    finally:
        model.train(was_training)

    # Upper bound on L_S(Q) from the certification samples (Langford-Caruana).
    train_estimate = estimates["train"]
    empirical_upper = float(sample_bound(train_estimate.mean, mc_samples, delta_monte_carlo))

    # The PAC-Bayes rows, each family on its own union-bound event.
    kl_nats = squared_distance / (2.0 * sigma**2)
    caveats = _rigor_caveats(model, prior_state)
    num_parameters = layout.num_parameters

    def kl_at_prior_variance(variance):
        # KL(N(w, sigma^2 I) || N(w0, variance I)) in float64 from the flat weight vectors.
        return gaussian_kl(center.double().cpu().numpy(), sigma,
                           prior_center.double().cpu().numpy(), math.sqrt(variance))

    bounds, family_warnings = family_rows(
        budget, empirical_upper, n, chance_error, rigorous=not caveats, kl_nats=kl_nats,
        catoni_grid=catoni_constants,
        dziugaite_roy=dict(kl_at_variance=kl_at_prior_variance,
                           optimal_variance=sigma**2 + squared_distance / num_parameters,
                           b=float(prior_variance_b), c=float(prior_variance_c)),
    )

    # Warnings a reader of the report must see.
    report_warnings = list(caveats)
    edge_warning = _grid_edge_warning(grid, sigma)
    if edge_warning is not None:
        report_warnings.append(edge_warning)
    report_warnings += family_warnings
    for message in report_warnings:
        warnings.warn(message, stacklevel=2)

    report = {
        **headline_section(mean_errors, n, x_test, num_classes, chance_error, delta, bounds),
        "procedure": "sigma-grid",
        "confidence": budget,
        "sigma": sigma,
        "sigma_grid": list(grid),
        "sigma_grid_cost_nats": math.log(len(grid)),
        "sigma_on_grid_edge": edge_warning is not None,
        "kl": kl_nats,
        "distance": math.sqrt(squared_distance),
        "selection": {
            "objective": "kl bound from the selection samples, ties broken by the McAllester "
                         "bound; grid values that cannot win are skipped (see skipped_reason)",
            "samples_per_sigma": selection_samples,
            "seed": selection_seed,
            "candidates": candidates,
        },
        "monte_carlo": {
            "samples": mc_samples,
            "n": n,
            "mean": train_estimate.mean,
            "stderr": train_estimate.stderr,
            "upper": empirical_upper,
            "delta": delta_monte_carlo,
            "seed": certification_seed,
        },
        "posterior": _posterior_section(sigma, layout, mean_errors, estimates),
        "prior": prior_section,
        "per_layer": [
            {
                "name": name,
                "num_parameters": numel,
                "distance": math.sqrt(squared_distances[name]),
                "kl": squared_distances[name] / (2.0 * sigma**2),
            }
            for name, numel in zip(layout.names, layout.numels)
        ],
        "warnings": report_warnings,
        "provenance": {
            "seed": seed,
            "selection_seed": selection_seed,
            "certification_seed": certification_seed,
            **software_provenance(center.dtype, center.device, method, batch_size,
                                  sample_batch_size),
            # Same digest as crsam.data: over all four tensors it equals the data set's sha256.
            "train_sha256": hash_tensors(x_train, y_train),
            "data_sha256": hash_tensors(*(t for pair in datasets.values() for t in pair)),
            "runtime_seconds": time.perf_counter() - started,
        },
    }
    return _json_safe(report)


def _check_options(delta, mc_samples, selection_samples, sigma_grid, monte_carlo_fraction, seed,
                   batch_size, sample_batch_size, method) -> tuple[float, ...]:
    """Validate the scalar options and return the sorted sigma grid."""
    check_budget_options(delta, monte_carlo_fraction, seed, method, mc_samples=mc_samples,
                         selection_samples=selection_samples, batch_size=batch_size,
                         sample_batch_size=sample_batch_size)
    return check_scale_grid(sigma_grid, "sigma_grid", DEFAULT_SIGMA_GRID, "[0.01, 0.03, 0.1]")


def check_budget_options(delta, monte_carlo_fraction, seed, method, **counts) -> None:
    """Validate the options that every certificate shares; ``counts`` are integers >= 1."""
    if not _is_real(delta) or not 0.0 < delta < 1.0:
        raise ValueError(
            f"delta must be in (0, 1), got {delta!r}; pass the total failure probability, "
            "for example delta=0.05"
        )
    if not _is_real(monte_carlo_fraction) or not 0.0 < monte_carlo_fraction < 1.0:
        raise ValueError(
            f"monte_carlo_fraction must be in (0, 1), got {monte_carlo_fraction!r}; it is the "
            "share of delta spent on the Monte-Carlo bound, for example 0.5"
        )
    for name, value in counts.items():
        if not _is_integer(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not _is_integer(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    resolve_method(nn.Identity(), method)


# Range of a scale grid's values. Below it, sigma^2 and squared distances over sigma^2 leave the
# float64 range (about 1e-308 to 1e308) for realistic weights. Above it, sampled float32 weights
# w + sigma * e could overflow float32's maximum of 3.4e38 and turn the logits into NaN.
SCALE_GRID_MIN = 1e-100
SCALE_GRID_MAX = 1e30


def check_scale_grid(values, name, default, example) -> tuple[float, ...]:
    """Validate a grid fixed before the data (finite, positive, distinct) and return it sorted.

    ``values`` None selects ``default``. ``example`` is a grid to suggest in the messages.
    """
    # The grid: finite, positive, distinct values, sorted ascending.
    grid = default if values is None else values
    if isinstance(grid, np.ndarray) and grid.ndim == 1:
        grid = grid.tolist()
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) == 0:
        raise ValueError(
            f"{name} must be a non-empty sequence of positive numbers, got {values!r}; "
            f"pass for example {example} or None for the default grid"
        )
    for value in grid:
        if not _is_real(value) or not math.isfinite(value) or value <= 0.0:
            raise ValueError(
                f"{name} must contain finite positive numbers, got {value!r} in it; "
                "remove it or pass None for the default grid"
            )
        if not SCALE_GRID_MIN <= value <= SCALE_GRID_MAX:
            raise ValueError(
                f"{name} contains {value!r}, outside [{SCALE_GRID_MIN:g}, {SCALE_GRID_MAX:g}]; the KL term "
                "divides by sigma^2 and the sampled float32 weights must stay finite, so remove it"
            )
    ordered = tuple(sorted(float(value) for value in grid))
    if len(set(ordered)) != len(ordered):
        raise ValueError(
            f"{name} contains repeated values: {list(grid)}; each repeat costs confidence "
            "for nothing, so pass distinct values"
        )
    return ordered


def _check_model_and_data(model, prior_state, x_train, y_train, x_test, y_test) -> ParameterLayout:
    """Validate the data, the prior state and the input dtype; return the parameter layout."""
    _check_data(x_train, y_train, "train")
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test must be given together; pass both or neither")
    if x_test is not None:
        _check_data(x_test, y_test, "test")

    layout = ParameterLayout.from_model(model)
    if layout.num_parameters == 0:
        raise ValueError("model has no parameters, so there is no posterior to certify; "
                         "pass a model with parameters")
    _check_prior_state(model, layout, prior_state)

    parameter_dtype = next(model.parameters()).dtype
    for split, x in (("train", x_train), ("test", x_test)):
        if x is not None and x.is_floating_point() and x.dtype != parameter_dtype:
            raise ValueError(
                f"x_{split} has dtype {x.dtype} but the model's parameters are {parameter_dtype}; "
                f"convert the inputs with .to({parameter_dtype})"
            )
    return layout


def _is_real(value) -> bool:
    """Return whether ``value`` is a real number (not a bool)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    """Return whether ``value`` is an integer (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_data(x, y, split: str) -> None:
    """Validate one split's inputs and labels (shapes and label dtype)."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(
            f"x_{split} and y_{split} must be torch tensors, got {type(x).__name__} and "
            f"{type(y).__name__}; convert them with torch.as_tensor"
        )
    if y.ndim != 1:
        raise ValueError(
            f"y_{split} must be a 1-D tensor of class indices, got shape {tuple(y.shape)}; "
            "pass integer labels, not one-hot vectors"
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(
            f"y_{split} must hold integer class indices, got dtype {y.dtype}; "
            "convert it with .long()"
        )
    if x.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x_{split} and y_{split} must have the same number of examples, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}; pass matching inputs and labels"
        )
    if y.shape[0] == 0:
        raise ValueError(f"the {split} set is empty; pass at least one example")


def _check_prior_state(model: nn.Module, layout: ParameterLayout, prior_state) -> None:
    """Check that ``prior_state`` is a state dict of ``model``: keys, shapes and dtypes."""
    if not isinstance(prior_state, Mapping):
        raise ValueError(
            f"prior_state must be a state dict (a mapping of names to tensors), got "
            f"{type(prior_state).__name__}; pass the model's initial state_dict()"
        )
    known = set(model.state_dict())
    unknown = sorted(set(prior_state) - known)
    if unknown:
        raise ValueError(
            f"prior_state has keys that the model does not have: {unknown[:5]}; pass a state "
            "dict of the same architecture"
        )
    missing = [name for name in layout.names if name not in prior_state]
    if missing:
        raise ValueError(
            f"prior_state is missing parameters of the model: {missing[:5]}; pass a full "
            "state dict of the same architecture at the prior centre"
        )
    for name, shape in zip(layout.names, layout.shapes):
        value = prior_state[name]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"prior_state[{name!r}] must be a tensor of shape {tuple(shape)}, got {found}; "
                "pass a state dict of the same architecture"
            )
        if not torch.isfinite(value).all():
            raise ValueError(
                f"prior_state[{name!r}] contains NaN or infinite values; pass finite weights"
            )


def _check_outputs(model, layout, center, datasets, batch_size) -> int:
    """Return the number of classes from the logits' shape, after checking labels and outputs."""
    x_train = datasets["train"][0]
    with torch.inference_mode():
        logits = torch.func.functional_call(model, layout.unflatten(center),
                                            (x_train[:1].to(center.device),))
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"the model must return logits of shape (batch, num_classes) with num_classes >= 2, "
            f"got shape {tuple(logits.shape)}; wrap a binary model so that it returns two logits"
        )
    num_classes = int(logits.shape[1])
    for split, (_, y) in datasets.items():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"y_{split} must contain class indices in [0, {num_classes - 1}], got labels from "
                f"{low} to {high}; check that the labels match the model's {num_classes} outputs"
            )
    if not torch.isfinite(center).all():
        raise ValueError(
            "the model's parameters contain NaN or infinite values; pass finite weights"
        )
    return num_classes


def _error_rate(model, layout, center, x, y, batch_size) -> float:
    """Return the 0-1 error of the network at ``center`` on ``(x, y)``."""
    errors = count_errors(model, layout, center.unsqueeze(0), x, y, batch_size=batch_size,
                          method="loop")
    return int(errors[0]) / int(x.shape[0])


def _resolve_method_with_fallback(model, layout, center, x_train, method) -> str:
    """Resolve ``method``, falling back from ``"auto"`` to ``"loop"`` when ``vmap`` fails."""
    resolved = resolve_method(model, method)
    if method != "auto" or resolved != "vmap":
        return resolved

    # Probe vmap on two copies of w and two examples, because some layers have no batching rule.
    probe_x = x_train[:2]
    probe_y = torch.zeros(probe_x.shape[0], dtype=torch.int64)
    try:
        count_errors(model, layout, center.expand(2, -1), probe_x, probe_y, batch_size=2,
                     method="vmap")
    except (RuntimeError, NotImplementedError) as error:
        warnings.warn(f"torch.func.vmap failed on this model ({error}); evaluating one weight "
                      "sample at a time instead", stacklevel=3)
        return "loop"
    return "vmap"


def _select_sigma(model, layout, center, grid, squared_distance, n, x_train, y_train, *,
                  selection_seed, selection_samples, delta_per_sigma, delta_monte_carlo,
                  chance_error, batch_size, sample_batch_size, method, progress) -> list[dict]:
    """Evaluate the selection objective on the grid, from the smallest sigma up.

    Every grid value reuses the same standard-normal draws ``e_j`` (common random numbers), so the
    comparison between values is not blurred by independent noise. Two kinds of grid values are
    skipped because they cannot give the smallest bound. The first kind has a kl bound of 1 even at
    zero error (its KL alone is too large), unless every value is of that kind, and then the
    largest sigma is still evaluated. The second kind lies above the first value whose mean error
    reaches ``chance_error``, because more noise does not bring the error back down. Skipping
    changes only which sigma is chosen, not the union bound, which covers the whole grid.
    """
    candidates = [
        {"sigma": sigma, "evaluated": False, "skipped_reason": None, "mean": None, "upper": None,
         "kl": squared_distance / (2.0 * sigma**2), "kl_bound": None, "mcallester_bound": None}
        for sigma in grid
    ]
    vacuous_at_zero = [float(kl_bound(0.0, c["kl"], n, delta_per_sigma)) >= 1.0
                       for c in candidates]
    if all(vacuous_at_zero):
        vacuous_at_zero[-1] = False

    chance_reached = False
    for index, candidate in enumerate(candidates):
        if vacuous_at_zero[index]:
            candidate["skipped_reason"] = "kl bound is 1 even at zero error"
            continue
        if chance_reached:
            candidate["skipped_reason"] = "a smaller sigma already reached chance-level error"
            continue

        report_progress = None
        if progress is not None:
            def report_progress(done, total, index=index):
                progress("selection", index * selection_samples + done,
                         len(grid) * selection_samples)
        estimate = estimate_errors(
            model, layout, center, candidate["sigma"], selection_seed, selection_samples,
            {"train": (x_train, y_train)}, batch_size=batch_size,
            sample_batch_size=sample_batch_size, method=method, progress=report_progress,
        )["train"]

        # The objective is the certificate's own formula, evaluated on the selection samples.
        upper = float(sample_bound(estimate.mean, selection_samples, delta_monte_carlo))
        candidate.update(
            evaluated=True,
            mean=estimate.mean,
            upper=upper,
            kl_bound=float(kl_bound(upper, candidate["kl"], n, delta_per_sigma)),
            mcallester_bound=float(mcallester_bound(upper, candidate["kl"], n, delta_per_sigma)),
        )
        chance_reached = estimate.mean >= chance_error
    return candidates


def _selection_key(candidate: dict) -> tuple[float, float]:
    """Order candidates by kl bound, then by McAllester bound.

    The kl bound saturates at 1, so the McAllester bound separates vacuous candidates.
    """
    return candidate["kl_bound"], candidate["mcallester_bound"]


def _grid_edge_warning(grid, sigma) -> str | None:
    """Return a warning when ``sigma`` is the first or last value of a grid of two or more."""
    index = grid.index(sigma)
    if len(grid) < 2 or index not in (0, len(grid) - 1):
        return None
    side = "smallest" if index == 0 else "largest"
    return (
        f"the chosen sigma {sigma:.4g} is the {side} value of the grid, so a wider grid might "
        "give a tighter bound. Pass a grid that extends past it: --sigma-grid of 'crsam bound', "
        "or sigma_grid of crsam.certificate.certify"
    )


def check_families(families) -> tuple[str, ...]:
    """Validate ``families`` (names from ``BOUND_FAMILIES``, no repeats) and return them as a tuple."""
    if isinstance(families, str):
        raise ValueError(
            f"families must be a sequence of family names, got the string {families!r}; pass "
            f"for example ({families!r},)"
        )
    if not isinstance(families, Sequence) or len(families) == 0:
        raise ValueError(
            f"families must be a non-empty sequence of names from {BOUND_FAMILIES}, got "
            f"{families!r}"
        )
    for name in families:
        if name not in BOUND_FAMILIES:
            raise ValueError(
                f"families contains the unknown family {name!r}; choose from {BOUND_FAMILIES}"
            )
    if len(set(families)) != len(families):
        raise ValueError(
            f"families contains repeated names: {list(families)}; each repeat would take a share "
            "of delta for nothing, so name each family once"
        )
    return tuple(families)


def check_catoni_grid(catoni_grid) -> tuple[float, ...]:
    """Validate Catoni's constants (finite, positive, distinct) and return them sorted."""
    return check_scale_grid(catoni_grid, "catoni_grid", DEFAULT_CATONI_GRID, "[0.5, 1.0, 2.0]")


def check_prior_variance_grid(b, c) -> None:
    """Validate the density ``b`` and scale ``c`` of the prior-variance grid ``c * exp(-j / b)``."""
    for name, value in (("prior_variance_b", b), ("prior_variance_c", c)):
        if not _is_real(value) or not math.isfinite(value) or value <= 0.0:
            raise ValueError(
                f"{name} must be a finite number > 0, got {value!r}; Dziugaite and Roy use "
                f"b = {DEFAULT_PRIOR_VARIANCE_B:g} and c = {DEFAULT_PRIOR_VARIANCE_C:g}"
            )


def confidence_budget(delta, monte_carlo_fraction, families, grid_size, catoni_grid_size, *,
                      grid_name="sigma grid") -> dict:
    r"""Split the total failure probability ``delta`` into the shares the certificate spends.

    :math:`\delta_{MC} = f \delta` goes to the Monte-Carlo bound, and the rest is split evenly
    among the ``families``. The kl family spends its share over the ``grid_size`` values of the
    grid, Catoni's family over the pairs of grid value and constant, and the Dziugaite-Roy
    family over its countable prior-variance grid. Returns the report's ``confidence`` section,
    whose ``steps`` list each share: their deltas add up to ``delta`` (up to float64 rounding of
    the divisions, a few ulps). Raises ValueError when a share per event is below the smallest
    normal float64.
    """
    delta_monte_carlo = delta * monte_carlo_fraction
    delta_pac_bayes = delta - delta_monte_carlo
    share = delta_pac_bayes / len(families)
    shares = {name: (delta_pac_bayes if len(families) == 1 else share) for name in families}

    # One step per share, with the number of events it is split over.
    steps = [{
        "name": "monte-carlo",
        "delta": delta_monte_carlo,
        "events": 1,
        "delta_per_event": delta_monte_carlo,
        "description": "Langford-Caruana bound on the posterior's empirical error from the "
                       "certification samples",
    }]
    if "kl" in shares:
        steps.append({
            "name": "kl",
            "delta": shares["kl"],
            "events": grid_size,
            "delta_per_event": shares["kl"] / grid_size,
            "description": f"PAC-Bayes-kl event for each of the {grid_size} {grid_name} values "
                           "(rows kl, mcallester, quad)",
        })
    if "catoni" in shares:
        events = grid_size * catoni_grid_size
        steps.append({
            "name": "catoni",
            "delta": shares["catoni"],
            "events": events,
            "delta_per_event": shares["catoni"] / events,
            "description": f"Catoni event for each of the {grid_size} {grid_name} values times "
                           f"{catoni_grid_size} constants C",
        })
    if "dziugaite-roy" in shares:
        steps.append({
            "name": "dziugaite-roy",
            "delta": shares["dziugaite-roy"],
            "events": None,
            "delta_per_event": None,
            "description": "PAC-Bayes-kl event for each prior variance c exp(-j / b), "
                           "j = 1, 2, ..., with 6 delta / (pi^2 j^2) for point j",
        })
    _check_shares_normal(delta, steps, lambda: confidence_budget(
        1.0, monte_carlo_fraction, families, grid_size, catoni_grid_size)["steps"])
    return {
        "delta": delta,
        "pac_bayes": delta_pac_bayes,
        "monte_carlo": delta_monte_carlo,
        "monte_carlo_fraction": monte_carlo_fraction,
        "grid_size": grid_size,
        "pac_bayes_per_sigma": shares["kl"] / grid_size if "kl" in shares else None,
        "families": shares,
        "steps": steps,
    }


def _check_shares_normal(delta, steps, unit_steps) -> None:
    """Raise ValueError when a share of ``delta`` per event is below the smallest normal float64.

    Below ``sys.float_info.min`` (2.2e-308) a float64 is subnormal and loses relative precision,
    and a share that underflows to 0 makes ``ln(1 / delta)`` infinite. ``unit_steps()`` returns
    the steps for ``delta = 1``, whose shares are the fractions of ``delta`` that each event gets.
    """
    per_event = [step["delta_per_event"] for step in steps if step["delta_per_event"] is not None]
    smallest = min(per_event + [delta])
    if smallest >= sys.float_info.min:
        return
    fractions = [step["delta_per_event"] for step in unit_steps() if step["delta_per_event"] is not None]
    floor = sys.float_info.min / min(fractions + [1.0])
    suggestion = 10.0 ** math.ceil(math.log10(floor))
    raise ValueError(
        f"delta {delta!r} is too small: split among the certificate's events, its smallest share "
        f"is {smallest!r}, below the smallest normal float64 ({sys.float_info.min!r}). Pass a "
        f"delta of at least {suggestion:.0e}."
    )


def family_rows(budget, empirical, n, chance_error, *, rigorous, kl_nats, catoni_grid,
                dziugaite_roy) -> tuple[list[dict], list[str]]:
    """Build the rows of every family in ``budget`` and return them with their warnings.

    ``kl_nats`` is the KL to the prior of the grid (kl and Catoni rows). ``dziugaite_roy`` contains
    ``kl_at_variance`` (the KL as a function of the prior variance), ``optimal_variance`` (the
    variance that minimizes it) and the grid's ``b`` and ``c``. Every row's ``delta`` is the
    total, at which the minimum over all rows holds; ``delta_family`` is the smaller level at
    which the family's rows hold on their own.
    """
    delta_total = budget["delta"]
    steps = {step["name"]: step for step in budget["steps"]}
    rows: list[dict] = []
    row_warnings: list[str] = []
    if "kl" in steps:
        rows += _bound_rows(empirical, kl_nats, n, steps["kl"]["delta_per_event"], delta_total,
                            chance_error, rigorous=rigorous,
                            delta_family=budget["monte_carlo"] + steps["kl"]["delta"])
    if "catoni" in steps:
        per_sigma = steps["catoni"]["delta"] / budget["grid_size"]
        rows.append(_catoni_row(empirical, kl_nats, n, per_sigma, catoni_grid, delta_total,
                                chance_error, rigorous=rigorous,
                                delta_family=budget["monte_carlo"] + steps["catoni"]["delta"]))
    if "dziugaite-roy" in steps:
        row = _dziugaite_roy_row(empirical, n, steps["dziugaite-roy"]["delta"], delta_total,
                                 chance_error, rigorous=rigorous,
                                 delta_family=budget["monte_carlo"]
                                 + steps["dziugaite-roy"]["delta"],
                                 **dziugaite_roy)
        rows.append(row)
        if row["at_edge"]:
            row_warnings.append(
                f"the prior variance {row['requested_variance']:.4g} that minimizes the KL lies "
                f"above the first point of the Dziugaite-Roy grid ({row['prior_variance']:.4g}), "
                "so the dziugaite-roy row uses that point. Pass a larger c: --prior-variance-c "
                "of 'crsam bound', or prior_variance_c of crsam.certificate.certify"
            )
    return rows, row_warnings


def _row(name, raw, *, empirical, kl_nats, complexity, formula, n, delta_total, delta_pac_bayes,
         delta_family, chance_error, rigorous) -> dict:
    """Assemble one bound row: the value clipped to [0, 1] and the components that reproduce it."""
    value = min(max(raw, 0.0), 1.0)
    return {
        "name": name,
        "value": value,
        "raw_value": raw,
        "delta": delta_total,
        "delta_family": delta_family,
        "delta_pac_bayes": delta_pac_bayes,
        "n": n,
        "rigorous": rigorous,
        "empirical": empirical,
        "kl": kl_nats,
        "complexity": complexity,
        "formula": formula,
        # A 0-1 error is at most 1, so a value of 1 says nothing. A value at or above the
        # error of uniform guessing (beats_chance false) says nothing useful either.
        "vacuous": raw >= 1.0,
        "beats_chance": value < chance_error,
    }


def _bound_rows(empirical, kl_nats, n, delta_per_sigma, delta_total, chance_error, *,
                rigorous, delta_family=None) -> list[dict]:
    """Build the kl, McAllester and quadratic rows, each with the components of its value.

    With the budget ``B = (KL + ln(2 sqrt(n) / delta_pac_bayes)) / n``, the ``complexity``
    column is ``B`` for the kl row (value = kl_inv_upper(empirical, B)) and the quadratic row
    (value = (sqrt(empirical + B / 2) + sqrt(B / 2))^2), and ``sqrt(B / 2)`` for the McAllester
    row (value = empirical + sqrt(B / 2)).
    """
    budget = (kl_nats + math.log(2.0 * math.sqrt(n) / delta_per_sigma)) / n
    raw_values = {
        "kl": float(kl_bound(empirical, kl_nats, n, delta_per_sigma)),
        "mcallester": float(mcallester_bound(empirical, kl_nats, n, delta_per_sigma)),
        "quad": float(quad_bound(empirical, kl_nats, n, delta_per_sigma)),
    }
    complexities = {"kl": budget, "mcallester": math.sqrt(budget / 2.0), "quad": budget}
    formulas = {
        "kl": "kl_inv_upper(empirical, complexity)",
        "mcallester": "empirical + complexity",
        "quad": "(sqrt(empirical + complexity / 2) + sqrt(complexity / 2))^2",
    }
    return [
        _row(name, raw_values[name], empirical=empirical, kl_nats=kl_nats,
             complexity=complexities[name], formula=formulas[name], n=n,
             delta_total=delta_total, delta_pac_bayes=delta_per_sigma,
             delta_family=delta_total if delta_family is None else delta_family,
             chance_error=chance_error, rigorous=rigorous)
        for name in BOUND_NAMES
    ]


def _catoni_row(empirical, kl_nats, n, delta_per_sigma, catoni_grid, delta_total, chance_error,
                *, rigorous, delta_family) -> dict:
    r"""Build the Catoni row: the minimum over ``catoni_grid`` with :math:`\delta/G` per constant.

    The value is :func:`crsam.theory.catoni_grid_bound` at ``delta_per_sigma``. The row also
    names the minimizing constant ``C`` and the complexity
    :math:`(\mathrm{KL} + \ln(G/\delta))/n`, so that
    ``(1 - exp(-C empirical - complexity)) / (1 - exp(-C))`` reproduces the value.
    """
    raw = float(catoni_grid_bound(empirical, kl_nats, n, delta_per_sigma, list(catoni_grid)))
    per_constant = catoni_bound(empirical, kl_nats, n, delta_per_sigma / len(catoni_grid),
                                np.asarray(catoni_grid))
    best_constant = float(catoni_grid[int(np.argmin(per_constant))])
    row = _row("catoni", raw, empirical=empirical, kl_nats=kl_nats,
               complexity=(kl_nats + math.log(len(catoni_grid) / delta_per_sigma)) / n,
               formula="(1 - exp(-C * empirical - complexity)) / (1 - exp(-C))", n=n,
               delta_total=delta_total, delta_pac_bayes=delta_per_sigma,
               delta_family=delta_family, chance_error=chance_error, rigorous=rigorous)
    row.update(C=best_constant, catoni_grid_size=len(catoni_grid))
    return row


def _dziugaite_roy_row(empirical, n, delta_family_pac_bayes, delta_total, chance_error, *,
                       rigorous, delta_family, kl_at_variance, optimal_variance, b, c) -> dict:
    r"""Build the Dziugaite-Roy row: the better of the two grid neighbours of the optimal variance.

    Both neighbours :math:`\lfloor j^* \rfloor` and :math:`\lceil j^* \rceil` of
    :math:`j^* = b \ln(c / \lambda^*)` are paid for by the grid's union bound, so keeping the
    smaller bound costs nothing. The KL is recomputed at the grid variance. The complexity
    :math:`(\mathrm{KL} + \ln(\pi^2 j^2 / 6) + \ln(2\sqrt n / \delta))/n` reproduces the value
    through ``kl_inv_upper(empirical, complexity)``.
    """
    best = None
    for direction in ("larger_variance", "smaller_variance"):
        point = round_prior_variance(optimal_variance, b, c, direction)
        kl_nats = float(kl_at_variance(point.variance))
        raw = float(dziugaite_roy_bound(empirical, kl_nats, n, delta_family_pac_bayes, point.index))
        if best is None or raw < best[0]:
            best = (raw, kl_nats, point)
    raw, kl_nats, point = best

    complexity = (kl_nats + point.union_cost
                  + math.log(2.0 * math.sqrt(n) / delta_family_pac_bayes)) / n
    row = _row("dziugaite-roy", raw, empirical=empirical, kl_nats=kl_nats, complexity=complexity,
               formula="kl_inv_upper(empirical, complexity)", n=n, delta_total=delta_total,
               delta_pac_bayes=delta_family_pac_bayes, delta_family=delta_family,
               chance_error=chance_error, rigorous=rigorous)
    row.update(prior_variance=point.variance, requested_variance=point.requested_variance,
               grid_index=point.index, union_cost=point.union_cost, grid_b=b, grid_c=c,
               at_edge=point.at_edge)
    return row


def _best_bound(rows: list[dict]) -> dict | None:
    """Return the smallest rigorous row's name, value and delta.

    The rows hold on one event, so their minimum holds at the same delta.
    """
    rigorous_rows = [row for row in rows if row["rigorous"]]
    if not rigorous_rows:
        return None
    best = min(rigorous_rows, key=lambda row: row["value"])
    return {"name": best["name"], "value": best["value"], "delta": best["delta"]}


def _rigor_caveats(model: nn.Module, prior_state) -> list[str]:
    """List the reasons why the bounds are not certificates, or nothing when they are."""
    changed = []
    for name, buffer in model.named_buffers():
        if not buffer.is_floating_point():
            continue
        prior_buffer = prior_state.get(name)
        same = (
            isinstance(prior_buffer, torch.Tensor)
            and prior_buffer.shape == buffer.shape
            and torch.equal(prior_buffer.to(device=buffer.device, dtype=buffer.dtype), buffer)
        )
        if not same:
            changed.append(name)
    if not changed:
        return []
    return [
        f"the model's floating-point buffers {changed[:5]} differ from the prior state or are "
        "missing from it. Such buffers, for example BatchNorm running statistics, were computed "
        "from training data and are not covered by the prior, so the bounds are not "
        "certificates (rigorous: false)"
    ]


def _posterior_section(sigma, layout, mean_errors, estimates) -> dict:
    """Describe the posterior and its errors, marking the quantity the bounds certify."""
    return {
        "distribution": "N(w, sigma^2 I)",
        "sigma": sigma,
        "num_parameters": layout.num_parameters,
        "certified": "stochastic",
        "certified_description": "expected 0-1 error on the data distribution of the "
                                 "stochastic predictor w + sigma e, e ~ N(0, I), with fresh "
                                 "weights for each prediction",
        "errors": posterior_errors(mean_errors, estimates),
    }


def posterior_errors(mean_errors, estimates) -> dict:
    """Collect the stochastic, posterior-mean and ensemble errors on the train (or bound) and test sets."""
    def stochastic(split):
        estimate = estimates.get(split)
        if estimate is None:
            return None
        return {"mean": estimate.mean, "stderr": estimate.stderr, "samples": estimate.samples}

    def ensemble(split):
        estimate = estimates.get(split)
        if estimate is None or estimate.ensemble_errors is None:
            return None
        return estimate.ensemble_errors / estimate.n

    return {
        "stochastic": {"train": stochastic("train"), "test": stochastic("test")},
        "mean": {"train": mean_errors["train"], "test": mean_errors.get("test")},
        "ensemble": {"train": ensemble("train"), "test": ensemble("test")},
    }


def headline_section(mean_errors, n, x_test, num_classes, chance_error, delta, bounds) -> dict:
    """Return the leading report keys that every certificate shares, in their order."""
    return {
        "train_error": mean_errors["train"],
        "test_error": mean_errors.get("test"),
        "n_train": n,
        "n_test": int(x_test.shape[0]) if x_test is not None else None,
        "num_classes": num_classes,
        "chance_error": chance_error,
        "delta": delta,
        "bounds": bounds,
        "best_bound": _best_bound(bounds),
    }


def software_provenance(dtype, device, method, batch_size, sample_batch_size) -> dict:
    """Return the provenance keys that every certificate shares: versions and evaluation setup."""
    return {
        "crsam_version": crsam.__version__,
        "torch_version": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "method": method,
        "batch_size": batch_size,
        "sample_batch_size": sample_batch_size,
    }


def _prior_section(prior_info) -> dict:
    """Describe the prior from the caller's metadata; ``kind`` defaults to ``"init"``."""
    if prior_info is not None and not isinstance(prior_info, Mapping):
        raise ValueError(
            f"prior_info must be a mapping, got {type(prior_info).__name__}; pass for example "
            "{'kind': 'init', 'seed': 0}"
        )
    section = {"kind": "init", "distribution": "N(w0, sigma^2 I)"}
    section.update(dict(prior_info or {}))
    return section


def _json_safe(value):
    """Convert ``value`` to JSON types: NaN and infinities become None, tensors become lists."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    # Caller metadata of another type (a path, an enum) is kept as its text.
    return str(value)
