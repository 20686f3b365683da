"""Hutch++ and XTrace: exact at low rank, unbiased with honest error bars, and no retained graphs."""

import gc
import math

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from crsam.curvature import EmpiricalLoss, hutchinson_trace, hutchpp_trace, xtrace_trace
from crsam.verify import linear_cross_entropy_trace, random_classification_data, smooth_mlp

# Normal quantile for the stochastic checks (fixed seeds make them deterministic): a correct
# estimator fails with probability 2e-9 under the normal approximation.
Z = 6.0


def low_rank_matrix(dim, eigenvalues, seed):
    """Return U diag(eigenvalues) U^T with U a random dim x r orthonormal matrix (float64)."""
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(dim, len(eigenvalues), generator=generator, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ U.T


def round_off(A):
    """Round-off bound for traces through a QR of a d x k sketch: ~d * eps * sum |lambda|, times 100."""
    return 100 * A.shape[0] * torch.finfo(torch.float64).eps * (1 + float(torch.linalg.matrix_norm(A, ord="nuc")))


low_rank_problems = st.tuples(
    st.integers(6, 30),
    st.lists(st.floats(-10, 10).filter(lambda x: abs(x) > 1e-3), min_size=1, max_size=4),
    st.integers(0, 2**16),
)


@given(problem=low_rank_problems, extra=st.integers(0, 3))
def test_hutchpp_exact_at_low_rank(problem, extra):
    dim, eigenvalues, seed = problem
    A = low_rank_matrix(dim, eigenvalues, seed)
    rank = len(eigenvalues)

    # A sketch of k >= rank A spans range(A), so (I - QQ^T) A = 0 and both terms are exact.
    adaptive = hutchpp_trace(A, sketch_size=rank + extra, seed=seed)
    fixed = hutchpp_trace(A, probes=3 * (rank + extra), seed=seed)
    assert abs(adaptive.estimate - sum(eigenvalues)) <= round_off(A)
    assert abs(fixed.estimate - sum(eigenvalues)) <= round_off(A)
    assert adaptive.stderr <= round_off(A)


@given(problem=low_rank_problems, extra=st.integers(0, 3))
def test_xtrace_exact_at_low_rank(problem, extra):
    dim, eigenvalues, seed = problem
    A = low_rank_matrix(dim, eigenvalues, seed)
    rank = len(eigenvalues)

    # With s = rank + 1 + extra probes, every leave-one-out sketch of s - 1 >= rank probes spans
    # range(A), so every t_i is exact.
    result = xtrace_trace(A, probes=2 * (rank + 1 + extra), seed=seed)
    assert result.probes == 2 * (rank + 1 + extra)
    assert abs(result.estimate - sum(eigenvalues)) <= round_off(A)
    assert result.stderr <= round_off(A)


@given(seed=st.integers(0, 2**16), num_classes=st.integers(2, 4), input_dim=st.integers(2, 5))
def test_low_rank_network_hessian_exact(seed, num_classes, input_dim):
    # One example through a linear softmax layer: H = (diag(p) - p p^T) (x) x~ x~^T has rank
    # k - 1 (diag(p) - p p^T annihilates the ones vector) while dim = k (d + 1).
    torch.manual_seed(seed)
    model = nn.Linear(input_dim, num_classes).double()
    X, y = random_classification_data(1, input_dim, num_classes, seed=seed)
    loss = EmpiricalLoss(model, X, y)
    expected = linear_cross_entropy_trace(model.weight, model.bias, X)
    tolerance = 1e-10 * (1 + abs(expected))  # round-off of QR and products, as above, margin 10^3

    assert abs(hutchpp_trace(loss, sketch_size=num_classes - 1, seed=seed).estimate - expected) <= tolerance
    assert abs(xtrace_trace(loss, probes=2 * num_classes, seed=seed).estimate - expected) <= tolerance


@given(seed=st.integers(0, 2**16), decay=st.floats(0.3, 0.9))
def test_hutchpp_adaptive_within_error_bar(seed, decay):
    # Full-rank matrix with geometrically decaying spectrum, the case Hutch++ is built for.
    eigenvalues = [10 * decay**i for i in range(40)]
    A = low_rank_matrix(40, eigenvalues, seed)
    result = hutchpp_trace(A, sketch_size=5, rel_tol=0.02, seed=seed + 1)

    # Conditional on the sketch, the residual samples are i.i.d., so the error bar is honest.
    assert result.converged
    assert result.stderr <= 0.02 * abs(result.estimate)
    assert abs(result.estimate - sum(eigenvalues)) <= Z * result.stderr + round_off(A)


def test_hutchpp_needs_fewer_products_than_hutchinson():
    # Three large eigenvalues above many small ones: deflating them removes most of ||A||_F^2,
    # the variance of Hutchinson's samples, while the trace keeps most of its size.
    eigenvalues = [100.0, 80.0, 60.0] + [1.0] * 197
    A = low_rank_matrix(200, eigenvalues, 3)
    plain = hutchinson_trace(A, rel_tol=0.01, max_probes=5000, seed=4)
    deflated = hutchpp_trace(A, sketch_size=5, rel_tol=0.01, max_probes=5000, seed=4)

    assert plain.converged
    assert deflated.converged
    assert deflated.probes < plain.probes / 2
    assert abs(deflated.estimate - sum(eigenvalues)) <= Z * deflated.stderr


def test_xtrace_error_estimate_on_full_rank():
    eigenvalues = [1.0 / (i + 1) ** 2 for i in range(60)]
    A = low_rank_matrix(60, eigenvalues, 5)
    result = xtrace_trace(A, probes=40, seed=6)

    # The XTrace error estimate averages dependent leave-one-out estimates, so it is a heuristic;
    # Z of them still bound the error on a spectrum this steep.
    assert abs(result.estimate - sum(eigenvalues)) <= Z * result.stderr
    assert result.stderr < 0.01 * sum(eigenvalues)


def _live_graph_tensors():
    """Count live tensors that belong to an autograd graph (non-leaf, with a grad_fn)."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.grad_fn is not None)


def _live_tensor_count():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_memory_flat_across_probes():
    model = smooth_mlp([5, 16, 16, 3], "gelu", seed=7)
    X, y = random_classification_data(64, 5, 3, seed=8)
    before_graphs = _live_graph_tensors()

    # No graph outlives a product: after many probes no graph tensor is alive.
    for backend in ("double-backward", "forward-over-reverse"):
        loss = EmpiricalLoss(model, X, y, batch_size=24, backend=backend)
        hutchinson_trace(loss, probes=8, seed=1)
        after_few = _live_tensor_count()
        hutchinson_trace(loss, probes=64, seed=1)
        after_many = _live_tensor_count()
        hutchpp_trace(loss, sketch_size=4, probes=None, max_probes=24, seed=1)

        # 8 times more probes leave the same live tensors: nothing accumulates per probe.
        assert after_many == after_few
        assert _live_graph_tensors() == before_graphs


def test_custom_loss_callable():
    model = smooth_mlp([3, 4, 2], "tanh", seed=9)
    X, y = random_classification_data(7, 3, 2, seed=10)

    def per_example_cross_entropy(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")

    named = EmpiricalLoss(model, X, y)
    custom = EmpiricalLoss(model, X, y, loss=per_example_cross_entropy)
    v = torch.ones(named.num_parameters, dtype=torch.float64)
    # Same loss written two ways: identical to float64 round-off.
    assert math.isclose(custom.value(), named.value(), rel_tol=1e-12)
    assert torch.allclose(custom.hvp(v), named.hvp(v), rtol=1e-10, atol=1e-12)
    assert custom.describe() == "mean per_example_cross_entropy, no weight decay"
