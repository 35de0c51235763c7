"""A model, its data and its loss as a pure function of one flat parameter vector.

Square loss follows SPEC.md section 1: L(theta) = (1/(2n)) sum_i ||f(x_i) - y_i||^2, summed over
the C outputs and averaged over samples (``torch.nn.MSELoss()`` is 2/C times this). Cross-entropy
is L = (1/n) sum_i CE(f(x_i), y_i) with integer class targets. The whole data set is evaluated in
chunks of ``chunk_size`` samples so memory stays bounded whatever n.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sgdstab.errors import InputError

LOSSES = ("mse", "cross_entropy")
_MODE_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


class ProblemError(InputError):
    """A Problem was given inputs it cannot evaluate; the message says what to change."""


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
        chunk_size: samples per forward pass; bounds memory, never changes the numbers.
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
        if len(inputs) == 0:
            raise ProblemError("the data set is empty: a Problem needs at least one sample")
        if len(inputs) != len(targets):
            raise ProblemError(
                f"inputs have {len(inputs)} samples but targets have {len(targets)}; give one target per input"
            )
        self.model = model
        self.loss_name = loss
        self.chunk_size = int(chunk_size)
        self._inputs = inputs
        self._targets = targets
        self._loader: Iterable | None = None
        self._select_params(params)
        self.num_samples = len(inputs)
        self._check_targets(inputs[:1], targets[:1])

    @classmethod
    def from_loader(
        cls, model: nn.Module, loader: Iterable, loss: str = "mse", params: Sequence[str] | None = None
    ) -> Problem:
        """A Problem whose data is read from a loader of (inputs, targets) batches on every pass.

        The loader is iterated once per pass over the data, so only one batch is in memory at a
        time. It must yield the same samples in the same order every time: a shuffling
        ``DataLoader`` is refused, because per-sample quantities (noise covariance, alignment)
        pair samples across passes.
        """
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            raise ProblemError(
                "the loader shuffles (shuffle=True); build it with shuffle=False so every pass "
                "over the data sees the same samples in the same order"
            )
        batches = iter(loader)
        try:
            first_inputs, first_targets = next(batches)
        except StopIteration:
            raise ProblemError("the loader yields no batches: a Problem needs at least one sample") from None
        problem = cls(
            model, first_inputs, first_targets, loss=loss, chunk_size=len(first_inputs), params=params
        )
        problem._loader = loader
        problem._inputs = problem._targets = None
        problem.num_samples = sum(len(x) for x, _ in loader)
        return problem

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
        return {n: piece.view(shape) for n, piece, shape in zip(self.param_names, pieces, self.param_shapes)}

    def set_parameters(self, theta: Tensor) -> None:
        """Write a flat vector into the model's parameters (the chosen subset)."""
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for name, value in self.unflatten(theta).items():
                params[name].copy_(value)

    # ----------------------------------------------------------------------------- evaluation
    def forward(self, theta: Tensor, x: Tensor) -> Tensor:
        """Model outputs for inputs x at parameters theta (pure: the model is not modified)."""
        return functional_call(self.model, {**self._frozen, **self.unflatten(theta)}, (x,))

    def _to_device(self, t: Tensor) -> Tensor:
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(device=self.device)

    def chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(inputs, targets) chunks covering the data set once, in a fixed order, on the model's device."""
        if self._loader is not None:
            source: Iterable = self._loader
        else:
            source = (
                (self._inputs[i : i + self.chunk_size], self._targets[i : i + self.chunk_size])
                for i in range(0, len(self._inputs), self.chunk_size)
            )
        for x, y in source:
            yield self._to_device(x), self._to_device(y)

    def per_sample_losses(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return per_sample_loss(self.loss_name, self.forward(theta, x), y)

    def chunk_loss_sum(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Sum of the per-sample losses of one chunk; L is the sum over chunks divided by n."""
        return self.per_sample_losses(theta, x, y).sum()

    def loss(self, theta: Tensor | None = None) -> float:
        """L(theta) over the whole data set (SPEC.md section 1); theta defaults to the model's."""
        theta = self.parameters() if theta is None else theta
        with torch.no_grad():
            local = sum(self.chunk_loss_sum(theta, x, y).item() for x, y in self.chunks())
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

    def __repr__(self) -> str:
        return (
            f"Problem({type(self.model).__name__}, n={self.num_samples}, p={self.num_params}, "
            f"C={self.num_outputs}, loss={self.loss_name!r}, chunk_size={self.chunk_size})"
        )
