"""File formats of the image data sets: IDX (MNIST, Fashion-MNIST) and the CIFAR-10 pickles.

Readers here turn files into numpy arrays or uint8/int64 tensors and nothing more; which files a
data set has, where they live and how to get them is ``sources`` and ``download``.
"""

from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sgdstab.errors import DataError, DataNotFoundError

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

_INCOMPLETE_CIFAR_HINT = "the folder is incomplete: unpack the CIFAR-10 archive again, or pass download=True"


class DatasetNotFoundError(DataNotFoundError):
    """The files of a data set are not where they were looked for; the message says how to get them."""


#: IDX element types (LeCun & Cortes, the MNIST file format): third byte of the magic number.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when it starts with the gzip magic (whatever its name)."""
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into a native-byte-order numpy array.

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, each dimension as a big-endian uint32,
    then the data, big-endian, in C order.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file: its magic number is {data[:4].hex() or 'missing'}")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: the IDX header announces {ndim} dimensions but the file ends inside it")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: dimensions {dims} need {expected} bytes of {dtype.name} data, the file holds "
            f"{len(data) - header}; it is truncated or damaged"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def find_file(folder: Path, names: Sequence[str], dataset: str, hint: str) -> Path:
    """The first of ``names`` that is a file in ``folder``; else the error says where it looked and ``hint``."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DatasetNotFoundError(f"{dataset}: none of {list(names)} is in {folder}; {hint}")


def read_idx_split(folder: Path, split: str, dataset: str, hint: str) -> tuple[Tensor, Tensor]:
    """(images uint8 (N, 1, H, W), labels int64) from the four-file IDX layout of MNIST."""
    prefix = "train" if split == "train" else "t10k"
    arrays = {}
    for kind, rank in (("images", 3), ("labels", 1)):
        # The original files use "-idx3-ubyte"; some mirrors write ".idx3-ubyte".
        stems = [f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"]
        path = find_file(folder, [s + ext for s in stems for ext in (".gz", "")], dataset, hint)
        arrays[kind] = read_idx(path)
        if arrays[kind].ndim != rank:
            raise DataError(f"{path}: expected {rank}-dimensional {kind}, found shape {arrays[kind].shape}")
    images, labels = arrays["images"], arrays["labels"]
    if len(images) != len(labels):
        raise DataError(f"{dataset} {split}: {len(images)} images but {len(labels)} labels in {folder}")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and strings only.

    A pickle can run arbitrary code when loaded; CIFAR-10 is distributed as pickles, so this
    refuses every global except the handful a pickled numpy array needs.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 1.x (the real files)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays and lists"
            )
        return self._ALLOWED[(module, name)]


def read_cifar10(folder: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from a ``cifar-10-batches-py`` folder.

    The train split is ``data_batch_1`` .. ``data_batch_5`` (50000 images), the test split
    ``test_batch`` (10000). Each batch is a pickled dict (``encoding="latin1"``, as the files were
    written by Python 2) with "data", an N x 3072 uint8 array of rows R(1024) G(1024) B(1024),
    and "labels", a list of N ints.
    """
    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = find_file(folder, [name], "cifar10", _INCOMPLETE_CIFAR_HINT)
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            batch_labels = np.asarray(batch["labels"], dtype=np.int64)
        except (KeyError, TypeError):
            raise DataError(
                f"{path} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'"
            ) from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise DataError(
                f"{path}: expected data N x 3072 and N labels, got data {data.shape} and {len(batch_labels)} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)
