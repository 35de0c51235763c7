"""A smoke sweep and a smoke suite as SLURM job arrays on a real cluster (`make test-slurm`; .ci/slurm-up.sh starts it).

Plain `pytest` does not collect this folder (pyproject's addopts ignore it). Without a cluster the
tests fail with the reason: `make test-slurm` never passes by skipping.

In the sweep's job array, two running jobs are preempted by SLURM itself (a job of the
higher-priority partition `urgent` needs the node): each gets USR2, the signal submitit's
`--signal=USR2@90` asks for before preemption or the time limit, and submitit's Checkpointable
path requeues it. Another job is requeued by `scontrol requeue` (SLURM restarts it from scratch).
Each must resume from its run folder's checkpoint, and the results must equal the local
executor's, bit for bit, with no run lost or trained twice (a restarted run has two attempts).

The USR2 comes from SLURM's preemption, not from `scancel --signal USR2` (nor submitit's
`job._interrupt()`, which calls it): aimed at a task of an array with pending tasks, scancel
retries every 5, 6, 7... s until the job is running again and then signals the requeued job's
new start before submitit's handler is in place, which kills it (FAILED). A real time limit is
not tested: SLURM sends the `--signal` from a check every 30 s, up to 30 s before it is due, so
a run would have to last a minute to be caught mid-run; the signal and its handling are the same.
"""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sgdstab.experiments import reproduce
from sgdstab.experiments.runs import ATTEMPTS_FILE
from sgdstab.io import read_json, read_jsonl
from sgdstab.sweeps import LocalExecutor, SubmititExecutor, sweep_tasks

# Three shorter runs and a long one (about 1 ms a step on one idle core). A preempted job gets
# USR2 a second or two after the urgent job's submission: 12000 steps leave it mid-run (with
# 4000, an idle machine once finished a run first, and SLURM requeued the finished job). SLURM
# kills a job that `scontrol requeue` restarts max(KillWait, 5) s after its SIGTERM, which
# submitit ignores: the requeued run needs 20000 steps to be still unfinished by then.
SHORT = {"batch_size": [4, 8, 16]}, {"lr": 0.05, "max_steps": 12000}
LONG = {"batch_size": [4]}, {"lr": 0.1, "max_steps": 20000}
FIXED = {"n": 40, "model_args": {"width": 8, "activation": "tanh"}, "loss_goal": None}
WALL_CLOCK = ("wall_time_s", "resumed_from")
#: How long a job may take to reach the middle of its run (a loaded 2-core machine is slow).
PATIENCE_S = 240


def tasks_in(root):
    return [
        task
        for grid, settings in (SHORT, LONG)
        for task in sweep_tasks(root, grid, checkpoint_every=200, **settings, **FIXED)
    ]


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
    state = set(slurm("sinfo", "-h", "-N", "-o", "%T").split())  # the node, once per partition
    if state != {"idle"}:
        pytest.fail(f"the SLURM node is {state}, not idle: is .ci/slurm-up.sh's cluster up?")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The sweep's runs on the local executor (2 workers: bit-identical to 1, tested in make test)."""
    root = tmp_path_factory.mktemp("local")
    LocalExecutor(jobs=2).run([tasks_in(root)])
    return outcome(root)


def mid_run(task) -> bool:
    return (task.path / "checkpoint.pt").exists() and not (task.path / "final.json").exists()


def await_mid_run(tasks, jobs) -> None:
    deadline = time.monotonic() + PATIENCE_S
    for task, job in zip(tasks, jobs, strict=True):
        while not mid_run(task):
            assert time.monotonic() < deadline, f"job {job.job_id} never reached the middle of its run"
            assert not (task.path / "final.json").exists(), f"job {job.job_id} finished before it was caught"
            time.sleep(0.05)


def attempts(task) -> int:
    return len(read_jsonl(task.path / ATTEMPTS_FILE))


def test_preempted_and_requeued_jobs_resume_to_the_local_results(tmp_path, reference):
    # Two jobs at a time, whatever the node's core count: the first two are preempted together.
    executor = SubmititExecutor(
        folder=str(tmp_path / "submitit"), cluster="slurm", time_min=30, array_parallelism=2
    )
    tasks = tasks_in(tmp_path / "slurm")
    jobs = executor.submit(tasks)
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1, "the runs were not one job array"
    preempted, requeued, untouched = [0, 1], [3], [2]  # tasks 0-2 are short, 3 is long

    await_mid_run(tasks[:2], jobs[:2])
    urgent = slurm(
        "sbatch", "--parsable", "--partition=urgent", "--exclusive", "--time=1",
        f"--output={tmp_path / 'urgent.out'}", "--wrap=sleep 1",
    ).strip()  # fmt: skip
    await_mid_run(tasks[3:], jobs[3:])
    slurm("scontrol", "requeue", jobs[3].job_id)

    for job in jobs:
        job.result()
    assert outcome(tmp_path / "slurm") == reference
    assert "JobState=COMPLETED" in slurm("scontrol", "show", "job", urgent), "the urgent job did not run"
    for task, job in [(tasks[i], jobs[i]) for i in preempted + requeued]:
        restarts = slurm("scontrol", "show", "job", job.job_id)
        assert "Restarts=1 " in restarts, f"job {job.job_id} was not restarted exactly once: {restarts}"
        assert read_json(task.path / "final.json")["train"]["resumed_from"] > 0, (
            f"job {job.job_id} started over instead of resuming"
        )
        assert attempts(task) == 2, f"job {job.job_id}: {attempts(task)} attempts at {task.path.name}, not 2"
    for job in [jobs[i] for i in preempted]:
        log = job.stderr() or ""
        assert "Caught signal SIGUSR2" in log and "this job is preempted" in log, (
            f"job {job.job_id} was not preempted by SLURM's USR2: {log}"
        )
    assert [attempts(tasks[i]) for i in untouched] == [1]
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
