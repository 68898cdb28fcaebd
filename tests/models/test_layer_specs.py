"""The packaged two-layer MNIST specs start with a KL warm-up, and say why."""

import pytest

from pyro_vae.config.spec import config_summary, load_spec, packaged_configs


@pytest.mark.parametrize("name", ["mnist-2layer", "mnist-ladder"])
def test_the_two_layer_mnist_specs_warm_the_kl_terms_up_over_ten_epochs(name):
    spec = load_spec(name)
    assert spec.train.kl_warmup_epochs == 10 and spec.train.beta == 1.0 and spec.train.epochs == 30
    assert "warm-up" in config_summary(packaged_configs()[name])


def test_the_two_layer_spec_is_the_one_layer_spec_s_budget_and_data():
    two, one = load_spec("mnist-2layer"), load_spec("mnist")
    assert two.data == one.data and two.optim == one.optim and two.inference == one.inference
    assert (two.model.encoder, two.model.decoder) == (one.model.encoder, one.model.decoder)
