"""Argument checks and random probes shared by the estimators."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import torch
from torch import Tensor

from sgdstab._checks import check_choice, check_positive_int
from sgdstab.errors import InputError
from sgdstab.operators import LinearOperator

WHICH = ("largest", "smallest", "both")

_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def many_products(
    estimator: Callable[Concatenate[LinearOperator, _Params], _Result],
) -> Callable[Concatenate[LinearOperator, _Params], _Result]:
    """Run ``estimator(op, ...)`` inside ``op.many_products()``: the operator may keep work its
    products share (a Hessian's gradient graph) for the whole run and frees it on return.
    """

    @functools.wraps(estimator)
    def run(op: LinearOperator, *args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        with op.many_products():
            return estimator(op, *args, **kwargs)

    return run


def check_num_eigenvalues(op: LinearOperator, k: int, which: str) -> None:
    """Refuse ``k`` extreme eigenvalues that a ``d x d`` operator cannot have."""
    check_choice("which", which, WHICH)
    k = check_positive_int("k", k)
    needed = 2 * k if which == "both" else k
    if needed > op.size:
        raise InputError(
            f"which={which!r} with k={k} asks for {needed} eigenvalues of an operator of size "
            f"{op.size}; use k <= {op.size // 2 if which == 'both' else op.size}"
        )


def select_extremal(values: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` extreme ``values`` in the order ``EigenResult`` documents."""
    descending = torch.argsort(values, descending=True)
    if which == "largest":
        return descending[:k]
    if which == "smallest":
        return descending.flip(0)[:k]
    return torch.cat([descending[:k], descending[-k:]])


def make_generator(
    op: LinearOperator, seed: int | None, generator: torch.Generator | None
) -> torch.Generator:
    """The generator to draw from: the caller's, else one seeded with ``seed`` (fresh if None).

    It lives on the operator's device so probes are drawn where they are used.
    """
    if generator is not None:
        return generator
    fresh = torch.Generator(device=op.device)
    if seed is None:
        fresh.seed()
    else:
        fresh.manual_seed(seed)
    return fresh


def rademacher(op: LinearOperator, num_columns: int, generator: torch.Generator) -> Tensor:
    """A ``(d, num_columns)`` block of independent +-1 entries in the operator's dtype."""
    bits = torch.randint(0, 2, (op.size, num_columns), generator=generator, device=generator.device)
    return (2 * bits - 1).to(device=op.device, dtype=op.dtype)


def gaussian(op: LinearOperator, num_columns: int, generator: torch.Generator) -> Tensor:
    """A ``(d, num_columns)`` block of independent standard normals in the operator's dtype."""
    draws = torch.randn(op.size, num_columns, generator=generator, device=generator.device, dtype=op.dtype)
    return draws.to(op.device)


def apply_in_blocks(op: LinearOperator, columns: Tensor, block_size: int) -> Tensor:
    """``op @ columns``, ``block_size`` columns per call, to bound the operator's working memory."""
    return torch.cat([op @ block for block in columns.split(block_size, dim=1)], dim=1)
