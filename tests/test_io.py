import json
import math
import os
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sgdstab.errors import InputError, RunFolderError
from sgdstab.io import (
    FolderLock,
    RunFolder,
    append_jsonl,
    atomic_write,
    config_id,
    load_checkpoint,
    make_folder,
    read_json,
    read_jsonl,
    remove_temporaries,
    write_json_atomic,
    write_jsonl_atomic,
)


def test_json_round_trip_converts_numpy_torch_and_keeps_non_finite(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(
        path,
        {
            "a": np.float32(1.5),
            "b": torch.tensor([1, 2]),
            "c": np.arange(3),
            "inf": math.inf,
            "nan": float("nan"),
            "dtype": torch.float64,
            "path": tmp_path,
        },
    )
    back = read_json(path)
    assert back["a"] == 1.5 and back["b"] == [1, 2] and back["c"] == [0, 1, 2]
    assert back["inf"] == math.inf and math.isnan(back["nan"])
    assert back["dtype"] == "float64" and back["path"] == str(tmp_path)


def test_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write('{"v": 2')
            raise RuntimeError("killed mid-write")
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_unserializable_object_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="cannot write a object"):
        write_json_atomic(tmp_path / "x.json", {"v": object()})
    assert not (tmp_path / "x.json").exists()


def test_jsonl_append_and_read_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 0, "loss": 1.0})
    append_jsonl(path, {"step": 1, "loss": 0.5})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a writer killed mid-line
    assert read_jsonl(path) == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]
    write_jsonl_atomic(path, [{"step": 5}])
    assert read_jsonl(path) == [{"step": 5}]


def test_jsonl_damage_before_the_end_raises(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(RunFolderError, match="line 2"):
        read_jsonl(path)


def test_run_folder_layout(tmp_path):
    run = RunFolder(tmp_path, "E1", "abc")
    assert run.path == tmp_path / "E1" / "abc"
    assert not run.is_finished and run.read_final() is None and run.read_metrics() == []
    run.write_config({"lr": 0.1})
    run.append_metrics({"step": 0})
    run.write_final({"status": "converged"})
    assert run.read_config() == {"lr": 0.1} and run.read_metrics() == [{"step": 0}]
    assert run.is_finished and json.loads(run.final_path.read_text()) == {"status": "converged"}
    with pytest.raises(InputError, match="plain folder name"):
        RunFolder(tmp_path, "E1", "../escape")
    assert run.relative_path == "E1/abc"


def test_config_id_is_stable_and_order_free():
    assert config_id({"lr": 0.1, "B": 8}) == config_id({"B": 8, "lr": 0.1})
    assert config_id({"lr": 0.1, "B": 8}) != config_id({"lr": 0.1, "B": 16})
    assert len(config_id({"x": 1})) == 12


# ------------------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("text", ['{"lr": 0.1, "B"', "", "\x00\xff junk"])
def test_a_damaged_json_file_is_named(tmp_path, text):
    path = tmp_path / "final.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(RunFolderError, match=f"{path} is damaged"):
        read_json(path)


def _checkpoint_bytes(tmp_path):
    path = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(200, 20)}, "step": 3}, path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "damage",
    [
        lambda good: good[:5000],  # truncated
        lambda good: b"",  # empty (torch raises EOFError, which the CLI turned into "Aborted.")
        lambda good: np.random.default_rng(0).bytes(4000),  # random bytes
        None,  # a torch file without the trainer's entries
    ],
)
def test_a_damaged_checkpoint_is_one_clear_error(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    if damage is None:
        torch.save({"foo": 1}, path)
    else:
        path.write_bytes(damage(_checkpoint_bytes(tmp_path)))
    with pytest.raises(RunFolderError, match=f"damaged checkpoint {path}"):
        load_checkpoint(path)
    assert load_checkpoint(tmp_path / "good.pt")["step"] == 3 if damage else True


# ------------------------------------------------------------------------------------- folders and modes
def test_output_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        with atomic_write(tmp_path / "b.pt", "wb") as f:
            f.write(b"1")
        os.umask(0o027)
        write_json_atomic(tmp_path / "c.json", {"x": 1})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o644, "b.pt": 0o644, "c.json": 0o640}


def test_a_file_where_a_folder_belongs_is_a_run_folder_error(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(RunFolderError, match="cannot be a folder"):
        make_folder(tmp_path / "afile")
    with pytest.raises(RunFolderError, match="cannot be a folder"):
        write_json_atomic(tmp_path / "afile" / "config.json", {})


def test_temporaries_of_a_killed_write_are_removed(tmp_path):
    write_json_atomic(tmp_path / "final.json", {"x": 1})
    for name in (".final.json.abc123.tmp", ".checkpoint.pt.x9.tmp", ".metrics.jsonl.q.tmp"):
        (tmp_path / name).write_text("torn")
    removed = remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [
        ".checkpoint.pt.x9.tmp",
        ".final.json.abc123.tmp",
        ".metrics.jsonl.q.tmp",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["final.json"]
    assert remove_temporaries(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------- one writer
def test_a_folder_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    with FolderLock(tmp_path / "suite") as lock:
        holder = lock.holder()
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunFolderError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            FolderLock(tmp_path / "suite").acquire()
    assert not (tmp_path / "suite" / ".lock").exists()
    with FolderLock(tmp_path / "suite"):  # free again once released
        pass


def _write_lock(folder, **holder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps(holder))


def test_a_dead_holders_lock_on_this_host_is_taken_over(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(finished.stdout)
    _write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid, renewed=time.time())
    with FolderLock(tmp_path) as lock:
        assert lock.holder()["pid"] == os.getpid()


def test_another_hosts_lock_expires_only_with_a_heartbeat_limit(tmp_path):
    _write_lock(tmp_path, host="elsewhere.invalid", pid=1, renewed=time.time() - 120)
    with pytest.raises(RunFolderError, match="pid 1 on elsewhere.invalid"):
        FolderLock(tmp_path).acquire()  # no expiry: a holder elsewhere is never presumed dead
    with pytest.raises(RunFolderError):
        FolderLock(tmp_path, expiry_s=600).acquire()  # renewed 2 minutes ago: alive
    with FolderLock(tmp_path, expiry_s=60) as lock:  # silent for 2 minutes: taken over
        before = lock.holder()["renewed"]
        time.sleep(0.01)
        lock.renew()
        assert lock.holder()["renewed"] > before
    with pytest.raises(InputError, match="expiry_s"):
        FolderLock(tmp_path, expiry_s=0)


def test_a_lock_taken_over_by_another_process_is_not_released_by_the_old_holder(tmp_path):
    lock = FolderLock(tmp_path).acquire()
    _write_lock(tmp_path, host="elsewhere.invalid", pid=1, token="theirs", renewed=time.time())
    with pytest.raises(RunFolderError, match="no longer held"):
        lock.renew()
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text())["token"] == "theirs"
