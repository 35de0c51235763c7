"""The same measurements from a PyTorch Lightning module, through ``StabilityCallback``.

    pip install "sgdstab[lightning]"
    python examples/monitor_lightning.py --out runs/monitor-lightning   # then: tensorboard --logdir runs/monitor-lightning
    python examples/monitor_lightning.py --tiny --out /tmp/monitor-pl   # seconds (what CI runs)

The callback reads eta from the module's optimizer and B from the training dataloader, measures a
fixed subset of the training set every ``--every`` optimizer steps, and logs ``sgdstab/*`` scalars
through the trainer's TensorBoard logger (Custom Scalars tab: lambda_max against 2/eta, ||H||_F
against its bound).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import nn

import sgdstab
from sgdstab.integrations.lightning import StabilityCallback


class Classifier(pl.LightningModule):
    """An MLP on MNIST 0 vs 1 with +-1 targets and SPEC.md's square loss (1/2B) sum ||f - y||^2."""

    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = 0.5 * (self(x) - y).pow(2).sum(dim=1).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/monitor-lightning")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="n=64, 40 steps, measure every 20")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n, args.steps, args.every = 64, 40, 20

    torch.manual_seed(0)
    data = sgdstab.load_dataset("mnist", n=args.n, classes=[0, 1], targets="pm1", flatten=True)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.inputs, data.targets),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
    )
    callback = StabilityCallback(every=args.every)
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[callback],
        logger=pl.loggers.TensorBoardLogger(args.out, name="mlp"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=min(50, args.every),
    )
    trainer.fit(Classifier(args.lr), loader)
    assert callback.monitor is not None
    for row in callback.monitor.history:
        print(
            f"step {int(row['step']):5d}  lambda_max {row['lambda_max']:7.2f}  ||H||_F {row['hessian_frobenius']:7.2f}  mu {row['mu']:.3f}"
        )
    return callback.monitor.history


if __name__ == "__main__":
    main()
