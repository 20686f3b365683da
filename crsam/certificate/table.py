"""Plain-text rendering of a certificate report from :func:`crsam.certificate.certify`."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Bound values are shown rounded up to this many decimals, so the printed upper bound is never
# below the computed one.
_VALUE_DECIMALS = 4


def format_certificate_table(report: dict) -> str:
    """Render ``report`` as a readable table.

    Each bound row shows its value with the empirical term, complexity, KL, ``n`` and deltas that
    reproduce it (see the ``formula`` key of the JSON rows). The header states the confidence
    split, the chosen sigma and the Monte-Carlo estimate. The error table marks the certified
    quantity, and the per-layer table lists the KL and the distance from the prior centre.
    """
    confidence = report["confidence"]
    monte_carlo = report["monte_carlo"]
    grid = report["sigma_grid"]
    prior = report.get("prior", {})
    posterior = report["posterior"]
    lines = [
        "PAC-Bayes certificate: posterior N(w, sigma^2 I), prior N(w0, sigma^2 I) "
        f"(prior centre: {prior.get('kind', 'unknown')})",
        "Certified: expected 0-1 error of the stochastic predictor (fresh weights "
        "w + sigma e for each prediction) on the data distribution",
        "",
    ]

    # Header: confidence split, sigma, KL and the Monte-Carlo step.
    header = [
        ("confidence",
         f"total delta {_number(confidence['delta'])} = PAC-Bayes "
         f"{_number(confidence['pac_bayes'])} ({_number(confidence['pac_bayes_per_sigma'])} per "
         f"sigma over {confidence['grid_size']} grid values) + Monte Carlo "
         f"{_number(confidence['monte_carlo'])}"),
        ("sigma",
         f"{_number(report['sigma'])} from a grid of {len(grid)} values "
         f"({_number(grid[0])} to {_number(grid[-1])}), grid cost ln {len(grid)} = "
         f"{_number(report['sigma_grid_cost_nats'])} nats"),
        ("KL(Q||P)",
         f"{_number(report['kl'])} nats, ||w - w0|| = {_number(report['distance'])} over "
         f"{posterior['num_parameters']} parameters"),
        ("Monte Carlo",
         f"{monte_carlo['samples']} fresh weight samples on n = {monte_carlo['n']}: mean "
         f"{_number(monte_carlo['mean'])} (stderr {_number(monte_carlo['stderr'])}), "
         f"upper {_number(monte_carlo['upper'])} at delta {_number(monte_carlo['delta'])}"),
    ]
    width = max(len(label) for label, _ in header)
    lines += [f"{label:<{width}}  {text}" for label, text in header]
    lines.append("")

    # One row per bound, with every component a reader needs to recompute the value.
    bound_rows = [
        [
            row["name"],
            _rounded_up(row["value"]),
            _number(row.get("empirical")),
            _number(row.get("complexity")),
            _number(row.get("kl")),
            str(row["n"]),
            _number(row.get("delta_pac_bayes")),
            _number(row["delta"]),
            _yes_no(row["rigorous"]),
            _yes_no(row.get("vacuous")),
            _yes_no(row.get("beats_chance")),
        ]
        for row in report["bounds"]
    ]
    lines += _grid(
        ["bound", "value", "empirical", "complexity", "KL (nats)", "n", "delta/sigma", "delta",
         "rigorous", "vacuous", "beats chance"],
        bound_rows,
    )
    lines += [
        f"  values are rounded up to {_VALUE_DECIMALS} decimals; "
        "B = (KL + ln(2 sqrt(n) / (delta/sigma))) / n",
        "  kl = kl_inv_upper(empirical, B), mcallester = empirical + sqrt(B / 2), "
        "quad = (sqrt(empirical + B / 2) + sqrt(B / 2))^2",
        "  complexity column: B for kl and quad, sqrt(B / 2) for mcallester; "
        "delta includes the Monte-Carlo step",
        f"  beats chance: below {_number(report['chance_error'])}, the error of uniform guessing "
        f"among {report['num_classes']} classes",
    ]
    best = report.get("best_bound")
    if best is not None:
        lines.append(f"certificate: {_rounded_up(best['value'])} ({best['name']} bound) "
                     f"with probability at least {_number(1.0 - best['delta'])}")
    lines.append("")

    # Errors of the network at w, of the stochastic posterior and of the ensemble.
    errors = posterior["errors"]
    lines += _grid(
        ["error", "train", "test"],
        [
            ["network at w", _number(errors["mean"]["train"]), _number(errors["mean"]["test"])],
            ["stochastic (certified) *", _with_stderr(errors["stochastic"]["train"]),
             _with_stderr(errors["stochastic"]["test"])],
            ["ensemble (mean softmax)", _number(errors["ensemble"]["train"]),
             _number(errors["ensemble"]["test"])],
        ],
    )
    lines.append("* the bounds above hold for this predictor's expected error on new data")
    lines.append("")

    # Where the KL comes from.
    lines += _grid(
        ["parameter", "size", "||w - w0||", "KL (nats)"],
        [[layer["name"], str(layer["num_parameters"]), _number(layer["distance"]),
          _number(layer["kl"])] for layer in report["per_layer"]],
    )

    if report.get("warnings"):
        lines.append("")
        lines.append("warnings:")
        lines += [f"  - {message}" for message in report["warnings"]]
    return "\n".join(lines)


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
