"""The command line: help, one-line errors with exit status 2, JSON that parses, and a resumable suite."""

import json
import math

import pytest
from typer.testing import CliRunner

from sgdstab.cli import app
from sgdstab.io import read_json

runner = CliRunner()
COMMANDS = ["reproduce", "train", "measure", "stability", "report"]


def invoke(*args):
    # --threads 1: tiny tensors, shared CI cores.
    return runner.invoke(app, ["--threads", "1", *map(str, args)])


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--out", "{tmp}/a", "--lr", "0"], "lr must be a positive"),
        (
            ["train", "--out", "{tmp}/a", "--batch-size", "5000"],
            "batch_size must be an integer between 1 and n=500",
        ),
        (["train", "--out", "{tmp}/a", "--model", "transformer"], "unknown model 'transformer'"),
        (["train", "--out", "{tmp}/a", "--dataset", "imagenet"], "unknown data set 'imagenet'"),
        (
            ["train", "--out", "{tmp}/a", "--dataset", "cifar10", "--data-dir", "{tmp}/none"],
            "no cifar-10-batches-py folder",
        ),
        (["measure", "{tmp}/missing"], "is not a run folder"),
        (["measure", "--problem", "no_colon"], "--problem takes module:function"),
        (["measure", "--problem", "cli_problems:not_a_problem"], "returned a int, not a sgdstab.Problem"),
        (["measure", "--problem", "no_such_module_xyz:f"], "No module named"),
        (["measure", "--problem", "cli_problems:no_such_function"], "has no function 'no_such_function'"),
        (
            ["stability", "--problem", "cli_problems:tiny_problem", "--lr", "-1", "--batch-size", "2"],
            "lr must be a positive",
        ),
        (
            ["stability", "--problem", "cli_problems:tiny_problem", "--lr", "0.1", "--batch-size", "7"],
            "batch_size must be",
        ),
        (["reproduce", "--only", "E9", "--out", "{tmp}/r"], "unknown experiment E9"),
        (["reproduce", "--set", "E2.learning_rate=1", "--out", "{tmp}/r"], "has no field 'learning_rate'"),
        (["report", "{tmp}"], "no experiment results"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).parent)  # where cli_problems.py lives
    result = invoke(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_measure_and_stability_of_a_user_problem(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).parent)
    result = invoke(
        "measure", "--problem", "cli_problems:tiny_problem", "--num-probes", "10", "--top-k", "2", "--json"
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (
        summary["num_params"] == 33 and summary["num_samples"] == 6 and len(summary["top_eigenvalues"]) == 2
    )
    assert summary["lambda_max"] >= summary["top_eigenvalues"][1] > 0 and summary["loss"] < 1e-20
    assert math.isnan(summary["mu"])  # zero residuals: mu is 0/0 at an exact interpolating minimum

    result = invoke(
        "stability", "--problem", "cli_problems:tiny_problem", "--lr", "0.1", "--batch-size", "2", "--json"
    )
    assert result.exit_code == 0, result.stderr
    stability = json.loads(result.stdout)
    assert stability["thresholds"]["exact"] <= stability["thresholds"]["gd"] * (1 + 1e-9)
    assert stability["stable"] == (stability["growth_factor"] <= 1)


def test_train_then_measure_and_stability_of_the_run(tmp_path):
    run = tmp_path / "run"
    trained = invoke(
        "train",
        "--out",
        run,
        "--n",
        "30",
        "--model-arg",
        "width=8",
        "--lr",
        "0.05",
        "--batch-size",
        "4",
        "--loss-goal",
        "1e-3",
        "--max-steps",
        "2000",
        "--json",
    )
    assert trained.exit_code == 0, trained.stderr
    assert json.loads(trained.stdout)["status"] == "converged"
    assert {"config.json", "final.json", "checkpoint.pt", "metrics.jsonl"} <= {p.name for p in run.iterdir()}

    measured = invoke("measure", run, "--num-probes", "10", "--no-density", "--json")
    assert measured.exit_code == 0, measured.stderr
    summary = json.loads(measured.stdout)
    assert summary["num_samples"] == 30 and summary["loss"] <= 1e-3 and summary["density"] == []
    assert 0 < summary["mu_min"] <= summary["mu"]

    checked = invoke("stability", run / "checkpoint.pt", "--lr", "0.05", "--batch-size", "4")
    assert checked.exit_code == 0, checked.stderr
    assert "threshold exact" in checked.stdout


@pytest.mark.slow
def test_reproduce_smoke_resumes_and_report_rerenders(tmp_path):
    out = tmp_path / "suite"
    first = invoke("reproduce", "--scale", "smoke", "--only", "E2", "--out", out, "--json")
    assert first.exit_code == 0, first.stderr
    verdicts = json.loads(first.stdout)
    assert list(verdicts) == ["E2"]
    assert verdicts["E2"]["holds"] == read_json(out / "E2" / "analysis.json")["holds"]
    assert (out / "report.md").exists() and (out / "report.html").exists()
    finals = {p: p.stat().st_mtime_ns for p in out.glob("E2/*/final.json")}

    again = invoke("reproduce", "--scale", "smoke", "--only", "E2", "--out", out, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout) == verdicts
    assert {p: p.stat().st_mtime_ns for p in out.glob("E2/*/final.json")} == finals
    assert read_json(out / "config.json")["experiments"]["E2"]["scale"] == "smoke"

    rendered = invoke("report", out)
    assert rendered.exit_code == 0 and rendered.stdout.split() == [
        str(out / "report.md"),
        str(out / "report.html"),
    ]


def test_reproduce_download_without_internet_exits_2_with_the_reason(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    result = invoke(
        "reproduce", "--scale", "full", "--download", "--data-dir", tmp_path, "--out", tmp_path / "r"
    )
    assert result.exit_code == 2
    assert "could not download" in result.stderr and "network is unreachable" in result.stderr
    assert not (tmp_path / "r").exists()
