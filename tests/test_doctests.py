"""Run the examples in public docstrings, so that documented output stays true."""

import doctest
import importlib

import pytest

MODULES = [
    "crsam.optim", "crsam.curvature.trace", "crsam.certificate.gaussian", "crsam.certificate.montecarlo",
    "crsam.imagefolder",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)

    assert result.attempted > 0
    assert result.failed == 0
