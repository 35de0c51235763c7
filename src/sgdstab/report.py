"""The report of a suite folder: figures (PNG), ``report.md`` and ``report.html``.

Reads ``<root>/config.json`` and each ``<root>/<experiment>/analysis.json`` written by the recipes
(``sgdstab.experiments``); it never trains or measures, so it can be re-rendered at any time. The
verdict of each claim is the one its analysis computed from the data. Both documents are rendered
from one list of blocks, so they always say the same thing.

Figures use matplotlib's object API on a bare ``Figure`` (Agg canvas), never pyplot, so rendering
a report does not touch the caller's backend.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sgdstab.errors import RunFolderError
from sgdstab.io import atomic_write, read_json
from sgdstab.stability import STABILITY_CRITERIA, criteria_of_kind

FIGURES_DIR = "figures"
ORDER = ("E1", "E2", "E3", "E4", "E5")
VERDICTS = {True: "holds", False: "does not hold", None: "undecided"}

Block = tuple  # ("heading", level, text) | ("text", text) | ("checks", checks) | ("figure", path, caption)
#              | ("table", headers, rows) | ("code", text)


# ------------------------------------------------------------------------------------- numbers
def fmt(value: Any) -> str:
    """A table cell: 4 significant digits for floats, "-" for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> Block:
    return (
        "table",
        [header for header, _ in columns],
        [[fmt(row.get(key)) for _, key in columns] for row in rows],
    )


# ------------------------------------------------------------------------------------- figures
def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG to ``path``, atomically (a killed write leaves the old file)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def _plot_e1(analysis: dict, fig: Figure) -> None:
    multiclass = [row for row in analysis.get("multiclass_rows", []) if row["curve"]]
    axes = fig.subplots(1, 3 if multiclass else 2)
    mu_axis, loss_axis = axes[0], axes[1]
    families = list(dict.fromkeys(row["family"] for row in analysis["rows"]))
    labelled = set()
    for row in analysis["rows"]:
        # One colour per family; its seeds share it and one legend entry.
        steps = [p["step"] for p in row["curve"]]
        style = {"marker": "o", "ms": 3, "color": f"C{families.index(row['family']) % 10}"}
        label = None if row["family"] in labelled else row["family"]
        labelled.add(row["family"])
        mu_axis.plot(steps, [p["mu"] for p in row["curve"]], label=label, **style)
        loss_axis.semilogy(steps, [p["loss"] for p in row["curve"]], label=label, **style)
    floor = analysis["config"]["mu_floor"]
    mu_axis.axhline(floor, color="k", ls=":", lw=1, label=f"floor {floor:g}")
    mu_axis.axhline(1, color="grey", ls="--", lw=0.8)
    mu_axis.set(
        xlabel="SGD step",
        ylabel="alignment factor mu",
        ylim=(0, None),
        title="mu along training (every seed)",
    )
    loss_axis.set(xlabel="SGD step", ylabel="training loss", title="loss")
    mu_axis.legend(fontsize=8)
    if multiclass:
        axis = axes[2]
        arms = list(dict.fromkeys((row["data"], row["n"]) for row in multiclass))
        for row in multiclass:
            steps = [p["step"] for p in row["curve"]]
            index = arms.index((row["data"], row["n"]))
            # One legend entry per data set (its first seed's run).
            first = row.get("seed", 0) == multiclass[0].get("seed", 0)
            label = f"{row['data']} n={row['n']}"
            axis.plot(
                steps,
                [p["c_mu"] for p in row["curve"]],
                "o-",
                ms=3,
                color=f"C{index}",
                label=f"C mu, {label}" if first else None,
            )
            axis.plot(
                steps,
                [p["mu"] for p in row["curve"]],
                "x:",
                ms=3,
                color=f"C{index}",
                label=f"mu, {label}" if first else None,
            )
            axis.plot(steps, [p["mu_output_mean"] for p in row["curve"]], "--", lw=0.8, color=f"C{index}")
        axis.axhline(floor, color="k", ls=":", lw=1)
        axis.set(
            xlabel="SGD step",
            ylim=(0, None),
            title=f"C = {multiclass[0]['C']} one-hot outputs (dashed: mean mu_a)",
        )
        axis.legend(fontsize=6)


def plot_e2(analysis: dict, fig: Figure) -> None:
    """E2's figure on ``fig``: ||H||_F of each minimum against sqrt(B)/eta, with its bound.

    The bound is 1/(eta sqrt(p_B mu)) (Wu, Wang & Su 2022); rows without "frobenius" (runs that
    did not converge) are left out. ``sgdstab.sweeps`` draws a sweep's figure with it.
    """
    axis = fig.subplots()
    converged = [r for r in analysis["rows"] if "frobenius" in r]
    sizes = sorted({r["batch_size"] for r in analysis["rows"]})
    colors = dict(zip(sizes, ["C0", "C1", "C2", "C3", "C4", "C5", "C6"] * 4, strict=False))
    for size in sizes:
        group = [r for r in converged if r["batch_size"] == size]
        _points_with_bounds(
            axis,
            [(r["sqrt_b_over_lr"], r["frobenius"], r["frobenius_stderr"], r["bound"]) for r in group],
            colors[size],
            f"B={size}",
        )
    xs = [r["sqrt_b_over_lr"] for r in analysis["rows"] if math.isfinite(r["sqrt_b_over_lr"])]
    if converged and xs:
        mu = float(np.median([r["mu"] for r in converged]))
        line = np.geomspace(min(xs) / 1.3, max(xs) * 1.3, 50)
        axis.plot(line, line / math.sqrt(mu), "k--", lw=1, label=f"sqrt(B/mu)/eta, median mu={mu:.2f}")
        floor = min(r["frobenius"] for r in converged) / 2
    else:
        floor = 1.0
    _finish_frobenius_axis(
        axis,
        [r["sqrt_b_over_lr"] for r in analysis["rows"] if r["status"] == "diverged"],
        floor,
        "diverged (placed at the bottom)",
        xlabel="1/(eta sqrt(p_B))  (= sqrt(B)/eta with replacement)",
        title="||H||_F of SGD minima; bars: each run's own bound",
        fontsize=8,
    )


def _points_with_bounds(
    axis: Axes, points: list[tuple[float, float, float, float]], color: str, label: str, **style: Any
) -> None:
    """(x, ||H||_F, its error, bound) points: ||H||_F with error bars, each bound a bar of the same colour."""
    xs = [x for x, _, _, _ in points]
    axis.errorbar(
        xs,
        [y for _, y, _, _ in points],
        yerr=[e for _, _, e, _ in points],
        fmt="o",
        color=color,
        label=label,
        **style,
    )
    axis.scatter(xs, [b for _, _, _, b in points], marker="_", s=200, color=color)


def _finish_frobenius_axis(
    axis: Axes,
    diverged: list[float],
    floor: float,
    diverged_label: str,
    xlabel: str,
    title: str,
    fontsize: int,
) -> None:
    """Diverged runs as red crosses at ``floor``, log-log axes, labels and legend (E2's figures)."""
    if diverged:
        axis.scatter(diverged, [floor] * len(diverged), marker="x", color="red", label=diverged_label)
    axis.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="||H||_F at the minimum", title=title)
    axis.legend(fontsize=fontsize)


def _plot_e2_seeds(analysis: dict, fig: Figure) -> None:
    """E2 over seeds: per (eta, B) the mean ||H||_F with its standard deviation over seeds, each
    seed's minimum as a dot, and the mean bound; falls back to ``plot_e2`` for one-seed analyses.
    """
    spread = analysis.get("spread")
    if not spread or len({r.get("seed") for r in analysis["rows"]}) < 2:
        plot_e2(analysis, fig)
        return
    axis = fig.subplots()
    sizes = sorted({entry["batch_size"] for entry in spread})
    for index, size in enumerate(sizes):
        color = f"C{index % 10}"
        group = [e for e in spread if e["batch_size"] == size and "frobenius_mean" in e]
        _points_with_bounds(
            axis,
            [(e["sqrt_b_over_lr"], e["frobenius_mean"], e["frobenius_std"], e["bound_mean"]) for e in group],
            color,
            f"B={size} (mean +- std over seeds)",
            ms=7,
            capsize=3,
        )
        seeds = [r for r in analysis["rows"] if r["batch_size"] == size and "frobenius" in r]
        axis.scatter(
            [r["sqrt_b_over_lr"] for r in seeds], [r["frobenius"] for r in seeds], s=8, color=color, alpha=0.5
        )
    measured = [e["frobenius_mean"] for e in spread if "frobenius_mean" in e]
    _finish_frobenius_axis(
        axis,
        [e["sqrt_b_over_lr"] for e in spread if e["diverged"]],
        min(measured) / 2 if measured else 1.0,
        "diverged on >= 1 seed (placed at the bottom)",
        xlabel="sqrt(B)/eta",
        title=f"||H||_F of SGD minima over {len({r['seed'] for r in analysis['rows']})} seeds; bars: mean bound",
        fontsize=7,
    )


def _plot_e3(analysis: dict, fig: Figure) -> None:
    """Each arm's median over seeds with its min-max band, per width and per n; caps and 2/eta dotted."""
    axes = fig.subplots(3, 2, sharex="col")
    quantities = (("frobenius", "||H||_F"), ("lambda_max", "lambda_max"), ("trace", "tr H"))
    arms = sorted({r["optimizer"] for r in analysis["rows"]}, key=lambda arm: (arm != "GD", arm))
    for column, (sweep, key) in enumerate((("width", "width"), ("n", "n"))):
        for line, (quantity, label) in enumerate(quantities):
            axis = axes[line, column]
            for arm, style in zip(arms, ("s--", "o-", "^-", "v-"), strict=False):
                sizes = sorted(
                    {r[key] for r in analysis["rows"] if r["sweep"] == sweep and r["optimizer"] == arm}
                )
                groups = [
                    [
                        r[quantity]
                        for r in analysis["rows"]
                        if r["sweep"] == sweep and r["optimizer"] == arm and r[key] == size and quantity in r
                    ]
                    for size in sizes
                ]
                points = [(size, group) for size, group in zip(sizes, groups, strict=True) if group]
                if not points:
                    continue
                xs = [size for size, _ in points]
                drawn = axis.plot(xs, [statistics.median(g) for _, g in points], style, label=arm)
                axis.fill_between(
                    xs,
                    [min(g) for _, g in points],
                    [max(g) for _, g in points],
                    color=drawn[0].get_color(),
                    alpha=0.2,
                )
            if quantity == "frobenius":
                for arm in arms:
                    caps = sorted(
                        (r[key], r["sgd_bound"])
                        for r in analysis["rows"]
                        if r["sweep"] == sweep and r["optimizer"] == arm and "sgd_bound" in r
                    )
                    if caps:
                        axis.plot(*zip(*caps, strict=True), "k:", lw=0.8)
            if analysis.get("gd_limit"):
                axis.axhline(analysis["gd_limit"], color="grey", ls=":", label="2/eta")
            axis.set(xscale="log", yscale="log", ylabel=label)
            axis.legend(fontsize=7)
        values = sorted({r[key] for r in analysis["rows"] if r["sweep"] == sweep})
        axes[-1, column].set(xlabel=sweep, xticks=values, xticklabels=[str(v) for v in values])
        axes[-1, column].minorticks_off()
    axes[0, 0].set_title("width sweep (median, band: min-max over seeds; dotted: SGD caps)")
    axes[0, 1].set_title("n sweep")


def _plot_e4(analysis: dict, fig: Figure) -> None:
    """Each seed in its colour: a sample of single runs, the log mean loss and its exact rate log rho(T)."""
    axis = fig.subplots()
    seeds = [seed for seed in analysis["seeds"] if "measured" in seed]
    tops = []
    for index, seed in enumerate(seeds):
        color = f"C{index % 10}"
        for curve in seed["curves"]:
            axis.plot(
                [s for s, _ in curve], np.log([loss for _, loss in curve]), color=color, alpha=0.08, lw=0.6
            )
        measured, minimum = seed["measured"], seed["minimum"]
        log_mean = np.array(measured["log_mean_loss"])
        steps = np.arange(len(log_mean))
        axis.plot(
            steps,
            log_mean,
            color=color,
            lw=2,
            label=f"seed {seed['seed']}: log mean loss, slope {measured['rate']:.3f} "
            f"(steps {measured['fit_start']}-{measured['fit_end']})",
        )
        # The predictions drawn from the fit window's first step: the fit leaves the transient out.
        first = measured["fit_start"]
        window = np.arange(first, len(log_mean))
        axis.plot(
            window,
            log_mean[first] + minimum["exact_rate"] * (window - first),
            ":",
            color=color,
            lw=1.2,
            label=f"seed {seed['seed']}: exact log rho(T) = {minimum['exact_rate']:.3f}",
        )
        axis.plot(
            window, log_mean[first] + minimum["predicted_rate"] * (window - first), "--", color=color, lw=0.8
        )
        tops.append((log_mean[0], log_mean.max()))
    axis.plot([], [], "k--", lw=0.8, label="the paper's log(eta^2 p_B mu ||H||_F^2), per seed")
    axis.plot([], [], "k:", lw=1.2, label="predictions drawn from the fit window's first step")
    low = min(start for start, _ in tops)
    high = max(max(top, start) for start, top in tops)
    axis.set(
        xlabel="SGD step from the GD minimum",
        ylabel="log training loss",
        ylim=(low - 2, high + 3),
        title="escape from the GD minimum (faint: single runs)",
    )
    axis.legend(fontsize=6)


def _plot_e5(analysis: dict, fig: Figure) -> None:
    axis = fig.subplots()
    # Every criterion of the registry, with the empirical threshold beside the exact one.
    criteria = ("exact", "empirical", *(name for name in STABILITY_CRITERIA if name != "exact"))
    markers = dict(zip(criteria, "D*os^v<>xph+", strict=False))
    cases = [
        f"{r['minimum']} minimum" + (f" (seed {r['seed']})" if "seed" in r else "") + f", B={r['batch_size']}"
        for r in analysis["rows"]
    ]
    for index, row in enumerate(analysis["rows"]):
        for name in criteria:
            if math.isfinite(row[name]):
                axis.scatter(
                    row[name],
                    index,
                    marker=markers[name],
                    s=80 if name in ("exact", "empirical") else 40,
                    color=f"C{criteria.index(name)}",
                    label=name if index == 0 else None,
                )
    axis.set(
        xscale="log",
        yticks=range(len(cases)),
        yticklabels=cases,
        xlabel="largest stable learning rate",
        title=f"thresholds per criterion (necessary ones should lie right of exact; {', '.join(criteria_of_kind('sufficient'))} left)",
    )
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))


def _plot_density(row: dict, fig: Figure) -> None:
    axis = fig.subplots()
    axis.semilogy(row["density_grid"], np.maximum(row["density"], 1e-12))
    axis.set(
        xlabel="eigenvalue of H",
        ylabel="smoothed spectral density",
        ylim=(1e-6, None),
        title=f"Hessian spectral density (SLQ), eta={row['lr']:g}, B={row['batch_size']}",
    )


PLOTS: dict[str, tuple[Callable[[dict, Figure], None], tuple[float, float]]] = {
    "E1": (_plot_e1, (10, 4)),
    "E2": (_plot_e2_seeds, (7, 5)),
    "E3": (_plot_e3, (9, 9)),
    "E4": (_plot_e4, (8, 5)),
    "E5": (_plot_e5, (9, 4)),
}

COLUMNS = {
    "E1": [
        ("family", "family"),
        ("seed", "seed"),
        ("model", "model"),
        ("eta", "lr"),
        ("status", "status"),
        ("final loss", "final_loss"),
        ("mu at init", "mu_initial"),
        ("min mu", "mu_min"),
        ("max mu", "mu_max"),
        ("final mu", "mu_final"),
    ],
    "E2": [
        ("seed", "seed"),
        ("eta", "lr"),
        ("B", "batch_size"),
        ("status", "status"),
        ("steps", "steps"),
        ("loss", "loss"),
        ("||H||_F", "frobenius"),
        ("+-", "frobenius_stderr"),
        ("lambda_max", "lambda_max"),
        ("tr H", "trace"),
        ("mu", "mu"),
        ("mu_min", "mu_min"),
        ("bound sqrt(B/mu)/eta", "bound"),
        ("||H||_F / bound", "ratio"),
    ],
    "E3": [
        ("sweep", "sweep"),
        ("optimizer", "optimizer"),
        ("seed", "seed"),
        ("width", "width"),
        ("n", "n"),
        ("status", "status"),
        ("steps", "steps"),
        ("lambda_max(init)", "initial_lambda_max"),
        ("||H||_F", "frobenius"),
        ("lambda_max", "lambda_max"),
        ("tr H", "trace"),
        ("stable rank", "stable_rank"),
        ("mu", "mu"),
        ("eta lambda_max", "eta_lambda_max"),
        ("SGD bound", "sgd_bound"),
        ("||H||_F / bound", "bound_ratio"),
    ],
    "E5": [
        ("minimum", "minimum"),
        ("seed", "seed"),
        ("B", "batch_size"),
        ("exact", "exact"),
        ("empirical", "empirical"),
        *((criterion.label, name) for name, criterion in STABILITY_CRITERIA.items() if name != "exact"),
        ("mu_min", "mu_min"),
    ],
}


MULTICLASS_COLUMNS = [
    ("family", "family"),
    ("seed", "seed"),
    ("data", "data"),
    ("n", "n"),
    ("C", "C"),
    ("eta", "lr"),
    ("status", "status"),
    ("final loss", "final_loss"),
    ("min mu", "mu_min"),
    ("min C mu", "c_mu_min"),
    ("max C mu", "c_mu_max"),
    ("final C mu", "c_mu_final"),
    ("min mu_a (any output)", "mu_output_min"),
    ("final mean mu_a", "mu_output_mean_final"),
    ("final diagonal share of ||K||_F^2", "block_share_final"),
]


def _e1_multiclass_blocks(analysis: dict) -> list[Block]:
    """The multi-class arm of E1: which normalisation of mu is of order one, and the bound's constant."""
    rows, skipped = analysis.get("multiclass_rows", []), analysis.get("multiclass_skipped", [])
    if not rows and not skipped:
        return []
    blocks: list[Block] = [("heading", 3, "E1 with C one-hot outputs")]
    norm = analysis.get("normalisation") or {}
    if norm:
        outputs = norm["num_outputs"]
        low, high = norm["c_mu_range"]
        binary = norm["bound_constant_binary"]
        versus = (
            f", against {binary:.3g} for the one-output (+-1) families above (ratio "
            f"{norm['bound_constant'] / binary:.3g}; sqrt(C) = {math.sqrt(outputs):.3g})"
            if binary
            else ""
        )
        blocks.append(
            (
                "text",
                f"With C = {outputs} one-hot outputs mu itself lies between {norm['mu_range'][0]:.3g} and "
                f"{norm['mu_range'][1]:.3g} (1/C = {1 / outputs:.3g}); C mu lies between {low:.3g} and {high:.3g} "
                "along training, at every n and on every data set measured"
                + (
                    ", so C mu is the quantity of order one. "
                    if norm.get("c_mu_order_one")
                    else ", outside the order-one range of the check: no normalisation is established here. "
                )
                + "Each output alone (its own NTK block K_aa and residuals e_a) has mu_a >= "
                + f"{min(r['mu_output_min'] for r in rows):.3g} along training; the output-diagonal blocks hold a "
                "share of ||K||_F^2 of "
                + ", ".join(f"{v:.2f}" for v in norm["block_share"])
                + " at the end (1 is the case where mu = mean_a mu_a / C exactly); C mu / mean mu_a at the end: "
                + ", ".join(f"{v:.2f}" for v in norm["c_mu_over_output_mean"])
                + f". The bound of SPEC.md section 3 keeps its form with SPEC's mu: ||H||_F <= sqrt(B/mu)/eta "
                f"= sqrt(C B / (C mu))/eta, i.e. k sqrt(B)/eta with k = 1/sqrt(min mu) = "
                f"{norm['bound_constant']:.3g} for C = {outputs}{versus}.",
            )
        )
    if rows:
        blocks.append(_table(rows, MULTICLASS_COLUMNS))
    for entry in skipped:
        blocks.append(
            ("text", f"Skipped: {entry['data']} (n={entry['n']}, {entry['family']}): {entry['reason']}")
        )
    return blocks


E4_COLUMNS = [
    ("seed", "seed"),
    ("measured rate", "rate"),
    ("+-", "stderr"),
    ("fit steps", "window"),
    ("linearised SGD", "linearized"),
    ("exact log rho(T)", "exact"),
    ("measured / exact", "over_exact"),
    ("paper's log(eta^2 p_B mu ||H||_F^2)", "predicted"),
    ("rigorous (mu_min)", "rigorous"),
    ("||H||_F at GD minimum", "frobenius"),
    ("SGD eta", "sgd_lr"),
    ("||H||_F settled", "settled"),
    ("its bound", "settled_bound"),
]


def _e4_rows(analysis: dict) -> list[dict]:
    """One row per seed that reached a minimum, then the mean +- std over seeds of the rates."""
    rows = []
    for seed in analysis["seeds"]:
        if "measured" not in seed:
            continue
        measured, minimum = seed["measured"], seed["minimum"]
        rows.append(
            {
                "seed": seed["seed"],
                "rate": measured["rate"],
                "stderr": measured["stderr"],
                "window": f"{measured['fit_start']}-{measured['fit_end']}",
                "linearized": seed["linearized_rate"],
                "exact": minimum["exact_rate"],
                "over_exact": measured["rate"] / minimum["exact_rate"],
                "predicted": minimum["predicted_rate"],
                "rigorous": minimum["rigorous_rate"],
                "frobenius": minimum["curvature"]["frobenius"],
                "sgd_lr": minimum["sgd_lr"],
                "settled": (seed.get("settled") or {}).get("frobenius"),
                "settled_bound": seed.get("settled_bound"),
            }
        )
    spread = analysis.get("spread", {})
    if len(rows) > 1:
        keys = {
            "rate": "measured_rate",
            "exact": "exact_rate",
            "over_exact": "measured_over_exact",
            "predicted": "predicted_rate",
        }
        rows.append(
            {
                "seed": "mean +- std",
                **{
                    column: f"{fmt(spread[name]['mean'])} +- {fmt(spread[name]['std'])}"
                    for column, name in keys.items()
                },
            }
        )
    return rows


# ------------------------------------------------------------------------------------- blocks
def _experiment_blocks(name: str, analysis: dict, scale: str | None, figures: Path) -> list[Block]:
    blocks: list[Block] = [
        ("heading", 2, f"{name}: {analysis['title']}"),
        ("text", f"Claim: {analysis['claim']}"),
        ("text", f"Verdict: **{VERDICTS[analysis['holds']]}**" + (f" (scale: {scale})" if scale else "")),
        ("checks", analysis["checks"]),
    ]
    plot, size = PLOTS[name]
    if _plottable(name, analysis):
        path = figures / f"{name}.png"
        fig = Figure(figsize=size)
        plot(analysis, fig)
        save_figure(fig, path)
        blocks.append(("figure", f"{FIGURES_DIR}/{path.name}", f"{name}: {analysis['title']}"))
    if name == "E4":
        blocks.append(_table(_e4_rows(analysis), E4_COLUMNS))
    else:
        blocks.append(_table(analysis["rows"], COLUMNS[name]))
    if name == "E1":
        blocks += _e1_multiclass_blocks(analysis)
    return blocks


def _plottable(name: str, analysis: dict) -> bool:
    """Whether there is anything to draw: log axes need at least one measured point."""
    if name == "E4":
        return any("measured" in seed for seed in analysis["seeds"])
    if name in ("E2", "E3"):
        return any("frobenius" in row for row in analysis["rows"])
    if name == "E1":
        return any(row["curve"] for row in (*analysis["rows"], *analysis.get("multiclass_rows", [])))
    return bool(analysis["rows"])


def _curvature_blocks(e2: dict, figures: Path) -> list[Block]:
    """The curvature summary of one trained model: the sharpest minimum E2 converged to."""
    measured = [r for r in e2["rows"] if r.get("density")]
    if not measured:
        return []
    row = max(measured, key=lambda r: r["frobenius"])
    path = figures / "curvature_density.png"
    fig = Figure(figsize=(7, 4))
    _plot_density(row, fig)
    save_figure(fig, path)
    summary = [
        {"quantity": "lambda_max", "value": fmt(row["lambda_max"])},
        {"quantity": "top-5 eigenvalues", "value": ", ".join(fmt(v) for v in row["top_eigenvalues"])},
        {"quantity": "tr H", "value": f"{fmt(row['trace'])} +- {fmt(row['trace_stderr'])}"},
        {"quantity": "||H||_F", "value": f"{fmt(row['frobenius'])} +- {fmt(row['frobenius_stderr'])}"},
        {"quantity": "mu (mu_min)", "value": f"{fmt(row['mu'])} ({fmt(row['mu_min'])})"},
        {"quantity": "loss", "value": fmt(row["loss"])},
    ]
    return [
        ("heading", 2, "Curvature summary of one trained model"),
        (
            "text",
            f"`curvature_summary` at the E2 minimum with the largest ||H||_F (run {row['run_id']}, "
            f"eta={row['lr']:g}, B={row['batch_size']}): Lanczos top eigenvalues, Hutchinson trace and "
            "Frobenius norm with their standard errors, and the spectral density by stochastic Lanczos quadrature.",
        ),
        _table(summary, [("quantity", "quantity"), ("value", "value")]),
        ("figure", f"{FIGURES_DIR}/{path.name}", "Hessian spectral density"),
    ]


def build_blocks(root: str | os.PathLike) -> list[Block]:
    """Everything the report says, in order, from the files of a suite folder."""
    root = Path(root)
    suite = read_json(root / "config.json") if (root / "config.json").exists() else {"experiments": {}}
    analyses = {
        name: read_json(root / name / "analysis.json")
        for name in ORDER
        if (root / name / "analysis.json").exists()
    }
    if not analyses:
        raise RunFolderError(
            f"{root} holds no experiment results (no <experiment>/analysis.json); run `sgdstab reproduce` first"
        )
    figures = root / FIGURES_DIR
    blocks: list[Block] = [
        ("heading", 1, "sgdstab: reproduction of Wu, Wang & Su (NeurIPS 2022)"),
        (
            "text",
            "Claim under test: a minimum that SGD(eta, B) can stay at has ||H||_F <= sqrt(B/mu)/eta, mu the "
            "alignment factor of SGD noise with the curvature (SPEC.md). Each verdict below is computed from the "
            f"runs in this folder. Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {root}.",
        ),
        ("heading", 2, "Verdicts"),
        (
            "table",
            ["experiment", "claim", "verdict", "evidence"],
            [
                [name, a["claim"], VERDICTS[a["holds"]], " | ".join(c["detail"] for c in a["checks"])]
                for name, a in analyses.items()
            ],
        ),
    ]
    for name, analysis in analyses.items():
        # The scale the results were computed at, from the results themselves (older suites: the config).
        scale = analysis.get("scale", suite["experiments"].get(name, {}).get("scale"))
        blocks += _experiment_blocks(name, analysis, scale, figures)
    if "E2" in analyses:
        blocks += _curvature_blocks(analyses["E2"], figures)
    blocks += [("heading", 2, "Full configuration"), ("code", json.dumps(suite, indent=2))]
    return blocks


# ------------------------------------------------------------------------------------- rendering
def render_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "text":
            out.append(block[1])
        elif kind == "checks":
            out.append("\n".join(f"- [{VERDICTS[c['holds']]}] {c['claim']}: {c['detail']}" for c in block[1]))
        elif kind == "figure":
            out.append(f"![{block[2]}]({block[1]})")
        elif kind == "table":
            # A "|" would split the row: norms are written with the double bar, any other "|" escaped.
            escape = lambda cell: str(cell).replace("||", "\u2016").replace("|", "\\|")  # noqa: E731
            lines = ["| " + " | ".join(map(escape, block[1])) + " |", "|" + "---|" * len(block[1])]
            lines += ["| " + " | ".join(map(escape, row)) + " |" for row in block[2]]
            out.append("\n".join(lines))
        elif kind == "code":
            out.append(f"```json\n{block[1]}\n```")
    return "\n\n".join(out) + "\n"


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;font-size:90%;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
    "th{background:#eee}img{max-width:100%}.holds{color:#060}.does-not-hold{color:#a00}.undecided{color:#a60}"
    "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:85%}"
)


def _inline(text: str) -> str:
    """Escape, then turn the markdown **bold** and `code` used in text blocks into tags."""
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[Block]) -> str:
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sgdstab report</title><style>{_STYLE}</style></head><body>"
    ]
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "text":
            out.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "checks":
            items = "".join(
                f"<li><span class='{VERDICTS[c['holds']].replace(' ', '-')}'>[{VERDICTS[c['holds']]}]</span> "
                f"{html.escape(c['claim'])}: {html.escape(c['detail'])}</li>"
                for c in block[1]
            )
            out.append(f"<ul>{items}</ul>")
        elif kind == "figure":
            out.append(
                f"<figure><img src='{html.escape(block[1])}' alt='{html.escape(block[2])}'>"
                f"<figcaption>{html.escape(block[2])}</figcaption></figure>"
            )
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2]
            )
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "code":
            out.append(f"<pre>{html.escape(block[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(root: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<root>/report.md``, ``<root>/report.html`` and ``<root>/figures/*.png``; return the two paths."""
    root = Path(root)
    blocks = build_blocks(root)
    paths = (root / "report.md", root / "report.html")
    for path, text in zip(paths, (render_markdown(blocks), render_html(blocks)), strict=True):
        with atomic_write(path) as f:
            f.write(text)
    return paths
