"""Cost of the alignment factor and of SGD linear stability (SPEC.md sections 2-3), on one machine.

    python benchmarks/stability.py [--quick] [--threads 2] [--output benchmarks/results/stability.json]

Workloads (MNIST through ``sgdstab.data``, flattened, float32; MLP 784-128-C with tanh, p = 100,609
for C = 1 and 101,770 for C = 10):

- alignment, exact (sample-space K, mu and mu_min) and stochastic (a 20-direction sketch of K
  taken out exactly, then 30 Rademacher probes per sum, 100 for the C = 10 row), at the initial
  parameters with the data's targets (C = 1: digits 0 vs 1 as +-1; C = 10: one-hot); over n it
  shows where K stops fitting the default budget (2**26 entries, nC = 8192) and the stochastic
  path takes over;
- stability at a planted interpolating minimum (targets = the network's own outputs, so H = G
  exactly): the whole ``stability()`` call and, separately, eta* alone from K's spectrum, for
  nC = 2000 (n = 2000, C = 1 and n = 200, C = 10);
- the exact paths at nC = 8192 (n = 8192, C = 1; n = 819, C = 10), the largest K the default
  budget admits, in one process: exact mu alone (``alignment(problem, worst_case=False)``, which
  needs K but not its spectrum), then K (``gram_matrix``), its spectrum (``gram_spectrum``), mu
  and mu_min from that spectrum (``alignment(..., spectrum=)``) and eta* from it
  (``SecondMomentMap.threshold``). Exact mu with mu_min costs K + spectrum + the rest, eta*
  costs K + spectrum + the threshold: what ``alignment(problem, method="exact")`` and a fresh
  ``stability`` call would spend on them; the number of products of the second-moment map the
  threshold took (``threshold_products``). At C = 10 the whole ``stability(..., spectrum=)`` at
  lr = 0.01 follows (its own eta*, rho(T) and the other criteria: ``stability_rest``, and
  ``stability_seconds`` = K + spectrum + rest, with its products). Targets (issue 9): mu <= 60 s
  (held against both mu alone and mu with mu_min), eta* <= 600 s, peak resident memory <= 8 GiB,
  each marked met or missed; ``--only exact_large_c10`` runs the C = 10 case alone;
- the parameter-space Kronecker route (p^2 x p^2 second-moment operator; eta* by Brent's method on
  its spectral radius) next to ours on tiny MLPs (inputs 3, p <= 40) where it fits.

Every case runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own,
after a warm-up on a tiny problem (torch.func and LAPACK load lazily, seconds on first use). Times
are wall-clock and process CPU seconds (all threads); the machine's load average at the start of
each case is recorded, because this box is shared and torch's thread barriers stall when another
process holds a core. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

# The dense Kronecker reference is the tests' own (tests/reference.py), so the benchmark times the
# very truth the tests check against.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import kronecker_threshold  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stability.json"
MLP_HIDDEN = 128


# ----------------------------------------------------------------------------- workloads
def _mnist_mlp(n: int, outputs: int, planted: bool):
    from sgdstab import Problem
    from sgdstab.data import load_dataset

    if outputs == 1:
        data = load_dataset("mnist", n=n, flatten=True, classes=[0, 1], targets="pm1")
    else:
        data = load_dataset("mnist", n=n, flatten=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, MLP_HIDDEN), torch.nn.Tanh(), torch.nn.Linear(MLP_HIDDEN, outputs)
    )
    targets = data.targets
    if planted:
        with torch.no_grad():
            targets = model(data.inputs)
    return Problem(model, data.inputs, targets)


def _tiny_mlp(hidden: int, n: int):
    from sgdstab import Problem

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    ).double()
    inputs = torch.randn(n, 3, dtype=torch.float64)
    with torch.no_grad():
        targets = model(inputs)
    return Problem(model, inputs, targets)


def _timed(function):
    """(value, wall seconds); the process CPU seconds of the last call are kept in ``_timed.cpu``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    value = function()
    _timed.cpu = time.process_time() - start_cpu
    return value, time.perf_counter() - start


def _warm_up() -> None:
    """Run every path once on a tiny problem: torch.func and LAPACK load lazily on first use (seconds)."""
    from sgdstab.alignment import alignment
    from sgdstab.stability import stability

    problem = _tiny_mlp(3, 12)
    alignment(problem, hessian=False)
    alignment(problem, method="stochastic", num_probes=2)
    stability(problem, lr=0.1, batch_size=2)


#: Issue 9's targets for the exact paths at nC = 8192, on this 2-core machine.
LARGE_TARGETS = dict(mu_alone_seconds=60.0, mu_seconds=60.0, threshold_seconds=600.0, peak_rss_mib=8192.0)


def _count_noise_products(second_moment_map: type) -> list[int]:
    """Count calls of ``SecondMomentMap.noise`` (each two nC x r x r products, the cost unit of
    eta* and rho(T)) in this process, in the returned one-item list."""
    calls = [0]
    noise = second_moment_map.noise

    def counted(self, matrix):
        calls[0] += 1
        return noise(self, matrix)

    second_moment_map.noise = counted
    return calls


def _exact_large(case: dict) -> dict:
    """K, its spectrum, exact mu and eta* at one large nC, each timed (wall and CPU), in one process."""
    import gc

    from sgdstab.alignment import alignment
    from sgdstab.sample_space import gram_matrix, gram_spectrum
    from sgdstab.stability import SecondMomentMap, batch_noise_factor, stability

    problem = _mnist_mlp(case["n"], case["outputs"], planted=False)  # K does not depend on the targets
    row: dict = {}

    def timed(name, function):
        value, seconds = _timed(function)
        row[f"{name}_seconds"], row[f"{name}_cpu_seconds"] = seconds, _timed.cpu
        # Stage by stage on stderr (which the driver passes through): a run stopped for time keeps them.
        print(f"  {name}: {seconds:.1f} s wall, {_timed.cpu:.1f} s CPU", file=sys.stderr, flush=True)
        return value

    alone = timed("mu_alone", lambda: alignment(problem, hessian=False, worst_case=False))
    gc.collect()
    gram = timed("gram", lambda: gram_matrix(problem))
    spectrum = timed("spectrum", functools.partial(gram_spectrum, gram, problem.num_outputs))
    del gram  # as build_gram_spectrum does: only the float64 K stays
    gc.collect()
    result = timed("mu_rest", lambda: alignment(problem, hessian=False, spectrum=spectrum))
    products = _count_noise_products(SecondMomentMap)
    moment = SecondMomentMap(
        spectrum, batch_noise_factor(problem.num_samples, case["batch"], "with_replacement")
    )
    threshold = timed("threshold_only", moment.threshold)
    row["threshold_products"] = products[0]
    del moment
    if "lr" in case:
        # The whole stability() from the same spectrum: eta*, rho(T) at lr, mu_min and the other
        # criteria. The targets are the data's, not the network's outputs, so it warns that this
        # is no minimum; the cost is the same.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysed = timed(
                "stability_rest",
                lambda: stability(problem, lr=case["lr"], batch_size=case["batch"], spectrum=spectrum),
            )
        row.update(
            growth_factor=analysed.growth_factor,
            stability_products=products[0] - row["threshold_products"],
            stability_seconds=row["gram_seconds"] + row["spectrum_seconds"] + row["stability_rest_seconds"],
        )
    shared, shared_cpu = (
        row["gram_seconds"] + row["spectrum_seconds"],
        row["gram_cpu_seconds"] + row["spectrum_cpu_seconds"],
    )
    row.update(
        mu=result.mu,
        mu_alone=alone.mu,
        mu_min=result.mu_min,
        threshold=threshold,
        rank=spectrum.rank,
        mu_seconds=shared + row["mu_rest_seconds"],
        mu_cpu_seconds=shared_cpu + row["mu_rest_cpu_seconds"],
        threshold_seconds=shared + row["threshold_only_seconds"],
        threshold_cpu_seconds=shared_cpu + row["threshold_only_cpu_seconds"],
    )
    row["seconds"] = row["mu_seconds"]
    return row


def run_case(case: dict) -> dict:
    from sgdstab.alignment import alignment
    from sgdstab.sample_space import gram_matrix, gram_spectrum
    from sgdstab.stability import SecondMomentMap, batch_noise_factor, stability

    kind = case["kind"]
    row: dict = {}
    _warm_up()
    if kind in ("alignment_exact", "alignment_stochastic"):
        problem = _mnist_mlp(case["n"], case["outputs"], planted=False)
        method = "exact" if kind == "alignment_exact" else "stochastic"
        try:
            result, seconds = _timed(
                lambda: alignment(problem, method=method, num_probes=case.get("probes", 30), hessian=False)
            )
            row.update(mu=result.mu, mu_min=result.mu_min, stderr=result.stderr, seconds=seconds)
        except MemoryError as error:
            row.update(refused=str(error))
    elif kind == "stability":
        problem = _mnist_mlp(case["n"], case["outputs"], planted=True)
        result, seconds = _timed(lambda: stability(problem, lr=case["lr"], batch_size=case["batch"]))
        row.update(
            seconds=seconds,
            growth_factor=result.growth_factor,
            thresholds=result.thresholds,
            rank=result.rank,
            mu_min=result.mu_min,
        )
    elif kind == "threshold_only":
        problem = _mnist_mlp(case["n"], case["outputs"], planted=True)
        gram, gram_seconds = _timed(lambda: gram_matrix(problem))
        spectrum, spectrum_seconds = _timed(lambda: gram_spectrum(gram, problem.num_outputs))
        moment = SecondMomentMap(
            spectrum, batch_noise_factor(problem.num_samples, case["batch"], "with_replacement")
        )
        threshold, seconds = _timed(moment.threshold)
        row.update(
            threshold=threshold, seconds=seconds, gram_seconds=gram_seconds, spectrum_seconds=spectrum_seconds
        )
    elif kind == "exact_large":
        row.update(_exact_large(case))
    elif kind in ("kronecker", "ours_tiny"):
        problem = _tiny_mlp(case["hidden"], case["n"])
        batch_noise = batch_noise_factor(problem.num_samples, case["batch"], "with_replacement")
        if kind == "kronecker":
            threshold, seconds = _timed(lambda: kronecker_threshold(problem, batch_noise, rtol=1e-10))
        else:
            result, seconds = _timed(lambda: stability(problem, lr=0.1, batch_size=case["batch"]))
            threshold = result.thresholds["exact"]
        row.update(threshold=threshold, seconds=seconds, p=problem.num_params)
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    row.setdefault("cpu_seconds", getattr(_timed, "cpu", math.nan))
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if kind == "exact_large":
        row["cpu_seconds"] = row["threshold_cpu_seconds"]
        row["targets"] = {
            name: dict(target=target, value=row[name], met=row[name] <= target)
            for name, target in LARGE_TARGETS.items()
        }
    return row


# ----------------------------------------------------------------------------- driver
def cases(quick: bool) -> list[dict]:
    if quick:
        return [
            dict(kind="alignment_exact", n=200, outputs=1),
            dict(kind="alignment_stochastic", n=200, outputs=1),
            dict(kind="threshold_only", n=200, outputs=1, batch=16),
            dict(kind="kronecker", hidden=3, n=8, batch=2),
            dict(kind="ours_tiny", hidden=3, n=8, batch=2),
            dict(kind="exact_large", n=200, outputs=1, batch=16),
        ]
    rows = []
    for n in (500, 1000, 2000, 4000, 10000):
        rows.append(dict(kind="alignment_exact", n=n, outputs=1))
        rows.append(dict(kind="alignment_stochastic", n=n, outputs=1))
    rows += [
        dict(kind="alignment_exact", n=2000, outputs=10),
        dict(kind="alignment_stochastic", n=2000, outputs=10, probes=100),
        dict(kind="threshold_only", n=2000, outputs=1, batch=32),
        dict(kind="threshold_only", n=200, outputs=10, batch=32),
        dict(kind="stability", n=2000, outputs=1, batch=32, lr=0.025),
        dict(kind="stability", n=200, outputs=10, batch=32, lr=0.01),
    ]
    rows += [
        dict(kind="exact_large", n=8192, outputs=1, batch=32),
        dict(kind="exact_large", n=819, outputs=10, batch=32, lr=0.01),
    ]
    for hidden in (2, 4, 9):  # p = 11, 21, 46
        rows.append(dict(kind="kronecker", hidden=hidden, n=16, batch=4))
        rows.append(dict(kind="ours_tiny", hidden=hidden, n=16, batch=4))
    return rows


def _describe(case: dict) -> str:
    if case["kind"] in ("kronecker", "ours_tiny"):
        return f"{case['kind']:<20} tiny MLP hidden={case['hidden']} n={case['n']} B={case['batch']}"
    return f"{case['kind']:<20} MNIST MLP n={case['n']:<5} C={case['outputs']:<3}"


def _summary(row: dict) -> str:
    if "refused" in row:
        return "refused: K does not fit (use method='stochastic')"
    parts = []
    if row.get("mu") is not None:
        parts.append(f"mu={row['mu']:.4f}" + (f"+-{row['stderr']:.4f}" if row.get("stderr") else ""))
    if row.get("mu_min") is not None:
        parts.append(f"mu_min={row['mu_min']:.4f}")
    if "threshold" in row:
        parts.append(f"eta*={row['threshold']:.6g}")
    if "gram_seconds" in row:
        parts.append(f"(K {row['gram_seconds']:.1f}s, eigh {row['spectrum_seconds']:.1f}s)")
    if "thresholds" in row:
        parts.append(
            "eta*={exact:.4g} gd={gd:.4g} frob={frobenius:.4g} m24={mulayoff24:.4g} wme={wme:.4g}".format(
                **row["thresholds"]
            )
        )
        parts.append(f"rho={row['growth_factor']:.6f}")
    if "targets" in row:
        parts.append(
            f"rank={row['rank']}; "
            + "; ".join(
                f"{name} {entry['value']:.0f} (target {entry['target']:.0f}: {'met' if entry['met'] else 'MISSED'})"
                for name, entry in row["targets"].items()
            )
        )
    if "p" in row:
        parts.append(f"p={row['p']}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per case")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--only",
        help="comma-separated case kinds to run (e.g. exact_large), or a kind and its C (e.g. "
        "exact_large_c10); their rows replace the same cases in the existing JSON and the other rows "
        "are kept, each with its own date",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    rows = []
    print(f"{'case':<52} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}  result")
    selected = cases(args.quick)
    if args.only:
        wanted = args.only.split(",")
        selected = [
            case
            for case in selected
            if case["kind"] in wanted or f"{case['kind']}_c{case.get('outputs')}" in wanted
        ]
    kept = []
    if args.only and args.output.exists():
        kept = [row for row in json.loads(args.output.read_text())["rows"] if row["case"] not in selected]
    for case in selected:
        load = os.getloadavg()[0]
        command = [sys.executable, __file__, "--threads", str(args.threads), "--case", json.dumps(case)]
        # The case's stderr (progress, or a traceback) goes straight to ours.
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            row = dict(error=f"exit {done.returncode} (the case's stderr is printed above)")
        else:
            row = json.loads(done.stdout.strip().splitlines()[-1])
        row.update(
            case=case,
            load_average=load,
            load_average_after=os.getloadavg()[0],
            date=_dt.datetime.now().isoformat(timespec="seconds"),
        )
        rows.append(row)
        seconds = row.get("seconds", math.nan)
        print(
            f"{_describe(case):<52} {seconds:>8.2f} {row.get('cpu_seconds', math.nan):>8.2f} "
            f"{row.get('peak_rss_mib', math.nan):>9.0f}  "
            f"{row.get('error') or _summary(row)}",
            flush=True,
        )
        # Written after every case, so a run stopped for time keeps the rows it finished.
        _write(args.output, args.threads, kept + rows)
    print(f"wrote {args.output}")


def _write(output: Path, threads: int, rows: list[dict]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(
        date=_dt.datetime.now().isoformat(timespec="seconds"),
        torch=torch.__version__,
        threads=threads,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        rows=rows,
    )
    temporary = output.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=2))
    temporary.replace(output)


if __name__ == "__main__":
    main()
