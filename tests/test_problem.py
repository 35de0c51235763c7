import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from sgdstab import Problem, ProblemError
from sgdstab.errors import DataError, InputError
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


# ============================================================================ public view of the data
def test_inputs_targets_and_with_targets_keep_everything_but_the_targets():
    inputs, targets = regression_data()
    problem = Problem(mlp(), inputs, targets, chunk_size=4, params=["2"])
    assert problem.inputs is inputs and problem.targets is targets
    shifted = problem.with_targets(targets + 1.0)
    assert shifted.inputs is inputs and torch.equal(shifted.targets, targets + 1.0)
    assert (shifted.chunk_size, shifted.param_names, shifted.loss_name) == (4, ["2.weight", "2.bias"], "mse")
    outputs = problem.model(inputs).detach()
    residual = 0.5 * (outputs - targets - 1.0).pow(2).sum(dim=1).mean().item()
    assert math.isclose(shifted.loss(), residual, rel_tol=1e-14)


def test_a_loader_problem_holds_no_tensors_and_cannot_swap_targets():
    inputs, targets = regression_data()
    problem = Problem.from_loader(mlp(), DataLoader(TensorDataset(inputs, targets), batch_size=4))
    assert problem.inputs is None and problem.targets is None
    with pytest.raises(ProblemError, match="from a loader"):
        problem.with_targets(targets)


def test_zero_predictor_loss_is_half_the_mean_squared_target_or_log_c():
    inputs, targets = regression_data(c=3)
    problem = Problem(mlp(c=3), inputs.float(), targets.float(), chunk_size=2)
    expected = 0.5 * targets.float().double().pow(2).sum(dim=1).mean().item()
    assert math.isclose(problem.zero_predictor_loss(), expected, rel_tol=1e-14)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    assert problem.with_targets(targets).zero_predictor_loss() == pytest.approx(expected, rel=1e-7)
    classifier = Problem(mlp(c=3), inputs, labels, loss="cross_entropy")
    uniform = nn.functional.cross_entropy(torch.zeros(9, 3, dtype=torch.float64), labels).item()
    assert math.isclose(classifier.zero_predictor_loss(), uniform, rel_tol=1e-14)


# ============================================================================ inputs refused (review rows 83-89)
@pytest.mark.parametrize("convert", [lambda t: t.numpy(), lambda t: t.tolist()], ids=["numpy", "list"])
def test_arrays_and_lists_are_a_type_error_asking_for_tensors(convert):
    inputs, targets = regression_data()
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor.*torch.as_tensor"):
        Problem(mlp(), convert(inputs), convert(targets))
    with pytest.raises(ProblemError, match="targets must be a torch.Tensor"):
        Problem(mlp(), inputs, convert(targets))


def test_zero_dimensional_tensors_are_refused_clearly():
    with pytest.raises(ProblemError, match="inputs is a 0-d tensor"):
        Problem(mlp(), torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.parametrize("bad_label", [5, -1, 2])
def test_cross_entropy_labels_outside_the_outputs_are_refused_at_construction(bad_label):
    inputs, _ = regression_data()
    labels = torch.tensor([0, 1, 1, 0, bad_label, 0, 0, 1, 1])
    with pytest.raises(ProblemError, match=r"class labels must lie in 0\.\.1"):
        Problem(mlp(c=2), inputs, labels, loss="cross_entropy")


def test_a_model_switched_back_to_training_mode_is_refused_on_the_next_evaluation():
    inputs, targets = regression_data()
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Linear(5, 2)).double().eval()
    problem = Problem(model, inputs, targets)
    in_eval_mode = problem.loss()
    model.train()
    with pytest.raises(ProblemError, match=r"switched to training mode.*model.eval\(\)"):
        problem.loss()
    with pytest.raises(ProblemError, match="switched to training mode"):
        hessian(problem) @ torch.ones(problem.num_params, dtype=torch.float64)
    model.eval()
    assert problem.loss() == in_eval_mode


# ============================================================================ loaders (review rows 99-103)
class Shuffling:
    """A re-iterable that draws a new order on every pass, as a careless custom loader would."""

    def __init__(self, inputs, targets, seed=0):
        self.inputs, self.targets = inputs, targets
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.inputs), generator=self.generator)
        for i in range(0, len(order), 4):
            yield self.inputs[order[i : i + 4]], self.targets[order[i : i + 4]]


def test_from_loader_refuses_a_random_subset_sampler():
    inputs, targets = regression_data()
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=4, sampler=SubsetRandomSampler(range(9)))
    with pytest.raises(ProblemError, match="different data on two passes.*fixed order"):
        Problem.from_loader(mlp(), loader)


def test_from_loader_refuses_an_iterable_that_reorders_between_passes():
    inputs, targets = regression_data()
    with pytest.raises(ProblemError, match="different data on two passes"):
        Problem.from_loader(mlp(), Shuffling(inputs, targets))


def test_from_loader_refuses_a_one_shot_generator():
    inputs, targets = regression_data()
    batches = [(inputs[i : i + 4], targets[i : i + 4]) for i in range(0, 9, 4)]
    with pytest.raises(ProblemError, match="one-shot iterator.*list of batches"):
        Problem.from_loader(mlp(), (b for b in batches))
    problem = Problem.from_loader(mlp(), batches)  # the list itself is re-iterable
    assert problem.num_samples == 9 and problem.loss() > 0


def test_from_loader_refuses_a_loader_whose_size_changes_between_passes():
    inputs, targets = regression_data()

    class Growing:
        passes = 0

        def __iter__(self):
            self.passes += 1
            yield inputs[:4], targets[:4]
            if self.passes == 2:  # the first pass only peeks at one batch
                yield inputs[4:], targets[4:]

    with pytest.raises(ProblemError, match="9 samples in 2 batches, then 4 in 1"):
        Problem.from_loader(mlp(), Growing())


def test_a_loader_that_changes_after_construction_is_caught_on_the_next_pass():
    inputs, targets = regression_data()

    class ChangesOnThirdPass:
        passes = 0

        def __iter__(self):
            self.passes += 1
            # from_loader peeks at one batch, then makes two passes; the fourth pass reverses
            order = torch.arange(9) if self.passes < 4 else torch.arange(9).flip(0)
            for i in range(0, 9, 4):
                yield inputs[order[i : i + 4]], targets[order[i : i + 4]]

    problem = Problem.from_loader(mlp(), ChangesOnThirdPass())
    with pytest.raises(DataError, match="changed between passes: batch 0"):
        problem.gradient()


@pytest.mark.parametrize(
    "make_batch, message",
    [
        (lambda x, y: {"image": x, "label": y}, r"dicts \(keys \['image', 'label'\]\).*batch_to_xy"),
        (lambda x, y: (x, y, torch.zeros(len(x))), "got 3 entries.*batch_to_xy"),
    ],
    ids=["dict", "3-tuple"],
)
def test_dict_and_three_tuple_batches_are_refused_with_the_batch_to_xy_hook(make_batch, message):
    inputs, targets = regression_data()
    batches = [make_batch(inputs[i : i + 4], targets[i : i + 4]) for i in range(0, 9, 4)]
    with pytest.raises(ProblemError, match=message):
        Problem.from_loader(mlp(), batches)


def test_batch_to_xy_reads_dict_batches_and_matches_tensors():
    inputs, targets = regression_data()
    batches = [{"image": inputs[i : i + 4], "label": targets[i : i + 4]} for i in range(0, 9, 4)]
    model = mlp()
    problem = Problem.from_loader(model, batches, batch_to_xy=lambda b: (b["image"], b["label"]))
    reference = Problem(model, inputs, targets, chunk_size=4)
    assert problem.num_samples == 9
    assert torch.equal(problem.gradient(), reference.gradient())


def test_num_samples_skips_the_construction_passes_but_still_checks_every_pass():
    inputs, targets = regression_data()
    model = mlp()
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=4)
    problem = Problem.from_loader(model, loader, num_samples=9)
    assert problem.num_samples == 9
    assert problem.loss() == Problem(model, inputs, targets, chunk_size=4).loss()
    wrong = Problem.from_loader(model, loader, num_samples=10)
    with pytest.raises(DataError, match="gave 9 samples, but num_samples=10"):
        wrong.loss()
    shuffling = Problem.from_loader(model, Shuffling(inputs, targets), num_samples=9)
    shuffling.loss()  # the first pass records the order
    with pytest.raises(DataError, match="changed between passes"):
        shuffling.loss()
    with pytest.raises(InputError, match="num_samples must be a positive integer"):
        Problem.from_loader(model, loader, num_samples=0)


def test_float32_loss_from_a_loader_equals_the_in_memory_loss():
    # Review row 102: chunk sums added in float32 made the loader's loss differ by 1e-7.
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(40, 50, generator=generator), torch.randn(40, 1, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 16), nn.Tanh(), nn.Linear(16, 1))
    batches = [(inputs[i : i + 8], targets[i : i + 8]) for i in range(0, 40, 8)]
    in_memory = Problem(model, inputs, targets).loss()
    assert math.isclose(Problem.from_loader(model, batches).loss(), in_memory, rel_tol=1e-9)
