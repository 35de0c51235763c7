"""The shared argument checks: one contract for Python numbers, numpy scalars and 0-d tensors."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from sgdstab import stability, train
from sgdstab._checks import (
    SAMPLINGS,
    check_choice,
    check_int,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_sgd_arguments,
)
from sgdstab.errors import InputError
from sgdstab.problem import Problem


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), torch.tensor(3)])
def test_positive_int_accepts_every_integer_type_and_returns_a_python_int(value):
    result = check_positive_int("num_probes", value)
    assert result == 3 and type(result) is int


@pytest.mark.parametrize(
    "value", [0, -2, True, np.bool_(True), 2.0, 2.5, "3", None, torch.tensor(3.0), torch.ones(2)]
)
def test_positive_int_refuses_non_counts_naming_the_argument_and_range(value):
    with pytest.raises(InputError, match=r"num_probes must be a positive integer, got"):
        check_positive_int("num_probes", value)


def test_int_bounds_are_stated_in_the_message():
    assert check_int("max_steps", 0, minimum=0) == 0
    with pytest.raises(InputError, match="max_steps must be an integer >= 0, got -1"):
        check_int("max_steps", -1, minimum=0)
    with pytest.raises(InputError, match="between 1 and 4, got 5"):
        check_int("batch_size", 5, minimum=1, maximum=4)


@pytest.mark.parametrize("value", [0.1, np.float32(0.1), np.float64(0.1), torch.tensor(0.1), 1, np.int64(1)])
def test_positive_float_accepts_every_real_type(value):
    result = check_positive_float("lr", value)
    assert type(result) is float and math.isclose(result, float(value), rel_tol=1e-7)


@pytest.mark.parametrize(
    "value", [0.0, -0.1, math.nan, math.inf, np.float32("nan"), True, "0.1", None, torch.ones(2)]
)
def test_positive_float_refuses_zero_negative_non_finite_bool_and_strings(value):
    with pytest.raises(InputError, match="lr must be a positive finite number, got"):
        check_positive_float("lr", value)


def test_probability_is_a_closed_unit_interval():
    assert [check_probability("p", v) for v in (0, 0.5, np.float32(1.0))] == [0.0, 0.5, 1.0]
    for bad in (-0.01, 1.01, math.nan, True):
        with pytest.raises(InputError, match="p must be a probability, a number between 0 and 1"):
            check_probability("p", bad)


def test_choice_lists_the_valid_values():
    assert check_choice("sampling", "with_replacement", SAMPLINGS) == "with_replacement"
    with pytest.raises(
        InputError, match=r"unknown sampling 'shuffled': sampling must be one of \('with_replacement'"
    ):
        check_choice("sampling", "shuffled", SAMPLINGS)
    with pytest.raises(InputError, match="sampling must be one of"):
        check_choice("sampling", ["unhashable"], frozenset(SAMPLINGS))


def test_sgd_arguments_return_python_numbers_and_state_the_range():
    assert check_sgd_arguments(10, np.float32(0.5), torch.tensor(4), "without_replacement") == (0.5, 4)
    with pytest.raises(InputError, match="batch_size must be an integer between 1 and n=10, got 11"):
        check_sgd_arguments(10, 0.1, 11, "with_replacement")
    with pytest.raises(InputError, match="batch_size must be an integer between 1 and n=10, got True"):
        check_sgd_arguments(10, 0.1, True, "with_replacement")
    with pytest.raises(InputError, match="lr must be a positive finite number"):
        check_sgd_arguments(10, np.float64(0.0), 2, "with_replacement")
    assert issubclass(InputError, ValueError)


def _linear_regression():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(6, 1, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    return nn.Linear(3, 1).double(), inputs, targets


def test_numpy_scalar_lr_and_batch_size_are_accepted_by_train_and_stability_alike():
    # The design review (section 2) found train refusing np.float32(0.1) that stability accepted.
    model, inputs, targets = _linear_regression()
    result = train(
        model, inputs, targets, np.float32(0.1), batch_size=np.int64(2), max_steps=2, loss_goal=None
    )
    assert result.steps == 2 and result.batch_size == 2
    reference = train(
        _linear_regression()[0],
        inputs,
        targets,
        float(np.float32(0.1)),
        batch_size=2,
        max_steps=2,
        loss_goal=None,
    )
    assert result.final["loss"] == reference.final["loss"] > 0
    at_minimum = Problem(model, inputs, model(inputs).detach())
    linear = stability(at_minimum, lr=np.float32(0.1), batch_size=np.int64(2))
    assert linear.lr == pytest.approx(0.1) and linear.batch_size == 2


def test_train_accepts_0d_tensors_and_refuses_bools_where_a_count_is_meant():
    model, inputs, targets = _linear_regression()
    result = train(
        model, inputs, targets, torch.tensor(0.1), batch_size=torch.tensor(3), max_steps=1, loss_goal=None
    )
    assert result.batch_size == 3
    with pytest.raises(InputError, match="batch_size must be a positive integer, got True"):
        train(model, inputs, targets, 0.1, batch_size=True, max_steps=1)
    with pytest.raises(InputError, match="max_steps must be an integer >= 0"):
        train(model, inputs, targets, 0.1, max_steps=2.5)


def test_an_lr_whose_square_overflows_is_refused_by_every_sgd_check():
    # Review row 49: eta^2 enters T and every threshold; 1e300^2 is not a float.
    for lr in (1e300, 1e155):
        with pytest.raises(InputError, match="too large"):
            check_sgd_arguments(10, lr, 2, "with_replacement")
    assert check_sgd_arguments(10, 1e150, 2, "with_replacement") == (1e150, 2)
