"""Argument checks shared by the bounds: each raises ``ValueError`` naming the value and the rule.

Arrays are checked entry by entry, and the message shows the first invalid entry and its index.
"""

import numpy as np

# A mean of values in [0, 1] can land outside [0, 1] only through round-off. Pairwise summation
# (numpy's mean) of 10^9 terms has a relative error of a few times log2(10^9) * 2^-53, about
# 1e-14, so an excess above 1e-12 means a real error (such as a sum divided by the wrong count).
# Entries within the tolerance are clipped: the exact mean lies in [0, 1], so clipping moves the
# computed value towards it and never makes a bound optimistic.
PROBABILITY_ROUNDING_TOL = 1e-12


def as_float_array(value, name):
    """Convert ``value`` to a float64 array, raising ``ValueError`` for non-numeric input."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a number or an array of numbers, got {value!r}") from error


def scalar_or_array(result):
    """Return a Python float for a 0-d result and the array otherwise."""
    result = np.asarray(result, dtype=np.float64)
    if result.ndim == 0:
        return float(result)
    return result


def _first_bad(array, bad_mask):
    """Describe the first entry where ``bad_mask`` is true, with its index for arrays."""
    if array.ndim == 0:
        return f"{array.item()!r}"
    index = tuple(int(i) for i in np.argwhere(bad_mask)[0])
    return f"{array[index].item()!r} at index {index}"


def check_probability(value, name):
    """Return ``value`` as an array in [0, 1], clipping round-off of at most 1e-12.

    NaN, and entries further than ``PROBABILITY_ROUNDING_TOL`` outside [0, 1], raise.
    """
    array = as_float_array(value, name)
    bad = ~((array >= -PROBABILITY_ROUNDING_TOL) & (array <= 1.0 + PROBABILITY_ROUNDING_TOL))
    if np.any(bad):
        raise ValueError(
            f"{name} must be in [0, 1], got {_first_bad(array, bad)}. "
            f"Pass a mean of [0, 1]-valued losses (round-off up to {PROBABILITY_ROUNDING_TOL:g} "
            "outside the interval is clipped)."
        )
    return np.clip(array, 0.0, 1.0)


def check_delta(value, name="delta"):
    """Return ``value`` as an array in the open interval (0, 1)."""
    array = as_float_array(value, name)
    bad = ~((array > 0.0) & (array < 1.0))
    if np.any(bad):
        raise ValueError(
            f"{name} must be in (0, 1), got {_first_bad(array, bad)}. "
            "Pass the failure probability, such as 0.05."
        )
    return array


def check_count(value, name):
    """Return ``value`` as a float array of integers >= 1 (a number of examples or samples)."""
    array = as_float_array(value, name)
    bad = ~(np.isfinite(array) & (array >= 1.0) & (array == np.floor(array)))
    if np.any(bad):
        raise ValueError(
            f"{name} must be an integer >= 1, got {_first_bad(array, bad)}. "
            "Pass the number of examples or samples that the empirical mean averages over."
        )
    return array


def check_nonnegative(value, name):
    """Return ``value`` as an array >= 0; +inf is allowed, NaN is not."""
    array = as_float_array(value, name)
    bad = ~(array >= 0.0)
    if np.any(bad):
        raise ValueError(
            f"{name} must be >= 0 and not NaN, got {_first_bad(array, bad)}. "
            "A KL divergence or a kl budget is never negative; check how it was computed."
        )
    return array


def check_positive(value, name):
    """Return ``value`` as an array of finite entries > 0."""
    array = as_float_array(value, name)
    bad = ~(np.isfinite(array) & (array > 0.0))
    if np.any(bad):
        raise ValueError(f"{name} must be finite and > 0, got {_first_bad(array, bad)}.")
    return array


def check_open_interval(value, name, low, high):
    """Return ``value`` as an array in the open interval (low, high)."""
    array = as_float_array(value, name)
    bad = ~((array > low) & (array < high))
    if np.any(bad):
        raise ValueError(f"{name} must be in ({low:g}, {high:g}), got {_first_bad(array, bad)}.")
    return array
