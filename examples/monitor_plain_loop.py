"""Watch sharpness, ||H||_F, mu and the stability bounds inside a plain PyTorch training loop.

    python examples/monitor_plain_loop.py --out runs/monitor-mnist      # then: tensorboard --logdir runs/monitor-mnist
    python examples/monitor_plain_loop.py --tiny --out /tmp/monitor     # seconds (what CI runs)

An MLP learns MNIST 0 vs 1 (+-1 targets, square loss) by SGD; every ``--every`` steps the monitor
measures on the training set and writes metrics.jsonl and TensorBoard scalars to ``--out``, the
monitor's curves beside the loop's own loss in the same TensorBoard run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch.utils.tensorboard import SummaryWriter

import sgdstab
from sgdstab.monitor import TensorBoardSink


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/monitor-mnist")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="n=64, 40 steps, measure every 20")
    parser.add_argument(
        "--figure", help="also save the two paired curves as an image (e.g. docs/figures/monitor.png)"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.n, args.steps, args.every = 64, 40, 20

    torch.manual_seed(0)
    data = sgdstab.load_dataset("mnist", n=args.n, classes=[0, 1], targets="pm1", flatten=True)
    model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.inputs, data.targets),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
    )
    writer = SummaryWriter(args.out)
    # The loss below is SPEC.md's (1/2B) sum ||f - y||^2, so the optimizer's lr is the monitor's eta.
    monitor = sgdstab.Monitor(
        model,
        (data.inputs, data.targets),
        every=args.every,
        lr=args.lr,
        batch_size=args.batch_size,
        sampling="without_replacement",
        out=args.out,
        sinks=[TensorBoardSink(writer)],
    )
    monitor.step(0)
    step = 0
    while step < args.steps:
        for x, y in loader:
            optimizer.zero_grad()
            loss = 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()
            loss.backward()
            optimizer.step()
            step += 1
            writer.add_scalar("train/batch_loss", loss.item(), step)
            row = monitor.step(step)
            if row is not None:
                print(
                    f"step {step:5d}  loss {row['measurement_loss']:.4f}  lambda_max {row['lambda_max']:7.2f} "
                    f"(2/eta {row['two_over_lr']:.0f})  ||H||_F {row['hessian_frobenius']:7.2f} "
                    f"(bound {row['frobenius_bound']:.1f})  mu {row['mu']:.3f}  [{row['monitor_time_s']:.2f} s]"
                )
            if step == args.steps:
                break
    monitor.close()
    writer.close()
    if args.figure:
        title = f"sgdstab.Monitor along SGD (MLP 784-64-1, MNIST 0 vs 1, n = {args.n}, eta = {args.lr}, B = {args.batch_size})"
        plot(monitor.history, args.figure, title)
    return monitor.history


def plot(history: list[dict[str, float]], path: str, title: str) -> None:
    """The TensorBoard custom-scalars charts as one image: each curve beside the threshold it meets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    pairs = [
        ("lambda_max", "two_over_lr", "lambda_max", "2 / eta (GD edge of stability)"),
        ("hessian_frobenius", "frobenius_bound", "||H||_F", "1 / (eta sqrt(p_B mu)) (SGD bound)"),
    ]
    for ax, (value, bound, label, bound_label) in zip(axes, pairs, strict=True):
        ax.plot(steps, [row[value] for row in history], marker="o", markersize=3, label=label)
        ax.plot(steps, [row[bound] for row in history], linestyle="--", label=bound_label)
        ax.set_xlabel("SGD step")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
