"""The NTK K = J J^T of Linear layers from per-layer factors, without per-sample gradients.

For a Linear layer z = W a + b inside the network, the Jacobian of output c of sample i with
respect to W is the outer product g_{i,c} a_i^T, where a_i is the layer's input on sample i and
g_{i,c} = d f_c(x_i) / d z the output's gradient at the layer's output; with respect to b it is
g_{i,c}. So the layer's share of K is

    K_l[(i,c), (j,d)] = (a_i . a_j + 1) (g_{i,c} . g_{j,d})

(the 1 only when b is a parameter in theta, the a_i . a_j only when W is): a Hadamard product
of an n x n and an nC x nC Gram matrix, (nC)^2 d_out + n^2 d_in flops instead of the
(nC)^2 d_in d_out of J_l J_l^T. This is the structure exploited for per-sample gradient norms by
Goodfellow (arXiv 1510.01799, 2015) and for the empirical NTK by Novak, Sohl-Dickstein &
Schoenholz (ICML 2022, "structured derivatives").

Which layers qualify is decided per module from one probe forward pass on one sample: an
``nn.Linear`` (the class itself, not a subclass) whose weight (and bias) are not tied to another
module, whose forward ran exactly once on a per-sample input of shape (1, d_in), and whose
parameters were consumed by no operation other than that one ``F.linear`` call (checked with a
``TorchFunctionMode``, so a weight also used directly in the model's ``forward`` is caught).
Every other parameter keeps the per-sample Jacobian path of ``sample_space``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional
from torch.overrides import TorchFunctionMode

from sgdstab.problem import Problem


@dataclass(frozen=True)
class LinearFactors:
    """One Linear layer's factors over the data: inputs (n, d_in) and output gradients (nC, d_out).

    ``weight`` / ``bias``: whether the weight / bias are coordinates of theta (a parameter subset
    may hold one without the other); each adds its term to K_l.
    """

    name: str
    inputs: Tensor
    output_gradients: Tensor
    weight: bool
    bias: bool

    def block(self, rows_a: slice, rows_b: slice, num_outputs: int) -> Tensor:
        """K_l[rows_a, rows_b] for row slices aligned to whole samples."""
        samples_a = slice(rows_a.start // num_outputs, rows_a.stop // num_outputs)
        samples_b = slice(rows_b.start // num_outputs, rows_b.stop // num_outputs)
        gradients = self.output_gradients[rows_a] @ self.output_gradients[rows_b].T
        if not self.weight:  # the bias alone: its Jacobian block is g_{i,c} itself
            return gradients
        inputs = self.inputs[samples_a] @ self.inputs[samples_b].T
        if self.bias:
            inputs = inputs + 1
        if num_outputs > 1:
            inputs = inputs.repeat_interleave(num_outputs, dim=0).repeat_interleave(num_outputs, dim=1)
        return inputs * gradients


@dataclass(frozen=True)
class _Candidate:
    name: str
    module: nn.Linear
    weight_name: str | None  # the parameter's name in theta, None when it is not in theta
    bias_name: str | None


def _candidates(problem: Problem) -> list[_Candidate]:
    """nn.Linear modules with a parameter in theta and neither parameter tied to another module."""
    owners: dict[int, int] = {}
    for _, parameter in problem.model.named_parameters(remove_duplicate=False):
        owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    in_theta = set(problem.param_names)
    found = []
    for name, module in problem.model.named_modules():
        if type(module) is not nn.Linear:
            continue
        parameters = [p for p in (module.weight, module.bias) if p is not None]
        if any(owners[id(p)] > 1 for p in parameters):
            continue
        prefix = f"{name}." if name else ""
        weight_name = f"{prefix}weight" if f"{prefix}weight" in in_theta else None
        bias_name = f"{prefix}bias" if f"{prefix}bias" in in_theta else None
        if weight_name or bias_name:
            found.append(_Candidate(name, module, weight_name, bias_name))
    return found


class _ParameterUses(TorchFunctionMode):
    """Records the torch functions that consumed a watched parameter while the model ran.

    A parameter is recognised by its memory (data pointer, shape, strides): theta's views are
    made afresh on each call, so identity cannot be used. Only calls made while the root module
    runs count (``active``), not the slicing of theta into its views before it.
    """

    def __init__(self, watched: dict[str, Tensor]):
        super().__init__()
        self.watched = {name: _memory(tensor) for name, tensor in watched.items()}
        self.uses: dict[str, list[tuple[Any, tuple[Any, ...]]]] = {name: [] for name in watched}
        self.active = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            arguments = (*args, *kwargs.values())
            for position, argument in enumerate(arguments):
                if isinstance(argument, Tensor):
                    for name, memory in self.watched.items():
                        if _memory(argument) == memory:
                            self.uses[name].append((func, (position, *arguments)))
        return func(*args, **kwargs)


def _memory(tensor: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]:
    return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


def factorable_linear_layers(problem: Problem, theta: Tensor, sample: Tensor) -> list[_Candidate]:
    """The candidates that a probe forward pass on one sample (shape (1, ...)) shows are plain
    Linear layers of that sample: called once on a (1, d_in) input, each of their parameters in
    theta consumed once, by that call's ``F.linear`` in its place (weight second, bias third).
    """
    candidates = _candidates(problem)
    if not candidates:
        return []
    views = problem.unflatten(theta)
    watched = {
        name: views[name] for c in candidates for name in (c.weight_name, c.bias_name) if name is not None
    }
    calls: dict[str, list[tuple[int, ...]]] = {c.name: [] for c in candidates}
    uses = _ParameterUses(watched)

    def start(*_: Any) -> None:
        uses.active = True

    def stop(*_: Any) -> None:
        uses.active = False

    handles = [problem.model.register_forward_pre_hook(start), problem.model.register_forward_hook(stop)]
    handles += [
        c.module.register_forward_hook(
            lambda _module, inputs, _output, name=c.name: calls[name].append(tuple(inputs[0].shape))
        )
        for c in candidates
    ]
    try:
        with torch.no_grad(), uses:
            problem.forward(theta, sample)
    finally:
        for handle in handles:
            handle.remove()
    qualified = []
    for candidate in candidates:
        shapes = calls[candidate.name]
        if len(shapes) != 1 or len(shapes[0]) != 2 or shapes[0][0] != 1:
            continue
        expected = {candidate.weight_name: 1, candidate.bias_name: 2}
        if all(
            len(uses.uses[name]) == 1
            and uses.uses[name][0][0] is functional.linear
            and uses.uses[name][0][1][0] == position
            for name, position in expected.items()
            if name is not None
        ):
            qualified.append(candidate)
    return qualified


def linear_factors(
    problem: Problem, theta: Tensor, layers: list[_Candidate], max_samples: int
) -> list[LinearFactors]:
    """Each layer's inputs a_i and output gradients g_{i,c} over the data, in data order.

    Per sample, one forward pass records every layer's input and adds a zero offset to its output;
    the Jacobian of the C outputs with respect to those offsets is the g_{i,c} (``vmap(jacrev)``
    over samples: C vector-Jacobian products of the batch, never a p-sized gradient).
    """

    def outputs_and_inputs(offsets: list[Tensor], x: Tensor) -> tuple[Tensor, list[Tensor]]:
        recorded: list[Tensor] = []
        handles = [
            layer.module.register_forward_hook(_offset_hook(offset, recorded))
            for layer, offset in zip(layers, offsets, strict=True)
        ]
        try:
            outputs = problem.forward(theta, x.unsqueeze(0))
        finally:
            for handle in handles:
                handle.remove()
        return outputs.reshape(-1), [inputs.reshape(-1) for inputs in recorded]

    per_sample = torch.func.vmap(torch.func.jacrev(outputs_and_inputs, has_aux=True), in_dims=(None, 0))
    zeros = [
        torch.zeros(layer.module.out_features, dtype=problem.dtype, device=problem.device) for layer in layers
    ]
    gradients: list[list[Tensor]] = [[] for _ in layers]
    inputs: list[list[Tensor]] = [[] for _ in layers]
    with torch.no_grad():
        for x in _sample_blocks(problem, max_samples):
            block_gradients, block_inputs = per_sample(zeros, x)
            for index in range(len(layers)):
                gradients[index].append(block_gradients[index].reshape(-1, layers[index].module.out_features))
                inputs[index].append(block_inputs[index])
    return [
        LinearFactors(
            layer.name,
            torch.cat(inputs[index]),
            torch.cat(gradients[index]),
            weight=layer.weight_name is not None,
            bias=layer.bias_name is not None,
        )
        for index, layer in enumerate(layers)
    ]


def _offset_hook(
    offset: Tensor, recorded: list[Tensor]
) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
    def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        recorded.append(inputs[0])
        return output + offset

    return hook


def _sample_blocks(problem: Problem, max_samples: int) -> Iterator[Tensor]:
    for x, _ in problem.chunks():
        for offset in range(0, len(x), max_samples):
            yield x[offset : offset + max_samples]
