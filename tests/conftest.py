"""Shared pytest configuration: hypothesis profiles and float64 defaults."""

import os

from hypothesis import HealthCheck, settings

# "ci" is derandomized so that CI and users see the same examples on every run; "dev" explores
# new examples each run. Select with HYPOTHESIS_PROFILE=dev.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
