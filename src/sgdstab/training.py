"""Gradient descent and SGD with a constant learning rate, as a plain loop that measures as it goes.

The update is exactly the SGD of SPEC.md section 1,

    theta <- theta - lr * (1/B) sum_{i in batch} grad l_i(theta),   l_i = 0.5 ||f(x_i) - y_i||^2

(``sgdstab.problem.per_sample_loss``; cross-entropy works the same way with its own l_i), with no
momentum, weight decay or schedule, so the stability thresholds of SPEC.md section 3 apply to it.
The one exception is ``warmup_steps``: step t (from 0) uses lr * min(1, (t + 1) / warmup_steps),
so a net that starts sharper than 2/lr can reach the constant-lr phase without blowing up
(SPEC.md section 4.1, E3); a run cannot count as converged before its warm-up is over, since a
minimum found at a smaller lr is not one the constant lr selected.

Batches (``BatchSampler``):

- ``batch_size=None``: full-batch gradient descent, the gradient summed over chunks of
  ``chunk_size`` samples. ``batch_size=n`` with "without_replacement" is the same algorithm and
  runs the same code.
- "with_replacement": every step draws B indices i.i.d. uniform on 1..n (duplicates possible),
  the sampling with mini-batch noise covariance Sigma / B.
- "without_replacement": shuffled epochs: a fresh random permutation is cut into n // B batches
  of B; the n mod B samples left at the end of a permutation are skipped for that epoch (a
  different few each epoch), so every batch is a uniform B-subset and the noise covariance is
  (n - B) / (B (n - 1)) Sigma. ``batch_size=n`` with "with_replacement" is SGD, not GD.

Stopping: the full-data loss is evaluated every ``eval_every`` steps (default: once per epoch,
n // B steps; every step for GD). At an evaluation the run stops as "converged" when the loss is
at most ``loss_goal``, or as "diverged" when it is not finite or exceeds ``divergence_factor``
times the larger of the initial loss and the loss of the zero predictor (0.5 mean ||y||^2 for
square loss, log C for cross-entropy). The second reference keeps a run that starts at a minimum
(loss near 0, as in the escape experiment E4) from being called diverged when SGD leaves it.
Otherwise it stops as "max_steps". Divergence is a result, never an exception.

Measurements: every ``measure_every`` steps (and at step 0 and at the end) the ``measure``
callables get the ``Problem`` at the current parameters and return a dict of floats that joins
that history row. Higher layers plug curvature (lambda_max, ||H||_F, tr H) and alignment (mu) in
this way, or register them by name with ``register_metric``; this module imports neither.

Checkpoints: with ``checkpoint_dir``, the parameters, the step, the sampler's RNG state and
permutation, and the history are written atomically to ``checkpoint.pt`` every
``checkpoint_every`` steps and at the end, and each history row is appended to ``metrics.jsonl``.
With ``resume=True`` a later call continues from the checkpoint, to the same parameters and
history, bit for bit, as an uninterrupted run; a finished run returns its result without
training. The row measured at the end of a run is kept apart from the history (``final``), so
stopping at ``max_steps`` and continuing leaves no extra row in the middle of the history.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sgdstab._checks import (
    SAMPLINGS,
    check_choice,
    check_int,
    check_positive_float,
    check_positive_int,
)
from sgdstab.errors import InputError, RunFolderError
from sgdstab.io import (
    METRICS_FILE,
    append_jsonl,
    atomic_write,
    load_checkpoint,
    remove_temporaries,
    write_jsonl_atomic,
)
from sgdstab.problem import Problem, per_sample_loss

FULL_BATCH = "full_batch"
STATUSES = ("converged", "diverged", "max_steps")
CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_CHECKPOINT_EVERY = 1000
_RESERVED_KEYS = ("step", "epoch", "loss", "accuracy")
# What fixes a trajectory besides the settings: a checkpoint resumes only a run that agrees on all of it.
_FINGERPRINTS = {
    "inputs": "the inputs",
    "targets": "the targets",
    "architecture": "the model's architecture (layers, activations, parameter shapes)",
    "initial_weights": "the model's initial weights",
}

Measure = Callable[[Problem], dict[str, float]]

#: Named metrics usable in ``train(measure=[...])``: name -> f(problem) -> float.
METRICS: dict[str, Callable[[Problem], float]] = {
    "grad_norm": lambda problem: problem.gradient().norm().item(),
    "param_norm": lambda problem: problem.parameters().norm().item(),
}


def register_metric(name: str, metric: Callable[[Problem], float]) -> None:
    """Make ``metric(problem) -> float`` available as ``train(measure=[name])`` (e.g. "lambda_max", "mu")."""
    if name in _RESERVED_KEYS:
        raise InputError(
            f"{name!r} is recorded by the trainer itself; register the metric under another name"
        )
    METRICS[name] = metric


# ============================================================================ sampling
class BatchSampler:
    """Mini-batch indices for SGD, one LongTensor of ``batch_size`` indices per ``next()``.

    Deterministic given ``seed`` (a local ``torch.Generator``); ``state_dict()`` captures the
    generator and the current permutation so a restored sampler continues the same sequence.
    See the module docstring for the two samplings.
    """

    def __init__(self, num_samples: int, batch_size: int, sampling: str, seed: int = 0):
        check_choice("sampling", sampling, SAMPLINGS)
        self.num_samples = num_samples
        self.batch_size = check_int("batch_size", batch_size, minimum=1, maximum=num_samples)
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed)
        self._permutation: Tensor | None = None
        self._position = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        if self.sampling == "with_replacement":
            return torch.randint(self.num_samples, (self.batch_size,), generator=self.generator)
        if self._permutation is None or self._position + self.batch_size > self.num_samples:
            self._permutation = torch.randperm(self.num_samples, generator=self.generator)
            self._position = 0
        batch = self._permutation[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "permutation": self._permutation,
            "position": self._position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._permutation = state["permutation"]
        self._position = state["position"]


# ============================================================================ result
@dataclass(frozen=True)
class TrainResult:
    """The outcome of ``train``.

    Attributes:
        status: "converged" (loss <= loss_goal), "diverged" (non-finite or blown-up loss) or
            "max_steps".
        steps: parameter updates done in total (across resumed calls).
        final_loss, final_accuracy: full-data values at the end (accuracy None for regression).
        initial_loss: full-data loss at step 0.
        history: one row per evaluation step: {"step", "epoch", "loss", ["accuracy"], measures...}.
        final: the row at the end, with the measures (none after a divergence).
        lr, batch_size (n for GD), sampling ("full_batch" for GD), seed, num_samples: the run.
        wall_time_s: seconds spent training, summed over resumed calls.
        resumed_from: the step this call started from (0 for a fresh run).
    """

    status: str
    steps: int
    final_loss: float
    final_accuracy: float | None
    initial_loss: float
    history: tuple[dict[str, float], ...]
    final: dict[str, float]
    lr: float
    batch_size: int
    sampling: str
    seed: int
    num_samples: int
    wall_time_s: float
    resumed_from: int

    @property
    def epochs(self) -> float:
        return self.steps * self.batch_size / self.num_samples

    def summary(self) -> dict[str, Any]:
        """Everything but the history, as a JSON-able dict (for ``final.json``)."""
        summary = {k: v for k, v in asdict(self).items() if k != "history"}
        summary["epochs"] = self.epochs
        return summary


# ============================================================================ helpers
def _to_model(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def _accuracy_kind(problem: Problem) -> str | None:
    """How to score accuracy: "labels" (cross-entropy), "onehot" or "pm1" targets, or None (regression)."""
    if problem.loss_name == "cross_entropy":
        return "labels"
    if len(problem.output_shape) != 1:
        return None
    onehot = pm1 = True
    for _, y in problem.chunks():
        onehot = onehot and bool(((y == 0) | (y == 1)).all() and (y.sum(dim=1) == 1).all())
        pm1 = pm1 and y.shape[1] == 1 and bool((y.abs() == 1).all())
    return "onehot" if onehot and problem.num_outputs > 1 else "pm1" if pm1 else None


def _num_correct(kind: str, outputs: Tensor, targets: Tensor) -> int:
    if kind == "labels":
        return int((outputs.argmax(dim=1) == targets).sum())
    if kind == "onehot":
        return int((outputs.argmax(dim=1) == targets.argmax(dim=1)).sum())
    return int((torch.sign(outputs) == targets).sum())


def _evaluate(model: nn.Module, problem: Problem, accuracy_kind: str | None) -> tuple[float, float | None]:
    """Full-data loss (SPEC.md section 1) and accuracy, in chunks; a non-finite loss is returned, not raised."""
    total, correct = 0.0, 0
    with torch.no_grad():
        for x, y in problem.chunks():
            outputs = model(x)
            total += per_sample_loss(problem.loss_name, outputs, y).sum().item()
            if accuracy_kind is not None:
                correct += _num_correct(accuracy_kind, outputs, y)
    n = problem.num_samples
    return total / n, (correct / n if accuracy_kind is not None else None)


def _named_metric(name: str, problem: Problem) -> dict[str, float]:
    return {name: METRICS[name](problem)}


def _resolve_measures(measure: Measure | Sequence[str | Measure] | None) -> list[Measure]:
    if measure is None:
        return []
    items = [measure] if callable(measure) else list(measure)
    resolved = []
    for item in items:
        if callable(item):
            resolved.append(item)
        elif item in METRICS:
            resolved.append(functools.partial(_named_metric, item))
        else:
            raise InputError(
                f"unknown metric {item!r}; choose from {sorted(METRICS)} or pass a callable (problem) -> dict"
            )
    return resolved


def _sgd_step(
    model: nn.Module,
    params: list[nn.Parameter],
    loss: str,
    batches: Iterable[tuple[Tensor, Tensor]],
    batch_size: int,
    lr: float,
) -> None:
    """Theta <- theta - lr * (1/B) sum_{i in batch} grad l_i, the batch given as chunks."""
    grads: list[Tensor] | None = None
    for x, y in batches:
        chunk = torch.autograd.grad(per_sample_loss(loss, model(x), y).sum(), params)
        grads = list(chunk) if grads is None else [g + c for g, c in zip(grads, chunk, strict=True)]
    if grads is None:
        return
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(g, alpha=lr / batch_size)


def fingerprint(*tensors: Tensor) -> str:
    """A short hash of the values, dtypes and shapes of ``tensors`` (the identity of data or weights)."""
    digest = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _run_identity(
    settings: dict[str, Any], model: nn.Module, inputs: Tensor, targets: Tensor
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the settings, the data and the initial model."""
    architecture = repr(model) + "".join(f"{name}{tuple(p.shape)}" for name, p in model.named_parameters())
    return {
        **settings,
        "inputs": fingerprint(inputs),
        "targets": fingerprint(targets),
        "architecture": hashlib.blake2b(architecture.encode(), digest_size=8).hexdigest(),
        "initial_weights": fingerprint(*model.state_dict().values()),
    }


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that can run training here; InputError naming it otherwise."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(
            f"device {device!r} is not a torch device; use cpu, cuda or cuda:<index>, mps"
        ) from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
    }
    if resolved.type not in available:
        raise InputError(f"device {device!r} cannot run training (only cpu, cuda and mps can)")
    if not available[resolved.type]:
        raise InputError(f"device {device!r} is not available in this torch build or machine; use device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return resolved


def check_train_arguments(
    lr: Any,
    max_steps: Any,
    loss_goal: float | None,
    sampling: str,
    divergence_factor: float = 1e3,
    warmup_steps: Any = 0,
) -> tuple[float, int, int]:
    """InputError with a one-line reason for an argument of ``train`` it cannot use (all checked here).

    Returns:
        ``(lr, max_steps, warmup_steps)`` as a Python float and ints.
    """
    lr = check_positive_float("lr", lr)
    max_steps = check_int("max_steps", max_steps, minimum=0)
    if loss_goal is not None and not loss_goal >= 0:
        raise InputError(f"loss_goal must be >= 0 or None (never stop early), got {loss_goal!r}")
    if not divergence_factor > 1:
        raise InputError(
            f"divergence_factor must be > 1 (math.inf to test only for non-finite losses), got {divergence_factor!r}"
        )
    check_choice("sampling", sampling, SAMPLINGS)
    return lr, max_steps, check_int("warmup_steps", warmup_steps, minimum=0)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The arguments of ``train`` that fix a run's trajectory and where it stops, as one value.

    ``train(model, x, y, **config.arguments())`` runs it; ``validate()`` refuses what ``train``
    would refuse, before any work. ``sgdstab.experiments.runs.TrainSpec`` adds the data, the model
    and the device to it.
    """

    lr: float
    batch_size: int | None = None
    sampling: str = "with_replacement"
    max_steps: int = 10_000
    loss_goal: float | None = 1e-4
    seed: int = 0
    eval_every: int | None = None
    measure_every: int | None = None

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``train`` (this class's fields only, not a subclass's)."""
        return {f.name: getattr(self, f.name) for f in fields(TrainConfig)}

    def validate(self) -> None:
        """InputError for a setting ``train`` cannot use (the data-dependent batch size aside)."""
        check_train_arguments(self.lr, self.max_steps, self.loss_goal, self.sampling)
        for name in ("batch_size", "eval_every", "measure_every"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))


# ============================================================================ the loop
def train(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    lr: float,
    *,
    loss: str = "mse",
    batch_size: int | None = None,
    sampling: str = "with_replacement",
    max_steps: int = 10_000,
    loss_goal: float | None = 1e-4,
    eval_every: int | None = None,
    measure: Measure | Sequence[str | Measure] | None = None,
    measure_every: int | None = None,
    seed: int = 0,
    chunk_size: int = 1024,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume: bool = True,
    divergence_factor: float = 1e3,
    progress: Callable[[dict[str, float]], None] | None = None,
    warmup_steps: int = 0,
) -> TrainResult:
    """Train ``model`` in place on (inputs, targets) by GD or SGD; see the module docstring.

    Args:
        model: trained in place: every parameter with ``requires_grad``. Its device and dtype
            are used; inputs and batches are moved to them.
        inputs: the whole training set's inputs.
        targets: its targets (as for ``Problem``).
        lr: constant learning rate eta > 0.
        loss: "mse" (SPEC.md square loss) or "cross_entropy".
        batch_size: B, or None for full-batch GD.
        sampling: "with_replacement" or "without_replacement" (ignored by GD).
        max_steps: most parameter updates, counted across resumed calls.
        loss_goal: stop as "converged" once the full-data loss is at most this (None: never).
        eval_every: steps between full-data evaluations (default one epoch: n // B, 1 for GD).
        measure: a callable ``(problem) -> dict of floats``, or a list of such callables and
            names from ``METRICS``; called at step 0, every ``measure_every`` steps and at the end.
        measure_every: steps between measurements (default ``eval_every``).
        seed: seeds the batch sampler (the model's init is the caller's).
        chunk_size: samples per forward pass, for evaluation and for large batches.
        checkpoint_dir: folder for ``checkpoint.pt`` and ``metrics.jsonl`` (a run folder).
        checkpoint_every: steps between checkpoints (one is also written at the end).
        resume: continue from ``checkpoint_dir``'s checkpoint when there is one; False starts over.
        divergence_factor: "diverged" when the loss exceeds this times max(initial loss,
            zero-predictor loss); ``math.inf`` keeps only the non-finite test.
        progress: called with each history row as it is recorded.
        warmup_steps: linear learning-rate warm-up length (0: constant lr from the first step).
    """
    lr, max_steps, warmup_steps = check_train_arguments(
        lr, max_steps, loss_goal, sampling, divergence_factor, warmup_steps
    )
    problem = Problem(model, inputs, targets, loss=loss, chunk_size=chunk_size)
    n = problem.num_samples
    if batch_size is not None:
        batch_size = check_positive_int("batch_size", batch_size)
        if batch_size > n:
            raise InputError(
                f"batch_size={batch_size} is larger than the {n} samples; use batch_size=None for full-batch GD"
            )
    full_batch = batch_size is None or (batch_size == n and sampling == "without_replacement")
    batch_size = n if batch_size is None else batch_size
    sampler = None if full_batch else BatchSampler(n, batch_size, sampling, seed)
    eval_every = check_positive_int(
        "eval_every", eval_every if eval_every is not None else max(1, n // batch_size)
    )
    measure_every = check_positive_int(
        "measure_every", measure_every if measure_every is not None else eval_every
    )
    checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)
    params = [p for p in model.parameters() if p.requires_grad]
    recorder = _Recorder(
        model, problem, _resolve_measures(measure), loss_goal, divergence_factor, batch_size, warmup_steps
    )
    run_sampling = FULL_BATCH if full_batch else sampling
    store = None
    if checkpoint_dir is not None:
        settings = {
            "lr": float(lr),
            "batch_size": batch_size,
            "sampling": run_sampling,
            "seed": seed,
            "loss": loss,
            "num_samples": n,
            "num_params": problem.num_params,
        }
        if warmup_steps:
            settings["warmup_steps"] = warmup_steps
        store = _Checkpoint(Path(checkpoint_dir), _run_identity(settings, model, inputs, targets))
    state = store.restore(model, sampler, max_steps) if store is not None and resume else None
    started = time.perf_counter()
    if state is None:
        step, history, final, previous_time = 0, [], None, 0.0
        # The reference includes the initial loss itself, so at step 0 only a non-finite loss diverges.
        row, status = recorder.record(0, True)
        initial_loss = row["loss"]
        recorder.reference = (
            max(initial_loss, problem.zero_predictor_loss()) if math.isfinite(initial_loss) else math.inf
        )
        history.append(row)
    else:
        step, history, final, status = state["step"], state["history"], state["final"], state["status"]
        initial_loss, recorder.reference, previous_time = (
            state["initial_loss"],
            state["reference"],
            state["wall_time_s"],
        )
        if status == "max_steps" and step < max_steps:
            status, final = None, None
    resumed_from = step
    if store is not None:
        store.write_metrics(history)
    if progress is not None and state is None:
        progress(history[0])

    def save(run_status: str | None) -> None:
        if store is not None:
            store.save(
                {
                    "step": step,
                    "status": run_status,
                    "model": model.state_dict(),
                    "sampler": None if sampler is None else sampler.state_dict(),
                    "history": history,
                    "final": final,
                    "initial_loss": initial_loss,
                    "reference": recorder.reference,
                    "wall_time_s": previous_time + time.perf_counter() - started,
                }
            )

    device, dtype = problem.device, problem.dtype
    while status is None and step < max_steps:
        if sampler is None:
            batches: Iterable[tuple[Tensor, Tensor]] = problem.chunks()
        else:
            index = next(sampler)
            batches = (
                (_to_model(inputs[part], device, dtype), _to_model(targets[part], device, dtype))
                for part in index.split(chunk_size)
            )
        _sgd_step(model, params, loss, batches, batch_size, lr * min(1.0, (step + 1) / max(warmup_steps, 1)))
        step += 1
        measuring = step % measure_every == 0
        if measuring or step % eval_every == 0:
            row, status = recorder.record(step, measuring)
            history.append(row)
            if store is not None:
                store.append_metrics(row)
            if progress is not None:
                progress(row)
        if status is None and step % checkpoint_every == 0:
            save(None)

    if final is None:
        last = history[-1]
        reusable = last["step"] == step and (
            step % measure_every == 0 or not recorder.measures or status == "diverged"
        )
        if reusable:
            final = last
        else:
            # The last step may fall between evaluations: its loss decides convergence or divergence too.
            final, final_status = recorder.record(step, True)
            status = status or final_status
    status = status or "max_steps"
    if state is None or step > resumed_from or status != state["status"]:
        save(status)
    return TrainResult(
        status=status,
        steps=step,
        final_loss=final["loss"],
        final_accuracy=final.get("accuracy"),
        initial_loss=initial_loss,
        history=tuple(history),
        final=final,
        lr=float(lr),
        batch_size=batch_size,
        sampling=run_sampling,
        seed=seed,
        num_samples=n,
        wall_time_s=previous_time + time.perf_counter() - started,
        resumed_from=resumed_from,
    )


class _Recorder:
    """The evaluation part of ``train``: full-data loss, accuracy and measures, and the run's verdict."""

    def __init__(
        self,
        model: nn.Module,
        problem: Problem,
        measures: list[Measure],
        loss_goal: float | None,
        divergence_factor: float,
        batch_size: int,
        warmup_steps: int = 0,
    ):
        self.model, self.problem, self.measures = model, problem, measures
        self.loss_goal, self.divergence_factor, self.batch_size = loss_goal, divergence_factor, batch_size
        self.warmup_steps = warmup_steps
        self.accuracy_kind = _accuracy_kind(problem)
        #: The loss a diverged run exceeds divergence_factor times; set once the initial loss is known.
        self.reference = math.inf

    def judge(self, loss_value: float, step: int) -> str | None:
        """The verdict on a full-data loss at ``step``: "diverged", "converged" or None (go on)."""
        if not math.isfinite(loss_value) or loss_value > self.divergence_factor * self.reference:
            return "diverged"
        if self.loss_goal is not None and loss_value <= self.loss_goal and step >= self.warmup_steps:
            return "converged"
        return None

    def record(self, step: int, with_measures: bool) -> tuple[dict[str, float], str | None]:
        """The history row at ``step`` and the verdict on its loss."""
        n = self.problem.num_samples
        loss_value, accuracy = _evaluate(self.model, self.problem, self.accuracy_kind)
        row = {"step": step, "epoch": step * self.batch_size / n, "loss": loss_value}
        if accuracy is not None:
            row["accuracy"] = accuracy
        status = self.judge(loss_value, step)
        if with_measures and status != "diverged":
            for m in self.measures:
                values = m(self.problem)
                clash = set(values) & set(_RESERVED_KEYS)
                if clash:
                    raise InputError(
                        f"a measure returned {sorted(clash)}, which the trainer records itself; rename them"
                    )
                row.update({k: float(v) for k, v in values.items()})
        return row, status


class _Checkpoint:
    """The checkpoint part of ``train``: ``checkpoint.pt`` and ``metrics.jsonl`` in a run folder.

    A checkpoint is resumed only by a run with the same identity (settings, data and initial
    model, see ``_run_identity``); anything else is refused with what differs.
    """

    def __init__(self, folder: Path, identity: dict[str, Any]):
        self.folder, self.identity = folder, identity
        self.path = folder / CHECKPOINT_FILE
        self.metrics_path = folder / METRICS_FILE

    def restore(self, model: nn.Module, sampler: BatchSampler | None, max_steps: int) -> dict | None:
        """Load model and sampler from the checkpoint and return the run's state; None when there is none."""
        # Temporaries of a killed write are garbage once a writer (this one) runs again.
        remove_temporaries(self.folder)
        if not self.path.exists():
            return None
        state = load_checkpoint(self.path)
        stored = state.get("identity", {})
        differing = [k for k, v in self.identity.items() if stored.get(k) != v]
        if differing:
            described = ", ".join(
                _FINGERPRINTS[k] + " differ"
                if k in _FINGERPRINTS
                else f"{k}: checkpoint {stored.get(k)!r}, now {self.identity[k]!r}"
                for k in differing
            )
            raise RunFolderError(
                f"the checkpoint in {self.folder} belongs to another run ({described}); "
                "use another checkpoint_dir, or pass resume=False to overwrite it"
            )
        if state["step"] > max_steps:
            raise InputError(
                f"the checkpoint in {self.folder} is at step {state['step']}, past max_steps={max_steps}; "
                "raise max_steps, or pass resume=False to start over"
            )
        model.load_state_dict(state["model"])
        if sampler is not None:
            sampler.load_state_dict(state["sampler"])
        return state

    def save(self, payload: dict[str, Any]) -> None:
        with atomic_write(self.path, "wb") as f:
            torch.save({"identity": self.identity, **payload}, f)

    def write_metrics(self, history: list[dict[str, float]]) -> None:
        write_jsonl_atomic(self.metrics_path, history)

    def append_metrics(self, row: dict[str, float]) -> None:
        append_jsonl(self.metrics_path, row)
