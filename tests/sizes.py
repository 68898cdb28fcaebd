"""Spec overrides several test files share: a run small enough to take a second or two."""

#: 96 training and 32 test digits, batches of 20, 16-unit networks, 2 epochs
SMALL = [
    "data.train_size=96",
    "data.test_size=32",
    "data.batch_size=20",
    "model.encoder.hidden=[16]",
    "model.decoder.hidden=[16]",
    "train.epochs=2",
]
