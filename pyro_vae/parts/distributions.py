r"""The distributions the built-in parts return, with densities that are fast where no gradient is needed.

Evaluation scores the Pyro program on many draws at once (the importance-sampled
log-likelihood of MNIST with K = 5000 evaluates 5·10⁷ decoder outputs), so the
parts' own ``log_prob`` carries the speed, and every number is the density the
part trains with (:mod:`pyro_vae.infer.log_weights`). Each class here is a Pyro
``Independent`` distribution, equal in value to the plain one it replaces; its
``log_prob`` takes the formula below only when no gradient is being recorded
(``torch.is_grad_enabled()`` is false), so training is computed exactly as by
Pyro's own classes.

:class:`BernoulliImage`: x ∈ {0, 1}^D with logits l. With s = 2x − 1,
x·log σ(l) + (1 − x)·log σ(−l) = log σ(s·l), so::

    log p(x | l) = Σ_d log σ(s_d l_d) = Σ_g log Π_{d ∈ g} σ(s_d l_d)

over groups g of at most 64 logits: one multiply by s, one in-place sigmoid,
one ``log`` per group instead of an exp and a log1p per logit. The products
are formed pairwise first (half a row times the other half, three times), then
over groups. Each factor lies in (0, 1) and a product of G factors has at most
G roundings, so the float32 error is that of the plain formula's sum. A
group's product underflows only where the logits are confidently wrong about
that group (log-density below −87 nats in float32); those rows are recomputed
with ``logsigmoid``. Values that are not all 0 or 1 take the plain formula. Many draws go
through in blocks of particles of about ``BLOCK_BYTES``, each written into one buffer, so each block's passes
run in cache.

:class:`DiagonalNormal`: N(μ, diag σ²) over the last dimension::

    log N(z; μ, diag σ²) = −½ Σᵢ ((zᵢ − μᵢ)/σᵢ)² − Σᵢ log σᵢ − (d/2) log 2π

one subtract, one multiply by 1/σ and one sum of squares per draw, the σ terms
once per distribution (:func:`pyro_vae.infer.gaussian.log_density`).

KL(q ‖ p) of two :class:`DiagonalNormal` (registered with ``register_kl``)::

    KL = Σᵢ [log σ_p,i/σ_q,i − ½ + (σ_q,i² + (μ_q,i − μ_p,i)²) / (2 σ_p,i²)]

torch's formula; without gradients taken once per distinct (μ, σ) and broadcast.
"""

from __future__ import annotations

import math
from typing import Callable

import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence, register_kl

from pyro_vae.infer.gaussian import compact, log_density

MAX_GROUP = 64  # factors σ(s·l) per product: bounds its roundings and how often a group underflows
PAIRWISE_STEPS = 3  # in-place halvings before the grouped product
BLOCK_BYTES = 2**20  # signed logits per block of the Bernoulli density: a block stays in a core's cache


def group_size(dim: int, largest: int = MAX_GROUP) -> int:
    """The largest divisor of ``dim`` that is at most ``largest``."""
    return max(g for g in range(1, min(dim, largest) + 1) if dim % g == 0)


def is_binary(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


def _sum_log_sigmoid(t: torch.Tensor, recompute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ_d log σ(t_d) for t of shape (rows, D), overwriting t.

    ``recompute(index)``: t again for the rows ``index`` (1-d), for the rare
    rows where a group's product fell below the smallest normal float; those
    take ``logsigmoid``.
    """
    values = t.sigmoid_()
    width, factors = values.shape[-1], 1
    for _ in range(PAIRWISE_STEPS):
        if width % 2:
            break
        width //= 2
        values[..., :width].mul_(values[..., width : 2 * width])
        factors *= 2
    group = group_size(width, MAX_GROUP // factors)
    products = values[..., :width].unflatten(-1, (width // group, group)).prod(-1)
    normal = products.amin(-1) >= torch.finfo(products.dtype).tiny
    total = products.log_().sum(-1)
    if not bool(normal.all()):
        index = (~normal).nonzero().squeeze(1)
        total[index] = torch.nn.functional.logsigmoid(recompute(index)).sum(-1)
    return total


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_d log Bernoulli(x_d | logits_d) over the last dim, for binary x broadcastable against logits (…, D).

    On a CPU the leading dim of the broadcast shape goes through in blocks of about ``BLOCK_BYTES`` of signed
    logits, so the multiply, the sigmoid and the products of a block stay in cache; the result is the same row
    by row.
    """
    signs = x * 2 - 1
    shape = torch.broadcast_shapes(logits.shape, signs.shape)
    if len(shape) < 2 or logits.device.type != "cpu":  # a GPU takes the whole batch in one launch per kernel
        return _block_log_prob(logits, signs, shape)
    per_row = math.prod(shape[1:]) * torch.finfo(logits.dtype).bits // 8
    step = max(1, BLOCK_BYTES // per_row)
    if step >= shape[0]:
        return _block_log_prob(logits, signs, shape)
    out = torch.empty(shape[:-1], dtype=logits.dtype, device=logits.device)
    scratch = torch.empty((step, *shape[1:]), dtype=logits.dtype, device=logits.device)  # every block's s·l
    logits, signs = logits.expand(shape), signs.expand(shape)
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        block = (stop - start, *shape[1:])
        out[start:stop] = _block_log_prob(logits[start:stop], signs[start:stop], block, scratch[: stop - start])
    return out


def _block_log_prob(
    logits: torch.Tensor, signs: torch.Tensor, shape: tuple[int, ...], scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_d log σ(s_d l_d) for logits and signs broadcast to ``shape`` (…, D); s·l is written into ``scratch``
    (a tensor of ``shape``, overwritten) where given, else into a new tensor."""
    signed = logits * signs if scratch is None else torch.mul(logits, signs, out=scratch)

    def recompute(index: torch.Tensor) -> torch.Tensor:
        where = torch.unravel_index(index, shape[:-1])
        return logits.expand(shape)[where] * signs.expand(shape)[where]

    return _sum_log_sigmoid(signed.reshape(-1, shape[-1]), recompute).view(shape[:-1])


class BernoulliImage(dist.Independent):
    """Independent Bernoulli over the last dimension, from logits (…, D): event shape (D,).

    Equal to ``Bernoulli(logits=logits).to_event(1)``; without gradients its
    ``log_prob`` of binary values takes the grouped products of the module docstring.
    """

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None):
        super().__init__(dist.Bernoulli(logits=logits, validate_args=validate_args), 1, validate_args=validate_args)

    @property
    def logits(self) -> torch.Tensor:
        return self.base_dist.logits

    def expand(self, batch_shape, _instance=None) -> "BernoulliImage":
        return BernoulliImage(
            self.logits.expand(torch.Size(batch_shape) + self.event_shape), validate_args=self._validate_args
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not is_binary(value):
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        return bernoulli_log_prob(self.logits, value)


class DiagonalNormal(dist.Independent):
    """N(loc, diag scale²) over the last dimension: event shape (d,).

    Equal to ``Normal(loc, scale).to_event(1)``; without gradients its ``log_prob``
    is one pass over the draws (module docstring).
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool | None = None):
        super().__init__(dist.Normal(loc, scale, validate_args=validate_args), 1, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> "DiagonalNormal":
        shape = torch.Size(batch_shape) + self.event_shape
        return DiagonalNormal(
            self.base_dist.loc.expand(shape), self.base_dist.scale.expand(shape), validate_args=self._validate_args
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        return log_density(self, value)


@register_kl(DiagonalNormal, DiagonalNormal)
def diagonal_normals_kl(q: DiagonalNormal, p: DiagonalNormal) -> torch.Tensor:
    """KL(q ‖ p) = Σᵢ KL(N(μ_q,i, σ_q,i²) ‖ N(μ_p,i, σ_p,i²)), batch shapes broadcast.

    Without gradients the elementwise KL is computed once per distinct (μ, σ) (a guide or prior expanded over
    the particles of an evaluation counts once) and broadcast: the same values as over the expanded pair.
    """
    if q.event_shape != p.event_shape:
        raise ValueError(f"event shapes differ: q {tuple(q.event_shape)}, p {tuple(p.event_shape)}")
    if torch.is_grad_enabled():
        return kl_divergence(q.base_dist, p.base_dist).sum(-1)
    pair = (dist.Normal(compact(d.base_dist.loc), compact(d.base_dist.scale)) for d in (q, p))
    kl = kl_divergence(*pair).sum(-1)
    return kl.expand(torch.broadcast_shapes(q.batch_shape, p.batch_shape))
