"""``inference.compile: auto``: run the training step the way that finishes the run first.

Three paths give one run (:mod:`pyro_vae.compiled`): ``eager`` (Pyro's effect
handlers every step), ``traced`` (the step recorded once per batch shape and
replayed; bit for bit the eager step) and ``inductor`` (that record compiled by
TorchInductor; equal to float tolerance). With n steps left, an eager step of
t_e seconds, a traced one of t_t and a compiled one of t_c, building the trace
costs b and compiling it c, the run takes::

    eager     n · t_e
    traced    b + n · t_t
    inductor  b + c + n · t_c

:class:`AutoStep` times ``PROBE_STEPS`` eager steps (after Pyro's validated
first steps; the fastest of them counts, since a busy machine only slows a step
down) and takes the path with the smallest total. b, t_t / t_e, c and
t_c / t_t come from earlier runs of the same step on this machine
(:mod:`pyro_vae.compile_cache`, ``timings.json``) or, the first time, from the
prior guesses below (c: the cold compile until this step has been compiled
once, then the time of loading it from the cache); the trace, once built, is
timed too and dropped if it is not faster. The log says which path was taken and why, and the checkpoint
records it, so a resumed run takes the same path.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Callable, Union

import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_vae import compile_cache, compiled, estimators
from pyro_vae.spec import Spec

PROBE_STEPS = 5
#: prior guesses, replaced by this machine's measurements once a path has run
TRACE_BUILD_STEPS = 100        # b as a multiple of t_e (recording one step and checking it against eager)
TRACED_RATIO = 0.9             # t_t / t_e
COLD_COMPILE_SECONDS = 60.0    # c the first time on a machine (Inductor probes the CPU and compiles C++)
INDUCTOR_RATIO = 0.85          # t_c / t_t


class AutoStep:
    """The training step of ``inference.compile: auto``: eager, traced or compiled, chosen by measured cost.

    ``steps_left()`` is the number of steps the current run still takes (the trainer's
    horizon minus its position). ``key`` names the step for the timing records (spec
    and batch shape). ``path`` is set once chosen: ``eager``, ``traced`` or ``inductor``;
    given (a resumed run: the path its checkpoint recorded), nothing is measured.
    """

    def __init__(self, elbo, vae: nn.Module, log: logging.Logger, steps_left: Callable[[], int], key: str,
                 path: str | None = None):
        self.elbo, self.vae, self.log, self.steps_left, self.key = elbo, vae, log, steps_left, key
        self.path = path
        self.step = None if path in (None, "eager") else compiled.CompiledStep(elbo, vae, log, path == "inductor", key)
        self.times: dict[str, list[float]] = {"eager": [], "traced": [], "inductor": []}
        self._probing = False  # timing the first calls of self.step
        self._first = False    # the next call of self.step builds it
        self.eager = eager_step(elbo, vae)

    def __call__(self, x: torch.Tensor, num_data: int, kl_weight: float = 1.0) -> torch.Tensor:
        if self.path == "eager" or is_validation_enabled():
            return self.eager(x, num_data, kl_weight)
        if self.path is None:
            if len(self.times["eager"]) < PROBE_STEPS:
                return self._timed(self.eager, self.times["eager"], x, num_data, kl_weight)
            self._choose_trace()
            if self.path == "eager":
                return self.eager(x, num_data, kl_weight)
        if self._probing:
            return self._probe(x, num_data, kl_weight)
        return self.step(x, num_data, kl_weight)

    @property
    def mode(self) -> str:
        """The path in use (``eager`` until one is chosen)."""
        return self.step.mode if self.step is not None else "eager"

    # -- measuring and choosing -----------------------------------------------------
    def _timed(self, fn: Callable, times: list[float], x, num_data, kl_weight) -> torch.Tensor:
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda *a: None)
        sync(x.device)
        start = time.perf_counter()
        loss = fn(x, num_data, kl_weight)
        sync(x.device)
        times.append(time.perf_counter() - start)
        return loss

    def _use(self, path: str, why: str) -> None:
        self.path = path
        self.log.info(f"inference.compile: auto chose {path} ({why})")
        if path != "eager":
            self.step, self._probing = compiled.CompiledStep(self.elbo, self.vae, self.log,
                                                             inductor=path == "inductor", timing_key=self.key), True
            self._first = True
        else:
            self.step, self._probing = None, False

    def _choose_trace(self) -> None:
        """eager or traced, from t_e, the steps left and what is known of b and t_t."""
        t_e = min(self.times["eager"])
        n = max(self.steps_left(), 0)
        record = compile_cache.read_timings().get(self.key, {})
        build = record.get("trace_build_s", TRACE_BUILD_STEPS * t_e)
        saving = n * t_e * (1.0 - record.get("traced_ratio", TRACED_RATIO))
        verb = "would save" if saving <= build else "saves"
        self._use("eager" if saving <= build else "traced",
                  f"{n:,} steps left at {t_e * 1e3:.2f} ms eager; tracing ({build:.1f} s) {verb} {max(saving, 0):.1f} s")

    def _probe(self, x, num_data, kl_weight) -> torch.Tensor:
        """The first call of a new step builds it (b, and c for Inductor); the next ``PROBE_STEPS`` are timed."""
        path = self.path
        if self._first:
            self._first = False
            built: list[float] = []
            loss = self._timed(self.step, built, x, num_data, kl_weight)
            if self.step.mode == "eager":  # it cannot be traced: CompiledStep said why in the log
                self._use("eager", "the step cannot be traced")
            elif path == "inductor" and self.step.mode != "inductor":  # Inductor unavailable: said in the log
                self.path = "traced"
                self._probing = False
            elif path == "traced":  # (a compile records its own cost, pyro_vae.compiled)
                compile_cache.record_timing(self.key, {"trace_build_s": built[0]})
            return loss
        times = self.times[path]
        loss = self._timed(self.step, times, x, num_data, kl_weight)
        if len(times) == PROBE_STEPS:
            self._probing = False
            self._probed(path, min(times))
        return loss

    def _record_ratio(self, name: str, ratio: float) -> None:
        """Keep the best ratio measured for this step: a busy machine only ever slows a probe down."""
        known = compile_cache.read_timings().get(self.key, {}).get(name)
        compile_cache.record_timing(self.key, {name: ratio if known is None else min(known, ratio)})

    def _probed(self, path: str, t: float) -> None:
        """After a path's probe: record its ratio; from traced, compile where the saving repays the compile."""
        t_e = min(self.times["eager"])
        if path == "inductor":
            self._record_ratio("inductor_ratio", t / min(self.times["traced"]))
            return
        self._record_ratio("traced_ratio", t / t_e)
        if t >= t_e:
            self._use("eager", f"the traced step ({t * 1e3:.2f} ms) is not faster than eager ({t_e * 1e3:.2f} ms)")
            return
        n = max(self.steps_left(), 0)
        record = compile_cache.read_timings().get(self.key, {})
        cost = record.get("compile_s", COLD_COMPILE_SECONDS)
        saving = n * t * (1.0 - record.get("inductor_ratio", INDUCTOR_RATIO))
        if saving > cost:
            known = "cached, about" if "compile_s" in record else "estimated"
            self._use("inductor", f"{n:,} steps left at {t * 1e3:.2f} ms traced; TorchInductor ({known} "
                                  f"{cost:.0f} s to compile) saves {saving:.0f} s")


def path_name(setting: Union[bool, str]) -> str:
    """The path an ``inference.compile`` value asks for: ``true`` is ``inductor``, ``false`` is ``eager``."""
    if isinstance(setting, bool):
        return "inductor" if setting else "eager"
    return setting


def step_key(spec: Spec, batch_shape: tuple[int, ...], device: torch.device) -> str:
    """What the timing records of a step depend on: model, estimator, batch shape, device, torch and its threads."""
    tree = spec.to_dict()
    inference = {k: v for k, v in tree["inference"].items() if k != "compile"}
    what = [tree["model"], inference, list(batch_shape), device.type, torch.__version__,
            torch.get_num_threads()]
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_step(elbo, vae: nn.Module, setting: Union[bool, str], log: logging.Logger | None = None,
               steps_left: Callable[[], int] = lambda: 0, key: str = "", chosen: str | None = None) -> Callable:
    """The trainer's ``(x, num_data, kl_weight) → loss`` step for an ``inference.compile`` value.

    ``auto`` (:class:`AutoStep`) needs ``steps_left`` and ``key``, and takes ``chosen``,
    the path an earlier part of the run chose, if any; ``traced`` and
    ``inductor`` are :class:`pyro_vae.compiled.CompiledStep` (Inductor falling back to
    the traced replay, and both to eager, with one log line); ``eager`` is Pyro's step.
    """
    log = log or logging.getLogger("pyro_vae")
    path = path_name(setting)
    if path == "auto":
        return AutoStep(elbo, vae, log, steps_left, key, chosen)
    if path in ("traced", "inductor"):
        return compiled.CompiledStep(elbo, vae, log, inductor=path == "inductor", timing_key=key or None)

    return eager_step(elbo, vae)


def eager_step(elbo, vae: nn.Module) -> Callable:
    """Pyro's step: the estimator's loss and gradients through the effect handlers, every call."""
    def eager(x: torch.Tensor, num_data: int, kl_weight: float = 1.0) -> torch.Tensor:
        return estimators.bound_and_backward(elbo, vae.model, vae.guide, x, num_data=num_data, kl_weight=kl_weight)

    return eager
