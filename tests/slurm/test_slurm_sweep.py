"""A smoke sweep and a smoke suite as SLURM job arrays on a real cluster (`make test-slurm`; .ci/slurm-up.sh starts it).

Plain `pytest` does not collect this folder (pyproject's addopts ignore it). Without a cluster the
tests fail with the reason: `make test-slurm` never passes by skipping.

One job of the array is requeued by `scontrol requeue` in the middle of its run (SLURM restarts
it from scratch: it must resume from its run folder's checkpoint); the results must equal the
local executor's, bit for bit. (Preemption by USR2, submitit's Checkpointable path, is not run
here: on this loopback cluster the requeued job was reported FAILED by the `sacct` stand-in.)
"""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sgdstab.experiments import reproduce
from sgdstab.io import read_json, read_jsonl
from sgdstab.sweeps import LocalExecutor, SubmititExecutor, sweep_tasks

GRID = {"lr": [0.05, 0.1], "batch_size": [4, 16]}
FIXED = {"n": 40, "model_args": {"width": 8, "activation": "tanh"}, "max_steps": 20000, "loss_goal": None}
WALL_CLOCK = ("wall_time_s", "resumed_from")


def tasks_in(root):
    return sweep_tasks(root, GRID, checkpoint_every=20, **FIXED)


def outcome(root) -> dict:
    runs = {}
    for folder in sorted((Path(root) / "runs").iterdir()):
        final = read_json(folder / "final.json")
        final["train"] = {k: v for k, v in final["train"].items() if k not in WALL_CLOCK}
        runs[folder.name] = (final, read_jsonl(folder / "metrics.jsonl"))
    return runs


def slurm(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{' '.join(command)} failed: {done.stderr.strip()}"
    return done.stdout


@pytest.fixture(scope="module", autouse=True)
def cluster():
    missing = [tool for tool in ("sbatch", "squeue", "scontrol", "sacct") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"no SLURM client tools {missing} on PATH: run these tests through `make test-slurm`")
    state = slurm("sinfo", "-h", "-N", "-o", "%T").split()
    if state != ["idle"]:
        pytest.fail(f"the SLURM node is {state}, not idle: is .ci/slurm-up.sh's cluster up?")


def mid_run(task) -> bool:
    return (task.path / "checkpoint.pt").exists() and not (task.path / "final.json").exists()


def test_job_array_with_a_requeued_job_resumes_to_the_local_results(tmp_path):
    LocalExecutor(jobs=1).run([tasks_in(tmp_path / "local")])
    reference = outcome(tmp_path / "local")

    executor = SubmititExecutor(folder=str(tmp_path / "submitit"), cluster="slurm", time_min=30)
    tasks = tasks_in(tmp_path / "slurm")
    jobs = executor.submit(tasks)
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1, "the runs were not one job array"
    task, requeued = tasks[0], jobs[0]
    deadline = time.monotonic() + 180
    while not mid_run(task):
        assert time.monotonic() < deadline, f"job {requeued.job_id} never reached the middle of its run"
        assert not (task.path / "final.json").exists(), f"job {requeued.job_id} finished before it was caught"
        time.sleep(0.05)
    slurm("scontrol", "requeue", requeued.job_id)

    for job in jobs:
        job.result()
    assert outcome(tmp_path / "slurm") == reference
    restarts = slurm("scontrol", "show", "job", requeued.job_id)
    assert "Restarts=1" in restarts, f"job {requeued.job_id} was not restarted: {restarts}"
    assert read_json(task.path / "final.json")["train"]["resumed_from"] > 0, (
        f"job {requeued.job_id} started over instead of resuming"
    )
    # The executor's own loop sees every run finished and submits nothing more.
    assert executor.run([tasks])[0] == [read_json(task.path / "final.json") for task in tasks]


def without_wall_clock(value):
    if isinstance(value, dict):
        return {k: without_wall_clock(v) for k, v in value.items() if k != "wall_time_s"}
    if isinstance(value, list):
        return [without_wall_clock(v) for v in value]
    return value


def test_reproduce_on_slurm_equals_the_in_process_suite(tmp_path):
    # E4: two stages (GD, then the escapes from its minimum), each one job array.
    # One torch thread per run, as in each SLURM job (cpus_per_run=1).
    local = reproduce(tmp_path / "local", scale="smoke", only=["E4"], executor=LocalExecutor(jobs=1))
    executor = SubmititExecutor(folder=str(tmp_path / "submitit"), cluster="slurm", time_min=30)
    on_slurm = reproduce(tmp_path / "slurm", scale="smoke", only=["E4"], executor=executor)
    assert without_wall_clock(on_slurm) == without_wall_clock(local)
    folders = sorted(p.name for p in (tmp_path / "local" / "E4").iterdir() if p.is_dir())
    assert folders == sorted(p.name for p in (tmp_path / "slurm" / "E4").iterdir() if p.is_dir())
    for name in folders:
        expected, got = (
            read_json(tmp_path / side / "E4" / name / "final.json") for side in ("local", "slurm")
        )
        assert without_wall_clock(got) == without_wall_clock(expected), name
    assert list((tmp_path / "submitit").glob("*.out")), "no SLURM job ran"
