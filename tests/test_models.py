"""Model construction: shapes for every model and activation, seeding and name errors."""

import pytest
import torch

from crsam.errors import UsageError
from crsam.models import ACTIVATIONS, AVAILABLE_MODELS, build_model, count_parameters


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("name", AVAILABLE_MODELS)
def test_forward_shape(name, activation):
    model = build_model(name, activation=activation)
    logits = model(torch.randn(7, 40))
    assert logits.shape == (7, 10)


@pytest.mark.parametrize("name", AVAILABLE_MODELS)
def test_other_sizes(name):
    model = build_model(name, num_classes=3, input_length=23)
    assert model(torch.randn(2, 23)).shape == (2, 3)


def test_mlp_layer_sizes():
    model = build_model("mlp")
    # 40 -> 100 -> 100 -> 10 with biases.
    assert count_parameters(model) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


def test_cnn1d_layer_sizes():
    model = build_model("cnn1d")
    # Three convolutions of 25 channels with kernel 5 shrink 40 to 5, then 125 -> 10.
    convolutions = (1 * 25 * 5 + 25) + 2 * (25 * 25 * 5 + 25)
    assert count_parameters(model) == convolutions + 125 * 10 + 10


@pytest.mark.parametrize("name", AVAILABLE_MODELS)
def test_seeded_initial_weights(name):
    torch.manual_seed(5)
    first = build_model(name).state_dict()
    torch.manual_seed(5)
    again = build_model(name).state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_activation_is_used():
    torch.manual_seed(0)
    relu = build_model("mlp", activation="relu")
    torch.manual_seed(0)
    tanh = build_model("mlp", activation="tanh")
    x = torch.randn(4, 40)
    assert not torch.allclose(relu(x), tanh(x))


def test_unknown_model():
    with pytest.raises(UsageError, match=r"--model 'transformer' is unknown; choose one of mlp, cnn1d"):
        build_model("transformer")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "wrn28_10", "vit"])
def test_later_models_not_available(name):
    with pytest.raises(UsageError, match=rf"--model {name} is not available yet; choose one of mlp, cnn1d"):
        build_model(name)


def test_unknown_activation():
    with pytest.raises(UsageError, match=r"--activation 'swish' is unknown; choose one of relu, gelu, tanh, softplus, silu"):
        build_model("mlp", activation="swish")


def test_even_kernel_rejected():
    with pytest.raises(ValueError, match=r"kernel_size must be a positive odd number, got 4"):
        build_model("cnn1d", kernel_size=4)
