"""Sweeps on executors: the same numbers whatever runs them, nothing lost or done twice when a worker dies.

The truth is the sequential in-process run (``LocalExecutor(jobs=1)``): a pool of workers,
submitit's local cluster and a rerun after SIGKILL must reproduce its final records and metric
histories bit for bit (only wall-clock fields differ).
"""

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import sgdstab
from sgdstab.experiments.config import MeasureConfig
from sgdstab.experiments.runs import ATTEMPTS_FILE
from sgdstab.io import FolderLock, Held, lease, read_json, read_jsonl, release_held_locks
from sgdstab.sweeps import (
    LocalExecutor,
    SubmititExecutor,
    SweepError,
    TrainTask,
    sweep,
    sweep_tasks,
    train_spec,
)

# Long enough that a SIGKILL lands mid-run (checkpoints every 20 steps), short enough for CI.
GRID = {"lr": [0.05, 0.1], "batch_size": [4, 16]}
FIXED = {
    "n": 40,
    "model_args": {"width": 8, "activation": "tanh"},
    "max_steps": 400,
    "loss_goal": None,
}
CHECKPOINT_EVERY = 20
WALL_CLOCK = ("wall_time_s", "resumed_from")


def tasks_in(root):
    return sweep_tasks(root, GRID, checkpoint_every=CHECKPOINT_EVERY, **FIXED)


def attempts(task) -> list[dict]:
    """One row per time a worker started (or resumed) the task's run."""
    return read_jsonl(task.path / ATTEMPTS_FILE)


def outcome(root) -> dict:
    """Every run folder's final record and metric rows, without the wall-clock fields."""
    runs = {}
    for folder in sorted((Path(root) / "runs").iterdir()):
        final = read_json(folder / "final.json")
        final["train"] = {k: v for k, v in final["train"].items() if k not in WALL_CLOCK}
        runs[folder.name] = (final, read_jsonl(folder / "metrics.jsonl"))
    return runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequential")
    records = LocalExecutor(jobs=1).run([tasks_in(root)])[0]
    assert [r["train"]["status"] for r in records] == ["max_steps"] * 4
    assert all(r["train"]["steps"] == FIXED["max_steps"] for r in records)
    return outcome(root)


def test_two_workers_equal_one_worker_and_finished_runs_are_skipped(reference, tmp_path):
    tasks = tasks_in(tmp_path)
    first = LocalExecutor(jobs=2).run([tasks])[0]
    assert outcome(tmp_path) == reference
    finals = [task.path / "final.json" for task in tasks]
    stamps = [path.stat().st_mtime_ns for path in finals]
    # A second sweep over finished folders trains nothing and returns the stored records.
    assert LocalExecutor(jobs=2).run([tasks])[0] == first
    assert [path.stat().st_mtime_ns for path in finals] == stamps


def _children(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                children.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return children


def _pool_workers(sweeper: int) -> list[int]:
    """The worker processes of a sweep: children of its fork server (or spawned children of it)."""
    workers = []
    for child in _children(sweeper):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes() if Path(f"/proc/{child}").exists() else b""
        if b"forkserver" in cmdline:
            workers += _children(child)
        elif b"spawn_main" in cmdline:
            workers.append(child)
    return workers


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_sigkill_a_worker_mid_run_then_rerun_loses_and_repeats_nothing(reference, tmp_path):
    script = (
        "import json, sys\n"
        "from sgdstab.sweeps import LocalExecutor, sweep_tasks\n"
        "grid, fixed, every = json.loads(sys.argv[1])\n"
        f"LocalExecutor(jobs=2).run([sweep_tasks({str(tmp_path)!r}, grid, checkpoint_every=every, **fixed)])\n"
    )
    source = str(Path(sgdstab.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": source, "OMP_NUM_THREADS": "1"}
    sweeper = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps([GRID, FIXED, CHECKPOINT_EVERY])],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline and sweeper.poll() is None:
            mid_run = [
                folder
                for folder in (tmp_path / "runs").glob("*")
                if (folder / "checkpoint.pt").exists() and not (folder / "final.json").exists()
            ]
            workers = _pool_workers(sweeper.pid)
            if mid_run and workers:
                victim = workers[0]
                os.kill(victim, signal.SIGKILL)
            time.sleep(0.02)
        _, stderr = sweeper.communicate(timeout=120)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
            sweeper.wait()
    assert victim is not None, (
        f"no run was caught mid-way (sweep exit {sweeper.returncode}): {stderr[-2000:]}"
    )
    assert sweeper.returncode != 0 and "did not finish" in stderr, stderr[-2000:]
    unfinished = [task for task in tasks_in(tmp_path) if not (task.path / "final.json").exists()]
    assert unfinished, "the killed sweep finished every run anyway"
    # The killed worker's lease is still there, naming a process that is gone.
    dead = [task for task in unfinished if (task.path / ".lock").exists()]
    assert dead, "the killed worker left no lease behind"
    for task in dead:
        assert not Path(f"/proc/{read_json(task.path / '.lock')['pid']}").exists()
        assert not lease(task.path).is_held()

    LocalExecutor(jobs=2).run([tasks_in(tmp_path)])
    # 0 lost, 0 duplicated: exactly one folder per grid point, each with one history of unique
    # steps, and every number as in the uninterrupted sequential sweep.
    after = outcome(tmp_path)
    assert after == reference
    for _, rows in after.values():
        steps = [row["step"] for row in rows]
        assert steps == sorted(set(steps))
    resumed = [read_json(task.path / "final.json")["train"]["resumed_from"] for task in unfinished]
    assert any(step > 0 for step in resumed), "no killed run resumed from its checkpoint"
    # The dead holders' leases were taken over: their runs were started twice, and are free now.
    assert all(len(attempts(task)) == 2 for task in dead)
    assert not any((task.path / ".lock").exists() for task in tasks_in(tmp_path))


_CONCURRENT_SWEEP = """
import json, sys, time
from pathlib import Path
from sgdstab.sweeps import LocalExecutor, sweep_tasks
root, grid, fixed, every, reverse, gate = json.loads(sys.argv[1])
tasks = sweep_tasks(root, grid, checkpoint_every=every, **fixed)
# The executor's workers fork from a server that imports sgdstab; started before the gate, both
# sweeps' workers exist within milliseconds of it opening, so neither finishes the grid alone.
from multiprocessing import forkserver
forkserver.set_forkserver_preload(["sgdstab.sweeps"])
forkserver.ensure_running()
while not Path(gate).exists():
    time.sleep(0.005)
LocalExecutor(jobs=2, poll_s=0.05).run([tasks[::-1] if reverse else tasks])
"""


def test_two_sweeps_started_at_once_on_one_folder_train_every_run_once(reference, tmp_path):
    source = str(Path(sgdstab.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": source, "OMP_NUM_THREADS": "1"}
    gate = tmp_path / "go"
    # Opposite orders: the sweeps meet in the middle of the grid, each finding runs the other holds.
    sweeps = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CONCURRENT_SWEEP,
                json.dumps([str(tmp_path), GRID, FIXED, CHECKPOINT_EVERY, reverse, str(gate)]),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for reverse in (False, True)
    ]
    try:
        time.sleep(1.0)  # both import sgdstab and wait at the gate
        gate.touch()
        errors = [process.communicate(timeout=300)[1] for process in sweeps]
    finally:
        for process in sweeps:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [process.returncode for process in sweeps] == [0, 0], errors
    tasks = tasks_in(tmp_path)
    assert [len(attempts(task)) for task in tasks] == [1] * len(tasks), "a run was trained twice"
    workers = {row["pid"] for task in tasks for row in attempts(task)}
    assert len(workers) > 2, "one sweep trained every run: the two never ran at once"
    assert outcome(tmp_path) == reference


def test_submitit_local_cluster_equals_the_sequential_sweep(reference, tmp_path):
    executor = SubmititExecutor(folder=str(tmp_path / "submitit"), cluster="local", time_min=10)
    # Two runs: each submitit job is a fresh process that imports torch.
    tasks = tasks_in(tmp_path)[:2]
    records = executor.run([tasks])[0]
    assert outcome(tmp_path) == {task.path.name: reference[task.path.name] for task in tasks}
    assert [r["run_id"] for r in records] == [task.path.name for task in tasks]


def test_a_later_stage_starts_after_the_earlier_stage_finished(tmp_path):
    base = {"n": 40, "model_args": {"width": 8}, "max_steps": 30, "loss_goal": None, "batch_size": 0}
    gd = TrainTask(str(tmp_path), "stages", "gd", train_spec(**base, lr=0.05))
    # init_from needs the GD run's final checkpoint: it fails unless the stages run in order.
    spec = dataclasses.replace(train_spec(**base, lr=0.05), init_from=str(gd.path), batch_size=4)
    continuation = TrainTask(str(tmp_path), "stages", "sgd", spec)
    (first,), (second,) = LocalExecutor(jobs=2).run([[gd], [continuation]])
    assert second["train"]["initial_loss"] == pytest.approx(first["train"]["final_loss"], rel=1e-6)


def test_a_run_held_by_a_live_worker_is_waited_for_then_run_once(tmp_path):
    (task,) = sweep_tasks(tmp_path, {"lr": [0.05]}, n=40, model_args={"width": 4}, max_steps=5)
    holder = lease(task.path)
    assert holder.try_acquire()
    outcome = task()
    assert isinstance(outcome, Held) and outcome.holder["pid"] == os.getpid()
    assert not (task.path / "final.json").exists() and not (task.path / ATTEMPTS_FILE).exists()
    threading.Timer(0.3, holder.release).start()
    started = time.monotonic()
    (record,) = LocalExecutor(jobs=1, poll_s=0.02).run([[task]])[0]
    assert time.monotonic() - started >= 0.3, "the executor ran the run while its lease was held"
    assert record["train"]["steps"] == 5 and len(attempts(task)) == 1
    assert not (task.path / ".lock").exists(), "the lease outlived its run"


def test_a_lease_heartbeat_keeps_it_held_beyond_its_expiry_for_other_hosts(tmp_path, monkeypatch):
    holder = FolderLock(tmp_path, expiry_s=0.4, heartbeat_s=0.05).acquire()
    acquired = holder.holder()["renewed"]
    time.sleep(1.0)  # more than two expiries
    here = socket.gethostname()
    monkeypatch.setattr(socket, "gethostname", lambda: "another-host.invalid")
    # Another host judges the holder by its last renewal only (it cannot see the pid).
    assert FolderLock(tmp_path, expiry_s=0.4).is_held()
    assert holder.holder()["renewed"] > acquired + 0.5
    monkeypatch.setattr(socket, "gethostname", lambda: here)
    holder.release()
    assert not (tmp_path / ".lock").exists() and holder._heartbeat is None
    with pytest.raises(ValueError, match="heartbeat_s"):
        FolderLock(tmp_path, expiry_s=1.0, heartbeat_s=1.0)
    with pytest.raises(ValueError, match="heartbeat_s"):
        FolderLock(tmp_path, heartbeat_s=1.0)


def test_a_lease_taken_over_is_reported_lost_by_its_heartbeat(tmp_path):
    holder = FolderLock(tmp_path, expiry_s=1.0, heartbeat_s=0.02).acquire()
    record = {**holder.holder(), "token": "someone else's", "pid": 1, "host": "elsewhere.invalid"}
    (tmp_path / ".lock").write_text(json.dumps(record))
    deadline = time.monotonic() + 5
    while not holder.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert holder.lost
    holder.release()  # leaves the new holder's lease alone
    assert json.loads((tmp_path / ".lock").read_text())["token"] == "someone else's"


def test_a_requeued_task_gives_up_its_leases_first(tmp_path):
    (task,) = sweep_tasks(tmp_path, {"lr": [0.05]}, n=40, max_steps=5)
    first, second = lease(task.path), FolderLock(tmp_path / "other")
    assert first.try_acquire() and second.try_acquire()
    # What submitit calls in a SLURM job on USR2 (preemption, time-out) before it requeues the job.
    resubmission = task.checkpoint()
    assert resubmission.function is task
    assert not (task.path / ".lock").exists() and not (tmp_path / "other" / ".lock").exists()
    release_held_locks()  # nothing left to release


def test_a_failed_run_stops_the_sweep_naming_it_and_the_others_finish(tmp_path):
    good, bad = sweep_tasks(tmp_path, {"lr": [0.05, -1.0]}, n=40, model_args={"width": 4}, max_steps=5)
    with pytest.raises(SweepError, match=r"1 of 2 runs .*lr-1.0.*lr must be a positive finite number"):
        LocalExecutor(jobs=1).run([[good, bad]])
    assert (good.path / "final.json").exists()


def test_sweep_writes_one_row_per_point_with_each_runs_measurements(tmp_path):
    measure = MeasureConfig(top_k=1, num_probes=4, density=False)
    result = sweep(
        tmp_path,
        {"lr": [0.05, 0.1]},
        measure=measure,
        n=40,
        batch_size=4,
        model_args={"width": 8, "activation": "tanh"},
        max_steps=600,
        loss_goal=1e-2,
    )
    table = pq.read_table(result.parquet).to_pylist()
    assert [row["lr"] for row in table] == [0.05, 0.1]
    for row, record in zip(table, result.records, strict=True):
        assert row["status"] == "converged" == record["train"]["status"]
        assert row["frobenius"] == record["curvature"]["frobenius"]
        # The bound of Wu, Wang & Su (2022) with replacement: sqrt(B/mu)/eta.
        assert row["bound"] == pytest.approx(math.sqrt(4 / record["curvature"]["mu"]) / row["lr"], rel=1e-12)
        assert row["sqrt_b_over_lr"] == pytest.approx(2 / row["lr"], rel=1e-12)
    csv_lines = result.csv.read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("lr,run_id,status")
    assert result.figure.stat().st_size > 0


def test_grid_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not a train argument"):
        sweep_tasks(tmp_path, {"learning_rate": [0.1]})
    with pytest.raises(ValueError, match="both in the grid and fixed"):
        sweep_tasks(tmp_path, {"lr": [0.1]}, lr=0.2)
    with pytest.raises(ValueError, match="non-empty list"):
        sweep_tasks(tmp_path, {"lr": 0.1})


def test_cli_sweep_is_the_library_sweep(tmp_path):
    from typer.testing import CliRunner

    from sgdstab.cli import app

    arguments = ["--grid", "lr=0.05,0.1", "--set", "n=40", "--set", "batch_size=4", "--set", "max_steps=300"]
    arguments += ["--set", 'model_args={"width": 4}', "--set", "loss_goal=0.05", "--jobs", "1"]
    done = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path / "cli"), *arguments])
    assert done.exit_code == 0, done.output
    fixed = {"n": 40, "batch_size": 4, "max_steps": 300, "model_args": {"width": 4}, "loss_goal": 0.05}
    library = sweep(tmp_path / "library", {"lr": [0.05, 0.1]}, **fixed)
    assert (tmp_path / "cli" / "sweep.csv").read_text() == library.csv.read_text()
    bad = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path / "x"), "--grid", "lr"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
