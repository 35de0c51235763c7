"""E1's multi-class arm and the full scale, end to end at the smoke scale on test-written data files.

The multi-class measurements are checked against a dense parameter-space computation in float64
(SPEC.md section 2: mu = tr(Sigma G) / (2 L ||G||_F^2)) and against the closed form of a model
whose NTK is exactly block-diagonal over outputs. The full scale runs ``reproduce(scale="full")``
on a fake ``cifar-10-batches-py`` folder (pickles) and a fake Fashion-MNIST IDX folder, shrunk to
seconds by ``--set`` overrides, through the same recipes a GPU run uses.
"""

import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgdstab.data import DatasetNotFoundError
from sgdstab.experiments import configure, e1_alignment, reproduce, smoke_configs
from sgdstab.experiments.config import ModelConfig, quick_data
from sgdstab.io import read_json
from sgdstab.models import build_model
from sgdstab.problem import Problem
from sgdstab.report import build_blocks, render_markdown
from sgdstab.sample_space import gram_matrix
from test_data import write_cifar_folder, write_idx

REPO = Path(__file__).resolve().parents[2]
STEP_CAP = 200


# ------------------------------------------------------------------------------------- the measurement
def dense_mu(model, x, y):
    """tr(Sigma G) / (2 L ||G||_F^2) from per-sample Jacobians in parameter space (SPEC.md sections 1-2)."""
    params = dict(model.named_parameters())
    names = list(params)

    def f(flat, xi):
        pieces, start = {}, 0
        for name in names:
            size = params[name].numel()
            pieces[name] = flat[start : start + size].reshape(params[name].shape)
            start += size
        return torch.func.functional_call(model, pieces, (xi.unsqueeze(0),)).squeeze(0)

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    jac = torch.stack(
        [torch.autograd.functional.jacobian(lambda t, xi=xi: f(t, xi), flat) for xi in x]
    )  # n C p
    n = len(x)
    e = torch.stack([f(flat, xi) for xi in x]).detach() - y
    grads = torch.einsum("icp,ic->ip", jac, e)
    sigma = grads.T @ grads / n - torch.outer(grads.mean(0), grads.mean(0))
    gn = torch.einsum("icp,icq->pq", jac, jac) / n
    loss = e.pow(2).sum() / (2 * n)
    return (sigma * gn).sum().item() / (2 * loss.item() * gn.pow(2).sum().item()), jac, e


class OneOutput(torch.nn.Module):
    def __init__(self, model, output):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x):
        return self.model(x)[:, self.output : self.output + 1]


def test_output_alignment_against_dense_parameter_space():
    torch.manual_seed(0)
    n, d, outputs = 7, 4, 3
    model = build_model("mlp", input_shape=d, num_outputs=outputs, width=5, activation="tanh").double()
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, outputs, dtype=torch.float64)
    problem = Problem(model, x, y)
    stats = e1_alignment.output_alignment(gram_matrix(problem), problem.residuals().reshape(n, outputs))
    mu, jac, _ = dense_mu(model, x, y)
    assert stats["mu"] == pytest.approx(mu, rel=1e-9)
    assert stats["c_mu"] == pytest.approx(outputs * mu, rel=1e-9)
    per_output = [dense_mu(OneOutput(model, a), x, y[:, a : a + 1])[0] for a in range(outputs)]
    assert stats["mu_output_mean"] == pytest.approx(np.mean(per_output), rel=1e-9)
    assert stats["mu_output_min"] == pytest.approx(min(per_output), rel=1e-9)
    kernel = torch.einsum("iap,jbp->iajb", jac, jac)
    diagonal = sum(kernel[:, a, :, a].pow(2).sum() for a in range(outputs))
    assert stats["block_share"] == pytest.approx((diagonal / kernel.pow(2).sum()).item(), rel=1e-9)
    assert 0 < stats["block_share"] < 1  # a hidden layer couples the outputs


def test_block_diagonal_ntk_gives_the_weighted_mean_of_per_output_mus():
    # f = W x without bias: output a depends on row a of W only, so K = I_C (x) X X^T exactly and
    # n S1 - S2 and ||K||_F^2 split over outputs: C mu = sum_a mu_a ||e_a||^2 / ||e||^2.
    torch.manual_seed(1)
    n, d, outputs = 9, 3, 4
    model = build_model("linear", input_shape=d, num_outputs=outputs, bias=False).double()
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, outputs, dtype=torch.float64)
    problem = Problem(model, x, y)
    e = problem.residuals().reshape(n, outputs)
    stats = e1_alignment.output_alignment(gram_matrix(problem), e)
    per_output = [dense_mu(OneOutput(model, a), x, y[:, a : a + 1])[0] for a in range(outputs)]
    weights = e.pow(2).sum(0) / e.pow(2).sum()
    assert stats["block_share"] == pytest.approx(1.0, rel=1e-12)
    assert stats["c_mu"] == pytest.approx(
        float(sum(w * m for w, m in zip(weights, per_output, strict=True))), rel=1e-9
    )


# ------------------------------------------------------------------------------------- the smoke suite
def test_smoke_e1_measures_the_multiclass_arm(smoke_suite):
    root, analyses = smoke_suite
    analysis = analyses["E1"]
    (row,) = analysis["multiclass_rows"]
    assert (row["data"], row["n"], row["C"]) == ("mnist", 20, 10)
    assert [p["step"] for p in row["curve"]] == [0, 20, 40]
    for point in row["curve"]:
        assert point["c_mu"] == pytest.approx(10 * point["mu"], rel=1e-12)
        assert point["mu_output_min"] <= point["mu_output_mean"]
        assert 0 < point["block_share"] <= 1
    claims = [c["claim"] for c in analysis["checks"]]
    assert len(claims) == 4 and "C mu" in claims[1] and "mu_a" in claims[2]
    c_mus = [p["c_mu"] for p in row["curve"]]
    assert analysis["checks"][3]["holds"] == (0.5 <= min(c_mus) and max(c_mus) <= 2)
    assert analysis["normalisation"]["bound_constant"] == pytest.approx(1 / math.sqrt(row["mu_min"]))
    text = render_markdown(build_blocks(root))
    assert "### E1 with C one-hot outputs" in text and "k sqrt(B)/eta with k = 1/sqrt(min mu)" in text


def test_multiclass_checks_turn_on_corrupted_data(smoke_suite):
    root, analyses = smoke_suite
    config = smoke_configs()["E1"]
    finals = [read_json(f / "final.json") for f in sorted((root / "E1").iterdir()) if f.is_dir()]
    binary = [r for r in finals if not r["config"].get("multiclass")]
    multiclass = [r for r in finals if r["config"].get("multiclass")]
    assert len(multiclass) == 1

    def verdicts(records):
        return [c["holds"] for c in e1_alignment.analyse(binary, config, records)["checks"][1:]]

    # mu shrunk to 1/C^2: C mu is no longer of order one, nor above the floor.
    tiny = copy.deepcopy(multiclass)
    for point in tiny[0]["mu_curve"]:
        point["mu"], point["c_mu"] = 1e-3, 1e-2
    assert verdicts(tiny)[0] is False and verdicts(tiny)[2] is False
    # mu of order one with C = 10 outputs: C mu = 10 is not the order-one normalisation.
    large = copy.deepcopy(multiclass)
    for point in large[0]["mu_curve"]:
        point["mu"], point["c_mu"], point["mu_output_min"] = 1.0, 10.0, 1.0
    assert verdicts(large) == [True, True, False]
    # One output misaligned.
    output = copy.deepcopy(multiclass)
    output[0]["mu_curve"][-1]["mu_output_min"] = 1e-3
    assert verdicts(output)[1] is False


def test_missing_multiclass_data_is_skipped_and_said_or_refused(tmp_path):
    config = dataclasses.replace(
        smoke_configs()["E1"],
        families=(),
        lrs=(),
        multiclass_data=(
            quick_data(
                name="fashion_mnist", n=20, classes=None, targets="onehot", data_dir=str(tmp_path / "none")
            ),
        ),
        skip_missing_data=True,
    )
    analysis = e1_alignment.run(config, tmp_path / "suite")
    (skipped,) = analysis["multiclass_skipped"]
    assert skipped["data"] == "fashion_mnist" and "dataset-fashion-mnist" in skipped["reason"]
    assert [c["holds"] for c in analysis["checks"][1:]] == [None, None, None]
    assert "skipped, files absent: fashion_mnist (n=20)" in analysis["checks"][1]["detail"]
    assert "Skipped: fashion_mnist" in render_markdown(build_blocks(tmp_path / "suite"))
    with pytest.raises(DatasetNotFoundError, match="fashion_mnist"):
        e1_alignment.run(dataclasses.replace(config, skip_missing_data=False), tmp_path / "suite2")


# ------------------------------------------------------------------------------------- the full scale
def write_fashion_folder(folder, rng, train=40, test=10):
    """Fashion-MNIST's four IDX files (28 x 28 uint8 images, labels 0..9 in turn)."""
    folder.mkdir(parents=True)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (count, 28, 28), dtype=np.uint8),
            True,
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(count) % 10).astype(np.uint8), True)
    return folder


def shrink(model: ModelConfig) -> ModelConfig:
    """The same family at a few units: seconds on a CPU."""
    kwargs = {
        "vgg": {"depth": [1], "width": 2},
        "resnet": {"depth": [1], "width": 2},
        "mlp": {"width": 4, "depth": 2, "activation": "tanh"},
        "random_features": {"num_features": 8},
    }.get(model.name, model.kwargs)
    return dataclasses.replace(model, kwargs=kwargs)


def overrides_between(name, current, target, prefix=""):
    """The ``--set`` strings that turn config ``current`` into ``target`` (dataclass fields one by one)."""
    items = []
    for field in dataclasses.fields(current):
        now, wanted = getattr(current, field.name), getattr(target, field.name)
        if now == wanted:
            continue
        if dataclasses.is_dataclass(now):
            items += overrides_between(name, now, wanted, f"{prefix}{field.name}.")
        else:
            value = (
                [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in wanted]
                if isinstance(wanted, tuple)
                else wanted
            )
            items.append(f"{name}.{prefix}{field.name}={json.dumps(value)}")
    return items


def full_smoke_overrides(full: dict, fashion_dir: Path) -> list[str]:
    """Shrink every full-scale config to seconds, keeping its data sets, model families and code path."""
    smoke = smoke_configs()
    items = []
    for name, config in full.items():
        data = dataclasses.replace(config.data, n=smoke[name].data.n, seed=smoke[name].data.seed)
        target = dataclasses.replace(smoke[name], data=data, device="cpu")
        if name == "E1":
            target = dataclasses.replace(
                target,
                families=tuple(shrink(f) for f in config.families),
                lrs=tuple(1e-3 for _ in config.families),
                multiclass_data=tuple(
                    dataclasses.replace(d, n=20, data_dir=str(fashion_dir)) for d in config.multiclass_data
                ),
                multiclass_families=tuple(shrink(f) for f in config.multiclass_families),
                multiclass_lrs=tuple(1e-3 for _ in config.multiclass_families),
                skip_missing_data=False,
            )
        elif hasattr(config, "model"):
            target = dataclasses.replace(target, model=shrink(config.model))
        # 3072 inputs train slower than MNIST's 784: cap every step count (runs may stop unconverged).
        caps = {
            f.name: min(getattr(target, f.name), STEP_CAP)
            for f in dataclasses.fields(target)
            if f.name.endswith("steps") and isinstance(getattr(target, f.name), int)
        }
        target = dataclasses.replace(target, **caps)
        items += overrides_between(name, config, target)
    return items


@pytest.mark.slow
def test_full_scale_runs_end_to_end_on_test_written_files(tmp_path):
    rng = np.random.default_rng(3)
    cifar, _ = write_cifar_folder(tmp_path / "data", rng, per_batch=40)
    fashion = write_fashion_folder(tmp_path / "fashion", rng)
    full = configure("full", data_dir=str(cifar), device="cpu")
    assert {c.data.name for c in full.values()} == {"cifar10"}
    assert {d.name for d in full["E1"].multiclass_data} == {"fashion_mnist"}
    assert {f.name for f in full["E1"].families} >= {"vgg", "resnet"}
    overrides = full_smoke_overrides(full, fashion)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        analyses = reproduce(
            tmp_path / "out", scale="full", data_dir=str(cifar), device="cpu", overrides=overrides
        )
    finally:
        torch.set_num_threads(threads)
    assert set(analyses) == {"E1", "E2", "E3", "E4", "E5"}
    suite = read_json(tmp_path / "out" / "config.json")["experiments"]
    assert {entry["scale"] for entry in suite.values()} == {"full"}
    e1 = analyses["E1"]
    assert [r["model"] for r in e1["rows"]] == [f.name for f in full["E1"].families]
    assert all(r["mu_min"] is not None for r in e1["rows"])
    assert {(r["data"], r["C"]) for r in e1["multiclass_rows"]} == {("fashion_mnist", 10)}
    assert {r["family"] for r in e1["multiclass_rows"]} == {f.title for f in full["E1"].multiclass_families}
    assert suite["E1"]["config"]["data"]["name"] == "cifar10"
    assert (tmp_path / "out" / "report.html").is_file()


@pytest.mark.slow
def test_gpu_timing_script_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "timing.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "full_scale_gpu.py"), "--tiny", "--output", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["total_gpu_hours"] > 0
    assert {u["family"] for u in result["units"]} >= {"vgg", "resnet"}
    for unit in result["units"]:
        assert unit["seconds_per_step"] > 0 and unit["steps"] > 0
