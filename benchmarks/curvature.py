"""sgdstab's curvature estimators next to PyHessian and curvlinops, in one run, on one machine.

    python benchmarks/curvature.py [--repeats 3] [--n 2048] [--quick] [--workloads mlp,cnn]

Run it from the benchmark virtualenv (benchmarks/README.md), which has the peers installed;
the library itself never imports them. Rows, for each workload:

- lambda_max to 1e-3: sgdstab ``top_eigenvalues`` (Lanczos) vs PyHessian ``eigenvalues``
  (power iteration). Both errors are measured against a reference Lanczos run at tol 1e-6. The
  same row again 10 SGD steps later, Lanczos warm-started from the first call's eigenvector (as
  a training monitor calls it) and PyHessian cold.
- trace to 5% relative standard error: sgdstab ``trace(target_rel_stderr=0.05)`` vs PyHessian
  ``trace()`` with its own stopping rule (relative change of the running mean below 1e-3, at most
  100 probes); PyHessian's standard error is computed here from the probe values it returns.
- trace to 5% relative error, certified: sgdstab ``trace(target_rel_error=0.05)`` (XTrace, stops
  at two error estimates <= 5%) vs PyHessian's trace scaled to the same standard error (cost of
  Hutchinson ~ stderr^-2) and vs curvlinops ``xtrace`` with the same number of products. On a
  flat spectrum sgdstab may stop on the first round's free Hutchinson samples instead. Under it,
  untimed, the spectrum's shape (``spectrum_shape``): whether deflation can pay on this Hessian.
- ||H||_F^2 at a fixed number of probes: sgdstab ``frobenius_norm`` vs curvlinops
  ``hutchinson_squared_fro``.
- one HVP and one gradient: sgdstab's default operator as estimators apply it (gradient graph
  kept), one bare product, both backends on blocks, curvlinops and PyHessian HVPs, and plain
  PyTorch / sgdstab gradients.

Every peer sees the same function: sgdstab's square loss L = (1/2n) sum_i ||f(x_i) - y_i||^2 is
``MSELoss(reduction="sum") / (2n)``. PyHessian is given that callable as its criterion on the
whole data set as one batch; curvlinops gets ``MSELoss(reduction="sum")`` over the same chunks and
its operator is scaled by 1/(2n). The script checks that the three operators give the same H v.

Timings are wall-clock, median over repeats; in each repeat ours and the peer run back to back,
so the ratios (peer time / ours, median of the per-repeat ratios) are robust to a shared,
noisy machine. Writes ``benchmarks/results/curvature.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import sgdstab
from sgdstab.estimators import frobenius_norm, top_eigenvalues, trace
from sgdstab.operators import LinearOperator, hessian

try:  # peers: benchmark-only dependencies; main() refuses to run without them
    import pyhessian

    # The module, not the class ``pyhessian.hessian`` that its __init__ re-exports under that name.
    _pyhessian_module = sys.modules["pyhessian.hessian"]
    from curvlinops import HessianLinearOperator, hutchinson_squared_fro
    from curvlinops import xtrace as curvlinops_xtrace

    PEERS_MISSING: ImportError | None = None
except ImportError as error:  # pragma: no cover - depends on the environment
    # Importable all the same, so the tests can check ``spectrum_shape`` on known spectra.
    PEERS_MISSING = error

RESULTS = Path(__file__).resolve().parent / "results" / "curvature.json"
LAMBDA_TOL = 1e-3
TRACE_REL_STDERR = 0.05
TRACE_REL_ERROR = 0.05
#: Issue 9's HVP / gradient goals per model family.
HVP_GOAL = {"mlp": 2.2, "cnn": 2.5, "cnn_trained": 2.5}
ESTIMATOR_HVP = "sgdstab HVP, default operator in an estimator (graph kept)"
ROWS = ("hvp", "lambda_max", "lambda_max_warm", "trace", "certified_trace", "frobenius")
TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 300, 128, 0.05
#: SGD steps between two lambda_max calls of the warm-start (monitoring) row.
WARM_STEPS = 10

warnings.filterwarnings("ignore", message=".*create_graph=True.*")  # PyHessian's backward(create_graph)


# ------------------------------------------------------------------------------- workloads
def make_mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def make_cnn(channels: tuple[int, int, int], image: int = 32) -> nn.Module:
    """Three stride-2 3x3 convolutions with ReLU, then a linear layer to 10 outputs."""
    c1, c2, c3 = channels
    side = image // 8
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c2, c3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c3 * side * side, 10),
    )


def make_workload(name: str, n: int, mlp_widths: tuple[int, ...], cnn_channels: tuple[int, int, int]) -> dict:
    """Model (eval mode, float32), CIFAR-shaped Gaussian inputs and one-hot targets, seed 0."""
    torch.manual_seed(0)
    if name == "mlp":
        widths = mlp_widths
        model, description = make_mlp(widths), "MLP " + "-".join(map(str, widths)) + ", tanh"
    elif name in ("cnn", "cnn_trained"):
        channels = cnn_channels
        model = make_cnn(channels)
        description = f"CNN conv3x3/2 {channels[0]}-{channels[1]}-{channels[2]} + linear, relu"
    else:
        raise SystemExit(f"unknown workload {name!r}; choose from mlp, cnn, cnn_trained")
    model = model.float().eval()
    inputs = torch.randn(n, 3, 32, 32)
    targets = nn.functional.one_hot(torch.randint(0, 10, (n,)), 10).float()
    if name == "cnn_trained":
        loss = train_sgd(model, inputs, targets)
        description += (
            f", after {TRAIN_STEPS} SGD steps (lr {TRAIN_LR}, batch {TRAIN_BATCH}; loss {loss:.3g})"
        )
    return {"name": name, "description": description, "model": model, "x": inputs, "y": targets}


def train_sgd(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int = TRAIN_STEPS, seed: int = 0
) -> float:
    """Plain SGD on the benchmark's loss (1/2 mean ||f - y||^2): a model away from its
    initialisation, whose spectrum has a closer second eigenvalue. Returns the final full loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN_LR)
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (TRAIN_BATCH,), generator=generator)
        optimizer.zero_grad()
        (model(inputs[batch]) - targets[batch]).pow(2).sum(dim=1).mean().div(2).backward()
        optimizer.step()
    with torch.no_grad():
        return float((model(inputs) - targets).pow(2).sum(dim=1).mean() / 2)


class Peers:
    """The one problem seen by sgdstab, PyHessian and curvlinops."""

    def __init__(self, work: dict, chunk_size: int):
        self.model, self.x, self.y = work["model"], work["x"], work["y"]
        self.n = len(self.x)
        self.chunk_size = chunk_size
        self.problem = sgdstab.Problem(self.model, self.x, self.y, loss="mse", chunk_size=chunk_size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        n = self.n
        # sgdstab's L as a PyHessian criterion on the full batch.
        self.pyhessian_criterion = lambda outputs, targets: (outputs - targets).pow(2).sum() / (2 * n)
        chunks = list(zip(self.x.split(chunk_size), self.y.split(chunk_size), strict=True))
        curvlinops_h = HessianLinearOperator(
            self.model,
            nn.MSELoss(reduction="sum"),
            self.params,
            chunks,
            check_deterministic=False,
            num_data=n,
        )
        # MSELoss(reduction="sum") = 2n L, so its Hessian is 2n H.
        self.curvlinops_hessian = curvlinops_h * (1.0 / (2 * n))

    def pyhessian(self):
        """A fresh PyHessian object; building it costs one forward and gradient with create_graph."""
        for p in self.params:  # PyHessian adds to .grad: start from none
            p.grad = None
        return pyhessian.hessian(self.model, self.pyhessian_criterion, data=(self.x, self.y), cuda=False)

    def release_pyhessian(self) -> None:
        for p in self.params:  # drop the create_graph gradient (and its graph) PyHessian left
            p.grad = None

    def to_list(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [
            piece.view_as(p)
            for piece, p in zip(v.split([p.numel() for p in self.params]), self.params, strict=True)
        ]

    def autograd_gradient(self) -> None:
        """The gradient of L by plain autograd, over the same chunks as sgdstab and curvlinops."""
        for p in self.params:
            p.grad = None
        for x, y in zip(self.x.split(self.chunk_size), self.y.split(self.chunk_size), strict=True):
            self.pyhessian_criterion(self.model(x), y).backward()


class PyHessianRecorder:
    """Wraps the HVP function PyHessian's methods call: counts HVPs and, if asked, records after
    each the wall time and the Rayleigh quotient v^T H v that its power iteration computes from it.

    ``stop_when(records)`` returning True aborts the PyHessian call (``Enough`` is raised), so one
    power-iteration run yields both its own stopping point and the first iterate that is within
    the wanted accuracy of the reference, without running on to a tight tolerance.
    """

    class Enough(Exception):
        pass

    def __init__(self, record: bool = False, stop_when=None):
        self.count = 0
        self.record = record
        self.stop_when = stop_when
        self.records: list[tuple[float, float]] = []
        self._original = _pyhessian_module.hessian_vector_product

    def __enter__(self):
        def counted(gradsH, params, v):
            hv = self._original(gradsH, params, v)
            self.count += 1
            if self.record:
                theta = float(sum((a * b).sum() for a, b in zip(hv, v, strict=True)))
                self.records.append((clock(), theta))
                if self.stop_when is not None and self.stop_when(self.records):
                    raise PyHessianRecorder.Enough
            return hv

        _pyhessian_module.hessian_vector_product = counted
        return self

    def __exit__(self, *exc):
        _pyhessian_module.hessian_vector_product = self._original
        return exc[0] is PyHessianRecorder.Enough


def pyhessian_own_stop(thetas: list[float], tol: float) -> int | None:
    """Index of the HVP after which PyHessian's ``eigenvalues(tol=tol)`` stops, as its loop reads:
    at iteration i >= 1 it stops if |theta_{i-1} - theta_i| / (|theta_{i-1}| + 1e-6) < tol and
    returns theta_{i-1}."""
    for i in range(1, len(thetas)):
        if abs(thetas[i - 1] - thetas[i]) / (abs(thetas[i - 1]) + 1e-6) < tol:
            return i
    return None


def first_accurate(thetas: list[float], reference: float, tol: float) -> int | None:
    return next((i for i, t in enumerate(thetas) if abs(t - reference) <= tol * abs(reference)), None)


_CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = [time.process_time]


def clock() -> float:
    """The benchmark's clock: process CPU time by default (see --clock)."""
    return _clock[0]()


def timed(fn):
    start = clock()
    out = fn()
    return clock() - start, out


def median(values):
    return statistics.median(values)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------- rows
def check_same_operator(peers: Peers) -> dict:
    """H v from the three libraries for one random v: relative differences to sgdstab's."""
    v = torch.randn(peers.problem.num_params, generator=torch.Generator().manual_seed(1))
    ours = hessian(peers.problem) @ v
    h = peers.pyhessian()
    theirs = torch.cat(
        [
            t.reshape(-1)
            for t in _pyhessian_module.hessian_vector_product(h.gradsH, h.params, peers.to_list(v))
        ]
    )
    del h
    peers.release_pyhessian()
    curv = peers.curvlinops_hessian @ v
    return {"pyhessian_vs_sgdstab": rel(theirs, ours), "curvlinops_vs_sgdstab": rel(curv, ours)}


class RecordingOperator(LinearOperator):
    """Passes products to ``inner`` and keeps every column applied and its product, so the Ritz
    values of a Lanczos run after each step can be read off afterwards (untimed)."""

    def __init__(self, inner: LinearOperator):
        super().__init__(inner.size, inner.dtype, inner.device)
        self.inner = inner
        self.columns: list[torch.Tensor] = []
        self.products: list[torch.Tensor] = []

    def _matmat(self, columns: torch.Tensor) -> torch.Tensor:
        products = self.inner @ columns
        self.columns.append(columns.clone())
        self.products.append(products.clone())
        return products

    @contextlib.contextmanager
    def many_products(self):
        with self.inner.many_products():
            yield self

    def preferred_direction(self) -> torch.Tensor | None:
        return self.inner.preferred_direction()

    def top_ritz_values(self) -> list[float]:
        """The largest eigenvalue of Q_m^T H Q_m for m = 1, 2, ...: Lanczos's top Ritz value
        after each of its steps (its applied columns are its orthonormal basis)."""
        basis, images = torch.cat(self.columns, 1).double(), torch.cat(self.products, 1).double()
        values = []
        for m in range(1, basis.shape[1] + 1):
            projected = basis[:, :m].T @ images[:, :m]
            values.append(float(torch.linalg.eigvalsh((projected + projected.T) / 2)[-1]))
        return values


def lanczos_first_accurate_step(
    peers: Peers, seed: int, reference: float, init: torch.Tensor | None = None
) -> int | None:
    """The first step after which Lanczos (run as top_eigenvalues runs it, seed ``seed``) has a
    top Ritz value within 1e-3 of the reference: what an oracle stop would cost, against the
    rigorous residual stop top_eigenvalues uses."""
    recorder = RecordingOperator(hessian(peers.problem))
    top_eigenvalues(recorder, k=1, tol=LAMBDA_TOL, seed=seed, init=init)
    return first_accurate(recorder.top_ritz_values(), reference, LAMBDA_TOL)


def lambda_max_row(peers: Peers, repeats: int, max_iter: int = 300, init: torch.Tensor | None = None) -> dict:
    """Lanczos to tol 1e-3 against PyHessian's power iteration, both started from seed r
    (Lanczos from ``init`` instead when given: a warm start).

    PyHessian appears twice, from one run per repeat: stopped by its own rule (relative change
    of the Rayleigh quotient below 1e-3, which says nothing about its error) and stopped at the
    first iterate within 1e-3 of the reference (an oracle no user has: a lower bound on its cost
    at equal accuracy). The reference is Lanczos to a residual of 1e-6 |lambda|, not timed.
    """
    reference = top_eigenvalues(hessian(peers.problem), k=1, tol=1e-6, max_iter=150, seed=12345)
    lam = float(reference.values[0])

    def enough(records):
        thetas = [t for _, t in records]
        return (
            pyhessian_own_stop(thetas, LAMBDA_TOL) is not None
            and first_accurate(thetas, lam, LAMBDA_TOL) is not None
        )

    ours, own, oracle = [], [], []
    for r in range(repeats):
        # The default operator: inside an estimator it keeps its gradient graph, as PyHessian does.
        t, res = timed(
            lambda r=r: top_eigenvalues(hessian(peers.problem), k=1, tol=LAMBDA_TOL, seed=r, init=init)
        )
        value = float(res.values[0])
        first = lanczos_first_accurate_step(peers, r, lam, init)
        ours.append(
            {
                "time_s": t,
                "time_per_matvec_s": t / res.num_matvecs,
                "value": value,
                "num_matvecs": res.num_matvecs,
                "first_accurate_step": None if first is None else first + 1,
                "rel_error": abs(value - lam) / lam,
                "rel_residual_bound": float(res.residual_norms[0]) / abs(value),
            }
        )

        torch.manual_seed(r)  # PyHessian draws its start vector from the global generator
        start = clock()
        with PyHessianRecorder(record=True, stop_when=enough) as rec:
            peers.pyhessian().eigenvalues(maxIter=max_iter, tol=1e-12, top_n=1)
        peers.release_pyhessian()
        thetas = [th for _, th in rec.records]
        i = pyhessian_own_stop(thetas, LAMBDA_TOL)
        # Stopping at HVP i it returns theta_{i-1}; +1 gradient: the graph it builds once and reuses.
        own.append(
            None
            if i is None
            else {
                "time_s": rec.records[i][0] - start,
                "time_per_hvp_s": (rec.records[i][0] - start) / (i + 1),
                "value": thetas[i - 1],
                "num_hvps": i + 1,
                "num_gradients": 1,
                "rel_error": abs(thetas[i - 1] - lam) / lam,
            }
        )
        j = first_accurate(thetas, lam, LAMBDA_TOL)
        oracle.append(
            {
                "time_s": (rec.records[j][0] if j is not None else clock()) - start,
                "time_per_hvp_s": ((rec.records[j][0] if j is not None else clock()) - start)
                / ((j + 1) if j is not None else len(thetas)),
                "value": thetas[j if j is not None else -1],
                "num_hvps": (j + 1) if j is not None else len(thetas),
                "num_gradients": 1,
                "reached": j is not None,
                "rel_error": abs(thetas[j if j is not None else -1] - lam) / lam,
            }
        )
    return {
        "reference": {
            "value": lam,
            "num_matvecs": reference.num_matvecs,
            "converged": reference.converged,
            "rel_residual_bound": float(reference.residual_norms[0]) / abs(lam),
        },
        "sgdstab": ours,
        "pyhessian_own_rule": own,
        "pyhessian_to_1e-3": oracle,
        "speedup": median([p["time_s"] / o["time_s"] for o, p in zip(ours, oracle, strict=True)]),
        "speedup_vs_own_rule": median(
            [p["time_s"] / o["time_s"] for o, p in zip(ours, own, strict=True) if p is not None] or [math.nan]
        ),
    }


def warm_lambda_max_row(work: dict, peers: Peers, repeats: int) -> dict:
    """lambda_max as a training monitor measures it: WARM_STEPS SGD steps after a call at tol
    1e-3, Lanczos starts from that call's top eigenvector; PyHessian has no warm start (cold).
    The workload's own model is left as it was (the steps move a copy)."""
    previous = top_eigenvalues(hessian(peers.problem), k=1, tol=LAMBDA_TOL, seed=0)
    moved = copy.deepcopy(work["model"])
    train_sgd(moved, work["x"], work["y"], steps=WARM_STEPS, seed=1)
    moved_peers = Peers({**work, "model": moved}, peers.chunk_size)
    row = lambda_max_row(moved_peers, repeats, init=previous.vectors[:, 0])
    row["sgd_steps_since_previous_call"] = WARM_STEPS
    row["previous_value"] = float(previous.values[0])
    return row


def trace_row(peers: Peers, repeats: int, block: int) -> dict:
    ours, theirs = [], []
    for r in range(repeats):
        # ``block`` probes, then 32 more (the default block_size) until the stderr is 5%.
        t, res = timed(
            lambda r=r: trace(
                hessian(peers.problem),
                num_probes=block,
                target_rel_stderr=TRACE_REL_STDERR,
                seed=r,
            )
        )
        ours.append({"time_s": t, "value": res.value, "stderr": res.stderr, "num_matvecs": res.num_matvecs})

        torch.manual_seed(r)
        with PyHessianRecorder() as counter:
            t, samples = timed(lambda: peers.pyhessian().trace())  # defaults maxIter=100, tol=1e-3
        peers.release_pyhessian()
        mean = statistics.fmean(samples)
        stderr = statistics.stdev(samples) / math.sqrt(len(samples)) if len(samples) > 1 else math.inf
        theirs.append({"time_s": t, "value": mean, "stderr": stderr, "num_hvps": counter.count})

    # Cost of 5% precision: time scales like stderr^2, so compare time * (stderr / value)^2.
    def cost(row):
        return row["time_s"] * (row["stderr"] / abs(row["value"])) ** 2

    return {
        "sgdstab": ours,
        "pyhessian": theirs,
        "speedup": median([p["time_s"] / o["time_s"] for o, p in zip(ours, theirs, strict=True)]),
        "speedup_at_equal_stderr": median([cost(p) / cost(o) for o, p in zip(ours, theirs, strict=True)]),
        "z_score": _z(ours, theirs),
    }


def certified_trace_row(peers: Peers, repeats: int, hutchinson: dict, probes: int) -> dict:
    """XTrace to 5% relative error against PyHessian's Hutchinson (its runs from ``trace_row``)
    scaled to the same standard error, and against curvlinops' XTrace at the same products.
    ``spectrum`` (``spectrum_shape``, k = the most test vectors a run drew, at least XTrace's
    first 8) says whether deflation could pay on this Hessian."""
    ours, theirs = [], []
    for r in range(repeats):
        t, res = timed(lambda r=r: trace(hessian(peers.problem), target_rel_error=TRACE_REL_ERROR, seed=r))
        ours.append({"time_s": t, "value": res.value, "stderr": res.stderr, "num_matvecs": res.num_matvecs})
        torch.manual_seed(r)  # curvlinops draws its test vectors from the global generator
        t, value = timed(
            lambda res=res: curvlinops_xtrace(peers.curvlinops_hessian, num_matvecs=res.num_matvecs)
        )
        theirs.append({"time_s": t, "value": float(value), "num_matvecs": res.num_matvecs})

    def pyhessian_time_at(rel_stderr: float, row: dict) -> float:
        # Hutchinson's stderr falls like 1/sqrt(probes): time to rel_stderr from its own run.
        return row["time_s"] * (row["stderr"] / abs(row["value"]) / rel_stderr) ** 2

    pyhessian = hutchinson["pyhessian"]
    runs = hutchinson["sgdstab"] + pyhessian
    trace_value = statistics.fmean(r["value"] for r in runs)
    k = max(8, max(o["num_matvecs"] for o in ours) // 2)
    return {
        "spectrum": spectrum_shape(hessian(peers.problem), trace_value, k, probes),
        "sgdstab_xtrace": ours,
        "curvlinops_xtrace": theirs,
        "speedup_vs_pyhessian_at_equal_stderr": median(
            [
                pyhessian_time_at(o["stderr"] / abs(o["value"]), p) / o["time_s"]
                for o, p in zip(ours, pyhessian, strict=True)
            ]
        ),
        "speedup_vs_pyhessian_at_5pct_stderr": median(
            [
                pyhessian_time_at(TRACE_REL_ERROR, p) / o["time_s"]
                for o, p in zip(ours, pyhessian, strict=True)
            ]
        ),
        "speedup_vs_curvlinops_xtrace": median(
            [c["time_s"] / o["time_s"] for o, c in zip(ours, theirs, strict=True)]
        ),
        "z_score_vs_pyhessian": _z(ours, pyhessian),
    }


def spectrum_shape(op: LinearOperator, trace_value: float, k: int, num_probes: int, seed: int = 0) -> dict:
    """How much a rank-k deflation can buy on this spectrum: the measured cause behind the
    certified trace row (not timed).

    One Gaussian probe's relative standard deviation is sqrt(2 ||H||_F^2) / |tr H| (the variance
    of g^T H g is 2 ||H||_F^2; Rademacher and sphere probes a little less). Removing the top k
    eigenvalues in magnitude, which is the best any rank-k deflation can do, leaves the
    variance 2 (||H||_F^2 - sum_{i<=k} lambda_i^2). XTrace (Epperly, Tropp and Webber 2024) pays two
    products per test vector and Hutchinson one per probe, so deflation pays in products only
    when ``deflation_gain = ||H||_F^2 / (2 (||H||_F^2 - sum_{i<=k} lambda_i^2)) > 1``, i.e. when the
    top k carry more than half of ||H||_F^2. ``stable_rank = tr(H)^2 / ||H||_F^2`` sets how many
    probes plain Hutchinson needs: about 2 / (stable_rank * rel_error^2).

    The top 2k eigenvalues come from Lanczos (``which="both"``, tol 1e-2), the k largest in
    magnitude are kept; Ritz values lie inside the spectrum, so their share is if anything
    understated. ||H||_F^2 is Hutchinson's with ``num_probes`` probes.
    """
    extremes = top_eigenvalues(op, k=k, which="both", tol=1e-2, seed=seed)
    top = sorted(extremes.values.tolist(), key=abs, reverse=True)[:k]
    frobenius = frobenius_norm(op, num_probes=num_probes, block_size=num_probes, seed=seed)
    squared = frobenius.squared
    top_energy = min(sum(v * v for v in top), squared)
    rest = squared - top_energy
    return {
        "k": k,
        "top_k_eigenvalues": top,
        "lanczos_matvecs": extremes.num_matvecs,
        "lanczos_converged": extremes.converged,
        "frobenius_probes": num_probes,
        "frobenius_squared": squared,
        "frobenius_squared_stderr": frobenius.squared_stderr,
        "trace": trace_value,
        "top_k_share": top_energy / squared if squared > 0 else math.nan,
        "stable_rank": trace_value**2 / squared if squared > 0 else math.nan,
        "probe_rel_sd": math.sqrt(2 * squared) / abs(trace_value),
        "deflated_probe_rel_sd": math.sqrt(2 * rest) / abs(trace_value),
        "deflation_gain": squared / (2 * rest) if rest > 0 else math.inf,
    }


def _z(ours: list[dict], theirs: list[dict]) -> float:
    """|difference of the mean estimates| over its standard error (reported stderrs, averaged)."""
    a = statistics.fmean(o["value"] for o in ours)
    b = statistics.fmean(p["value"] for p in theirs)
    se_a = math.sqrt(sum(o["stderr"] ** 2 for o in ours)) / len(ours)
    se_b = math.sqrt(sum(p["stderr"] ** 2 for p in theirs)) / len(theirs)
    return abs(a - b) / math.hypot(se_a, se_b)


def frobenius_row(peers: Peers, repeats: int, num_probes: int) -> dict:
    ours, theirs = [], []
    for r in range(repeats):
        t, res = timed(
            lambda r=r: frobenius_norm(
                hessian(peers.problem), num_probes=num_probes, block_size=num_probes, seed=r
            )
        )
        ours.append(
            {
                "time_s": t,
                "time_per_probe_s": t / num_probes,
                "value": res.squared,
                "stderr": res.squared_stderr,
            }
        )
        torch.manual_seed(r)  # curvlinops draws its probes from the global generator
        t, value = timed(lambda: hutchinson_squared_fro(peers.curvlinops_hessian, num_matvecs=num_probes))
        theirs.append({"time_s": t, "time_per_probe_s": t / num_probes, "value": float(value)})
    spread = statistics.stdev(p["value"] for p in theirs) if repeats > 1 else math.nan
    for p in theirs:  # curvlinops returns no error: use the spread of its estimates over repeats
        p["stderr"] = spread
    return {
        "num_probes": num_probes,
        "sgdstab": ours,
        "curvlinops": theirs,
        "sgdstab_spread": statistics.stdev(o["value"] for o in ours) if repeats > 1 else math.nan,
        "curvlinops_spread": spread,
        "speedup": median([p["time_s"] / o["time_s"] for o, p in zip(ours, theirs, strict=True)]),
        "z_score": _z(ours, theirs) if repeats > 1 else math.nan,
    }


def hvp_row(peers: Peers, repeats: int, block: int) -> dict:
    """Seconds per HVP (per column for blocks) and per gradient, interleaved in every repeat."""
    p = peers.problem.num_params
    v = torch.randn(p, generator=torch.Generator().manual_seed(2))
    V = torch.randn(p, block, generator=torch.Generator().manual_seed(3))
    h_db = hessian(peers.problem, backend="double_backward")
    h_for = hessian(peers.problem, backend="forward_over_reverse")
    h_estimator = hessian(peers.problem)
    v_list = peers.to_list(v)

    ph = peers.pyhessian()

    def pyhessian_reused():
        # The HVP PyHessian repeats on a graph built once (build not timed here).
        return _pyhessian_module.hessian_vector_product(ph.gradsH, ph.params, v_list)

    cases = {
        "gradient (torch autograd)": (peers.autograd_gradient, 1),
        "gradient (sgdstab Problem.gradient)": (peers.problem.gradient, 1),
        # A product as every estimator applies it: the default operator inside many_products(),
        # whose gradient graph the block's first product built (not timed, like PyHessian's).
        ESTIMATOR_HVP: (lambda: h_estimator @ v, 1),
        "sgdstab HVP double_backward, one bare product": (lambda: h_db @ v, 1),
        "sgdstab HVP forward_over_reverse": (lambda: h_for @ v, 1),
        f"sgdstab HVP double_backward, block of {block}": (lambda: h_db @ V, block),
        f"sgdstab HVP forward_over_reverse, block of {block}": (lambda: h_for @ V, block),
        "curvlinops HVP": (lambda: peers.curvlinops_hessian @ v, 1),
        f"curvlinops HVP, block of {block}": (lambda: peers.curvlinops_hessian @ V, block),
        "PyHessian HVP on its reused graph": (pyhessian_reused, 1),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    with h_estimator.many_products():
        for fn, columns in cases.values():  # warm-up (torch.func first-call overhead)
            if columns == 1:
                fn()
        for _ in range(repeats):
            for name, (fn, columns) in cases.items():
                times[name].append(timed(fn)[0] / columns)
    peers.release_pyhessian()
    grad = times["gradient (torch autograd)"]
    return {
        name: {
            "time_s": median(ts),
            "times_s": ts,
            "ratio_to_gradient": median([t / g for t, g in zip(ts, grad, strict=True)]),
        }
        for name, ts in times.items()
    }


# ------------------------------------------------------------------------------- report
def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _med(rows: list[dict], key: str) -> float:
    return median([r[key] for r in rows if r is not None])


def _med_or_none(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{median(values):g}" if values else "-"


def report_rows(name: str, res: dict) -> list[tuple[str, ...]]:
    """Table rows: (what, time, cost, estimate, peer time / sgdstab time)."""
    rows = []
    for key in ("lambda_max", "lambda_max_warm"):
        if key not in res:
            continue
        lm = res[key]
        o, own, orc = lm["sgdstab"], lm["pyhessian_own_rule"], lm["pyhessian_to_1e-3"]
        lam = lm["reference"]["value"]
        what = (
            f"lambda_max to {LAMBDA_TOL:g}"
            if key == "lambda_max"
            else f"lambda_max {WARM_STEPS} SGD steps later, Lanczos warm-started (PyHessian cold)"
        )
        rows.append((f"{name}: {what}", "", "", f"reference {lam:.6g}", ""))
        rows.append(
            (
                "  sgdstab top_eigenvalues (Lanczos)",
                fmt_time(_med(o, "time_s")),
                f"{_med(o, 'num_matvecs'):g} HVP ({fmt_time(_med(o, 'time_per_matvec_s'))} each; "
                f"within 1e-3 after {_med_or_none(o, 'first_accurate_step')})",
                f"{_med(o, 'value'):.6g} (err {max(r['rel_error'] for r in o):.0e}, bound {max(r['rel_residual_bound'] for r in o):.0e})",
                "",
            )
        )
        valid = [r for r in own if r is not None]
        if valid:
            rows.append(
                (
                    "  PyHessian eigenvalues, own rule",
                    fmt_time(_med(valid, "time_s")),
                    f"{_med(valid, 'num_hvps'):g} HVP + 1 grad",
                    f"{_med(valid, 'value'):.6g} (err {max(r['rel_error'] for r in valid):.0e})",
                    f"{lm['speedup_vs_own_rule']:.2f}x",
                )
            )
        reached = "" if all(r["reached"] for r in orc) else " NOT reached in every repeat"
        rows.append(
            (
                "  PyHessian eigenvalues, to 1e-3 error",
                fmt_time(_med(orc, "time_s")),
                f"{_med(orc, 'num_hvps'):g} HVP + 1 grad ({fmt_time(_med(orc, 'time_per_hvp_s'))} each)",
                f"{_med(orc, 'value'):.6g} (err {max(r['rel_error'] for r in orc):.0e}){reached}",
                f"{lm['speedup']:.2f}x",
            )
        )
    if "trace" in res:
        tr = res["trace"]
        o, p = tr["sgdstab"], tr["pyhessian"]
        rows.append(
            (f"{name}: trace, {TRACE_REL_STDERR:.0%} rel. stderr", "", "", f"z = {tr['z_score']:.2f}", "")
        )
        rows.append(
            (
                "  sgdstab trace (Hutchinson)",
                fmt_time(_med(o, "time_s")),
                f"{_med(o, 'num_matvecs'):g} HVP",
                f"{_med(o, 'value'):.5g} +- {_med(o, 'stderr'):.2g}",
                "",
            )
        )
        rows.append(
            (
                "  PyHessian trace (own rule)",
                fmt_time(_med(p, "time_s")),
                f"{_med(p, 'num_hvps'):g} HVP + 1 grad",
                f"{_med(p, 'value'):.5g} +- {_med(p, 'stderr'):.2g}",
                f"{tr['speedup']:.2f}x ({tr['speedup_at_equal_stderr']:.2f}x at equal stderr)",
            )
        )
    if "certified_trace" in res:
        ct = res["certified_trace"]
        o, c = ct["sgdstab_xtrace"], ct["curvlinops_xtrace"]
        rows.append(
            (
                f"{name}: trace to {TRACE_REL_ERROR:.0%} rel. error, certified",
                "",
                "",
                f"z vs PyHessian = {ct['z_score_vs_pyhessian']:.2f}",
                "",
            )
        )
        rows.append(
            (
                "  sgdstab trace(target_rel_error) (XTrace or its free probes)",
                fmt_time(_med(o, "time_s")),
                f"{_med(o, 'num_matvecs'):g} HVP",
                f"{_med(o, 'value'):.5g} +- {_med(o, 'stderr'):.2g}",
                f"PyHessian at equal stderr {ct['speedup_vs_pyhessian_at_equal_stderr']:.2f}x "
                f"(at 5% stderr {ct['speedup_vs_pyhessian_at_5pct_stderr']:.2f}x)",
            )
        )
        rows.append(
            (
                "  curvlinops xtrace, same products",
                fmt_time(_med(c, "time_s")),
                f"{_med(c, 'num_matvecs'):g} HVP",
                f"{_med(c, 'value'):.5g}",
                f"{ct['speedup_vs_curvlinops_xtrace']:.2f}x",
            )
        )
    if "certified_trace" in res:
        sh = res["certified_trace"]["spectrum"]
        rows.append(
            (
                f"{name}: spectrum shape (why deflation pays or not)",
                "",
                f"{sh['lanczos_matvecs'] + sh['frobenius_probes']} HVP, not timed",
                "",
                "",
            )
        )
        rows.append(
            (
                f"  top-{sh['k']} |eigenvalues|' share of ||H||_F^2",
                "",
                "",
                f"{sh['top_k_share']:.1%}",
                f"deflation gain {sh['deflation_gain']:.2f}x per product (pays if > 1)",
            )
        )
        rows.append(("  stable rank tr(H)^2 / ||H||_F^2", "", "", f"{sh['stable_rank']:.3g}", ""))
        rows.append(
            (
                "  one probe's rel. SD sqrt(2||H||_F^2)/|tr H|",
                "",
                "",
                f"{sh['probe_rel_sd']:.1%}",
                f"after top-{sh['k']} deflation {sh['deflated_probe_rel_sd']:.1%}",
            )
        )
    if "frobenius" in res:
        fr = res["frobenius"]
        o, p = fr["sgdstab"], fr["curvlinops"]
        rows.append(
            (f"{name}: ||H||_F^2, {fr['num_probes']} probes", "per probe", "", f"z = {fr['z_score']:.2f}", "")
        )
        rows.append(
            (
                "  sgdstab frobenius_norm (cached graph)",
                fmt_time(_med(o, "time_per_probe_s")),
                "",
                f"{_med(o, 'value'):.5g} (stderr {_med(o, 'stderr'):.2g}, spread {fr['sgdstab_spread']:.2g})",
                "",
            )
        )
        rows.append(
            (
                "  curvlinops hutchinson_squared_fro",
                fmt_time(_med(p, "time_per_probe_s")),
                "",
                f"{_med(p, 'value'):.5g} (spread {fr['curvlinops_spread']:.2g})",
                f"{fr['speedup']:.2f}x",
            )
        )
    if "hvp" in res:
        rows.append((f"{name}: HVP and gradient", "per column", "x gradient", "", ""))
        for case, t in res["hvp"].items():
            rows.append((f"  {case}", fmt_time(t["time_s"]), f"{t['ratio_to_gradient']:.2f}x", "", ""))
    return rows


def print_table(results: dict) -> None:
    header = ("row", "time (median)", "cost", "estimate", "peer / sgdstab time")
    rows = [r for name, res in results["workloads"].items() for r in report_rows(name, res)]
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        for r in [header] + rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
        return
    m = results["machine"]
    table = Table(
        title=f"sgdstab vs peers: torch {m['torch']}, {m['torch_threads']} thread(s) of {m['cpu_count']} CPUs, "
        f"n={results['args']['n']}, {results['clock']}, median of {results['args']['repeats']}"
    )
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*(escape(c) for c in r), style=None if r[0].startswith(" ") else "bold")
    Console(width=200).print(table)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def targets(name: str, res: dict) -> dict:
    """Issue 9's targets (and consistency checks) for one workload and the rows it ran: measured
    value, goal, met."""
    rows = {}
    for key, label in (("lambda_max", "lambda_max"), ("lambda_max_warm", "lambda_max warm-started")):
        if key not in res:
            continue
        lm = res[key]
        rows[f"{label} speedup vs PyHessian at 1e-3 error"] = (lm["speedup"], ">= 3", lm["speedup"] >= 3)
        rows[f"{label} error of sgdstab (max over repeats)"] = (
            max(r["rel_error"] for r in lm["sgdstab"]),
            f"<= {LAMBDA_TOL:g}",
            all(r["rel_error"] <= LAMBDA_TOL for r in lm["sgdstab"]),
        )
    if "certified_trace" in res:
        ct = res["certified_trace"]
        rows["trace certified 5%: PyHessian time at equal stderr / sgdstab XTrace"] = (
            ct["speedup_vs_pyhessian_at_equal_stderr"],
            ">= 5",
            ct["speedup_vs_pyhessian_at_equal_stderr"] >= 5,
        )
        rows["trace certified 5%: curvlinops xtrace time / sgdstab XTrace (same products)"] = (
            ct["speedup_vs_curvlinops_xtrace"],
            ">= 1",
            ct["speedup_vs_curvlinops_xtrace"] >= 1,
        )
    if "hvp" in res:
        hvp_ratio = res["hvp"][ESTIMATOR_HVP]["ratio_to_gradient"]
        hvp_goal = HVP_GOAL.get(name, 2.5)
        rows["HVP (default operator, as estimators apply it) / gradient"] = (
            hvp_ratio,
            f"<= {hvp_goal}",
            hvp_ratio <= hvp_goal,
        )
    if "frobenius" in res:
        rows["curvlinops / sgdstab time per Frobenius probe"] = (
            res["frobenius"]["speedup"],
            ">= 1",
            res["frobenius"]["speedup"] >= 1,
        )
        rows["||H||_F^2 |sgdstab - curvlinops| / combined stderr"] = (
            res["frobenius"]["z_score"],
            "<= 2",
            not res["frobenius"]["z_score"] > 2,
        )
    if "trace" in res:
        rows["trace |sgdstab - PyHessian| / combined stderr"] = (
            res["trace"]["z_score"],
            "<= 2",
            res["trace"]["z_score"] <= 2,
        )
    return {
        name: {"value": value, "goal": goal, "met": bool(met)} for name, (value, goal, met) in rows.items()
    }


def machine_facts() -> dict:
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "sgdstab": version("sgdstab"),
        "sgdstab_path": str(Path(sgdstab.__file__).parent),
        "pyhessian": version("pyhessian"),
        "curvlinops": version("curvlinops-for-pytorch"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu_pressure": _read("/proc/pressure/cpu"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repeats per row (median reported; >= 3)"
    )
    parser.add_argument("--n", type=int, default=None, help="samples (default 2048, 64 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny models and data: a smoke run in seconds")
    parser.add_argument(
        "--workloads", default="mlp,cnn,cnn_trained", help="comma-separated: mlp, cnn, cnn_trained"
    )
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated rows to run (default all): {', '.join(ROWS)}; certified_trace needs trace",
    )
    parser.add_argument("--chunk-size", type=int, default=1024, help="sgdstab chunk / curvlinops batch size")
    parser.add_argument(
        "--frobenius-probes", type=int, default=None, help="probes for ||H||_F^2 (default 16, 4 with --quick)"
    )
    parser.add_argument(
        "--block", type=int, default=None, help="probes per block (default 8, 4 with --quick)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 keeps torch's default)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="cpu",
        help="cpu: process CPU time (default; robust on a shared machine with --threads 1), wall: wall clock",
    )
    parser.add_argument(
        "--mlp-widths", default=None, help="default 3072,256,128,10 (3072,32,10 with --quick)"
    )
    parser.add_argument("--cnn-channels", default=None, help="default 8,16,16 (4,4,8 with --quick)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="merge these result files into --output; run nothing",
    )
    args = parser.parse_args(argv)
    if PEERS_MISSING is not None:
        sys.exit(
            f"benchmarks/curvature.py needs the peers installed ({PEERS_MISSING}); create the benchmark "
            "virtualenv described in benchmarks/README.md and run it with .venv-bench/bin/python"
        )
    if args.merge:
        return merge(args.merge, args.output)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rows = [row.strip() for row in args.rows.split(",")]
    if not set(rows) <= set(ROWS) or ("certified_trace" in rows and "trace" not in rows):
        parser.error(
            f"--rows takes some of {', '.join(ROWS)} (certified_trace with trace), got {args.rows!r}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    _clock[0] = _CLOCKS[args.clock]
    n = args.n or (64 if args.quick else 2048)
    probes = args.frobenius_probes or (4 if args.quick else 16)
    block = args.block or (4 if args.quick else 8)
    mlp_widths = tuple(
        int(w) for w in (args.mlp_widths or ("3072,32,10" if args.quick else "3072,256,128,10")).split(",")
    )
    cnn_channels = tuple(
        int(c) for c in (args.cnn_channels or ("4,4,8" if args.quick else "8,16,16")).split(",")
    )
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_facts(),
        "clock": {"cpu": "process CPU time (time.process_time)", "wall": "wall clock"}[args.clock],
        "args": {
            **vars(args),
            "output": str(args.output),
            "n": n,
            "frobenius_probes": probes,
            "block": block,
            "mlp_widths": mlp_widths,
            "cnn_channels": cnn_channels,
        },
        "workloads": {},
    }
    start = time.perf_counter()
    for name in args.workloads.split(","):
        work = make_workload(name.strip(), n, mlp_widths, cnn_channels)
        peers = Peers(work, min(args.chunk_size, n))
        res = {
            "description": work["description"],
            "num_params": peers.problem.num_params,
            "n": n,
            "chunk_size": peers.chunk_size,
        }
        stamp = time.perf_counter()
        res["same_operator"] = check_same_operator(peers)
        if "hvp" in rows:
            res["hvp"] = hvp_row(peers, args.repeats, block)
        if "lambda_max" in rows:
            res["lambda_max"] = lambda_max_row(peers, args.repeats)
        if "lambda_max_warm" in rows:
            res["lambda_max_warm"] = warm_lambda_max_row(work, peers, args.repeats)
        if "trace" in rows:
            res["trace"] = trace_row(peers, args.repeats, block)
        if "certified_trace" in rows:
            res["certified_trace"] = certified_trace_row(peers, args.repeats, res["trace"], probes)
        if "frobenius" in rows:
            res["frobenius"] = frobenius_row(peers, args.repeats, probes)
        res["targets"] = targets(name, res)
        res["wall_s"] = time.perf_counter() - stamp
        results["workloads"][name] = res
        print(
            f"{name}: {work['description']}, p={res['num_params']:,}, n={n}, done in {res['wall_s']:.0f} s; "
            f"H v differs from sgdstab's by {res['same_operator']['pyhessian_vs_sgdstab']:.1e} (PyHessian), "
            f"{res['same_operator']['curvlinops_vs_sgdstab']:.1e} (curvlinops)",
            flush=True,
        )
    results["wall_s"] = time.perf_counter() - start
    report_and_write(results, args.output)
    return results


def report_and_write(results: dict, output: Path) -> None:
    print_table(results)
    for name, res in results["workloads"].items():
        for target, t in res["targets"].items():
            print(f"{name}: {target}: {t['value']:.3g} (goal {t['goal']}) {'met' if t['met'] else 'MISSED'}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=float))
    tmp.replace(output)
    print(f"wrote {output} ({results['wall_s']:.0f} s)")


def merge(paths: list[Path], output: Path) -> dict:
    """One table and JSON from runs of single workloads (run side by side on a shared machine,
    each in its own one-thread process: CPU-time clocks do not see each other)."""
    runs = [json.loads(path.read_text()) for path in paths]
    results = {**runs[0], "merged_from": [str(p) for p in paths], "workloads": {}}
    results["command"] = [run["command"] for run in runs]
    results["wall_s"] = max(run["wall_s"] for run in runs)
    for run in runs:
        results["workloads"].update(run["workloads"])
    report_and_write(results, output)
    return results


if __name__ == "__main__":
    main()
