"""The lean loop and its end-of-epoch callbacks (:mod:`pyro_vae.training.callbacks`)."""

import pytest
import sizes
import torch

from pyro_vae import training
from pyro_vae.config.spec import load_spec
from pyro_vae.training import callbacks
from pyro_vae.training.run import CHECKPOINT, Run

SMALL = [*sizes.SMALL, "inference.compile=eager", "train.pictures=none"]


class Recorder(callbacks.Callback):
    """Records what the loop calls, and where training stood then."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple] = []
        self.fail_at = fail_at

    def epoch_end(self, trainer, row):
        self.calls.append(("epoch_end", row["epoch"], trainer.progress.epoch, len(trainer.progress.metrics)))
        if row["epoch"] == self.fail_at:
            raise RuntimeError("a callback failed")

    def train_end(self, trainer):
        self.calls.append(("train_end",))

    def close(self):
        self.calls.append(("close",))


def test_each_callback_gets_every_row_once_the_epoch_counts_then_train_end_and_close():
    first, second = Recorder(), Recorder()
    trainer = training.Trainer(load_spec(None, SMALL), None, show_progress=False, callbacks=[first, second])
    metrics = trainer.fit()
    expected = [("epoch_end", 1, 1, 1), ("epoch_end", 2, 2, 2), ("train_end",), ("close",)]
    assert first.calls == second.calls == expected
    assert [row["epoch"] for row in metrics] == [1, 2]


def test_a_failing_callback_still_closes_every_callback_and_skips_train_end():
    failing, other = Recorder(fail_at=1), Recorder()
    trainer = training.Trainer(load_spec(None, SMALL), None, show_progress=False, callbacks=[failing, other])
    with pytest.raises(RuntimeError, match="a callback failed"):
        trainer.fit()
    assert failing.calls == [("epoch_end", 1, 1, 1), ("close",)]
    assert other.calls == [("close",)]


def test_without_the_checkpoint_callback_no_epoch_checkpoint_is_written(tmp_path):
    trainer = training.Trainer(load_spec(None, SMALL), Run(tmp_path), show_progress=False, callbacks=[])
    trainer.fit()
    assert not (tmp_path / CHECKPOINT).exists()
    trainer = training.Trainer(load_spec(None, SMALL), Run(tmp_path), show_progress=False)
    trainer.fit()
    assert [row["epoch"] for row in Run(tmp_path).read_metrics()] == [1, 2]


def test_the_default_list_follows_the_spec():
    plain = [type(c) for c in callbacks.default_callbacks(load_spec(None, SMALL))]
    assert plain == [
        callbacks.TensorBoard,
        callbacks.BestCheckpoint,
        callbacks.EpochLog,
        callbacks.Schedule,
        callbacks.Checkpoint,
        callbacks.Pictures,
    ]
    spec = load_spec(None, [*SMALL, "data.validation_size=20", "train.early_stopping_patience=2"])
    stopping = [c for c in callbacks.default_callbacks(spec) if isinstance(c, callbacks.EarlyStopping)]
    assert len(stopping) == 1 and stopping[0].patience == 2


def test_early_stopping_counts_epochs_since_the_best_validation_elbo():
    spec = load_spec(None, [*SMALL, "data.validation_size=20", "train.early_stopping_patience=1", "train.epochs=30"])
    trainer = training.Trainer(spec, None, show_progress=False)
    trainer.fit()
    p = trainer.progress
    assert p.stopped_early and p.epoch == p.best_epoch + 1 < 30
    rows = p.metrics
    assert max(rows, key=lambda row: row["validation_elbo"])["epoch"] == p.best_epoch


def test_callbacks_that_only_watch_change_no_number_of_the_run():
    spec = load_spec(None, SMALL)
    plain = training.Trainer(spec, None, show_progress=False)
    plain.fit()
    watched = training.Trainer(
        spec, None, show_progress=False, callbacks=[Recorder(), *callbacks.default_callbacks(spec)]
    )
    watched.fit()
    without_seconds = [
        [{k: v for k, v in row.items() if k != "seconds"} for row in t.progress.metrics] for t in (plain, watched)
    ]
    assert without_seconds[0] == without_seconds[1]
    a, b = plain.vae.state_dict(), watched.vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
