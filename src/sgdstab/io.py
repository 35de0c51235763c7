"""Crash-safe files for run folders: atomic JSON, append-only JSON lines, and the folder layout.

A run folder is ``<root>/<experiment>/<run-id>/`` holding ``config.json`` (what was asked),
``metrics.jsonl`` (one row per measurement, appended as the run goes), ``final.json`` (the
outcome, written last, so its presence marks a finished run) and, while training, the trainer's
``checkpoint.pt``. Whole files are written to a temporary file in the same folder and moved into
place with ``os.replace``, which is atomic on POSIX and Windows: a killed process leaves either the
old file or the new one, never half of one.

JSON is written with Python's extension for non-finite floats (``NaN``, ``Infinity``), because a
diverged run has an infinite loss and that is a result, not an error; Python's ``json`` and
pandas read these files back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from sgdstab.errors import InputError, RunFolderError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final.json"
LOCK_FILE = ".lock"
#: Bumped whenever a change in the code changes the numbers a run records: it is part of every
#: run id, so results written by an older version are recomputed instead of reused.
RESULT_FORMAT_VERSION = 2
_TEMPORARY_SUFFIX = ".tmp"


def _to_json(value: Any) -> Any:
    """``json.dumps`` fallback for numpy/torch scalars and arrays, paths, sets and dtypes."""
    if isinstance(value, (torch.dtype, np.dtype)):
        return str(value).removeprefix("torch.")
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(
        f"cannot write a {type(value).__name__} to JSON: convert it to a number, string, list or dict"
    )


def dumps(obj: Any, indent: int | None = None) -> str:
    """``json.dumps`` with the conversions of this module (see ``_to_json``)."""
    return json.dumps(obj, indent=indent, default=_to_json)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was. The data is
    flushed and fsync'ed before the rename so a power cut cannot expose an empty file.
    """
    if mode not in ("w", "wb"):
        raise InputError(f"atomic_write opens files for writing only: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    make_folder(path.parent)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX)
    try:
        # mkstemp makes the file 0600; a results folder is meant to be shared, so use the umask's mode.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with open(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_folder(path: str | os.PathLike) -> Path:
    """Create ``path`` and its parents; RunFolderError when it (or a parent) is a file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunFolderError(f"{path} cannot be a folder: it or one of its parents is a file") from None
    except OSError as err:
        raise RunFolderError(f"cannot create the folder {path} ({err.strerror or err})") from None
    return path


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.<name>.*.tmp``) that a killed ``atomic_write`` left in ``folder``.

    Only call this while holding the folder's lock: another writer's temporaries are live.
    """
    folder = Path(folder)
    removed = [p for p in folder.glob(f".*{_TEMPORARY_SUFFIX}") if p.is_file()] if folder.is_dir() else []
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return removed


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file + ``os.replace``)."""
    text = dumps(obj, indent=indent)
    with atomic_write(path) as f:
        f.write(text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; RunFolderError naming the file when it is damaged (torn, empty, not JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFolderError(
            f"{path} is damaged ({err}); delete it to redo the step that writes it"
        ) from None


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Replace ``path`` atomically with one JSON object per line."""
    text = "".join(dumps(row) + "\n" for row in rows)
    with atomic_write(path) as f:
        f.write(text)


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON object as one line, with a single write.

    A process killed mid-write can leave at most a truncated last line, which ``read_jsonl``
    skips; every earlier row stays intact. No fsync: a killed process loses nothing the kernel
    already holds, and the trainer appends a row every few steps (an fsync each made GD I/O-bound).
    """
    line = dumps(row)
    if "\n" in line:
        raise InputError("a JSON-lines row must serialize to a single line")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file, skipping a last line left incomplete by a killed writer.

    A malformed line anywhere but at the end means the file was damaged some other way, so it
    raises ``RunFolderError`` naming the line instead of silently dropping data.
    """
    with open(path, encoding="utf-8") as f:
        # Every complete row ends with "\n": what follows the last newline is "" or a torn write.
        complete = f.read().split("\n")[:-1]
    rows = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RunFolderError(
                f"{path}: line {number} is not valid JSON ({err.msg}); the file is damaged"
            ) from None
    return rows


def config_id(config: dict, length: int = 12) -> str:
    """A short stable hash of a JSON-able config: the same config always names the same run.

    Keys are sorted and floats written by ``repr``, so {"lr": 0.1, "B": 8} and {"B": 8, "lr": 0.1}
    give the same id. Useful as the run-id of a sweep point, so a restarted sweep finds its runs.
    """
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=_to_json)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


class RunFolder:
    """The files of one run: ``<root>/<experiment>/<run_id>/{config.json, metrics.jsonl, final.json}``.

    Pass ``folder.path`` as the trainer's ``checkpoint_dir``: it keeps ``checkpoint.pt`` and
    ``metrics.jsonl`` there, so a killed run resumes from the same folder.
    """

    def __init__(self, root: str | os.PathLike, experiment: str, run_id: str):
        for label, part in (("experiment", experiment), ("run_id", run_id)):
            if not part or "/" in part or "\\" in part or part in (".", ".."):
                raise InputError(f"{label} must be a plain folder name (no slashes), got {part!r}")
        self.root = Path(root)
        self.path = self.root / experiment / run_id

    @property
    def relative_path(self) -> str:
        """The folder relative to the suite root, as stored in records: a moved suite still finds it."""
        return self.path.relative_to(self.root).as_posix()

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def final_path(self) -> Path:
        return self.path / FINAL_FILE

    @property
    def is_finished(self) -> bool:
        """True once ``final.json`` exists (it is written last)."""
        return self.final_path.exists()

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.config_path, config)

    def read_config(self) -> dict:
        return read_json(self.config_path)

    def append_metrics(self, row: dict) -> None:
        append_jsonl(self.metrics_path, row)

    def write_metrics(self, rows: Iterable[dict]) -> None:
        write_jsonl_atomic(self.metrics_path, rows)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path) if self.metrics_path.exists() else []

    def write_final(self, final: dict) -> None:
        write_json_atomic(self.final_path, final)

    def read_final(self) -> dict | None:
        return read_json(self.final_path) if self.final_path.exists() else None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"


# ------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The dict ``torch.save``'d in ``path`` (tensors only, ``weights_only``).

    A truncated, empty or foreign file raises RunFolderError "damaged checkpoint <path>" instead of
    torch's own errors, whose advice (e.g. ``weights_only=False``) does not apply to a damaged file.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a damaged file can fail anywhere in the unpickler, with any error type
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunFolderError(
            f"damaged checkpoint {path} ({reason[:200]}); delete it to start that run over"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise RunFolderError(
            f"damaged checkpoint {path}: it is not an sgdstab checkpoint (no 'model' entry); "
            "delete it to start that run over"
        )
    return state


# ------------------------------------------------------------------------------------- one writer
class FolderLock:
    """An exclusive writer's lock on a folder: the file ``<folder>/.lock`` made with ``O_EXCL``.

    The file holds the holder's host, pid and the times it took and last renewed the lock, so a
    refusal names who holds it. A lock whose holder is gone is taken over: on this host when its
    pid no longer runs; on another host (a shared file system) only when ``expiry_s`` is given and
    the holder has not called ``renew`` for that long (hosts' clocks must agree to well within
    ``expiry_s``). With ``heartbeat_s``, a daemon thread of the holder calls ``renew`` that often
    until ``release``: a lease that lives exactly as long as its holder, on any host (a sweep's
    run lease). Should the heartbeat find the lock taken over (its holder was silent for longer
    than ``expiry_s``), it stops and sets ``lost``.

    Use as a context manager::

        with FolderLock(out):
            ...  # the only writer of ``out``
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        expiry_s: float | None = None,
        name: str = LOCK_FILE,
        heartbeat_s: float | None = None,
    ):
        if expiry_s is not None and not expiry_s > 0:
            raise InputError(f"expiry_s must be > 0 seconds or None, got {expiry_s!r}")
        if heartbeat_s is not None and not (expiry_s is not None and 0 < heartbeat_s < expiry_s):
            raise InputError(
                f"heartbeat_s must be > 0 and below expiry_s (several beats per expiry), "
                f"got heartbeat_s={heartbeat_s!r} with expiry_s={expiry_s!r}"
            )
        self.folder = Path(folder)
        self.path = self.folder / name
        self.expiry_s = expiry_s
        self.heartbeat_s = heartbeat_s
        self.lost = False
        self._token: str | None = None
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _record(self, acquired: float) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self._token,
            "acquired": acquired,
            "renewed": time.time(),
        }

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record, None when the folder is free (or the record is unreadable)."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def _is_stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            # Being written right now, or left empty by a crash: stale once it is old.
            try:
                return time.time() - self.path.stat().st_mtime > 10.0
            except FileNotFoundError:
                return True
        if holder.get("host") == socket.gethostname():
            return not _process_runs(int(holder.get("pid", -1)))
        return self.expiry_s is not None and time.time() - float(holder.get("renewed", 0)) > self.expiry_s

    def is_held(self) -> bool:
        """True while a live holder (by this lock's rules of expiry) has the lock."""
        return self.path.exists() and not self._is_stale(self.holder())

    def try_acquire(self) -> bool:
        """Take the lock if it is free or its holder is gone; False when another live holder has it."""
        make_folder(self.folder)
        self._token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self.holder()
                if not self._is_stale(holder):
                    self._token = None
                    return False
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self._record(time.time())))
            self._start_heartbeat()
            _HELD.add(self)
            return True

    def acquire(self) -> FolderLock:
        """Take the lock; RunFolderError naming the holder when another live writer has it."""
        if not self.try_acquire():
            holder = self.holder()
            who = "another writer" if holder is None else f"pid {holder.get('pid')} on {holder.get('host')}"
            raise RunFolderError(
                f"{self.folder} is being written by {who} (lock {self.path}); wait for it to finish, "
                "or use another folder"
            )
        return self

    def _take_over(self, stale: dict[str, Any] | None) -> None:
        """Remove a stale lock file, unless another process replaced it since we read it."""
        aside = self.path.with_name(f"{self.path.name}.{os.getpid()}.{time.time_ns()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            moved = None
        if stale is not None and moved != stale:
            # A third process took the lock between our read and the rename: give it back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()

    def renew(self) -> None:
        """Refresh the holder's time stamp (the heartbeat that keeps a lock with ``expiry_s``)."""
        holder = self.holder()
        if self._token is None or holder is None or holder.get("token") != self._token:
            raise RunFolderError(f"the lock {self.path} is no longer held by this process")
        write_json_atomic(self.path, {**holder, "renewed": time.time()}, indent=None)

    def _start_heartbeat(self) -> None:
        if self.heartbeat_s is None:
            return
        self.lost = False
        self._stop_heartbeat.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat {self.path}", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        assert self.heartbeat_s is not None
        while not self._stop_heartbeat.wait(self.heartbeat_s):
            try:
                self.renew()
            except RunFolderError:
                self.lost = True
                return
            except OSError:
                # A slow or briefly unreachable shared file system: the next beat tries again,
                # and expiry_s allows several missed beats.
                continue

    def release(self) -> None:
        """Give the lock up (only if this process still holds it); stops its heartbeat first."""
        if self._heartbeat is not None:
            self._stop_heartbeat.set()
            if self._heartbeat is not threading.current_thread():
                self._heartbeat.join()
            self._heartbeat = None
        holder = self.holder()
        if self._token is not None and holder is not None and holder.get("token") == self._token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._token = None
        _HELD.discard(self)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


#: A run's lease (``run_lease``): its holder renews it every ``LEASE_HEARTBEAT_S`` seconds; a
#: holder on another host silent for ``LEASE_EXPIRY_S`` is presumed dead (six beats: a slow shared
#: file system may miss a few). On this host a lease is free as soon as its holder's process is gone.
LEASE_HEARTBEAT_S = 5.0
LEASE_EXPIRY_S = 30.0


def lease(folder: str | os.PathLike) -> FolderLock:
    """The lease of a run folder (not yet taken): a ``FolderLock`` with a heartbeat and an expiry."""
    return FolderLock(folder, expiry_s=LEASE_EXPIRY_S, heartbeat_s=LEASE_HEARTBEAT_S)


@dataclass(frozen=True)
class Held:
    """The outcome of a run that another live worker holds: it was not started a second time.

    ``holder`` is the lease's record (host, pid, times). The run is done once its ``final.json``
    exists; should ``lease(path).is_held()`` turn False first, its holder died: run it again.
    """

    path: Path
    holder: dict[str, Any] | None


#: The locks this process holds, so that ``release_held_locks`` can give them all up.
_HELD: set[FolderLock] = set()


def release_held_locks() -> None:
    """Release every lock this process holds: a job about to be requeued lets its successor in.

    SLURM's requeue of a preempted job (submitit's ``checkpoint``) runs this before the job is
    killed, so its rerun, on this host or another, takes its run's lease at once instead of
    waiting for the lease to expire.
    """
    for lock in list(_HELD):
        lock.release()


def _process_runs(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
