"""How the decoder's output bias starts (``model.decoder.init_bias``), per activation."""

import pytest
import torch

from pyro_vae.config.spec import load_spec
from pyro_vae.data import load_dataset
from pyro_vae.model import VAE, output_bias_start

TINY = [
    "data.train_size=200",
    "data.test_size=40",
    "model.encoder.hidden=[16]",
    "model.decoder.hidden=[16]",
]


def built(*overrides: str) -> tuple[VAE, torch.Tensor]:
    """The VAE of the tiny digits spec with ``overrides``, and the logit of its mean training pixel."""
    spec = load_spec(None, [*TINY, *overrides])
    data = load_dataset(spec.data)
    vae = VAE.from_spec(spec.model, data.data_dim, data.image_shape, data.train)
    return vae, torch.logit(data.train.mean(0).clamp(1e-3, 1 - 1e-3))


def both(activation: str) -> list[str]:
    return [f"model.encoder.activation={activation}", f"model.decoder.activation={activation}"]


@pytest.mark.parametrize("activation", ["relu", "softplus", "elu", "leaky_relu"])
def test_auto_starts_at_zero_where_the_mean_image_was_not_measured_better(activation):
    vae, _ = built(*both(activation))
    assert vae.decoder.output_bias.abs().max() == 0


@pytest.mark.parametrize("activation", ["tanh", "gelu", "silu", "gated"])
def test_auto_starts_at_the_mean_image_where_it_was_measured_better(activation):
    vae, mean_logit = built(*both(activation))
    assert torch.allclose(vae.decoder.output_bias, mean_logit)


@pytest.mark.parametrize("encoder,decoder", [("relu", "tanh"), ("tanh", "relu"), ("softplus", "gelu")])
def test_auto_starts_at_zero_unless_both_networks_gain_from_the_mean_image(encoder, decoder):
    vae, _ = built(f"model.encoder.activation={encoder}", f"model.decoder.activation={decoder}")
    assert vae.decoder.output_bias.abs().max() == 0


def test_the_default_network_starts_at_zero():
    assert load_spec(None).model.decoder.init_bias == "auto"
    assert output_bias_start(load_spec(None).model) == "zero"
    assert output_bias_start(load_spec("mnist", both("relu")).model) == "zero"
    assert output_bias_start(load_spec("mnist-conv").model) == "zero"
    assert output_bias_start(load_spec("mnist").model) == "data-mean"  # tanh


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_an_explicit_start_is_kept_for_every_activation(activation):
    mean_start, mean_logit = built(*both(activation), "model.decoder.init_bias=data-mean")
    zero_start, _ = built(*both(activation), "model.decoder.init_bias=zero")
    assert torch.allclose(mean_start.decoder.output_bias, mean_logit)
    assert zero_start.decoder.output_bias.abs().max() == 0
