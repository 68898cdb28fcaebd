r"""ELBO estimators: Pyro's own, plus the importance-weighted family done right.

=================  ====================================================  ==========================
name               estimator (K = ``inference.num_particles``)           class
=================  ====================================================  ==========================
``trace``          ELBO, KL sampled                                      ``pyro.infer.Trace_ELBO``
``meanfield``      ELBO, KL closed-form where registered and unbiased    :class:`MeanField_ELBO`
``tracegraph``     ELBO, Rao-Blackwellized score terms, baselines        :mod:`~pyro_vae.infer.discrete_estimators`
``tail-adaptive``  tail-adaptive f-divergence gradient (K > 1)           :class:`TailAdaptive_ELBO`
``iwae``           importance-weighted bound, α = 0                      :class:`IWAE_ELBO`
``renyi``          variational Rényi bound, α = ``inference.alpha``      :class:`Renyi_ELBO`
``stl``            sticking the landing (K = 1: ELBO; K > 1: IWAE form)  :class:`STL_ELBO`
``dreg``           doubly reparameterized IWAE gradient                  :class:`DReG_ELBO`
``miwae``          M IWAE-K bounds averaged (M = ``outer_particles``)    :class:`MIWAE_ELBO`
``ciwae``          β ELBO + (1 − β) IWAE (β = ``ciwae_beta``)            :class:`CIWAE_ELBO`
``piwae``          encoder on MIWAE(M, K), decoder on IWAE(M·K)          :class:`PIWAE_ELBO`
=================  ====================================================  ==========================

Every builder takes an :class:`~pyro_vae.config.spec.InferenceSpec` and returns a Pyro
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
* DReG (Tucker et al. 2018): the guide gradient Σ_k c_k ∂ log w_k/∂z_k · ∂z_k/∂φ
  with c_k = (1 − β) w̃_k + β w̃_k² under a KL weight β (w̃_k² at β = 1), the
  model gradient Σ_k w̃_k ∇_θ log p_θ(x, z_k). See :class:`DReG_ELBO` for the
  derivation and for how one surrogate gives both with a single model pass.

The KL weight β of a β-VAE or a KL warm-up (``poutine.scale`` on the z sites,
or ``poutine.mask`` for β = 0) enters every estimator the same way: log w_k =
log p(x|z_k) + β [log p(z_k) − log q(z_k|x)], and each bound is the one of
that log w (IWAE's log (1/K) Σ_k w_k, Rényi's power mean, ...). Reparameterized
gradients of those bounds need nothing else; DReG's removal of the score term
does (its weight above), and reads β from the guide site's own scale.

With one guide site, both tricks detach that site's distribution from φ. A
guide whose site depends on an *earlier latent site* (the layered guides of
:mod:`pyro_vae.hierarchy`, q(z_2 | z_1)) must keep the path through z_1 into
q(z_2 | z_1): there log q is the guide replayed on its own draws with its
parameters detached (:func:`pyro_vae.infer.log_weights.path_trace`), so every
site's log q has the path derivatives through all draws and none through φ
directly. DReG's weight c_k multiplies the gradient into every layer's value.

Closed-form KL (``meanfield``)
------------------------------
:class:`MeanField_ELBO` (Pyro's ``TraceMeanField_ELBO``) uses ``kl_divergence(q, p)``
where a pair is registered and samples that site's KL otherwise; with stochastic
layers, a site whose prior depends on a layer the guide draws after it (a
bottom-up guide's z_1) is sampled too, since the closed form at that draw is
biased (:func:`pyro_vae.infer.log_weights.closed_form_allowed`); the run's log
names the sampled and closed-form sites. Registered in torch 2.x /
Pyro 1.9 for guide → prior: diagonal Normal → diagonal Normal or
MultivariateNormal; MultivariateNormal or LowRankMultivariateNormal →
MultivariateNormal or LowRankMultivariateNormal. Not registered (sampled):
any guide → MixtureSameFamily prior, any guide → flow prior, a flow guide →
Gaussian prior, and MultivariateNormal / LowRankMultivariateNormal guide →
*diagonal* Normal prior (``Normal(...).to_event(1)``).

Training-loop helpers
---------------------
:func:`bound_and_backward` runs one estimator step (backward included) and
returns the detached loss; :func:`bound` returns the bound without gradients. log w itself comes from
:func:`pyro_vae.infer.log_weights.log_weights`, which evaluation and ``compare``
call too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.util import site_is_subsample

from pyro_vae.config import registry
from pyro_vae.config.spec import InferenceSpec, accepts
from pyro_vae.errors import UserInputError
from pyro_vae.infer import log_weights as weights

MAX_PLATE_NESTING = 1
#: the estimators that take a discrete (non-reparameterized) guide site (:mod:`pyro_vae.infer.discrete_estimators`)
DISCRETE_ESTIMATORS = ("trace", "tracegraph", "vimco:K", "rws:K", "enum")


# --------------------------------------------------------------------------
# Shared pieces: the guide's KL weight, a late-bound gradient scale
# --------------------------------------------------------------------------


def refuse_discrete_sites(estimator: str, guide_trace) -> None:
    """One line naming the first latent guide site that is not reparameterized, and the estimators that take it."""
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site) and not site["fn"].has_rsample:
            raise UserInputError(
                f"{estimator} needs reparameterized latent sites; site {site['name']!r} "
                f"({type(site['fn']).__name__}) is discrete: use one of {', '.join(DISCRETE_ESTIMATORS)}, "
                "or model.guide.type: relaxed-bernoulli"
            )


def guide_kl_weight(guide_trace, scale: float):
    """β of the guide's latent site: its scale over the plates' N/B, times its mask (0 where masked).

    A float, or a tensor that broadcasts against log w. The guide must have one
    latent site, or several with the same float β.
    """
    weights = []
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            beta = site["scale"] / scale
            mask = site["mask"]
            if mask is not None:
                beta = beta * (mask.to(torch.get_default_dtype()) if torch.is_tensor(mask) else float(mask))
            weights.append(beta)
    if len(weights) > 1 and (any(torch.is_tensor(b) for b in weights) or len(set(weights)) > 1):
        raise NotImplementedError("DReG needs one KL weight for all guide sites")
    return weights[0]


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

    differentiable_loss: Callable[..., torch.Tensor]  # of the estimator class this is mixed into
    retain_graph: bool

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

    path_derivative = False  # STL: drop the score term of log q
    doubly_reparameterized = False  # DReG: scale path gradients by w̃_k

    def __init__(self, alpha: float = 0.0, num_particles: int = 1, max_plate_nesting: int = MAX_PLATE_NESTING):
        if alpha == 1:
            raise ValueError("alpha = 1 is the ELBO; use Trace_ELBO")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=True)
        self.alpha = float(alpha)
        self.particle_dim = -(max_plate_nesting + 1)

    @property
    def weights_per_bound(self) -> int:
        """How many importance weights one example's bound normalizes over (K; for MIWAE the inner K)."""
        return self.num_particles

    def _get_trace(self, model, guide, args, kwargs):
        """The model and guide traces of ``num_particles`` vectorized particles (Pyro's ``ELBO`` interface)."""
        return weights.traces(model, guide, args, kwargs, self.num_particles, -self.particle_dim - 1)

    def log_weights(self, model, guide, args, kwargs, late_scale=None):
        """``(log_w, scale, guide_trace)``: log w of shape (K, B) (:mod:`pyro_vae.infer.log_weights`), N/B, the
        guide's trace.

        With ``late_scale`` (DReG, PIWAE) every latent value the model sees and
        the guide's log q pass through it, so their gradient can be reweighted
        once the weights are known.
        """
        model_trace, guide_trace = weights.traces(
            model, guide, args, kwargs, self.num_particles, -self.particle_dim - 1, late_scale
        )
        refuse_discrete_sites(type(self).__name__, guide_trace)
        detached = None
        if self.path_derivative and len(weights.latent_sites(guide_trace)) > 1:
            detached = weights.path_trace(guide, guide_trace, args, kwargs, self.num_particles, -self.particle_dim - 1)
        sites = weights.from_traces(model_trace, guide_trace, self.path_derivative, detached)
        log_q = sites.log_q
        if late_scale is not None:
            log_q = late_scale(log_q)
        return sites.log_p - log_q, sites.scale, guide_trace

    def example_bounds(self, model, guide, *args, **kwargs):
        """``(bounds, scale)``: each example's bound L(x_b) (shape of the data plate) and N/B.

        ``scale * bounds.sum()`` is the bound; its gradient is the estimator's.
        """
        late_scale = _LateGradientScale() if self.doubly_reparameterized else None
        log_w, scale, guide_trace = self.log_weights(model, guide, args, kwargs, late_scale)
        log_w = (1.0 - self.alpha) * log_w
        if late_scale is not None:
            # the log-mean-exp below contributes w̃_k; this factor makes it (1 − β) w̃_k + β w̃_k²
            beta = guide_kl_weight(guide_trace, scale)
            late_scale.factor = (1.0 - beta) + beta * torch.softmax(log_w.detach(), dim=self.particle_dim)
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
    which works for any reparameterized site; for a flow whose transforms cached the
    draw (the IAF guide) by log q(z).detach() + ⟨∇_z log q(z), z − z.detach()⟩, the same
    value and gradient without inverting the flow (:func:`~pyro_vae.infer.log_weights.flow_score`).

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

    Under a KL weight β, log w_k = log p(x|z_k) + β [log p(z_k) − log q_φ(z_k|x)],
    so IWAE's score term is −β Σ_k w̃_k ∇_φ log q_φ(z_k)|_z fixed, whose expectation is
    −β E[Σ_k w̃_k (1 − w̃_k) ∂ log w_k/∂z_k · ∂z_k/∂φ] by the same identity
    (E_q[f ∇_φ log q] = E[∂f/∂z · ∂z/∂φ] with f = w̃_k, ∂w̃_k/∂z_k = w̃_k (1 − w̃_k) ∂ log w_k/∂z_k).
    Removing it leaves the path weight

        c_k = w̃_k − β w̃_k (1 − w̃_k) = (1 − β) w̃_k + β w̃_k²

    (w̃_k² at β = 1; IWAE's own path gradient at β = 0, where there is no score
    term). β is read from the guide site's scale (``poutine.scale``) divided by
    the plate's N/B, and is 0 where the site is masked (:func:`guide_kl_weight`).

    One surrogate, one model pass. Let ᵈ mean "detached"; the model is fed::

        z'_k = z_kᵈ + a_kᵈ · (z_k − z_kᵈ)      (value z_k; gradient into z_k times a_k)

    and the guide term is the STL log q (value log q, gradient only the path
    derivative) with its gradient likewise multiplied by a_kᵈ, where
    a_k = c_k / w̃_k = (1 − β) + β w̃_k (the formula shows β = 1, a_k = w̃_k).
    The surrogate is IWAE's log (1/K) Σ_k exp(log p_θ(x, z'_k) − log q_STL(z_k)):
    its value is the IWAE bound, and its gradient Σ_k w̃_k ∇(log p_θ(x, z'_k) − log q_STL(z_k)) is

    * θ, directly in log p:      w̃_k ∇_θ log p(x, z_k)                    (IWAE's)
    * φ through z'_k in log p:   w̃_k · a_k ∂ log p/∂z_k · ∂z_k/∂φ
    * φ through log q_STL:      −w̃_k · a_k ∂ log q/∂z_k · ∂z_k/∂φ         (these two: DReG, c_k = w̃_k a_k)
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


class TailAdaptive_ELBO(IWAE_ELBO):
    r"""Tail-adaptive f-divergence gradient (Wang, Liu & Liu 2018), ranked per example.

    With K particles z_kb ~ q(z|x_b) and log w_kb = log p(x_b, z_kb) − log q(z_kb|x_b),
    each example ranks its own particles by weight, the tail count::

        F̂_kb = #{j : log w_jb ≥ log w_kb}        (1 for the largest weight, K for the smallest)

    (ties broken by particle index, a stable sort), and weights them by
    γ_kb = F̂_kb^β_ta with β_ta = ``tail_adaptive_beta`` ≤ 0, normalized per example,
    γ̃_kb = γ_kb / Σ_j γ_jb: the largest weights get the most mass, whatever the
    scale of w (the f-divergence with f adapted to the weights' tail). The
    gradient is that of the surrogate

        (N/B) Σ_b Σ_k γ̃_kbᵈ log w_kb         (ᵈ: detached; z_kb reparameterized)

    so its scale is the ELBO's: with β_ta = 0, γ̃ = 1/K and it is the gradient of
    the K-particle ELBO (1/K) Σ_k log w_k. Unlike Pyro's ``TraceTailAdaptive_ELBO``
    the ranks are taken per example, not over log w summed over the minibatch,
    and there is no extra 1/K. The estimator defines no value of its own: the
    value reported (what training shows and guards, and ``compare``'s bound)
    is the IWAE bound of the same K particles.

    D. Wang, H. Liu, Q. Liu, "Variational Inference with Tail-adaptive
    f-Divergence", NeurIPS 2018 (Algorithm 1; β_ta = −1 in their experiments).
    """

    def __init__(
        self, num_particles: int = 2, tail_adaptive_beta: float = -1.0, max_plate_nesting: int = MAX_PLATE_NESTING
    ):
        if num_particles < 2:
            raise ValueError("the tail-adaptive gradient needs num_particles >= 2")
        if tail_adaptive_beta > 0:
            raise ValueError("tail_adaptive_beta must be <= 0 (the largest weights get the most mass)")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.tail_adaptive_beta = float(tail_adaptive_beta)

    def example_bounds(self, model, guide, *args, **kwargs):
        log_w, scale, _ = self.log_weights(model, guide, args, kwargs)
        dim = self.particle_dim
        order = torch.argsort(log_w.detach(), dim=dim, descending=True, stable=True)
        ranks = torch.arange(1, self.num_particles + 1, dtype=log_w.dtype, device=log_w.device)
        ranks = ranks.reshape((-1,) + (1,) * (-dim - 1)).expand_as(log_w)
        tail_count = torch.empty_like(log_w).scatter_(dim, order, ranks)  # F̂_kb
        gamma = tail_count.pow(self.tail_adaptive_beta)
        gamma = gamma / gamma.sum(dim, keepdim=True)  # γ̃_kb
        surrogate = (gamma * log_w).sum(dim)
        iwae = torch.logsumexp(log_w.detach(), dim=dim) - math.log(self.num_particles)
        return iwae + (surrogate - surrogate.detach()), scale


class MIWAE_ELBO(IWAE_ELBO):
    r"""M independent IWAE-K bounds, averaged (Rainforth et al. 2018)::

        MIWAE(M, K) = (1/M) Σ_m log (1/K) Σ_k w_mk,     M·K particles per example

    MIWAE(1, K) is IWAE-K and MIWAE(M, 1) the ELBO with M particles. The M·K
    particles share one particle plate (index m·K + k). Reparameterized gradient.

    T. Rainforth, A. R. Kosiorek, T. A. Le, C. J. Maddison, M. Igl, F. Wood,
    Y. W. Teh, "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
    """

    def __init__(self, outer_particles: int = 1, num_particles: int = 1, max_plate_nesting: int = MAX_PLATE_NESTING):
        super().__init__(num_particles=outer_particles * num_particles, max_plate_nesting=max_plate_nesting)
        self.outer_particles, self.inner_particles = outer_particles, num_particles

    @property
    def weights_per_bound(self) -> int:
        return self.inner_particles

    def grouped(self, log_w: torch.Tensor) -> torch.Tensor:
        """log w (M·K, B) as (M, K, B)."""
        return log_w.reshape(self.outer_particles, self.inner_particles, *log_w.shape[1:])

    def example_bounds(self, model, guide, *args, **kwargs):
        log_w, scale, _ = self.log_weights(model, guide, args, kwargs)
        inner = torch.logsumexp(self.grouped(log_w), dim=1) - math.log(self.inner_particles)
        return inner.mean(0), scale


class CIWAE_ELBO(IWAE_ELBO):
    r"""The convex combination of the ELBO and IWAE on the same K particles (Rainforth et al. 2018)::

        CIWAE(K, β) = β · (1/K) Σ_k log w_k + (1 − β) · log (1/K) Σ_k w_k

    β = ``ciwae_beta`` in [0, 1]: CIWAE(K, 1) is the K-particle ELBO, CIWAE(K, 0) IWAE-K.
    Reparameterized gradient.
    """

    def __init__(self, num_particles: int = 1, ciwae_beta: float = 0.5, max_plate_nesting: int = MAX_PLATE_NESTING):
        if not 0 <= ciwae_beta <= 1:
            raise ValueError("ciwae_beta must be in [0, 1]")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.ciwae_beta = float(ciwae_beta)

    def example_bounds(self, model, guide, *args, **kwargs):
        log_w, scale, _ = self.log_weights(model, guide, args, kwargs)
        dim = self.particle_dim
        elbo = log_w.mean(dim)
        iwae = torch.logsumexp(log_w, dim=dim) - math.log(self.num_particles)
        return self.ciwae_beta * elbo + (1.0 - self.ciwae_beta) * iwae, scale


class PIWAE_ELBO(MIWAE_ELBO):
    r"""Partially importance-weighted: the decoder on IWAE(M·K), the encoder on MIWAE(M, K) (Rainforth et al. 2018).

    One set of M·K particles per example. The value, and the gradient of every
    model parameter θ, are IWAE(M·K)'s, Σ_j a_j ∇_θ log p_θ(x, z_j) with
    a_j = softmax over all M·K log weights; the gradient of the guide's
    parameters φ (through z and log q) is MIWAE(M, K)'s, Σ_j b_j ∇_φ log w_j with
    b_j = (1/M) · softmax of log w within z_j's group of K. One surrogate gives
    both: the IWAE(M·K) bound, with the gradient flowing into every latent value
    and into log q multiplied by b_j / a_j (bound late, as :class:`DReG_ELBO`
    does). A parameter that the prior shares with the guide (a VampPrior's
    encoder) gets IWAE's weight through its direct dependence in log p(z) and
    MIWAE's through z.
    """

    @property
    def weights_per_bound(self) -> int:
        return self.num_particles

    def example_bounds(self, model, guide, *args, **kwargs):
        late_scale = _LateGradientScale()
        log_w, scale, _ = self.log_weights(model, guide, args, kwargs, late_scale)
        dim = self.particle_dim
        detached = log_w.detach()
        log_all = torch.logsumexp(detached, dim=dim, keepdim=True)  # log Σ_j w_j
        log_group = torch.logsumexp(self.grouped(detached), dim=1, keepdim=True)  # log Σ_{k in group} w
        log_group = log_group.expand(-1, self.inner_particles, *log_group.shape[2:]).reshape(detached.shape)
        late_scale.factor = torch.exp(log_all - log_group) / self.outer_particles  # b_j / a_j
        return torch.logsumexp(log_w, dim=dim) - math.log(self.num_particles), scale


# --------------------------------------------------------------------------
# Registry builders (in the order the docs list them)
# --------------------------------------------------------------------------


def _pyro_options(spec: InferenceSpec) -> dict:
    return {
        "num_particles": spec.num_particles,
        "max_plate_nesting": MAX_PLATE_NESTING,
        "vectorize_particles": spec.num_particles > 1,
    }


@registry.register("estimator", "trace")
def trace_estimator(spec: InferenceSpec) -> ELBO:
    return Trace_ELBO(**_pyro_options(spec))


class MeanField_ELBO(TraceMeanField_ELBO):
    """Pyro's ``TraceMeanField_ELBO`` with a closed-form KL only where it is unbiased.

    Where the guide draws some site before a site that the model draws earlier
    (a bottom-up guide of stochastic layers: z_1, then z_2 ~ q(z_2 | z_1), while
    p(z_1 | z_2) depends on z_2), KL(q_s ‖ p_s) at the drawn parents is biased
    (:func:`pyro_vae.infer.log_weights.closed_form_allowed`); those sites take
    the sampled log p_s − log q_s, the others the closed form where registered.
    When every site allows it, this is ``TraceMeanField_ELBO`` itself. A discrete guide site is refused in one
    line (:func:`refuse_discrete_sites`).
    """

    def _get_trace(self, model, guide, args, kwargs):
        # Trace_ELBO's traces: the per-site rule replaces TraceMeanField_ELBO's whole-program order warning
        model_trace, guide_trace = Trace_ELBO._get_trace(self, model, guide, args, kwargs)
        refuse_discrete_sites(type(self).__name__, guide_trace)
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        allowed = weights.closed_form_allowed(weights.latent_sites(model_trace), weights.latent_sites(guide_trace))
        if all(allowed.values()):
            return super()._differentiable_loss_particle(model_trace, guide_trace)
        elbo = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                elbo = elbo + site["log_prob_sum"]
                continue
            q = guide_trace.nodes[name]
            exact = weights.closed_kl(q["fn"], site["fn"]) if allowed[name] else None
            if exact is None:
                elbo = elbo + site["log_prob_sum"] - q["score_parts"].entropy_term.sum()
            else:
                elbo = elbo - scale_and_mask(exact, scale=q["scale"], mask=q["mask"]).sum()
        return -(elbo.detach() if torch._C._get_tracing_state() else torch_item(elbo)), -elbo  # as Pyro's own


@registry.register("estimator", "meanfield")
def meanfield_estimator(spec: InferenceSpec) -> ELBO:
    return MeanField_ELBO(**_pyro_options(spec))


@dataclass
class TailAdaptiveConfig:
    """``tail-adaptive``: β_ta ≤ 0, the power of the tail rank (γ = F̂^β_ta)."""

    tail_adaptive_beta: float = field(default=-1.0, metadata=accepts(high=0))


@registry.register("estimator", "tail-adaptive", token=("num_particles",), config=TailAdaptiveConfig)
def tail_adaptive_estimator(spec: InferenceSpec) -> ELBO:
    if spec.num_particles < 2:
        raise UserInputError(
            f"'inference.num_particles' is {spec.num_particles}; the tail-adaptive estimator needs at least 2 particles"
        )
    return TailAdaptive_ELBO(num_particles=spec.num_particles, tail_adaptive_beta=spec.options.tail_adaptive_beta)


@registry.register("estimator", "iwae", token=("num_particles",))
def iwae_estimator(spec: InferenceSpec) -> ELBO:
    return IWAE_ELBO(num_particles=spec.num_particles)


@dataclass
class RenyiConfig:
    """``renyi``: α ≠ 1 (α = 0 is IWAE; α → 1 the ELBO)."""

    alpha: float = 0.5

    def check(self, key: str, spec) -> None:
        if self.alpha == 1.0:
            raise UserInputError(
                f"'{key}.alpha' is 1.0; the Rényi bound needs alpha != 1 (alpha = 1 is the ELBO: use 'trace')"
            )


@registry.register("estimator", "renyi", token=("num_particles", "alpha"), config=RenyiConfig)
def renyi_estimator(spec: InferenceSpec) -> ELBO:
    return Renyi_ELBO(alpha=spec.options.alpha, num_particles=spec.num_particles)


@registry.register("estimator", "stl")
def stl_estimator(spec: InferenceSpec) -> ELBO:
    return STL_ELBO(num_particles=spec.num_particles)


@registry.register("estimator", "dreg", token=("num_particles",))
def dreg_estimator(spec: InferenceSpec) -> ELBO:
    return DReG_ELBO(num_particles=spec.num_particles)


@dataclass
class OuterConfig:
    """``miwae``, ``piwae``: M, the number of IWAE-K bounds per example (M·K particles)."""

    outer_particles: int = field(default=1, metadata=accepts(1))


@registry.register("estimator", "miwae", token=("outer_particles", "num_particles"), config=OuterConfig)
def miwae_estimator(spec: InferenceSpec) -> ELBO:
    return MIWAE_ELBO(outer_particles=spec.options.outer_particles, num_particles=spec.num_particles)


@dataclass
class CIWAEConfig:
    """``ciwae``: β ∈ [0, 1], the weight on the ELBO (β ELBO + (1 − β) IWAE)."""

    ciwae_beta: float = field(default=0.5, metadata=accepts(0, 1))


@registry.register("estimator", "ciwae", token=("num_particles", "ciwae_beta"), config=CIWAEConfig)
def ciwae_estimator(spec: InferenceSpec) -> ELBO:
    return CIWAE_ELBO(num_particles=spec.num_particles, ciwae_beta=spec.options.ciwae_beta)


@registry.register("estimator", "piwae", token=("outer_particles", "num_particles"), config=OuterConfig)
def piwae_estimator(spec: InferenceSpec) -> ELBO:
    return PIWAE_ELBO(outer_particles=spec.options.outer_particles, num_particles=spec.num_particles)


# --------------------------------------------------------------------------
# Training-loop helpers
# --------------------------------------------------------------------------


def bound_and_backward(elbo: ELBO, model, guide, *args, **kwargs) -> torch.Tensor:
    """One estimator step: backpropagate its gradient and return the detached loss (−bound).

    Uses ``differentiable_loss`` where the ELBO has one (Trace_ELBO,
    TraceMeanField_ELBO and the classes here): no ``.item()`` of ours, though
    Pyro's own Trace_ELBO calls ``.item()`` inside. Otherwise
    ``loss_and_grads`` (TraceGraph_ELBO), whose float comes back as a tensor.
    """
    if hasattr(elbo, "differentiable_loss"):
        loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.detach()
    return torch.tensor(elbo.loss_and_grads(model, guide, *args, **kwargs))  # type: ignore[attr-defined]


def bound(elbo: ELBO, model, guide, *args, **kwargs) -> torch.Tensor:
    """The estimator's bound (−loss) without gradients (for tail-adaptive, the IWAE bound of its particles)."""
    with torch.no_grad():
        if hasattr(elbo, "differentiable_loss"):
            return -elbo.differentiable_loss(model, guide, *args, **kwargs).detach()
        return -torch.tensor(elbo.loss(model, guide, *args, **kwargs))  # type: ignore[attr-defined]
