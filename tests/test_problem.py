import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sgdstab import Problem, ProblemError
from sgdstab.operators import hessian


def regression_data(n=9, d=3, c=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=generator, dtype=torch.float64),
        torch.randn(n, c, generator=generator, dtype=torch.float64),
    )


def mlp(d=3, c=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, c)).double()


def test_mse_follows_the_spec_convention_not_torch_mse_loss():
    inputs, targets = regression_data(c=4)
    model = mlp(c=4)
    problem = Problem(model, inputs, targets, chunk_size=4)
    spec_loss = 0.5 * ((model(inputs) - targets) ** 2).sum(dim=1).mean().item()
    assert math.isclose(problem.loss(), spec_loss, rel_tol=1e-14)
    torch_mse = nn.MSELoss()(model(inputs), targets).item()
    assert math.isclose(torch_mse, (2 / 4) * problem.loss(), rel_tol=1e-14)


def test_cross_entropy_loss_is_mean_over_samples():
    inputs, _ = regression_data()
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    model = mlp()
    problem = Problem(model, inputs, labels, loss="cross_entropy", chunk_size=2)
    assert math.isclose(
        problem.loss(), nn.functional.cross_entropy(model(inputs), labels).item(), rel_tol=1e-13
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_loss_and_gradient_do_not_depend_on_chunking(chunk_size):
    inputs, targets = regression_data()
    model = mlp()
    problem = Problem(model, inputs, targets, chunk_size=chunk_size)
    full = 0.5 * ((model(inputs) - targets) ** 2).sum(dim=1).mean()
    truth = torch.cat([g.reshape(-1) for g in torch.autograd.grad(full, list(model.parameters()))])
    assert math.isclose(problem.loss(), full.item(), rel_tol=1e-13)
    assert torch.allclose(problem.gradient(), truth, atol=1e-14)


def test_flat_parameters_follow_named_parameters_order_and_round_trip():
    inputs, targets = regression_data()
    model = mlp()
    problem = Problem(model, inputs, targets)
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(problem.parameters(), expected)
    assert problem.num_params == expected.numel()
    problem.set_parameters(expected * 2)
    assert torch.equal(problem.parameters(), expected * 2)


def test_parameter_subset_gives_the_diagonal_block_of_the_full_hessian():
    inputs, targets = regression_data()
    model = mlp()
    full = hessian(Problem(model, inputs, targets)).to_dense()
    last_layer = Problem(model, inputs, targets, params=["2"])
    assert last_layer.param_names == ["2.weight", "2.bias"]
    block = slice(full.shape[0] - last_layer.num_params, full.shape[0])
    assert torch.allclose(hessian(last_layer).to_dense(), full[block, block], atol=1e-13)


def test_unknown_parameter_subset_lists_the_real_names():
    inputs, targets = regression_data()
    with pytest.raises(ProblemError, match=r"0\.weight"):
        Problem(mlp(), inputs, targets, params=["encoder"])


def test_from_loader_matches_tensors():
    inputs, targets = regression_data()
    model = mlp()
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=4, shuffle=False)
    from_loader = Problem.from_loader(model, loader)
    from_tensors = Problem(model, inputs, targets)
    assert from_loader.num_samples == 9
    assert math.isclose(from_loader.loss(), from_tensors.loss(), rel_tol=1e-14)
    probe = torch.randn(from_tensors.num_params, dtype=torch.float64)
    assert torch.allclose(hessian(from_loader) @ probe, hessian(from_tensors) @ probe, atol=1e-14)


def test_from_loader_refuses_shuffling():
    inputs, targets = regression_data()
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=4, shuffle=True)
    with pytest.raises(ProblemError, match="shuffle=False"):
        Problem.from_loader(mlp(), loader)


def test_from_loader_refuses_an_empty_loader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 2)), batch_size=4)
    with pytest.raises(ProblemError, match="no batches"):
        Problem.from_loader(mlp(), empty)


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), nn.BatchNorm1d(5)])
def test_training_mode_with_dropout_or_batchnorm_is_refused(layer):
    inputs, targets = regression_data()
    model = nn.Sequential(nn.Linear(3, 5), layer, nn.Linear(5, 2)).double()
    with pytest.raises(ProblemError, match="model.eval"):
        Problem(model, inputs, targets)
    Problem(model.eval(), inputs, targets)


def test_target_shape_mismatch_is_explained():
    inputs, targets = regression_data(c=3)
    with pytest.raises(ProblemError, match="output shape"):
        Problem(mlp(c=2), inputs, targets)


def test_cross_entropy_needs_integer_labels():
    inputs, targets = regression_data()
    with pytest.raises(ProblemError, match="integer class labels"):
        Problem(mlp(), inputs, targets, loss="cross_entropy")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss": "hinge"}, "loss must be one of"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments(kwargs, message):
    inputs, targets = regression_data()
    with pytest.raises(ProblemError, match=message):
        Problem(mlp(), inputs, targets, **kwargs)


def test_empty_and_mismatched_data():
    inputs, targets = regression_data()
    with pytest.raises(ProblemError, match="empty"):
        Problem(mlp(), inputs[:0], targets[:0])
    with pytest.raises(ProblemError, match="one target per input"):
        Problem(mlp(), inputs, targets[:5])


def test_non_finite_loss_is_reported():
    inputs, targets = regression_data()
    targets[0, 0] = float("nan")
    with pytest.raises(ProblemError, match="not finite"):
        Problem(mlp(), inputs, targets).loss()


def test_residuals_are_square_loss_only():
    inputs, _ = regression_data()
    labels = torch.zeros(9, dtype=torch.long)
    with pytest.raises(ProblemError, match="square loss"):
        Problem(mlp(), inputs, labels, loss="cross_entropy").residuals()


def test_float32_inputs_follow_the_model_dtype():
    inputs, targets = regression_data()
    problem = Problem(mlp(), inputs.float(), targets.float())
    assert problem.dtype == torch.float64 and isinstance(problem.loss(), float)
