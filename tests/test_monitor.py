import json
import math
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

import sgdstab
from sgdstab.errors import InputError
from sgdstab.io import read_jsonl
from sgdstab.monitor import Monitor, measurement_subset


def tiny_data(n=24, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return x, torch.sin(x[:, :1]) + 0.1 * torch.randn(n, 1, generator=g, dtype=dtype)


def tiny_model(dtype=torch.float64, dropout=False):
    torch.manual_seed(1)
    layers = [nn.Linear(4, 6), nn.Tanh()] + ([nn.Dropout(0.2)] if dropout else []) + [nn.Linear(6, 1)]
    return nn.Sequential(*layers).to(dtype)


def train_loop(model, x, y, steps, monitor=None, lr=0.1, batch_size=4):
    """A user's plain loop: torch's own RNG picks the batches, so any RNG use by the monitor would show."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    torch.manual_seed(7)
    losses = []
    for step in range(1, steps + 1):
        index = torch.randint(len(x), (batch_size,))
        opt.zero_grad()
        loss = 0.5 * (model(x[index]) - y[index]).pow(2).sum() / batch_size
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if monitor is not None:
            monitor.step(step)
    return losses


def test_training_is_identical_with_and_without_the_monitor():
    x, y = tiny_data(dtype=torch.float32)
    plain = tiny_model(torch.float32)
    watched = tiny_model(torch.float32)
    monitor = Monitor(watched, (x, y), every=4, lr=0.1, batch_size=4, measures=list(sgdstab.monitor.MEASURES))
    losses_plain = train_loop(plain, x, y, 9)
    losses_watched = train_loop(watched, x, y, 9, monitor)
    assert len(monitor.history) == 2
    assert losses_plain == losses_watched
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mode_grads_and_random_states_are_restored():
    x, y = tiny_data()
    model = tiny_model(dropout=True)
    model.train()
    model[2].eval()  # a mixed state must come back as it was, module by module
    model(x).sum().backward()
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]
    model[0].bias.grad = None
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    monitor = Monitor(model, (x, y), every=1, lr=0.1, batch_size=4)
    monitor.step(0)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert model[0].bias.grad is None
    for p, g, v in zip(model.parameters(), grads, values, strict=True):
        if p is not model[0].bias:
            assert p.grad is g and torch.equal(g, v)
    after = (torch.rand(1).item(), np.random.rand(), random.random())
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    assert after == (torch.rand(1).item(), np.random.rand(), random.random())


@pytest.mark.filterwarnings("ignore:not a minimum")  # stability() at a point along training, on purpose
def test_every_measure_against_dense_float64_truth(tmp_path):
    x, y = tiny_data()
    model = tiny_model()
    train_loop(model, x, y, 30)
    lr, batch_size = 0.1, 4
    monitor = Monitor(
        model,
        (x, y),
        every=1,
        lr=lr,
        batch_size=batch_size,
        sampling="with_replacement",
        measures=list(sgdstab.monitor.MEASURES),
        num_probes=400,
        tol=1e-8,
    )
    row = monitor.step(0)
    prob = sgdstab.Problem(model, x, y)
    dense = sgdstab.hessian(prob).to_dense()
    eigenvalues = torch.linalg.eigvalsh(dense)
    assert row["lambda_max"] == pytest.approx(eigenvalues[-1].item(), rel=1e-6)
    frobenius = torch.linalg.matrix_norm(dense).item()
    assert abs(row["hessian_frobenius"] - frobenius) <= 4 * row["hessian_frobenius_stderr"] + 1e-9
    assert abs(row["hessian_trace"] - eigenvalues.sum().item()) <= 4 * row["hessian_trace_stderr"] + 1e-9
    assert row["measurement_loss"] == pytest.approx(prob.loss(), rel=1e-12)
    exact = sgdstab.alignment(prob, method="exact")
    assert abs(row["mu"] - exact.mu) <= 4 * row["mu_stderr"]
    # The bound of SPEC.md section 3 with replacement: sqrt(B / mu) / eta.
    assert row["frobenius_bound"] == pytest.approx(math.sqrt(batch_size / row["mu"]) / lr, rel=1e-12)
    assert row["two_over_lr"] == 2 / lr
    truth = sgdstab.stability(prob, lr=lr, batch_size=batch_size, sampling="with_replacement")
    assert row["eta_star"] == pytest.approx(truth.thresholds["exact"], rel=1e-9)
    assert row["growth_factor"] == pytest.approx(truth.growth_factor, rel=1e-9)
    assert row["monitor_time_s"] > 0


def test_deflated_hutchinson_is_exact_when_the_top_pair_is_the_whole_spectrum():
    # A linear model with one input direction: H has rank one, so after deflating the top Ritz pair
    # nothing random is left and trace and Frobenius norm both equal lambda_max.
    x = torch.linspace(-1, 1, 10, dtype=torch.float64)[:, None]
    model = nn.Linear(1, 1, bias=False).to(torch.float64)
    row = Monitor(model, (x, 2 * x), every=1, measures=["lambda_max", "frobenius", "trace"], tol=1e-10).step(
        0
    )
    assert row["lambda_max"] == pytest.approx(x.pow(2).mean().item(), rel=1e-10)
    assert row["hessian_trace"] == pytest.approx(row["lambda_max"], rel=1e-10)
    assert row["hessian_frobenius"] == pytest.approx(row["lambda_max"], rel=1e-10)


def test_lanczos_started_at_an_eigenvector_stops_after_one_product():
    # The Monitor's warm start rests on top_eigenvalues(init=...): from an exact eigenvector the
    # Krylov space is invariant at once, so one product gives that eigenvalue with zero residual,
    # whichever it is: a warm start trusts its start (the Monitor's warm_start docstring says so).
    matrix = torch.diag(torch.tensor([5.0, 3.0, 2.0, -1.0], dtype=torch.float64))
    result = sgdstab.top_eigenvalues(sgdstab.DenseOperator(matrix), init=torch.tensor([0.0, 0, 0, 2]))
    assert result.num_matvecs == 1 and result.values.item() == -1.0
    # From a start slightly off the top eigenvector Lanczos still converges to the top eigenvalue.
    near = sgdstab.top_eigenvalues(sgdstab.DenseOperator(matrix), init=torch.tensor([1.0, 1e-3, 1e-3, 1e-3]))
    assert near.values.item() == pytest.approx(5.0, rel=1e-3) and near.num_matvecs <= 3
    with pytest.raises(ValueError, match="init must be a finite, nonzero vector of length 4"):
        sgdstab.top_eigenvalues(sgdstab.DenseOperator(matrix), init=torch.zeros(4))


def test_warm_start_needs_at_most_60_percent_of_the_products_of_a_cold_start():
    # Ten classes: several outlying eigenvalues, so a cold start needs more than a handful of products.
    data = sgdstab.load_dataset("mnist", n=200, targets="onehot", flatten=True, dtype=torch.float64)
    model = sgdstab.build_model("mlp", input_shape=784, num_outputs=10, width=16).to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)

    def sgd_steps(k):
        for _ in range(k):
            index = torch.randint(200, (16,), generator=g)
            opt.zero_grad()
            (0.5 * (model(data.inputs[index]) - data.targets[index]).pow(2).sum() / 16).backward()
            opt.step()

    sgd_steps(300)  # nearby checkpoints: past the fast initial change of the Hessian
    warm = Monitor(model, (data.inputs, data.targets), every=1, measures=["lambda_max"])
    cold = Monitor(model, (data.inputs, data.targets), every=1, measures=["lambda_max"], warm_start=False)
    warm.step(0)
    warm_costs, cold_costs = [], []
    for checkpoint in range(1, 4):
        sgd_steps(2)
        w, c = warm.step(checkpoint), cold.step(checkpoint)
        assert w["lambda_max"] == pytest.approx(c["lambda_max"], rel=2e-3)
        warm_costs.append(w["lambda_max_matvecs"])
        cold_costs.append(c["lambda_max_matvecs"])
    # A cold start is a Gaussian plus the loss gradient (top_eigenvalues' default), itself nearer
    # the top eigenvector than a Gaussian alone: 7-8 products here, the warm start 4-5.
    assert sum(warm_costs) <= 0.6 * sum(cold_costs), (warm_costs, cold_costs)


def test_the_trainer_takes_the_same_measurements_through_its_measure_hook():
    x, y = tiny_data()
    model = tiny_model()
    monitor = Monitor(model, (x, y), lr=0.1, batch_size=4, measures=["lambda_max"], tol=1e-10)
    # A Monitor itself is a measure (anything with measure(problem) -> dict), as is its bound method.
    result = sgdstab.train(model, x, y, lr=0.1, batch_size=4, max_steps=6, measure_every=3, measure=monitor)
    assert [row["step"] for row in result.history if "lambda_max" in row] == [0, 3, 6]
    dense = sgdstab.hessian(sgdstab.Problem(model, x, y)).to_dense()
    assert result.final["lambda_max"] == pytest.approx(torch.linalg.eigvalsh(dense)[-1].item(), rel=1e-8)


@pytest.mark.parametrize(
    ("batch_size", "sampling"),
    [(4, "with_replacement"), (4, "without_replacement"), (None, "with_replacement")],
)
def test_named_curvature_measures_of_the_trainer_are_the_monitors_measurements(batch_size, sampling):
    # train(measure=[names]) measures through a Monitor built for the run: each of its rows equals,
    # bit for bit, what a user's Monitor with the run's settings measures at the same parameters.
    x, y = tiny_data()
    names = ["lambda_max", "frobenius", "trace", "mu", "grad_norm"]
    settings = dict(lr=0.1, batch_size=batch_size, sampling=sampling, seed=3, loss_goal=None, measure_every=3)
    measured = tiny_model()
    result = sgdstab.train(measured, x, y, max_steps=6, measure=names, **settings)
    plain = tiny_model()
    unmeasured = sgdstab.train(plain, x, y, max_steps=6, **settings)
    # Measuring never changes the trajectory.
    assert [r["loss"] for r in result.history] == [r["loss"] for r in unmeasured.history]
    for a, b in zip(measured.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    rows = [row for row in result.history if "lambda_max" in row]
    assert [row["step"] for row in rows] == [0, 3, 6]
    full_batch = batch_size is None
    for row in rows:
        model = tiny_model()
        sgdstab.train(model, x, y, max_steps=int(row["step"]), **settings)
        own = Monitor(
            model,
            (x, y),
            lr=0.1,
            batch_size=len(x) if full_batch else batch_size,
            sampling="without_replacement" if full_batch else sampling,
            measures=names[:4],
            seed=3,
            warm_start=False,
        ).step(int(row["step"]), force=True)
        for key in ("lambda_max", "hessian_frobenius", "hessian_trace", "mu", "mu_stderr", "frobenius_bound"):
            assert row[key] == own[key], key
        assert row["grad_norm"] == sgdstab.Problem(model, x, y).gradient().norm().item()
    # Gradient descent has no sampling noise: no finite bound on ||H||_F.
    assert all(math.isinf(row["frobenius_bound"]) for row in rows) == full_batch


def test_a_resumed_run_repeats_the_named_measures_of_an_uninterrupted_one(tmp_path):
    x, y = tiny_data()
    settings = dict(lr=0.1, batch_size=4, loss_goal=None, measure_every=2, measure=["lambda_max", "mu"])
    whole = sgdstab.train(tiny_model(), x, y, max_steps=6, **settings)
    model = tiny_model()
    sgdstab.train(model, x, y, max_steps=3, checkpoint_dir=tmp_path, checkpoint_every=1, **settings)
    resumed = sgdstab.train(tiny_model(), x, y, max_steps=6, checkpoint_dir=tmp_path, **settings)
    assert resumed.resumed_from == 3 and resumed.history == whole.history


def test_the_trainers_measure_names_are_checked_before_training():
    x, y = tiny_data()
    one_name = sgdstab.train(tiny_model(), x, y, lr=0.1, max_steps=1, measure="lambda_max")
    assert "lambda_max" in one_name.final  # one name alone, not its letters
    with pytest.raises(InputError, match="unknown metric 'sharpness'; choose from .*'lambda_max'"):
        sgdstab.train(tiny_model(), x, y, lr=0.1, max_steps=1, measure=["sharpness"])
    labels = torch.zeros(len(x), dtype=torch.long)
    with pytest.raises(InputError, match="square loss"):
        sgdstab.train(tiny_model(), x, labels, lr=0.1, max_steps=1, loss="cross_entropy", measure=["mu"])
    with pytest.raises(InputError, match="is measured by sgdstab.Monitor"):
        sgdstab.training.register_metric("lambda_max", lambda problem: 0.0)


def test_the_paired_tensorboard_charts_select_exactly_their_two_tags():
    class LayoutWriter:
        def add_custom_scalars(self, layout):
            self.layout = layout

    writer = LayoutWriter()
    sgdstab.monitor.add_paired_layout(writer, "sgdstab")
    x, y = tiny_data()
    row = Monitor(tiny_model(), (x, y), every=1, lr=0.1, batch_size=4).step(0)
    tags = [f"sgdstab/{name}" for name in row]
    # TensorBoard matches a chart's tags as regular expressions from the start of each tag name.
    selected = {
        title: sorted(tag for tag in tags if any(re.match(pattern, tag) for pattern in patterns))
        for title, (_, patterns) in writer.layout["sgdstab"].items()
    }
    assert selected == {
        title: sorted(f"sgdstab/{name}" for name in names)
        for title, names in sgdstab.monitor.PAIRED_CURVES.items()
    }


def test_per_measure_schedule_measures_what_is_due_and_deflates_the_previous_top_vector():
    x, y = tiny_data()
    model = tiny_model()
    train_loop(model, x, y, 30)
    every = {"lambda_max": 2, "frobenius": 3, "trace": 3}
    monitor = Monitor(model, (x, y), every=every, num_probes=400, tol=1e-8)
    assert monitor.measures == ("lambda_max", "frobenius", "trace")
    rows = [monitor.step(step) for step in range(7)]
    assert [row is None for row in rows] == [False, True, False, False, False, True, False]
    assert "hessian_frobenius" not in rows[2] and "lambda_max" not in rows[3]
    # Step 3 deflates the step-2 top vector with theta = v^T H v (one product more): still unbiased.
    dense = sgdstab.hessian(sgdstab.Problem(model, x, y)).to_dense()
    row = rows[3]
    assert row["hessian_matvecs"] == 401
    frobenius = torch.linalg.matrix_norm(dense).item()
    assert abs(row["hessian_frobenius"] - frobenius) <= 4 * row["hessian_frobenius_stderr"] + 1e-9
    trace = torch.trace(dense).item()
    assert abs(row["hessian_trace"] - trace) <= 4 * row["hessian_trace_stderr"] + 1e-9


def test_the_measurement_problem_is_built_once_and_rebuilt_when_the_model_moves():
    x, y = tiny_data()
    model = tiny_model()
    monitor = Monitor(model, (x, y), every=1, measures=["lambda_max"])
    first = monitor.problem()
    monitor.step(0)
    assert monitor.problem() is first
    model.float()  # new parameter storage: a cached Problem would read the old one
    assert monitor.problem() is not first and monitor.problem().dtype == torch.float32


def test_jsonl_and_callback_sinks(tmp_path):
    x, y = tiny_data()
    model = tiny_model()
    seen = []
    monitor = Monitor(model, (x, y), every=2, lr=0.1, batch_size=4, out=tmp_path / "run", sinks=[seen.append])
    train_loop(model, x, y, 6, monitor)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows == seen == monitor.history
    assert set(rows[0]) >= {
        "lambda_max",
        "hessian_frobenius",
        "hessian_trace",
        "mu",
        "frobenius_bound",
        "monitor_time_s",
    }
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["every"] == 2 and config["n_measure"] == len(x) and config["lr"] == 0.1


def test_measurement_subset_is_seeded_and_loaders_give_the_same_samples():
    x, y = tiny_data(n=50)
    xs, ys, total = measurement_subset((x, y), 10, seed=4)
    assert total == 50 and len(xs) == 10
    again = measurement_subset((x, y), 10, seed=4)[0]
    assert torch.equal(xs, again)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    xl, yl, total_l = measurement_subset(loader, 10, seed=4)
    assert total_l == 50 and torch.equal(xl, xs) and torch.equal(yl, ys)
    assert torch.equal(measurement_subset((x, y), None, seed=4)[0], x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"lr": -1.0}, "lr must be a positive finite number"),
        ({"measures": ["sharpness"]}, "measures must be a non-empty list"),
        ({"loss": "hinge"}, "loss must be one of"),
        ({"sampling": "shuffled"}, "sampling must be one of"),
        ({"n_measure": 100}, "n_measure=100 exceeds the 24 samples"),
        ({"batch_size": 25}, "batch_size=25 exceeds the 24 training samples"),
        ({"measures": ["stability"]}, "needs lr and batch_size"),
        ({"sinks": [3]}, "a sink must have write"),
        ({"every": {"sharpness": 10}}, "every, given per measure, must map names"),
        ({"every": {"mu": 10}, "measures": ["lambda_max"]}, "give one period per measure"),
        ({"every": {"mu": 0}}, "every\\['mu'\\] must be a positive integer"),
        ({"sketch_size": -1}, "sketch_size must be an integer >= 0"),
    ],
)
def test_bad_arguments_raise_input_errors(kwargs, message):
    x, y = tiny_data()
    with pytest.raises(InputError, match=message):
        Monitor(tiny_model(), (x, y), **kwargs)


def test_bad_data_raise_input_errors():
    x, y = tiny_data()
    with pytest.raises(InputError, match="one target per input"):
        Monitor(tiny_model(), (x, y[:5]))
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), shuffle=True)
    with pytest.raises(InputError, match="shuffles"):
        Monitor(tiny_model(), shuffled)
    with pytest.raises(InputError, match="square loss"):
        Monitor(tiny_model(), (x, y.long().squeeze(1)), loss="cross_entropy", measures=["mu"])
    with pytest.raises(InputError, match="step must be an integer"):
        Monitor(tiny_model(), (x, y)).step(-1)
