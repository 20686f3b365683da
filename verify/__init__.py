"""Exact float64 oracles for small networks, independent of crsam's estimators."""
