import math

import pytest
import torch

from sgdstab.errors import InputError, RunFolderError
from sgdstab.io import read_jsonl
from sgdstab.models import build_model
from sgdstab.training import CHECKPOINT_FILE, METRICS, BatchSampler, check_device, register_metric, train

f64 = torch.float64


def regression(n=10, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=f64)
    y = x @ torch.randn(d, 1, generator=g, dtype=f64) + 0.3 * torch.randn(n, 1, generator=g, dtype=f64)
    return x, y


def linear(d=4, seed=0):
    return build_model("linear", input_shape=d, num_outputs=1, seed=seed).double()


@pytest.mark.parametrize("sampling", ["with_replacement", "without_replacement"])
def test_one_sgd_step_is_the_spec_update(sampling):
    x, y = regression()
    model = linear()
    w0 = model.layers[1].weight.detach().clone()
    lr, batch = 0.3, 4
    index = next(BatchSampler(10, batch, sampling, seed=5))
    # grad of l_i = 0.5 ||w x_i - y_i||^2 is (w x_i - y_i) x_i^T; SGD averages it over the batch.
    grads = [(w0 @ x[i] - y[i]).unsqueeze(1) * x[i].unsqueeze(0) for i in index.tolist()]
    expected = w0 - lr * sum(grads) / batch
    result = train(model, x, y, lr, batch_size=batch, sampling=sampling, seed=5, max_steps=1, loss_goal=None)
    assert result.steps == 1 and result.status == "max_steps" and result.sampling == sampling
    torch.testing.assert_close(model.layers[1].weight, expected, rtol=1e-14, atol=1e-14)


def test_chunked_batches_give_the_same_step():
    x, y = regression(n=12)
    a, b = linear(), linear()
    train(
        a, x, y, 0.1, batch_size=12, sampling="with_replacement", max_steps=3, chunk_size=12, loss_goal=None
    )
    train(b, x, y, 0.1, batch_size=12, sampling="with_replacement", max_steps=3, chunk_size=5, loss_goal=None)
    torch.testing.assert_close(a.layers[1].weight, b.layers[1].weight, rtol=1e-13, atol=1e-15)


def test_gd_converges_to_the_least_squares_solution():
    x, y = regression(n=20, d=5)
    model = build_model("linear", input_shape=5, num_outputs=1, bias=True).double()
    design = torch.cat([x, torch.ones(20, 1, dtype=f64)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    min_loss = 0.5 * (design @ solution - y).pow(2).mean().item()
    lam = torch.linalg.eigvalsh(design.T @ design / 20).max().item()
    result = train(model, x, y, lr=1.0 / lam, max_steps=5000, loss_goal=min_loss + 1e-12)
    assert result.status == "converged" and result.sampling == "full_batch" and result.batch_size == 20
    fitted = torch.cat([model.layers[1].weight.T, model.layers[1].bias.unsqueeze(0)])
    torch.testing.assert_close(fitted, solution, rtol=0, atol=1e-5)
    assert result.final_loss == pytest.approx(min_loss, abs=1e-12)
    assert result.history[0]["loss"] == result.initial_loss and result.history[-1]["step"] == result.steps


@pytest.mark.parametrize("lr", [10.0, 1e30])
def test_too_large_lr_is_diverged_not_an_exception(lr):
    x, y = regression()
    result = train(linear(), x, y, lr, max_steps=1000)
    assert result.status == "diverged" and result.steps < 1000
    assert not math.isfinite(result.final_loss) or result.final_loss > 1e3 * result.initial_loss


def test_with_replacement_indices_are_iid_uniform():
    n, batch, draws = 10, 5, 4000
    sampler = BatchSampler(n, batch, "with_replacement", seed=0)
    batches = torch.stack([next(sampler) for _ in range(draws)])
    counts = batches.flatten().bincount(minlength=n).double()
    expected = draws * batch / n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9  # the 0.999 quantile of chi-square with 9 degrees of freedom
    # P(all B distinct) = n! / ((n-B)! n^B) = 0.3024 for iid draws; 0.0073 is its standard error here.
    distinct = sum(len(set(b.tolist())) == batch for b in batches) / draws
    assert distinct == pytest.approx(0.3024, abs=0.03)


def test_without_replacement_covers_each_sample_once_per_epoch():
    n, batch = 10, 3
    sampler = BatchSampler(n, batch, "without_replacement", seed=1)
    assert sampler.batches_per_epoch == 3
    epochs = [torch.cat([next(sampler) for _ in range(3)]).tolist() for _ in range(50)]
    assert all(len(set(e)) == 9 for e in epochs)  # one sample skipped per epoch (n mod B = 1)
    skipped = [(set(range(n)) - set(e)).pop() for e in epochs]
    assert len(set(skipped)) > 3  # a different sample each time, not always the last


def test_sampler_state_round_trip():
    a = BatchSampler(10, 3, "without_replacement", seed=2)
    next(a)
    state = a.state_dict()
    ahead = [next(a) for _ in range(5)]
    b = BatchSampler(10, 3, "without_replacement", seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(u, next(b)) for u in ahead)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("sampling", ["with_replacement", "without_replacement"])
def test_checkpoint_and_resume_match_an_uninterrupted_run_bit_for_bit(tmp_path, sampling):
    x, y = regression(n=10)
    kwargs = dict(
        batch_size=3,
        sampling=sampling,
        seed=4,
        loss_goal=None,
        eval_every=2,
        measure_every=5,
        measure=["param_norm"],
        checkpoint_every=3,
    )

    def mlp():
        return build_model("mlp", input_shape=4, num_outputs=1, width=5, seed=1).double()

    reference_model = mlp()
    reference = train(reference_model, x, y, 0.05, max_steps=20, **kwargs)

    # Killed at step 10 (after the checkpoint of step 9), stopped at max_steps=13, then resumed to 20.
    model = mlp()

    def kill(row):
        if row["step"] == 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(model, x, y, 0.05, max_steps=20, checkpoint_dir=tmp_path, progress=kill, **kwargs)
    model = mlp()
    partial = train(model, x, y, 0.05, max_steps=13, checkpoint_dir=tmp_path, **kwargs)
    assert partial.resumed_from == 9 and partial.steps == 13 and partial.status == "max_steps"
    model = mlp()
    resumed = train(model, x, y, 0.05, max_steps=20, checkpoint_dir=tmp_path, **kwargs)
    assert resumed.resumed_from == 13
    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed.history == reference.history and resumed.final == reference.final
    assert read_jsonl(tmp_path / "metrics.jsonl") == list(reference.history)
    # A finished run returns its result again without training.
    again = train(mlp(), x, y, 0.05, max_steps=20, checkpoint_dir=tmp_path, **kwargs)
    assert again.history == reference.history and again.steps == 20


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    x, y = regression()
    train(linear(), x, y, 0.1, max_steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="another run.*lr: checkpoint 0.1, now 0.2"):
        train(linear(), x, y, 0.2, max_steps=4, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="past max_steps=1"):
        train(linear(), x, y, 0.1, max_steps=1, checkpoint_dir=tmp_path)
    fresh = train(linear(), x, y, 0.2, max_steps=4, checkpoint_dir=tmp_path, resume=False)
    assert fresh.resumed_from == 0 and fresh.steps == 4


def mlp(activation, seed=0):
    return build_model(
        "mlp", input_shape=4, num_outputs=1, width=5, activation=activation, seed=seed
    ).double()


@pytest.mark.parametrize(
    "change, differs",
    [
        (lambda x, y: (mlp("tanh"), x, -y), "the targets differ"),
        (lambda x, y: (mlp("tanh"), 2 * x, y), "the inputs differ"),
        (lambda x, y: (mlp("relu"), x, y), "architecture"),  # same parameter shapes and initial values
        (lambda x, y: (mlp("tanh", seed=1), x, y), "initial weights differ"),
    ],
)
def test_resume_refuses_a_checkpoint_of_other_data_or_another_model(tmp_path, change, differs):
    x, y = regression()
    train(mlp("tanh"), x, y, 0.05, batch_size=4, max_steps=5, checkpoint_dir=tmp_path)
    model, inputs, targets = change(x, y)
    with pytest.raises(RunFolderError, match=f"belongs to another run.*{differs}"):
        train(model, inputs, targets, 0.05, batch_size=4, max_steps=10, checkpoint_dir=tmp_path)
    same = train(mlp("tanh"), x, y, 0.05, batch_size=4, max_steps=10, checkpoint_dir=tmp_path)
    assert same.resumed_from == 5


def test_a_damaged_checkpoint_is_refused_with_what_to_do(tmp_path):
    x, y = regression()
    train(linear(), x, y, 0.1, max_steps=2, checkpoint_dir=tmp_path)
    checkpoint = tmp_path / CHECKPOINT_FILE
    checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    (tmp_path / ".checkpoint.pt.killed.tmp").write_bytes(b"torn")
    with pytest.raises(RunFolderError, match="damaged checkpoint .*delete it"):
        train(linear(), x, y, 0.1, max_steps=4, checkpoint_dir=tmp_path)
    assert not (tmp_path / ".checkpoint.pt.killed.tmp").exists()  # a killed write's leftovers are gone
    checkpoint.unlink()
    assert train(linear(), x, y, 0.1, max_steps=4, checkpoint_dir=tmp_path).resumed_from == 0


@pytest.mark.parametrize("device", ["tpu", "foo", "meta", *([] if torch.cuda.is_available() else ["cuda"])])
def test_a_device_that_cannot_train_is_an_input_error_naming_it(device):
    with pytest.raises(InputError, match=f"device '{device}'"):
        check_device(device)
    assert check_device("cpu") == torch.device("cpu")


def test_measure_hook_runs_on_schedule_and_at_the_end():
    x, y = regression()
    calls = []

    def hook(problem):
        calls.append(problem.parameters().clone())
        return {"first_weight": problem.parameters()[0].item()}

    model = linear()
    result = train(
        model,
        x,
        y,
        0.01,
        batch_size=2,
        max_steps=11,
        eval_every=5,
        measure_every=4,
        measure=hook,
        loss_goal=None,
    )
    assert [row["step"] for row in result.history] == [0, 4, 5, 8, 10]
    assert [row["step"] for row in result.history if "first_weight" in row] == [0, 4, 8]
    assert result.final["step"] == 11 and "first_weight" in result.final
    assert len(calls) == 4  # steps 0, 4, 8 and the end
    assert result.final["first_weight"] == model.layers[1].weight[0, 0].item()


def test_accuracy_is_recorded_for_class_targets():
    x = torch.randn(8, 3, dtype=f64)
    onehot = torch.nn.functional.one_hot(torch.arange(8) % 2, 2).double()
    model = build_model("linear", input_shape=3, num_outputs=2).double()
    result = train(model, x, onehot, 0.1, max_steps=2)
    assert all(0 <= row["accuracy"] <= 1 for row in result.history)
    regression_result = train(linear(3), x, torch.randn(8, 1, dtype=f64), 0.1, max_steps=1)
    assert "accuracy" not in regression_result.final and regression_result.final_accuracy is None
    labels = train(
        build_model("linear", input_shape=3, num_outputs=2).double(),
        x,
        torch.arange(8) % 2,
        0.1,
        loss="cross_entropy",
        max_steps=1,
    )
    assert labels.final_accuracy is not None


def test_named_metrics_and_registration():
    x, y = regression()
    register_metric("weight_sum", lambda problem: problem.parameters().sum().item())
    try:
        result = train(linear(), x, y, 0.1, max_steps=1, measure=["grad_norm", "weight_sum"])
        assert {"grad_norm", "weight_sum"} <= result.final.keys()
    finally:
        del METRICS["weight_sum"]
    with pytest.raises(ValueError, match="unknown metric 'lambda'"):
        train(linear(), x, y, 0.1, max_steps=1, measure=["lambda"])
    with pytest.raises(ValueError, match="recorded by the trainer itself"):
        register_metric("loss", lambda problem: 0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be a positive finite number"),
        ({"lr": -1.0}, "lr must be"),
        ({"batch_size": 11}, "larger than the 10 samples"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"sampling": "shuffle"}, "unknown sampling"),
        ({"divergence_factor": 1.0}, "divergence_factor"),
        ({"eval_every": 0}, "eval_every"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, message):
    x, y = regression()
    with pytest.raises(ValueError, match=message):
        train(linear(), x, y, **{"lr": 0.1, **kwargs})


def test_the_last_step_decides_convergence_even_between_evaluations():
    x, y = regression(n=10, d=4)
    model = linear()
    weight = model.layers[1].weight.detach().clone()
    lr, losses = 0.05, []
    for _ in range(6):  # GD on 0.5 mean (w x - y)^2 by hand
        weight = weight - lr * ((x @ weight.T - y).T @ x) / 10
        losses.append(0.5 * (x @ weight.T - y).pow(2).mean().item())
    goal = (losses[3] + losses[5]) / 2  # reached at step 6, not at the evaluation of step 4
    result = train(model, x, y, lr, max_steps=6, eval_every=4, loss_goal=goal)
    assert result.status == "converged" and result.steps == 6
    assert result.final_loss == pytest.approx(losses[5], rel=1e-12)
