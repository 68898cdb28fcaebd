"""TensorBoard logging of a run (``train.tensorboard: true``): ``tensorboard --logdir runs/``.

Each epoch writes into ``RUN/tensorboard/``, through ``torch.utils.tensorboard``,
every number of that epoch's ``metrics.jsonl`` row (ELBOs, KL weight, learning
rate, seconds) at step = epoch, and for image data a grid of 64 samples
E[x | z], z ~ p(z), and of 16 test images above their reconstructions. The
sample draws use their own generator (seeded by the run's seed), so logging
changes no random number of the training run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyro_vae.errors import UserInputError

FOLDER = "tensorboard"


def check_available() -> None:
    """One line naming the missing package, before a run folder is touched."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserInputError(
            "'train.tensorboard' is true but the tensorboard package is not installed; "
            "pip install 'pyro_vae[tensorboard]' (or set train.tensorboard: false)"
        ) from None


class EpochWriter:
    """Writes one epoch's scalars and pictures; opened lazily in ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path, seed: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / FOLDER))
        self.seed = seed

    def write(self, row: dict, vae, data) -> None:
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, epoch)
        if data.image_shape is not None:
            from torchvision.utils import make_grid

            cuda = [data.test.device.index or 0] if data.test.is_cuda else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(self.seed)
                y = None if not vae.num_classes else torch.arange(64, device=data.test.device) % vae.num_classes
                samples = vae.sample(64, y=y).reshape(-1, *data.image_shape).clamp(0, 1).cpu()
            originals = data.test[:16]
            labels = None if not vae.num_classes else data.test_labels[:16]
            recons = vae.reconstruct(originals, labels)
            pairs = torch.cat([originals, recons]).reshape(-1, *data.image_shape).clamp(0, 1).cpu()
            self.writer.add_image("samples", make_grid(samples, nrow=8, pad_value=1.0), epoch)
            self.writer.add_image("reconstructions", make_grid(pairs, nrow=16, pad_value=1.0), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
