"""`crsam bound --prior learned`: the tight certificate through the command line."""

import json

import pytest

from crsam.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "mlp"
    status = main(["train", "--num-samples", "500", "--epochs", "1", "--out", str(out)])
    assert status == 0
    return out / "checkpoint.pt"


def test_learned_prior_json(tiny_run, capsys):
    status = main(["bound", str(tiny_run), "--prior", "learned", "--mc-samples", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    names = {row["name"] for row in report["bounds"]}

    assert status == 0
    assert report["prior"]["kind"] == "learned"
    assert {"kl", "catoni", "dziugaite-roy"} <= names
    # n counts only the bound half of the 400 training examples.
    assert all(row["n"] == 200 for row in report["bounds"])
    assert all(0.0 <= row["value"] <= 1.0 for row in report["bounds"])


def test_init_prior_reports_every_family(tiny_run, capsys):
    status = main(["bound", str(tiny_run), "--mc-samples", "20", "--json"])
    report = json.loads(capsys.readouterr().out)
    names = {row["name"] for row in report["bounds"]}

    assert status == 0
    assert names == {"kl", "mcallester", "quad", "catoni", "dziugaite-roy"}
    assert all(row["delta"] == pytest.approx(0.05) for row in report["bounds"])
