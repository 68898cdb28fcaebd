"""``inference.compile``: which path runs the training step.

Three paths give one run: ``eager`` (Pyro's effect handlers every step),
``traced`` (the step recorded once per batch shape and replayed; bit for bit
the eager step, :mod:`pyro_vae.training.compiled`) and ``inductor`` (whole
training steps, several per call, compiled by TorchInductor as one graph,
:mod:`pyro_vae.training.whole_step`; equal to eager within float and Monte Carlo
tolerance, not bit for bit). ``inductor`` runs only where the spec names it.

``auto`` chooses between the two bit-for-bit paths by one rule counted in steps::

    traced    when  steps left ≥ TRACE_AFTER_STEPS
    eager     otherwise

decided at the first step after Pyro's validated ones. Nothing is timed and no
cache is read, so a loaded machine, a cold or a warm compile cache never change
the path, and whichever it takes, the run's ``metrics.jsonl`` is the eager
run's. The log says which path was taken, and the checkpoint records it, so a
resumed run takes the same path.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Union

import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_vae.conditional import program_kwargs
from pyro_vae.infer import estimators
from pyro_vae.training import compiled

#: the steps a run must have left for ``auto`` to build the trace (a trace pays back its build over this many)
TRACE_AFTER_STEPS = 1000
#: the paths ``auto`` chooses among: those that give the eager run's numbers bit for bit
AUTO_PATHS = ("eager", "traced")


class AutoStep:
    """The training step of ``inference.compile: auto``, chosen by :meth:`choose` at the first unvalidated step.

    ``steps_left()`` is the number of steps the current run still takes (the trainer's
    horizon minus its position). ``path`` is set once chosen; given (a resumed run: the
    path its checkpoint recorded), it is kept if it is one of ``AUTO_PATHS``, else chosen
    afresh.
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
        self.elbo, self.vae, self.log, self.steps_left = elbo, vae, log, steps_left
        self.trace_after = trace_after
        self.path = path if path in AUTO_PATHS else None
        self.step: Callable = eager_step(elbo, vae)
        if self.path is not None:
            self.step = self._build(self.path)

    def __call__(
        self, x: torch.Tensor, num_data: int, kl_weight: float = 1.0, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.path is None and not is_validation_enabled():
            self.choose(max(self.steps_left(), 0))
        return self.step(x, num_data, kl_weight, y)

    def choose(self, steps_left: int) -> None:
        """Take the path of the rule (module docstring) for ``steps_left``; one log line says which and why."""
        if steps_left >= self.trace_after:
            self.path, why = "traced", f"{steps_left:,} steps left ≥ {self.trace_after:,}"
        else:
            self.path, why = "eager", f"{steps_left:,} steps left < {self.trace_after:,}"
        self.step = self._build(self.path)
        self.log.info(f"inference.compile: auto chose {self.path} ({why})")

    def _build(self, path: str) -> Callable:
        if path == "traced":
            return compiled.CompiledStep(self.elbo, self.vae, self.log, inductor=False)
        return eager_step(self.elbo, self.vae)

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
    whole: Callable[[], Any] | None = None,
    no_whole: str | None = None,
) -> Callable:
    """The trainer's ``(x, num_data, kl_weight, y) → loss`` step for an ``inference.compile`` value
    (``y``: a conditional VAE's labels, else None). ``auto`` is eager for a VAE that is not ``traceable`` (M2).

    ``auto`` (:class:`AutoStep`: eager or traced) needs ``steps_left``, and takes ``chosen``,
    the path an earlier part of the run chose, if any; ``inductor`` is the whole
    compiled step that ``whole`` builds, and where the run cannot take it
    (``whole`` None, ``no_whole`` says why) the estimator's step compiled by
    itself; ``traced`` and that compiled step are
    :class:`pyro_vae.training.compiled.CompiledStep` (Inductor falling back to the traced
    replay, and both to eager, with one log line); ``eager`` is Pyro's step.
    """
    log = log or logging.getLogger("pyro_vae")
    path = path_name(setting)
    if path == "auto" and not getattr(vae, "traceable", True):  # a program whose structure depends on values
        return eager_step(elbo, vae)
    if path == "auto":
        return AutoStep(elbo, vae, log, steps_left, chosen, TRACE_AFTER_STEPS)
    if path == "inductor" and whole is not None:
        return whole()
    if path in ("traced", "inductor"):
        if path == "inductor":
            log.info(f"inference.compile: whole steps unavailable ({no_whole}); compiling the estimator's step alone")
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
