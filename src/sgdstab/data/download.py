"""Fetching CIFAR-10: a streamed download checked against its published MD5 and unpacked safely.

Nothing here runs unless asked (``download=True``, ``--download``): every other data set is read
from files already on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from sgdstab.data.formats import DatasetNotFoundError
from sgdstab.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_HINT = (
    f"pass download=True (--download) on a machine with internet, or point data_dir (--data-dir) at a "
    f"{CIFAR10_FOLDER} folder or its parent (from {CIFAR10_URL})"
)


def default_data_dir() -> Path:
    """Where downloaded data sets go: ``$SGDSTAB_DATA_DIR``, else ``~/.cache/sgdstab``."""
    return Path(os.environ.get("SGDSTAB_DATA_DIR", Path.home() / ".cache" / "sgdstab")).expanduser()


def find_cifar10(data_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The ``cifar-10-batches-py`` folder at or inside ``data_dir``, downloaded first when missing and ``download``.

    ``data_dir`` defaults to ``default_data_dir() / "cifar10"``.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir() / "cifar10"
    folder = next((f for f in (root / CIFAR10_FOLDER, root) if (f / "test_batch").is_file()), None)
    if folder is not None:
        return folder
    if not download:
        raise DatasetNotFoundError(f"cifar10: no {CIFAR10_FOLDER} folder in {root}; {CIFAR10_HINT}")
    return download_cifar10(root)


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's members, refusing links, devices and paths outside ``cifar-10-batches-py``."""
    members = tar.getmembers()
    for member in members:
        parts = Path(member.name).parts
        if (
            not (member.isfile() or member.isdir())
            or not parts
            or parts[0] != CIFAR10_FOLDER
            or ".." in parts
        ):
            raise DataError(
                f"refusing to extract {member.name!r}: the CIFAR-10 archive holds only {CIFAR10_FOLDER}/"
            )
    return members


def download_cifar10(root: str | os.PathLike | None = None) -> Path:
    """Download and unpack CIFAR-10 (python version) into ``root``; returns the batches folder.

    The archive is streamed to a temporary file, its MD5 compared with the published
    ``CIFAR10_MD5``, and unpacked into a temporary folder that is renamed into place, so an
    interrupted download never leaves a folder that looks complete.
    """
    root = Path(root) if root is not None else default_data_dir() / "cifar10"
    root.mkdir(parents=True, exist_ok=True)
    target = root / CIFAR10_FOLDER
    fd, archive = tempfile.mkstemp(dir=root, prefix=".cifar-10-python.", suffix=".tar.gz")
    unpack_dir = tempfile.mkdtemp(dir=root, prefix=".cifar-10-unpack.")
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(CIFAR10_URL, timeout=60) as response:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
            except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
                raise DatasetNotFoundError(
                    f"cifar10: could not download {CIFAR10_URL} ({err}); {CIFAR10_HINT}"
                ) from err
        if digest.hexdigest() != CIFAR10_MD5:
            raise DataError(
                f"cifar10: the download from {CIFAR10_URL} has MD5 {digest.hexdigest()}, expected {CIFAR10_MD5}; "
                "it is corrupted or was altered: try again"
            )
        with tarfile.open(archive, "r:gz") as tar:
            members = _safe_members(tar)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: also strips unsafe modes
                tar.extractall(unpack_dir, members=members, filter="data")
            else:
                tar.extractall(unpack_dir, members=members)
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(unpack_dir) / CIFAR10_FOLDER, target)
    finally:
        Path(archive).unlink(missing_ok=True)
        shutil.rmtree(unpack_dir, ignore_errors=True)
    return target
