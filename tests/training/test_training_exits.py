"""How a run ends: what a failing first step says, and the TensorBoard writer closed on every way out."""

import pytest
import sizes
import torch

from pyro_vae import training
from pyro_vae.config.spec import load_spec
from pyro_vae.errors import NonFiniteError, UserInputError
from pyro_vae.training import board

SMALL = [*sizes.SMALL, "inference.compile=eager"]


def test_invalid_distribution_parameters_in_a_validated_step_stop_like_a_nan():
    trainer = training.Trainer(load_spec(None, SMALL), None, show_progress=False)
    with torch.no_grad():
        next(trainer.vae.encoder.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="invalid distribution parameters at epoch 1, step 1"):
        trainer.fit()


def test_another_value_error_in_a_validated_step_says_what_it_is(monkeypatch):
    trainer = training.Trainer(load_spec(None, SMALL), None, show_progress=False)

    def refuse(x, num_data, kl_weight, y=None):
        raise ValueError("Expected value argument to be within the support of Bernoulli\n(more lines)")

    monkeypatch.setattr(trainer, "loss_and_grads", refuse)
    with pytest.raises(UserInputError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "within the support of Bernoulli" in message and "epoch 1, step 1" in message
    assert "non-finite" not in message and "learning rate" not in message and "\n" not in message


class RecordingWriter(board.EpochWriter):
    opened: list["RecordingWriter"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closed = False
        RecordingWriter.opened.append(self)

    def close(self) -> None:
        super().close()
        self.closed = True


@pytest.mark.parametrize("ending", [None, NonFiniteError("non-finite loss"), training.TrainingInterrupted(15)])
def test_the_tensorboard_writer_is_closed_however_the_run_ends(tmp_path, monkeypatch, ending):
    RecordingWriter.opened = []
    monkeypatch.setattr(board, "EpochWriter", RecordingWriter)
    train_epoch = training.Trainer.train_epoch

    def second_epoch_fails(self, stop):
        if self.progress.epoch == 1 and ending is not None:
            raise ending
        train_epoch(self, stop)

    monkeypatch.setattr(training.Trainer, "train_epoch", second_epoch_fails)
    spec = load_spec(None, [*SMALL, "train.tensorboard=true"])
    if ending is None:
        trainer = training.train(spec, tmp_path / "run", show_progress=False)
        assert all(getattr(callback, "writer", None) is None for callback in trainer.callbacks)
    else:
        with pytest.raises(type(ending)):
            training.train(spec, tmp_path / "run", show_progress=False)
    assert len(RecordingWriter.opened) == 1 and RecordingWriter.opened[0].closed
