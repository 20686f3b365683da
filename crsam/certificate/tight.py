r"""Tight PAC-Bayes certificate: a prior learned on a held-out split and an optimized posterior.

The procedure follows Dziugaite and Roy (2017) and Perez-Ortiz et al. (2021):

1. **Split.** The training set :math:`S` is split at random into a prior split :math:`S_P` and a
   bound split :math:`S_B` (disjoint, both index sets hashed in the report). The bound uses
   :math:`S_B` only, so :math:`n = |S_B|`.
2. **Prior mean.** Starting from the initial weights, a copy of the network is trained on
   :math:`S_P` alone (cross-entropy, SGD, SAM or CR-SAM, cosine schedule). Its weights
   :math:`\mu_P` are independent of :math:`S_B`, so each
   :math:`P_k = \mathcal N(\mu_P, \sigma_k^2 I)` with :math:`\sigma_k` from a grid of :math:`K`
   scales fixed in advance is a valid prior for a bound on :math:`S_B`.
3. **Posterior.** :math:`Q = \mathcal N(\mu, \mathrm{diag}(s^2))` with one standard deviation
   per parameter tensor (``variance="layer"``) or per scalar parameter
   (``variance="parameter"``), started at :math:`\mu = \mu_P` (or the trained network) and
   :math:`s = \sigma_0`. The means (optionally), the log standard deviations and a continuous
   log prior scale are fitted by Adam on :math:`S_B` to minimize a PAC-Bayes bound on a bounded
   surrogate loss,

   .. math::

       \Big(\sqrt{\hat\ell + B/2} + \sqrt{B/2}\Big)^2 \;\text{(quad)} \quad\text{or}\quad
       \mathrm{kl}^{-1}_+(\hat\ell, B) \;\text{(kl)}, \qquad
       B = \frac{\mathrm{KL}(Q\|P) + \ln(2\sqrt n / \delta)}{n},

   where :math:`\hat\ell` is the cross-entropy clipped at :math:`p_{\min}` and divided by
   :math:`\ln(1/p_{\min})` (so it lies in [0, 1]), averaged over a minibatch at one weight
   sample :math:`\mu + s \odot \epsilon`, :math:`\epsilon \sim \mathcal N(0, I)` (the
   reparameterization trick). The posterior may depend on :math:`S_B` freely: PAC-Bayes bounds
   hold for all posteriors at once.
4. **Prior scale.** After the fit, the grid scale :math:`\sigma_k` with the smallest
   :math:`\mathrm{KL}(Q\|P_k)` is chosen. Every grid value has its own event in the union bound,
   so this data-dependent choice is paid for with :math:`\ln K` nats.
5. **Certificate.** Weight samples drawn from a noise stream independent of the fit's give the
   Monte-Carlo mean of the 0-1 error on :math:`S_B` and its upper bound
   (:func:`crsam.theory.sample_bound` with :math:`\delta_{MC}`). By default every example gets
   its own fresh weight sample in each of ``mc_samples`` rounds, which gives
   :math:`N = m |S_B|` independent draws (see :func:`certify_diagonal_posterior`). The rows of
   :mod:`crsam.certificate.gaussian` (kl family, Catoni, Dziugaite-Roy) are then evaluated with
   :math:`n = |S_B|`, each family with its own share of :math:`\delta`.

The certified quantity is the expected 0-1 error on the data distribution of the stochastic
predictor that draws fresh weights from :math:`Q` for each prediction.

The network is evaluated in eval mode with the floating-point buffers of the prior network
(BatchNorm running statistics, if any), which depend on :math:`S_P` only and are therefore part of
the prior's fixed architecture.

References
----------
- Dziugaite, G. K., & Roy, D. M. (2017). Computing nonvacuous generalization bounds for deep
  (stochastic) neural networks with many more parameters than training data. UAI.
- Hoeffding, W. (1963). Probability inequalities for sums of bounded random variables. Journal
  of the American Statistical Association 58(301).
- Kingma, D. P., & Welling, M. (2014). Auto-encoding variational Bayes. ICLR.
- Langford, J., & Caruana, R. (2001). (Not) bounding the true error. NeurIPS 14.
- Perez-Ortiz, M., Rivasplata, O., Shawe-Taylor, J., & Szepesvari, C. (2021). Tighter risk
  certificates for neural networks. JMLR 22.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from crsam.data import PriorSplit, hash_tensors, split_for_prior
from crsam.theory import gaussian_kl, kl_inv_upper, kl_inv_upper_grad, sample_bound

from .gaussian import (
    BOUND_FAMILIES,
    DEFAULT_DELTA,
    DEFAULT_MONTE_CARLO_FRACTION,
    DEFAULT_PRIOR_VARIANCE_B,
    DEFAULT_PRIOR_VARIANCE_C,
    DEFAULT_SIGMA_GRID,
    _is_integer,
    _is_real,
    _json_safe,
    _resolve_method_with_fallback,
    _rigor_caveats,
    check_budget_options,
    check_catoni_grid,
    check_families,
    check_prior_variance_grid,
    check_scale_grid,
    confidence_budget,
    family_rows,
    headline_section,
    posterior_errors,
    software_provenance,
)
from .montecarlo import (
    MonteCarloErrors,
    ParameterLayout,
    check_sample_count,
    count_errors,
    resolve_method,
)

OBJECTIVES = ("quad", "kl")
MC_SCHEMES = ("per-example", "per-sample")
VARIANCES = ("layer", "parameter")
POSTERIOR_INITS = ("prior", "model")
PRIOR_OPTIMIZERS = ("sgd", "sam", "crsam")

# Rounds of the per-example scheme. With n bound examples they give 10 n independent draws, so
# the kl budget ln(1 / delta_MC) / (10 n) of the Monte-Carlo bound is below 1e-4 for n >= 4000
# at delta_MC = 0.025.
DEFAULT_TIGHT_MC_SAMPLES = 10
DEFAULT_P_MIN = 1e-4


def tight_noise_seeds(seed: int) -> dict[str, int]:
    """Derive the seeds of the prior's data order, the posterior fit and the certification noise.

    The three come from independent children of ``numpy.random.SeedSequence(seed)``, so the
    certification samples share no draws with the fit's.

    >>> seeds = tight_noise_seeds(0)
    >>> len({seeds["prior"], seeds["posterior"], seeds["certification"]})
    3
    """
    children = np.random.SeedSequence(seed).spawn(3)
    prior, posterior, certification = (int(child.generate_state(1)[0]) for child in children)
    return {"prior": prior, "posterior": posterior, "certification": certification}


# ---------------------------------------------------------------------------------------------
# Step 2: the prior mean


def train_prior(
    model: nn.Module,
    init_state: Mapping[str, torch.Tensor],
    x_prior: torch.Tensor,
    y_prior: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    rho: float = 0.1,
    alpha: float = 0.1,
    beta: float = 0.01,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train a copy of ``model`` from ``init_state`` on the prior split; return its state dict.

    The loss is the mean cross-entropy, the learning rate follows a cosine schedule over
    ``epochs``, and the examples are shuffled by a generator seeded with ``seed``. ``optimizer``
    is ``"sgd"``, ``"sam"`` or ``"crsam"`` (SGD with momentum as the base, as in ``crsam
    train``). ``model`` itself is not modified. With ``epochs=0`` the initial weights are
    returned.
    """
    from crsam.train import build_optimizer, build_scheduler

    _check_tight_options(prior_fraction=0.5, split_seed=seed, prior_epochs=epochs, prior_lr=lr,
                         prior_optimizer=optimizer, prior_batch_size=batch_size,
                         prior_weight_decay=weight_decay)
    network = copy.deepcopy(model)
    network.load_state_dict(init_state, strict=False)
    if epochs == 0:
        return _clone_state(network)

    # The same optimizer construction as 'crsam train', from a configuration dict.
    sharpness = optimizer in ("sam", "crsam")
    config = {
        "optimizer": optimizer, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
        "rho": rho if sharpness else None,
        "alpha": alpha if optimizer == "crsam" else None,
        "beta": beta if optimizer == "crsam" else None,
    }
    step_optimizer = build_optimizer(config, network)
    scheduler = build_scheduler(step_optimizer, epochs)
    generator = torch.Generator().manual_seed(seed)
    device = next(network.parameters()).device

    network.train()
    for epoch in range(epochs):
        order = torch.randperm(x_prior.shape[0], generator=generator)
        for start in range(0, order.numel(), batch_size):
            batch = order[start:start + batch_size]
            x = x_prior[batch].to(device)
            y = y_prior[batch].to(device)

            def closure(x=x, y=y):
                step_optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(network(x), y)
                loss.backward()
                return loss

            loss = step_optimizer.step(closure)
            if not torch.isfinite(loss):
                raise ValueError(
                    f"prior training diverged in epoch {epoch + 1}: the loss is "
                    f"{float(loss.detach())}; lower prior_lr (now {lr!r})"
                )
        scheduler.step()
        if progress is not None:
            progress("prior", epoch + 1, epochs)
    return _clone_state(network)


def _clone_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """Return a detached copy of ``network``'s state dict."""
    return {name: value.detach().clone() for name, value in network.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Step 3: the posterior fit


class _KlInverseUpper(torch.autograd.Function):
    """``kl_inv_upper(q, c)`` of :mod:`crsam.theory` with its implicit-function gradient."""

    @staticmethod
    def forward(ctx, q, c):
        q_value = min(max(float(q), 0.0), 1.0)
        c_value = max(float(c), 0.0)
        ctx.save_for_backward(q, c)
        ctx.values = (q_value, c_value)
        return q.new_tensor(kl_inv_upper(q_value, c_value))

    @staticmethod
    def backward(ctx, grad_output):
        q, _ = ctx.saved_tensors
        d_q, d_c = kl_inv_upper_grad(*ctx.values)
        # The derivative in q is +inf at q = 0; a large finite slope keeps Adam's step finite.
        d_q = min(float(d_q), 1e6)
        d_c = min(float(d_c), 1e6)
        return grad_output * q.new_tensor(d_q), grad_output * q.new_tensor(d_c)


def clipped_cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor, p_min: float) -> torch.Tensor:
    r"""Compute the mean cross-entropy clipped at ``p_min`` and rescaled to [0, 1].

    .. math::

        \ell = \frac{\min(-\ln p_y, \ln(1/p_{\min}))}{\ln(1/p_{\min})},

    the torch counterpart of :func:`crsam.theory.clipped_cross_entropy`, differentiable wherever
    :math:`p_y > p_{\min}` (Perez-Ortiz et al. 2021 bound the cross-entropy the same way).
    """
    log_p_min = math.log(p_min)
    log_probability = torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return -torch.clamp(log_probability, min=log_p_min).mean() / -log_p_min


def diagonal_gaussian_kl_torch(mean, sigma, prior_mean, prior_sigma) -> torch.Tensor:
    r"""Compute :math:`\mathrm{KL}(\mathcal N(\mu, \mathrm{diag}\,s^2) \| \mathcal N(\mu_P, \sigma_P^2 I))`.

    .. math::

        \sum_i \Big[\ln\frac{\sigma_P}{s_i} + \frac{s_i^2 + (\mu_i - \mu_{P,i})^2}{2\sigma_P^2}
            - \frac12\Big],

    differentiable in every argument; the objective uses it, and the certificate recomputes the
    KL in float64 with :func:`crsam.theory.gaussian_kl`.
    """
    variance_ratio = (sigma / prior_sigma) ** 2
    squared_distance = ((mean - prior_mean) / prior_sigma) ** 2
    return 0.5 * torch.sum(variance_ratio - 1.0 - torch.log(variance_ratio) + squared_distance)


def optimize_posterior(
    model: nn.Module,
    prior_state: Mapping[str, torch.Tensor],
    initial_mean: Mapping[str, torch.Tensor],
    x_bound: torch.Tensor,
    y_bound: torch.Tensor,
    *,
    epochs: int,
    sigma_init: float | Mapping[str, torch.Tensor],
    prior_sigma_init: float,
    learn_prior_sigma: bool = True,
    objective: str = "quad",
    variance: str = "layer",
    optimize_mean: bool = True,
    p_min: float = DEFAULT_P_MIN,
    lr_mean: float = 1e-3,
    lr_sigma: float = 1e-2,
    batch_size: int = 250,
    delta: float = DEFAULT_DELTA,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    r"""Fit :math:`Q = \mathcal N(\mu, \mathrm{diag}\,s^2)` by minimizing a PAC-Bayes objective.

    The objective is the ``objective`` bound (``"quad"`` or ``"kl"``) on the clipped
    cross-entropy (:func:`clipped_cross_entropy_loss`) with
    :math:`B = (\mathrm{KL}(Q\|P) + \ln(2\sqrt n/\delta))/n`, ``n`` the number of bound examples
    and :math:`P = \mathcal N(\mu_P, \sigma_P^2 I)`, whose scale starts at ``prior_sigma_init``
    and is learned when ``learn_prior_sigma``. Each minibatch uses one weight sample
    :math:`\mu + s \odot \epsilon`, with :math:`\epsilon` drawn from a generator seeded with
    ``seed``. Adam updates the means (when ``optimize_mean``) with ``lr_mean`` and the log
    standard deviations (and :math:`\ln \sigma_P`) with ``lr_sigma``. The standard deviations
    start at ``sigma_init``: a number, or the ``sigma`` mapping of an earlier call with the same
    ``variance``. The network is kept in eval mode.

    Returns ``(mean, sigma, history)``. ``mean`` maps each parameter name to its fitted means.
    ``sigma`` maps it to its standard deviations: a 0-d tensor per parameter tensor, or a tensor
    of the parameter's shape. ``history`` records the final prior scale and the per-epoch
    averages of the objective, the surrogate loss and the KL.
    """
    _check_tight_options(prior_fraction=0.5, split_seed=seed, posterior_epochs=epochs,
                         posterior_variance=variance, objective=objective, p_min=p_min,
                         prior_sigma_init=prior_sigma_init, posterior_lr_mean=lr_mean,
                         posterior_lr_sigma=lr_sigma, posterior_batch_size=batch_size)
    if not isinstance(sigma_init, Mapping) and (
            not _is_real(sigma_init) or not math.isfinite(sigma_init) or sigma_init <= 0.0):
        raise ValueError(f"sigma_init must be a finite number > 0 or a mapping of standard "
                         f"deviations, got {sigma_init!r}")
    layout = ParameterLayout.from_model(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = int(x_bound.shape[0])

    # Flat posterior parameters: means, log standard deviations and the log prior scale.
    prior_mean = layout.flatten({name: prior_state[name] for name in layout.names}).to(device, dtype)
    mean = layout.flatten(initial_mean).to(device, dtype).clone().requires_grad_(optimize_mean)
    if isinstance(sigma_init, Mapping):
        if variance == "layer":
            start = torch.stack([torch.as_tensor(sigma_init[name]).reshape(()) for name in layout.names])
        else:
            start = layout.flatten({name: torch.as_tensor(sigma_init[name]).expand(shape)
                                    for name, shape in zip(layout.names, layout.shapes)})
        log_sigma = torch.log(start.to(device, dtype)).requires_grad_(True)
    else:
        sigma_size = len(layout.names) if variance == "layer" else layout.num_parameters
        log_sigma = torch.full((sigma_size,), math.log(sigma_init), dtype=dtype, device=device,
                               requires_grad=True)
    log_prior_sigma = torch.tensor(math.log(prior_sigma_init), dtype=dtype, device=device,
                                   requires_grad=learn_prior_sigma)
    numels = torch.tensor(layout.numels, device=device)

    def flat_sigma():
        # Expand one value per parameter tensor to every scalar of that tensor.
        sigma = torch.exp(log_sigma)
        return torch.repeat_interleave(sigma, numels) if variance == "layer" else sigma

    groups = [{"params": [log_sigma, log_prior_sigma] if learn_prior_sigma else [log_sigma],
               "lr": lr_sigma}]
    if optimize_mean:
        groups.append({"params": [mean], "lr": lr_mean})
    optimizer = torch.optim.Adam(groups)
    generator = torch.Generator(device=device).manual_seed(seed)
    order_generator = torch.Generator().manual_seed(seed)
    log_term = math.log(2.0 * math.sqrt(n) / delta)

    history = []
    was_training = model.training
    model.eval()
    try:
        for epoch in range(epochs):
            totals = {"objective": 0.0, "surrogate": 0.0, "kl": 0.0}
            order = torch.randperm(n, generator=order_generator)
            steps = 0
            for start in range(0, n, batch_size):
                batch = order[start:start + batch_size]
                x = x_bound[batch].to(device)
                y = y_bound[batch].to(device)

                # One weight sample per minibatch, differentiable in mean and log sigma.
                sigma = flat_sigma()
                noise = torch.randn(layout.num_parameters, generator=generator, dtype=dtype,
                                    device=device)
                weights = mean + sigma * noise
                logits = functional_call(model, layout.unflatten(weights), (x,))
                surrogate = clipped_cross_entropy_loss(logits, y, p_min)

                # The PAC-Bayes objective with the continuous prior scale.
                kl = diagonal_gaussian_kl_torch(mean, sigma, prior_mean, torch.exp(log_prior_sigma))
                budget = (kl + log_term) / n
                if objective == "quad":
                    loss = (torch.sqrt(surrogate + budget / 2) + torch.sqrt(budget / 2)) ** 2
                else:
                    loss = _KlInverseUpper.apply(surrogate, budget)

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"posterior optimization diverged in epoch {epoch + 1}: the objective "
                        f"is {float(loss.detach())}; lower posterior_lr_mean ({lr_mean!r}) or "
                        f"posterior_lr_sigma ({lr_sigma!r})"
                    )
                totals["objective"] += float(loss.detach())
                totals["surrogate"] += float(surrogate.detach())
                totals["kl"] += float(kl.detach())
                steps += 1
            current_prior_sigma = (float(torch.exp(log_prior_sigma).detach())
                                   if learn_prior_sigma else prior_sigma_init)
            history.append({"epoch": epoch + 1, **{key: value / steps for key, value in totals.items()},
                            "prior_sigma": current_prior_sigma})
            if progress is not None:
                progress("posterior", epoch + 1, epochs)
    finally:
        model.train(was_training)

    # Parameter-shaped means and standard deviations, detached.
    mean_state = {name: value.detach().clone()
                  for name, value in layout.unflatten(mean.detach()).items()}
    sigma_values = torch.exp(log_sigma.detach())
    if variance == "layer":
        sigma_state = {name: sigma_values[index].clone() for index, name in enumerate(layout.names)}
    else:
        sigma_state = {name: value.clone() for name, value in layout.unflatten(sigma_values).items()}
    final_prior_sigma = float(torch.exp(log_prior_sigma.detach())) if learn_prior_sigma else prior_sigma_init
    record = {"prior_sigma": final_prior_sigma, "history": history}
    return mean_state, sigma_state, record


# ---------------------------------------------------------------------------------------------
# Step 5: the certificate of a diagonal Gaussian posterior


class _DiagonalWeightSampler:
    """Seeded stream of weight samples ``mean + sigma * e_j``, ``e_j ~ N(0, I)``, sigma a vector.

    As in :class:`crsam.certificate.WeightSampler`, each ``e_j`` comes from its own
    ``torch.randn`` call, so the j-th sample does not depend on the chunk sizes.
    """

    def __init__(self, mean: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator):
        self.mean = mean
        self.sigma = sigma
        self.generator = generator

    def draw(self, count: int) -> torch.Tensor:
        """Return the next ``count`` weight samples as a ``(count, k)`` tensor."""
        noise = torch.empty((count, self.mean.numel()), dtype=self.mean.dtype,
                            device=self.mean.device)
        for row in noise:
            torch.randn(row.shape, generator=self.generator, dtype=row.dtype, device=row.device,
                        out=row)
        return noise.mul_(self.sigma).add_(self.mean)


def _per_example_logits(model):
    """Return ``f(weights (B, k) split by layer, x (B, ...)) -> logits (B, C)``, one weight each."""
    def single(parameters, example):
        return functional_call(model, parameters, (example.unsqueeze(0),)).squeeze(0)
    return vmap(single, in_dims=(0, 0))


def _estimate_diagonal_errors(model, layout, mean, sigma, seed, num_samples, datasets, *,
                              scheme, batch_size, sample_batch_size, method, num_classes,
                              progress):
    """Evaluate the diagonal posterior's 0-1 error on each data set by Monte Carlo.

    ``scheme="per-sample"``: ``num_samples`` weight samples, each evaluated on every example;
    ``count_j`` is the number of errors of sample ``j``. ``scheme="per-example"``:
    ``num_samples`` rounds, and in each round every example gets its own fresh weight sample;
    ``count_r`` is the number of errors of round ``r``. In both cases the mean of
    ``count / n`` is an unbiased estimate of the posterior's error, and the summed softmax
    outputs give the ensemble error. Only running totals are kept (see ``MonteCarloErrors``).
    """
    generator = torch.Generator(device=mean.device).manual_seed(int(seed))
    totals = {name: MonteCarloErrors(int(x.shape[0])) for name, (x, _) in datasets.items()}
    probability_sums = {
        name: torch.zeros((x.shape[0], num_classes), dtype=torch.float64, device=mean.device)
        for name, (x, _) in datasets.items()
    }

    if scheme == "per-sample":
        # Draw each chunk of weight samples once and evaluate it on every data set.
        sampler = _DiagonalWeightSampler(mean, sigma, generator)
        done = 0
        while done < num_samples:
            weights = sampler.draw(min(sample_batch_size, num_samples - done))
            for name, (x, y) in datasets.items():
                chunk = count_errors(model, layout, weights, x, y, batch_size=batch_size,
                                     method=method, probability_sum=probability_sums[name])
                totals[name].add(chunk.cpu())
            done += weights.shape[0]
            if progress is not None:
                progress("certification", done, num_samples)
    else:
        # Each round draws one weight sample per example, batch by batch.
        logits_of = _per_example_logits(model)
        for round_index in range(num_samples):
            for name, (x, y) in datasets.items():
                errors = 0
                with torch.inference_mode():
                    for start in range(0, x.shape[0], batch_size):
                        inputs = x[start:start + batch_size].to(mean.device)
                        labels = y[start:start + batch_size].to(mean.device)
                        noise = torch.randn((inputs.shape[0], mean.numel()), generator=generator,
                                            dtype=mean.dtype, device=mean.device)
                        weights = noise.mul_(sigma).add_(mean)
                        logits = logits_of(layout.unflatten(weights), inputs)
                        errors += int((logits.argmax(dim=-1) != labels).sum())
                        stop = start + inputs.shape[0]
                        probability_sums[name][start:stop] += torch.softmax(logits.double(), dim=-1)
                totals[name].add(np.array([errors], dtype=np.int64))
            if progress is not None:
                progress("certification", round_index + 1, num_samples)

    for name, (_, y) in datasets.items():
        predictions = probability_sums[name].argmax(dim=-1).cpu()
        totals[name].ensemble_errors = int((predictions != y.cpu()).sum())
    return totals


def certify_diagonal_posterior(
    model: nn.Module,
    prior_state: Mapping[str, torch.Tensor],
    posterior_mean: Mapping[str, torch.Tensor],
    posterior_sigma: Mapping[str, torch.Tensor | float],
    x_bound: torch.Tensor,
    y_bound: torch.Tensor,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    *,
    delta: float = DEFAULT_DELTA,
    monte_carlo_fraction: float = DEFAULT_MONTE_CARLO_FRACTION,
    families: Sequence[str] = BOUND_FAMILIES,
    prior_sigma_grid: Sequence[float] | None = None,
    catoni_grid: Sequence[float] | None = None,
    prior_variance_b: float = DEFAULT_PRIOR_VARIANCE_B,
    prior_variance_c: float = DEFAULT_PRIOR_VARIANCE_C,
    mc_samples: int = DEFAULT_TIGHT_MC_SAMPLES,
    mc_scheme: str = "per-example",
    seed: int = 0,
    batch_size: int = 1000,
    sample_batch_size: int = 16,
    method: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    r"""Certify the expected 0-1 error of :math:`Q = \mathcal N(\mu, \mathrm{diag}\,s^2)`.

    The prior is :math:`P_k = \mathcal N(\mu_P, \sigma_k^2 I)` with :math:`\mu_P` the parameters
    of ``prior_state``, which must not depend on ``(x_bound, y_bound)``, and :math:`\sigma_k`
    the value of ``prior_sigma_grid`` with the smallest :math:`\mathrm{KL}(Q\|P_k)`, computed
    in float64 by :func:`crsam.theory.gaussian_kl`. The confidence accounting and the rows are
    those of :func:`crsam.certificate.certify`, with the prior-scale grid in place of the sigma
    grid.

    The Monte-Carlo step draws weights from a generator seeded with ``seed`` (use a seed that no
    earlier step used) in one of two schemes. Both estimate
    :math:`\hat L_S(Q) = \frac1n \sum_i \Pr_{h \sim Q}[h(x_i) \ne y_i]` without bias, and
    both bound it by :math:`\mathrm{kl}^{-1}_+(\hat q, \ln(1/\delta_{MC})/N)`:

    - ``"per-sample"``: ``mc_samples`` weight samples :math:`h_j`, each evaluated on all
      :math:`n` examples. The :math:`N = m` errors :math:`L_S(h_j) \in [0, 1]` are i.i.d.
      with mean :math:`\hat L_S(Q)` (Langford and Caruana 2001).
    - ``"per-example"`` (default): ``mc_samples`` rounds, and in each round every example
      :math:`x_i` gets its own fresh weight sample :math:`h_{i,r}`. The :math:`N = m n`
      indicators :math:`1[h_{i,r}(x_i) \ne y_i]` are independent but not identically
      distributed (their means are the per-example errors). Hoeffding's (1963) Theorem 1
      bounds the tail of the average of independent [0, 1]-valued variables by
      :math:`e^{-N\,\mathrm{kl}}` with the average of their means, which is
      :math:`\hat L_S(Q)`, so the same kl inverse applies with :math:`N = m n`. For the same
      compute this gives hundreds of times more draws than ``"per-sample"``, whose
      :math:`\ln(1/\delta)/m` term dominates the certificate at a few thousand samples.
      The weights come from one ``torch.randn`` call per batch of ``batch_size`` examples,
      so the draws depend on ``batch_size`` (which the report records).

    .. note::
        The per-example scheme holds ``batch_size`` weight vectors at once, so its memory grows
        as ``batch_size * num_parameters``: 1000 x 7710 float32 values (31 MB) for the MNIST-1D
        CNN. Lower ``batch_size`` for large networks.

    Parameters
    ----------
    model : torch.nn.Module
        The network; its parameters are replaced by weight samples through
        ``torch.func.functional_call``, and its buffers are used as they are.
    prior_state : mapping of str to torch.Tensor
        State dict at the prior mean; it must contain every parameter.
    posterior_mean : mapping of str to torch.Tensor
        The posterior means, one tensor per parameter.
    posterior_sigma : mapping of str to torch.Tensor or float
        Standard deviations per parameter tensor: a number (one value for the tensor) or a
        tensor of the parameter's shape, finite and > 0.
    x_bound, y_bound : torch.Tensor
        The ``n`` examples of the bound.
    x_test, y_test : torch.Tensor, optional
        Held-out examples, for the reported test errors only.
    delta, monte_carlo_fraction, families, catoni_grid, prior_variance_b, prior_variance_c
        As in :func:`crsam.certificate.certify`; ``families`` defaults to all three here.
    prior_sigma_grid : sequence of float, optional
        Prior scales fixed before seeing the data; defaults to ``DEFAULT_SIGMA_GRID``.
    mc_samples : int
        Weight samples per example: whole-set samples (``"per-sample"``) or rounds of fresh
        per-example samples (``"per-example"``).
    mc_scheme : {"per-example", "per-sample"}
        Monte-Carlo scheme, see above.
    seed, batch_size, sample_batch_size, method, progress
        As in :func:`crsam.certificate.certify`. ``sample_batch_size`` and ``method`` apply to
        the ``"per-sample"`` scheme. The ``"per-example"`` scheme falls back to it, with a
        warning, when ``torch.func.vmap`` cannot batch the model.

    Returns
    -------
    dict
        The report of :func:`crsam.certificate.certify` with ``procedure`` set to
        ``"learned-prior"``, a ``prior`` section with the chosen scale and the KL at every grid
        value, and ``per_layer`` entries with the posterior's standard deviations.

    Raises
    ------
    ValueError
        If an argument is invalid; the message names the value and the fix.
    """
    started = time.perf_counter()

    # Check the arguments before any forward pass.
    grid = check_scale_grid(prior_sigma_grid, "prior_sigma_grid", DEFAULT_SIGMA_GRID,
                            "[0.01, 0.03, 0.1]")
    families = check_families(families)
    catoni_constants = check_catoni_grid(catoni_grid)
    check_prior_variance_grid(prior_variance_b, prior_variance_c)
    check_budget_options(delta, monte_carlo_fraction, seed, method, mc_samples=mc_samples,
                         batch_size=batch_size, sample_batch_size=sample_batch_size)
    if mc_scheme not in MC_SCHEMES:
        raise ValueError(f"mc_scheme must be one of {', '.join(MC_SCHEMES)}, got {mc_scheme!r}")
    layout = ParameterLayout.from_model(model)
    _check_state(layout, prior_state, "prior_state")
    _check_state(layout, posterior_mean, "posterior_mean")
    _check_labelled(x_bound, y_bound, "bound")
    check_sample_count("mc_samples", mc_samples, int(x_bound.shape[0]))
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test must be given together; pass both or neither")
    if x_test is not None:
        _check_labelled(x_test, y_test, "test")
    _check_input_dtype(model, x_bound, x_test)

    # Flat float64 copies of the means and standard deviations for the KL.
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    mean = layout.flatten(posterior_mean).to(device, dtype)
    sigma = _flat_sigma(layout, posterior_sigma).to(device, dtype)
    prior_mean = layout.flatten({name: prior_state[name] for name in layout.names}).to(device, dtype)
    mean64 = mean.double().cpu().numpy()
    sigma64 = sigma.double().cpu().numpy()
    prior64 = prior_mean.double().cpu().numpy()

    # Prior scale: the grid value with the smallest KL (every value is paid for).
    kl_by_sigma = [gaussian_kl(mean64, sigma64, prior64, value) for value in grid]
    chosen_index = int(np.argmin(kl_by_sigma))
    prior_sigma = grid[chosen_index]
    kl_nats = kl_by_sigma[chosen_index]

    budget = confidence_budget(delta, monte_carlo_fraction, families, len(grid),
                               len(catoni_constants), grid_name="prior-scale grid")
    datasets = {"train": (x_bound, y_bound)}
    if x_test is not None:
        datasets["test"] = (x_test, y_test)

    was_training = model.training
    model.eval()
    try:
        # The network at the posterior mean, and the number of classes.
        with torch.inference_mode():
            logits = functional_call(model, layout.unflatten(mean), (x_bound[:1].to(device),))
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(
                f"the model must return logits of shape (batch, num_classes) with num_classes "
                f">= 2, got shape {tuple(logits.shape)}"
            )
        num_classes = int(logits.shape[1])
        _check_label_range(datasets, num_classes)
        mean_errors = {name: _error_rate(model, layout, mean, x, y, batch_size)
                       for name, (x, y) in datasets.items()}
        prior_errors = {name: _error_rate(model, layout, prior_mean, x, y, batch_size)
                        for name, (x, y) in datasets.items()}
        method = _resolve_method_with_fallback(model, layout, mean, x_bound, method)
        report_warnings = []
        if mc_scheme == "per-example" and not _vmap_works(model, layout, mean, x_bound):
            mc_scheme = "per-sample"
            report_warnings.append(
                "torch.func.vmap cannot evaluate this model with one weight sample per example, "
                "so the Monte-Carlo step used the per-sample scheme"
            )

        # Fresh weight samples for the certificate.
        estimates = _estimate_diagonal_errors(
            model, layout, mean, sigma, seed, mc_samples, datasets, scheme=mc_scheme,
            batch_size=batch_size, sample_batch_size=sample_batch_size, method=method,
            num_classes=num_classes, progress=progress,
        )
    finally:
        model.train(was_training)

    # Upper bound on the posterior's empirical error, then every family's rows.
    train_estimate = estimates["train"]
    n = int(x_bound.shape[0])
    draws = mc_samples * n if mc_scheme == "per-example" else mc_samples
    empirical_upper = float(sample_bound(train_estimate.mean, draws, budget["monte_carlo"]))
    chance_error = 1.0 - 1.0 / num_classes
    caveats = _rigor_caveats(model, prior_state)
    # KL(Q || N(mu_P, v I)) is smallest at v = (sum s_i^2 + ||mu - mu_P||^2) / k.
    second_moment = math.fsum((sigma64**2).tolist()) + math.fsum(((mean64 - prior64) ** 2).tolist())
    bounds, row_warnings = family_rows(
        budget, empirical_upper, n, chance_error, rigorous=not caveats, kl_nats=kl_nats,
        catoni_grid=catoni_constants,
        dziugaite_roy=dict(
            kl_at_variance=lambda value: gaussian_kl(mean64, sigma64, prior64, math.sqrt(value)),
            optimal_variance=second_moment / layout.num_parameters,
            b=float(prior_variance_b), c=float(prior_variance_c)),
    )

    # Warnings a reader of the report must see.
    report_warnings = list(caveats) + report_warnings + row_warnings
    if len(grid) > 1 and chosen_index in (0, len(grid) - 1):
        side = "smallest" if chosen_index == 0 else "largest"
        report_warnings.append(
            f"the chosen prior scale {prior_sigma:.4g} is the {side} value of the grid, so a "
            "wider grid might give a smaller KL. Pass a grid that extends past it: --sigma-grid "
            "of 'crsam bound --prior learned', or prior_sigma_grid of "
            "crsam.certificate.tight_certificate"
        )
    for message in report_warnings:
        warnings.warn(message, stacklevel=2)

    report = {
        "procedure": "learned-prior",
        **headline_section(mean_errors, n, x_test, num_classes, chance_error, delta, bounds),
        "confidence": budget,
        "sigma_grid": list(grid),
        "sigma_grid_cost_nats": math.log(len(grid)),
        "kl": kl_nats,
        "distance": math.sqrt(math.fsum(((mean64 - prior64) ** 2).tolist())),
        "monte_carlo": {
            "scheme": mc_scheme,
            "samples": mc_samples,
            "draws": draws,
            "n": n,
            "mean": train_estimate.mean,
            "stderr": train_estimate.stderr,
            "upper": empirical_upper,
            "delta": budget["monte_carlo"],
            "seed": seed,
        },
        "posterior": {
            "distribution": "N(mu, diag(s^2))",
            "num_parameters": layout.num_parameters,
            "sigma_min": float(sigma64.min()),
            "sigma_max": float(sigma64.max()),
            "sigma_rms": math.sqrt(math.fsum((sigma64**2).tolist()) / sigma64.size),
            "certified": "stochastic",
            "certified_description": "expected 0-1 error on the data distribution of the "
                                     "stochastic predictor mu + s * e, e ~ N(0, I), with fresh "
                                     "weights for each prediction",
            "errors": posterior_errors(mean_errors, estimates),
        },
        "prior": {
            "kind": "learned",
            "distribution": "N(mu_P, sigma_P^2 I)",
            "sigma": prior_sigma,
            "sigma_on_grid_edge": len(grid) > 1 and chosen_index in (0, len(grid) - 1),
            "kl_by_sigma": kl_by_sigma,
            "errors": {"train": prior_errors["train"], "test": prior_errors.get("test")},
        },
        "per_layer": _per_layer(layout, mean, sigma, prior_mean, prior_sigma),
        "warnings": report_warnings,
        "provenance": {
            "certification_seed": seed,
            **software_provenance(dtype, device, method, batch_size, sample_batch_size),
            "bound_sha256": hash_tensors(x_bound, y_bound),
            "runtime_seconds": time.perf_counter() - started,
        },
    }
    return _json_safe(report)


def _per_layer(layout, mean, sigma, prior_mean, prior_sigma) -> list[dict]:
    """KL, distance from the prior mean and posterior standard deviations per parameter tensor."""
    rows = []
    pieces = zip(layout.names, layout.unflatten(mean).values(), layout.unflatten(sigma).values(),
                 layout.unflatten(prior_mean).values())
    for name, mean_piece, sigma_piece, prior_piece in pieces:
        mean64 = mean_piece.double().cpu().numpy().ravel()
        sigma64 = sigma_piece.double().cpu().numpy().ravel()
        prior64 = prior_piece.double().cpu().numpy().ravel()
        rows.append({
            "name": name,
            "num_parameters": int(mean64.size),
            "distance": math.sqrt(math.fsum(((mean64 - prior64) ** 2).tolist())),
            "sigma_min": float(sigma64.min()),
            "sigma_max": float(sigma64.max()),
            "kl": gaussian_kl(mean64, sigma64, prior64, prior_sigma),
        })
    return rows


def _vmap_works(model, layout, mean, x) -> bool:
    """Return whether the per-example evaluation runs on this model (probed on two examples)."""
    probe = x[:2].to(mean.device)
    try:
        with torch.inference_mode():
            _per_example_logits(model)(layout.unflatten(mean.expand(probe.shape[0], -1)), probe)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _error_rate(model, layout, center, x, y, batch_size) -> float:
    """Return the 0-1 error of the network at the flat weights ``center`` on ``(x, y)``."""
    errors = count_errors(model, layout, center.unsqueeze(0), x, y, batch_size=batch_size,
                          method="loop")
    return int(errors[0]) / int(x.shape[0])


# ---------------------------------------------------------------------------------------------
# The whole procedure


def tight_certificate(
    model: nn.Module,
    init_state: Mapping[str, torch.Tensor] | None,
    data,
    *,
    prior_fraction: float = 0.5,
    split: PriorSplit | None = None,
    split_seed: int = 0,
    prior_state: Mapping[str, torch.Tensor] | None = None,
    prior_epochs: int = 20,
    prior_lr: float = 0.1,
    prior_optimizer: str = "sgd",
    prior_batch_size: int = 128,
    prior_weight_decay: float = 5e-4,
    posterior_init: str = "prior",
    posterior_epochs: int = 10,
    refit_epochs: int = 2,
    posterior_variance: str = "layer",
    optimize_mean: bool = True,
    objective: str = "quad",
    p_min: float = DEFAULT_P_MIN,
    prior_sigma_init: float = 0.03,
    posterior_lr_mean: float = 1e-3,
    posterior_lr_sigma: float = 1e-2,
    posterior_batch_size: int = 250,
    delta: float = DEFAULT_DELTA,
    monte_carlo_fraction: float = DEFAULT_MONTE_CARLO_FRACTION,
    families: Sequence[str] = BOUND_FAMILIES,
    prior_sigma_grid: Sequence[float] | None = None,
    catoni_grid: Sequence[float] | None = None,
    prior_variance_b: float = DEFAULT_PRIOR_VARIANCE_B,
    prior_variance_c: float = DEFAULT_PRIOR_VARIANCE_C,
    mc_samples: int = DEFAULT_TIGHT_MC_SAMPLES,
    mc_scheme: str = "per-example",
    seed: int = 0,
    batch_size: int = 1000,
    sample_batch_size: int = 16,
    method: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    r"""Certify a network with a prior trained on a held-out split and an optimized posterior.

    The five steps and their confidence accounting are in the module docstring. The returned
    report has the keys of :func:`crsam.certificate.certify` (``train_error`` and ``n_train``
    refer to the bound split), so :func:`crsam.certificate.format_certificate_table` prints it,
    plus ``split``, ``optimization`` and a ``prior`` section with ``kind = "learned"``.

    Parameters
    ----------
    model : torch.nn.Module
        The network, never modified; its architecture and buffers are copied. With
        ``posterior_init="model"`` its current weights are the posterior's starting means, for
        example those of a network trained with CR-SAM on the whole training set. That is
        allowed because the posterior may depend on every example.
    init_state : mapping of str to torch.Tensor or None
        Initial weights from which the prior is trained. It may be None when ``prior_state`` is
        given.
    data : crsam.data.Dataset or tuple
        An object with ``x_train``, ``y_train``, ``x_test``, ``y_test``, or a tuple
        ``(x_train, y_train)`` or ``(x_train, y_train, x_test, y_test)``.
    prior_fraction : float
        Fraction of the training set in the prior split, in (0, 1).
    split : crsam.data.PriorSplit, optional
        A split to reuse, for example the one a checkpoint trained with ``--prior-split``
        recorded. By default ``crsam.data.split_for_prior(n, prior_fraction, seed=split_seed)``.
    prior_state : mapping, optional
        Prior mean already trained on ``split.prior_indices`` alone; skips the prior training.
    prior_epochs, prior_lr, prior_optimizer, prior_batch_size, prior_weight_decay
        Prior training (:func:`train_prior`); ``prior_optimizer`` is ``"sgd"``, ``"sam"`` or
        ``"crsam"``.
    posterior_init : {"prior", "model"}
        Starting means of the posterior: the prior mean, or the weights of ``model``.
    posterior_epochs, refit_epochs, posterior_variance, optimize_mean, objective, p_min,
    prior_sigma_init, posterior_lr_mean, posterior_lr_sigma, posterior_batch_size
        The posterior fit (:func:`optimize_posterior`). ``posterior_variance`` is ``"layer"``
        (one standard deviation per parameter tensor) or ``"parameter"``; the standard deviations
        and the continuous prior scale start at ``prior_sigma_init``. The fit runs
        ``posterior_epochs`` with the prior scale learned. It then moves the scale to the
        nearest value of ``prior_sigma_grid`` (in log scale) and runs ``refit_epochs`` more with
        it fixed, so that the posterior adapts to a scale the certificate can use.
    delta, monte_carlo_fraction, families, prior_sigma_grid, catoni_grid, prior_variance_b,
    prior_variance_c, mc_samples, mc_scheme, batch_size, sample_batch_size, method
        The certificate (:func:`certify_diagonal_posterior`).
    seed : int
        Seed of the prior's data order, the fit's noise and the certification noise, three
        independent streams (:func:`tight_noise_seeds`).
    progress : callable, optional
        Called as ``progress(stage, done, total)`` with stage ``"prior"``, ``"posterior"`` or
        ``"certification"``.

    Returns
    -------
    dict
        JSON-serializable report (no NaN or infinity).

    Raises
    ------
    ValueError
        If an argument is invalid; the message names the value and the fix.
    """
    started = time.perf_counter()

    # Check every option before any training.
    x_train, y_train, x_test, y_test = _unpack_data(data)
    _check_tight_options(
        prior_fraction=prior_fraction, split_seed=split_seed, prior_epochs=prior_epochs,
        prior_lr=prior_lr, prior_optimizer=prior_optimizer, prior_batch_size=prior_batch_size,
        prior_weight_decay=prior_weight_decay, posterior_init=posterior_init,
        posterior_epochs=posterior_epochs, refit_epochs=refit_epochs,
        posterior_variance=posterior_variance,
        objective=objective, p_min=p_min, prior_sigma_init=prior_sigma_init,
        posterior_lr_mean=posterior_lr_mean, posterior_lr_sigma=posterior_lr_sigma,
        posterior_batch_size=posterior_batch_size,
    )
    check_budget_options(delta, monte_carlo_fraction, seed, method, mc_samples=mc_samples,
                         batch_size=batch_size, sample_batch_size=sample_batch_size)
    if mc_scheme not in MC_SCHEMES:
        raise ValueError(f"mc_scheme must be one of {', '.join(MC_SCHEMES)}, got {mc_scheme!r}")
    families = check_families(families)
    grid = check_scale_grid(prior_sigma_grid, "prior_sigma_grid", DEFAULT_SIGMA_GRID,
                            "[0.01, 0.03, 0.1]")
    catoni_constants = check_catoni_grid(catoni_grid)
    check_prior_variance_grid(prior_variance_b, prior_variance_c)
    # Reject a delta whose shares underflow now, before the prior training.
    confidence_budget(delta, monte_carlo_fraction, families, len(grid), len(catoni_constants))
    layout = ParameterLayout.from_model(model)
    if layout.num_parameters == 0:
        raise ValueError("model has no parameters, so there is no posterior to certify; "
                         "pass a model with parameters")
    if prior_state is None and init_state is None:
        raise ValueError("init_state is None and no prior_state was given; pass the initial "
                         "weights to train the prior from, or a trained prior_state")
    if init_state is not None:
        _check_state(layout, init_state, "init_state", model)
    if prior_state is not None:
        _check_state(layout, prior_state, "prior_state", model)
    _check_input_dtype(model, x_train, x_test)

    # Step 1: the split, checked for disjointness; n counts the bound split alone.
    if split is None:
        split = split_for_prior(int(y_train.shape[0]), prior_fraction, seed=split_seed)
    split_section = _check_split(split, int(y_train.shape[0]))
    check_sample_count("mc_samples", mc_samples, split_section["n_bound"])
    x_prior, y_prior = x_train[split.prior_indices], y_train[split.prior_indices]
    x_bound, y_bound = x_train[split.bound_indices], y_train[split.bound_indices]
    seeds = tight_noise_seeds(seed)

    # Step 2: the prior mean, trained on the prior split only.
    prior_started = time.perf_counter()
    if prior_state is None:
        prior_state = train_prior(model, init_state, x_prior, y_prior, epochs=prior_epochs,
                                  lr=prior_lr, optimizer=prior_optimizer,
                                  batch_size=prior_batch_size,
                                  weight_decay=prior_weight_decay, seed=seeds["prior"],
                                  progress=progress)
        prior_training = {"trained_here": True, "epochs": prior_epochs, "lr": prior_lr,
                          "optimizer": prior_optimizer, "batch_size": prior_batch_size,
                          "weight_decay": prior_weight_decay, "schedule": "cosine",
                          "seed": seeds["prior"]}
    else:
        prior_training = {"trained_here": False}
    prior_training["seconds"] = time.perf_counter() - prior_started

    # The evaluation network carries the prior's buffers, which depend on the prior split only.
    # Buffers missing from prior_state keep the model's values, and the rows then report
    # rigorous: false.
    network = copy.deepcopy(model)
    network.load_state_dict(prior_state, strict=False)

    # Step 3: the posterior fit on the bound split.
    if posterior_init == "prior":
        initial_mean = {name: prior_state[name] for name in layout.names}
    else:
        initial_mean = {name: parameter.detach() for name, parameter in model.named_parameters()}
    posterior_started = time.perf_counter()
    # The objective uses the kl family's delta per grid value; it only shapes the objective.
    delta_objective = delta * (1.0 - monte_carlo_fraction) / len(families) / len(grid)
    fit_options = dict(objective=objective, variance=posterior_variance,
                       optimize_mean=optimize_mean, p_min=p_min, lr_mean=posterior_lr_mean,
                       lr_sigma=posterior_lr_sigma, batch_size=posterior_batch_size,
                       delta=delta_objective, progress=progress)
    posterior_mean, posterior_sigma, fit = optimize_posterior(
        network, prior_state, initial_mean, x_bound, y_bound, epochs=posterior_epochs,
        sigma_init=prior_sigma_init, prior_sigma_init=prior_sigma_init, learn_prior_sigma=True,
        seed=seeds["posterior"], **fit_options,
    )

    # Refit with the prior scale fixed at the grid value nearest the learned one (log scale).
    snapped_sigma = min(grid, key=lambda value: abs(math.log(value / fit["prior_sigma"])))
    refit = {"prior_sigma": snapped_sigma, "history": []}
    if refit_epochs > 0:
        refit_seed = int(np.random.SeedSequence(seeds["posterior"]).generate_state(1)[0])
        posterior_mean, posterior_sigma, refit = optimize_posterior(
            network, prior_state, posterior_mean, x_bound, y_bound, epochs=refit_epochs,
            sigma_init=posterior_sigma, prior_sigma_init=snapped_sigma, learn_prior_sigma=False,
            seed=refit_seed, **fit_options,
        )
    posterior_seconds = time.perf_counter() - posterior_started

    # Steps 4 and 5: prior scale from the grid, fresh Monte-Carlo samples, the rows.
    report = certify_diagonal_posterior(
        network, prior_state, posterior_mean, posterior_sigma, x_bound, y_bound, x_test, y_test,
        delta=delta, monte_carlo_fraction=monte_carlo_fraction, families=families,
        prior_sigma_grid=grid, catoni_grid=catoni_constants, prior_variance_b=prior_variance_b,
        prior_variance_c=prior_variance_c, mc_samples=mc_samples, mc_scheme=mc_scheme,
        seed=seeds["certification"],
        batch_size=batch_size, sample_batch_size=sample_batch_size, method=method,
        progress=progress,
    )

    # The sections only this procedure has.
    report["split"] = split_section
    report["prior"]["training"] = _json_safe(prior_training)
    report["prior"]["split"] = split_section
    report["optimization"] = _json_safe({
        "objective": objective,
        "surrogate": f"cross-entropy clipped at p_min = {p_min:g}, divided by ln(1/p_min)",
        "p_min": p_min,
        "variance": posterior_variance,
        "optimize_mean": optimize_mean,
        "posterior_init": posterior_init,
        "epochs": posterior_epochs,
        "refit_epochs": refit_epochs,
        "batch_size": posterior_batch_size,
        "lr_mean": posterior_lr_mean,
        "lr_sigma": posterior_lr_sigma,
        "sigma_init": prior_sigma_init,
        "delta_in_objective": delta_objective,
        "learned_prior_sigma": fit["prior_sigma"],
        "refit_prior_sigma": snapped_sigma,
        "history": fit["history"],
        "refit_history": refit["history"],
        "seed": seeds["posterior"],
        "seconds": posterior_seconds,
    })
    report["provenance"].update(seed=seed, split_seed=split.seed,
                                prior_seed=seeds["prior"], posterior_seed=seeds["posterior"],
                                data_sha256=hash_tensors(x_train, y_train),
                                runtime_seconds=time.perf_counter() - started)
    return report


def tight_certificate_for_run(run, **options) -> dict:
    """Run :func:`tight_certificate` on a run restored by :func:`crsam.train.restore_run`.

    The run's weights are the posterior's starting means when ``posterior_init="model"``, and the
    split recorded with ``--prior-split`` is reused when there is one. A prior of kind
    ``"init"`` (the seeded initial weights) is where the prior training starts. A prior of kind
    ``"learned"`` is used as the prior mean without further training.
    """
    if run.prior_split is not None and "split" not in options:
        options["split"] = run.prior_split
    # NOTE: a "learned" prior is trusted to have seen only the split's prior part, as the
    # checkpoint's prior record states; this function cannot check it.
    if run.checkpoint["prior"].get("kind") == "learned" and "prior_state" not in options:
        return tight_certificate(run.model, None, run.data, prior_state=run.prior_state, **options)
    return tight_certificate(run.model, run.prior_state, run.data, **options)


# ---------------------------------------------------------------------------------------------
# Argument checks


def _unpack_data(data):
    """Return ``(x_train, y_train, x_test, y_test)`` from a data set object or a tuple."""
    if all(hasattr(data, key) for key in ("x_train", "y_train", "x_test", "y_test")):
        parts = (data.x_train, data.y_train, data.x_test, data.y_test)
    elif isinstance(data, (tuple, list)) and len(data) in (2, 4):
        parts = tuple(data) + (None, None) if len(data) == 2 else tuple(data)
    else:
        raise ValueError(
            f"data must be a crsam.data.Dataset or a tuple (x_train, y_train[, x_test, y_test]), "
            f"got {type(data).__name__}"
        )
    _check_labelled(parts[0], parts[1], "train")
    if parts[2] is not None or parts[3] is not None:
        _check_labelled(parts[2], parts[3], "test")
    return parts


def _check_labelled(x, y, split: str) -> None:
    """Validate one split's inputs and labels."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(
            f"x_{split} and y_{split} must be torch tensors, got {type(x).__name__} and "
            f"{type(y).__name__}; convert them with torch.as_tensor"
        )
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(
            f"y_{split} must be a 1-D tensor of integer class indices, got shape "
            f"{tuple(y.shape)} and dtype {y.dtype}"
        )
    if x.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x_{split} and y_{split} must have the same number of examples, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if y.shape[0] == 0:
        raise ValueError(f"the {split} set is empty; pass at least one example")


def _check_input_dtype(model: nn.Module, *inputs) -> None:
    """Check that floating-point inputs have the dtype of the model's parameters."""
    parameter_dtype = next(model.parameters()).dtype
    for x in inputs:
        if x is not None and x.is_floating_point() and x.dtype != parameter_dtype:
            raise ValueError(f"the inputs have dtype {x.dtype} but the model's parameters are "
                             f"{parameter_dtype}; convert the inputs with .to({parameter_dtype})")


def _check_label_range(datasets, num_classes) -> None:
    """Check that every label is a class index of the model's output."""
    for split, (_, y) in datasets.items():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"y_{split} must contain class indices in [0, {num_classes - 1}], got labels "
                f"from {low} to {high}"
            )


def _check_state(layout: ParameterLayout, state, name: str, model: nn.Module | None = None) -> None:
    """Check that ``state`` contains a finite tensor of the right shape for every parameter.

    With ``model``, keys that the model's state dict does not have are rejected too.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{name} must be a state dict (a mapping of names to tensors), got "
                         f"{type(state).__name__}")
    if model is not None:
        unknown = sorted(set(state) - set(model.state_dict()))
        if unknown:
            raise ValueError(f"{name} has keys that the model does not have: {unknown[:5]}; pass "
                             "a state dict of the same architecture")
    for key, shape in zip(layout.names, layout.shapes):
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name}[{key!r}] must be a tensor of shape {tuple(shape)}, got "
                             f"{found}; pass a state dict of the same architecture")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name}[{key!r}] contains NaN or infinite values; pass finite weights")


def _flat_sigma(layout: ParameterLayout, posterior_sigma) -> torch.Tensor:
    """Expand per-tensor standard deviations to one value per scalar parameter, checked > 0."""
    if not isinstance(posterior_sigma, Mapping):
        raise ValueError(f"posterior_sigma must be a mapping of parameter names to standard "
                         f"deviations, got {type(posterior_sigma).__name__}")
    pieces = []
    for name, shape in zip(layout.names, layout.shapes):
        if name not in posterior_sigma:
            raise ValueError(f"posterior_sigma is missing the parameter {name!r}; give a "
                             "standard deviation for every parameter tensor")
        value = torch.as_tensor(posterior_sigma[name], dtype=torch.float64)
        if value.ndim != 0 and value.shape != shape:
            raise ValueError(f"posterior_sigma[{name!r}] must be a number or a tensor of shape "
                             f"{tuple(shape)}, got shape {tuple(value.shape)}")
        if not (torch.isfinite(value).all() and (value > 0).all()):
            bad = value.reshape(-1)[~(torch.isfinite(value.reshape(-1)) & (value.reshape(-1) > 0))][0]
            raise ValueError(f"posterior_sigma[{name!r}] must be finite and > 0, got "
                             f"{float(bad)!r}")
        pieces.append(value.expand(shape).reshape(-1))
    return torch.cat(pieces)


def _check_tight_options(**options) -> None:
    """Validate the given options of the split, the prior training and the posterior fit.

    The messages use the names of :func:`tight_certificate`'s arguments.
    """
    fraction = options["prior_fraction"]
    if not _is_real(fraction) or not 0.0 < fraction < 1.0:
        raise ValueError(f"prior_fraction must be in (0, 1), got {fraction!r}; pass the share "
                         "of the training set that trains the prior, for example 0.5")
    choices = {"prior_optimizer": PRIOR_OPTIMIZERS, "posterior_init": POSTERIOR_INITS,
               "posterior_variance": VARIANCES, "objective": OBJECTIVES}
    for name, allowed in choices.items():
        if name in options and options[name] not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {options[name]!r}")
    for name in ("prior_epochs", "posterior_epochs", "refit_epochs", "split_seed"):
        if name in options and (not _is_integer(options[name]) or options[name] < 0):
            raise ValueError(f"{name} must be a non-negative integer, got {options[name]!r}")
    for name in ("prior_batch_size", "posterior_batch_size"):
        if name in options and (not _is_integer(options[name]) or options[name] < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {options[name]!r}")
    for name in ("prior_lr", "posterior_lr_mean", "posterior_lr_sigma", "prior_sigma_init"):
        value = options.get(name, 1.0)
        if not _is_real(value) or not math.isfinite(value) or value <= 0.0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    weight_decay = options.get("prior_weight_decay", 0.0)
    if not _is_real(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0.0:
        raise ValueError(f"prior_weight_decay must be a finite number >= 0, got {weight_decay!r}")
    p_min = options.get("p_min", DEFAULT_P_MIN)
    if not _is_real(p_min) or not 0.0 < p_min < 1.0:
        raise ValueError(f"p_min must be in (0, 1), got {p_min!r}; the surrogate loss clips "
                         "probabilities below it, for example p_min=1e-4")


def _check_split(split, n_train: int) -> dict:
    """Check that the split's index sets are valid, non-empty and disjoint; describe them."""
    for name in ("prior_indices", "bound_indices"):
        indices = getattr(split, name, None)
        if not isinstance(indices, torch.Tensor) or indices.ndim != 1 or indices.dtype.is_floating_point:
            raise ValueError(f"split.{name} must be a 1-D integer tensor, got {indices!r}")
        if indices.numel() == 0:
            raise ValueError(f"split.{name} is empty; both parts of the split need examples")
        if int(indices.min()) < 0 or int(indices.max()) >= n_train:
            raise ValueError(f"split.{name} must index the {n_train} training examples, got "
                             f"indices from {int(indices.min())} to {int(indices.max())}")
        if torch.unique(indices).numel() != indices.numel():
            raise ValueError(f"split.{name} contains repeated indices; each example may appear "
                             "once")
    overlap = torch.isin(split.prior_indices, split.bound_indices)
    if overlap.any():
        first = int(split.prior_indices[overlap][0])
        raise ValueError(
            f"the prior split and the bound split share {int(overlap.sum())} examples (first "
            f"index {first}); the prior must never see the bound's examples"
        )
    return {
        "fraction": getattr(split, "fraction", None),
        "seed": getattr(split, "seed", None),
        "n_prior": int(split.prior_indices.numel()),
        "n_bound": int(split.bound_indices.numel()),
        "prior_indices_sha256": hash_tensors(split.prior_indices),
        "bound_indices_sha256": hash_tensors(split.bound_indices),
        "disjoint": True,
    }
