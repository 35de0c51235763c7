import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sgdstab.models import MODEL_REGISTRY, build_model, model_config

# Tiny members of every family: (name, kwargs, one sample's shape).
TINY = [
    ("linear", {"input_shape": 5, "num_outputs": 2, "bias": True}, (5,)),
    ("deep_linear", {"input_shape": (1, 2, 3), "num_outputs": 3, "depth": 3, "width": 4}, (1, 2, 3)),
    ("random_features", {"input_shape": 6, "num_outputs": 2, "num_features": 16}, (6,)),
    (
        "random_features",
        {"input_shape": 6, "num_outputs": 1, "num_features": 8, "activation": "tanh", "centered": True},
        (6,),
    ),
    ("mlp", {"input_shape": 7, "num_outputs": 3, "depth": 3, "width": 8, "activation": "relu"}, (7,)),
    ("mlp", {"input_shape": (1, 4, 4), "num_outputs": 2, "width": 8}, (1, 4, 4)),
    ("vgg", {"input_shape": (3, 32, 32), "num_outputs": 10, "width": 2}, (3, 32, 32)),
    ("vgg", {"input_shape": (1, 28, 28), "num_outputs": 2, "depth": [1, 1], "width": 2}, (1, 28, 28)),
    ("resnet", {"input_shape": (3, 32, 32), "num_outputs": 10, "depth": 8, "width": 2}, (3, 32, 32)),
    (
        "resnet",
        {"input_shape": (1, 8, 8), "num_outputs": 1, "depth": [1, 2], "width": 3, "activation": "tanh"},
        (1, 8, 8),
    ),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(TINY)]


def params_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "kwargs", "sample"), TINY, ids=IDS)
def test_builds_with_output_shape_and_no_mode_dependent_layers(name, kwargs, sample):
    model = build_model(name, **kwargs)
    out = model(torch.randn(3, *sample))
    assert out.shape == (3, kwargs["num_outputs"])
    assert torch.isfinite(out).all()
    assert not any(
        isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
        for m in model.modules()
    )


@pytest.mark.parametrize(("name", "kwargs", "sample"), TINY, ids=IDS)
def test_deterministic_by_seed_and_global_rng_untouched(name, kwargs, sample):
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = params_of(build_model(name, **kwargs, seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # a different global state must not matter
    second = params_of(build_model(name, **kwargs, seed=3))
    other = params_of(build_model(name, **kwargs, seed=4))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(("name", "kwargs", "sample"), TINY, ids=IDS)
def test_config_round_trips_through_json(name, kwargs, sample):
    model = build_model(name, **kwargs, seed=5)
    config = json.loads(json.dumps(model_config(model)))
    assert config["name"] == name and config["kwargs"]["seed"] == 5
    rebuilt = build_model(config["name"], **config["kwargs"])
    assert model_config(rebuilt) == config
    x = torch.randn(2, *sample)
    assert torch.equal(model(x), rebuilt(x))


def test_registry_names_and_errors():
    assert set(MODEL_REGISTRY) >= {"linear", "deep_linear", "random_features", "mlp", "vgg", "resnet"}
    with pytest.raises(ValueError, match="unknown model 'transformer'.*'mlp'"):
        build_model("transformer", input_shape=3, num_outputs=1)
    with pytest.raises(ValueError, match="its arguments are"):
        build_model("mlp", input_shape=3, num_outputs=1, widht=4)
    with pytest.raises(ValueError, match="unknown activation"):
        build_model("mlp", input_shape=3, num_outputs=1, activation="gelu")
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        build_model("deep_linear", input_shape=3, num_outputs=1, depth=0)
    with pytest.raises(ValueError, match="channels, height, width"):
        build_model("vgg", input_shape=784, num_outputs=10)
    with pytest.raises(ValueError, match="6m\\+2"):
        build_model("resnet", input_shape=(1, 8, 8), num_outputs=1, depth=18)
    with pytest.raises(ValueError, match="VGG depth"):
        build_model("vgg", input_shape=(1, 8, 8), num_outputs=1, depth=12)
    with pytest.raises(ValueError, match="not made by"):
        model_config(nn.Linear(2, 2))


def test_linear_and_deep_linear_compute_products_of_their_weights():
    x = torch.randn(4, 5, dtype=torch.float64)
    linear = build_model("linear", input_shape=5, num_outputs=2).double()
    assert torch.allclose(linear(x), x @ linear.layers[1].weight.T)
    deep = build_model("deep_linear", input_shape=5, num_outputs=2, depth=3, width=4).double()
    weights = [m.weight for m in deep.modules() if isinstance(m, nn.Linear)]
    assert len(weights) == 3 and all(m.bias is None for m in deep.modules() if isinstance(m, nn.Linear))
    assert torch.allclose(deep(x), x @ (weights[2] @ weights[1] @ weights[0]).T)
    zero = build_model("linear", input_shape=5, num_outputs=1, init_scale=0.0)
    assert not zero(torch.randn(2, 5)).any()


def test_random_features_train_only_the_readout():
    model = build_model("random_features", input_shape=6, num_outputs=2, num_features=16, bias=True)
    assert [name for name, _ in model.named_parameters()] == ["readout.weight", "readout.bias"]
    assert "feature_weight" in dict(model.named_buffers()) and "feature_weight" in model.state_dict()
    assert model.feature_weight.shape == (16, 6) and not model.feature_weight.requires_grad


@pytest.mark.parametrize("centered", [False, True])
def test_random_relu_features_have_the_closed_form_mean(centered):
    # Averaged over many random features, phi(w^T x) with w ~ N(0, I/d) has mean ||x|| / sqrt(2 pi d);
    # centring removes exactly that.
    d, m = 4, 20000
    model = build_model(
        "random_features", input_shape=d, num_outputs=1, num_features=m, centered=centered
    ).double()
    x = torch.tensor([[3.0, 0.0, 4.0, 0.0]], dtype=torch.float64)
    expected = 0.0 if centered else 5.0 / math.sqrt(2 * math.pi * d)
    # The std of the mean over m features is below 1.5 / sqrt(m) ~ 0.011.
    assert model.features(x).mean().item() == pytest.approx(expected, abs=0.04)


def test_init_keeps_the_signal_scale_through_depth():
    x = torch.randn(256, 3, 32, 32)
    for name, kwargs in [
        ("mlp", {"depth": 6, "width": 64, "activation": "relu"}),
        ("vgg", {"depth": 11, "width": 4}),
        ("resnet", {"depth": 14, "width": 4}),
    ]:
        out = build_model(name, input_shape=(3, 32, 32), num_outputs=10, **kwargs)(x)
        assert 0.1 < out.std().item() < 10, name


def test_numpy_integer_sizes_build_the_same_model_with_a_json_config():
    model = build_model("mlp", input_shape=np.int64(3), num_outputs=np.int64(2), width=np.int32(4), seed=1)
    reference = build_model("mlp", input_shape=3, num_outputs=2, width=4, seed=1)
    x = torch.randn(5, 3)
    assert torch.equal(model(x), reference(x))
    config = model_config(model)
    assert json.loads(json.dumps(config)) == config == model_config(reference)
    with pytest.raises(ValueError, match="width must be a positive integer, got True"):
        build_model("mlp", input_shape=3, num_outputs=2, width=True)
