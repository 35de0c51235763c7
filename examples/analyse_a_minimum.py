"""The README's tour as a script: train a small net to a minimum, then ask every question sgdstab answers.

    python examples/analyse_a_minimum.py            # MLP width 64 on 1000 MNIST 0-vs-1 samples (~1 min)
    python examples/analyse_a_minimum.py --tiny     # seconds: what CI runs

It trains first (measuring a random initialisation would say little: stability is a property of a
minimum), then prints the curvature of the Hessian and the Gauss-Newton matrix, the alignment factor
mu of SGD noise with the curvature (Wu, Wang & Su, NeurIPS 2022), and whether the minimum is
linearly stable for SGD at the learning rate and batch size it was trained with.
"""

from __future__ import annotations

import argparse

import torch

import sgdstab


def main(tiny: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    n, width, lr, batch_size = (60, 8, 0.05, 4) if tiny else (1000, 64, 0.05, 16)
    data = sgdstab.load_dataset("mnist", n=n, classes=[0, 1], targets="pm1", flatten=True)
    model = sgdstab.build_model("mlp", input_shape=784, num_outputs=1, width=width, depth=2).eval()

    run = sgdstab.train(
        model, data.inputs, data.targets, lr=lr, batch_size=batch_size, loss_goal=1e-4, max_steps=20_000
    )
    print(f"trained: {run.status} after {run.steps} steps, loss {run.final_loss:.2e}")

    prob = sgdstab.Problem(model, data.inputs, data.targets, loss="mse")
    hessian = sgdstab.hessian(prob)
    top = sgdstab.top_eigenvalues(hessian, k=3)
    trace = sgdstab.trace(hessian, target_rel_stderr=0.05, seed=0)
    frobenius = sgdstab.frobenius_norm(hessian, num_probes=50, seed=0)
    gauss_newton_top = sgdstab.top_eigenvalues(sgdstab.gauss_newton(prob), k=1)
    print(
        f"Hessian: top eigenvalues {[round(v, 3) for v in top.values.tolist()]}, "
        f"tr H = {trace.value:.3f} +- {trace.stderr:.3f}, ||H||_F = {frobenius.value:.3f} +- {frobenius.stderr:.3f}"
    )
    print(f"Gauss-Newton lambda_max = {gauss_newton_top.values[0].item():.3f}")

    aligned = sgdstab.alignment(prob, method="exact")
    print(
        f"alignment factor mu = {aligned.mu:.3f} (worst case over residual directions mu_min = {aligned.mu_min:.3f})"
    )

    verdict = sgdstab.stability(prob, lr=lr, batch_size=batch_size, sampling="with_replacement")
    print(
        f"SGD(lr={lr}, B={batch_size}): growth factor {verdict.growth_factor:.4f}, "
        f"{'stable' if verdict.stable else 'unstable'}"
    )
    for name, threshold in verdict.thresholds.items():
        print(f"  largest stable lr by {name:>11}: {threshold:.4g}")
    return {
        "loss": run.final_loss,
        "lambda_max": float(top.values[0]),
        "mu": float(aligned.mu),
        "growth_factor": float(verdict.growth_factor),
        "exact_threshold": float(verdict.thresholds["exact"]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a CPU (what CI runs)")
    main(tiny=parser.parse_args().tiny)
