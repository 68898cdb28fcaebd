"""The optimizer and its learning-rate schedule, both from ``torch.optim``.

Adam acts on each parameter element separately, so one ``torch.optim.Adam``
over all the module parameters gives the same updates as Pyro's
one-optimizer-per-parameter ``pyro.optim.Adam``, with the fused kernel where
the device has one (one kernel for all parameters instead of a Python loop of
about ten small operations per parameter tensor).

Schedules (``optim.schedule.type``), stepped once per epoch:

- ``constant``: lr throughout.
- ``iwae``: Burda et al. 2016's: stage i = 0, …, 7 lasts 3^i epochs at
  lr · 10^(−i/7), 3,280 epochs in all (the last rate holds after that).
- ``plateau``: ``ReduceLROnPlateau`` on the validation ELBO (higher is
  better): the rate is multiplied by ``factor`` after ``patience`` epochs
  without improvement.
- ``cosine``: ``CosineAnnealingLR`` from lr to 0 over ``train.epochs``.

Each scheduler's ``state_dict`` goes into the checkpoint, so a resumed run
continues the schedule where it stopped.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from pyro_vae.config.spec import OptimSpec
from pyro_vae.errors import UserInputError

IWAE_STAGES = 8


def adam_options(params: list[torch.Tensor]) -> dict:
    """``fused=True`` where every parameter is a float tensor on a device with a fused Adam kernel."""
    devices = {p.device.type for p in params}
    floats = all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for p in params)
    if params and floats and len(devices) == 1 and devices <= {"cpu", "cuda"}:
        return {"fused": True}
    return {}


def adam(params: Iterable[torch.Tensor], spec: OptimSpec) -> torch.optim.Adam:
    """``torch.optim.Adam`` with ``optim.lr``, ``optim.betas`` and ``optim.eps``, fused where available."""
    betas = spec.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UserInputError(f"'optim.betas' is {betas}; accepted: two numbers in [0, 1), e.g. [0.9, 0.999]")
    params = list(params)
    options: dict[str, Any] = {"lr": spec.lr, "betas": (betas[0], betas[1]), "eps": spec.eps}
    try:
        return torch.optim.Adam(params, **options, **adam_options(params))
    except (RuntimeError, TypeError, ValueError):  # a torch without a fused kernel for this device
        return torch.optim.Adam(params, **options)


def iwae_factor(epoch: int) -> float:
    """10^(−i/7) for the stage i that ``epoch`` (0-based) falls in: stages last 1, 3, 9, …, 2187 epochs."""
    stage, end = 0, 1
    while epoch >= end and stage < IWAE_STAGES - 1:
        stage += 1
        end += 3**stage
    return 10 ** (-stage / 7)


def scheduler(optimizer: torch.optim.Optimizer, spec: OptimSpec, epochs: int):
    """The ``torch.optim.lr_scheduler`` object of ``optim.schedule``, or None for ``constant``."""
    kind = spec.schedule.type
    if kind == "constant":
        return None
    if kind == "iwae":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, iwae_factor)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=spec.schedule.factor, patience=spec.schedule.patience
    )


def step_scheduler(schedule, validation_elbo: float | None) -> None:
    """Advance the schedule by one epoch (``plateau`` reads the epoch's validation ELBO)."""
    if schedule is None:
        return
    if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
        assert validation_elbo is not None  # the spec check requires a validation split for plateau
        schedule.step(validation_elbo)
    else:
        schedule.step()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
