"""Argument checks shared by every layer, so one argument is accepted or refused alike everywhere.

A number may arrive as a Python number, a numpy scalar or a 0-d tensor (a learning rate read from
a config, a batch size computed with numpy); all three are accepted and returned as Python
``int``/``float``. ``bool`` is refused where a count or a rate is meant (``True`` is an ``int`` to
Python, but never a batch size). Every refusal is an :class:`sgdstab.errors.InputError` whose
message names the argument, the accepted range and the value given.

Layer: 1 (imports only ``sgdstab.errors``, numpy and torch).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Collection
from typing import Any, TypeVar

import numpy as np
import torch

from sgdstab.errors import InputError

#: How SGD draws its mini-batches (SPEC.md section 1): the one list every layer checks against.
SAMPLINGS = ("with_replacement", "without_replacement")

_Choice = TypeVar("_Choice")


def _as_python_number(value: Any) -> Any:
    """A numpy scalar or 0-d tensor as the Python number it holds; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype != torch.bool:
        return value.item()
    if isinstance(value, np.generic) and not isinstance(value, np.bool_):
        return value.item()
    return value


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int in [minimum, maximum] (either bound optional)."""
    number = _as_python_number(value)
    if (
        not _is_integer(number)
        or (minimum is not None and number < minimum)
        or (maximum is not None and number > maximum)
    ):
        if minimum is not None and maximum is not None:
            wanted = f"an integer between {minimum} and {maximum}"
        elif minimum is not None:
            wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        elif maximum is not None:
            wanted = f"an integer <= {maximum}"
        else:
            wanted = "an integer"
        raise InputError(f"{name} must be {wanted}, got {value!r}")
    return int(number)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int >= 1 (a count: samples, probes, steps, a layer's width)."""
    return check_int(name, value, minimum=1)


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a Python float that is finite and > 0 (a rate, a tolerance, a scale)."""
    number = _as_python_number(value)
    if not (_is_real(number) and math.isfinite(number) and number > 0):
        raise InputError(f"{name} must be a positive finite number, got {value!r}")
    return float(number)


def check_probability(name: str, value: Any) -> float:
    """``value`` as a Python float in [0, 1]."""
    number = _as_python_number(value)
    if not (_is_real(number) and 0 <= number <= 1):
        raise InputError(f"{name} must be a probability, a number between 0 and 1, got {value!r}")
    return float(number)


def check_choice(name: str, value: _Choice, choices: Collection[_Choice]) -> _Choice:
    """``value`` itself when it is one of ``choices``."""
    try:
        known = value in choices
    except TypeError:  # an unhashable value asked of a set
        known = False
    if not known:
        raise InputError(f"unknown {name} {value!r}: {name} must be one of {tuple(choices)}")
    return value


_LARGEST_SQUARABLE = math.sqrt(sys.float_info.max)


def check_sgd_arguments(num_samples: int, lr: Any, batch_size: Any, sampling: str) -> tuple[float, int]:
    """Refuse a learning rate, batch size or sampling that SGD on ``num_samples`` samples cannot use.

    One contract for ``train``, ``stability`` and ``simulate_linearized_sgd``: lr finite and > 0,
    batch_size an integer in 1..n, sampling one of ``SAMPLINGS``.

    Returns:
        ``(lr, batch_size)`` as a Python float and int.
    """
    rate = check_positive_float("lr", lr)
    if rate > _LARGEST_SQUARABLE:
        # The second-moment map and every threshold use eta^2, which would overflow a float.
        raise InputError(
            f"lr={rate:g} is too large: eta^2 overflows a float (largest usable lr is about 1e154)"
        )
    size = _as_python_number(batch_size)
    if not (_is_integer(size) and 1 <= size <= num_samples):
        raise InputError(f"batch_size must be an integer between 1 and n={num_samples}, got {batch_size!r}")
    check_choice("sampling", sampling, SAMPLINGS)
    return rate, int(size)
