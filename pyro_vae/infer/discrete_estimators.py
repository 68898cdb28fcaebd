r"""Estimators for discrete latent sites: score functions with baselines, VIMCO, reweighted wake-sleep, enumeration.

=================  =========================================================  ==========================
name               estimator (K = ``inference.num_particles``)                class
=================  =========================================================  ==========================
``tracegraph``     ELBO; Rao-Blackwellized score terms with a baseline        :class:`TraceGraphBaseline_ELBO`
``vimco``          IWAE bound; per-particle leave-one-out baselines (K ≥ 2)   :class:`VIMCO_ELBO`
``rws``            IWAE bound for θ, wake-phase q update for φ (K ≥ 2)        :class:`RWS_ELBO`
``enum``           ELBO with discrete guide sites summed out exactly          :class:`Enum_ELBO`
=================  =========================================================  ==========================

For a guide site z that cannot be reparameterized (the ``bernoulli`` guide,
:mod:`pyro_vae.parts.discrete`) the ELBO's gradient needs the score function::

    ∇_φ E_q[f(z)] = E_q[f(z) ∇_φ log q_φ(z)]

whose variance grows with the size of f (hundreds of nats for an image):
a baseline b that does not depend on z leaves the mean alone
(E_q[b ∇ log q] = b ∇ Σ_z q(z) = 0) and removes much of the variance. The
importance-weighted estimators take every number from
:func:`pyro_vae.infer.log_weights.log_weights`, so they keep the package's
scaling under subsampling (per-example bound, then N/B; see
:mod:`pyro_vae.infer.estimators`). Their score term uses each
non-reparameterized guide site's unweighted, unmasked log q (the density z
was drawn from); a reparameterized site (a relaxed guide) gets the path
gradient instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from pyro import poutine
from pyro.infer import ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from pyro.infer.util import MultiFrameTensor
from pyro.ops.provenance import detach_provenance, get_provenance
from pyro.poutine.runtime import InferDict, Message
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae.config import registry
from pyro_vae.config.spec import InferenceSpec, accepts
from pyro_vae.errors import UserInputError
from pyro_vae.infer import log_weights as weights
from pyro_vae.infer.estimators import MAX_PLATE_NESTING, _FromDifferentiableLoss

BASELINES = ("none", "average", "neural")
NEURAL_BASELINE_HIDDEN = 100  # NVIL's input-dependent baseline: one tanh layer of 100 units


# --------------------------------------------------------------------------
# tracegraph with a baseline
# --------------------------------------------------------------------------


def downstream_costs(model_trace, guide_trace) -> dict[str, torch.Tensor]:
    """Each non-reparameterized guide site's downstream cost, as ``TraceGraph_ELBO`` forms it.

    For site s: the sum of the (scaled) log p of every model site and −log q of
    every guide site whose value depends on s (Pyro's provenance tracking),
    summed down to s's plates. Needs traces taken under ``TrackNonReparam``.
    """
    costs: dict[str, MultiFrameTensor] = {}
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                for key in get_provenance(site["log_prob_sum"]):
                    costs.setdefault(key, MultiFrameTensor()).add((site["cond_indep_stack"], sign * site["log_prob"]))
    return {key: cost.sum_to(guide_trace.nodes[key]["cond_indep_stack"]) for key, cost in costs.items()}


class NeuralBaseline(nn.Module):
    """b_ψ(x): a one-hidden-layer tanh network of the flattened observation, one number per example."""

    def __init__(self, input_dim: int, hidden: int = NEURAL_BASELINE_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class TraceGraphBaseline_ELBO(TraceGraph_ELBO):
    r"""Pyro's ``TraceGraph_ELBO`` with a baseline for each non-reparameterized guide site (NVIL-style).

    Value: the ELBO estimate Σ log p(x, z) − log q(z|x) of K particles. Gradient
    (Schulman et al. 2015; Mnih & Gregor 2014), for each guide site s with
    downstream cost c_s (the terms of log p − log q that depend on z_s, scaled by N/B)::

        ∇ = ∇ [log p(x, z) − log q(z|x)]|_z fixed  +  Σ_s (c_s − b_s) ∇_φ log q(z_s)

    passed to Pyro as the site's ``infer["baseline"]``:

    * ``none``: b = 0 (Rao-Blackwellized score function only);
    * ``average``: b_s = s_s · a_s, with a_s a decaying average of the per-example
      cost c_s / s_s (s_s the site's scale N/B · β) over earlier steps,
      a ← β a + (1 − β) mean(c/s), β = ``baseline_beta``; a scalar, so unlike Pyro's
      ``use_decaying_avg_baseline`` (one average per minibatch position) it holds
      for any batch size. Given to Pyro as ``baseline_value``;
    * ``neural``: b_s(x) = s_s · (a_s + n_ψ(x)), the average plus an input-dependent
      network n_ψ (:class:`NeuralBaseline`, NVIL's), given as ``nn_baseline``. Pyro adds
      Σ (c_s − b_s)² to the surrogate loss; ψ is fitted to it by this estimator's own
      Adam (learning rate ``baseline_lr``) right after each backward pass: ψ is no
      parameter of the VAE, not in its optimizer or checkpoint (a resumed run starts
      a new network).

    Every baseline is computed from earlier steps or from x alone, never from
    z_s, so the gradient stays unbiased.

    J. Schulman, N. Heess, T. Weber, P. Abbeel, "Gradient Estimation Using
    Stochastic Computation Graphs", NeurIPS 2015. A. Mnih, K. Gregor, "Neural
    Variational Inference and Learning in Belief Networks", ICML 2014.
    """

    def __init__(
        self,
        baseline: str = "none",
        baseline_beta: float = 0.9,
        baseline_lr: float = 1e-3,
        num_particles: int = 1,
        max_plate_nesting: int = MAX_PLATE_NESTING,
    ):
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}")
        super().__init__(
            num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=num_particles > 1
        )
        self.baseline, self.baseline_beta, self.baseline_lr = baseline, float(baseline_beta), float(baseline_lr)
        self.averages: dict[str, torch.Tensor] = {}  # a_s per site
        self.network: NeuralBaseline | None = None
        self.network_optimizer: torch.optim.Optimizer | None = None

    def _neural(self, x: torch.Tensor) -> NeuralBaseline:
        """The baseline network, built at the first batch for its width and device.

        Its initial weights are drawn from a fork of torch's generators, so building it leaves the draws of the
        run (its z and its minibatches) as they would be with any other baseline.
        """
        if self.network is None:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                self.network = NeuralBaseline(x[0].numel()).to(x.device)
            self.network_optimizer = torch.optim.Adam(self.network.parameters(), lr=self.baseline_lr)
        return self.network

    def _site_baseline(self, name: str, site: dict, x: torch.Tensor) -> dict:
        """The site's ``infer["baseline"]`` for this step."""
        scale = site["scale"]
        average = self.averages.get(name, torch.zeros((), device=site["value"].device))
        if self.baseline == "average":
            return {"baseline_value": (scale * average).expand(site["log_prob"].shape)}
        network = self._neural(x)
        shape = site["log_prob"].shape
        return {
            "nn_baseline": lambda inputs: (scale * (average + network(inputs.flatten(1)))).expand(shape),
            "nn_baseline_input": x,
        }

    def _update_averages(self, model_trace, guide_trace) -> None:
        """a_s ← β a_s + (1 − β) mean(c_s / s_s) for every site with a cost."""
        with torch.no_grad():
            for name, cost in downstream_costs(model_trace, guide_trace).items():
                per_example = (cost / guide_trace.nodes[name]["scale"]).mean()
                old = self.averages.get(name)
                new = per_example if old is None else self.baseline_beta * old + (1 - self.baseline_beta) * per_example
                self.averages[name] = detach_provenance(new).detach()  # no trace of this step's z in it

    def _get_traces(self, model, guide, args, kwargs):
        """Pyro's traces, each non-reparameterized guide site given this step's baseline."""
        for model_trace, guide_trace in super()._get_traces(model, guide, args, kwargs):
            if self.baseline != "none":
                for name, site in guide_trace.nodes.items():
                    if site["type"] == "sample" and not site_is_subsample(site) and not site["fn"].has_rsample:
                        site["infer"]["baseline"] = self._site_baseline(name, site, args[0])
            yield model_trace, guide_trace
            if self.baseline != "none":
                self._update_averages(model_trace, guide_trace)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """−ELBO as a float, after backpropagating the estimator's gradient and fitting the neural baseline."""
        if self.network_optimizer is not None:
            self.network_optimizer.zero_grad()
        loss = super().loss_and_grads(model, guide, *args, **kwargs)
        if self.network_optimizer is not None:
            self.network_optimizer.step()
        return loss


# --------------------------------------------------------------------------
# VIMCO and reweighted wake-sleep, on log_weights
# --------------------------------------------------------------------------


def score_log_q(sites: weights.LogWeights, detach_values: bool = False) -> torch.Tensor:
    """Σ over the non-reparameterized guide sites of log q_s(z_s), unweighted and unmasked, (K, B).

    ``detach_values``: log q at the detached values of every guide site instead
    (reparameterized ones included): ∇_φ log q(z)|_z fixed.
    """
    total: torch.Tensor | float = 0.0
    for site in sites.guide.values():
        if detach_values:
            log_q = site.fn.log_prob(site.value.detach())
        elif not site.fn.has_rsample:
            log_q = site.log_prob
        else:
            continue
        total = total + (log_q.sum(site.dims, keepdim=True) if site.dims else log_q)
    return total  # type: ignore[return-value]  # a tensor wherever the guide has a latent site


def leave_one_out_signals(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r"""VIMCO's per-particle learning signals L̂ − L̂_{−k}, the same shape as ``log_w``.

    L̂ = log (1/K) Σ_j w_j; L̂_{−k} is L̂ with w_k replaced by the geometric mean
    of the other weights, exp((1/(K−1)) Σ_{j≠k} log w_j).
    """
    k = log_w.shape[dim]
    log_w = log_w.movedim(dim, 0)
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)  # (K, ...)
    replaced = log_w.unsqueeze(0).repeat(k, *([1] * log_w.dim()))  # row k: log w with entry k replaced
    index = torch.arange(k, device=log_w.device)
    replaced[index, index] = others_mean
    bound = torch.logsumexp(log_w, 0)
    return (bound - torch.logsumexp(replaced, 1)).movedim(0, dim)


class _ParticleBound(_FromDifferentiableLoss, ELBO):
    """K vectorized particles per example (K ≥ 2); ``differentiable_loss`` = −(N/B) Σ_b bound_b."""

    def __init__(self, num_particles: int = 2, max_plate_nesting: int = MAX_PLATE_NESTING):
        if num_particles < 2:
            raise ValueError(f"{type(self).__name__} needs num_particles >= 2")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=True)
        self.particle_dim = -(max_plate_nesting + 1)

    @property
    def weights_per_bound(self) -> int:
        """K: how many importance weights one example's bound normalizes over."""
        return self.num_particles

    def example_bounds(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, float]:
        """``(bounds, scale)``: each example's bound (shape of the data plate) and N/B."""
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):
        """The model and guide traces of ``num_particles`` vectorized particles (Pyro's ``ELBO`` interface)."""
        return weights.traces(model, guide, args, kwargs, self.num_particles, -self.particle_dim - 1)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """−bound as a scalar tensor whose gradient is the estimator's gradient."""
        bounds, scale = self.example_bounds(model, guide, *args, **kwargs)
        return -scale * bounds.sum()

    def _weights(self, model, guide, args, kwargs, scale_values: Callable | None = None) -> weights.LogWeights:
        return weights.log_weights(
            model,
            guide,
            *args,
            num_particles=self.num_particles,
            max_plate_nesting=-self.particle_dim - 1,
            scale_values=scale_values,
            **kwargs,
        )

    def _iwae(self, log_w: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(log_w, dim=self.particle_dim) - math.log(self.num_particles)


class VIMCO_ELBO(_ParticleBound):
    r"""VIMCO: the IWAE bound with per-particle leave-one-out baselines (Mnih & Rezende 2016).

    Value, per example: L̂ = log (1/K) Σ_k w_k, w_k = p(x, z_k) / q(z_k|x), z_k ~ q
    (the IWAE bound). Gradient (their eq. 10, with the geometric-mean variant of the
    leave-one-out estimate)::

        ∇L̂ ≈ Σ_k (L̂ − L̂_{−k}) ∇_φ log q(z_k|x)  +  Σ_k w̃_k ∇ log w_k

        L̂_{−k} = log (1/K) (Σ_{j≠k} w_j + exp((1/(K−1)) Σ_{j≠k} log w_j)),   w̃_k = w_k / Σ_j w_j

    The first sum is the score term of the IWAE gradient Σ_k L̂ ∇ log q(z_k) with
    L̂_{−k}, which does not depend on z_k, as z_k's baseline: each particle's
    signal is how much it raised the bound over what the others predict. The
    second is ∇L̂ at fixed z (its φ part −Σ_k w̃_k ∇_φ log q(z_k)). Unbiased for
    ∇E[L̂]. Surrogate: L̂ + Σ_k sᵈ_k log q(z_k) − (same)ᵈ, ᵈ detached.

    A. Mnih, D. J. Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.
    """

    def example_bounds(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, float]:
        sites = self._weights(model, guide, args, kwargs)
        log_w = sites.log_w
        signals = leave_one_out_signals(log_w.detach(), self.particle_dim)
        score = (signals * score_log_q(sites)).sum(self.particle_dim)
        return self._iwae(log_w) + (score - score.detach()), sites.scale


class RWS_ELBO(_ParticleBound):
    r"""Reweighted wake-sleep, the wake-wake form (Bornschein & Bengio 2015; Le et al. 2019).

    Value, per example: the IWAE bound L̂ = log (1/K) Σ_k w_k of K particles z_k ~ q.
    Gradients, with w̃_k = w_k / Σ_j w_j::

        model θ (wake-θ):   Σ_k w̃_k ∇_θ log p_θ(x, z_k)       (IWAE's, z fixed)
        guide φ (wake-φ):   Σ_k w̃_k ∇_φ log q_φ(z_k|x)        (z fixed)

    The guide's direction is the self-normalized importance-sampling estimate of
    −∇_φ KL(p(z|x) ‖ q_φ(z|x)): q is fitted to the model's posterior, not to the
    bound, so no score function and no baseline are needed. No sleep phase
    (insomnia 1, as Le et al. recommend). Particle values are detached (a relaxed
    guide gets no path gradient here). Surrogate: log (1/K) Σ_k exp(log p_k − log qᵈ_k)
    + Σ_k w̃ᵈ_k log q_k − (same)ᵈ. Pyro's ``ReweightedWakeSleep`` takes log w from
    subsampling-scaled log-densities (:mod:`pyro_vae.infer.estimators`); this one
    from :func:`~pyro_vae.infer.log_weights.log_weights`.

    J. Bornschein, Y. Bengio, "Reweighted Wake-Sleep", ICLR 2015. T. A. Le,
    A. R. Kosiorek, N. Siddharth, Y. W. Teh, F. Wood, "Revisiting Reweighted
    Wake-Sleep for Models with Stochastic Control Flow", UAI 2019.
    """

    def example_bounds(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, float]:
        sites = self._weights(model, guide, args, kwargs, scale_values=lambda value, event_dim: value.detach())
        log_w = sites.log_p - sites.log_q.detach()
        normalized = torch.softmax(log_w.detach(), dim=self.particle_dim)
        wake_phi = (normalized * score_log_q(sites, detach_values=True)).sum(self.particle_dim)
        return self._iwae(log_w) + (wake_phi - wake_phi.detach()), sites.scale


# --------------------------------------------------------------------------
# Exact enumeration
# --------------------------------------------------------------------------


def enumerate_discrete_sites(guide: Callable) -> Callable:
    """``guide`` with every non-reparameterized latent site enumerated in parallel; a site that cannot be is refused."""

    def config(msg: Message) -> InferDict:
        fn: Any = msg["fn"]  # a sample site's distribution
        if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg) or fn.has_rsample:
            return {}
        if not fn.has_enumerate_support:
            raise UserInputError(
                f"estimator 'enum' cannot sum out site {msg['name']!r} ({type(fn).__name__}, event shape "
                f"{tuple(fn.event_shape)}): too many configurations; use tracegraph, vimco:K or rws:K"
            )
        return {"enumerate": "parallel"}

    return poutine.infer_config(guide, config_fn=config)


class Enum_ELBO(TraceEnum_ELBO):
    r"""The ELBO with every discrete guide site summed out exactly (Pyro's ``TraceEnum_ELBO``).

    For discrete guide sites y (enumerated in parallel: all their values at once
    along a new tensor dimension) and the others z (sampled, K particles)::

        ELBO = E_{q(z|x)} [ Σ_y q(y|x, z) (log p(x, y, z) − log q(y, z|x)) ]

    whose gradient has no sampling noise from y. For a layer of d binary units
    the sum has 2^d terms (each a decoder pass), so a ``bernoulli`` guide is
    enumerated for d ≤ :data:`pyro_vae.parts.discrete.MAX_ENUMERATED_UNITS`; a
    larger one is refused in one line at the first step. Reparameterized sites
    are sampled as by ``trace``.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = MAX_PLATE_NESTING):
        super().__init__(
            num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=num_particles > 1
        )

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """−ELBO as a tensor; without gradients (evaluation) Pyro's ``loss`` value, on the device of the data."""
        if not torch.is_grad_enabled():  # Pyro's differentiable_loss refuses a loss that records no gradient
            return torch.tensor(self.loss(model, guide, *args, **kwargs), device=args[0].device)
        return super().differentiable_loss(model, enumerate_discrete_sites(guide), *args, **kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        return super().loss(model, enumerate_discrete_sites(guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        return super().loss_and_grads(model, enumerate_discrete_sites(guide), *args, **kwargs)


# --------------------------------------------------------------------------
# Registry builders
# --------------------------------------------------------------------------


@dataclass
class BaselineConfig:
    """``tracegraph``: the score terms' baseline, its decay and the neural baseline's learning rate."""

    baseline: str = field(default="none", metadata=accepts(choices=BASELINES))
    baseline_beta: float = field(default=0.9, metadata=accepts(0, 1))
    baseline_lr: float = field(default=1e-3, metadata=accepts(0, open_low=True))


@registry.register("estimator", "tracegraph", config=BaselineConfig)
def tracegraph_estimator(spec: InferenceSpec) -> ELBO:
    options = spec.options
    return TraceGraphBaseline_ELBO(
        options.baseline, options.baseline_beta, options.baseline_lr, num_particles=spec.num_particles
    )


def _at_least_two(name: str, spec: InferenceSpec) -> None:
    if spec.num_particles < 2:
        raise UserInputError(
            f"'inference.num_particles' is {spec.num_particles}; {name} needs at least 2 particles, e.g. {name}:8"
        )


@registry.register("estimator", "vimco", token=("num_particles",))
def vimco_estimator(spec: InferenceSpec) -> ELBO:
    _at_least_two("vimco", spec)
    return VIMCO_ELBO(num_particles=spec.num_particles)


@registry.register("estimator", "rws", token=("num_particles",))
def rws_estimator(spec: InferenceSpec) -> ELBO:
    _at_least_two("rws", spec)
    return RWS_ELBO(num_particles=spec.num_particles)


@registry.register("estimator", "enum")
def enum_estimator(spec: InferenceSpec) -> ELBO:
    return Enum_ELBO(num_particles=spec.num_particles)
