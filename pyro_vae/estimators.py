r"""ELBO estimators: Pyro's own, plus the importance-weighted family done right.

=================  ====================================================  ==========================
name               estimator (K = ``inference.num_particles``)           class
=================  ====================================================  ==========================
``trace``          ELBO, KL sampled                                      ``pyro.infer.Trace_ELBO``
``meanfield``      ELBO, KL in closed form where registered              ``TraceMeanField_ELBO``
``tracegraph``     ELBO, Rao-Blackwellized score terms                   ``TraceGraph_ELBO``
``tail-adaptive``  tail-adaptive f-divergence gradient (K > 1)           :class:`TailAdaptive_ELBO`
``iwae``           importance-weighted bound, α = 0                      :class:`IWAE_ELBO`
``renyi``          variational Rényi bound, α = ``inference.alpha``      :class:`Renyi_ELBO`
``stl``            sticking the landing (K = 1: ELBO; K > 1: IWAE form)  :class:`STL_ELBO`
``dreg``           doubly reparameterized IWAE gradient                  :class:`DReG_ELBO`
=================  ====================================================  ==========================

Every builder takes an :class:`~pyro_vae.spec.InferenceSpec` and returns a Pyro
``ELBO`` with ``max_plate_nesting=1``: the data plate is dim -1 and the K
particles are the plate ``num_particles_vectorized`` at dim -2.

Scaling: why the importance-weighted family is not Pyro's ``RenyiELBO``
-------------------------------------------------------------------------
A minibatch of B out of N examples is scaled by N/B inside the model and guide
(``pyro.plate("data", N, subsample=...)``), and Pyro folds that scale into every
``site["log_prob"]``. Pyro's ``RenyiELBO`` sums those *scaled* log-probs into
log w and then takes the log-mean-exp over particles, so with α = 0 it computes

    Σ_b log (1/K) Σ_k exp((N/B) · log w_kb)      instead of      (N/B) · Σ_b log (1/K) Σ_k w_kb.

The two agree only when N = B (or K = 1). By the power-mean inequality the
first is never below the second, and it is no bound on N/B · Σ_b log p(x_b) at
all (for a linear-Gaussian model with N/B = 10 and K = 2000 it reported −351
nats where the true scaled log-likelihood is −436). The estimators here
therefore build each example's log weight from *unscaled* log-densities
(``site["fn"].log_prob(site["value"])``, summed over event dims), keep the
data-plate dimension, take the log-mean-exp over the K particles, and only
then multiply by the plate's subsampling factor N/B and sum over examples.
Any other per-site factor (``poutine.scale(beta)`` on "z" in a β-VAE, the
subsampling of a plate nested inside the data plate) stays inside log w, and
``poutine.mask`` zeroes masked entries of log w (a fully masked example adds 0).

Gradients
---------
With normalized weights w̃_k = w_k / Σ_j w_j (per example):

* IWAE: ∇ log (1/K) Σ_k w_k = Σ_k w̃_k ∇ log w_k (z_k reparameterized).
* STL (Roeder et al. 2017) drops the score term ∇_φ log q_φ(z)|_z fixed, which
  has mean zero. For any reparameterized guide site (diagonal, low-rank or
  full Gaussian, flows) and without detaching module parameters, log q is
  replaced by the zero-valued surrogate

      log q(z) − [log q(z.detach()) − log q(z.detach()).detach()],

  whose φ-gradient is the path derivative ∂ log q/∂z · ∂z/∂φ only.
* DReG (Tucker et al. 2018): the guide gradient Σ_k w̃_k² ∂ log w_k/∂z_k · ∂z_k/∂φ,
  the model gradient Σ_k w̃_k ∇_θ log p_θ(x, z_k). See :class:`DReG_ELBO` for
  how one surrogate gives both with a single model pass.

Both tricks treat each guide site's distribution as a function of φ only; a
guide whose site depends on an *earlier latent site* (a hierarchical guide)
would lose that path too. The package's guides have one latent site "z".

Closed-form KL (``meanfield``)
------------------------------
``TraceMeanField_ELBO`` uses ``kl_divergence(q, p)`` where a pair is registered
and silently samples that site's KL otherwise. Registered in torch 2.x /
Pyro 1.9 for guide → prior: diagonal Normal → diagonal Normal or
MultivariateNormal; MultivariateNormal or LowRankMultivariateNormal →
MultivariateNormal or LowRankMultivariateNormal. Not registered (sampled):
any guide → MixtureSameFamily prior, any guide → flow prior, a flow guide →
Gaussian prior, and MultivariateNormal / LowRankMultivariateNormal guide →
*diagonal* Normal prior (``Normal(...).to_event(1)``).

Training-loop helpers
---------------------
:func:`bound_and_backward` runs one estimator step (backward included) and
returns the detached loss; :func:`bound` returns the bound without gradients.
"""
from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import (ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO,
                        TraceTailAdaptive_ELBO)
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match

from pyro_vae import registry
from pyro_vae.errors import UserInputError
from pyro_vae.spec import InferenceSpec

MAX_PLATE_NESTING = 1
PARTICLE_PLATE = "num_particles_vectorized"


# --------------------------------------------------------------------------
# Shared pieces: log-densities from a pair of traces, a late-bound gradient scale
# --------------------------------------------------------------------------

def _site_log_prob(site: dict, path_derivative: bool = False) -> torch.Tensor:
    """Unscaled log-density of one sample site (batch shape; event dims summed).

    With ``path_derivative`` the value is the same, but the gradient is only the
    path derivative: log q(z) − [log q(z.detach()) − log q(z.detach()).detach()].
    """
    fn, value = site["fn"], site["value"]
    log_prob = fn.log_prob(value, *site["args"], **site["kwargs"])
    if path_derivative:
        fixed = fn.log_prob(value.detach(), *site["args"], **site["kwargs"])
        log_prob = log_prob - (fixed - fixed.detach())
    return log_prob


def log_densities(model_trace, guide_trace, path_derivative: bool = False):
    """``(log_p, log_q, scale)`` of a model/guide trace pair, from unscaled log-densities.

    ``log_p`` = Σ log p over the model's sample sites, ``log_q`` = Σ log q over
    the guide's. Dims of the plates that every site shares (the particle plate
    and the data plate) are kept; every other plate dim is summed (kept as size
    1). ``scale`` is the subsampling factor of the shared plates (N/B); each
    site's remaining scale (its ``site["scale"]`` divided by N/B, e.g. β) and
    its mask are applied inside. ``log_p − log_q`` is then log w per particle
    and example, and a bound is ``scale · Σ_examples f(log w)``.
    """
    model_sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
    guide_sites = [s for s in guide_trace.nodes.values() if s["type"] == "sample"]
    shared = set.intersection(*(set(s["cond_indep_stack"]) for s in model_sites + guide_sites))
    scale = math.prod(f.full_size / f.size for f in shared if f.full_size)

    def total(sites, stl):
        out = 0.0
        for site in sites:
            log_prob = _site_log_prob(site, stl and not site["is_observed"])
            log_prob = scale_and_mask(log_prob, site["scale"] / scale, site["mask"])
            dims = tuple(f.dim for f in site["cond_indep_stack"] if f.vectorized and f not in shared)
            out = out + (log_prob.sum(dims, keepdim=True) if dims else log_prob)
        return out

    return total(model_sites, False), total(guide_sites, path_derivative), scale


class _ScaleGradient(torch.autograd.Function):
    """Identity on values; multiplies the incoming gradient by ``holder.factor``."""

    @staticmethod
    def forward(ctx, tensor, holder, event_dim):
        ctx.holder, ctx.event_dim = holder, event_dim
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        factor = ctx.holder.factor
        factor = factor.reshape(factor.shape + (1,) * ctx.event_dim)
        return (grad * factor).sum_to_size(grad.shape), None, None


class _LateGradientScale:
    """A gradient scale whose factor is set *after* the forward pass (before backward).

    DReG needs the normalized weights w̃ to scale the gradient flowing into z,
    but w̃ is only known once the model has been run on z.
    """

    def __init__(self):
        self.factor = None

    def __call__(self, tensor: torch.Tensor, event_dim: int = 0) -> torch.Tensor:
        return _ScaleGradient.apply(tensor, self, event_dim)


# --------------------------------------------------------------------------
# The importance-weighted family
# --------------------------------------------------------------------------

class _FromDifferentiableLoss:
    """``loss`` and ``loss_and_grads`` of Pyro's ELBO interface, from ``differentiable_loss``."""

    def loss(self, model, guide, *args, **kwargs) -> float:
        """−bound as a float (no gradients)."""
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """−bound as a float, after backpropagating the estimator's gradient."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


class Renyi_ELBO(_FromDifferentiableLoss, ELBO):
    r"""Variational Rényi bound, correctly scaled under subsampling (Li & Turner 2016).

    For each example b, with K particles z_k ~ q(z|x_b) and log w_k = log p(x_b, z_k) − log q(z_k|x_b)::

        L_α(x_b) = 1/(1−α) · log (1/K) Σ_k w_k^(1−α),          bound = (N/B) Σ_b L_α(x_b)

    α = 0 is the IWAE bound, α → 1 the ELBO; for the same particles L_α falls as
    α rises (a power mean), so IWAE ≥ L_α ≥ ELBO estimate for 0 ≤ α ≤ 1. The
    gradient (reparameterized) is Σ_k ŵ_k ∇ log w_k with ŵ_k ∝ w_k^(1−α).
    Unlike ``pyro.infer.RenyiELBO``, log w is built from unscaled log-densities
    and the N/B factor is applied after the log-mean-exp (module docstring).
    Particles are always vectorized (a plate of K at dim −(max_plate_nesting+1),
    also for K = 1). Requires reparameterized guide sites.

    Y. Li, R. E. Turner, "Rényi Divergence Variational Inference", NeurIPS 2016.
    """

    path_derivative = False          # STL: drop the score term of log q
    doubly_reparameterized = False   # DReG: scale path gradients by w̃_k

    def __init__(self, alpha: float = 0.0, num_particles: int = 1,
                 max_plate_nesting: int = MAX_PLATE_NESTING):
        if alpha == 1:
            raise ValueError("alpha = 1 is the ELBO; use Trace_ELBO")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=True)
        self.alpha = float(alpha)
        self.particle_dim = -(max_plate_nesting + 1)

    def _get_trace(self, model, guide, args, kwargs, scale_values=None):
        """Run the guide with K particles, then the model on its samples.

        ``scale_values`` (DReG) wraps each latent value before the model sees it.
        """
        particles = pyro.plate(PARTICLE_PLATE, self.num_particles, dim=self.particle_dim)
        guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
        replayed = guide_trace
        if scale_values is not None:
            replayed = guide_trace.copy()
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and not site_is_subsample(site):
                    replayed.nodes[name] = {**site, "value": scale_values(site["value"], site["fn"].event_dim)}
        model_trace = poutine.trace(poutine.replay(particles(model), trace=replayed)).get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, -self.particle_dim)
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and not site["fn"].has_rsample:
                raise NotImplementedError(f"{type(self).__name__} needs a reparameterized guide; "
                                          f"site {site['name']!r} has none")
        return model_trace, guide_trace

    def example_bounds(self, model, guide, *args, **kwargs):
        """``(bounds, scale)``: each example's bound L(x_b) (shape of the data plate) and N/B.

        ``scale * bounds.sum()`` is the bound; its gradient is the estimator's.
        """
        late_scale = _LateGradientScale() if self.doubly_reparameterized else None
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs, late_scale)
        log_p, log_q, scale = log_densities(model_trace, guide_trace, self.path_derivative)
        if late_scale is not None:
            log_q = late_scale(log_q)
        log_w = (1.0 - self.alpha) * (log_p - log_q)
        if late_scale is not None:
            late_scale.factor = torch.softmax(log_w.detach(), dim=self.particle_dim)
        bounds = (torch.logsumexp(log_w, dim=self.particle_dim) - math.log(self.num_particles)) / (1.0 - self.alpha)
        return bounds, scale

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """−bound as a scalar tensor whose gradient is the estimator's gradient."""
        bounds, scale = self.example_bounds(model, guide, *args, **kwargs)
        return -scale * bounds.sum()



class IWAE_ELBO(Renyi_ELBO):
    r"""Importance-weighted bound (Burda et al. 2016), correctly scaled under subsampling.

    Per example, with z_k ~ q(z|x) and w_k = p(x, z_k) / q(z_k|x)::

        L_K(x) = log (1/K) Σ_k w_k,      ∇L_K = Σ_k w̃_k ∇ log w_k,   w̃_k = w_k / Σ_j w_j

    L_1 is the ELBO; E[L_K] rises with K toward log p(x). The minibatch bound is
    (N/B) Σ_b L_K(x_b). Equals :class:`Renyi_ELBO` with α = 0.

    Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = MAX_PLATE_NESTING):
        super().__init__(alpha=0.0, num_particles=num_particles, max_plate_nesting=max_plate_nesting)


class STL_ELBO(IWAE_ELBO):
    r"""Sticking the landing: the path-derivative gradient (Roeder et al. 2017).

    Same value as :class:`IWAE_ELBO` (K = 1: the ELBO). The guide gradient drops
    the score term ∇_φ log q_φ(z)|_z fixed (mean zero), keeping the path derivative::

        K = 1:  ∇_φ = (∂/∂z)[log p(x, z) − log q_φ(z|x)] · ∂z/∂φ
        K > 1:  ∇_φ = Σ_k w̃_k (∂/∂z_k)[log p(x, z_k) − log q_φ(z_k|x)] · ∂z_k/∂φ

    When q is the exact posterior, log p(x, z) − log q(z|x) = log p(x) for every z,
    so the K = 1 guide gradient is exactly zero. (The K > 1 form is biased
    relative to IWAE's gradient; :class:`DReG_ELBO` is the unbiased one.) Done by
    replacing log q(z) with log q(z) − [log q(z.detach()) − log q(z.detach()).detach()],
    which works for any reparameterized site, flows included.

    G. Roeder, Y. Wu, D. Duvenaud, "Sticking the Landing: Simple, Lower-Variance
    Gradient Estimators for Variational Inference", NeurIPS 2017.
    """

    path_derivative = True


class DReG_ELBO(STL_ELBO):
    r"""Doubly reparameterized IWAE gradient (Tucker et al. 2018).

    Same value as :class:`IWAE_ELBO`. Gradients, with w̃_k the normalized weights::

        guide φ:   Σ_k w̃_k² (∂ log w_k / ∂z_k) · ∂z_k/∂φ        (score term removed)
        model θ:   Σ_k w̃_k  ∇_θ log p_θ(x, z_k)                  (IWAE's)

    Both are unbiased for IWAE's: the score term E[Σ_k w̃_k ∇_φ log q_φ(z_k)|_z fixed]
    equals E[Σ_k (w̃_k − w̃_k²) ∂ log w_k/∂z_k · ∂z_k/∂φ] (reparameterize it once
    more), and subtracting that from IWAE's Σ_k w̃_k ∂ log w_k/∂z_k · ∂z_k/∂φ
    leaves the w̃_k² form (Tucker et al., eq. 5-7).

    One surrogate, one model pass. Let ᵈ mean "detached"; the model is fed::

        z'_k = z_kᵈ + w̃_kᵈ · (z_k − z_kᵈ)      (value z_k; gradient into z_k times w̃_k)

    and the guide term is the STL log q (value log q, gradient only the path
    derivative) with its gradient likewise multiplied by w̃_kᵈ. The surrogate is
    IWAE's log (1/K) Σ_k exp(log p_θ(x, z'_k) − log q_STL(z_k)): its value is
    the IWAE bound, and its gradient Σ_k w̃_k ∇(log p_θ(x, z'_k) − log q_STL(z_k)) is

    * θ, directly in log p:      w̃_k ∇_θ log p(x, z_k)                    (IWAE's)
    * φ through z'_k in log p:   w̃_k · w̃_k ∂ log p/∂z_k · ∂z_k/∂φ
    * φ through log q_STL:      −w̃_k · w̃_k ∂ log q/∂z_k · ∂z_k/∂φ         (these two: DReG)
    * a parameter that the prior p(z) shares with the guide (a VampPrior's
      encoder) keeps IWAE's w̃_k ∇ log p(z_k) through its direct dependence in
      the prior, and gets the DReG term through z_k.

    w̃ is known only after the model has run, so the factor is bound late: a
    custom autograd function is the identity forward and multiplies the
    gradient by w̃ᵈ in backward (``_LateGradientScale``); w̃ is filled in
    before the loss is returned, so call ``backward`` on the tensor that
    ``differentiable_loss`` returned, once. With K = 1 (w̃ = 1) this is
    :class:`STL_ELBO`.

    G. Tucker, D. Lawson, S. Gu, C. J. Maddison, "Doubly Reparameterized Gradient
    Estimators for Monte Carlo Objectives", ICLR 2019 (arXiv 2018).
    """

    doubly_reparameterized = True


class TailAdaptive_ELBO(_FromDifferentiableLoss, TraceTailAdaptive_ELBO):
    r"""Pyro's tail-adaptive f-divergence gradient (Wang, Liu & Liu 2018), with a reportable loss.

    Gradient: exactly ``TraceTailAdaptive_ELBO``'s, −Σ_k γ_k ∇ log w_k / Σ_k γ_k
    with γ_k = rank_k^β (β = ``tail_adaptive_beta``), divided by K as Pyro does.
    Pyro defines no value for it (its loss is ``inf``); the value reported here
    is the IWAE bound with the same K particles (correctly scaled, see the
    module docstring), so a training loop can show and guard a finite loss.

    D. Wang, H. Liu, Q. Liu, "Variational Inference with Tail-adaptive
    f-Divergence", NeurIPS 2018.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        if not (self.vectorize_particles and self.num_particles > 1):
            raise NotImplementedError("TailAdaptive_ELBO needs num_particles > 1 and vectorize_particles=True")
        (model_trace, guide_trace), = self._get_traces(model, guide, args, kwargs)
        _, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
        surrogate = surrogate / self.num_particles   # as Trace_ELBO.differentiable_loss does
        log_p, log_q, scale = log_densities(model_trace, guide_trace)
        particle_dim = -self.max_plate_nesting
        iwae = torch.logsumexp((log_p - log_q).detach(), dim=particle_dim) - math.log(self.num_particles)
        return -scale * iwae.sum() + (surrogate - surrogate.detach())



# --------------------------------------------------------------------------
# Registry builders (in the order the docs list them)
# --------------------------------------------------------------------------

def _pyro_options(spec: InferenceSpec) -> dict:
    return {"num_particles": spec.num_particles, "max_plate_nesting": MAX_PLATE_NESTING,
            "vectorize_particles": spec.num_particles > 1}


@registry.register("estimator", "trace")
def trace_estimator(spec: InferenceSpec) -> ELBO:
    return Trace_ELBO(**_pyro_options(spec))


@registry.register("estimator", "meanfield")
def meanfield_estimator(spec: InferenceSpec) -> ELBO:
    return TraceMeanField_ELBO(**_pyro_options(spec))


@registry.register("estimator", "tracegraph")
def tracegraph_estimator(spec: InferenceSpec) -> ELBO:
    return TraceGraph_ELBO(**_pyro_options(spec))


@registry.register("estimator", "tail-adaptive")
def tail_adaptive_estimator(spec: InferenceSpec) -> ELBO:
    if spec.num_particles < 2:
        raise UserInputError(f"'inference.num_particles' is {spec.num_particles}; "
                             "the tail-adaptive estimator needs at least 2 particles")
    return TailAdaptive_ELBO(**_pyro_options(spec))


@registry.register("estimator", "iwae")
def iwae_estimator(spec: InferenceSpec) -> ELBO:
    return IWAE_ELBO(num_particles=spec.num_particles)


@registry.register("estimator", "renyi")
def renyi_estimator(spec: InferenceSpec) -> ELBO:
    return Renyi_ELBO(alpha=spec.alpha, num_particles=spec.num_particles)


@registry.register("estimator", "stl")
def stl_estimator(spec: InferenceSpec) -> ELBO:
    return STL_ELBO(num_particles=spec.num_particles)


@registry.register("estimator", "dreg")
def dreg_estimator(spec: InferenceSpec) -> ELBO:
    return DReG_ELBO(num_particles=spec.num_particles)


# --------------------------------------------------------------------------
# Training-loop helpers
# --------------------------------------------------------------------------

def bound_and_backward(elbo: ELBO, model, guide, *args, **kwargs) -> torch.Tensor:
    """One estimator step: backpropagate its gradient and return the detached loss (−bound).

    Uses ``differentiable_loss`` where the ELBO has one (Trace_ELBO,
    TraceMeanField_ELBO and the classes here, :class:`TailAdaptive_ELBO`
    included, whose loss is the IWAE bound's): no ``.item()`` of ours, though
    Pyro's own Trace_ELBO calls ``.item()`` inside. Otherwise
    ``loss_and_grads`` (TraceGraph_ELBO), whose float comes back as a tensor.
    """
    if hasattr(elbo, "differentiable_loss"):
        loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.detach()
    return torch.tensor(elbo.loss_and_grads(model, guide, *args, **kwargs))


def bound(elbo: ELBO, model, guide, *args, **kwargs) -> torch.Tensor:
    """The estimator's bound (−loss) without gradients.

    For the tail-adaptive estimator (a gradient only) this is the IWAE bound
    with the same number of particles.
    """
    if isinstance(elbo, TraceTailAdaptive_ELBO) and not isinstance(elbo, TailAdaptive_ELBO):
        elbo = IWAE_ELBO(num_particles=elbo.num_particles)
    with torch.no_grad():
        if hasattr(elbo, "differentiable_loss"):
            return -elbo.differentiable_loss(model, guide, *args, **kwargs).detach()
        return -torch.tensor(elbo.loss(model, guide, *args, **kwargs))
