"""The model families of the paper's experiments, built by name from a JSON-able config.

``build_model(name, **kwargs)`` looks the family up in ``MODEL_REGISTRY``, fills in the defaults
and records the full ``{"name", "kwargs"}`` on the module, so ``build_model(**model_config(m))``
rebuilds the same model with the same initial parameters. Families (SPEC.md section 4, E1):

- ``linear``: f(x) = W x (+ b).
- ``deep_linear``: f(x) = W_L ... W_1 x, no activations (provable alignment, SPEC.md section 2).
- ``random_features``: f(x) = a^T phi(W x) with W fixed (a buffer, not a parameter), a trained.
- ``mlp``: fully connected network with tanh or ReLU.
- ``vgg``: VGG-style CNN (Simonyan & Zisserman 2015) without BatchNorm.
- ``resnet``: ResNet-style CNN (He et al. 2016) without BatchNorm.

Conventions shared by every family:

- ``input_shape``: the shape of one sample, e.g. ``(3, 32, 32)``; fully connected families also
  take a plain int (the number of features) and flatten any input shape.
- ``num_outputs``: C, the width of the output ``(batch, C)``.
- ``seed``: every weight is drawn from a local ``torch.Generator`` seeded with it, so the same
  seed gives the same parameters whatever the global RNG state, which is left untouched.
  Draws are made in float64 and then cast, so a float32 and a float64 model of one seed agree
  to float32 rounding.
- Initialisation: weights ~ N(0, (init_scale * gain)^2 / fan_in), biases zero, with gain from
  ``torch.nn.init.calculate_gain`` (1 for linear layers and the output layer, sqrt(2) for ReLU,
  5/3 for tanh): the variance-preserving scalings of LeCun et al. (1998) and He et al. (2015).
- No BatchNorm and no Dropout anywhere: the output is a deterministic function of the
  parameters, which every curvature and noise computation of this package assumes.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sgdstab._checks import check_positive_int
from sgdstab.errors import InputError

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}

#: Convolutions per stage of the standard VGG configurations (Simonyan & Zisserman 2015, table 1).
VGG_STAGES: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}


def vgg_stages(depth: int) -> tuple[int, ...]:
    """Convolutions per stage of VGG-``depth``."""
    if depth not in VGG_STAGES:
        raise InputError(
            f"an integer VGG depth must be one of {sorted(VGG_STAGES)}, got {depth}; "
            "or pass depth as a list of convolutions per stage, e.g. [1, 1]"
        )
    return VGG_STAGES[depth]


def resnet_stages(depth: int) -> tuple[int, ...]:
    """Residual blocks per stage of the CIFAR ResNets of He et al. (2016): depth = 6m + 2, 3 stages of m blocks."""
    if depth < 8 or (depth - 2) % 6:
        raise InputError(
            f"an integer ResNet depth must be 6m+2 with m >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}; "
            "or pass depth as a list of residual blocks per stage, e.g. [2, 2]"
        )
    return (((depth - 2) // 6),) * 3


MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

_CONFIG_ATTR = "sgdstab_config"


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a builder ``f(**kwargs) -> nn.Module`` to ``MODEL_REGISTRY`` under ``name``.

    The builder must take keyword arguments that JSON can hold (numbers, strings, lists), so a
    run's config names the model completely.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODEL_REGISTRY:
            raise InputError(f"a model family named {name!r} is already registered; pick another name")
        MODEL_REGISTRY[name] = builder
        return builder

    return decorate


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model family ``name`` with ``kwargs``; see the module docstring for the families.

    The returned module carries its complete config (defaults filled in), read back with
    ``model_config``. The global torch RNG is not advanced.
    """
    if name not in MODEL_REGISTRY:
        raise InputError(f"unknown model {name!r}; choose one of {sorted(MODEL_REGISTRY)}")
    builder = MODEL_REGISTRY[name]
    signature = inspect.signature(builder)
    try:
        bound = signature.bind(**kwargs)
    except TypeError as err:
        raise InputError(f"model {name!r}: {err}; its arguments are {list(signature.parameters)}") from None
    bound.apply_defaults()
    # Layer constructors draw their default init from the global RNG; fork it so building a
    # model never changes the random numbers the caller sees next (all weights are redrawn below).
    with torch.random.fork_rng(devices=[]):
        model = builder(**bound.arguments)
    setattr(model, _CONFIG_ATTR, {"name": name, "kwargs": _jsonable(bound.arguments)})
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """``{"name": ..., "kwargs": {...}}`` of a model made by ``build_model``; ``build_model(**cfg)`` rebuilds it.

    The config describes the model as built (its initial parameters), not its trained state.
    """
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None:
        raise InputError(
            f"this {type(model).__name__} was not made by sgdstab.models.build_model, so it has no config"
        )
    return copy.deepcopy(config)


def _jsonable(value: Any) -> Any:
    """Tuples become lists and numpy scalars Python numbers, so a config equals its own JSON round trip."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------- checks
def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise InputError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _sizes(name: str, value: int | Sequence[int]) -> tuple[int, ...]:
    """One size or a sequence of sizes as a tuple of Python ints >= 1."""
    entries = [value] if isinstance(value, (int, np.integer)) else list(value)
    return tuple(check_positive_int(name, entry) for entry in entries)


def _flat_size(input_shape: int | Sequence[int]) -> int:
    return math.prod(_sizes("every entry of input_shape", input_shape))


def _image_shape(input_shape: int | Sequence[int]) -> tuple[int, int, int]:
    shape = _sizes("every entry of input_shape", input_shape)
    if len(shape) != 3:
        raise InputError(
            f"a CNN needs input_shape = (channels, height, width), e.g. (3, 32, 32); got {input_shape!r}"
        )
    return shape[0], shape[1], shape[2]


def _stages(
    depth: int | Sequence[int], table: Callable[[int], tuple[int, ...]], what: str
) -> tuple[int, ...]:
    stages = table(int(depth)) if isinstance(depth, (int, np.integer)) else _sizes(f"{what} per stage", depth)
    if not stages:
        raise InputError(f"depth needs at least one stage of {what}")
    return stages


# --------------------------------------------------------------------------------------- init
def _initialize(
    model: nn.Module, seed: int, init_scale: float, gain: float, scaled: dict[nn.Module, float] | None = None
) -> None:
    """Redraw every Linear/Conv2d weight from N(0, (init_scale * g)^2 / fan_in); zero the biases.

    ``g`` is ``gain`` for hidden layers and 1 for the last layer (the output has no activation
    after it); ``scaled`` multiplies the std of chosen layers (the ResNet branch rescaling).
    """
    if init_scale < 0 or not math.isfinite(init_scale):
        raise InputError(f"init_scale must be a finite number >= 0, got {init_scale!r}")
    generator = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for index, layer in enumerate(layers):
            fan_in = layer.weight[0].numel()
            layer_gain = 1.0 if index == len(layers) - 1 else gain
            std = init_scale * layer_gain * (scaled or {}).get(layer, 1.0) / math.sqrt(fan_in)
            draw = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
            layer.weight.copy_(draw * std)
            if layer.bias is not None:
                layer.bias.zero_()


def _gain(activation: str | None) -> float:
    return nn.init.calculate_gain("linear" if activation is None else activation)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- fully connected
class FullyConnected(nn.Module):
    """Flatten, then ``depth`` linear layers with the activation between them (none after the last).

    ``activation=None`` gives a (deep) linear network. ``depth`` counts weight matrices, so
    depth 1 is the linear model f = W x.
    """

    def __init__(
        self,
        input_shape: int | Sequence[int],
        num_outputs: int,
        depth: int,
        width: int,
        activation: str | None,
        bias: bool,
    ):
        super().__init__()
        in_features = _flat_size(input_shape)
        check_positive_int("num_outputs", num_outputs)
        check_positive_int("depth", depth)
        check_positive_int("width", width)
        sizes = [in_features] + [width] * (depth - 1) + [num_outputs]
        layers: list[nn.Module] = [nn.Flatten()]
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            if index > 0 and activation is not None:
                layers.append(_activation(activation)())
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


@register_model("linear")
def _linear(
    input_shape: int | Sequence[int],
    num_outputs: int,
    bias: bool = False,
    init_scale: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """f(x) = W x (+ b). ``init_scale=0`` starts at W = 0."""
    model = FullyConnected(input_shape, num_outputs, depth=1, width=1, activation=None, bias=bias)
    _initialize(model, seed, init_scale, _gain(None))
    return model


@register_model("deep_linear")
def _deep_linear(
    input_shape: int | Sequence[int],
    num_outputs: int,
    depth: int = 3,
    width: int = 32,
    bias: bool = False,
    init_scale: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """f(x) = W_depth ... W_1 x with hidden widths ``width`` and no activations."""
    model = FullyConnected(input_shape, num_outputs, depth=depth, width=width, activation=None, bias=bias)
    _initialize(model, seed, init_scale, _gain(None))
    return model


@register_model("mlp")
def _mlp(
    input_shape: int | Sequence[int],
    num_outputs: int,
    depth: int = 2,
    width: int = 128,
    activation: str = "tanh",
    bias: bool = True,
    init_scale: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """Fully connected network: ``depth`` linear layers (``depth - 1`` hidden layers of ``width``)."""
    _activation(activation)
    model = FullyConnected(
        input_shape, num_outputs, depth=depth, width=width, activation=activation, bias=bias
    )
    _initialize(model, seed, init_scale, _gain(activation))
    return model


# --------------------------------------------------------------------------------------- random features
class RandomFeatures(nn.Module):
    """f(x) = a^T phi(W x) (+ b) with W fixed: only the readout ``a`` (and ``b``) is trained.

    W (``num_features x d``, entries N(0, 1/d), so each pre-activation w^T x has variance
    ||x||^2 / d) is a buffer, so it is saved in ``state_dict`` but is not a parameter: the model
    is linear in its parameters, the second provable case of SPEC.md section 2.

    ``centered=True`` subtracts the mean of each feature over the draw of W,
    E_w[phi(w^T x)] = ||x|| / sqrt(2 pi d) for ReLU and 0 for tanh (odd), computed in closed
    form per sample. Un-centred ReLU features share a large common mean, which puts one dominant
    eigenvalue in the feature covariance and weakens the alignment lower bound (SPEC.md section 2).
    """

    feature_weight: Tensor  # a buffer: fixed, not trained

    def __init__(
        self,
        input_shape: int | Sequence[int],
        num_outputs: int,
        num_features: int,
        activation: str,
        centered: bool,
        bias: bool,
        seed: int,
    ):
        super().__init__()
        self.in_features = _flat_size(input_shape)
        check_positive_int("num_outputs", num_outputs)
        check_positive_int("num_features", num_features)
        self.activation = _activation(activation)()
        self.activation_name = activation
        self.centered = centered
        generator = torch.Generator().manual_seed(seed)
        feature_weight = torch.randn(num_features, self.in_features, generator=generator, dtype=torch.float64)
        feature_weight = feature_weight / math.sqrt(self.in_features)
        self.register_buffer("feature_weight", feature_weight.to(torch.get_default_dtype()))
        self.readout = nn.Linear(num_features, num_outputs, bias=bias)

    def features(self, x: Tensor) -> Tensor:
        """phi(W x), centred if asked, shape (batch, num_features)."""
        x = x.flatten(1)
        features = self.activation(x @ self.feature_weight.T)
        if self.centered and self.activation_name == "relu":
            features = features - x.norm(dim=1, keepdim=True) / math.sqrt(2 * math.pi * self.in_features)
        return features

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.features(x))


@register_model("random_features")
def _random_features(
    input_shape: int | Sequence[int],
    num_outputs: int,
    num_features: int = 256,
    activation: str = "relu",
    centered: bool = False,
    bias: bool = False,
    init_scale: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """Random feature model; ``num_features`` is its width.

    W is drawn from ``seed`` and the readout from ``seed + 1``, separate streams so the readout
    init does not depend on how many feature weights came before it.
    """
    model = RandomFeatures(input_shape, num_outputs, num_features, activation, centered, bias, seed)
    _initialize(model, seed + 1, init_scale, _gain(None))
    return model


# --------------------------------------------------------------------------------------- CNNs
def _conv(
    in_channels: int, out_channels: int, bias: bool, stride: int = 1, kernel_size: int = 3
) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias
    )


def _stage_channels(width: int, stage: int) -> int:
    return width * min(2**stage, 8)


class VGG(nn.Module):
    """VGG-style CNN (the CIFAR variant of VGG: one classifier layer instead of three).

    Stages of 3x3 convolutions + activation, each stage ending in a 2x2 max-pool while the
    feature map is at least 2x2, then global average pooling and one linear layer to the outputs.
    Stages that run on a 1x1 map (small inputs, deep configurations) use 1x1 convolutions.

    Stage k has ``width * min(2^k, 8)`` channels; width 64 gives the original 64-128-256-512-512.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        stages: Sequence[int],
        width: int,
        activation: str,
        bias: bool,
    ):
        super().__init__()
        channels, height, width_px = _image_shape(input_shape)
        check_positive_int("num_outputs", num_outputs)
        check_positive_int("width", width)
        act = _activation(activation)
        layers: list[nn.Module] = []
        size = min(height, width_px)
        for stage, convs in enumerate(stages):
            out_channels = _stage_channels(width, stage)
            for _ in range(convs):
                # On a 1x1 map a padded 3x3 kernel only uses its centre tap: a 1x1 kernel is the
                # same function without dead parameters, and fan_in then matches the real inputs.
                kernel_size = 3 if size > 1 else 1
                layers += [_conv(channels, out_channels, bias, kernel_size=kernel_size), act()]
                channels = out_channels
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_outputs, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("vgg")
def _vgg(
    input_shape: Sequence[int],
    num_outputs: int,
    depth: int | Sequence[int] = 11,
    width: int = 16,
    activation: str = "relu",
    bias: bool = True,
    init_scale: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """VGG-``depth`` (11, 13, 16 or 19), or ``depth`` = a list of convolutions per stage, e.g. [1, 1]."""
    model = VGG(input_shape, num_outputs, _stages(depth, vgg_stages, "convolutions"), width, activation, bias)
    _initialize(model, seed, init_scale, _gain(activation))
    return model


class ResidualBlock(nn.Module):
    """out = act(shortcut(x) + conv(act(conv(x)))).

    The shortcut is the identity, or a strided 1x1 convolution where the block changes resolution
    or channels.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, activation: type[nn.Module], bias: bool
    ):
        super().__init__()
        self.branch = nn.Sequential(
            _conv(in_channels, out_channels, bias, stride=stride),
            activation(),
            _conv(out_channels, out_channels, bias),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else _conv(in_channels, out_channels, bias, stride=stride, kernel_size=1)
        )
        self.activation = activation()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.shortcut(x) + self.branch(x))


class ResNet(nn.Module):
    """ResNet-style CNN without BatchNorm.

    A 3x3 stem, stages of residual blocks (stage k has ``width * min(2^k, 8)`` channels and halves the resolution at its first block, k > 0), global
    average pooling and a linear output layer.

    Without BatchNorm the sum of L residual branches would grow the signal with depth, so the
    last convolution of every branch starts with its std scaled by L^(-1/2), the rescaling of
    Fixup (Zhang, Dauphin & Ma, ICLR 2019) for two-layer branches.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        stages: Sequence[int],
        width: int,
        activation: str,
        bias: bool,
    ):
        super().__init__()
        channels = _image_shape(input_shape)[0]
        check_positive_int("num_outputs", num_outputs)
        check_positive_int("width", width)
        act = _activation(activation)
        self.stem = nn.Sequential(_conv(channels, width, bias), act())
        blocks: list[nn.Module] = []
        channels = width
        for stage, count in enumerate(stages):
            out_channels = _stage_channels(width, stage)
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(ResidualBlock(channels, out_channels, stride, act, bias))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_outputs, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1))


@register_model("resnet")
def _resnet(
    input_shape: Sequence[int],
    num_outputs: int,
    depth: int | Sequence[int] = 20,
    width: int = 16,
    activation: str = "relu",
    bias: bool = True,
    init_scale: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """ResNet-``depth`` with depth = 6m + 2 (3 stages of m blocks), or ``depth`` = a list of blocks per stage."""
    model = ResNet(
        input_shape, num_outputs, _stages(depth, resnet_stages, "residual blocks"), width, activation, bias
    )
    branch_scale = len(model.blocks) ** -0.5
    _initialize(
        model,
        seed,
        init_scale,
        _gain(activation),
        scaled={block.branch[-1]: branch_scale for block in model.blocks if isinstance(block, ResidualBlock)},
    )
    return model
