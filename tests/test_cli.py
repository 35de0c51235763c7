"""The command line: help, one-line errors with exit status 2, JSON that parses, and a resumable suite."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sgdstab.cli import app
from sgdstab.errors import RunFolderError
from sgdstab.io import FolderLock, read_json, read_jsonl

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
        # Rows of ../shared/reviews/reliability-2026-11-29.md that ended in a traceback or named nothing.
        (["train", "--out", "{tmp}/a", "--n", "40", "--device", "tpu"], "device 'tpu'"),  # 21
        (["train", "--out", "{tmp}/a", "--n", "40", "--device", "meta"], "device 'meta'"),  # 21
        (
            ["reproduce", "--scale", "smoke", "--only", "E2", "--device", "foo", "--out", "{tmp}/r"],
            "device 'foo'",
        ),
        (["train", "--out", "{tmp}/afile", "--n", "40", "--max-steps", "5"], "cannot be a folder"),  # 23
        (["reproduce", "--scale", "smoke", "--only", "E2", "--out", "{tmp}/afile"], "cannot be a folder"),
        (["--threads", "-1", "measure", "{tmp}/missing"], "--threads must be >= 1"),  # 24
        (["reproduce", "--only", ",", "--out", "{tmp}/r"], "only names no experiment"),  # 28
        (["train", "--out", "{tmp}/a", "--classes", "a,b"], "--classes takes comma-separated"),  # 11
        (["measure", "--problem", "cli_problems:needs_arg"], "must take no arguments"),  # 58
        (["measure", "--problem", "cli_problems:exits"], "exited (SystemExit(0))"),  # 61
        (["measure", "{tmp}/damaged"], "{tmp}/damaged/config.json is damaged"),  # 63
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(Path(__file__).parent)  # where cli_problems.py lives
    (tmp_path / "afile").write_text("")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.json").write_text('{"train": {"lr": 0.1,')
    result = invoke(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    message = message.replace("{tmp}", str(tmp_path))
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()  # a refused command leaves nothing


def test_a_users_own_error_keeps_its_traceback(monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)
    result = invoke("measure", "--problem", "cli_problems:raises_value")  # row 56: not an sgdstab input error
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "the user's own mistake" in str(result.exception)


def test_stability_at_an_overflowing_lr_is_a_clean_answer(monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)
    result = invoke(
        "stability", "--problem", "cli_problems:tiny_problem", "--lr", "1e300", "--batch-size", "2", "--json"
    )  # row 49
    assert result.exit_code == 2
    assert result.stderr.startswith("error: lr=1e+300 is too large") and result.stderr.count("\n") == 1


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


# ------------------------------------------------------------------------------------- run folders
TINY_RUN = ["--n", "30", "--model-arg", "width=8", "--lr", "0.05", "--batch-size", "4", "--max-steps", "2000"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    result = invoke("train", "--out", run, *TINY_RUN, "--loss-goal", "1e-3")
    assert result.exit_code == 0, result.output
    return run


def test_train_progress_completes_and_prints_lines_without_a_terminal(tmp_path):
    result = invoke("train", "--out", tmp_path / "run", *TINY_RUN, "--loss-goal", "1e-3")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()  # rows 128, 129: stderr is not a terminal under CliRunner
    assert lines[0].startswith("training") and "/2000" in lines[0]
    assert lines[-1].startswith("training  converged  2000/2000")


@pytest.mark.parametrize("damage", ["truncate", "empty", "random", "foreign"])
def test_a_damaged_checkpoint_exits_2_naming_it(trained_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    checkpoint = run / "checkpoint.pt"
    if damage == "foreign":
        torch.save({"foo": 1}, checkpoint)
    else:
        good = checkpoint.read_bytes()
        checkpoint.write_bytes(
            {"truncate": good[:5000], "empty": b"", "random": random.Random(damage).randbytes(5000)}[damage]
        )
    for args in (["measure", run], ["stability", run, "--lr", "0.05", "--batch-size", "4"]):
        result = invoke(*args)  # rows 65-68
        assert result.exit_code == 2 and result.stderr.startswith(f"error: damaged checkpoint {checkpoint}")
    (
        run / "final.json"
    ).unlink()  # an unfinished run with a damaged checkpoint: rerunning train says what to do
    result = invoke("train", "--out", run, *TINY_RUN, "--loss-goal", "1e-3")  # row 71
    assert result.exit_code == 2 and "damaged checkpoint" in result.stderr and "delete it" in result.stderr


def test_measure_and_stability_refuse_a_diverged_or_unfinished_run(trained_run, tmp_path):
    diverged = tmp_path / "diverged"
    assert (
        invoke("train", "--out", diverged, *TINY_RUN[:4], "--lr", "1e39", "--batch-size", "4").exit_code == 0
    )
    for args in (["measure", diverged], ["stability", diverged, "--lr", "0.05", "--batch-size", "4"]):
        result = invoke(*args)  # rows 45, 46
        assert result.exit_code == 2 and f"the run in {diverged} diverged at step" in result.stderr

    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained_run, unfinished)
    state = torch.load(unfinished / "checkpoint.pt", weights_only=True)
    torch.save({**state, "status": None}, unfinished / "checkpoint.pt")  # as if killed mid-way
    for args in (["measure", unfinished], ["stability", unfinished, "--lr", "0.05", "--batch-size", "4"]):
        result = invoke(*args)  # row 47
        assert result.exit_code == 2 and "is unfinished" in result.stderr


def test_a_refused_train_leaves_nothing_so_the_corrected_command_runs(tmp_path):
    run = tmp_path / "run"
    for bad in (["--loss-goal", "-1"], ["--max-steps", "-1"], ["--targets", "labels"]):
        result = invoke("train", "--out", run, *TINY_RUN[:4], "--max-steps", "10", *bad)  # row 17
        assert result.exit_code == 2 and not run.exists(), result.output
    result = invoke("train", "--out", run, *TINY_RUN[:4], "--max-steps", "10", "--loss-goal", "0.01")
    assert result.exit_code == 0, result.output


def test_reproduce_writes_to_results_of_its_scale_by_default(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("sgdstab.experiments.reproduce", lambda out, **kw: calls.append(out) or {})
    monkeypatch.chdir(tmp_path)
    assert invoke("reproduce", "--scale", "smoke", "--only", "E2").exit_code == 0  # row 130
    assert calls == [Path("results") / "smoke"]


def test_reproduce_on_a_folder_another_process_writes_exits_2_naming_it(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from sgdstab.io import FolderLock; FolderLock({str(out)!r}).acquire(); input()",
        ],
        env=env,
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / ".lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = invoke("reproduce", "--scale", "smoke", "--only", "E2", "--out", out)  # rows 115, 116
        assert result.exit_code == 2 and result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"error: {out} is being written by pid {holder.pid} on ")
        assert not (out / "E2").exists() and not (out / "config.json").exists()
    finally:
        holder.communicate("\n", timeout=60)
    # The holder exited without releasing (as if killed): its lock is taken over.
    assert (out / ".lock").exists()
    with FolderLock(out) as lock:
        assert lock.holder()["pid"] == os.getpid()


def test_two_reproduce_at_once_the_second_is_refused_and_rows_are_not_duplicated(tmp_path):
    # Two writers in one process (threads): the lock refuses the second just as it refuses another process.
    from sgdstab.experiments import reproduce

    out, outcomes = tmp_path / "suite", {}

    def first():
        outcomes["first"] = reproduce(out, scale="smoke", only=["E2"], overrides=["E2.lrs=[0.1]"])

    thread = threading.Thread(target=first)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (out / ".lock").exists() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(RunFolderError, match=f"{out} is being written by pid {os.getpid()} on "):
            reproduce(out, scale="smoke", only=["E2"], overrides=["E2.lrs=[0.1]"])
    finally:
        thread.join(timeout=300)
    assert "E2" in outcomes["first"] and not (out / ".lock").exists()
    for metrics in out.glob("E2/*/metrics.jsonl"):
        steps = [row["step"] for row in read_jsonl(metrics)]
        assert steps == sorted(set(steps)), metrics
