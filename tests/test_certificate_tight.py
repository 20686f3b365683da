"""Tests of the tight certificate and of the Catoni and Dziugaite-Roy rows.

Models are tiny float64 networks on synthetic data, so that a whole certificate (split, prior
training, posterior fit and Monte Carlo) takes a fraction of a second. In float64, ties between
logits, which could make two evaluation orders disagree on an argmax, do not occur in practice.
"""

import copy
import doctest
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from crsam.certificate import certify, format_certificate_table
from crsam.certificate import gaussian, tight
from crsam.certificate.gaussian import (
    BOUND_FAMILIES,
    DEFAULT_CATONI_GRID,
    confidence_budget,
)
from crsam.certificate.tight import (
    certify_diagonal_posterior,
    clipped_cross_entropy_loss,
    diagonal_gaussian_kl_torch,
    tight_certificate,
    tight_noise_seeds,
    train_prior,
)
from crsam.data import hash_tensors, split_for_prior
from crsam.theory import (
    catoni_grid_bound,
    clipped_cross_entropy,
    dziugaite_roy_bound,
    gaussian_kl,
    kl_bound,
    kl_inv_upper,
    mcallester_bound,
    quad_bound,
    sample_bound,
)

NUM_CLASSES = 3
INPUT_DIM = 5

# Small budgets keep each tight_certificate call at a few hundredths of a second.
FAST = dict(prior_epochs=2, posterior_epochs=2, refit_epochs=1, mc_samples=3,
            posterior_batch_size=50, batch_size=64, prior_batch_size=32)

# The relative error of one float64 operation chain of a few dozen steps, with margin.
CLOSED_FORM_RTOL = 64 * 2.0**-52


def make_mlp(seed=0, width=8):
    """Return a float64 MLP with seeded weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(INPUT_DIM, width), nn.Tanh(), nn.Linear(width, NUM_CLASSES)
    ).double()


def make_data(n, seed=1):
    """Return inputs and labels that a linear rule mostly explains."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, INPUT_DIM, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return x, y


def tight_call(**changes):
    """Return the arguments of a valid tight_certificate call with ``changes`` applied."""
    model = make_mlp()
    x_train, y_train = make_data(200, seed=2)
    x_test, y_test = make_data(60, seed=3)
    arguments = dict(model=model, init_state=copy.deepcopy(model.state_dict()),
                     data=(x_train, y_train, x_test, y_test), **FAST)
    arguments.update(changes)
    return arguments


def quiet(function, *args, **kwargs):
    """Call ``function`` with the report's expected warnings (grid edges) silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return function(*args, **kwargs)


def posterior_pair(seed=0, variance="layer"):
    """Return a model, its prior state, and a posterior mean and sigma moved away from it."""
    model = make_mlp(seed)
    prior_state = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(seed + 100)
    mean = {name: value.detach() + 0.3 * torch.randn(value.shape, generator=generator,
                                                     dtype=value.dtype)
            for name, value in model.named_parameters()}
    if variance == "layer":
        sigma = {name: 0.05 * (index + 1) for index, (name, _) in enumerate(model.named_parameters())}
    else:
        sigma = {name: 0.02 + 0.1 * torch.rand(value.shape, generator=generator, dtype=value.dtype)
                 for name, value in model.named_parameters()}
    return model, prior_state, mean, sigma


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run this module's tiny models on one thread and restore the setting afterwards.

    Operations on a few dozen numbers gain nothing from intra-op threads, and other jobs share
    the cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report(single_thread):
    """One tight certificate of a tiny MLP, shared by the read-only tests."""
    return quiet(tight_certificate, **tight_call())


# ---------------------------------------------------------------------------------------------
# Split and prior


def test_split_is_disjoint_and_hashed(report):
    split = report["split"]
    expected = split_for_prior(200, 0.5, seed=0)
    assert split["n_prior"] + split["n_bound"] == 200
    assert split["disjoint"] is True
    assert not torch.isin(expected.prior_indices, expected.bound_indices).any()
    assert split["prior_indices_sha256"] == hash_tensors(expected.prior_indices)
    assert split["bound_indices_sha256"] == hash_tensors(expected.bound_indices)
    # The prior-split hash is the one 'crsam train --prior-split' records in a checkpoint.
    assert split["prior_indices_sha256"] == expected.indices_sha256


def test_n_counts_only_bound_split(report):
    n_bound = report["split"]["n_bound"]
    assert n_bound == 100
    assert report["n_train"] == n_bound
    assert report["monte_carlo"]["n"] == n_bound
    assert report["monte_carlo"]["draws"] == report["monte_carlo"]["samples"] * n_bound
    for row in report["bounds"]:
        assert row["n"] == n_bound, row["name"]


def test_prior_ignores_bound_split():
    x_train, y_train = make_data(200, seed=2)
    split = split_for_prior(200, 0.5, seed=0)
    changed_bound = y_train.clone()
    changed_bound[split.bound_indices] = (changed_bound[split.bound_indices] + 1) % NUM_CLASSES
    changed_prior = y_train.clone()
    changed_prior[split.prior_indices] = (changed_prior[split.prior_indices] + 1) % NUM_CLASSES
    x_test, y_test = make_data(60, seed=3)

    def prior_test_error(labels):
        arguments = tight_call(data=(x_train, labels, x_test, y_test), posterior_epochs=0,
                               refit_epochs=0)
        return quiet(tight_certificate, **arguments)["prior"]["errors"]["test"]

    # Relabelling the bound split leaves the prior network unchanged, bit for bit.
    assert prior_test_error(changed_bound) == prior_test_error(y_train)
    # Relabelling the prior split changes it, so the check above can fail.
    assert prior_test_error(changed_prior) != prior_test_error(y_train)


def test_train_prior_leaves_model_unchanged():
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    x, y = make_data(40)
    state = train_prior(model, before, x, y, epochs=2, lr=0.1, batch_size=16)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(state[name], before[name]) for name in before)


def test_train_prior_zero_epochs_returns_init():
    model = make_mlp()
    init_state = copy.deepcopy(model.state_dict())
    x, y = make_data(40)
    state = train_prior(model, init_state, x, y, epochs=0, lr=0.1)
    for name, value in init_state.items():
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize("optimizer", ["sam", "crsam"])
def test_train_prior_with_sharpness_aware_optimizer(optimizer):
    model = make_mlp()
    init_state = copy.deepcopy(model.state_dict())
    x, y = make_data(40)
    state = train_prior(model, init_state, x, y, epochs=1, lr=0.1, optimizer=optimizer,
                        batch_size=20)
    assert all(torch.isfinite(value).all() for value in state.values())
    assert any(not torch.equal(state[name], init_state[name]) for name in init_state)


def test_given_prior_state_skips_training():
    model = make_mlp()
    prior_state = copy.deepcopy(make_mlp(seed=5).state_dict())
    result = quiet(tight_certificate, **tight_call(init_state=None, prior_state=prior_state))
    assert result["prior"]["training"]["trained_here"] is False
    assert result["prior"]["kind"] == "learned"


def test_split_from_checkpoint_is_reused():
    split = split_for_prior(200, 0.3, seed=9)
    result = quiet(tight_certificate, **tight_call(split=split))
    assert result["split"]["n_prior"] == 60
    assert result["split"]["seed"] == 9
    assert result["split"]["prior_indices_sha256"] == split.indices_sha256


@pytest.mark.parametrize("kind", ["init", "learned"])
def test_run_prior_kind_and_split(kind):
    from types import SimpleNamespace

    from crsam.train import RestoredRun

    model = make_mlp()
    x_train, y_train = make_data(200, seed=2)
    x_test, y_test = make_data(60, seed=3)
    data = SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    split = split_for_prior(200, 0.4, seed=3)
    run = RestoredRun(path=None, checkpoint={"prior": {"kind": kind}}, config={}, model=model,
                      data=data, prior_state=copy.deepcopy(model.state_dict()), prior_split=split)
    options = {key: value for key, value in FAST.items()}
    result = quiet(tight.tight_certificate_for_run, run, **options)
    assert result["split"]["prior_indices_sha256"] == split.indices_sha256
    assert result["split"]["n_bound"] == 120
    # An initial-weights prior is trained on the prior split; a learned one is used as it is.
    assert result["prior"]["training"]["trained_here"] is (kind == "init")


# ---------------------------------------------------------------------------------------------
# Confidence accounting


@pytest.mark.parametrize("families", [("kl",), ("catoni",), ("kl", "dziugaite-roy"), BOUND_FAMILIES])
@pytest.mark.parametrize("delta, fraction", [(0.05, 0.5), (1e-6, 0.01), (0.3, 0.97)])
def test_budget_steps_sum_to_total(families, delta, fraction):
    budget = confidence_budget(delta, fraction, families, 7, 5)
    steps = budget["steps"]
    assert [step["name"] for step in steps] == ["monte-carlo", *families]
    # Each share comes from one product, one subtraction and one division: a few ulps each.
    assert math.fsum(step["delta"] for step in steps) == pytest.approx(delta, rel=1e-15)
    assert budget["monte_carlo"] == pytest.approx(fraction * delta, rel=1e-15)
    for step in steps[1:]:
        assert step["delta"] == pytest.approx(budget["pac_bayes"] / len(families), rel=1e-15)
        if step["events"] is not None:
            assert step["delta_per_event"] * step["events"] == pytest.approx(step["delta"],
                                                                              rel=1e-15)
    expected_events = {"kl": 7, "catoni": 35, "dziugaite-roy": None}
    for step in steps[1:]:
        assert step["events"] == expected_events[step["name"]]


def test_report_accounting_matches_rows(report):
    confidence = report["confidence"]
    steps = {step["name"]: step for step in confidence["steps"]}
    assert math.fsum(step["delta"] for step in steps.values()) == pytest.approx(
        report["delta"], rel=1e-15)
    assert report["monte_carlo"]["delta"] == steps["monte-carlo"]["delta"]
    grid_size = len(report["sigma_grid"])
    rows = {row["name"]: row for row in report["bounds"]}
    for name in ("kl", "mcallester", "quad"):
        assert rows[name]["delta_pac_bayes"] == steps["kl"]["delta_per_event"]
        assert rows[name]["delta_family"] == confidence["monte_carlo"] + steps["kl"]["delta"]
    assert rows["catoni"]["delta_pac_bayes"] == steps["catoni"]["delta"] / grid_size
    assert rows["dziugaite-roy"]["delta_pac_bayes"] == steps["dziugaite-roy"]["delta"]
    for row in report["bounds"]:
        assert row["delta"] == report["delta"]
        assert row["delta_family"] < row["delta"]
    assert report["best_bound"]["delta"] == report["delta"]
    assert report["best_bound"]["value"] == min(row["value"] for row in report["bounds"])


def test_certify_all_families_accounting():
    model = make_mlp()
    prior_state = copy.deepcopy(model.state_dict())
    x, y = make_data(80)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05)
    result = quiet(certify, model, prior_state, x, y, families=BOUND_FAMILIES, mc_samples=20,
                   selection_samples=4, sigma_grid=[0.03, 0.1, 0.3], batch_size=40)
    assert [row["name"] for row in result["bounds"]] == [
        "kl", "mcallester", "quad", "catoni", "dziugaite-roy"]
    steps = {step["name"]: step for step in result["confidence"]["steps"]}
    assert math.fsum(step["delta"] for step in steps.values()) == pytest.approx(0.05, rel=1e-15)
    assert result["confidence"]["pac_bayes_per_sigma"] == steps["kl"]["delta_per_event"]
    rows = {row["name"]: row for row in result["bounds"]}

    # The Catoni row is theory's grid bound at the family's delta per sigma.
    catoni = rows["catoni"]
    assert catoni["delta_pac_bayes"] == steps["catoni"]["delta"] / 3
    assert catoni["raw_value"] == catoni_grid_bound(catoni["empirical"], catoni["kl"], 80,
                                                    catoni["delta_pac_bayes"],
                                                    list(DEFAULT_CATONI_GRID))

    # The Dziugaite-Roy row's KL is recomputed at its grid variance from the flat weights.
    dziugaite_roy = rows["dziugaite-roy"]
    posterior = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    prior = np.concatenate([prior_state[name].numpy().ravel() for name, _ in model.named_parameters()])
    expected_kl = gaussian_kl(posterior, result["sigma"], prior,
                              math.sqrt(dziugaite_roy["prior_variance"]))
    assert dziugaite_roy["kl"] == expected_kl
    assert dziugaite_roy["raw_value"] == dziugaite_roy_bound(
        dziugaite_roy["empirical"], dziugaite_roy["kl"], 80, dziugaite_roy["delta_pac_bayes"],
        dziugaite_roy["grid_index"])


def test_certify_default_reports_kl_family_only():
    model = make_mlp()
    x, y = make_data(30)
    result = quiet(certify, model, copy.deepcopy(model.state_dict()), x, y, mc_samples=4,
                   selection_samples=2, sigma_grid=[0.1])
    assert [row["name"] for row in result["bounds"]] == ["kl", "mcallester", "quad"]
    assert list(result["confidence"]["families"]) == ["kl"]


# ---------------------------------------------------------------------------------------------
# Rows recompute from their components


def test_rows_recompute_from_components(report):
    monte_carlo = report["monte_carlo"]
    assert monte_carlo["upper"] == sample_bound(monte_carlo["mean"], monte_carlo["draws"],
                                                monte_carlo["delta"])
    rows = {row["name"]: row for row in report["bounds"]}
    n = report["n_train"]
    for row in report["bounds"]:
        assert row["empirical"] == monte_carlo["upper"]
        assert row["value"] == min(max(row["raw_value"], 0.0), 1.0)
        assert row["vacuous"] == (row["raw_value"] >= 1.0)

    # The kl family: theory's functions, and the complexity column through each row's formula.
    functions = {"kl": kl_bound, "mcallester": mcallester_bound, "quad": quad_bound}
    for name, function in functions.items():
        row = rows[name]
        assert row["raw_value"] == function(row["empirical"], row["kl"], n, row["delta_pac_bayes"])
    # The kl inverse moves by a few times the last-bit difference of the complexity column.
    assert rows["kl"]["value"] == pytest.approx(
        kl_inv_upper(rows["kl"]["empirical"], rows["kl"]["complexity"]), rel=1e-12)
    assert rows["mcallester"]["raw_value"] == pytest.approx(
        rows["mcallester"]["empirical"] + rows["mcallester"]["complexity"], rel=CLOSED_FORM_RTOL)

    # Catoni: theory's grid bound, and the formula at the reported minimizing C.
    catoni = rows["catoni"]
    assert catoni["raw_value"] == catoni_grid_bound(catoni["empirical"], catoni["kl"], n,
                                                    catoni["delta_pac_bayes"],
                                                    list(DEFAULT_CATONI_GRID))
    recomputed = (-math.expm1(-catoni["C"] * catoni["empirical"] - catoni["complexity"])
                  / -math.expm1(-catoni["C"]))
    assert catoni["raw_value"] == pytest.approx(recomputed, rel=CLOSED_FORM_RTOL)

    # Dziugaite-Roy: theory's grid bound at the reported index, its variance and its cost.
    dziugaite_roy = rows["dziugaite-roy"]
    assert dziugaite_roy["raw_value"] == dziugaite_roy_bound(
        dziugaite_roy["empirical"], dziugaite_roy["kl"], n, dziugaite_roy["delta_pac_bayes"],
        dziugaite_roy["grid_index"])
    assert dziugaite_roy["prior_variance"] == pytest.approx(
        dziugaite_roy["grid_c"] * math.exp(-dziugaite_roy["grid_index"] / dziugaite_roy["grid_b"]),
        rel=CLOSED_FORM_RTOL)
    assert dziugaite_roy["union_cost"] == pytest.approx(
        math.log(math.pi**2 * dziugaite_roy["grid_index"] ** 2 / 6), rel=CLOSED_FORM_RTOL)
    assert dziugaite_roy["value"] == pytest.approx(
        kl_inv_upper(dziugaite_roy["empirical"], dziugaite_roy["complexity"]), rel=1e-12)


def test_bound_not_below_monte_carlo_mean(report):
    for row in report["bounds"]:
        assert row["value"] >= report["monte_carlo"]["upper"] >= report["monte_carlo"]["mean"]


# ---------------------------------------------------------------------------------------------
# Monte Carlo: fresh samples and exact means


def test_noise_streams_are_distinct(report):
    provenance = report["provenance"]
    seeds = tight_noise_seeds(provenance["seed"])
    assert provenance["posterior_seed"] == seeds["posterior"] == report["optimization"]["seed"]
    assert provenance["certification_seed"] == seeds["certification"]
    assert report["monte_carlo"]["seed"] == seeds["certification"]
    assert len(set(seeds.values())) == 3

    # No certification draw repeats a draw of the posterior fit's stream.
    fit = torch.randn(4000, generator=torch.Generator().manual_seed(seeds["posterior"]),
                      dtype=torch.float64)
    certification = torch.randn(4000, generator=torch.Generator().manual_seed(
        seeds["certification"]), dtype=torch.float64)
    assert not torch.isin(certification, fit).any()


def brute_force_per_example(model, mean, sigma, x, y, seed, rounds, batch_size):
    """Count errors with one fresh weight sample per example, loading each into a model copy."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [value.shape for _, value in model.named_parameters()]
    flat_mean = torch.cat([mean[name].reshape(-1) for name in names])
    flat_sigma = torch.cat([torch.as_tensor(sigma[name], dtype=torch.float64).expand(shape).reshape(-1)
                            for name, shape in zip(names, shapes)])
    generator = torch.Generator().manual_seed(seed)
    replica = copy.deepcopy(model)
    counts = []
    for _ in range(rounds):
        errors = 0
        for start in range(0, x.shape[0], batch_size):
            inputs = x[start:start + batch_size]
            noise = torch.randn((inputs.shape[0], flat_mean.numel()), generator=generator,
                                dtype=torch.float64)
            for row, example, label in zip(noise, inputs, y[start:start + batch_size]):
                torch.nn.utils.vector_to_parameters(flat_mean + flat_sigma * row,
                                                    replica.parameters())
                with torch.no_grad():
                    errors += int(replica(example.unsqueeze(0)).argmax(dim=1).item() != label)
        counts.append(errors)
    return counts


@pytest.mark.parametrize("batch_size", [7, 64])
def test_per_example_mean_is_exact(batch_size):
    model, prior_state, mean, sigma = posterior_pair(variance="parameter")
    x, y = make_data(53)
    result = quiet(certify_diagonal_posterior, model, prior_state, mean, sigma, x, y,
                   mc_samples=3, seed=11, batch_size=batch_size)
    counts = brute_force_per_example(model, mean, sigma, x, y, seed=11, rounds=3,
                                     batch_size=batch_size)
    exact = Fraction(sum(counts), 3 * 53)
    # The mean is one division of exact integers, so it is the correctly rounded exact value.
    assert result["monte_carlo"]["mean"] == float(exact)
    assert result["monte_carlo"]["draws"] == 3 * 53


def test_per_sample_scheme_matches_whole_set_samples():
    model, prior_state, mean, sigma = posterior_pair()
    x, y = make_data(41)
    result = quiet(certify_diagonal_posterior, model, prior_state, mean, sigma, x, y,
                   mc_samples=6, mc_scheme="per-sample", seed=4, sample_batch_size=4)
    assert result["monte_carlo"]["draws"] == 6

    # The same stream, one weight sample at a time, each evaluated on all examples.
    names = [name for name, _ in model.named_parameters()]
    shapes = [value.shape for _, value in model.named_parameters()]
    flat_mean = torch.cat([mean[name].reshape(-1) for name in names])
    flat_sigma = torch.cat([torch.full(shape, float(sigma[name]), dtype=torch.float64).reshape(-1)
                            for name, shape in zip(names, shapes)])
    generator = torch.Generator().manual_seed(4)
    replica = copy.deepcopy(model)
    errors = 0
    for _ in range(6):
        noise = torch.randn(flat_mean.numel(), generator=generator, dtype=torch.float64)
        torch.nn.utils.vector_to_parameters(flat_mean + flat_sigma * noise, replica.parameters())
        with torch.no_grad():
            errors += int((replica(x).argmax(dim=1) != y).sum())
    assert result["monte_carlo"]["mean"] == float(Fraction(errors, 6 * 41))


class ItemModel(nn.Module):
    """Linear model that calls ``.item()`` in its forward pass, which ``vmap`` cannot batch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(INPUT_DIM, NUM_CLASSES).double()

    def forward(self, x):
        logits = self.linear(x)
        if logits.abs().max().item() > 1e300:
            raise AssertionError("unreachable for these inputs")
        return logits


def test_per_example_falls_back_without_vmap():
    torch.manual_seed(0)
    model = ItemModel()
    state = copy.deepcopy(model.state_dict())
    sigma = {name: 0.1 for name, _ in model.named_parameters()}
    x, y = make_data(20)
    with pytest.warns(UserWarning, match="vmap failed"), \
            pytest.warns(UserWarning, match="used the per-sample scheme"):
        result = certify_diagonal_posterior(model, state, state, sigma, x, y, mc_samples=2,
                                            prior_sigma_grid=[0.1])
    assert result["monte_carlo"]["scheme"] == "per-sample"
    assert result["monte_carlo"]["draws"] == 2


# ---------------------------------------------------------------------------------------------
# KL of diagonal Gaussians


def independent_kl(mean, sigma, prior_state, prior_sigma, names):
    """Sum the KL of every coordinate from its definition in float64 with exact summation."""
    per_layer = {}
    for name in names:
        mu_q = mean[name].numpy().ravel()
        sigma_q = np.broadcast_to(np.asarray(sigma[name], dtype=np.float64), mean[name].shape).ravel()
        mu_p = prior_state[name].numpy().ravel()
        terms = [math.log(prior_sigma / s) + (s * s + (m - p) ** 2) / (2 * prior_sigma**2) - 0.5
                 for m, s, p in zip(mu_q.tolist(), sigma_q.tolist(), mu_p.tolist())]
        per_layer[name] = math.fsum(terms)
    return per_layer


def test_prior_scale_edge_warning_names_options():
    model, prior_state, mean, sigma = posterior_pair()
    x, y = make_data(30)
    # A grid of tiny scales: the KL is smallest at its largest value, the edge.
    with pytest.warns(UserWarning, match="is the largest value of the grid") as caught:
        certify_diagonal_posterior(model, prior_state, mean, sigma, x, y, mc_samples=1,
                                   prior_sigma_grid=[1e-4, 1e-3])
    message = next(str(w.message) for w in caught if "prior scale" in str(w.message))
    assert "--sigma-grid of 'crsam bound --prior learned'" in message
    assert "prior_sigma_grid of crsam.certificate.tight_certificate" in message


@pytest.mark.parametrize("variance", ["layer", "parameter"])
def test_kl_against_float64_definition(variance):
    model, prior_state, mean, sigma = posterior_pair(variance=variance)
    x, y = make_data(30)
    grid = [0.05, 0.1, 0.2, 0.4]
    result = quiet(certify_diagonal_posterior, model, prior_state, mean, sigma, x, y,
                   mc_samples=1, prior_sigma_grid=grid)
    names = [name for name, _ in model.named_parameters()]

    # Each direct term is off by a few ulps of its O(1) parts, and the KL averages more than 1
    # nat per coordinate at every grid value here. So both sums agree to about 1e-14 relative,
    # and 1e-12 leaves a margin.
    by_sigma = [math.fsum(independent_kl(mean, sigma, prior_state, value, names).values())
                for value in grid]
    np.testing.assert_allclose(result["prior"]["kl_by_sigma"], by_sigma, rtol=1e-12)
    chosen = int(np.argmin(by_sigma))
    assert result["prior"]["sigma"] == grid[chosen]
    assert result["kl"] == pytest.approx(by_sigma[chosen], rel=1e-12)

    per_layer = independent_kl(mean, sigma, prior_state, grid[chosen], names)
    assert [layer["name"] for layer in result["per_layer"]] == names
    for layer in result["per_layer"]:
        assert layer["kl"] == pytest.approx(per_layer[layer["name"]], rel=1e-12)
    assert math.fsum(layer["kl"] for layer in result["per_layer"]) == pytest.approx(
        result["kl"], rel=1e-12)


def test_torch_kl_matches_gaussian_kl():
    generator = torch.Generator().manual_seed(3)
    mean = torch.randn(500, generator=generator, dtype=torch.float64)
    sigma = 0.01 + torch.rand(500, generator=generator, dtype=torch.float64)
    prior_mean = torch.randn(500, generator=generator, dtype=torch.float64)
    value = diagonal_gaussian_kl_torch(mean, sigma, prior_mean, torch.tensor(0.7, dtype=torch.float64))
    expected = gaussian_kl(mean.numpy(), sigma.numpy(), prior_mean.numpy(), 0.7)
    # The torch form forms r - 1 - ln r directly, which loses up to ~1e-13 relative for r near 1.
    assert float(value) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Objective pieces


def test_clipped_loss_matches_theory():
    generator = torch.Generator().manual_seed(0)
    logits = 6.0 * torch.randn(40, NUM_CLASSES, generator=generator, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (40,), generator=generator)
    log_probability = torch.log_softmax(logits, dim=-1).gather(1, y.unsqueeze(1)).squeeze(1)
    expected = np.mean(clipped_cross_entropy(log_probability.numpy(), 1e-2))
    value = float(clipped_cross_entropy_loss(logits, y, 1e-2))
    # Both are a clamp, a division and a mean of 40 terms in float64.
    assert value == pytest.approx(expected, rel=1e-14)
    assert 0.0 <= value <= 1.0


def test_kl_inverse_gradient():
    q = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    # kl_inv_upper is accurate to a few ulps, so central differences with step 1e-6 carry an
    # error of about 1e-10 relative; 1e-5 leaves room for the curvature term.
    assert torch.autograd.gradcheck(tight._KlInverseUpper.apply, (q, c), eps=1e-6, atol=1e-5,
                                    rtol=1e-5)


def test_kl_objective_gives_finite_certificate():
    result = quiet(tight_certificate, **tight_call(objective="kl"))
    assert result["optimization"]["objective"] == "kl"
    assert all(math.isfinite(entry["objective"]) for entry in result["optimization"]["history"])
    assert 0.0 <= result["best_bound"]["value"] <= 1.0


def test_refit_fixes_prior_scale_on_grid(report):
    optimization = report["optimization"]
    grid = report["sigma_grid"]
    assert optimization["refit_prior_sigma"] in grid
    nearest = min(grid, key=lambda value: abs(math.log(value / optimization["learned_prior_sigma"])))
    assert optimization["refit_prior_sigma"] == nearest
    assert all(entry["prior_sigma"] == nearest for entry in optimization["refit_history"])


def test_parameter_variances_and_model_init():
    result = quiet(tight_certificate, **tight_call(posterior_variance="parameter",
                                                   posterior_init="model"))
    assert result["optimization"]["variance"] == "parameter"
    assert result["optimization"]["posterior_init"] == "model"
    assert result["posterior"]["sigma_min"] < result["posterior"]["sigma_max"]


# ---------------------------------------------------------------------------------------------
# Report contract


def test_report_is_strict_json(report):
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report


def test_report_contract_keys(report):
    for key in ("train_error", "test_error", "n_train", "delta", "bounds", "monte_carlo",
                "posterior", "prior", "per_layer", "provenance", "confidence", "split",
                "optimization"):
        assert key in report, key
    assert report["prior"]["kind"] == "learned"
    assert report["procedure"] == "learned-prior"
    assert report["posterior"]["certified"] == "stochastic"
    for row in report["bounds"]:
        for key in ("name", "value", "delta", "n", "rigorous", "empirical", "kl", "complexity",
                    "vacuous"):
            assert key in row, key
        assert 0.0 <= row["value"] <= 1.0
        assert row["rigorous"] is True


def test_table_shows_rows_and_split(report):
    text = format_certificate_table(report)
    for row in report["bounds"]:
        line = next(line for line in text.splitlines() if line.startswith(row["name"] + " "))
        assert f"{row['empirical']:.6g}" in line
        assert f"{row['kl']:.6g}" in line
        # The printed value is rounded up, so it is never below the computed bound.
        assert float(line.split()[1]) >= row["value"]
    assert "bound split" in text
    assert report["split"]["prior_indices_sha256"][:12] in text
    for step in report["confidence"]["steps"]:
        assert f"{step['name']}: " in text


def test_certify_table_shows_new_rows():
    model = make_mlp()
    x, y = make_data(40)
    result = quiet(certify, model, copy.deepcopy(model.state_dict()), x, y,
                   families=BOUND_FAMILIES, mc_samples=4, selection_samples=2, sigma_grid=[0.1])
    text = format_certificate_table(result)
    assert any(line.startswith("catoni ") for line in text.splitlines())
    assert any(line.startswith("dziugaite-roy ") for line in text.splitlines())


def test_tight_certificate_is_reproducible():
    first = quiet(tight_certificate, **tight_call())
    second = quiet(tight_certificate, **tight_call())
    for key in ("bounds", "monte_carlo", "split", "kl"):
        assert first[key] == second[key]


def test_tight_certificate_leaves_model_unchanged():
    arguments = tight_call()
    model = arguments["model"]
    model.train()
    before = copy.deepcopy(model.state_dict())
    quiet(tight_certificate, **arguments)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert model.training


def test_progress_reports_every_stage():
    calls = []
    quiet(tight_certificate, **tight_call(progress=lambda *args: calls.append(args)))
    assert {stage for stage, _, _ in calls} == {"prior", "posterior", "certification"}
    assert calls[-1] == ("certification", FAST["mc_samples"], FAST["mc_samples"])


def test_docstring_examples():
    result = doctest.testmod(tight, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


# ---------------------------------------------------------------------------------------------
# Invalid input


def overlapping_split():
    """Return a split whose prior and bound parts share index 5."""
    split = split_for_prior(200, 0.5, seed=0)
    bound = torch.cat([split.bound_indices, torch.tensor([int(split.prior_indices[0])])])
    return type(split)(split.fraction, split.seed, split.prior_indices, bound,
                       split.indices_sha256)


TIGHT_BAD_INPUTS = [
    ("fraction-zero", {"prior_fraction": 0.0}, r"prior_fraction must be in \(0, 1\), got 0.0"),
    ("fraction-large", {"prior_fraction": 1.5}, r"prior_fraction must be in \(0, 1\), got 1.5"),
    ("prior-epochs-negative", {"prior_epochs": -1},
     r"prior_epochs must be a non-negative integer, got -1"),
    ("posterior-epochs-float", {"posterior_epochs": 2.5},
     r"posterior_epochs must be a non-negative integer, got 2.5"),
    ("variance-unknown", {"posterior_variance": "block"},
     r"posterior_variance must be one of layer, parameter, got 'block'"),
    ("objective-unknown", {"objective": "mse"}, r"objective must be one of quad, kl, got 'mse'"),
    ("init-unknown", {"posterior_init": "zero"},
     r"posterior_init must be one of prior, model, got 'zero'"),
    ("optimizer-unknown", {"prior_optimizer": "adam"},
     r"prior_optimizer must be one of sgd, sam, crsam, got 'adam'"),
    ("p-min-zero", {"p_min": 0.0}, r"p_min must be in \(0, 1\), got 0.0"),
    ("sigma-init-zero", {"prior_sigma_init": 0.0},
     r"prior_sigma_init must be a finite number > 0, got 0.0"),
    ("lr-negative", {"posterior_lr_mean": -1e-3},
     r"posterior_lr_mean must be a finite number > 0, got -0.001"),
    ("weight-decay-nan", {"prior_weight_decay": float("nan")},
     r"prior_weight_decay must be a finite number >= 0, got nan"),
    ("delta-one", {"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
    # Rejected before the prior training: the shares of a subnormal delta underflow.
    ("delta-subnormal", {"delta": 1e-320}, r"delta 1e-320 is too small: .* Pass a delta of at least"),
    ("mc-zero", {"mc_samples": 0}, r"mc_samples must be an integer >= 1, got 0"),
    ("scheme-unknown", {"mc_scheme": "both"},
     r"mc_scheme must be one of per-example, per-sample, got 'both'"),
    ("families-string", {"families": "kl"}, r"families must be a sequence of family names"),
    ("families-unknown", {"families": ["kl", "pinsker"]}, r"unknown family 'pinsker'"),
    ("families-repeated", {"families": ["kl", "kl"]}, r"families contains repeated names"),
    ("families-empty", {"families": []}, r"families must be a non-empty sequence"),
    ("catoni-zero", {"catoni_grid": [1.0, 0.0]},
     r"catoni_grid must contain finite positive numbers, got 0.0"),
    ("catoni-repeated", {"catoni_grid": [1.0, 1.0]}, r"catoni_grid contains repeated values"),
    ("prior-grid-empty", {"prior_sigma_grid": []},
     r"prior_sigma_grid must be a non-empty sequence"),
    ("prior-grid-negative", {"prior_sigma_grid": [0.1, -0.1]},
     r"prior_sigma_grid must contain finite positive numbers, got -0.1"),
    ("variance-b-zero", {"prior_variance_b": 0.0},
     r"prior_variance_b must be a finite number > 0, got 0.0"),
    ("init-missing", {"init_state": None}, r"init_state is None and no prior_state was given"),
    ("data-wrong-type", {"data": "mnist1d"}, r"data must be a crsam.data.Dataset or a tuple"),
    ("labels-float", {"data": (torch.zeros(10, 5, dtype=torch.float64), torch.zeros(10))},
     r"y_train must be a 1-D tensor of integer class indices"),
    ("inputs-wrong-dtype", {"data": (torch.zeros(10, 5), torch.zeros(10, dtype=torch.long))},
     r"the inputs have dtype torch.float32 but the model's parameters are torch.float64"),
    ("prior-unknown-key", {"prior_state": {"extra.weight": torch.zeros(2)}},
     r"prior_state has keys that the model does not have: \['extra.weight'\]"),
    ("split-overlapping", {"split": overlapping_split()},
     r"prior split and the bound split share 1 examples \(first index \d+\)"),
]


@pytest.mark.parametrize("changes, message", [case[1:] for case in TIGHT_BAD_INPUTS],
                         ids=[case[0] for case in TIGHT_BAD_INPUTS])
def test_tight_bad_input_raises(changes, message):
    with pytest.raises(ValueError, match=message):
        tight_certificate(**tight_call(**changes))


def test_fit_functions_check_arguments():
    model = make_mlp()
    state = copy.deepcopy(model.state_dict())
    x, y = make_data(20)
    with pytest.raises(ValueError, match=r"prior_optimizer must be one of sgd, sam, crsam, got 'lbfgs'"):
        train_prior(model, state, x, y, epochs=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match=r"objective must be one of quad, kl, got 'catoni'"):
        tight.optimize_posterior(model, state, state, x, y, epochs=1, sigma_init=0.1,
                                 prior_sigma_init=0.1, objective="catoni")
    with pytest.raises(ValueError, match=r"sigma_init must be a finite number > 0.*got -0.1"):
        tight.optimize_posterior(model, state, state, x, y, epochs=1, sigma_init=-0.1,
                                 prior_sigma_init=0.1)


SIGMA_BAD_INPUTS = [
    ("sigma-zero", lambda sigma: {**sigma, "0.bias": 0.0},
     r"posterior_sigma\['0.bias'\] must be finite and > 0, got 0.0"),
    ("sigma-nan", lambda sigma: {**sigma, "0.bias": float("nan")},
     r"posterior_sigma\['0.bias'\] must be finite and > 0, got nan"),
    ("sigma-shape", lambda sigma: {**sigma, "0.bias": torch.ones(3)},
     r"posterior_sigma\['0.bias'\] must be a number or a tensor of shape \(8,\), got shape \(3,\)"),
    ("sigma-missing", lambda sigma: {key: value for key, value in sigma.items() if key != "2.weight"},
     r"posterior_sigma is missing the parameter '2.weight'"),
]


@pytest.mark.parametrize("change, message", [case[1:] for case in SIGMA_BAD_INPUTS],
                         ids=[case[0] for case in SIGMA_BAD_INPUTS])
def test_posterior_sigma_bad_input_raises(change, message):
    model, prior_state, mean, sigma = posterior_pair()
    x, y = make_data(20)
    with pytest.raises(ValueError, match=message):
        certify_diagonal_posterior(model, prior_state, mean, change(sigma), x, y, mc_samples=1)


@pytest.mark.parametrize("changes, message", [
    ({"families": ["kl", "bernstein"]}, r"unknown family 'bernstein'"),
    ({"catoni_grid": []}, r"catoni_grid must be a non-empty sequence"),
    ({"prior_variance_c": -0.1}, r"prior_variance_c must be a finite number > 0, got -0.1"),
], ids=["family-unknown", "catoni-empty", "variance-c-negative"])
def test_certify_family_bad_input_raises(changes, message):
    model = make_mlp()
    x, y = make_data(20)
    with pytest.raises(ValueError, match=message):
        certify(model, copy.deepcopy(model.state_dict()), x, y, mc_samples=2,
                selection_samples=2, sigma_grid=[0.1], **changes)


def test_dziugaite_roy_edge_warns():
    model = make_mlp()
    prior_state = copy.deepcopy(model.state_dict())
    x, y = make_data(30)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    # With ||w - w0||^2 / k = 1, the optimal prior variance lies far above c = 0.1.
    with pytest.warns(UserWarning, match="above the first point of the Dziugaite-Roy grid") as caught:
        result = certify(model, prior_state, x, y, families=BOUND_FAMILIES, mc_samples=2,
                         selection_samples=2, sigma_grid=[0.1])
    # The advice names the CLI option and the Python parameter that exist.
    message = next(str(w.message) for w in caught if "Dziugaite-Roy" in str(w.message))
    assert "--prior-variance-c of 'crsam bound'" in message
    assert "prior_variance_c of crsam.certificate.certify" in message
    row = next(row for row in result["bounds"] if row["name"] == "dziugaite-roy")
    assert row["at_edge"] is True
    assert row["grid_index"] == 1
