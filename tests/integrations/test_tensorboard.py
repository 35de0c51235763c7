import pytest
import torch
from torch import nn

from sgdstab.monitor import Monitor, TensorBoardSink


def test_tensorboard_event_file_holds_every_scalar_and_the_paired_layout(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    y = torch.randn(24, 1, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(torch.float64)
    monitor = Monitor(model, (x, y), every=2, lr=0.1, batch_size=4, sinks=[TensorBoardSink(tmp_path / "tb")])
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            model[0].weight.mul_(1.1)  # a different point at every measurement
        monitor.step(step)
    monitor.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb")).Reload()
    for name in ("lambda_max", "two_over_lr", "hessian_frobenius", "frobenius_bound", "mu"):
        logged = events.Scalars(f"sgdstab/{name}")
        assert [e.step for e in logged] == [2, 4]
        assert [e.value for e in logged] == pytest.approx([r[name] for r in monitor.history], rel=1e-6)
    assert "custom_scalars__config__" in events.Tags()["tensors"]
