"""A model, its data and its loss as a pure function of one flat parameter vector.

Square loss follows SPEC.md section 1: L(theta) = (1/(2n)) sum_i ||f(x_i) - y_i||^2, summed over
the C outputs and averaged over samples (``torch.nn.MSELoss()`` is 2/C times this). Cross-entropy
is L = (1/n) sum_i CE(f(x_i), y_i) with integer class targets. The whole data set is evaluated in
chunks of ``chunk_size`` samples so memory stays bounded whatever n.

A Problem built from a loader (``Problem.from_loader``) reads it once per pass over the data.
Every per-sample quantity (noise covariance, alignment, the NTK) pairs samples across passes, so
each pass is compared with the first by a fingerprint per batch (its size and two position-weighted
sums of its inputs and targets), and a loader whose passes differ in order, content or size is
refused with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sgdstab._checks import check_positive_int
from sgdstab.errors import DataError, InputError

LOSSES = ("mse", "cross_entropy")
_MODE_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


class ProblemError(InputError):
    """A Problem was given inputs it cannot evaluate; the message says what to change."""


class ProblemTypeError(ProblemError, TypeError):
    """Inputs or targets that are not tensors (numpy arrays, lists); also a ``TypeError``."""


BatchToXY = Callable[[Any], tuple[Tensor, Tensor]]
_Fingerprint = tuple[int, float, float, float, float]


def per_sample_loss(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Loss of each sample: 0.5 ||f - y||^2 for "mse", CE(f, y) for "cross_entropy"."""
    if loss == "mse":
        return 0.5 * (outputs - targets).pow(2).flatten(1).sum(dim=1)
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def output_hessian(loss: str, outputs: Tensor) -> Tensor | None:
    """Hessian of the per-sample loss with respect to the outputs, shape (b, C, C).

    None for "mse", where it is the identity. For cross-entropy it is diag(p) - p p^T with
    p = softmax(f) (the generalized Gauss-Newton of Schraudolph 2002).
    """
    if loss == "mse":
        return None
    probs = torch.softmax(outputs, dim=-1)
    return torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)


class Problem:
    """Model + data + loss, evaluated as a function of a flat parameter vector ``theta``.

    Args:
        model: a ``torch.nn.Module``; its device and dtype are used for everything. A model in
            training mode that contains Dropout or BatchNorm is refused (call ``model.eval()``):
            its output would not be a deterministic function of the parameters.
        inputs, targets: the whole data set, one sample per leading index. For "mse" the targets
            have the model's output shape; for "cross_entropy" they are integer class labels.
        loss: "mse" or "cross_entropy".
        chunk_size: samples per forward pass; bounds memory. It changes a number only by rounding:
            losses are summed in float64, but a float32 forward pass may round differently for
            another batch size (about 1e-7 relative).
        params: names (or name prefixes, e.g. a layer "features.0") of the parameters that form
            theta. Default: every trainable parameter, in ``model.named_parameters()`` order.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss: str = "mse",
        chunk_size: int = 1024,
        params: Sequence[str] | None = None,
    ):
        self._check_model(model)
        if loss not in LOSSES:
            raise ProblemError(f"loss must be one of {LOSSES}, got {loss!r}")
        if chunk_size < 1:
            raise ProblemError(f"chunk_size must be a positive number of samples, got {chunk_size}")
        _check_data_tensor("inputs", inputs)
        _check_data_tensor("targets", targets)
        if len(inputs) == 0:
            raise ProblemError("the data set is empty: a Problem needs at least one sample")
        if len(inputs) != len(targets):
            raise ProblemError(
                f"inputs have {len(inputs)} samples but targets have {len(targets)}; give one target per input"
            )
        self.model = model
        self.loss_name = loss
        self.chunk_size = int(chunk_size)
        self._inputs: Tensor | None = inputs
        self._targets: Tensor | None = targets
        self._loader: Iterable | None = None
        self._batch_to_xy: BatchToXY = _default_batch_to_xy
        self._fingerprints: list[_Fingerprint] | None = None
        self._select_params(params)
        self.num_samples = len(inputs)
        self._check_targets(inputs[:1], targets[:1])
        self._check_labels(targets)

    @classmethod
    def from_loader(
        cls,
        model: nn.Module,
        loader: Iterable,
        loss: str = "mse",
        params: Sequence[str] | None = None,
        *,
        batch_to_xy: BatchToXY | None = None,
        num_samples: int | None = None,
    ) -> Problem:
        """A Problem whose data is read from a loader of (inputs, targets) batches on every pass.

        The loader is iterated once per pass over the data, so only one batch is in memory at a
        time. It must yield the same samples in the same order on every pass, because per-sample
        quantities (noise covariance, alignment) pair samples across passes. So the loader is
        read twice here and refused (``ProblemError``, with the reason) when it is a one-shot
        iterator (a generator), when it shuffles (``shuffle=True``, a ``SubsetRandomSampler``, an
        iterable drawing a new order per pass: the two passes differ), or when the passes differ
        in size. Every later pass is compared with the first in the same way and raises
        ``DataError`` at the first batch that differs.

        Args:
            model: as for ``Problem``.
            loader: a re-iterable of batches: a ``DataLoader`` with ``shuffle=False``, a list.
            loss: as for ``Problem``.
            params: as for ``Problem``.
            batch_to_xy: turns one batch into ``(inputs, targets)`` tensors, for loaders whose
                batches are dicts or longer tuples, e.g. ``lambda b: (b["image"], b["label"])``.
                Default: batches must be ``(inputs, targets)`` pairs.
            num_samples: the number of samples, when known. The two passes are then skipped (only
                the first batch is read here); the first evaluation pass records the fingerprints
                and checks this count, and every later pass is compared with it, so a loader
                that changes is still refused before a second pass pairs its samples.
        """
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            raise ProblemError(
                "the loader shuffles (shuffle=True); build it with shuffle=False so every pass "
                "over the data sees the same samples in the same order"
            )
        if iter(loader) is loader:
            raise ProblemError(
                f"the loader is a one-shot iterator ({type(loader).__name__}): a Problem reads its data once "
                "per pass, so pass something that can be iterated again, such as a DataLoader or a list of batches"
            )
        to_xy = _default_batch_to_xy if batch_to_xy is None else batch_to_xy
        try:
            first_inputs, first_targets = to_xy(next(iter(loader)))
        except StopIteration:
            raise ProblemError("the loader yields no batches: a Problem needs at least one sample") from None
        problem = cls(
            model, first_inputs, first_targets, loss=loss, chunk_size=len(first_inputs), params=params
        )
        problem._loader = loader
        problem._batch_to_xy = to_xy
        problem._inputs = problem._targets = None
        if num_samples is not None:
            problem.num_samples = check_positive_int("num_samples", num_samples)
            return problem
        first = [problem._fingerprint(x, y) for x, y in problem._loader_batches()]
        second = [problem._fingerprint(x, y) for x, y in problem._loader_batches()]
        difference = _pass_difference(first, second)
        if difference:
            raise ProblemError(
                f"the loader gives different data on two passes ({difference}); a Problem pairs samples "
                "across passes, so build the loader with a fixed order (shuffle=False, a SequentialSampler)"
            )
        problem._fingerprints = first
        problem.num_samples = sum(f[0] for f in first)
        return problem

    # ----------------------------------------------------------------------------- data
    @property
    def inputs(self) -> Tensor | None:
        """The inputs as given, or None for a Problem read from a loader (iterate ``chunks()``)."""
        return self._inputs

    @property
    def targets(self) -> Tensor | None:
        """The targets as given, or None for a Problem read from a loader (iterate ``chunks()``)."""
        return self._targets

    def with_targets(self, targets: Tensor) -> Problem:
        """The same model, inputs, loss, chunking and parameter subset with other targets.

        Raises:
            ProblemError: for a Problem read from a loader, whose targets are not held here.
        """
        if self._inputs is None:
            raise ProblemError(
                "with_targets needs the inputs in memory; this Problem reads them from a loader, so build "
                "another loader with the new targets and call Problem.from_loader"
            )
        return Problem(
            self.model,
            self._inputs,
            targets,
            loss=self.loss_name,
            chunk_size=self.chunk_size,
            params=self.param_names,
        )

    def zero_predictor_loss(self) -> float:
        """L of the predictor f = 0, the scale against which a loss is large or small.

        0.5 mean ||y||^2 (accumulated in float64) for "mse"; log C for "cross_entropy" (uniform logits).
        """
        if self.loss_name == "cross_entropy":
            return math.log(self.num_outputs)
        local = sum(0.5 * y.to(torch.float64).pow(2).sum().item() for _, y in self.chunks())
        total = self.reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.device)).item()
        return total / self.num_samples

    # ----------------------------------------------------------------------------- checks
    @staticmethod
    def _check_model(model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ProblemError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if model.training:
            offending = [
                name or type(m).__name__
                for name, m in model.named_modules()
                if isinstance(m, _MODE_SENSITIVE)
            ]
            if offending:
                raise ProblemError(
                    f"the model is in training mode and has Dropout/BatchNorm layers ({', '.join(offending[:3])}); "
                    "its output is then not a deterministic function of the parameters: call model.eval() first"
                )

    def _select_params(self, params: Sequence[str] | None) -> None:
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if params is None:
            chosen = named
        else:
            if isinstance(params, str):
                params = [params]
            chosen = [(n, p) for n, p in named if any(n == s or n.startswith(s + ".") for s in params)]
            unmatched = [s for s in params if not any(n == s or n.startswith(s + ".") for n, _ in named)]
            if unmatched:
                raise ProblemError(
                    f"no trainable parameter is named or prefixed {unmatched}; "
                    f"the model's parameters are {[n for n, _ in named]}"
                )
        if not chosen:
            raise ProblemError("the model has no trainable parameters to measure")
        self._mode_sensitive = [
            (name or type(m).__name__, m)
            for name, m in self.model.named_modules()
            if isinstance(m, _MODE_SENSITIVE)
        ]
        self.param_names = [n for n, _ in chosen]
        self.param_shapes = [p.shape for _, p in chosen]
        self._param_sizes = [p.numel() for _, p in chosen]
        first = chosen[0][1]
        self.dtype = first.dtype
        self.device = first.device
        chosen_names = set(self.param_names)
        # Parameters outside the subset (and buffers) enter every call as constants.
        self._frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in chosen_names}
        self._frozen.update(dict(self.model.named_buffers()))

    def _check_labels(self, y: Tensor) -> None:
        """Cross-entropy class labels must index the model's C outputs."""
        if self.loss_name != "cross_entropy" or len(y) == 0:
            return
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.num_outputs:
            raise ProblemError(
                f"cross-entropy class labels must lie in 0..{self.num_outputs - 1} (the model has "
                f"{self.num_outputs} outputs), got labels from {low} to {high}"
            )

    def _check_mode(self) -> None:
        """Refuse to evaluate once a Dropout/BatchNorm layer was switched back to training mode."""
        switched = [name for name, module in self._mode_sensitive if module.training]
        if switched:
            raise ProblemError(
                f"the model's Dropout/BatchNorm layers ({', '.join(switched[:3])}) were switched to training "
                "mode after this Problem was built, so its outputs are no longer a deterministic function "
                "of the parameters: call model.eval() before evaluating"
            )

    def _check_targets(self, x: Tensor, y: Tensor) -> None:
        with torch.no_grad():
            out = self.forward(self.parameters(), self._to_device(x))
        y = self._to_device(y)
        if self.loss_name == "mse" and out.shape != y.shape:
            raise ProblemError(
                f"for loss='mse' targets must have the model's output shape: outputs are "
                f"{tuple(out.shape[1:])} per sample, targets are {tuple(y.shape[1:])}"
                " (one-hot encode class labels, or use loss='cross_entropy')"
            )
        if self.loss_name == "cross_entropy" and (y.ndim != 1 or y.is_floating_point() or out.ndim != 2):
            raise ProblemError(
                "for loss='cross_entropy' targets must be integer class labels of shape (n,) and "
                f"outputs logits of shape (n, C); got targets {tuple(y.shape)} {y.dtype}, outputs {tuple(out.shape)}"
            )
        self.output_shape = tuple(out.shape[1:])
        self.num_outputs = math.prod(self.output_shape)

    # ----------------------------------------------------------------------------- parameters
    @property
    def num_params(self) -> int:
        return sum(self._param_sizes)

    def parameters(self) -> Tensor:
        """The current parameters of the chosen subset as one flat, detached vector."""
        return torch.cat(
            [p.detach().reshape(-1) for n, p in self.model.named_parameters() if n in self.param_names]
        )

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into a {name: tensor} dict of the chosen parameters."""
        if theta.shape != (self.num_params,):
            raise ProblemError(
                f"theta must be a flat vector of length {self.num_params}, got shape {tuple(theta.shape)}"
            )
        pieces = torch.split(theta, self._param_sizes)
        return {
            n: piece.view(shape)
            for n, piece, shape in zip(self.param_names, pieces, self.param_shapes, strict=True)
        }

    def set_parameters(self, theta: Tensor) -> None:
        """Write a flat vector into the model's parameters (the chosen subset)."""
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for name, value in self.unflatten(theta).items():
                params[name].copy_(value)

    # ----------------------------------------------------------------------------- evaluation
    def forward(self, theta: Tensor, x: Tensor) -> Tensor:
        """Model outputs for inputs x at parameters theta (pure: the model is not modified)."""
        self._check_mode()
        return functional_call(self.model, {**self._frozen, **self.unflatten(theta)}, (x,))

    def _to_device(self, t: Tensor) -> Tensor:
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(device=self.device)

    def chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(inputs, targets) chunks covering the data set once, in a fixed order, on the model's device."""
        if self._loader is not None:
            yield from self._checked_loader_pass()
            return
        assert self._inputs is not None and self._targets is not None
        for i in range(0, len(self._inputs), self.chunk_size):
            yield (
                self._to_device(self._inputs[i : i + self.chunk_size]),
                self._to_device(self._targets[i : i + self.chunk_size]),
            )

    def _loader_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The loader's batches as (inputs, targets) on the model's device, labels checked."""
        assert self._loader is not None
        for batch in self._loader:
            x, y = self._batch_to_xy(batch)
            _check_data_tensor("a batch's inputs", x)
            _check_data_tensor("a batch's targets", y)
            x, y = self._to_device(x), self._to_device(y)
            self._check_labels(y)
            yield x, y

    def _checked_loader_pass(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the loader, each batch compared with the first pass (recorded if none)."""
        recorded, seen = self._fingerprints, []
        for index, (x, y) in enumerate(self._loader_batches()):
            fingerprint = self._fingerprint(x, y)
            if recorded is not None and (index >= len(recorded) or not _same(recorded[index], fingerprint)):
                raise DataError(
                    f"the loader changed between passes: batch {index} differs from the first pass "
                    "(order, content or size); build it with a fixed order (shuffle=False)"
                )
            seen.append(fingerprint)
            yield x, y
        if recorded is None:
            count = sum(f[0] for f in seen)
            if count != self.num_samples:
                raise DataError(
                    f"the loader gave {count} samples, but num_samples={self.num_samples} was passed to from_loader"
                )
            self._fingerprints = seen
        elif len(seen) != len(recorded):
            raise DataError(
                f"the loader changed between passes: {len(seen)} batches, the first pass had {len(recorded)}"
            )

    @staticmethod
    def _fingerprint(x: Tensor, y: Tensor) -> _Fingerprint:
        """Size plus plain and position-weighted sums of the inputs and targets of one batch.

        The weighted sums change when samples swap places, so two passes with equal fingerprints
        hold the same samples in the same order (up to coincidences of measure zero).
        """
        position = torch.arange(1, len(x) + 1, dtype=torch.float64, device=x.device)
        sums = [t.reshape(len(t), -1).to(torch.float64).sum(dim=1) for t in (x, y)]
        return (
            len(x),
            sums[0].sum().item(),
            (sums[0] * position).sum().item(),
            sums[1].sum().item(),
            (sums[1] * position).sum().item(),
        )

    def per_sample_losses(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return per_sample_loss(self.loss_name, self.forward(theta, x), y)

    def chunk_loss_sum(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Sum of the per-sample losses of one chunk; L is the sum over chunks divided by n."""
        return self.per_sample_losses(theta, x, y).sum()

    def loss(self, theta: Tensor | None = None) -> float:
        """L(theta) over the whole data set (SPEC.md section 1); theta defaults to the model's."""
        theta = self.parameters() if theta is None else theta
        with torch.no_grad():
            # Summed in float64 so the chunking changes only the forward pass's own rounding.
            local = sum(
                self.per_sample_losses(theta, x, y).to(torch.float64).sum().item() for x, y in self.chunks()
            )
        total = self.reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.device)).item()
        value = total / self.num_samples
        if not math.isfinite(value):
            raise ProblemError(
                f"the loss is not finite ({value}) at these parameters: the model has diverged or the data holds NaN/inf"
            )
        return value

    def gradient(self, theta: Tensor | None = None) -> Tensor:
        """Full-batch gradient g = (1/n) sum_i grad l_i(theta) as a flat vector."""
        theta = (self.parameters() if theta is None else theta).detach()
        total = torch.zeros_like(theta)
        for x, y in self.chunks():
            total += torch.func.grad(self.chunk_loss_sum)(theta, x, y)
        return self.reduce_sum(total) / self.num_samples

    def outputs(self, theta: Tensor | None = None) -> Tensor:
        """Model outputs on the whole data set, shape (n, *output_shape)."""
        theta = self.parameters() if theta is None else theta
        with torch.no_grad():
            return self.gather_samples(torch.cat([self.forward(theta, x) for x, _ in self.chunks()]))

    def residuals(self, theta: Tensor | None = None) -> Tensor:
        """Square-loss residuals e_i = f(x_i) - y_i, shape (n, C) (SPEC.md section 1)."""
        self.require_square_loss("residuals")
        theta = self.parameters() if theta is None else theta
        with torch.no_grad():
            local = torch.cat([(self.forward(theta, x) - y).reshape(len(x), -1) for x, y in self.chunks()])
        return self.gather_samples(local)

    # ----------------------------------------------------------------------------- data parallelism
    # Hooks through which every sum over the data passes. One process holds all of the data, so
    # they are identities here; ``sgdstab.distributed.ShardedProblem`` reduces across ranks.
    def reduce_sum(self, local: Tensor) -> Tensor:
        """The sum over all processes of a partial sum over this process's samples."""
        return local

    def gather_samples(self, local: Tensor) -> Tensor:
        """Rows of per-sample values (leading index: this process's samples) for all n samples."""
        return local

    def local_samples(self, rows: Tensor) -> Tensor:
        """The rows of this process's samples out of per-sample values for all n samples."""
        return rows

    def require_whole_data(self, what: str) -> None:
        """Refuse ``what`` (a computation that needs every sample in one process) on a shard."""

    def require_square_loss(self, what: str) -> None:
        if self.loss_name != "mse":
            raise ProblemError(
                f"{what} is defined for square loss only (SPEC.md sections 2-3: the alignment "
                f"and stability theory linearizes a square-loss minimum); this Problem uses loss={self.loss_name!r}"
            )

    def sample_function(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        """X -> f(x; theta) flattened to C outputs, for torch.func transforms over one sample."""
        return lambda x: self.forward(theta, x.unsqueeze(0)).reshape(-1)

    def check_finite(self, theta: Tensor | None = None) -> None:
        """Raise ``DataError`` naming what is not finite: parameters, inputs, targets or outputs.

        One pass over the data, without gradients.

        Every measurement calls this before it computes a spectrum, so NaN or inf data never gets
        a number or a verdict, and a diverged run is not misread as, say, a zero NTK.
        """
        theta = self.parameters() if theta is None else theta
        bad = (~torch.isfinite(theta)).sum().item()
        if bad:
            raise DataError(
                f"{bad} of the {self.num_params} parameters are NaN or inf: the weights diverged "
                "(a run that diverged has no minimum to measure); use a checkpoint from before the divergence"
            )
        frozen = [
            name
            for name, value in self._frozen.items()
            if value.is_floating_point() and not value.isfinite().all()
        ]
        if frozen:
            raise DataError(f"the model's fixed parameters or buffers {frozen[:3]} hold NaN or inf")
        start = 0
        for x, y in self.chunks():
            for what, values in (("inputs", x), ("targets", y)):
                if values.is_floating_point():
                    finite = torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
                    if not finite.all():
                        sample = start + int((~finite).nonzero()[0])
                        raise DataError(
                            f"the {what} hold NaN or inf ({int((~finite).sum())} samples of this chunk, "
                            f"the first is sample {sample}); remove or repair those samples"
                        )
            with torch.no_grad():
                outputs = self.forward(theta, x)
            finite = torch.isfinite(outputs.reshape(len(outputs), -1)).all(dim=1)
            if not finite.all():
                sample = start + int((~finite).nonzero()[0])
                raise DataError(
                    f"the model's outputs are NaN or inf (first at sample {sample}) although its inputs and "
                    "parameters are finite: the model overflows at these parameters"
                )
            start += len(x)

    def __repr__(self) -> str:
        return (
            f"Problem({type(self.model).__name__}, n={self.num_samples}, p={self.num_params}, "
            f"C={self.num_outputs}, loss={self.loss_name!r}, chunk_size={self.chunk_size})"
        )


def _check_data_tensor(name: str, value: Any) -> None:
    if not isinstance(value, Tensor):
        raise ProblemTypeError(
            f"{name} must be a torch.Tensor, got {type(value).__module__}.{type(value).__name__}; "
            "convert with torch.as_tensor(...)"
        )
    if value.ndim == 0:
        raise ProblemError(
            f"{name} is a 0-d tensor (a single number); give one sample per leading index, "
            "e.g. shape (n, d) inputs and (n, C) targets"
        )


def _default_batch_to_xy(batch: Any) -> tuple[Tensor, Tensor]:
    """An ``(inputs, targets)`` pair as it is; anything else is refused with the fix."""
    if isinstance(batch, dict):
        raise ProblemError(
            f"the loader's batches are dicts (keys {sorted(batch)}); pass "
            "Problem.from_loader(..., batch_to_xy=lambda batch: (batch[<inputs key>], batch[<targets key>]))"
        )
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    size = f"{len(batch)} entries" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
    raise ProblemError(
        f"each batch must be an (inputs, targets) pair, got {size}; pass "
        "Problem.from_loader(..., batch_to_xy=lambda batch: (inputs, targets)) to pick them out"
    )


def _same(first: _Fingerprint, second: _Fingerprint) -> bool:
    # Tight relative tolerance: the same data summed twice agrees to rounding, reordered data does not.
    return first[0] == second[0] and all(
        math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300) for a, b in zip(first[1:], second[1:], strict=True)
    )


def _pass_difference(first: list[_Fingerprint], second: list[_Fingerprint]) -> str:
    """Why two passes over a loader differ ('' when they agree)."""
    sizes = (sum(f[0] for f in first), sum(f[0] for f in second))
    if sizes[0] != sizes[1] or len(first) != len(second):
        return f"{sizes[0]} samples in {len(first)} batches, then {sizes[1]} in {len(second)}"
    for index, (a, b) in enumerate(zip(first, second, strict=True)):
        if not _same(a, b):
            return f"batch {index} holds other samples or another order"
    return ""
