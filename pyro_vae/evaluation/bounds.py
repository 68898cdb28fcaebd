"""Test ELBO, importance-sampled log-likelihood and active units, in nats per example.

Every number comes from the traces of the VAE's own Pyro model and guide
(:func:`pyro_vae.infer.log_weights.log_weights`): for each example x and K draws
z_k ~ q_φ(z|x), with log w_k = log p_θ(x|z_k) + log p(z_k) − log q_φ(z_k|x)
summed over every site of the two programs,

- ``elbo``            = (1/K) Σ_k log w_k  (Monte Carlo ELBO)
- ``reconstruction``  = (1/K) Σ_k log p_θ(x|z_k)  (the model's observed sites)
- ``kl``              = KL(q_φ(z|x) ‖ p(z)) summed over the latent sites: closed form
                         for a site whose pair has a registered ``kl_divergence``, else
                         (1/K) Σ_k [log q − log p] of that site
- ``elbo_analytic_kl`` = reconstruction − kl
- ``log_likelihood``  = log (1/K) Σ_k w_k, the importance-sampled estimate of
  log p(x) (Burda et al. 2016): a lower bound in expectation that rises to
  log p(x) as K grows.
- ``ess``, ``pareto_k``, ``log_likelihood_reliable``: the weights' effective
  sample size and Pareto k̂ (:mod:`pyro_vae.evaluation.diagnostics`), saying how far the
  log-likelihood can be trusted.

The program runs on passes of at most ``rows`` (particle, example) pairs: all
K particles of several examples, or, for large K, blocks of one example's
particles. ``rows`` keeps every activation of the model and guide of one pass
under ``memory_mb`` (measured on the VAE itself: what each pair adds, so a
convolutional decoder's feature maps count, and what a pass holds whatever its
size, such as a VampPrior's pseudo-inputs through the encoder). The speed lives
in the parts and the model: on a CPU the likelihood of a pass is taken in blocks
whose decoder outputs stay in cache (:mod:`pyro_vae.parts.decoded`), and the
densities have their own fast forms (:mod:`pyro_vae.parts.distributions`).

A conditional VAE (``model.condition: label``) is scored with the examples'
``labels`` as its programs' ``y``: every figure is then conditional on the
label, and ``log_likelihood`` estimates log p(x | y).
"""

from __future__ import annotations

import math
from typing import Iterator

import pyro
import torch

from pyro_vae.conditional import program_kwargs
from pyro_vae.evaluation import diagnostics
from pyro_vae.hierarchy import HierarchicalVAE
from pyro_vae.infer.log_weights import LogWeights, closed_form_allowed, log_weights
from pyro_vae.model import VAE

ACTIVE_UNIT_THRESHOLD = 0.01
TEMPORARIES = 3  # bytes of a pass, as a multiple of its modules' outputs (temporaries, log-densities)


def _own_draws(device: torch.device):
    """A block whose random draws leave the caller's generators where they were (a probe, a note)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _probe_bytes(vae: VAE, x: torch.Tensor, labels: torch.Tensor | None, num_particles: int = 1) -> int:
    """Bytes of every module's output (each distinct tensor once) and of ``x`` in one pass of the programs on ``x``
    with ``num_particles`` particles.

    The outputs are held until the end of the pass, so a freed tensor's memory cannot be reused by a later one
    and counted once for both.
    """
    seen: dict[int, torch.Tensor] = {}

    def count(module, inputs, output) -> None:
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if torch.is_tensor(tensor):
                seen[tensor.data_ptr()] = tensor

    handles = [m.register_forward_hook(count) for m in vae.modules()]
    try:
        with torch.no_grad(), pyro.validation_enabled(False), _own_draws(x.device):
            log_weights(vae.model, vae.guide, x, num_particles=num_particles, **program_kwargs(labels))
    finally:
        for handle in handles:
            handle.remove()
    return sum(t.numel() * t.element_size() for t in seen.values()) + x.numel() * x.element_size()


def pass_bytes(vae: VAE, x: torch.Tensor, labels: torch.Tensor | None = None, num_samples: int = 1) -> tuple[int, int]:
    """``(fixed, per_row)``: a pass of ``rows`` (particle, example) pairs, ``num_samples`` particles per example,
    holds fixed + rows · per_row bytes.

    Measured on the VAE itself from three passes, each module's outputs counted TEMPORARIES times: one example
    with one particle, two examples with one particle each, one example with two particles. A particle adds
    ``per_particle`` (its draw and the decoder's outputs for it, so a convolutional decoder's feature maps count),
    an example ``per_example`` (its encoder's outputs), so each pair of a pass with K particles per example adds
    per_row = per_particle + per_example / K; ``fixed`` is what a pass holds whatever its size (a VampPrior's
    pseudo-inputs through the encoder, say).
    """
    pair = torch.arange(2) % x.shape[0]  # the first two examples, or the one twice (an index any device takes)
    one = _probe_bytes(vae, x[:1], _first(labels, 1))
    per_particle = max(_probe_bytes(vae, x[:1], _first(labels, 1), num_particles=2) - one, 1)
    two_examples = _probe_bytes(vae, x[pair], None if labels is None else labels[pair])
    per_example = max(two_examples - one - per_particle, 0)
    per_row = per_particle + math.ceil(per_example / num_samples)
    return TEMPORARIES * max(one - per_particle - per_example, 0), TEMPORARIES * per_row


def row_bytes(vae: VAE, x: torch.Tensor, labels: torch.Tensor | None = None, num_samples: int = 1) -> int:
    """Bytes one more (particle, example) pair adds to a pass (``pass_bytes``'s ``per_row``)."""
    return pass_bytes(vae, x, labels, num_samples)[1]


def _first(labels: torch.Tensor | None, count: int) -> torch.Tensor | None:
    return None if labels is None else labels[:count]


def _chunk(labels: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if labels is None else labels[start:stop]


def rows_per_pass(
    vae: VAE, x: torch.Tensor, memory_mb: float, labels: torch.Tensor | None = None, num_samples: int = 1
) -> int:
    """(particle, example) pairs per pass, ``num_samples`` particles per example: fixed + rows · per_row bytes
    (``pass_bytes``) under ``memory_mb``, at least one."""
    fixed, per_row = pass_bytes(vae, x, labels, num_samples)
    return max(1, int((memory_mb * 2**20 - fixed) // per_row))


def passes(num_examples: int, num_samples: int, rows: int) -> Iterator[tuple[int, int, list[int]]]:
    """``(start, stop, particle blocks)`` covering every example with K = ``num_samples`` particles each.

    K ≤ rows: rows // K examples per chunk, all K particles in one block; else one
    example per chunk and its K particles in near-equal blocks of at most ``rows``.
    """
    if num_samples <= rows:
        step = max(1, rows // num_samples)
        for start in range(0, num_examples, step):
            yield start, min(start + step, num_examples), [num_samples]
        return
    count = math.ceil(num_samples / rows)
    sizes = [num_samples // count + (1 if i < num_samples % count else 0) for i in range(count)]
    for start in range(num_examples):
        yield start, start + 1, sizes


def chunk_sites(
    vae: VAE, x: torch.Tensor, blocks: list[int], labels: torch.Tensor | None = None
) -> Iterator[LogWeights]:
    """The :class:`~pyro_vae.infer.log_weights.LogWeights` of each particle block for the examples ``x``
    (with their ``labels``, for a conditional VAE)."""
    for size in blocks:
        yield log_weights(vae.model, vae.guide, x, num_particles=size, **program_kwargs(labels))


@torch.no_grad()
def log_weight_terms(
    vae: VAE, x: torch.Tensor, num_samples: int, memory_mb: float = 512.0, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(x|z), log p(z), log q(z|x)) of K = ``num_samples`` draws per example, each (K, B), from the program."""
    was_training = vae.training
    vae.eval()
    parts: list[list[torch.Tensor]] = [[], [], []]
    with pyro.validation_enabled(False):
        for start, stop, blocks in passes(
            x.shape[0], num_samples, rows_per_pass(vae, x, memory_mb, labels, num_samples)
        ):
            sites = list(chunk_sites(vae, x[start:stop], blocks, _chunk(labels, start, stop)))
            for part, name in zip(parts, ("log_likelihood", "log_prior", "log_guide")):
                part.append(torch.cat([getattr(s, name).expand(s.log_w.shape) for s in sites]))
    vae.train(was_training)
    log_likelihood, log_prior, log_guide = (torch.cat(part, dim=1) for part in parts)
    return log_likelihood, log_prior, log_guide


@torch.no_grad()
def evaluate(
    vae: VAE,
    data: torch.Tensor,
    num_samples: int = 1000,
    memory_mb: float = 512.0,
    per_example: bool = False,
    progress=None,
    labels: torch.Tensor | None = None,
) -> dict:
    """All the per-example bounds on ``data``, averaged, with their standard errors.

    ``labels``: the examples' labels, which a conditional VAE needs (its bounds are then those of log p(x | y)).

    ``progress`` (a :func:`pyro_vae.progress.bar`) is advanced by the examples of each chunk.

    ``per_example=True`` adds ``"per_example"``: the ELBO and log-likelihood
    estimate of every example (float64 tensors), for paired comparisons of two
    models on the same data.

    An M2 VAE (:class:`pyro_vae.semisupervised.SemiSupervisedVAE`) is scored with its class y summed out
    exactly inside each importance weight (:func:`pyro_vae.semisupervised.evaluate`).
    """
    from pyro_vae import semisupervised  # it scores through this module's passes

    if isinstance(vae, semisupervised.SemiSupervisedVAE):
        return semisupervised.evaluate(vae, data, num_samples, memory_mb, per_example, progress)
    was_training = vae.training
    vae.eval()
    names = ("elbo", "reconstruction", "kl_sampled", "kl", "ll", "ess", "khat")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    layers: dict[str, list[torch.Tensor]] = {}
    layer_closed: dict[str, bool] = {}
    closed_form = True
    with pyro.validation_enabled(False):  # z is drawn from q: no support checks of the K × B draws
        for start, stop, blocks in passes(
            data.shape[0], num_samples, rows_per_pass(vae, data, memory_mb, labels, num_samples)
        ):
            columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("log_w", "log_lik", "kl_sampled", "kl")}
            site_kl: dict[str, list[torch.Tensor]] = {}
            for sites in chunk_sites(vae, data[start:stop], blocks, _chunk(labels, start, stop)):
                log_w = sites.log_w
                terms, closed = sites.kl_terms()
                kl = sum(terms.values(), log_w.new_zeros(()))
                closed_form = closed_form and all(closed.values())
                for name, term in terms.items():
                    site_kl.setdefault(name, []).append(term.expand(log_w.shape))
                    layer_closed[name] = layer_closed.get(name, True) and closed.get(name, False)
                columns["log_w"].append(log_w)
                columns["log_lik"].append(sites.log_likelihood.expand(log_w.shape))
                columns["kl_sampled"].append((sites.log_guide - sites.log_prior).expand(log_w.shape))
                columns["kl"].append(kl.expand(log_w.shape))
                del sites, terms  # the pass's traces freed before the next pass is drawn
            log_w, log_lik, kl_sampled, kl = (torch.cat(v) for v in columns.values())
            parts["elbo"].append(log_w.mean(0))
            parts["reconstruction"].append(log_lik.mean(0))
            parts["kl_sampled"].append(kl_sampled.mean(0))
            parts["kl"].append(kl.mean(0))
            for name, chunks in site_kl.items():
                layers.setdefault(name, []).append(torch.cat(chunks).mean(0))
            parts["ll"].append(torch.logsumexp(log_w, 0) - math.log(num_samples))
            parts["ess"].append(diagnostics.effective_sample_fraction(log_w))
            parts["khat"].append(diagnostics.pareto_k(log_w).to(log_w.device))
            if progress is not None:
                progress.update(stop - start)
    vae.train(was_training)
    values = {k: torch.cat(v).double() for k, v in parts.items()}
    n = data.shape[0]
    summary = {
        "elbo": values["elbo"].mean().item(),
        "elbo_analytic_kl": (values["reconstruction"] - values["kl"]).mean().item(),
        "reconstruction": values["reconstruction"].mean().item(),
        "kl": values["kl"].mean().item(),
        "kl_closed_form": closed_form,
        "log_likelihood": values["ll"].mean().item(),
        "elbo_stderr": (values["elbo"].std() / math.sqrt(n)).item() if n > 1 else 0.0,
        "log_likelihood_stderr": (values["ll"].std() / math.sqrt(n)).item() if n > 1 else 0.0,
        "num_samples": num_samples,
        "num_examples": n,
        "units": "nats per example",
        **diagnostics.summarize(values["ess"], values["khat"], num_samples),
    }
    if len(layers) > 1:
        summary["layers"] = {
            name: {"kl": torch.cat(v).double().mean().item(), "kl_closed_form": layer_closed[name]}
            for name, v in layers.items()
        }
    if per_example:
        summary["per_example"] = {"elbo": values["elbo"].cpu(), "log_likelihood": values["ll"].cpu()}
    return summary


def test_elbo(
    vae: VAE,
    data: torch.Tensor,
    num_samples: int = 1,
    memory_mb: float = 512.0,
    seed: int | None = None,
    labels: torch.Tensor | None = None,
) -> dict:
    """ELBO and its two terms per example, from ``num_samples`` draws each (``train.eval_num_samples``):
    the per-epoch test figure. The KL term is closed form where one is registered.

    With ``seed``, the draws come from torch's generator (CPU, and ``data``'s CUDA
    device) seeded with it inside :func:`torch.random.fork_rng`: the generators'
    states afterwards are those from before, so evaluating changes no later draw.
    Without it, the draws continue torch's global generator. ``labels`` as in :func:`evaluate`.
    """
    if seed is None:
        return _test_elbo(vae, data, num_samples, memory_mb, labels)
    with _own_draws(data.device):
        torch.default_generator.manual_seed(seed)
        if data.is_cuda:
            torch.cuda.default_generators[data.device.index].manual_seed(seed)
        return _test_elbo(vae, data, num_samples, memory_mb, labels)


@torch.no_grad()
def _test_elbo(
    vae: VAE, data: torch.Tensor, num_samples: int, memory_mb: float, labels: torch.Tensor | None = None
) -> dict:
    was_training = vae.training
    vae.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=data.device)
    with pyro.validation_enabled(False):
        for start, stop, blocks in passes(
            data.shape[0], num_samples, rows_per_pass(vae, data, memory_mb, labels, num_samples)
        ):
            for sites in chunk_sites(vae, data[start:stop], blocks, _chunk(labels, start, stop)):
                log_lik = sites.log_likelihood.expand(sites.log_w.shape)
                kl = sites.kl()[0].expand(log_lik.shape)
                terms = torch.stack([log_lik - kl, log_lik, kl]).double()  # float64 sums: the same whatever the passes
                totals += terms.flatten(1).sum(1) / num_samples
    vae.train(was_training)
    elbo, reconstruction, kl = (totals / data.shape[0]).tolist()
    return {"test_elbo": elbo, "test_reconstruction": reconstruction, "test_kl": kl}


def kl_note(vae: VAE, x: torch.Tensor, labels: torch.Tensor | None = None) -> str | None:
    """Which latent sites' KL(q ‖ p) ``meanfield`` samples, and why, as one line; None if all are closed-form.

    A site is sampled when its pair has no registered closed form, or when the
    guide draws it before a layer its prior depends on (a bottom-up guide:
    :func:`pyro_vae.infer.log_weights.closed_form_allowed`). ``labels``: a conditional VAE's.
    """
    with torch.no_grad(), pyro.validation_enabled(False), _own_draws(x.device):
        sites = log_weights(vae.model, vae.guide, x[:2], num_particles=1, **program_kwargs(_first(labels, 2)))
        _, closed = sites.kl()
    sampled = [name for name, has in closed.items() if not has]
    if not sampled:
        return None
    allowed = closed_form_allowed(sites.model, sites.guide)
    ordered = [name for name in sampled if not allowed[name]]
    unregistered = [name for name in sampled if allowed[name]]
    notes = []
    if unregistered:
        pairs = ", ".join(
            f"{name}: KL({_name(sites.guide[name].fn)} ‖ {_name(sites.model[name].fn)})" for name in unregistered
        )
        notes.append(f"{pairs} has no closed form")
    if ordered:
        notes.append(
            f"{', '.join(ordered)}: the guide draws it before a layer its prior depends on, where a closed form "
            f"would be biased"
        )
    exact = [name for name, has in closed.items() if has]
    tail = f"; closed-form: {', '.join(exact)}" if exact and len(closed) > 1 else ""
    return (
        f"meanfield: {'; '.join(notes)}; that term is estimated by sampling "
        f"log q(z|x) − log p(z) at z ~ q (unbiased, higher variance){tail}"
    )


def _name(fn: torch.distributions.Distribution) -> str:
    """A distribution's name, looking inside ``Independent`` (``Normal``, not ``Independent``)."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return type(fn).__name__


@torch.no_grad()
def active_units(
    vae: VAE,
    data: torch.Tensor,
    batch_size: int = 1024,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
    labels: torch.Tensor | None = None,
) -> int:
    """Latent dimensions whose posterior mean varies across examples: Cov_x(E_q[z|x]) > 0.01 (Burda et al. 2016).

    A conditional VAE's posterior means are those of q(z | x, y) at the examples' ``labels``.
    """
    means = torch.cat(
        [
            vae.encode(data[i : i + batch_size], _chunk(labels, i, i + batch_size))[0]
            for i in range(0, data.shape[0], batch_size)
        ]
    )
    return int((means.var(0) > threshold).sum())


@torch.no_grad()
def layer_active_units(
    vae: VAE,
    data: torch.Tensor,
    batch_size: int = 1024,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
    labels: torch.Tensor | None = None,
) -> dict[str, dict[str, int]]:
    """Per latent site, ``{"active_units": A, "dim": d}``: Cov_x(E_q[z_l|x]) > 0.01 per unit of each layer.

    A one-layer VAE has the one site ``z`` (:func:`active_units`); a layered one
    takes E_q[z_l | x] from :meth:`~pyro_vae.hierarchy.HierarchicalVAE.layer_means`. A conditional VAE's means
    are those of q(z_l | x, y) at ``labels``.
    """
    if not isinstance(vae, HierarchicalVAE):
        return {"z": {"active_units": active_units(vae, data, batch_size, threshold, labels), "dim": vae.latent_dim}}
    chunks = [
        vae.layer_means(data[i : i + batch_size], y=_chunk(labels, i, i + batch_size))
        for i in range(0, data.shape[0], batch_size)
    ]
    return {
        name: {"active_units": int((torch.cat([c[name] for c in chunks]).var(0) > threshold).sum()), "dim": dim}
        for name, dim in zip(vae.sites, vae.dims)
    }
