"""The training step without Pyro's per-step Python: a cached trace, optionally compiled.

Where a training step's time goes (784-400-20 network, batch 128, one CPU thread;
``benchmarks/overhead.py``): the networks' matrix multiplies, the backward pass
and Adam are the same work as in a hand-written PyTorch step; on top of that,
every eager Pyro step runs the model and the guide through the effect-handler
stack (``pyro.module`` walking the parameters into the param store, plates and
their subsample sites, the trace data structures, ``compute_log_prob`` and
``compute_score_parts`` for every site, ``warn_if_nan``) and ``Trace_ELBO``
converts four values to Python floats (``.item()``, a host sync per value on a
GPU). That is a fixed cost of Python per step, a few hundred microseconds to
milliseconds on these machines, not more arithmetic.

The ``traced`` and ``inductor`` paths of ``inference.compile`` (and ``auto``
where it picks them, :mod:`pyro_vae.training.path_choice`) remove it while the model and guide stay Pyro
programs and the estimator stays Pyro's (or this package's) ``ELBO`` class:

1. **Trace once** (per batch shape): the estimator's ``differentiable_loss`` and
   ``torch.autograd.grad`` of it are run once under ``make_fx``, which records
   the aten operations the Pyro program and the backward pass executed (random
   draws included, as operations) into a graph whose inputs are the parameters,
   the buffers, the batch and the KL weight β. Pyro's host conversions
   (``torch_item``, ``warn_if_nan``) are made tensor-valued while tracing only;
   values are unchanged. The model's structure must not depend on the values
   of tensors (true of every part in this package).
2. **Check**: the graph is run once against the eager estimator from the same
   generator state; loss and gradients must agree (they agree bit for bit), or
   training continues eagerly with one log line.
3. **Compile** the graph with TorchInductor (fused elementwise kernels; random
   draws through the same generator as eager, ``fallback_random``), checked the
   same way within float tolerance. Under the ``pyro-vae`` command Inductor's
   caches live in the package's folder (:mod:`pyro_vae.training.compile_cache`), so a
   later run loads the compiled step instead of compiling it again.
   Where Inductor is unavailable (no C++ compiler, an unsupported device) the
   checked graph is replayed as it is, again with one log line.

Every step after that calls the graph: no effect handlers, no autograd tape,
no host sync. Generator states are saved and restored around tracing, so a run
draws the same random numbers as an eager run of the same seed. The first
``training.VALIDATED_STEPS`` steps always run eagerly with Pyro's validation on.

Both paths step the same optimizer, :func:`pyro_vae.training.optimizer.adam`, and both
receive the KL weight β the same way (:class:`KLWeight`), so they round it alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable

import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_vae.conditional import program_kwargs
from pyro_vae.errors import one_line
from pyro_vae.infer import estimators
from pyro_vae.training import compile_cache, rng

#: fused kernels, random draws through the eager generator; Inductor's precompiled C++ headers live in the
#: temporary folder, so a step compiled without them loads from the package's cache alone
INDUCTOR_OPTIONS: dict[str, Any] = {"fallback_random": True, "cpp_cache_precompile_headers": False}
LOSS_RTOL = 1e-4  # compiled vs eager, relative to the loss
GRAD_RTOL = 1e-3  # compiled vs eager, relative to each gradient tensor's largest entry


# --------------------------------------------------------------------------
# Pyro while tracing: the one place the package patches Pyro
# --------------------------------------------------------------------------

#: the module attributes :func:`host_free_pyro` replaces while a step is traced; tests/training/test_speed_paths.py
#: fails when a Pyro release moves one of them (the trace would then stop at a host conversion)
PATCHED = (
    ("pyro.infer.trace_elbo", "torch_item"),
    ("pyro.infer.trace_elbo", "warn_if_nan"),
    ("pyro.infer.trace_mean_field_elbo", "torch_item"),
    ("pyro.infer.trace_mean_field_elbo", "warn_if_nan"),
    ("pyro.infer.tracegraph_elbo", "torch_item"),
    ("pyro.infer.tracegraph_elbo", "warn_if_nan"),
    ("pyro.poutine.trace_struct", "warn_if_nan"),
    ("pyro.poutine.trace_struct", "warn_if_inf"),
    ("pyro_vae.infer.estimators", "torch_item"),
)


@contextlib.contextmanager
def host_free_pyro():
    """While tracing: Pyro's ``torch_item`` returns a detached tensor and ``warn_if_nan``/``warn_if_inf`` do nothing.

    ``Trace_ELBO.differentiable_loss`` returns ``loss + (surrogate − item(surrogate))``;
    with a detached tensor in place of the float the value and the gradient are
    the same, and no value leaves the device. The attributes are those of
    ``PATCHED``; a missing one is an ``AttributeError`` here, not a silent skip.
    """
    import importlib

    def item(x):
        return x.detach() if torch.is_tensor(x) else x

    def no_warning(value, *args, **kwargs):
        return value

    replacements = {"torch_item": item, "warn_if_nan": no_warning, "warn_if_inf": no_warning}
    saved = []
    for module_name, name in PATCHED:
        module = importlib.import_module(module_name)
        saved.append((module, name, getattr(module, name)))
    try:
        for module, name, _ in saved:
            setattr(module, name, replacements[name])
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def keeps_random(node: torch.fx.Node) -> bool:
    """Dead-code elimination must keep random draws, so the graph consumes the generator as eager does."""
    if node.is_impure():
        return True
    tags = getattr(node.target, "tags", ())
    return node.op == "call_function" and torch.Tag.nondeterministic_seeded in tags


# --------------------------------------------------------------------------
# The objective as a module, so functional_call can make parameters graph inputs
# --------------------------------------------------------------------------


class _Objective(nn.Module):
    """−bound of ``elbo`` for ``vae`` on a batch (and its labels ``y``, for a conditional VAE), β as a tensor
    (so warm-up needs no new trace)."""

    def __init__(self, elbo, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.elbo = elbo

    def forward(self, x: torch.Tensor, beta, num_data: int, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.elbo.differentiable_loss(
            self.vae.model, self.vae.guide, x, num_data=num_data, kl_weight=beta, **program_kwargs(y)
        )


class KLWeight:
    """β as every training step passes it to the model and guide.

    β = 1 and β = 0 change the programs' structure (no scale; a mask) and are
    passed as the numbers; any other β is one float32 tensor on the batch's
    device, refilled in place when β changes (a KL warm-up). The eager and the
    traced step both receive this tensor, so ``poutine.scale`` multiplies the
    same float32 value on either path and their parameters agree bit for bit.
    """

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self.value: float | None = None

    def __call__(self, kl_weight: float, device: torch.device) -> float | torch.Tensor:
        value = float(kl_weight)
        if value in (0.0, 1.0):
            return value
        return self.as_tensor(value, device)

    def as_tensor(self, value: float, device: torch.device) -> torch.Tensor:
        """``value`` as the held float32 tensor on ``device``."""
        if self.tensor is None or self.tensor.device != device:
            self.tensor = torch.tensor(value, device=device)
        elif value != self.value:
            self.tensor.fill_(value)  # a kernel launch, no host sync
        self.value = value
        return self.tensor


class Graph:
    """Loss and gradients of one batch shape, as one traced (and maybe compiled) function."""

    def __init__(self, fn: Callable, grad_slots: list[int], compiled: bool):
        self.fn, self.grad_slots, self.compiled = fn, grad_slots, compiled

    def __call__(self, params, buffers, x, beta, y=None):
        with torch.no_grad():
            return self.fn(params, buffers, x, beta, y)


class CompiledStep:
    """``bound_and_backward`` of an estimator, traced once per batch shape and replayed.

    ``step(x, num_data, kl_weight, y)`` leaves each parameter's gradient in ``.grad`` and
    returns the detached loss, exactly like :func:`estimators.bound_and_backward`
    (which it calls while Pyro's validation is on, and for good after a failure).
    """

    def __init__(self, elbo, vae: nn.Module, log: logging.Logger | None = None, inductor: bool = True):
        self.elbo, self.vae = elbo, vae
        self.log = log or logging.getLogger("pyro_vae")
        self.inductor = inductor
        self.compile_seconds: float | None = None
        self.objective = _Objective(elbo, vae)
        self.graphs: dict[tuple, Graph] = {}
        self.failed: str | None = None
        self.inductor_shape: tuple | None = None  # Inductor compiles the first (full) batch shape only
        self._beta = KLWeight()
        self._inputs: tuple | None = None  # (names, parameters, buffers); parameters must not be replaced
        if not hasattr(elbo, "differentiable_loss"):
            self._give_up(f"{type(elbo).__name__} has no differentiable_loss to trace")

    # -- the step ---------------------------------------------------------------
    def __call__(
        self, x: torch.Tensor, num_data: int, kl_weight: float = 1.0, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.failed is not None or is_validation_enabled():
            return self._eager(x, num_data, kl_weight, y)
        names, params, buffers = self.inputs()
        beta = self._beta.as_tensor(float(kl_weight), x.device)
        key = (x.shape, x.dtype, x.device, num_data, beta_kind(kl_weight))
        graph = self.graphs.get(key)
        if graph is None:
            start = rng.fork_torch(x.device)
            try:
                graph, loss, grads = self._build(key, names, params, buffers, x, beta, num_data, kl_weight, y)
            except Exception as exc:  # anything tracing cannot take: run as Pyro always does
                rng.restore_torch(x.device, start)
                self._give_up(f"{type(exc).__name__}: {one_line(exc, 160)}")
                return self._eager(x, num_data, kl_weight, y)
            self.graphs[key] = graph
        else:
            loss, grads = graph(params, buffers, x, beta, y)
        for slot, grad in zip(graph.grad_slots, grads):
            params[slot].grad = grad
        return loss

    def inputs(self) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
        """(names, parameters, buffers) of the objective, looked up once; parameters must not be replaced."""
        if self._inputs is None:
            names, params = self._parameters()
            self._inputs = (names, params, [b for _, b in self.objective.named_buffers()])
        return self._inputs

    def graph_for(self, x: torch.Tensor, num_data: int, kl_weight: float) -> Graph | None:
        """The checked (uncompiled) graph of batches like ``x`` at a KL weight of ``kl_weight``'s kind; None where
        the step cannot be traced. Building it draws nothing: the generators are left where they were."""
        if self.failed is not None:
            return None
        names, params, buffers = self.inputs()
        key = (x.shape, x.dtype, x.device, num_data, beta_kind(kl_weight))
        if key not in self.graphs:
            start = rng.fork_torch(x.device)
            beta = self._beta.as_tensor(float(kl_weight), x.device)
            try:
                self.graphs[key] = self._build(key, names, params, buffers, x, beta, num_data, kl_weight, None)[0]
            except Exception as exc:  # anything tracing cannot take
                self._give_up(f"{type(exc).__name__}: {one_line(exc, 160)}")
                return None
            finally:
                rng.restore_torch(x.device, start)
        return self.graphs[key]

    @property
    def mode(self) -> str:
        """``eager``, ``traced`` or ``inductor``: how the last built graph runs."""
        if self.failed is not None or not self.graphs:
            return "eager"
        return "inductor" if any(g.compiled for g in self.graphs.values()) else "traced"

    # -- building ---------------------------------------------------------------
    def _parameters(self) -> tuple[list[str], list[torch.Tensor]]:
        pairs = [(n, p) for n, p in self.objective.named_parameters() if p.requires_grad]
        return [n for n, _ in pairs], [p for _, p in pairs]

    def _eager(self, x: torch.Tensor, num_data: int, kl_weight: float, y: torch.Tensor | None) -> torch.Tensor:
        """Pyro's step, β passed as the graphs receive it."""
        return estimators.bound_and_backward(
            self.elbo,
            self.vae.model,
            self.vae.guide,
            x,
            num_data=num_data,
            kl_weight=self._beta(kl_weight, x.device),
            **program_kwargs(y),
        )

    def _build(self, key, names, params, buffers, x, beta, num_data, kl_weight, y):
        from torch.fx.experimental.proxy_tensor import make_fx

        buffer_names = [n for n, _ in self.objective.named_buffers()]
        grad_slots: list[int] = []
        # β = 1 and β = 0 change the program's structure (no scale, a mask): a constant of the
        # graph; any other β is an input, so a KL warm-up replays one graph
        constant_beta = float(kl_weight) if key[-1] != "scaled" else None
        # the programs' pyro.module calls find the real parameters in the param store, so the traced
        # ones never enter it
        self.vae.register()

        def loss_and_grads(params_, buffers_, x_, beta_, y_):
            state = {**dict(zip(names, params_)), **dict(zip(buffer_names, buffers_))}
            beta_arg = beta_ if constant_beta is None else constant_beta
            loss = torch.func.functional_call(self.objective, state, (x_, beta_arg), {"num_data": num_data, "y": y_})
            grads = torch.autograd.grad(loss, params_, allow_unused=True)
            grad_slots[:] = [i for i, g in enumerate(grads) if g is not None]
            return loss.detach(), [g for g in grads if g is not None]

        device = x.device
        start = rng.fork_torch(device)
        inputs = [p.detach().requires_grad_(True) for p in params]
        with host_free_pyro():
            traced = make_fx(loss_and_grads)(inputs, list(buffers), x, beta, y)
        traced.graph.eliminate_dead_code(is_impure_node=keeps_random)
        traced.recompile()
        slots = list(grad_slots)

        # the eager estimator from the same generator state: the reference
        rng.restore_torch(device, start)
        ref_loss, ref_grads = self._eager_reference(params, x, num_data, self._beta(kl_weight, device), y)
        graph = Graph(traced, slots, compiled=False)
        rng.restore_torch(device, start)
        loss, grads = graph(params, buffers, x, beta, y)
        problem = _mismatch(ref_loss, ref_grads, loss, grads, slots)
        if problem:
            raise RuntimeError(f"the traced step differs from the eager one ({problem})")
        after = rng.fork_torch(device)

        if self.inductor and self.inductor_shape in (None, key[0]):
            self.inductor_shape = key[0]
            try:
                compiled, c_loss, c_grads = self._compile(traced, slots, params, buffers, x, beta, start, y)
                problem = _mismatch(ref_loss, ref_grads, c_loss, c_grads, slots)
                if problem:
                    raise RuntimeError(f"compiled step differs from the eager one ({problem})")
                self.log.info(
                    f"inference.compile: the {type(self.elbo).__name__} step for batches of "
                    f"{tuple(x.shape)} is traced once and compiled with TorchInductor "
                    f"({self.compile_seconds:.1f} s)"
                )
                return compiled, c_loss, c_grads
            except Exception as exc:  # no C++ compiler, unsupported device, a lowering failure
                self.inductor = False
                rng.restore_torch(device, after)
                self.log.info(
                    f"inference.compile: TorchInductor unavailable ({type(exc).__name__}: "
                    f"{one_line(exc, 160)}); replaying the traced step without it"
                )
        elif not self.graphs:
            self.log.info(
                f"inference.compile: the {type(self.elbo).__name__} step for batches of "
                f"{tuple(x.shape)} is traced once and replayed (TorchInductor off)"
            )
        return graph, loss, grads

    def _compile(self, traced, slots, params, buffers, x, beta, start, y=None) -> tuple[Graph, torch.Tensor, list]:
        """TorchInductor's build of the traced graph, run once from ``start``.

        Where ``TORCHINDUCTOR_CACHE_DIR`` names the package's folder (the ``pyro-vae``
        command sets it, :mod:`pyro_vae.training.compile_cache`), that folder is checked first,
        and a compile that fails while it holds entries is retried once from an
        emptied folder (:func:`compile_cache.first_call`), so a damaged cache costs a recompile, not the run.
        """

        def build_and_run() -> tuple[Graph, torch.Tensor, list]:
            graph = Graph(
                torch.compile(traced, backend="inductor", dynamic=False, options=INDUCTOR_OPTIONS), slots, compiled=True
            )
            rng.restore_torch(x.device, start)
            return graph, *graph(params, buffers, x, beta, y)

        (graph, loss, grads), self.compile_seconds = compile_cache.first_call(build_and_run, self.log)
        return graph, loss, grads

    def _eager_reference(self, params, x, num_data, kl_weight, y):
        loss = self.elbo.differentiable_loss(
            self.vae.model, self.vae.guide, x, num_data=num_data, kl_weight=kl_weight, **program_kwargs(y)
        )
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    def _give_up(self, reason: str) -> None:
        self.failed = reason
        self.graphs.clear()
        self.log.info(f"inference.compile: cannot compile this step ({reason}); training eagerly")


def beta_kind(beta: float) -> str:
    return "one" if beta == 1.0 else "zero" if beta == 0.0 else "scaled"


def _mismatch(ref_loss, ref_grads, loss, grads, slots) -> str | None:
    """Why (loss, grads) differ from the eager reference beyond float tolerance, or None."""
    if [i for i, g in enumerate(ref_grads) if g is not None] != slots:
        return "different parameters receive gradients"
    scale = max(float(ref_loss.abs()), 1.0)
    if not math.isfinite(float(loss)) or abs(float(loss) - float(ref_loss)) > LOSS_RTOL * scale:
        return f"loss {float(loss):.6g} vs {float(ref_loss):.6g}"
    for slot, grad in zip(slots, grads):
        ref = ref_grads[slot]
        tol = GRAD_RTOL * max(float(ref.abs().max()), 1e-12)
        if grad.shape != ref.shape or not bool(((grad - ref).abs() <= tol).all()):
            return "gradients"
    return None
