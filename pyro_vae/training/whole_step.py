"""``inference.compile: inductor``: whole training steps, several per call, as one TorchInductor graph.

The traced path (:mod:`pyro_vae.training.compiled`) records the estimator's loss
and its gradients from the Pyro model and guide; everything around it (the
minibatch gather, the binarization draws, the optimizer) still runs as separate
PyTorch calls every step. This path records all of it, for ``S`` consecutive
full batches, as one function of the in-memory training tensor::

    for s in 0, …, S−1:
        x     = train[index[s]]                         the minibatch, gathered inside the graph
        x     = 1[u < x],  u ~ U(0, 1)                  dynamic binarization (P(x = 1) = intensity)
        loss, g = the traced Pyro step on x, β[s]        model and guide log weights, their gradients
        t     ← t + 1
        m     ← β₁ m + (1 − β₁) g
        v     ← β₂ v + (1 − β₂) g²
        θ     ← θ − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)      Adam, lr a tensor input
                                                        (on a CPU, m and v below the smallest normal float set to 0)

and compiles it with TorchInductor. Parameters and Adam's state are *the*
tensors of the VAE and of the run's ``torch.optim.Adam`` (updated in place), so
checkpoints, resumes, schedules (the rate is read from the optimizer each call)
and the per-step path all see one state. The Pyro program stays the source of
the graph: only its record is compiled.

The binarization draws ``u < x`` (the same Bernoulli distribution as the eager
path's ``torch.bernoulli``, another stream of draws), and Inductor reorders
float sums, so a run on this path equals the eager run within Monte Carlo and
float tolerance, not bit for bit. Each compiled graph is checked once, when
built, against the same record run uncompiled from the same generator state
(losses and parameters within ``RTOL``); a graph that fails the check or
cannot be compiled leaves the run on the traced step with one log line.

Steps outside full batches of ``S`` (Pyro's validated first steps, an epoch's
last partial batch, a tail of fewer than ``S`` full batches, a KL weight
reaching or leaving 1 inside a call) run on the traced step and the optimizer.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import pyro
import torch
from torch import nn

from pyro_vae.conditional import labels_for
from pyro_vae.errors import one_line
from pyro_vae.training import compile_cache, compiled, denormals, rng

#: steps per compiled call, S: a loop of S steps unrolled in one graph pays the per-call costs once per S steps,
#: but Inductor's compile grows with the unrolled graph faster than the per-call saving (docs/speed.md), so 1
STEPS_PER_CALL = 1
#: compiled against uncompiled record of the same draws: losses and parameters, relative
RTOL = 1e-4


def offer(
    elbo, vae: nn.Module, optimizer: torch.optim.Adam, data, spec, distributed: bool, device: torch.device, log
) -> tuple[Callable[[], "WholeStep"] | None, str | None]:
    """(a builder of the run's :class:`WholeStep`, None), or (None, why this run cannot take it).

    Decided from the spec, the device and the installation alone (:func:`unsupported`,
    :func:`inductor_available`): never from a timing or a cache.
    """
    labelled = labels_for(vae, data.train_labels) is not None
    missing = unsupported(spec, labelled, distributed) or inductor_available(device)
    if missing is not None:
        return None, missing
    return (lambda: WholeStep(elbo, vae, optimizer, data.train, data.binarize, log)), None


def unsupported(spec, labelled: bool, distributed: bool) -> str | None:
    """Why the whole step cannot train ``spec`` (the part of the run it would not see), or None."""
    if distributed:
        return "data-parallel training all-reduces gradients between the backward pass and Adam"
    if labelled:
        return "a conditional VAE's labels are not gathered inside the graph"
    if spec.optim.clip_norm is not None:
        return "optim.clip_norm rescales gradients between the backward pass and Adam"
    return None


def inductor_available(device: torch.device) -> str | None:
    """Why TorchInductor cannot compile for ``device`` on this machine (no C++ compiler, no Triton), or None.

    A property of the machine's installation, the same on every call: never a timing.
    """
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as exc:  # torch raises its own error types when no compiler is found
            return f"no C++ compiler ({type(exc).__name__})"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    return f"TorchInductor does not compile for {device.type}"


def adam_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    lr: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """One Adam step in place, ``torch.optim.Adam``'s formula with tensor step counts and rate::

    t ← t + 1; m ← flush(β₁ m + (1 − β₁) g); v ← flush(β₂ v + (1 − β₂) g²)
    θ ← θ − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

    ``flush``, on a CPU, sets a moment below the smallest normal float to 0: what the flush-to-zero mode of
    the training steps (:mod:`pyro_vae.training.denormals`) does on the calling thread, here written into the
    graph, so that the share of every intra-op thread is flushed, not the calling thread's alone. On another
    device it is the identity, as the steps there run without the mode.
    """
    beta1, beta2 = betas
    for param, grad, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t.add_(1)
        tiny = torch.finfo(m.dtype).tiny
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if m.device.type == "cpu":
            m.masked_fill_(m.abs() < tiny, 0)
            v.masked_fill_(v < tiny, 0)
        step_size = lr / (1 - beta1**t)
        denom = (v.sqrt() / (1 - beta2**t).sqrt()).add_(eps)
        param.sub_(step_size * m / denom)


def largest_entry(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |g| over every gradient tensor (the trainer's non-finite guard)."""
    return torch.stack([g.abs().amax() for g in grads]).amax()


class WholeStep:
    """S training steps per call as one compiled graph; the traced step (``single``) for every other step.

    ``train``: the training tensor in memory on the device; ``binarize``: the
    dataset's ``data.binarize`` (``dynamic`` draws ``u < x`` in the graph);
    ``optimizer``: the run's ``torch.optim.Adam`` over the VAE's parameters,
    whose state the first (validated, per-step) steps create.
    """

    def __init__(
        self,
        elbo,
        vae: nn.Module,
        optimizer: torch.optim.Adam,
        train: torch.Tensor,
        binarize: str,
        log: logging.Logger | None = None,
        steps_per_call: int | None = None,
    ):
        self.vae, self.optimizer, self.train, self.binarize = vae, optimizer, train, binarize
        self.log = log or logging.getLogger("pyro_vae")
        self.steps_per_call = STEPS_PER_CALL if steps_per_call is None else steps_per_call
        self.single = compiled.CompiledStep(elbo, vae, self.log, inductor=False)
        self.graphs: dict[tuple, Callable] = {}
        self.failed: str | None = None
        self.compile_seconds: float | None = None
        self._lr: tuple[float, torch.Tensor] | None = None  # (value, the held tensor)
        self._betas: tuple[list[float], torch.Tensor] | None = None

    @property
    def whole(self) -> "WholeStep":
        """This step (the trainer asks a step for its whole compiled step; the other paths have none)."""
        return self

    @property
    def mode(self) -> str:
        """``inductor`` once a whole-step graph runs; else the single step's mode."""
        return "inductor" if self.graphs and self.failed is None else self.single.mode

    def __call__(
        self, x: torch.Tensor, num_data: int, kl_weight: float = 1.0, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One step the per-step way (traced; eager while Pyro validates): gradients in ``.grad``, the loss."""
        return self.single(x, num_data, kl_weight, y)

    def takes(self, full_batches_left: int, betas: Sequence[float]) -> int:
        """How many steps the next call takes: ``S`` where ``S`` full batches are left and ``betas`` (the KL
        weights of those steps) are all 1 or all strictly between 0 and 1; else 0 (take one step the per-step way)."""
        if self.failed is not None or full_batches_left < self.steps_per_call:
            return 0
        kinds = {compiled.beta_kind(b) for b in betas[: self.steps_per_call]}
        return self.steps_per_call if len(kinds) == 1 and kinds != {"zero"} else 0

    def steps(self, index: torch.Tensor, num_data: int, betas: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """``len(index)`` steps on the batches ``train[index[s]]``; returns each step's loss and largest |gradient|.

        Parameters and the optimizer's state are updated in place; Pyro's validation
        is off (the validated first steps are per-step). Where the graph cannot be
        built, the steps are taken the per-step way (same results within
        tolerance) and later calls are refused by :meth:`takes`.
        """
        with pyro.validation_enabled(False):
            return self._steps(index, num_data, betas)

    def _steps(self, index: torch.Tensor, num_data: int, betas: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        count, batch = index.shape
        kind = compiled.beta_kind(betas[0])
        key = (count, batch, num_data, kind)
        lr, beta_tensor = self._rate(), self._kl_weights(betas, index.device)
        inputs = self._inputs()
        if key not in self.graphs:
            built = self._build(key, inputs, lr, index, beta_tensor, betas)
            if built is None:
                return self._per_step(index, num_data, betas)
            self.graphs[key], result = built
            return result
        return self.graphs[key](*inputs, lr, self.train, index, beta_tensor)

    # -- inputs -------------------------------------------------------------------
    def _inputs(self) -> tuple[list[torch.Tensor], ...]:
        _, params, buffers = self.single.inputs()
        states = [self.optimizer.state[p] for p in params]
        return (
            params,
            buffers,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
        )

    def _rate(self) -> torch.Tensor:
        """The optimizer's current rate (a schedule may have changed it) as a held float32 tensor."""
        value = float(self.optimizer.param_groups[0]["lr"])
        if self._lr is None:
            self._lr = (value, torch.tensor(value, device=self.train.device))
        elif self._lr[0] != value:
            self._lr[1].fill_(value)  # no host sync, no new graph input
            self._lr = (value, self._lr[1])
        return self._lr[1]

    def _kl_weights(self, betas: Sequence[float], device: torch.device) -> torch.Tensor:
        """The steps' KL weights as one float32 tensor (rounded as the per-step path rounds β)."""
        values = [float(b) for b in betas]
        if self._betas is None or len(self._betas[0]) != len(values):
            self._betas = (values, torch.tensor(values, dtype=torch.float32, device=device))
        elif self._betas[0] != values:
            self._betas[1].copy_(torch.tensor(values, dtype=torch.float32))
            self._betas = (values, self._betas[1])
        return self._betas[1]

    # -- building -----------------------------------------------------------------
    def _program(self, key: tuple, graph: compiled.Graph) -> Callable:
        """The S steps as a Python function of tensors, calling the traced step's record."""
        count = key[0]
        group = self.optimizer.param_groups[0]
        betas, eps = tuple(group["betas"]), float(group["eps"])
        slots, dynamic = graph.grad_slots, self.binarize == "dynamic"

        def whole(params, buffers, exp_avgs, exp_avg_sqs, steps, lr, train, index, kl_weights):
            losses, largest = [], []
            for s in range(count):
                x = train[index[s]]
                if dynamic:
                    x = (torch.rand_like(x) < x).to(x.dtype)
                loss, grads = graph.fn(params, buffers, x, kl_weights[s], None)
                largest.append(largest_entry(grads))
                adam_update(
                    [params[i] for i in slots],
                    grads,
                    [exp_avgs[i] for i in slots],
                    [exp_avg_sqs[i] for i in slots],
                    [steps[i] for i in slots],
                    lr,
                    betas,
                    eps,
                )
                losses.append(loss)
            return torch.stack(losses), torch.stack(largest)

        return whole

    def _build(self, key, inputs, lr, index, beta_tensor, betas):
        """(compiled graph, the first call's results), checked against the uncompiled record; None on failure."""
        from torch.fx.experimental.proxy_tensor import make_fx

        device = self.train.device
        first = self.train[index[0]]
        graph = self.single.graph_for(first, key[2], betas[0])
        if graph is None:
            return self._give_up(f"the step cannot be traced ({self.single.failed})")
        start = rng.fork_torch(device)
        try:
            with torch.no_grad():
                record = make_fx(self._program(key, graph))(*_copies(inputs), lr, self.train, index, beta_tensor)
            record.graph.eliminate_dead_code(is_impure_node=compiled.keeps_random)
            record.recompile()
            rng.restore_torch(device, start)
            reference = _copies(inputs)
            with torch.no_grad():
                ref_losses, _ = record(*reference, lr, self.train, index, beta_tensor)
            trial = _copies(inputs)
            fn, (losses, _) = self._compile(record, (*trial, lr, self.train, index, beta_tensor), start)
            problem = _difference(ref_losses, losses, reference[0], trial[0])
            if problem:
                raise RuntimeError(f"the compiled steps differ from their record ({problem})")
        except Exception as exc:  # no C++ compiler, a lowering failure, a mismatch
            rng.restore_torch(device, start)
            return self._give_up(f"{type(exc).__name__}: {one_line(exc, 160)}")
        rng.restore_torch(device, start)
        result = fn(*inputs, lr, self.train, index, beta_tensor)
        self.log.info(
            f"inference.compile: whole training steps ({key[0]} per call: gather, binarization, model and guide, "
            f"gradients, Adam) on batches of {key[1]} compiled with TorchInductor as one graph "
            f"({self.compile_seconds:.1f} s)"
        )
        return fn, result

    def _compile(self, record: torch.fx.GraphModule, args: tuple, start) -> tuple[Callable, tuple]:
        """TorchInductor's build of ``record`` and its first call on ``args`` from the generator state ``start``
        (a damaged cache is emptied and the build retried once: :func:`compile_cache.first_call`)."""

        def build_and_run() -> tuple[Callable, tuple]:
            fn = _NoGrad(torch.compile(record, backend="inductor", dynamic=False, options=compiled.INDUCTOR_OPTIONS))
            rng.restore_torch(self.train.device, start)
            return fn, fn(*args)

        (fn, result), self.compile_seconds = compile_cache.first_call(build_and_run, self.log)
        return fn, result

    def _per_step(self, index: torch.Tensor, num_data: int, betas: Sequence[float]):
        """The steps of ``index`` taken one by one the per-step way (the traced step and the optimizer)."""
        losses, largest = [], []
        for s in range(index.shape[0]):
            x = self.train[index[s]]
            x = torch.bernoulli(x) if self.binarize == "dynamic" else x
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(self.single(x, num_data, betas[s]))
            grads = [p.grad for p in self.vae.parameters() if p.grad is not None]
            largest.append(largest_entry(grads))
            with denormals.calling_thread_only(x.device):
                self.optimizer.step()
        return torch.stack(losses), torch.stack(largest)

    def _give_up(self, reason: str) -> None:
        self.failed = reason
        self.log.info(f"inference.compile: cannot compile whole training steps ({reason}); taking traced steps")
        return None


class _NoGrad:
    """A compiled whole-step graph called without autograd (it updates leaf parameters in place)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        with torch.no_grad():
            return self.fn(*args)


def _copies(inputs: tuple[list[torch.Tensor], ...]) -> list[list[torch.Tensor]]:
    """Clones of the step's tensors that a trial call may update (``requires_grad`` kept: the same compiled graph)."""
    return [[t.detach().clone().requires_grad_(t.requires_grad) for t in group] for group in inputs]


def _difference(ref_losses, losses, ref_params, params) -> str | None:
    """Why the compiled steps' losses or parameters differ from the record's beyond ``RTOL``, or None."""
    if not torch.isfinite(losses).all() or not torch.allclose(losses, ref_losses, rtol=RTOL, atol=0.0):
        return f"losses {losses.tolist()} vs {ref_losses.tolist()}"
    for ref, new in zip(ref_params, params):
        scale = max(float(ref.detach().abs().max()), 1e-12)
        if not bool(((ref - new).abs() <= RTOL * scale).all()):
            return "parameters"
    return None
