"""The run's state: what a checkpoint holds, how it is taken and how it is put back.

A checkpoint is one dict (written atomically by :mod:`pyro_vae.training.checkpoint`
into the run folder, :class:`pyro_vae.training.run.Run`):
the spec, the parameters, Adam's moments, the schedule, every generator
(:mod:`pyro_vae.training.rng`), the loop's position (:class:`Progress`), the metrics so
far and the path ``inference.compile: auto`` chose. Restoring refuses a
checkpoint that does not fit the model, in one line (one of another spec is
refused before, :func:`pyro_vae.training.run.check_same_spec`), so a resumed run
is the interrupted one, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyro_vae.config.spec import Spec
from pyro_vae.errors import UserInputError, one_line
from pyro_vae.training.rng import rng_state, set_rng_state

#: keys every training checkpoint has (``step_path`` is optional: older checkpoints lack it)
STATE_KEYS = (
    "spec",
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "epoch",
    "step_in_epoch",
    "global_step",
    "metrics",
    "epoch_losses",
    "epoch_seconds",
    "best_validation",
    "best_epoch",
    "stopped_early",
)


@dataclass
class Progress:
    """Where training stands: completed epochs, the step reached inside the current one."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    metrics: list[dict] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    epoch_seconds: float = 0.0
    best_validation: float | None = None  # the highest validation ELBO so far, and its epoch
    best_epoch: int = 0
    stopped_early: bool = False
    start_elbo: float | None = None  # the train ELBO at the starting parameters (the run's first step), per example


def snapshot(
    spec: Spec,
    vae: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    progress: Progress,
    step_path: str | None,
) -> dict:
    """Everything a resumed run needs: spec, parameters, Adam, schedule, generators, progress, metrics, path."""
    p = progress
    return {
        "spec": spec.to_dict(),
        "model": vae.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": rng_state(),
        "epoch": p.epoch,
        "step_in_epoch": p.step_in_epoch,
        "global_step": p.global_step,
        "metrics": p.metrics,
        "epoch_losses": p.epoch_losses,
        "epoch_seconds": p.epoch_seconds,
        "best_validation": p.best_validation,
        "best_epoch": p.best_epoch,
        "stopped_early": p.stopped_early,
        "start_elbo": p.start_elbo,
        "step_path": step_path,
    }


def restore(
    state: dict, vae: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, where: Path | None
) -> tuple[Progress, str | None]:
    """Put a :func:`snapshot` of this same spec back; returns the progress and the path auto chose (or None)."""
    try:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        best, start = state["best_validation"], state.get("start_elbo")  # older checkpoints lack start_elbo
        progress = Progress(
            int(state["epoch"]),
            int(state["step_in_epoch"]),
            int(state["global_step"]),
            list(state["metrics"]),
            list(state["epoch_losses"]),
            float(state["epoch_seconds"]),
            None if best is None else float(best),
            int(state["best_epoch"]),
            bool(state["stopped_early"]),
            None if start is None else float(start),
        )
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserInputError(f"the checkpoint in '{where}' does not fit this model: {one_line(exc, 200)}") from None
    return progress, state.get("step_path")
