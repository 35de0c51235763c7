import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from sgdstab.integrations.lightning import StabilityCallback  # noqa: E402
from sgdstab.io import read_jsonl  # noqa: E402


class TinyRegression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self(x) - y).pow(2).sum(dim=1).mean()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def fit(tmp_path, callback, steps=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 1, generator=g)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[] if callback is None else [callback],
        logger=pl.loggers.CSVLogger(tmp_path, name="csv"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    module = TinyRegression()
    torch.manual_seed(1)  # the loader's shuffling draws from the global RNG
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    return module


def test_callback_measures_on_schedule_logs_and_leaves_training_unchanged(tmp_path):
    seen = []
    callback = StabilityCallback(every=4, out=tmp_path / "monitor", sinks=[seen.append])
    watched = fit(tmp_path, callback, steps=12)
    plain = fit(tmp_path / "plain", None, steps=12)
    for a, b in zip(watched.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    rows = read_jsonl(tmp_path / "monitor" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 4, 8, 12] and rows == seen
    # eta followed the scheduler (halved every epoch of 8 steps); B and the sampling from the loader.
    assert [r["lr"] for r in rows] == [0.05, 0.05, 0.025, 0.025]
    assert {r["batch_size"] for r in rows} == {8.0}
    assert callback.monitor.sampling == "without_replacement" and callback.monitor.num_samples == 64
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "sgdstab/lambda_max" in logged and "sgdstab/frobenius_bound" in logged


def test_importing_sgdstab_does_not_import_lightning():
    code = "import sys, sgdstab, sgdstab.monitor; print('lightning' in sys.modules, 'tensorboard' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
