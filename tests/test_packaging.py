"""Packaging checks: every subpackage ships, and crsam.theory works without torch."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"crsam." + init.parent.name for init in (ROOT / "crsam").glob("*/__init__.py")}

    # A subpackage missing from the list is left out of a wheel, though editable installs work.
    assert found <= listed
    assert config["package-dir"]["crsam.theory"] == "theory"
    assert config["package-dir"]["crsam.verify"] == "verify"


def test_theory_imports_without_torch():
    code = "import sys, crsam, crsam.theory; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "False"
