"""A run's training trajectory depends on its spec's training keys only.

- The end-of-epoch evaluation draws from its own generator: the test split's
  size and ``train.eval_num_samples`` change no parameter and no ``train_elbo``.
"""

import pytest
import sizes
import torch

from pyro_vae import training
from pyro_vae.config.spec import load_spec

SMALL = [*sizes.SMALL, "inference.compile=eager"]


def trained(*overrides: str) -> training.Trainer:
    trainer = training.Trainer(load_spec(None, [*SMALL, *overrides]), None, show_progress=False)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("other", [["data.test_size=64"], ["train.eval_num_samples=3"]])
def test_evaluating_each_epoch_leaves_the_training_trajectory_alone(other):
    reference, changed = trained(), trained(*other)
    assert [r["train_elbo"] for r in reference.progress.metrics] == [r["train_elbo"] for r in changed.progress.metrics]
    before, after = reference.vae.state_dict(), changed.vae.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
