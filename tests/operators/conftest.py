import pytest


@pytest.fixture(params=["mlp", "cnn"])
def architecture(request):
    return request.param


@pytest.fixture(params=["mse", "cross_entropy"])
def loss_name(request):
    return request.param
