"""What a VAE trained with labels must show on digits, for the conditional tests of one layer and of several."""

import torch

from pyro_vae import evaluation
from pyro_vae.conditional import every_class

#: the least mean log p(x|y) − log p(x) accepted: for exact densities the gain is I(x; y) ≤ log 10 ≈ 2.3 nats, and
#: a model that ignores the label gains nothing
GAIN_NATS = 1.0
#: importance samples per test image of both log-likelihoods
NUM_SAMPLES = 50


def log_likelihoods(vae, data, labels: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x) (log p(x|y) given ``labels``) of every test image, K = NUM_SAMPLES, from seed 0."""
    torch.manual_seed(0)
    return evaluation.evaluate(vae, data.test, NUM_SAMPLES, per_example=True, labels=labels)["per_example"][
        "log_likelihood"
    ]


def assert_uses_its_label(vae, data, unconditional: torch.Tensor) -> None:
    """Class-conditional draws of class k are nearest to class k's mean training image far more often than chance
    (1 in 10), and log p(x|y) exceeds ``unconditional`` (log p(x) per test image of the same network trained
    without labels) by GAIN_NATS on average."""
    means = torch.stack([data.train[data.train_labels == k].mean(0) for k in range(10)])
    torch.manual_seed(0)
    y = every_class(10, 30)
    nearest = torch.cdist(vae.sample(len(y), y=y), means).argmin(1)
    assert (nearest == y).float().mean() > 0.5
    gain = log_likelihoods(vae, data, data.test_labels) - unconditional
    assert gain.mean() > GAIN_NATS, f"log p(x|y) − log p(x) = {gain.mean():.3f} nats"
