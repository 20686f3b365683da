"""Statistics of the reproduction study script: intervals and paired differences over seeds."""

import importlib.util
import math
from pathlib import Path

import pytest
from scipy import stats

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("reproduce_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interval_matches_scipy(study):
    values = [0.78, 0.784, 0.771, 0.79, 0.775]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    result = study.mean_interval(values)
    # Both sides compute the same float64 expression in a different order: a few ulps apart.
    assert math.isclose(result["low"], low, rel_tol=1e-12)
    assert math.isclose(result["high"], high, rel_tol=1e-12)
    assert result["n"] == 5


def test_interval_single_value(study):
    assert study.mean_interval([0.5]) == {"mean": 0.5, "low": None, "high": None, "n": 1}


def test_interval_skips_missing(study):
    assert study.mean_interval([None, float("nan"), 2.0, 4.0])["mean"] == 3.0


def test_paired_difference_per_seed(study):
    def run(value):
        return {"metrics": [{"epoch": 1, "test_acc": value, "train_loss": 1.0}]}

    cells = {"mlp": {
        "sgd": {0: run(0.5), 1: run(0.6)},
        "sam": {0: run(0.70), 1: run(0.80), 2: run(0.9)},
        "crsam": {0: run(0.71), 1: run(0.83)},
    }}
    summary = study.summarise(cells)
    paired = summary["mlp"]["crsam_minus_sam"]["test_acc"]
    # Seed 2 has no CR-SAM run, so only seeds 0 and 1 pair up: differences 0.01 and 0.03.
    assert paired["n"] == 2
    assert math.isclose(paired["mean"], 0.02, rel_tol=1e-12)
    assert summary["mlp"]["sam"]["test_acc"]["n"] == 3
