"""Test ELBO, importance-sampled log-likelihood and active units, in nats per example.

For each example x and K draws z_k ~ q_φ(z|x), with log weights
log w_k = log p_θ(x|z_k) + log p(z_k) − log q_φ(z_k|x):

- ``elbo``            = (1/K) Σ_k log w_k  (Monte Carlo ELBO)
- ``reconstruction``  = (1/K) Σ_k log p_θ(x|z_k)
- ``kl``              = KL(q_φ(z|x) ‖ p(z)): closed form where one is registered,
                         else (1/K) Σ_k [log q − log p(z_k)]
- ``elbo_analytic_kl`` = reconstruction − kl
- ``log_likelihood``  = log (1/K) Σ_k w_k, the importance-sampled estimate of
  log p(x) (Burda et al. 2016): a lower bound in expectation that rises to
  log p(x) as K grows.
- ``ess``, ``pareto_k``, ``log_likelihood_reliable``: the weights' effective
  sample size and Pareto k̂ (:mod:`pyro_vae.diagnostics`), saying how far the
  log-likelihood can be trusted.

The K draws are vectorized; examples are processed in chunks so that the
largest tensor, K × chunk × D decoder outputs, stays under ``memory_mb``.
"""
from __future__ import annotations

import math

import pyro
import torch
from torch.distributions import kl_divergence

from pyro_vae import diagnostics, fast_likelihood, gaussian
from pyro_vae.model import VAE

ACTIVE_UNIT_THRESHOLD = 0.01


def chunk_size(num_samples: int, data_dim: int, hidden: int, memory_mb: float) -> int:
    """Examples per chunk so that K × chunk × (D + hidden) floats fit in ``memory_mb``."""
    per_example = num_samples * (data_dim + hidden) * 4 * 3  # outputs, activations, log-probs
    return max(1, int(memory_mb * 2 ** 20 // per_example))


def closed_form_kl(vae: VAE, x: torch.Tensor) -> torch.Tensor | None:
    """KL(q(z|x) ‖ p(z)) per example, or None where no closed form is registered."""
    try:
        return kl_divergence(vae.posterior(x), vae.prior_distribution())
    except NotImplementedError:
        return None


@torch.no_grad()
def log_weights(vae: VAE, x: torch.Tensor, num_samples: int, binary: bool | None = None,
                scratch: fast_likelihood.Scratch | None = None, fast: bool = True) -> tuple[torch.Tensor, ...]:
    """(log p(x|z), log p(z), log q(z|x)) for K draws per example, each (K, B).

    log q and log p of diagonal Gaussians take :func:`pyro_vae.gaussian.log_density`;
    log p(x|z) of a Bernoulli likelihood on binary x takes the fast path of
    :mod:`pyro_vae.fast_likelihood` (same value; ``binary`` says x is 0/1, checked when None;
    ``fast=False``: the likelihood's own ``log_prob``), and on a CPU the decoder runs over
    blocks of draws that stay in cache.
    """
    with pyro.validation_enabled(False):  # z is drawn from q: no support checks of the K × B draws
        q = vae.posterior(x)
        z = q.rsample((num_samples,))
        log_q = gaussian.log_density(q, z)
        log_prior = gaussian.log_density(vae.prior_distribution(), z)
    log_lik = fast_likelihood.decoded_log_prob(vae, z, x, binary, scratch, fast=fast)
    return log_lik, log_prior, log_q


@torch.no_grad()
def evaluate(vae: VAE, data: torch.Tensor, num_samples: int = 1000, memory_mb: float = 512.0,
             hidden: int = 1024, per_example: bool = False, progress=None, fast: bool = True) -> dict:
    """All the per-example bounds on ``data``, averaged, with their standard errors.

    ``fast=False`` computes log p(x|z) by the decoder and the likelihood's own
    ``log_prob`` instead of :mod:`pyro_vae.fast_likelihood` (the same values
    up to float32 rounding; slower).

    ``progress`` (a :func:`pyro_vae.progress.bar`) is advanced by the examples of each chunk.

    ``per_example=True`` adds ``"per_example"``: the ELBO and log-likelihood
    estimate of every example (float64 tensors), for paired comparisons of two
    models on the same data.
    """
    was_training = vae.training
    vae.eval()
    chunk = chunk_size(num_samples, data.shape[1], hidden, memory_mb)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("elbo", "reconstruction", "kl_sampled", "kl", "ll", "ess",
                                                             "khat")}
    closed_form = True
    binary, scratch = fast_likelihood.is_binary(data), fast_likelihood.Scratch()  # one check, one scratch
    for start in range(0, data.shape[0], chunk):
        x = data[start:start + chunk]
        log_lik, log_prior, log_q = log_weights(vae, x, num_samples, binary, scratch, fast)
        log_w = log_lik + log_prior - log_q
        parts["elbo"].append(log_w.mean(0))
        parts["reconstruction"].append(log_lik.mean(0))
        parts["kl_sampled"].append((log_q - log_prior).mean(0))
        exact = closed_form_kl(vae, x)
        closed_form = closed_form and exact is not None
        parts["kl"].append(exact if exact is not None else parts["kl_sampled"][-1])
        parts["ll"].append(torch.logsumexp(log_w, 0) - math.log(num_samples))
        parts["ess"].append(diagnostics.effective_sample_fraction(log_w))
        parts["khat"].append(diagnostics.pareto_k(log_w).to(log_w.device))
        if progress is not None:
            progress.update(x.shape[0])
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
    if per_example:
        summary["per_example"] = {"elbo": values["elbo"].cpu(), "log_likelihood": values["ll"].cpu()}
    return summary


def test_elbo(vae: VAE, data: torch.Tensor, batch_size: int = 1024, num_samples: int = 1,
              seed: int | None = None) -> dict:
    """ELBO and its two terms per example, from ``num_samples`` draws each (``train.eval_num_samples``):
    the per-epoch test figure. The KL term is closed form where one is registered.

    With ``seed``, the draws come from torch's generator (CPU, and ``data``'s CUDA
    device) seeded with it inside :func:`torch.random.fork_rng`: the generators'
    states afterwards are those from before, so evaluating changes no later draw.
    Without it, the draws continue torch's global generator.
    """
    if seed is None:
        return _test_elbo(vae, data, batch_size, num_samples)
    devices = [data.device] if data.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if data.is_cuda:
            torch.cuda.default_generators[data.device.index].manual_seed(seed)
        return _test_elbo(vae, data, batch_size, num_samples)


@torch.no_grad()
def _test_elbo(vae: VAE, data: torch.Tensor, batch_size: int, num_samples: int) -> dict:
    was_training = vae.training
    vae.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=data.device)
    for start in range(0, data.shape[0], batch_size):
        x = data[start:start + batch_size]
        log_lik, log_prior, log_q = (t.mean(0) for t in log_weights(vae, x, num_samples))
        exact = closed_form_kl(vae, x)
        kl = exact if exact is not None else log_q - log_prior
        totals += torch.stack([(log_lik - kl).sum(), log_lik.sum(), kl.sum()]).double()
    vae.train(was_training)
    elbo, reconstruction, kl = (totals / data.shape[0]).tolist()
    return {"test_elbo": elbo, "test_reconstruction": reconstruction, "test_kl": kl}


@torch.no_grad()
def active_units(vae: VAE, data: torch.Tensor, batch_size: int = 1024,
                 threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions whose posterior mean varies across examples: Cov_x(E_q[z|x]) > 0.01 (Burda et al. 2016)."""
    means = torch.cat([vae.encode(data[i:i + batch_size])[0] for i in range(0, data.shape[0], batch_size)])
    return int((means.var(0) > threshold).sum())
