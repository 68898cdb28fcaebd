r"""log w from the traces of the model and the guide: where every number the package reports comes from.

For each example x_b and K particles, the guide is run once with a vectorized
particle plate of size K (at dim −(max_plate_nesting + 1)), and the model is
replayed on the guide's draws. Every sample site s of either program keeps its
**unscaled** log-density, summed over its event dims::

    model:  log p_s(value_s | parents),  observed sites (x) and latent sites (z)
    guide:  log q_s(z_s | x, parents)

and its weight β_s, the site's own scale with the subsampling factor N/B of the
plates shared by every site divided out (``poutine.scale`` of a β-VAE or a KL
warm-up; 1 otherwise), times its mask (0 where ``poutine.mask`` hides it). Then,
per particle and example::

    log w = Σ_model β_s log p_s − Σ_guide β_s log q_s

and a bound over a minibatch is N/B · Σ_b f(log w_{·b}) (the N/B factor is
applied *after* the function of the particles, see :mod:`pyro_vae.infer.estimators`).
The decomposition is kept too: :attr:`LogWeights.log_likelihood` (the observed
sites: log p(x|z)), :attr:`LogWeights.log_prior` (the model's latent sites:
log p(z)) and :attr:`LogWeights.log_guide` (log q(z|x)), unweighted, each of
shape (K, B), and the per-site pairs for closed-form KL terms
(:meth:`LogWeights.kl`).

Training estimators (:mod:`pyro_vae.infer.estimators`), the per-epoch test ELBO,
``evaluate``, ``compare`` and ``table`` all take their numbers from
:func:`log_weights`, so a part is scored by the same density it is trained
with; the speed of evaluation lives inside the parts' own distributions
(:mod:`pyro_vae.parts.distributions`).

Plates other than the ones every site shares (the particle plate and the data
plate), such as a plate nested inside the data plate, are summed inside log w.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, cast

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match
from torch import nn
from torch.distributions import TransformedDistribution, kl_divergence

PARTICLE_PLATE = "num_particles_vectorized"


@dataclass
class Site:
    """One sample site's share of log w.

    ``log_prob``: the unscaled log-density, event dims summed (batch shape,
    broadcastable against (K, B)); ``weight``: β_s (a float or a tensor);
    ``mask``: the site's mask or None; ``dims``: the plate dims to sum beyond
    the shared plates; ``fn``, ``value``: the site's distribution and value.
    """

    name: str
    log_prob: torch.Tensor
    weight: float | torch.Tensor
    mask: torch.Tensor | bool | None
    dims: tuple[int, ...]
    observed: bool
    fn: torch.distributions.Distribution
    value: torch.Tensor

    def weighted(self) -> torch.Tensor:
        """β_s log p_s with the mask applied, summed over the site's own plates."""
        out = scale_and_mask(self.log_prob, self.weight, self.mask)
        return out.sum(self.dims, keepdim=True) if self.dims else out

    def unweighted(self) -> torch.Tensor:
        """log p_s, masked entries 0, summed over the site's own plates."""
        out = scale_and_mask(self.log_prob, 1.0, self.mask)
        return out.sum(self.dims, keepdim=True) if self.dims else out


def _total(terms) -> torch.Tensor:
    """Σ terms; the float 0.0, which adds to a tensor as a zero tensor would, when there are none."""
    out: torch.Tensor | float = 0.0
    for term in terms:
        out = out + term
    return cast(torch.Tensor, out)


@dataclass
class LogWeights:
    """The model's and the guide's sites of K particles per example, and N/B (see the module docstring)."""

    model: dict[str, Site]
    guide: dict[str, Site]
    scale: float
    model_trace: poutine.Trace
    guide_trace: poutine.Trace

    @property
    def log_p(self) -> torch.Tensor:
        """Σ_model β_s log p_s, (K, B)."""
        return _total(site.weighted() for site in self.model.values())

    @property
    def log_q(self) -> torch.Tensor:
        """Σ_guide β_s log q_s, (K, B)."""
        return _total(site.weighted() for site in self.guide.values())

    @property
    def log_w(self) -> torch.Tensor:
        """log w = log p − log q, (K, B)."""
        return self.log_p - self.log_q

    @property
    def log_likelihood(self) -> torch.Tensor:
        """log p(x | z): the model's observed sites, unweighted, (K, B)."""
        return _total(site.unweighted() for site in self.model.values() if site.observed)

    @property
    def log_prior(self) -> torch.Tensor:
        """log p(z): the model's latent sites, unweighted, (K, B)."""
        return _total(site.unweighted() for site in self.model.values() if not site.observed)

    @property
    def log_guide(self) -> torch.Tensor:
        """log q(z | x): the guide's sites, unweighted, (K, B)."""
        return _total(site.unweighted() for site in self.guide.values())

    def kl(self) -> tuple[torch.Tensor, dict[str, bool]]:
        """KL(q ‖ p) summed over the latent sites, (K, B), and which sites had a closed form (:meth:`kl_terms`)."""
        terms, closed = self.kl_terms()
        return _total(terms.values()), closed

    def kl_terms(self) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
        """Each guide site's KL(q_s ‖ p_s), broadcastable against (K, B), and which had a closed form.

        A site takes the registered ``kl_divergence`` of its pair (q_s, p_s),
        evaluated at the particle's draws of the sites p_s depends on, only
        where that is unbiased (:func:`closed_form_allowed`: the guide drew every
        latent site the model draws before s, before s); any other takes the
        sampled log q_s − log p_s of the same draws.
        """
        allowed = closed_form_allowed(self.model, self.guide)
        terms, closed = {}, {}
        for name, q in self.guide.items():
            p = self.model.get(name)
            if p is None:
                terms[name] = q.unweighted()
                continue
            exact = closed_kl(q.fn, p.fn) if allowed[name] else None
            closed[name] = exact is not None
            if exact is None:
                terms[name] = q.unweighted() - p.unweighted()
            else:
                exact = scale_and_mask(exact, 1.0, q.mask)
                terms[name] = exact.sum(q.dims, keepdim=True) if q.dims else exact
        return terms, closed


def closed_kl(q: torch.distributions.Distribution, p: torch.distributions.Distribution) -> torch.Tensor | None:
    """``kl_divergence(q, p)`` where the pair is registered, else None."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def closed_form_allowed(model: Iterable[str], guide: Iterable[str]) -> dict[str, bool]:
    """Per guide site s: may KL(q_s ‖ p_s) be taken in closed form without bias?

    The closed form at the particle's draws of s's parents is unbiased when
    those draws do not depend on z_s: when the guide draws every latent site
    that the model draws before s (its possible parents) before s, as a
    top-down or ladder guide does. A bottom-up guide draws z_1 first and z_2
    from q(z_2 | z_1), so KL(q(z_1|x) ‖ p(z_1|z_2)) is not (it is sampled).
    ``model``, ``guide``: the latent site names in the order each program drew them
    (observed names in ``model`` are ignored when absent from ``guide``).
    """
    order = {name: i for i, name in enumerate(guide)}
    earlier: list[str] = []
    allowed = {}
    for name in model:
        if name not in order:
            continue
        allowed[name] = all(order[parent] < order[name] for parent in earlier)
        earlier.append(name)
    return {name: allowed.get(name, True) for name in order}


def cached_base_draw(fn: torch.distributions.Distribution, value: torch.Tensor) -> torch.Tensor | None:
    """The base draw x₀ of a flow ``fn`` whose transforms cached the forward pass that made ``value``.

    For a ``TransformedDistribution`` over vectors (event dim 1, base and value of
    the same size, so each transform acts on elements or on vectors) whose every
    transform holds the pair (x_t, x_{t+1}) of that pass, ending at ``value``
    itself: x₀, detached. None for any other distribution, or when a cache
    holds another pass.
    """
    if not isinstance(fn, TransformedDistribution) or value.dim() < 1:
        return None
    if fn.event_shape != value.shape[-1:] or fn.base_dist.event_shape != value.shape[-1:]:
        return None
    y = value
    for transform in reversed(fn.transforms):
        x, cached_y = getattr(transform, "_cached_x_y", (None, None))
        if x is None or cached_y is not y:
            return None
        y = x
    return y.detach()


def flow_score(fn: TransformedDistribution, base: torch.Tensor) -> torch.Tensor:
    r"""∇_z log q(z) at z = T(x₀), from the base draw x₀ of a flow (:func:`cached_base_draw`), without inverting T.

    With J = ∂T/∂x₀, by the chain rule through x₀ = T⁻¹(z)::

        g(x₀) = log q(T(x₀)) = log q₀(x₀) − Σ_t log |det ∂x_{t+1}/∂x_t|
        ∇_z log q(z) = J⁻ᵀ ∇_{x₀} g(x₀)

    J and ∇g are forward-mode derivatives along the unit tangents e₁ … e_d
    (d = the event size), batched by ``torch.func.vmap`` over the tangents only,
    so the flow itself runs once; the parameters are held fixed (no gradient is
    recorded). The transforms run as shallow copies, so the flow's own caches
    keep the pass that drew the sample.
    """
    transforms = [copy.copy(t) for t in fn.transforms]

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, g) at x₀ = x."""
        log_q = fn.base_dist.log_prob(x)
        for transform in transforms:
            y = transform(x)
            log_det = transform.log_abs_det_jacobian(x, y)
            log_q = log_q - (log_det.sum(-1) if transform.domain.event_dim == 0 else log_det)
            x = y
        return x, log_q

    def along(unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(∂z/∂x₀, ∂g/∂x₀) along the direction ``unit``."""
        return torch.func.jvp(forward, (base,), (unit.expand_as(base),))[1]

    with torch.no_grad():
        columns, partials = torch.func.vmap(along)(torch.eye(base.shape[-1], dtype=base.dtype, device=base.device))
    jacobian = columns.movedim(0, -1)  # [..., j, i] = ∂z_j/∂x₀_i
    gradient = partials.movedim(0, -1)  # [..., i] = ∂g/∂x₀_i
    return torch.linalg.solve(jacobian.transpose(-1, -2), gradient)


def _site_log_prob(site: dict, path_derivative: bool) -> torch.Tensor:
    """Unscaled log-density of one sample site (batch shape; event dims summed).

    With ``path_derivative`` the value is the same, but the gradient is only the
    path derivative ∇_z log q(z) · ∂z/∂φ: for a flow whose transforms cached
    the draw (an IAF guide), log q(z)ᵈ + ⟨s, z − zᵈ⟩ with s = ∇_z log q(z)ᵈ from
    :func:`flow_score` (ᵈ: detached), so the flow is never inverted; for any
    other site log q(z) − [log q(zᵈ) − log q(zᵈ)ᵈ].
    """
    fn, value = site["fn"], site["value"]
    log_prob = fn.log_prob(value, *site["args"], **site["kwargs"])
    if not path_derivative:
        return log_prob
    base = cached_base_draw(fn, value)
    if base is not None:
        score = flow_score(fn, base)
        return log_prob.detach() + (score * (value - value.detach())).sum(-1)
    fixed = fn.log_prob(value.detach(), *site["args"], **site["kwargs"])
    return log_prob - (fixed - fixed.detach())


def _sites(trace: poutine.Trace) -> list[Any]:
    return [site for site in trace.nodes.values() if site["type"] == "sample"]


def traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    max_plate_nesting: int = 1,
    scale_values: Callable | None = None,
) -> tuple[poutine.Trace, poutine.Trace]:
    """``(model_trace, guide_trace)``: the guide run with ``num_particles`` vectorized particles, the model replayed.

    ``scale_values`` (DReG, PIWAE) wraps each latent value, given its event dim,
    before the model sees it. Subsample sites are pruned; with Pyro's validation
    on, the two traces are checked to match.
    """
    particles = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))
    guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
    replayed = guide_trace
    if scale_values is not None:
        replayed = guide_trace.copy()
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                replayed.nodes[name] = {**site, "value": scale_values(site["value"], site["fn"].event_dim)}  # type: ignore[attr-defined]
    model_trace = poutine.trace(poutine.replay(particles(model), trace=replayed)).get_trace(*args, **kwargs)
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting + 1)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def latent_sites(trace: poutine.Trace) -> list[str]:
    """The names of the trace's unobserved sample sites, in the order they were drawn."""
    return [site["name"] for site in _sites(trace) if not site["is_observed"] and not site_is_subsample(site)]


class _Call(nn.Module):
    """A module whose forward is ``fn``, holding ``owner``: so ``functional_call`` can swap ``owner``'s parameters."""

    def __init__(self, owner: nn.Module, fn: Callable):
        super().__init__()
        self.owner, self.fn = owner, fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def path_trace(
    guide: Callable, guide_trace: poutine.Trace, args: tuple, kwargs: dict, num_particles: int, max_plate_nesting: int
) -> poutine.Trace:
    """The guide replayed on ``guide_trace``'s draws with its module's parameters detached.

    Its log q_s(z_s | parents) then has only path derivatives: through z_s and
    through the earlier draws that q_s depends on (a layered guide's
    q(z_2 | z_1)), none through φ directly — the STL/DReG guide term when a
    guide site depends on another. ``guide`` must be a method of an ``nn.Module``.
    """
    owner = getattr(guide, "__self__", None)
    if not isinstance(owner, nn.Module):
        raise NotImplementedError(
            "a path-derivative estimator on a guide with several latent sites needs the "
            "guide to be a method of an nn.Module"
        )
    particles = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))
    tracer = poutine.trace(poutine.replay(particles(guide), trace=guide_trace))
    detached = {f"owner.{name}": p.detach().requires_grad_(p.requires_grad) for name, p in owner.named_parameters()}
    torch.func.functional_call(_Call(owner, tracer), detached, args, kwargs)
    return prune_subsample_sites(tracer.trace)


def from_traces(
    model_trace: poutine.Trace,
    guide_trace: poutine.Trace,
    path_derivative: bool = False,
    detached_trace: poutine.Trace | None = None,
) -> LogWeights:
    """The :class:`LogWeights` of a (model, guide) trace pair.

    The plates every site shares set N/B (``scale``); each site's weight is its
    ``site["scale"]`` divided by N/B. ``path_derivative`` (STL, DReG): the
    guide's latent sites keep only the path derivative of log q, from
    ``detached_trace`` (:func:`path_trace`) where given (a guide with several
    latent sites), else by the surrogate log q(z) − [log q(z.detach()) − log q(z.detach()).detach()].
    """
    model_sites, guide_sites = _sites(model_trace), _sites(guide_trace)
    shared = set.intersection(*(set(s["cond_indep_stack"]) for s in model_sites + guide_sites))
    scale = math.prod(f.full_size / f.size for f in shared if f.full_size)

    def collect(sites: list[dict], stl: bool) -> dict[str, Site]:
        out = {}
        for site in sites:
            dims = tuple(f.dim for f in site["cond_indep_stack"] if f.vectorized and f not in shared)
            path = stl and not site["is_observed"]
            if path and detached_trace is not None:
                log_prob = _site_log_prob(cast(dict, detached_trace.nodes[site["name"]]), False)
            else:
                log_prob = _site_log_prob(site, path)
            out[site["name"]] = Site(
                site["name"],
                log_prob,
                site["scale"] / scale,
                site["mask"],
                dims,
                bool(site["is_observed"]),
                site["fn"],
                site["value"],
            )
        return out

    return LogWeights(
        collect(model_sites, False), collect(guide_sites, path_derivative), scale, model_trace, guide_trace
    )


def log_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    max_plate_nesting: int = 1,
    path_derivative: bool = False,
    scale_values: Callable | None = None,
    **kwargs,
) -> LogWeights:
    """The sites of ``num_particles`` particles per example of ``model``/``guide`` called with ``args``, ``kwargs``.

    ``log_weights(vae.model, vae.guide, x, num_particles=K).log_w`` is log w of
    shape (K, B); see :class:`LogWeights` for the rest.
    """
    model_trace, guide_trace = traces(model, guide, args, kwargs, num_particles, max_plate_nesting, scale_values)
    detached = None
    if path_derivative and len(latent_sites(guide_trace)) > 1:
        detached = path_trace(guide, guide_trace, args, kwargs, num_particles, max_plate_nesting)
    return from_traces(model_trace, guide_trace, path_derivative, detached)
