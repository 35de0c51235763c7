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
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final.json"


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
        raise ValueError(f"atomic_write opens files for writing only: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file + ``os.replace``)."""
    text = dumps(obj, indent=indent)
    with atomic_write(path) as f:
        f.write(text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
        raise ValueError("a JSON-lines row must serialize to a single line")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file, skipping a last line left incomplete by a killed writer.

    A malformed line anywhere but at the end means the file was damaged some other way, so it
    raises ``ValueError`` naming the line instead of silently dropping data.
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
            raise ValueError(
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
                raise ValueError(f"{label} must be a plain folder name (no slashes), got {part!r}")
        self.path = Path(root) / experiment / run_id

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
