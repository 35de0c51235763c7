"""The compass case on a GPU: sgdstab next to PyHessian and curvlinops on a CIFAR-shaped ResNet-18.

    python benchmarks/gpu.py results/gpu.json [--rows gradient,hvp,...] [--eta-star] [--tiny]

ResNet-18 (CIFAR variant: 3x3 stem, no max-pool, BasicBlocks 2-2-2-2, widths 64-512, 11.17M
parameters) in eval mode, n = 5000 Gaussian CIFAR-shaped inputs, random labels, float32. Rows, each
run once per repeat (``--repeats``, default 1) with ``torch.cuda.synchronize`` around every timing:

- gradient: sgdstab ``Problem.gradient`` and plain autograd (cross-entropy);
- hvp: one Hessian-vector product, sgdstab (default operator), PyHessian on its reused graph,
  curvlinops;
- lambda_max: to 1e-3, sgdstab Lanczos, PyHessian ``eigenvalues(tol=1e-3)``, curvlinops through
  scipy ``eigsh(tol=1e-3)``;
- trace: to 5%, sgdstab ``trace(target_rel_error=0.05)`` (XTrace; at most 400 products), PyHessian
  ``trace()`` (its own rule), curvlinops ``xtrace`` with sgdstab's number of products;
- frobenius: ||H||_F^2 from 20 probes, sgdstab and curvlinops;
- mu: the stochastic alignment factor (square loss on one-hot targets), sgdstab only;
- eta_star (``--eta-star``, slow): ``stability`` at nC = 8192 (square loss), sgdstab only.

A peer that is not importable is skipped with a note in the output. The default run is sized to
finish in about 6 minutes on one H200; ``--rows`` limits it. ``--tiny`` shrinks everything (a
width-4 ResNet-18 on 16x16 images, n = 8, CPU) so the test suite can run the script in seconds and it cannot rot.
Writes JSON to the path given on the command line and prints progress as it goes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sgdstab
from sgdstab.estimators import frobenius_norm, top_eigenvalues, xtrace_to_error
from sgdstab.operators import hessian

ROWS = ("gradient", "hvp", "lambda_max", "trace", "frobenius", "mu", "eta_star")
DEFAULT_ROWS = ROWS[:-1]
LAMBDA_TOL = 1e-3
TRACE_REL_ERROR = 0.05
FROBENIUS_PROBES = 20
ETA_STAR_NC = 8192
NUM_CLASSES = 10

warnings.filterwarnings("ignore", message=".*create_graph=True.*")  # PyHessian's backward(create_graph)


def _import_peers() -> tuple[dict[str, Any], list[str]]:
    peers: dict[str, Any] = {}
    notes = []
    try:
        import pyhessian  # noqa: F401

        peers["pyhessian"] = sys.modules["pyhessian.hessian"]
    except ImportError as error:
        notes.append(f"PyHessian skipped: not importable ({error})")
    try:
        import curvlinops

        peers["curvlinops"] = curvlinops
    except ImportError as error:
        notes.append(f"curvlinops skipped: not importable ({error})")
    return peers, notes


# ------------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (He et al., CVPR 2016)."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(width: int = 64, num_classes: int = NUM_CLASSES) -> nn.Module:
    """ResNet-18 for 32x32 images: 3x3 stem, no max-pool; 11,173,962 parameters at width 64."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for stage in range(4):
        outputs = width * 2**stage
        for block in range(2):
            layers.append(BasicBlock(channels, outputs, 2 if stage > 0 and block == 0 else 1))
            channels = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------- timing
class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


def progress(message: str) -> None:
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


class Case:
    """One model and data set as sgdstab, PyHessian and curvlinops each take it."""

    def __init__(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, chunk_size: int, peers: dict):
        self.model, self.x, self.labels = model, x, labels
        self.n = len(x)
        self.chunk_size = chunk_size
        self.peers = peers
        self.problem = sgdstab.Problem(model, x, labels, loss="cross_entropy", chunk_size=chunk_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        n = self.n
        # sgdstab's L = (1/n) sum_i CE_i, as a criterion on the full batch.
        self.criterion = lambda outputs, targets: (
            nn.functional.cross_entropy(outputs, targets, reduction="sum") / n
        )
        self.curvlinops_hessian = None
        if "curvlinops" in peers:
            chunks = list(zip(x.split(chunk_size), labels.split(chunk_size), strict=True))
            op = peers["curvlinops"].HessianLinearOperator(
                model, nn.CrossEntropyLoss(reduction="sum"), self.params, chunks, check_deterministic=False
            )
            self.curvlinops_hessian = op * (1.0 / n)

    def pyhessian(self) -> Any:
        for p in self.params:
            p.grad = None
        return self.peers["pyhessian"].hessian(
            self.model, self.criterion, data=(self.x, self.labels), cuda=self.x.is_cuda
        )

    def release(self) -> None:
        for p in self.params:
            p.grad = None

    def autograd_gradient(self) -> None:
        self.release()
        for x, y in zip(self.x.split(self.chunk_size), self.labels.split(self.chunk_size), strict=True):
            self.criterion(self.model(x), y).backward()

    def to_list(self, v: torch.Tensor) -> list[torch.Tensor]:
        sizes = [p.numel() for p in self.params]
        return [piece.view_as(p) for piece, p in zip(v.split(sizes), self.params, strict=True)]


# ------------------------------------------------------------------------------- rows
def gradient_row(case: Case, clock: Clock) -> dict:
    case.problem.gradient()  # warm-up
    t_ours, _ = clock.time(case.problem.gradient)
    t_torch, _ = clock.time(case.autograd_gradient)
    case.release()
    return {"sgdstab": {"time_s": t_ours}, "torch_autograd": {"time_s": t_torch}}


def hvp_row(case: Case, clock: Clock) -> dict:
    v = torch.randn(case.problem.num_params, device=case.x.device, generator=None)
    op = hessian(case.problem)
    op @ v  # warm-up
    out: dict[str, Any] = {"sgdstab": {"time_s": clock.time(lambda: hessian(case.problem) @ v)[0]}}
    if "pyhessian" in case.peers:
        ph = case.pyhessian()
        module = case.peers["pyhessian"]
        v_list = case.to_list(v)
        module.hessian_vector_product(ph.gradsH, ph.params, v_list)
        out["pyhessian_reused_graph"] = {
            "time_s": clock.time(lambda: module.hessian_vector_product(ph.gradsH, ph.params, v_list))[0]
        }
        del ph
        case.release()
    if case.curvlinops_hessian is not None:
        out["curvlinops"] = {"time_s": clock.time(lambda: case.curvlinops_hessian @ v)[0]}
    return out


def lambda_max_row(case: Case, clock: Clock, seed: int) -> dict:
    t, res = clock.time(lambda: top_eigenvalues(hessian(case.problem), k=1, tol=LAMBDA_TOL, seed=seed))
    out: dict[str, Any] = {
        "sgdstab": {
            "time_s": t,
            "value": float(res.values[0]),
            "num_matvecs": res.num_matvecs,
            "rel_residual_bound": float(res.residual_norms[0] / res.values[0].abs()),
        }
    }
    if "pyhessian" in case.peers:
        torch.manual_seed(seed)
        t, (values, _) = clock.time(
            lambda: case.pyhessian().eigenvalues(maxIter=100, tol=LAMBDA_TOL, top_n=1)
        )
        case.release()
        out["pyhessian"] = {"time_s": t, "value": float(values[0])}
    if case.curvlinops_hessian is not None:
        import scipy.sparse.linalg

        def curvlinops_eigsh() -> float:
            values = scipy.sparse.linalg.eigsh(
                case.curvlinops_hessian.to_scipy(), k=1, which="LA", tol=LAMBDA_TOL
            )[0]
            return float(values[0])

        t, value = clock.time(curvlinops_eigsh)
        out["curvlinops_eigsh"] = {"time_s": t, "value": value}
    return out


def trace_row(case: Case, clock: Clock, seed: int, max_matvecs: int) -> dict:
    # What trace(target_rel_error=...) runs, with a cap on products: a trace near zero (a
    # tiny model) never meets a relative target.
    t, res = clock.time(
        lambda: xtrace_to_error(hessian(case.problem), TRACE_REL_ERROR, max_matvecs=max_matvecs, seed=seed)
    )
    out: dict[str, Any] = {
        "sgdstab_xtrace": {
            "time_s": t,
            "value": res.value,
            "stderr": res.stderr,
            "num_matvecs": res.num_matvecs,
        }
    }
    if "pyhessian" in case.peers:
        torch.manual_seed(seed)
        t, samples = clock.time(lambda: case.pyhessian().trace())
        case.release()
        mean = sum(samples) / len(samples)
        spread = math.sqrt(sum((s - mean) ** 2 for s in samples) / max(len(samples) - 1, 1))
        out["pyhessian"] = {
            "time_s": t,
            "value": mean,
            "stderr": spread / math.sqrt(len(samples)),
            "num_hvps": len(samples),
        }
    if case.curvlinops_hessian is not None and res.num_matvecs % 2 == 0:
        torch.manual_seed(seed)
        t, value = clock.time(
            lambda: case.peers["curvlinops"].xtrace(case.curvlinops_hessian, num_matvecs=res.num_matvecs)
        )
        out["curvlinops_xtrace"] = {"time_s": t, "value": float(value), "num_matvecs": res.num_matvecs}
    return out


def frobenius_row(case: Case, clock: Clock, seed: int, probes: int) -> dict:
    t, res = clock.time(lambda: frobenius_norm(hessian(case.problem), num_probes=probes, seed=seed))
    out: dict[str, Any] = {
        "sgdstab": {"time_s": t, "squared": res.squared, "squared_stderr": res.squared_stderr}
    }
    if case.curvlinops_hessian is not None:
        torch.manual_seed(seed)
        t, value = clock.time(
            lambda: case.peers["curvlinops"].hutchinson_squared_fro(
                case.curvlinops_hessian, num_matvecs=probes
            )
        )
        out["curvlinops"] = {"time_s": t, "squared": float(value)}
    return out


def square_loss_problem(case: Case, n: int) -> sgdstab.Problem:
    targets = nn.functional.one_hot(case.labels[:n], NUM_CLASSES).to(case.x.dtype)
    return sgdstab.Problem(case.model, case.x[:n], targets, loss="mse", chunk_size=case.chunk_size)


def mu_row(case: Case, clock: Clock, seed: int, probes: int, sketch_size: int) -> dict:
    problem = square_loss_problem(case, case.n)
    t, res = clock.time(
        lambda: sgdstab.alignment(
            problem, method="stochastic", num_probes=probes, sketch_size=sketch_size, seed=seed
        )
    )
    return {"sgdstab": {"time_s": t, "mu": res.mu, "stderr": res.stderr, "num_probes": probes}}


def eta_star_row(case: Case, clock: Clock, nc: int) -> dict:
    n = min(case.n, nc // NUM_CLASSES)
    problem = square_loss_problem(case, n)
    t, res = clock.time(lambda: sgdstab.stability(problem, lr=0.01, batch_size=min(32, n)))
    return {
        "sgdstab": {
            "time_s": t,
            "nC": n * NUM_CLASSES,
            "thresholds": res.thresholds,
            "lambda_max": res.lambda_max,
        }
    }


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="where to write the JSON results")
    parser.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, from {', '.join(ROWS)}"
    )
    parser.add_argument("--eta-star", action="store_true", help=f"add eta* at nC = {ETA_STAR_NC} (slow)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="width-4 ResNet-18, 16x16 images, n = 8, CPU: a smoke run in seconds",
    )
    parser.add_argument("--n", type=int, default=None, help="samples (default 5000; 8 with --tiny)")
    parser.add_argument("--chunk-size", type=int, default=None, help="default 1000; 8 with --tiny")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--device", default=None, help="default cuda when available, else cpu (cpu with --tiny)"
    )
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if args.eta_star and "eta_star" not in rows:
        rows.append("eta_star")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {ROWS}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    n = args.n or (8 if args.tiny else 5000)
    chunk_size = args.chunk_size or (8 if args.tiny else 1000)
    width = 4 if args.tiny else 64
    probes = 2 if args.tiny else FROBENIUS_PROBES
    nc = 4 * NUM_CLASSES if args.tiny else ETA_STAR_NC

    peers, notes = _import_peers()
    for note in notes:
        progress(note)
    torch.manual_seed(0)
    model = resnet18(width).to(device).eval()
    side = 16 if args.tiny else 32
    x = torch.randn(n, 3, side, side, device=device)
    labels = torch.randint(0, NUM_CLASSES, (n,), device=device)
    case = Case(model, x, labels, chunk_size, peers)
    clock = Clock(device)
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "peers": sorted(peers),
        "notes": notes,
        "num_params": case.problem.num_params,
        "n": n,
        "chunk_size": chunk_size,
        "rows": {},
    }
    progress(
        f"ResNet-18 width {width}: {case.problem.num_params:,} parameters, n = {n}, {device}; rows {rows}"
    )
    runners: dict[str, Callable[[int], dict]] = {
        "gradient": lambda seed: gradient_row(case, clock),
        "hvp": lambda seed: hvp_row(case, clock),
        "lambda_max": lambda seed: lambda_max_row(case, clock, seed),
        "trace": lambda seed: trace_row(case, clock, seed, 16 if args.tiny else 400),
        "frobenius": lambda seed: frobenius_row(case, clock, seed, probes),
        "mu": lambda seed: mu_row(case, clock, seed, probes, 2 if args.tiny else 20),
        "eta_star": lambda seed: eta_star_row(case, clock, nc),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        results["rows"][row] = []
        for seed in range(args.repeats):
            progress(f"{row} (repeat {seed + 1}/{args.repeats}) ...")
            measured = runners[row](seed)
            results["rows"][row].append(measured)
            progress(
                f"{row}: "
                + ", ".join(f"{who} {m['time_s']:.3f} s" for who, m in measured.items() if "time_s" in m)
            )
            # Written after every row, so a run cut short by its time limit keeps what it measured.
            args.output.write_text(json.dumps(results, indent=2, default=float))
    progress(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
