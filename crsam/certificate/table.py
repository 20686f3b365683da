"""Plain-text rendering of the certificate reports of :mod:`crsam.certificate`.

One function renders both procedures: :func:`crsam.certificate.certify` (``procedure``
``"sigma-grid"``, or no ``procedure`` key in reports of earlier versions) and
:func:`crsam.certificate.tight.tight_certificate` (``procedure`` ``"learned-prior"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Bound values are shown rounded up to this many decimals, so the printed upper bound is never
# below the computed one.
_VALUE_DECIMALS = 4

# Hashes are shown by their first characters; the JSON report has them in full.
_HASH_CHARACTERS = 12

# Formula of each kind of row in terms of its columns, for the notes under the table.
_ROW_NOTES = {
    "kl": "kl = kl_inv_upper(empirical, B) with B = (KL + ln(2 sqrt(n) / delta PB)) / n",
    "mcallester": "mcallester = empirical + sqrt(B / 2); its complexity column is sqrt(B / 2)",
    "quad": "quad = (sqrt(empirical + B / 2) + sqrt(B / 2))^2",
    "catoni": "catoni = (1 - exp(-C empirical - complexity)) / (1 - exp(-C)), complexity = "
              "(KL + ln(G / delta PB)) / n, minimum over G constants C",
    "dziugaite-roy": "dziugaite-roy = kl_inv_upper(empirical, complexity), complexity = "
                     "(KL + ln(pi^2 j^2 / 6) + ln(2 sqrt(n) / delta PB)) / n at prior variance "
                     "c exp(-j / b)",
}


def format_certificate_table(report: dict) -> str:
    """Render ``report`` as a readable table.

    Each bound row shows its value with the empirical term, complexity, KL, ``n`` and deltas that
    reproduce it (see the ``formula`` key of the JSON rows). The header states how the total
    delta is spent, step by step, the prior and posterior, and the Monte-Carlo estimate. The
    error table marks the certified quantity, and the per-layer table lists the KL and the
    distance from the prior centre.
    """
    learned = report.get("procedure") == "learned-prior"
    lines = _title(report, learned)
    lines += _header(report, learned)
    lines.append("")
    lines += _bound_table(report)
    lines.append("")
    lines += _error_table(report, learned)
    lines.append("")
    lines += _layer_table(report, learned)

    if report.get("warnings"):
        lines.append("")
        lines.append("warnings:")
        lines += [f"  - {message}" for message in report["warnings"]]
    return "\n".join(lines)


def _title(report: dict, learned: bool) -> list[str]:
    """Return the two title lines: the distributions and the certified quantity."""
    prior = report.get("prior", {})
    if learned:
        split = report.get("split", {})
        return [
            "PAC-Bayes certificate: posterior N(mu, diag(s^2)), prior N(mu_P, sigma_P^2 I) "
            f"(prior mean learned on {split.get('n_prior', '?')} held-out examples)",
            "Certified: expected 0-1 error of the stochastic predictor (fresh weights "
            "mu + s * e for each prediction) on the data distribution",
            "",
        ]
    return [
        "PAC-Bayes certificate: posterior N(w, sigma^2 I), prior N(w0, sigma^2 I) "
        f"(prior centre: {prior.get('kind', 'unknown')})",
        "Certified: expected 0-1 error of the stochastic predictor (fresh weights "
        "w + sigma e for each prediction) on the data distribution",
        "",
    ]


def _header(report: dict, learned: bool) -> list[str]:
    """Return the labelled header lines: confidence steps, prior, posterior, KL, Monte Carlo."""
    confidence = report["confidence"]
    monte_carlo = report["monte_carlo"]
    grid = report["sigma_grid"]
    posterior = report["posterior"]
    header = [("confidence", _confidence_summary(confidence))]
    for step in confidence.get("steps", []):
        if step["events"] is None:
            events = "countable grid"
        else:
            events = f"{step['events']} event" + ("" if step["events"] == 1 else "s")
        header.append(("", f"  {step['name']}: {_number(step['delta'])} ({events}): "
                           f"{step['description']}"))

    if learned:
        split = report["split"]
        prior = report["prior"]
        optimization = report.get("optimization", {})
        training = prior.get("training", {})
        trained = (f"{training['epochs']} epochs of {training['optimizer']}, lr "
                   f"{_number(training['lr'])}" if training.get("trained_here") else
                   "given by the caller")
        header += [
            ("split",
             f"{split['n_prior']} prior + {split['n_bound']} bound examples, disjoint; index "
             f"sha256 {split['prior_indices_sha256'][:_HASH_CHARACTERS]}... (prior), "
             f"{split['bound_indices_sha256'][:_HASH_CHARACTERS]}... (bound)"),
            ("prior",
             f"mean {trained}; sigma_P {_number(prior['sigma'])} from a grid of {len(grid)} "
             f"values ({_number(grid[0])} to {_number(grid[-1])}), grid cost ln {len(grid)} = "
             f"{_number(report['sigma_grid_cost_nats'])} nats"),
            ("posterior",
             f"{optimization.get('variance', '?')} variances, s from "
             f"{_number(posterior['sigma_min'])} to {_number(posterior['sigma_max'])}; "
             f"{optimization.get('objective', '?')} objective, "
             f"{optimization.get('epochs', '?')} + {optimization.get('refit_epochs', 0)} epochs "
             f"from the {optimization.get('posterior_init', '?')} weights"),
            ("KL(Q||P)",
             f"{_number(report['kl'])} nats, ||mu - mu_P|| = {_number(report['distance'])} over "
             f"{posterior['num_parameters']} parameters"),
        ]
    else:
        header += [
            ("sigma",
             f"{_number(report['sigma'])} from a grid of {len(grid)} values "
             f"({_number(grid[0])} to {_number(grid[-1])}), grid cost ln {len(grid)} = "
             f"{_number(report['sigma_grid_cost_nats'])} nats"),
            ("KL(Q||P)",
             f"{_number(report['kl'])} nats, ||w - w0|| = {_number(report['distance'])} over "
             f"{posterior['num_parameters']} parameters"),
        ]
    header.append(("Monte Carlo", _monte_carlo_summary(monte_carlo)))

    width = max(len(label) for label, _ in header)
    return [f"{label:<{width}}  {text}".rstrip() for label, text in header]


def _confidence_summary(confidence: dict) -> str:
    """Summarize the split of the total delta into the Monte-Carlo and PAC-Bayes parts."""
    text = (f"total delta {_number(confidence['delta'])} = Monte Carlo "
            f"{_number(confidence['monte_carlo'])} + PAC-Bayes {_number(confidence['pac_bayes'])}")
    families = confidence.get("families")
    if families:
        shares = ", ".join(f"{name} {_number(share)}" for name, share in families.items())
        text += f" ({shares})"
    elif confidence.get("pac_bayes_per_sigma") is not None:
        text += (f" ({_number(confidence['pac_bayes_per_sigma'])} per sigma over "
                 f"{confidence['grid_size']} grid values)")
    return text


def _monte_carlo_summary(monte_carlo: dict) -> str:
    """Describe the Monte-Carlo estimate and its upper bound."""
    if monte_carlo.get("scheme") == "per-example":
        draws = (f"{monte_carlo['samples']} rounds of fresh weights for each of n = "
                 f"{monte_carlo['n']} examples ({monte_carlo['draws']} draws)")
    else:
        draws = f"{monte_carlo['samples']} fresh weight samples on n = {monte_carlo['n']}"
    return (f"{draws}: mean {_number(monte_carlo['mean'])} (stderr "
            f"{_number(monte_carlo['stderr'])}), upper {_number(monte_carlo['upper'])} at delta "
            f"{_number(monte_carlo['delta'])}")


def _bound_table(report: dict) -> list[str]:
    """Return one row per bound, its notes and the certificate line."""
    rows = [
        [
            row["name"],
            _rounded_up(row["value"]),
            _number(row.get("empirical")),
            _number(row.get("complexity")),
            _number(row.get("kl")),
            str(row["n"]),
            _number(row.get("delta_pac_bayes")),
            _number(row.get("delta_family", row["delta"])),
            _number(row["delta"]),
            _yes_no(row["rigorous"]),
            _yes_no(row.get("vacuous")),
            _yes_no(row.get("beats_chance")),
        ]
        for row in report["bounds"]
    ]
    lines = _grid(
        ["bound", "value", "empirical", "complexity", "KL (nats)", "n", "delta PB",
         "delta family", "delta", "rigorous", "vacuous", "beats chance"],
        rows,
    )

    # Notes on how each row's value follows from its columns.
    names = [row["name"] for row in report["bounds"]]
    lines.append(f"  values are rounded up to {_VALUE_DECIMALS} decimals; empirical is the "
                 "Monte-Carlo upper value")
    lines += [f"  {_ROW_NOTES[name]}" for name in names if name in _ROW_NOTES]
    for row in report["bounds"]:
        if row["name"] == "catoni":
            lines.append(f"  catoni: C = {_number(row['C'])} of {row['catoni_grid_size']} constants")
        if row["name"] == "dziugaite-roy":
            lines.append(f"  dziugaite-roy: j = {row['grid_index']}, prior variance "
                         f"{_number(row['prior_variance'])} (b = {_number(row['grid_b'])}, c = "
                         f"{_number(row['grid_c'])}), union cost {_number(row['union_cost'])} nats")
    lines += [
        "  delta PB: the delta passed to the bound (per grid value for kl and catoni, for the "
        "whole variance grid for dziugaite-roy); delta family adds the Monte-Carlo step; delta "
        "(the total) covers the minimum over all rows",
        f"  beats chance: below {_number(report['chance_error'])}, the error of uniform guessing "
        f"among {report['num_classes']} classes",
    ]
    best = report.get("best_bound")
    if best is not None:
        lines.append(f"certificate: {_rounded_up(best['value'])} ({best['name']} bound) "
                     f"with probability at least {_number(1.0 - best['delta'])}")
    return lines


def _error_table(report: dict, learned: bool) -> list[str]:
    """Return the errors of the network at the mean, of the stochastic posterior and ensemble."""
    errors = report["posterior"]["errors"]
    train_label = "bound split" if learned else "train"
    rows = [
        ["network at mu" if learned else "network at w", _number(errors["mean"]["train"]),
         _number(errors["mean"]["test"])],
        ["stochastic (certified) *", _with_stderr(errors["stochastic"]["train"]),
         _with_stderr(errors["stochastic"]["test"])],
        ["ensemble (mean softmax)", _number(errors["ensemble"]["train"]),
         _number(errors["ensemble"]["test"])],
    ]
    if learned:
        prior_errors = report["prior"]["errors"]
        rows.append(["prior network at mu_P", _number(prior_errors["train"]),
                     _number(prior_errors["test"])])
    lines = _grid(["error", train_label, "test"], rows)
    lines.append("* the bounds above hold for this predictor's expected error on new data")
    return lines


def _layer_table(report: dict, learned: bool) -> list[str]:
    """Return the per-layer KL, distance from the prior centre and posterior deviations."""
    if learned:
        return _grid(
            ["parameter", "size", "||mu - mu_P||", "s min", "s max", "KL (nats)"],
            [[layer["name"], str(layer["num_parameters"]), _number(layer["distance"]),
              _number(layer["sigma_min"]), _number(layer["sigma_max"]), _number(layer["kl"])]
             for layer in report["per_layer"]],
        )
    return _grid(
        ["parameter", "size", "||w - w0||", "KL (nats)"],
        [[layer["name"], str(layer["num_parameters"]), _number(layer["distance"]),
          _number(layer["kl"])] for layer in report["per_layer"]],
    )


def _number(value) -> str:
    """Format a number with 6 significant digits; None prints as a dash."""
    if value is None:
        return "-"
    return f"{value:.6g}"


def _rounded_up(value) -> str:
    """Format an upper bound rounded up to ``_VALUE_DECIMALS`` decimals."""
    if value is None:
        return "-"
    scale = 10**_VALUE_DECIMALS
    rounded = min(math.ceil(value * scale) / scale, 1.0)
    return f"{rounded:.{_VALUE_DECIMALS}f}"


def _with_stderr(estimate) -> str:
    """Format a Monte-Carlo estimate as ``mean +- stderr``."""
    if estimate is None:
        return "-"
    if estimate["stderr"] is None:
        return _number(estimate["mean"])
    return f"{_number(estimate['mean'])} +- {_number(estimate['stderr'])}"


def _yes_no(flag) -> str:
    """Format a boolean flag; None prints as a dash."""
    if flag is None:
        return "-"
    return "yes" if flag else "no"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lay out ``rows`` under ``header`` in left-aligned columns."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return [
        "  ".join(f"{cell:<{width}}" for cell, width in zip(line, widths)).rstrip()
        for line in [list(header), *rows]
    ]
