"""The examples under examples/ run at their --tiny size and produce what their docstrings promise."""

import importlib.util
from pathlib import Path

import pytest

from sgdstab.io import read_jsonl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_example(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    history = load("monitor_plain_loop").main(["--tiny", "--out", str(tmp_path)])
    assert [row["step"] for row in history] == [0, 20, 40]
    assert read_jsonl(tmp_path / "metrics.jsonl") == history
    tags = event_accumulator.EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"]
    assert {"train/batch_loss", "sgdstab/lambda_max", "sgdstab/frobenius_bound"} <= set(tags)


def test_lightning_example(tmp_path):
    pytest.importorskip("lightning")
    history = load("monitor_lightning").main(["--tiny", "--out", str(tmp_path)])
    assert [row["step"] for row in history] == [0, 20, 40]
    assert all(row["lr"] == 0.05 and row["batch_size"] == 8 for row in history)
    assert list(tmp_path.glob("mlp/version_0/events.out.tfevents.*"))
