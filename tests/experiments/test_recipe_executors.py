"""The recipes' runs on an executor: the same numbers as the in-process suite, whoever trains them.

The truth is the session's smoke suite (``reproduce`` without executor, one torch thread): a pool
of worker processes, through the library and through ``sgdstab reproduce --jobs``, must give the
same final records and analyses bit for bit (only wall-clock fields and the suite's own path,
which E2's runs record, differ).
"""

import dataclasses
import json
import pickle
from pathlib import Path

from typer.testing import CliRunner

from sgdstab.cli import app
from sgdstab.experiments import (
    EXPERIMENTS,
    e1_alignment,
    e2_frobenius_bound,
    e4_escape,
    e5_criteria,
    reproduce,
    smoke_configs,
)
from sgdstab.experiments.runs import ATTEMPTS_FILE, FolderTask
from sgdstab.io import read_jsonl
from sgdstab.sweeps import LocalExecutor

WALL_CLOCK = {"wall_time_s"}


def _without_wall_clock(value):
    if isinstance(value, dict):
        return {k: _without_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK}
    if isinstance(value, list):
        return [_without_wall_clock(v) for v in value]
    return value


def _read(path: Path, root: Path):
    # Name the suite root alike, should a record hold it.
    return _without_wall_clock(json.loads(path.read_text().replace(str(root), "<suite>")))


def results(root: Path, name: str) -> dict:
    """An experiment's final records (by label) and analysis."""
    runs = {}
    for folder in sorted(p for p in (root / name).iterdir() if p.is_dir()):
        record = _read(folder / "final.json", root)
        del record["run_id"]
        runs[folder.name.rsplit("-", 1)[0]] = record
    analysis = _read(root / name / "analysis.json", root)
    return {"runs": runs, "analysis": _strip_run_ids(analysis)}


def _strip_run_ids(value):
    if isinstance(value, dict):
        return {k: _strip_run_ids(v) for k, v in value.items() if k != "run_id"}
    if isinstance(value, list):
        return [_strip_run_ids(v) for v in value]
    return value


def test_the_smoke_suite_on_two_workers_equals_the_in_process_suite(smoke_suite, tmp_path):
    reference, _ = smoke_suite
    reproduce(tmp_path, scale="smoke", executor=LocalExecutor(jobs=2))
    for name in EXPERIMENTS:
        assert results(tmp_path, name) == results(reference, name), name
        for attempts in (tmp_path / name).glob(f"*/{ATTEMPTS_FILE}"):
            assert len(read_jsonl(attempts)) == 1, f"{attempts.parent.name} was trained twice"


def test_cli_reproduce_jobs_two_equals_jobs_one(tmp_path):
    # E4: a stage that depends on the one before (the escapes start at the GD minimum).
    for jobs in ("1", "2"):
        done = CliRunner().invoke(
            app,
            ["reproduce", "--scale", "smoke", "--only", "E4", "--out", str(tmp_path / jobs), "--jobs", jobs],
        )
        assert done.exit_code == 0, done.output
    assert results(tmp_path / "2", "E4") == results(tmp_path / "1", "E4")
    refused = CliRunner().invoke(
        app, ["reproduce", "--scale", "smoke", "--out", str(tmp_path / "x"), "--executor", "slurm"]
    )
    assert refused.exit_code != 0 and "folder" in refused.output


def test_every_recipe_task_pickles_for_a_worker_or_a_slurm_job(tmp_path):
    configs = smoke_configs()
    minimum = {"train": {"status": "converged"}, "sgd_lr": 0.1, "folder": "E4/gd"}
    tasks = [
        *e1_alignment.tasks(configs["E1"], tmp_path),
        *(e4_escape.minimum_task(configs["E4"], tmp_path, seed) for seed in configs["E4"].seeds),
        *e4_escape.escape_tasks(configs["E4"], tmp_path, minimum, 1),
        e2_frobenius_bound.common_start_task(dataclasses.replace(configs["E2"], start_lr=0.05), tmp_path, 2),
        *e2_frobenius_bound.grid_tasks(dataclasses.replace(configs["E2"], start_lr=0.05), tmp_path, 2),
        *e5_criteria.tasks(configs["E5"], tmp_path),
    ]
    for task in tasks:
        assert isinstance(task, FolderTask)
        copy = pickle.loads(pickle.dumps(task))
        assert copy.path == task.path and copy.config == task.config
