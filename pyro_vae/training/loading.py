"""A trained run read back for scoring or sampling: its spec, its VAE with a checkpoint's parameters, its data."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from pyro_vae.config.spec import Spec
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.errors import UserInputError, one_line
from pyro_vae.model import VAE
from pyro_vae.training.device import resolve_device
from pyro_vae.training.run import CONFIG, Run


def _checked_state(run: Run, device: str | None, which: str) -> tuple[Spec, dict, Path, torch.device]:
    """The run's spec, its checkpoint ``which`` (read once, checked against the spec), its path, and the device."""
    spec = run.read_spec()
    state, path = run.load_checkpoint(spec, which, required=("spec", "model", "epoch"))
    if device is not None:
        spec.train.device = device
    return spec, state, path, resolve_device(spec.train.device, "--device" if device is not None else "'train.device'")


def _trained_vae(
    spec: Spec,
    state: dict,
    data_dim: int,
    image_shape: tuple[int, int, int] | None,
    run: Run,
    target: torch.device,
    num_classes: int | None = None,
) -> VAE:
    """The VAE of ``spec`` with the checkpoint's parameters, on ``target``, in eval mode."""
    vae = VAE.from_spec(spec.model, data_dim, image_shape, num_classes=num_classes)
    try:
        vae.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise UserInputError(f"the checkpoint in '{run}' does not fit its {CONFIG}: {one_line(exc, 200)}") from None
    return vae.to(target).eval()


class LoadedRun(NamedTuple):
    """A run read back for scoring: its spec, the VAE (eval mode), the data, and which checkpoint gave them."""

    spec: Spec
    vae: VAE
    data: Dataset
    checkpoint: Path
    epoch: int


def open_run(run_dir: Path | str, device: str | None = None, which: str = "best") -> LoadedRun:
    """The spec, trained VAE (eval mode) and data of a finished or interrupted run, with the checkpoint file read
    and the epoch it holds (the epochs completed, or the best epoch for ``best.pt``).

    ``which``: ``best`` reads ``best.pt`` where the run has one (a run with a
    validation split), else the last checkpoint; ``last`` always the last
    (:meth:`pyro_vae.training.run.Run.checkpoint_path`). The checkpoint is read
    once, so the epoch is that of the parameters returned even while the run trains.
    """
    run = Run(run_dir)
    spec, state, path, target = _checked_state(run, device, which)
    data = load_dataset(spec.data, spec.train.seed).to(target)
    vae = _trained_vae(spec, state, data.data_dim, data.image_shape, run, target, data.num_classes)
    return LoadedRun(spec, vae, data, path, int(state["epoch"]))


def load_run(run_dir: Path | str, device: str | None = None, which: str = "best") -> tuple[Spec, VAE, Dataset]:
    """The spec, trained VAE (eval mode) and data of a finished or interrupted run (:func:`open_run`)."""
    loaded = open_run(run_dir, device, which)
    return loaded.spec, loaded.vae, loaded.data


def load_model(
    run_dir: Path | str, device: str | None = None, which: str = "best"
) -> tuple[Spec, VAE, tuple[int, int, int] | None, Path]:
    """The spec, trained VAE (eval mode), image shape and checkpoint path of a run, without its data where it can.

    The model is built from what ``run.json`` recorded at training time
    (:meth:`pyro_vae.training.run.Run.model_inputs`); a run without that record
    loads its dataset for it. ``which`` as in :func:`open_run`.
    """
    run = Run(run_dir)
    spec, state, path, target = _checked_state(run, device, which)
    inputs = run.model_inputs()
    if inputs is None:
        data = load_dataset(spec.data, spec.train.seed)
        inputs = {"data_dim": data.data_dim, "image_shape": data.image_shape, "num_classes": data.num_classes}
    vae = _trained_vae(spec, state, inputs["data_dim"], inputs["image_shape"], run, target, inputs.get("num_classes"))
    return spec, vae, inputs["image_shape"], path
