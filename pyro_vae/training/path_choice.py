"""``inference.compile``: which path runs the training step.

Three paths give one run (:mod:`pyro_vae.training.compiled`): ``eager`` (Pyro's effect
handlers every step), ``traced`` (the step recorded once per batch shape and
replayed; bit for bit the eager step) and ``inductor`` (that record compiled by
TorchInductor; equal to float tolerance, so only where the spec asks for it).

``auto`` chooses among the bit-for-bit paths only, by one rule counted in steps:
building the trace costs a fixed amount of work (the recording and its check
against eager), and every replayed step saves a part of an eager step's Python,
so the trace pays once enough steps are left::

    traced   when  steps left ≥ TRACE_AFTER_STEPS  (at the first step after Pyro's validated ones)
    eager    otherwise

Both paths give the same bits, so a run's results never depend on the choice;
nothing is timed and nothing outside the run is read. The log says which path
was taken, and the checkpoint records it, so a resumed run takes the same path.
"""

from __future__ import annotations

import logging
from typing import Callable, Union

import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_vae.conditional import program_kwargs
from pyro_vae.infer import estimators
from pyro_vae.training import compiled

#: the steps a run must have left for ``auto`` to build the trace (a trace pays back its build over this many)
TRACE_AFTER_STEPS = 1000


class AutoStep:
    """The training step of ``inference.compile: auto``: ``traced`` when ``steps_left()`` ≥ ``trace_after``, else eager.

    ``steps_left()`` is the number of steps the current run still takes (the trainer's
    horizon minus its position), asked once, at the first step Pyro does not validate.
    ``path`` is set once chosen: ``eager`` or ``traced``; given (a resumed run: the path
    its checkpoint recorded), it is kept (any other recorded path is chosen afresh).
    """

    def __init__(
        self,
        elbo,
        vae: nn.Module,
        log: logging.Logger,
        steps_left: Callable[[], int],
        path: str | None = None,
        trace_after: int = TRACE_AFTER_STEPS,
    ):
        self.elbo, self.vae, self.log, self.steps_left, self.trace_after = elbo, vae, log, steps_left, trace_after
        self.path = path if path in ("eager", "traced") else None  # a checkpoint's other path: chosen afresh
        self.eager = eager_step(elbo, vae)
        self.step = compiled.CompiledStep(elbo, vae, log, inductor=False) if path == "traced" else self.eager

    def __call__(
        self, x: torch.Tensor, num_data: int, kl_weight: float = 1.0, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.path is None and not is_validation_enabled():
            self.choose(max(self.steps_left(), 0))
        return self.step(x, num_data, kl_weight, y)

    def choose(self, steps_left: int) -> None:
        """Take ``traced`` when ``steps_left`` ≥ ``trace_after``, else ``eager``; one log line says which and why."""
        traced = steps_left >= self.trace_after
        self.path = "traced" if traced else "eager"
        if traced:
            self.step = compiled.CompiledStep(self.elbo, self.vae, self.log, inductor=False)
        relation = "≥" if traced else "<"
        self.log.info(
            f"inference.compile: auto chose {self.path} ({steps_left:,} steps left {relation} "
            f"{self.trace_after:,}; both paths give the same bits)"
        )

    @property
    def mode(self) -> str:
        """The path in use (``eager`` until one is chosen, and where the trace could not be built)."""
        return getattr(self.step, "mode", "eager")


def path_name(setting: Union[bool, str]) -> str:
    """The path an ``inference.compile`` value asks for: ``true`` is ``inductor``, ``false`` is ``eager``."""
    if isinstance(setting, bool):
        return "inductor" if setting else "eager"
    return setting


def build_step(
    elbo,
    vae: nn.Module,
    setting: Union[bool, str],
    log: logging.Logger | None = None,
    steps_left: Callable[[], int] = lambda: 0,
    chosen: str | None = None,
) -> Callable:
    """The trainer's ``(x, num_data, kl_weight, y) → loss`` step for an ``inference.compile`` value
    (``y``: a conditional VAE's labels, else None). ``auto`` is eager for a VAE that is not ``traceable`` (M2).

    ``auto`` (:class:`AutoStep`) needs ``steps_left``, and takes ``chosen``, the
    path an earlier part of the run chose, if any; ``traced`` and ``inductor`` are
    :class:`pyro_vae.training.compiled.CompiledStep` (Inductor falling back to the traced
    replay, and both to eager, with one log line); ``eager`` is Pyro's step.
    """
    log = log or logging.getLogger("pyro_vae")
    path = path_name(setting)
    if path == "auto" and not getattr(vae, "traceable", True):  # a program whose structure depends on values
        return eager_step(elbo, vae)
    if path == "auto":
        return AutoStep(elbo, vae, log, steps_left, chosen, trace_after=TRACE_AFTER_STEPS)
    if path in ("traced", "inductor"):
        return compiled.CompiledStep(elbo, vae, log, inductor=path == "inductor")
    return eager_step(elbo, vae)


def eager_step(elbo, vae: nn.Module) -> Callable:
    """Pyro's step: the estimator's loss and gradients through the effect handlers, every call.

    β is passed as :class:`pyro_vae.training.compiled.KLWeight` passes it to the traced step
    (0 and 1 as numbers, any other value as a float32 tensor), so both round it alike.
    """
    beta = compiled.KLWeight()

    def eager(x: torch.Tensor, num_data: int, kl_weight: float = 1.0, y: torch.Tensor | None = None) -> torch.Tensor:
        return estimators.bound_and_backward(
            elbo, vae.model, vae.guide, x, num_data=num_data, kl_weight=beta(kl_weight, x.device), **program_kwargs(y)
        )

    return eager
