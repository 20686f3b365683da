"""crsam.curvature against the exact float64 oracles of crsam.verify."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from crsam.curvature import (
    METHODS,
    EmpiricalLoss,
    FiniteDifferenceHessian,
    curvature_report,
    exact_trace,
    format_curvature_table,
    gradient_direction_curvature,
    hutchinson_trace,
    normalized_trace,
    top_eigenvalues,
)
from crsam.verify import (
    exact_gradient,
    exact_hessian,
    flatten_parameters,
    loss_of_flat,
    random_classification_data,
    smooth_mlp,
)

# Products and sums here add at most a few hundred float64 terms of size ~1, each with relative
# error 1.1e-16, so two exact computations agree to ~1e-13; 1e-10 leaves a margin of 1000.
FLOAT64_RTOL = 1e-10
FLOAT64_ATOL = 1e-12

# Normal quantile for checks of stochastic estimators. The seeds are fixed, so each check is
# deterministic; z = 6 makes a failure of a correct estimator a 2e-9 event under the normal
# approximation and still a 1/36 event by Chebyshev's inequality without it.
Z = 6.0


def cross_entropy_per_example(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


@st.composite
def problems(draw, max_examples=9):
    """Draw a small smooth MLP classifier, its data and a batch size (float64)."""
    input_dim = draw(st.integers(1, 4))
    hidden = draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))
    num_classes = draw(st.integers(2, 3))
    activation = draw(st.sampled_from(["tanh", "gelu", "softplus"]))
    n = draw(st.integers(1, max_examples))
    batch_size = draw(st.one_of(st.none(), st.integers(1, n)))
    seed = draw(st.integers(0, 2**16))
    model = smooth_mlp([input_dim, *hidden, num_classes], activation, seed=seed)
    X, y = random_classification_data(n, input_dim, num_classes, seed=seed + 1)
    return model, X, y, batch_size, seed


def exact_problem(model, X, y):
    """Return the verify oracle's loss, weights, gradient and Hessian for a problem."""
    loss = loss_of_flat(model, cross_entropy_per_example, X, y)
    w = flatten_parameters(model)
    return loss, w, exact_gradient(loss, w), exact_hessian(loss, w)


def rademacher_variance(A):
    """Var(v^T A v) for Rademacher v: 2 (||A||_F^2 - sum_i A_ii^2) (A symmetric)."""
    return 2.0 * float((A * A).sum() - (torch.diagonal(A) ** 2).sum())


def gaussian_variance(A):
    """Var(v^T A v) for standard Gaussian v: 2 ||A||_F^2 (A symmetric)."""
    return 2.0 * float((A * A).sum())


# --------------------------------------------------------------------------------------------
# Hessian-vector products


@given(problem=problems(), backend=st.sampled_from(["double-backward", "forward-over-reverse"]), k=st.integers(1, 3))
def test_hvp_matches_exact_hessian(problem, backend, k):
    model, X, y, batch_size, seed = problem
    _, _, _, H = exact_problem(model, X, y)
    loss = EmpiricalLoss(model, X, y, batch_size=batch_size, backend=backend)
    V = torch.randn(k, loss.num_parameters, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    HV = loss.matmat(V)
    assert torch.allclose(HV, V @ H, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
    assert torch.allclose(loss.hvp(V[0]), H @ V[0], rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


@given(problem=problems())
def test_hvp_finite_difference_accuracy(problem):
    model, X, y, batch_size, seed = problem
    _, _, g, H = exact_problem(model, X, y)
    loss = EmpiricalLoss(model, X, y, batch_size=batch_size)
    v = torch.randn(loss.num_parameters, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    # Central differences with h = eps^(1/3) ~ 6e-6 (weights here have rms below 1): truncation
    # h^2 ||D^3 L|| / 6 ~ 6e-12 ||D^3 L|| and round-off eps ||g|| / h ~ 4e-11 ||g||, both times ||v||.
    # ||D^3 L|| stays below 10^2 on these networks, so 1e-8 (1 + ||g||) ||v|| has a margin of 10.
    error = torch.linalg.vector_norm(loss.hvp_finite_difference(v) - H @ v)
    assert error <= 1e-8 * (1.0 + float(g.norm())) * float(v.norm())


def test_hvp_float32_backends_agree_with_float64():
    model64 = smooth_mlp([4, 6, 3], "gelu", seed=3)
    X, y = random_classification_data(20, 4, 3, seed=4)
    _, _, _, H = exact_problem(model64, X, y)
    model32 = smooth_mlp([4, 6, 3], "gelu", seed=3, dtype=torch.float32)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    # float32 round-off: relative 6e-8 per operation over sums of ~50 terms gives ~3e-6 of
    # ||H|| ||v||; 1e-4 leaves a margin of 30.
    scale = float(torch.linalg.matrix_norm(H, ord=2)) * float(v.norm())
    for backend in ("double-backward", "forward-over-reverse"):
        loss = EmpiricalLoss(model32, X.float(), y, batch_size=7, backend=backend)
        assert loss.dtype == torch.float32
        error = torch.linalg.vector_norm(loss.hvp(v.float()).double() - H @ v)
        assert error <= 1e-4 * scale


# --------------------------------------------------------------------------------------------
# Trace estimators


@given(problem=problems(), distribution=st.sampled_from(["rademacher", "gaussian"]), seed=st.integers(0, 1000))
def test_hutchinson_within_confidence_interval(problem, distribution, seed):
    model, X, y, batch_size, _ = problem
    _, _, _, H = exact_problem(model, X, y)
    loss = EmpiricalLoss(model, X, y, batch_size=batch_size)
    num_probes = 32

    result = hutchinson_trace(loss, probes=num_probes, distribution=distribution, seed=seed)

    # The mean of m samples has standard deviation sqrt(Var(v^T H v) / m), Var from the formula.
    variance = rademacher_variance(H) if distribution == "rademacher" else gaussian_variance(H)
    assert result.probes == num_probes
    assert abs(result.estimate - float(torch.trace(H))) <= Z * math.sqrt(variance / num_probes) + FLOAT64_ATOL


@given(
    diagonal=st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=12),
    num_probes=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_rademacher_exact_on_diagonal(diagonal, num_probes, seed):
    # v^T D v = sum_i D_ii v_i^2 = Tr D for every sign vector, so each sample is exact and the
    # variance formula gives 0; only summation round-off remains (12 terms of size <= 100).
    D = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    result = hutchinson_trace(D, probes=num_probes, seed=seed)
    assert abs(result.estimate - sum(diagonal)) <= 1e-12 * (1 + sum(abs(d) for d in diagonal))
    if num_probes >= 2:
        assert result.stderr <= 1e-12 * (1 + sum(abs(d) for d in diagonal))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_variance_formula(distribution):
    generator = torch.Generator().manual_seed(11)
    B = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    A = (B + B.T) / 2
    num_probes = 20_000

    samples = torch.tensor(hutchinson_trace(A, probes=num_probes, distribution=distribution, block_size=4096).samples)
    expected = rademacher_variance(A) if distribution == "rademacher" else gaussian_variance(A)

    # The sample variance s^2 has standard error sqrt((m4 - s^4) / m), with m4 the fourth central
    # sample moment. The formula's variance must lie within Z such errors.
    centred = samples - samples.mean()
    s2 = float(centred.pow(2).mean())
    m4 = float(centred.pow(4).mean())
    assert abs(s2 - expected) <= Z * math.sqrt((m4 - s2**2) / num_probes)
    # The mean is unbiased for the trace.
    assert abs(float(samples.mean()) - float(torch.trace(A))) <= Z * math.sqrt(expected / num_probes)


def test_hutchinson_stopping_rule():
    generator = torch.Generator().manual_seed(12)
    B = torch.randn(30, 30, generator=generator, dtype=torch.float64)
    A = B @ B.T + 30 * torch.eye(30, dtype=torch.float64)

    # Reached: the relative standard error is at most rel_tol, after at least min_probes.
    result = hutchinson_trace(A, rel_tol=0.02, min_probes=10, max_probes=10_000, seed=1)
    assert result.converged
    assert result.probes >= 10
    assert result.stderr <= 0.02 * abs(result.estimate)
    # One block earlier the rule did not hold (the estimator stops at the first block that meets it).
    earlier = torch.tensor(result.samples[: result.probes - 8])
    if earlier.numel() >= 10:
        assert float(earlier.std(correction=1)) / math.sqrt(earlier.numel()) > 0.02 * abs(float(earlier.mean()))

    # Not reachable within max_probes: it stops there with converged=False.
    capped = hutchinson_trace(A, rel_tol=1e-6, min_probes=2, max_probes=20, seed=1)
    assert not capped.converged
    assert capped.probes == 20


@given(problem=problems(max_examples=5))
def test_exact_trace_matches_verify(problem):
    model, X, y, batch_size, _ = problem
    _, _, _, H = exact_problem(model, X, y)
    loss = EmpiricalLoss(model, X, y, batch_size=batch_size)
    result = exact_trace(loss, block_size=7)
    assert result.probes == loss.num_parameters
    assert result.stderr == 0.0
    assert math.isclose(result.estimate, float(torch.trace(H)), rel_tol=FLOAT64_RTOL, abs_tol=FLOAT64_ATOL)


@given(problem=problems(max_examples=5), seed=st.integers(0, 1000))
def test_finite_difference_trace_same_probes(problem, seed):
    model, X, y, batch_size, _ = problem
    _, _, g, _ = exact_problem(model, X, y)
    loss = EmpiricalLoss(model, X, y, batch_size=batch_size)
    autograd = hutchinson_trace(loss, probes=6, seed=seed)
    finite = hutchinson_trace(FiniteDifferenceHessian(loss), probes=6, seed=seed)

    # Same seed, same probes: each sample differs by v^T (error of the FD product), at most
    # ||v|| times the finite-difference bound of test_hvp_finite_difference_accuracy, ||v||^2 = P.
    bound = 1e-8 * (1.0 + float(g.norm())) * loss.num_parameters
    for a, b in zip(autograd.samples, finite.samples):
        assert abs(a - b) <= bound


# --------------------------------------------------------------------------------------------
# Eigenvalues, gradient norm and normalized trace


@given(problem=problems(), k=st.integers(1, 2))
def test_top_eigenvalues_match_eigvalsh(problem, k):
    model, X, y, batch_size, seed = problem
    _, _, _, H = exact_problem(model, X, y)
    loss = EmpiricalLoss(model, X, y, batch_size=batch_size)
    result = top_eigenvalues(loss, k, tol=1e-12, max_restarts=500, seed=seed)
    expected = torch.linalg.eigvalsh(H).flip(0)[:k]

    # ARPACK at tol=1e-12 (or the dense path) gives Ritz values accurate to ~1e-12 ||H||; 1e-8
    # ||H|| leaves a margin for clustered eigenvalues. For symmetric H, the residual bounds the
    # distance from each Ritz value to the spectrum.
    scale = 1.0 + float(torch.linalg.matrix_norm(H, ord=2))
    assert result.converged
    assert torch.allclose(torch.tensor(result.eigenvalues, dtype=torch.float64), expected, atol=1e-8 * scale)
    assert all(r <= 1e-6 * scale for r in result.residuals)


@given(problem=problems())
def test_normalized_trace_and_gradient_curvature(problem):
    model, X, y, batch_size, _ = problem
    _, _, g, H = exact_problem(model, X, y)
    report = curvature_report(model, X, y, method="exact", batch_size=batch_size, split="train")
    g_norm = float(g.norm())

    assert math.isclose(report["grad_norm"], g_norm, rel_tol=FLOAT64_RTOL, abs_tol=FLOAT64_ATOL)
    assert math.isclose(report["trace"]["estimate"], float(torch.trace(H)), rel_tol=FLOAT64_RTOL, abs_tol=FLOAT64_ATOL)
    if g_norm > 1e-8:
        # Ratio of two quantities each accurate to FLOAT64_RTOL.
        expected_ratio = float(torch.trace(H)) / g_norm
        assert math.isclose(report["normalized_trace"], expected_ratio, rel_tol=3 * FLOAT64_RTOL, abs_tol=FLOAT64_ATOL / g_norm)
        g_hat = g / g_norm
        assert math.isclose(
            report["gradient_direction_curvature"], float(g_hat @ H @ g_hat), rel_tol=1e-8, abs_tol=1e-10
        )


def test_normalized_trace_undefined_at_zero_gradient():
    assert normalized_trace(3.0, 0.0) is None
    assert normalized_trace(3.0, 2.0) == 1.5

    # A squared-error loss at its exact minimum has gradient 0: the report gives null, not NaN.
    model = nn.Linear(2, 1, bias=False).double()
    X = torch.eye(2, dtype=torch.float64)
    y = model(X).detach()
    report = curvature_report(model, X, y, loss="mse", method="exact")
    assert report["grad_norm"] == 0.0
    assert report["normalized_trace"] is None
    assert report["gradient_direction_curvature"] is None
    # Hessian of (1/n) sum ||W x_i - y_i||^2 with X = I: 2 I / 2, so Tr H = 2.
    assert math.isclose(report["trace"]["estimate"], 2.0, rel_tol=1e-12)
    json.dumps(report, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Data, reduction, unused parameters and model modes


@given(problem=problems(), batch_sizes=st.lists(st.integers(1, 9), min_size=2, max_size=3))
def test_results_independent_of_batch_size(problem, batch_sizes):
    model, X, y, _, seed = problem
    v = torch.randn(flatten_parameters(model).numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    full = EmpiricalLoss(model, X, y, batch_size=None)
    value, gradient = full.value_and_gradient()
    product = full.hvp(v)

    # Uneven batches (the last one shorter) weighted by their size reproduce the full batch to
    # float64 round-off.
    for batch_size in batch_sizes:
        split = EmpiricalLoss(model, X, y, batch_size=batch_size)
        split_value, split_gradient = split.value_and_gradient()
        assert math.isclose(split_value, value, rel_tol=FLOAT64_RTOL, abs_tol=FLOAT64_ATOL)
        assert torch.allclose(split_gradient, gradient, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
        assert torch.allclose(split.hvp(v), product, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


def test_data_loader_matches_tensors():
    model = smooth_mlp([3, 4, 2], "tanh", seed=1)
    X, y = random_classification_data(11, 3, 2, seed=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    v = torch.randn(flatten_parameters(model).numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    from_tensors = EmpiricalLoss(model, X, y, batch_size=5)
    from_loader = EmpiricalLoss(model, batches=loader)

    assert math.isclose(from_loader.value(), from_tensors.value(), rel_tol=FLOAT64_RTOL)
    assert torch.allclose(from_loader.gradient(), from_tensors.gradient(), rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
    assert torch.allclose(from_loader.hvp(v), from_tensors.hvp(v), rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


@given(problem=problems())
def test_reduction_sum_is_n_times_mean(problem):
    model, X, y, batch_size, seed = problem
    n = X.shape[0]
    v = torch.randn(flatten_parameters(model).numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mean = EmpiricalLoss(model, X, y, batch_size=batch_size, reduction="mean")
    total = EmpiricalLoss(model, X, y, batch_size=batch_size, reduction="sum")

    assert math.isclose(total.value(), n * mean.value(), rel_tol=FLOAT64_RTOL, abs_tol=FLOAT64_ATOL)
    assert torch.allclose(total.gradient(), n * mean.gradient(), rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
    assert torch.allclose(total.hvp(v), n * mean.hvp(v), rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


class _WithUnusedLayer(nn.Module):
    """A smooth MLP plus a layer that the forward pass never calls."""

    def __init__(self):
        super().__init__()
        self.used = smooth_mlp([3, 4, 2], "softplus", seed=5)
        self.unused = nn.Linear(2, 2).double()

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("backend", ["double-backward", "forward-over-reverse"])
def test_unused_parameters_get_zero_rows(backend):
    model = _WithUnusedLayer()
    X, y = random_classification_data(6, 3, 2, seed=6)
    loss = EmpiricalLoss(model, X, y, batch_size=4, backend=backend)
    unused = torch.zeros(loss.num_parameters, dtype=torch.bool)
    offset = 0
    for name, size in zip(loss.parameter_names, loss._sizes):
        unused[offset : offset + size] = name.startswith("unused")
        offset += size
    V = torch.randn(3, loss.num_parameters, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    HV = loss.matmat(V)
    assert torch.equal(loss.gradient()[unused], torch.zeros(int(unused.sum()), dtype=torch.float64))
    assert torch.equal(HV[:, unused], torch.zeros(3, int(unused.sum()), dtype=torch.float64))
    # The used block still matches the oracle restricted to the used parameters.
    _, _, _, H_used = exact_problem(model.used, X, y)
    assert torch.allclose(HV[:, ~unused], V[:, ~unused] @ H_used, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


class _DropoutBatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.layers = nn.Sequential(
            nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)
        ).double()

    def forward(self, x):
        return self.layers(x)


def test_train_mode_fixes_masks_and_statistics():
    model = _DropoutBatchNormNet()
    model.eval()
    X, y = random_classification_data(10, 3, 2, seed=9)
    batch_norm = model.layers[1]
    running_mean = batch_norm.running_mean.clone()
    batches_tracked = batch_norm.num_batches_tracked.clone()
    rng_state = torch.get_rng_state()
    loss = EmpiricalLoss(model, X, y, batch_size=4, mode="train", seed=3)
    generator = torch.Generator().manual_seed(10)
    u, v = torch.randn(2, loss.num_parameters, generator=generator, dtype=torch.float64)

    # Same masks in every evaluation: repeated values are identical, and H is symmetric.
    assert loss.value() == loss.value()
    assert math.isclose(float(u @ loss.hvp(v)), float(v @ loss.hvp(u)), rel_tol=FLOAT64_RTOL)
    # Finite differences of the gradient agree with the autograd product only if the masks and
    # the batch statistics are the same at w + h u and w - h u (tolerance as for the FD test).
    error = torch.linalg.vector_norm(loss.hvp_finite_difference(v) - loss.hvp(v))
    assert error <= 1e-8 * (1.0 + float(loss.gradient().norm())) * float(v.norm())
    # Both backends see the same masks.
    other = EmpiricalLoss(model, X, y, batch_size=4, mode="train", seed=3, backend="forward-over-reverse")
    assert torch.allclose(other.hvp(v), loss.hvp(v), rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
    # Dropout is active: train mode differs from eval mode.
    assert loss.value() != EmpiricalLoss(model, X, y, batch_size=4).value()

    # Running statistics, the model's mode and the global random state are left unchanged.
    assert torch.equal(batch_norm.running_mean, running_mean)
    assert torch.equal(batch_norm.num_batches_tracked, batches_tracked)
    assert not model.training
    assert not batch_norm.training
    assert batch_norm.track_running_stats
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_eval_mode_default_restores_training_flag():
    model = _DropoutBatchNormNet()
    model.train()
    X, y = random_classification_data(10, 3, 2, seed=9)
    first = EmpiricalLoss(model, X, y, batch_size=3).value()
    # Eval mode: dropout off and running statistics used, so the value is batch-independent.
    assert math.isclose(first, EmpiricalLoss(model, X, y, batch_size=10).value(), rel_tol=FLOAT64_RTOL)
    assert model.training and model.layers[3].training


# --------------------------------------------------------------------------------------------
# Report and argument checks


def test_curvature_report_contract():
    model = smooth_mlp([4, 5, 3], "gelu", seed=12)
    X, y = random_classification_data(30, 4, 3, seed=13)
    _, _, g, H = exact_problem(model, X, y)

    for method in METHODS:
        report = curvature_report(model, X, y, method=method, probes=12 if method != "exact" else None, batch_size=8, split="test")
        assert {"trace", "grad_norm", "normalized_trace", "top_eigenvalue", "split", "method", "loss", "mode"} <= set(report)
        assert set(report["trace"]) == {"estimate", "stderr", "probes"}
        assert report["split"] == "test"
        assert report["method"] == method
        assert report["mode"] == "eval"
        assert report["loss"] == "mean cross-entropy, no weight decay"
        assert report["n_examples"] == 30
        json.dumps(report, allow_nan=False)

        # Stochastic estimators lie within Z standard errors. The Hutch++ and XTrace error
        # estimates are conditional or heuristic, so for them this is only a loose check.
        trace = report["trace"]
        exact = float(torch.trace(H))
        if method == "exact":
            assert math.isclose(trace["estimate"], exact, rel_tol=FLOAT64_RTOL)
        else:
            assert abs(trace["estimate"] - exact) <= Z * trace["stderr"] + 1e-8
        # Lanczos at its default tolerance 1e-4 (relative), with a margin of 10.
        top = float(torch.linalg.eigvalsh(H)[-1])
        assert abs(report["top_eigenvalue"] - top) <= 1e-3 * abs(top)

        table = format_curvature_table(report)
        assert f"{report['grad_norm']:.6g}" in table
        assert "test" in table


def test_gradient_direction_curvature_matches_definition():
    model = smooth_mlp([2, 3, 2], "tanh", seed=14)
    X, y = random_classification_data(5, 2, 2, seed=15)
    _, _, g, H = exact_problem(model, X, y)
    g_hat = g / g.norm()
    value = gradient_direction_curvature(EmpiricalLoss(model, X, y))
    assert math.isclose(value, float(g_hat @ H @ g_hat), rel_tol=FLOAT64_RTOL, abs_tol=FLOAT64_ATOL)


def _small():
    model = smooth_mlp([2, 3, 2], "tanh", seed=16)
    X, y = random_classification_data(5, 2, 2, seed=17)
    return model, X, y


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, X, y: curvature_report(m, X, y, method="lanczos"), r"method='lanczos' is invalid; use one of"),
        (lambda m, X, y: curvature_report(m, X, y, rel_tol=0), r"rel_tol=0 is invalid"),
        (lambda m, X, y: curvature_report(m, X, y, method="exact", max_exact_parameters=3), r"has 17 > max_exact_parameters=3"),
        (lambda m, X, y: EmpiricalLoss(m, X, y, mode="training"), r"mode='training' is invalid; use 'eval'"),
        (lambda m, X, y: EmpiricalLoss(m, X, y, reduction="avg"), r"reduction='avg' is invalid"),
        (lambda m, X, y: EmpiricalLoss(m, X, y, batch_size=0), r"batch_size=0 is invalid; use a positive integer"),
        (lambda m, X, y: EmpiricalLoss(m, X, y, backend="jvp"), r"backend='jvp' is invalid"),
        (lambda m, X, y: EmpiricalLoss(m, X, y[:3]), r"inputs has 5 rows but targets has 3"),
        (lambda m, X, y: EmpiricalLoss(m, X, y, loss="hinge"), r"loss='hinge' is invalid"),
        (lambda m, X, y: EmpiricalLoss(m, X, y).hvp(torch.ones(3, dtype=torch.float64)), r"v has shape \(3,\); pass a flat vector of length 17"),
        (lambda m, X, y: EmpiricalLoss(m, X, y, loss=lambda o, t: F.cross_entropy(o, t)).value(), r"must return one loss per example"),
        (lambda m, X, y: hutchinson_trace(torch.eye(3), probes=0), r"probes=0 is invalid; pass an integer >= 1"),
        (lambda m, X, y: hutchinson_trace(torch.eye(3), min_probes=5, max_probes=2), r"min_probes=5 exceeds max_probes=2"),
        (lambda m, X, y: hutchinson_trace(torch.eye(3), distribution="uniform"), r"distribution='uniform' is invalid"),
        (lambda m, X, y: hutchinson_trace(torch.ones(2, 3)), r"shape \(2, 3\); pass a square"),
        (lambda m, X, y: top_eigenvalues(torch.eye(3), 4), r"k=4 is invalid; pass an integer with 1 <= k <= 3"),
    ],
)
def test_invalid_arguments_raise(call, message):
    model, X, y = _small()
    with pytest.raises(ValueError, match=message):
        call(model, X, y)


def test_report_shows_probe_cap():
    model = smooth_mlp([4, 5, 3], "gelu", seed=12)
    X, y = random_classification_data(30, 4, 3, seed=13)

    # A relative standard error of 1e-9 is out of reach in 20 probes on a non-diagonal Hessian.
    capped = curvature_report(model, X, y, method="hutchinson", rel_tol=1e-9, max_probes=20)
    assert capped["trace_converged"] is False
    assert capped["trace_stopping_rule"] == {"rel_tol": 1e-9, "max_probes": 20}
    assert "stopped at the cap of 20 probes" in format_curvature_table(capped)

    fixed = curvature_report(model, X, y, method="hutchinson", probes=12)
    assert fixed["trace_stopping_rule"] is None
    assert "stopped at the cap" not in format_curvature_table(fixed)
