"""Measure curvature, alignment and stability inside a user's own training loop.

``Monitor(model, data, ...)`` is called as ``monitor.step(step)`` after each optimizer step. On
its schedule (``every=k`` for all measures, or one period per measure such as
``every={"lambda_max": 100, "frobenius": 500, "mu": 1000}``) it measures on a fixed measurement
set (a seeded, deterministic subset of ``n_measure`` samples; the whole set when it has at most
``DEFAULT_MAX_MEASURE_SAMPLES``), through one ``Problem`` built once and reused, and records, at
the current parameters:

- ``lambda_max``: the top Hessian eigenvalue by Lanczos, warm-started from the previous
  measurement's top eigenvector (nearby points have nearby eigenvectors, so fewer products), beside
  ``two_over_lr`` = 2/eta, the edge of stability of gradient descent (Cohen et al., ICLR 2021);
- ``hessian_frobenius`` (||H||_F) and ``hessian_trace`` (tr H): Hutchinson on the same Rademacher
  probes, with the top Ritz pair (theta, v) deflated exactly: tr H = theta + E z^T H' z and
  ||H||_F^2 = theta^2 + E ||H' z||^2 with H' = H - theta v v^T, unbiased for any unit v because
  theta = v^T H v, and far less noisy when lambda_max dominates (the idea of Hutch++, Meyer,
  Musco, Musco & Woodruff, SOSA 2021). All probes go through the Hessian operator of the
  measurement, whose gradient graph Lanczos already built (``cache_graph``), as one block. When
  lambda_max is not due at that step, the previous top vector v is deflated with theta = v^T H v
  (one more product);
- ``mu``: the alignment factor of SGD noise (Wu, Wang & Su, NeurIPS 2022), matrix-free
  (``alignment(method="stochastic")``, ``sketch_size`` deflated directions of the NTK and
  ``num_probes`` probes per sum), beside ``frobenius_bound`` = 1/(eta sqrt(p_B mu)), which is
  sqrt(B/mu)/eta with replacement: a minimum SGD(eta, B) can stay at has ||H||_F below it;
- with "stability" in ``measures``: ``eta_star`` (the exact largest stable learning rate of the
  linearised SGD, SPEC.md section 3) and ``growth_factor`` at the current (eta, B), on the
  measurement set, whose nC x nC Gram matrix must be small; ``at_minimum`` is 0 while the loss is
  above the tolerance of ``stability`` (the linearisation is then only indicative).

A measurement changes nothing the training sees: the model's per-module train/eval flags and every
parameter's ``.grad`` are restored as they were, parameters are only read, and the global random
states of torch, numpy and ``random`` are saved and restored (the estimators draw from their own
seeded generators, with the same probes at every measurement, so a change along training is not
probe noise). Each row records the seconds the measurement took (``monitor_time_s``), and every estimate
its standard error (``*_stderr``) or, for lambda_max, the Lanczos tolerance it met.

Default accuracy (10 Hutchinson probes, a 10-direction sketch for mu): on the quick-scale MLP of
``benchmarks/monitor.py`` (784-64-1 tanh, MNIST 0 vs 1, n = 500) the reported relative standard
errors are about 5% for ||H||_F and 0.5-1% for mu (benchmarks/README.md); lambda_max meets ``tol``.
Standard errors shrink as 1/sqrt(num_probes); each probe costs one more product.

Under ``torchrun`` (a ``torch.distributed`` process group of more than one process) every rank
builds the Monitor with the same global data and calls ``step`` at the same steps: each holds its
contiguous shard of the measurement set (``sgdstab.distributed.ShardedProblem``), the products
are summed across ranks, every rank gets the same numbers, and only rank 0 writes to sinks.
"stability" needs every sample in one process and is skipped there with a warning.

Rows go to sinks: ``JsonlSink`` (``metrics.jsonl`` and ``config.json`` in a run folder, the default
when ``out`` is given), ``TensorBoardSink`` (``torch.utils.tensorboard``, with the paired curves
lambda_max against 2/eta and ||H||_F against its bound in one chart each) and any Python callable.

The learning rate is eta for the loss of SPEC.md section 1, L = (1/2n) sum_i ||f(x_i) - y_i||^2
(or mean cross-entropy): a loop that minimises ``torch.nn.MSELoss()``, which is (2/C) L, takes steps
of (2/C) times its optimizer's learning rate on L. The thresholds are those of plain SGD; with
momentum or adaptive optimizers they are a reference, not a verdict.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sgdstab.alignment import alignment
from sgdstab.distributed import ShardedProblem, is_main_process
from sgdstab.errors import InputError
from sgdstab.estimators import top_eigenvalues
from sgdstab.estimators._common import apply_in_blocks, make_generator, rademacher
from sgdstab.estimators.hutchinson import mean_and_stderr
from sgdstab.io import CONFIG_FILE, METRICS_FILE, append_jsonl, write_json_atomic
from sgdstab.operators import hessian
from sgdstab.problem import LOSSES, Problem
from sgdstab.stability import SAMPLINGS, batch_noise_factor, stability

MEASURES = ("lambda_max", "frobenius", "trace", "mu", "stability")
DEFAULT_MEASURES = ("lambda_max", "frobenius", "trace", "mu")
#: Data sets up to this size are measured whole; larger ones on a seeded subset of this size.
DEFAULT_MAX_MEASURE_SAMPLES = 1000
#: "stability" builds the nC x nC Gram matrix and eigendecomposes it (n = 2000: about 4 s on a CPU).
STABILITY_MAX_SAMPLE_OUTPUTS = 2000
#: Hessian-vector products per block in the Hutchinson estimates (bounds working memory).
_PROBE_BLOCK = 32
#: Measures whose products share one probe block: tr H comes free with ||H||_F.
_HUTCHINSON_MEASURES = ("frobenius", "trace")

Row = dict[str, float]


# ============================================================================ sinks
@runtime_checkable
class Sink(Protocol):
    """Where measurement rows go: ``write(row)`` per measurement, ``close()`` at the end."""

    def write(self, row: Row) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Rows appended to ``<folder>/metrics.jsonl`` (one line each), the monitor's settings in ``config.json``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.folder / CONFIG_FILE, config)

    def write(self, row: Row) -> None:
        append_jsonl(self.folder / METRICS_FILE, row)

    def close(self) -> None:
        """Nothing to close: every row is written with its own open and close."""


#: Charts of the TensorBoard "Custom Scalars" tab: each measured curve beside the threshold it meets.
PAIRED_CURVES = {
    "lambda_max vs 2/eta": ("lambda_max", "two_over_lr"),
    "||H||_F vs 1/(eta sqrt(p_B mu))": ("hessian_frobenius", "frobenius_bound"),
}


def add_paired_layout(writer: Any, prefix: str) -> None:
    """Put the ``PAIRED_CURVES`` charts of tags ``<prefix>/<name>`` into ``writer``'s custom-scalars tab."""
    charts = {
        title: ["Multiline", [f"{prefix}/{name}" for name in names]] for title, names in PAIRED_CURVES.items()
    }
    writer.add_custom_scalars({prefix: charts})


class TensorBoardSink:
    """Every number of a row as a scalar ``<prefix>/<name>`` at the row's step, plus the paired charts.

    Args:
        log_dir_or_writer: a folder for a new ``SummaryWriter``, or the writer a loop already logs
            its losses with (the curves then share one TensorBoard run).
        prefix: tag prefix.
    """

    def __init__(self, log_dir_or_writer: str | Path | Any, prefix: str = "sgdstab"):
        if isinstance(log_dir_or_writer, (str, Path)):
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is imported only when used

            self.writer = SummaryWriter(log_dir=str(log_dir_or_writer))
            self._owns_writer = True
        else:
            self.writer = log_dir_or_writer
            self._owns_writer = False
        self.prefix = prefix
        add_paired_layout(self.writer, prefix)

    def write(self, row: Row) -> None:
        step = int(row["step"])
        for name, value in row.items():
            if name != "step" and math.isfinite(value):
                self.writer.add_scalar(f"{self.prefix}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self._owns_writer:
            self.writer.close()


class CallbackSink:
    """Calls ``function(row)`` for every row (a plain callable in ``sinks`` is wrapped in this)."""

    def __init__(self, function: Callable[[Row], Any]):
        self.function = function

    def write(self, row: Row) -> None:
        self.function(row)

    def close(self) -> None:
        """A callback holds nothing to release."""


def _as_sink(sink: Sink | Callable[[Row], Any]) -> Sink:
    if isinstance(sink, Sink):
        return sink
    if callable(sink):
        return CallbackSink(sink)
    raise InputError(
        f"a sink must have write(row) and close() or be a callable taking a row, got {type(sink).__name__}"
    )


# ============================================================================ untouched training state
@contextmanager
def untouched_training_state(model: nn.Module) -> Any:
    """Evaluate ``model`` in eval mode, with gradients enabled, leaving no trace on the training.

    On exit every module's train/eval flag, every parameter's ``.grad`` (the same tensor object,
    with the same values) and the global RNG states of torch (CPU and the model's CUDA device),
    numpy and ``random`` are as they were on entry.
    """
    modes = [(module, module.training) for module in model.modules()]
    grads = [(p, p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
        for p, grad, values in grads:
            p.grad = grad
            if grad is not None and values is not None and not torch.equal(grad, values):
                grad.copy_(values)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


# ============================================================================ measurement data
def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_lr(lr: Any) -> float | None:
    if lr is None:
        return None
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive finite number (eta of the SPEC loss), got {lr!r}")
    return float(lr)


def _loader_length(loader: Iterable) -> int:
    dataset = getattr(loader, "dataset", None)
    if (
        dataset is not None
        and hasattr(dataset, "__len__")
        and getattr(loader, "batch_sampler", None) is not None
    ):
        sampler = loader.batch_sampler  # type: ignore[attr-defined]
        if not getattr(sampler, "drop_last", False):
            return len(dataset)
    return sum(len(batch[0]) for batch in loader)


def _pair(batch: Any, where: str) -> tuple[Tensor, Tensor]:
    if not (
        isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)
    ):
        raise InputError(f"{where} must be an (inputs, targets) pair of tensors, got {type(batch).__name__}")
    inputs, targets = batch
    if len(inputs) != len(targets):
        raise InputError(
            f"{where}: inputs have {len(inputs)} samples but targets have {len(targets)}; give one target per input"
        )
    return inputs, targets


def measurement_subset(
    data: tuple[Tensor, Tensor] | Iterable, n_measure: int | None, seed: int
) -> tuple[Tensor, Tensor, int]:
    """The fixed measurement set: (inputs, targets, size of the whole data set).

    ``data`` is an (inputs, targets) pair or a loader of such batches that does not shuffle. The
    subset is the whole set when ``n_measure`` is None and the set has at most
    ``DEFAULT_MAX_MEASURE_SAMPLES`` samples; otherwise ``n_measure`` (default that cap) samples
    drawn without replacement by a generator seeded with ``seed``, kept in data order.
    """
    inputs: Tensor | None
    targets: Tensor | None
    if isinstance(data, (tuple, list)):
        inputs, targets = _pair(data, "data")
        total = len(inputs)
    elif isinstance(data, Iterable) and not isinstance(data, Tensor):
        if isinstance(getattr(data, "sampler", None), torch.utils.data.RandomSampler):
            raise InputError(
                "the data loader shuffles (shuffle=True); give the monitor a loader built with "
                "shuffle=False, or an (inputs, targets) pair, so it measures the same samples every time"
            )
        inputs, targets = None, None
        total = _loader_length(data)
    else:
        raise InputError(
            f"data must be an (inputs, targets) pair or a loader of such batches, got {type(data).__name__}"
        )
    if total == 0:
        raise InputError("the data set is empty: the monitor needs at least one sample to measure on")
    size = min(total, DEFAULT_MAX_MEASURE_SAMPLES) if n_measure is None else n_measure
    _check_positive_int("n_measure", size)
    if size > total:
        raise InputError(
            f"n_measure={size} exceeds the {total} samples of the data; use n_measure <= {total}"
        )
    chosen = None
    if size < total:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(total, generator=generator)[:size].sort().values
    if inputs is not None and targets is not None:
        return (inputs, targets, total) if chosen is None else (inputs[chosen], targets[chosen], total)
    parts_x, parts_y, offset = [], [], 0
    for batch in data:
        x, y = _pair(batch, "each batch of the loader")
        if chosen is None:
            parts_x.append(x)
            parts_y.append(y)
        else:
            inside = chosen[(chosen >= offset) & (chosen < offset + len(x))] - offset
            parts_x.append(x[inside])
            parts_y.append(y[inside])
        offset += len(x)
    return torch.cat(parts_x), torch.cat(parts_y), total


# ============================================================================ the monitor
def _schedule(every: int | Mapping[str, int], measures: Sequence[str] | None) -> dict[str, int]:
    """{measure: period} from ``every`` (one period for all, or one per measure) and ``measures``."""
    if isinstance(measures, str):
        measures = [measures]
    if isinstance(every, Mapping):
        unknown = [m for m in every if m not in MEASURES]
        if unknown or not every:
            raise InputError(
                f"every, given per measure, must map names from {MEASURES} to periods, got {dict(every)!r}"
            )
        if measures is not None and set(measures) != set(every):
            raise InputError(
                f"every gives periods for {sorted(every)} but measures are {sorted(measures)}; "
                "give one period per measure (or omit measures)"
            )
        return {m: _check_positive_int(f"every[{m!r}]", every[m]) for m in MEASURES if m in every}
    period = _check_positive_int("every", every)
    chosen = DEFAULT_MEASURES if measures is None else measures
    unknown = [m for m in chosen if m not in MEASURES]
    if unknown or not chosen:
        raise InputError(f"measures must be a non-empty list from {MEASURES}, got {list(chosen)!r}")
    return {m: period for m in MEASURES if m in chosen}


def _process_group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class Monitor:
    """Curvature, alignment and stability of a model along a training loop the user writes.

    Args:
        model: the model being trained (its device and dtype are used; it is only read).
        data: the training set as an (inputs, targets) pair, or a loader of (inputs, targets)
            batches that does not shuffle; the measurement set is drawn from it once. Under
            torchrun every rank passes the same global data.
        loss: "mse" (SPEC.md section 1: (1/2n) sum ||f - y||^2) or "cross_entropy" (curvature only).
        every: measure when ``step % every == 0``; or a period per measure,
            ``{"lambda_max": 100, "frobenius": 500, "mu": 1000}`` (its keys are then the measures).
        lr: eta on that loss; needed for ``two_over_lr``, ``frobenius_bound`` and "stability".
            Can change at every ``step`` call (schedules).
        batch_size, sampling: B and the sampling of the training loop ("without_replacement" for
            shuffled epochs, "with_replacement" for i.i.d. batches), for p_B; B may change per call.
        out: a run folder; rows go to its ``metrics.jsonl`` (the default sink when given).
        measures: any of ``MEASURES`` (default lambda_max, frobenius, trace, mu; "stability" adds
            eta* and the growth factor, square loss and n_measure * C <= STABILITY_MAX_SAMPLE_OUTPUTS).
        sinks: more sinks (``TensorBoardSink``, ``JsonlSink``, callables taking a row).
        n_measure: size of the measurement set (see ``measurement_subset``).
        seed: the measurement set and every estimator's probes.
        num_probes: Rademacher probes for ||H||_F and tr H (one shared block), and for each of the
            two sums of the stochastic mu.
        sketch_size: NTK directions the stochastic mu deflates exactly (2 * sketch_size K-products).
        tol: relative residual at which Lanczos stops.
        warm_start: start Lanczos from the previous top eigenvector. A new top eigenvalue that
            crosses the old one is found only as fast as the Krylov space reaches its direction.
        chunk_size: samples per forward pass of the measurement.
        num_samples: n of the training set, for p_B, when ``data`` holds only the samples to
            measure on (default: the size of ``data``).
        group: the torch.distributed process group to measure with (default: the world when one
            is initialised with more than one process; see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        data: tuple[Tensor, Tensor] | Iterable,
        *,
        loss: str = "mse",
        every: int | Mapping[str, int] = 100,
        lr: float | None = None,
        batch_size: int | None = None,
        sampling: str = "without_replacement",
        out: str | Path | None = None,
        measures: Sequence[str] | None = None,
        sinks: Sequence[Sink | Callable[[Row], Any]] = (),
        n_measure: int | None = None,
        seed: int = 0,
        num_probes: int = 10,
        sketch_size: int = 10,
        tol: float = 1e-3,
        warm_start: bool = True,
        chunk_size: int = 1024,
        num_samples: int | None = None,
        group: dist.ProcessGroup | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss not in LOSSES:
            raise InputError(f"loss must be one of {LOSSES}, got {loss!r}")
        if sampling not in SAMPLINGS:
            raise InputError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.schedule = _schedule(every, measures)
        self.group = group
        self.sharded = _process_group_size(group) > 1
        if self.sharded and "stability" in self.schedule:
            del self.schedule["stability"]
            if not self.schedule:
                raise InputError(
                    "'stability' needs every sample in one process and is not measured under torchrun; "
                    "choose other measures or run in a single process"
                )
            if is_main_process(group):
                warnings.warn(
                    "'stability' (eta*, growth factor) needs every sample in one process: skipped under "
                    "torchrun; measure it in a single process",
                    UserWarning,
                    stacklevel=2,
                )
        square_only = [m for m in self.schedule if m in ("mu", "stability")]
        if square_only and loss != "mse":
            raise InputError(
                f"{square_only} are defined for square loss (SPEC.md sections 2-3); with loss={loss!r} "
                "measure lambda_max, frobenius and trace only"
            )
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise InputError(f"tol must be a relative tolerance in (0, 1), got {tol!r}")
        self.model = model
        self.loss = loss
        self.every = every if isinstance(every, int) else dict(self.schedule)
        self.lr = _check_lr(lr)
        self.batch_size = None if batch_size is None else _check_positive_int("batch_size", batch_size)
        self.sampling = sampling
        self.measures = tuple(self.schedule)
        self.seed = int(seed)
        self.num_probes = _check_positive_int("num_probes", num_probes)
        if "mu" in self.measures and self.num_probes < 2:
            raise InputError(f"num_probes must be at least 2 to give mu a standard error, got {num_probes}")
        if isinstance(sketch_size, bool) or not isinstance(sketch_size, int) or sketch_size < 0:
            raise InputError(f"sketch_size must be an integer >= 0, got {sketch_size!r}")
        self.sketch_size = sketch_size
        self.tol = float(tol)
        self.warm_start = bool(warm_start)
        self.chunk_size = _check_positive_int("chunk_size", chunk_size)
        self.inputs, self.targets, data_size = measurement_subset(data, n_measure, self.seed)
        self.num_samples = _check_positive_int("num_samples", num_samples or data_size)
        self.history: list[Row] = []
        self.total_time_s = 0.0
        self._top_vector: Tensor | None = None
        self._problem: Problem | None = None
        self._problem_key: tuple[Any, ...] = ()
        self._check_affordable()
        # Build the problem once now, so a model/target mismatch is refused before training starts.
        with untouched_training_state(model):
            self.problem()

        # Under torchrun the ranks measure together and rank 0 alone writes.
        self.sinks = [_as_sink(s) for s in sinks] if is_main_process(group) else []
        if out is not None and is_main_process(group):
            jsonl = JsonlSink(out)
            jsonl.write_config(self.config())
            self.sinks.insert(0, jsonl)

    def _check_affordable(self) -> None:
        if self.batch_size is not None and self.batch_size > self.num_samples:
            raise InputError(
                f"batch_size={self.batch_size} exceeds the {self.num_samples} training samples; "
                "give B of the training loop (and num_samples when data is only a subset)"
            )
        if "stability" not in self.measures:
            return
        if self.lr is None or self.batch_size is None:
            raise InputError(
                "the 'stability' measure needs lr and batch_size (eta and B of the training loop)"
            )
        sample_outputs = len(self.inputs) * int(np.prod(self.targets.shape[1:], dtype=np.int64))
        if sample_outputs > STABILITY_MAX_SAMPLE_OUTPUTS:
            raise InputError(
                f"'stability' eigendecomposes an nC x nC matrix: nC = {sample_outputs} on the measurement set "
                f"exceeds {STABILITY_MAX_SAMPLE_OUTPUTS}; pass a smaller n_measure or drop 'stability'"
            )

    def config(self) -> dict[str, Any]:
        """The monitor's settings, as written to ``config.json``."""
        return {
            "loss": self.loss,
            "every": self.every,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "sampling": self.sampling,
            "measures": list(self.measures),
            "n_measure": len(self.inputs),
            "num_samples": self.num_samples,
            "seed": self.seed,
            "num_probes": self.num_probes,
            "sketch_size": self.sketch_size,
            "tol": self.tol,
            "warm_start": self.warm_start,
            "world_size": _process_group_size(self.group),
        }

    def problem(self) -> Problem:
        """The measurement set as a Problem at the model's current parameters (model in eval mode).

        Built once and reused: it reads the parameters at each evaluation. It is rebuilt only when
        the model's parameter or buffer tensors were replaced (``model.to(...)``, loading a state
        dict by assignment); under torchrun it is this rank's ``ShardedProblem``.
        """
        key = tuple((id(t), t.data_ptr(), t.dtype, t.device) for t in self._model_tensors())
        if self._problem is None or key != self._problem_key:
            if self.sharded:
                self._problem = ShardedProblem.from_global(
                    self.model,
                    self.inputs,
                    self.targets,
                    loss=self.loss,
                    chunk_size=self.chunk_size,
                    group=self.group,
                )
            else:
                self._problem = Problem(
                    self.model, self.inputs, self.targets, loss=self.loss, chunk_size=self.chunk_size
                )
            self._problem_key = key
        return self._problem

    def _model_tensors(self) -> Iterable[Tensor]:
        yield from self.model.parameters()
        yield from self.model.buffers()

    # ------------------------------------------------------------------------------ loop API
    def due(self, step: int) -> tuple[str, ...]:
        """The measures scheduled at ``step``."""
        return tuple(m for m, period in self.schedule.items() if step % period == 0)

    def step(
        self, step: int, *, lr: float | None = None, batch_size: int | None = None, force: bool = False
    ) -> Row | None:
        """Measure what is scheduled at ``step`` (everything with ``force``); return the row, else None.

        Call it after the optimizer step numbered ``step`` (and with 0 before training to measure
        the start). ``lr`` and ``batch_size`` replace the current ones from now on. Under
        torchrun every rank calls it with the same arguments; every rank gets the row, rank 0
        writes it.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InputError(f"step must be an integer >= 0 (the optimizer steps taken), got {step!r}")
        if lr is not None:
            self.lr = _check_lr(lr)
        if batch_size is not None:
            self.batch_size = _check_positive_int("batch_size", batch_size)
        due = self.measures if force else self.due(step)
        if not due:
            return None
        started = time.perf_counter()
        with untouched_training_state(self.model):
            row = {"step": step, **self._measure(self.problem(), due)}
        elapsed = time.perf_counter() - started
        self.total_time_s += elapsed
        row.update(monitor_time_s=elapsed, monitor_total_time_s=self.total_time_s)
        self.history.append(row)
        for sink in self.sinks:
            sink.write(row)
        return row

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ one measurement
    def measure(self, problem: Problem | None = None) -> Row:
        """Every chosen measure at the model's current parameters, as a flat row of floats.

        On ``problem`` when given (``train(..., measure=monitor.measure)`` passes the trainer's),
        else on the measurement set; the training state is left untouched either way.
        """
        with untouched_training_state(self.model):
            return self._measure(self.problem() if problem is None else problem, self.measures)

    def _measure(self, problem: Problem, due: Sequence[str]) -> Row:
        row: Row = {}
        if self.lr is not None:
            row["lr"] = self.lr
            row["two_over_lr"] = 2 / self.lr
        if self.batch_size is not None:
            row["batch_size"] = float(self.batch_size)
        if "lambda_max" in due or any(m in due for m in _HUTCHINSON_MEASURES):
            row.update(self._curvature(problem, due))
        if "mu" in due:
            aligned = alignment(
                problem,
                method="stochastic",
                num_probes=self.num_probes,
                sketch_size=self.sketch_size,
                seed=self.seed,
            )
            # The alignment's own forward pass gives the loss: no separate one.
            row.update(measurement_loss=aligned.loss, mu=aligned.mu, mu_stderr=aligned.stderr)
            if self.lr is not None and self.batch_size is not None:
                row["frobenius_bound"] = self._frobenius_bound(aligned.mu)
        else:
            row["measurement_loss"] = problem.loss()
        if "stability" in due:
            assert self.lr is not None and self.batch_size is not None  # checked in __init__
            if self.batch_size > problem.num_samples:
                raise InputError(
                    f"batch_size={self.batch_size} exceeds the {problem.num_samples} samples measured on; "
                    "raise n_measure or drop 'stability'"
                )
            # Away from a minimum stability() warns on every call; along training that is the rule,
            # so the row says it once per measurement instead.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                result = stability(problem, lr=self.lr, batch_size=self.batch_size, sampling=self.sampling)
            row.update(
                eta_star=result.thresholds["exact"],
                growth_factor=result.growth_factor,
                at_minimum=float(not result.warnings),
            )
        return row

    def _curvature(self, problem: Problem, due: Sequence[str]) -> Row:
        """lambda_max and the due Hutchinson measures on one Hessian operator.

        Its gradient graph is built once (``cache_graph``) and serves every product of this measurement.
        """
        op = hessian(problem, cache_graph=True)
        row: Row = {}
        top_value, top_vector = None, None
        if "lambda_max" in due:
            init = self._top_vector if self.warm_start and self._top_vector is not None else None
            if init is not None and init.shape != (op.size,):
                init = None
            top = top_eigenvalues(op, k=1, tol=self.tol, seed=self.seed, init=init)
            top_value, top_vector = float(top.values[0]), top.vectors[:, 0]
            self._top_vector = top_vector.detach().clone()
            row.update(lambda_max=top_value, lambda_max_matvecs=float(top.num_matvecs))
        elif self._top_vector is not None and self._top_vector.shape == (op.size,):
            # Deflating any unit v is unbiased with theta = v^T H v: one product for the old top vector.
            top_vector = self._top_vector / self._top_vector.norm()
            top_value = float(top_vector @ (op @ top_vector[:, None])[:, 0])
        if any(m in due for m in _HUTCHINSON_MEASURES):
            row.update(self._hutchinson(op, top_value, top_vector, due))
        row["hessian_matvecs"] = float(op.num_matvecs)
        return row

    def _frobenius_bound(self, mu: float) -> float:
        """1/(eta sqrt(p_B mu)): sqrt(B/mu)/eta with replacement (Wu, Wang & Su 2022, SPEC.md section 3)."""
        assert self.lr is not None and self.batch_size is not None
        if self.batch_size > self.num_samples:
            raise InputError(
                f"batch_size={self.batch_size} exceeds the {self.num_samples} samples of the data"
            )
        noise = batch_noise_factor(self.num_samples, self.batch_size, self.sampling) * mu
        if not noise > 0:
            return math.inf if noise == 0 else math.nan
        return 1 / (self.lr * math.sqrt(noise))

    def _hutchinson(
        self, op: Any, top_value: float | None, top_vector: Tensor | None, due: Sequence[str]
    ) -> Row:
        """Tr H and ||H||_F from one block of Rademacher probes, the top Ritz pair deflated (module docstring)."""
        generator = make_generator(op, self.seed + 1, None)
        probes = rademacher(op, self.num_probes, generator)
        images = apply_in_blocks(op, probes, _PROBE_BLOCK)
        trace_offset, squared_offset = 0.0, 0.0
        if top_vector is not None and top_value is not None:
            unit = top_vector / top_vector.norm()
            images = images - top_value * unit[:, None] * (unit @ probes)[None, :]
            trace_offset, squared_offset = top_value, top_value**2
        row: Row = {}
        if "trace" in due:
            mean, stderr = mean_and_stderr((probes * images).sum(dim=0))
            row.update(hessian_trace=trace_offset + mean, hessian_trace_stderr=stderr)
        if "frobenius" in due:
            mean, stderr = mean_and_stderr(images.pow(2).sum(dim=0))
            squared = squared_offset + mean
            value = math.sqrt(max(squared, 0.0))
            row.update(
                hessian_frobenius=value, hessian_frobenius_stderr=stderr / (2 * value) if value > 0 else 0.0
            )
        return row
