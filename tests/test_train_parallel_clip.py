"""``crsam train --parallel`` and ``--clip-grad-norm``: the wiring from flags to the optimizer step."""

import pytest
import torch
import torch.nn.functional as F

from crsam.checkpoint import load_checkpoint
from crsam.optim import CRSAM, SAM
from crsam.steps import StepRecipe, make_closure, take_step
from crsam.train import build_optimizer, resolve_options, train

TINY = {"num_samples": 500, "batch_size": 64, "epochs": 2, "seed": 3}
# 400 training examples in batches of 64: 7 steps per epoch.
STEPS = 2 * 7
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def test_parallel_run_matches_sequential(tmp_path):
    train(TINY, out=tmp_path / "sequential", progress=False)
    train({**TINY, "parallel": True}, out=tmp_path / "parallel", progress=False)
    sequential = load_checkpoint(tmp_path / "sequential" / "checkpoint.pt")
    parallel = load_checkpoint(tmp_path / "parallel" / "checkpoint.pt")

    assert parallel["config"]["parallel"] is True
    # The batched passes add the same float32 products in another order than the separate ones,
    # a few units of round-off u relative to each gradient per step. Those differences add up
    # over the steps, so 8 u * steps * max|w| bounds the weight difference, as for two processes
    # against one in test_distributed_train.py.
    scale = max(float(tensor.abs().max()) for tensor in sequential["model"].values())
    tolerance = 8.0 * FLOAT32_UNIT_ROUNDOFF * STEPS * scale
    for key, value in sequential["model"].items():
        assert float((parallel["model"][key] - value).abs().max()) <= tolerance, key


def test_parallel_run_differs_from_sgd(tmp_path):
    # Guards the test above: a --parallel flag that silently fell back to plain SGD would still
    # train, so the parallel run must differ from SGD by far more than the tolerance.
    train({**TINY, "parallel": True, "epochs": 1}, out=tmp_path / "parallel", progress=False)
    train({**TINY, "optimizer": "sgd", "epochs": 1}, out=tmp_path / "sgd", progress=False)
    parallel = load_checkpoint(tmp_path / "parallel" / "checkpoint.pt")["model"]
    sgd = load_checkpoint(tmp_path / "sgd" / "checkpoint.pt")["model"]
    assert max(float((parallel[key] - sgd[key]).abs().max()) for key in sgd) > 1e-4


@pytest.mark.parametrize("optimizer", ["sam", "crsam"])
def test_clip_passed_to_sharpness_aware(optimizer):
    config = resolve_options({"optimizer": optimizer, "clip_grad_norm": 0.5})
    built = build_optimizer(config, torch.nn.Linear(3, 2))
    assert isinstance(built, (SAM, CRSAM))
    assert all(group["max_grad_norm"] == 0.5 for group in built.param_groups)


def test_sgd_step_clips_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    reference = torch.nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 5) * 10, torch.randint(0, 3, (16,))

    config = resolve_options({"optimizer": "sgd", "clip_grad_norm": 0.01, "lr": 0.1})
    optimizer = build_optimizer(config, model)
    recipe = StepRecipe(device_type="cpu", max_grad_norm=0.01)
    take_step(optimizer, make_closure(model, optimizer, x, y, recipe), recipe)

    # The same step by hand: gradient, torch's own clipping, then SGD with the run's settings.
    reference_optimizer = build_optimizer(config, reference)
    reference_optimizer.zero_grad()
    F.cross_entropy(reference(x), y).backward()
    norm_before = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.01)
    reference_optimizer.step()

    assert float(norm_before) > 0.01  # the clip was active
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)
