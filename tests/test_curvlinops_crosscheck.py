"""Cross-check of crsam's Hessian-vector products against curvlinops, an independent library.

curvlinops (the curvlinops-for-pytorch package, version 3.0.1) builds the Hessian of the empirical
risk from its own functional Hessian-vector product. crsam builds it from a batched double backward. Both are exact up to float64 round-off, so their dense
Hessians must agree to that level on a small convolutional network.
"""

import pytest
import torch
from torch import nn

from crsam.curvature import EmpiricalLoss

curvlinops = pytest.importorskip("curvlinops")


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 3, kernel_size=5),
        nn.Tanh(),
        nn.Conv1d(3, 2, kernel_size=3, stride=2),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(2 * 5, 4),
    ).double()


@pytest.mark.parametrize("batch_size", [7, 20])
def test_cnn_hessian_matches_curvlinops(batch_size):
    model = small_cnn()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(20, 1, 16, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 4, (20,), generator=generator)
    params = [p for p in model.parameters()]
    num_parameters = sum(p.numel() for p in params)

    # curvlinops: mean cross-entropy over the 20 examples, fed in batches of the same size as
    # crsam's, so an uneven last batch is weighted by both libraries.
    batches = list(zip(inputs.split(batch_size), targets.split(batch_size)))
    reference_operator = curvlinops.HessianLinearOperator(
        model, nn.CrossEntropyLoss(reduction="mean"), params, batches, check_deterministic=False
    )
    identity = torch.eye(num_parameters, dtype=torch.float64)
    reference = reference_operator @ identity

    loss = EmpiricalLoss(model, inputs, targets, loss="cross_entropy", batch_size=batch_size)
    hessian = loss.matmat(identity)

    # Both sides sum O(10) products of O(1) numbers per entry in different orders: a few ulps
    # of the largest entry (|H| < 10 here) apart, so 1e-11 absolute has a wide margin and still
    # catches a batch weighting error, which shifts entries by O(1e-2).
    assert reference.shape == (num_parameters, num_parameters)
    torch.testing.assert_close(hessian, reference, rtol=0, atol=1e-11)
    torch.testing.assert_close(hessian, hessian.T, rtol=0, atol=1e-11)
