r"""log p_θ(x | z) for many draws at once: the evaluation's inner loop, at close to the decoder's GEMM cost.

The importance-sampled log-likelihood evaluates the decoder on K × B latent
draws; for MNIST with K = 5000 that is 5·10⁷ decoder outputs of 784 logits.
Two rewrites, each an identity, keep the work beside the matrix multiplies
small. All apply only without gradients, to a Bernoulli likelihood on binary
x; any other case uses the decoder and the likelihood's own ``log_prob``.

**The Bernoulli density without an exp and a log per logit.** For logits l and s = 2x − 1,
x·log σ(l) + (1 − x)·log σ(−l) = log σ(s·l), so::

    log p(x | l) = Σ_d log σ(s_d l_d) = Σ_g log Π_{d ∈ g} σ(s_d l_d)

over groups g of at most 64 logits: one in-place multiply by s, one in-place
sigmoid, and one ``log`` per group instead of an exp and a log1p per logit.
The products are formed pairwise first (half a row times the other half,
three times), which vectorizes better than a reduction over a short last dim,
then over groups. Each factor lies in (0, 1) and a product of G factors has at
most G roundings, so the float32 error is that of the plain formula's sum
(checked against float64 in ``tests/test_speed_paths.py``, on logits that
predict x as a trained decoder's do as well as on random ones). A group's
product falls below the smallest normal float only where the decoder is
confidently wrong about that group (log-density under −87 nats in float32);
those rows are found and recomputed with ``logsigmoid``.

**tanh as a sigmoid.** tanh(a) = 2σ(2a) − 1, and the sigmoid kernel is several
times cheaper than tanh's. For a tanh MLP, with g = σ(2a) the layer after it sees
W h + b = 2W g + (b − W·1), so the factors fold into the weights once per
evaluation (:class:`MLPLayers`): each hidden layer becomes one GEMM and one
in-place sigmoid.

The decoder runs over blocks of draws that stay in the CPU's cache
(``CPU_BLOCK_ROWS``); one :class:`Scratch` holds the buffer and the folded
layers for a whole evaluation.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pyro_vae.likelihoods import Bernoulli
from pyro_vae.networks import MLPDecoder

MAX_GROUP = 64       # factors σ(s·l) per product: bounds its roundings and how often a group underflows
PAIRWISE_STEPS = 3   # in-place halvings before the grouped product (see _bernoulli)
CPU_BLOCK_ROWS = 2048  # draws per decoder block on a CPU (see decoded_log_prob)


def group_size(dim: int, largest: int = MAX_GROUP) -> int:
    """The largest divisor of ``dim`` that is at most ``largest``."""
    return max(g for g in range(1, min(dim, largest) + 1) if dim % g == 0)


class Scratch:
    """What one evaluation reuses across its chunks: a buffer (grown as needed) and the decoder's folded layers."""

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self._layers: tuple[nn.Module, MLPLayers | None] | None = None

    def layers(self, decoder: nn.Module) -> "MLPLayers | None":
        """``MLPLayers.of(decoder)``, built once per evaluation (the weights do not change during one)."""
        if self._layers is None or self._layers[0] is not decoder:
            self._layers = (decoder, MLPLayers.of(decoder))
        return self._layers[1]

    def get(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        n = shape.numel()
        t = self.tensor
        if t is None or t.numel() < n or t.device != like.device or t.dtype != like.dtype:
            t = self.tensor = torch.empty(n, device=like.device, dtype=like.dtype)
        return t[:n].view(shape)


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def _bernoulli(t: torch.Tensor, recompute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ_d log σ(t_d) for t = s·l of shape (rows, D), overwriting t.

    ``recompute(index)``: s·l again for the rows ``index`` (1-d), for the rare
    rows where a group's product fell below the smallest normal float; those
    take ``logsigmoid``.
    """
    values = t.sigmoid_()
    width, factors = values.shape[-1], 1
    for _ in range(PAIRWISE_STEPS):
        if width % 2:
            break
        width //= 2
        values[..., :width].mul_(values[..., width:2 * width])
        factors *= 2
    group = group_size(width, MAX_GROUP // factors)
    products = values[..., :width].unflatten(-1, (width // group, group)).prod(-1)
    normal = products.amin(-1) >= torch.finfo(products.dtype).tiny
    total = products.log_().sum(-1)
    if not bool(normal.all()):
        index = (~normal).nonzero().squeeze(1)
        total[index] = torch.nn.functional.logsigmoid(recompute(index)).sum(-1)
    return total


@torch.no_grad()
def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_d log Bernoulli(x_d | logits_d) over the last dim, for logits (…, B, D) and binary x (B, D)."""
    signs = (x * 2 - 1).expand_as(logits).reshape(-1, logits.shape[-1])
    flat = logits.reshape(-1, logits.shape[-1])
    return _bernoulli(flat * signs, lambda index: flat[index] * signs[index]).view(logits.shape[:-1])


class MLPLayers:
    """An MLP decoder's layers as (W, b, activation) for no-grad evaluation, tanh rewritten as a sigmoid.

    ``hidden(z)``: the last hidden layer h (…, H) (for a tanh MLP, g = σ(2a)
    instead of tanh(a)); ``weight`` (D, H) and ``bias`` (D,): the output layer
    acting on it, so the logits are ``weight @ hidden(z) + bias``. Built by
    :meth:`of`, which returns None for a decoder it does not cover (not an MLP,
    gated units).
    """

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor, Callable | None]]):
        *self.layers, (self.weight, self.bias, _) = layers

    @classmethod
    def of(cls, decoder: nn.Module) -> "MLPLayers | None":
        if not isinstance(decoder, MLPDecoder):
            return None
        modules = list(decoder.net)
        linears = [m for m in modules if isinstance(m, nn.Linear)]
        activations = [m for m in modules if not isinstance(m, nn.Linear)]
        if len(linears) != len(activations) + 1 or any(isinstance(m, nn.Linear) == isinstance(n, nn.Linear)
                                                       for m, n in zip(modules, modules[1:])):
            return None  # not Linear, activation, Linear, …, Linear (gated units)
        folded = all(isinstance(a, nn.Tanh) for a in activations) and bool(activations)
        layers = []
        for i, linear in enumerate(linears):
            weight, bias = linear.weight.detach().double(), linear.bias.detach().double()
            if folded and i > 0:                      # the input is g = σ(2a), tanh(a) = 2g − 1
                weight, bias = 2 * weight, bias - weight.sum(1)
            last = i == len(linears) - 1
            if folded and not last:                   # this layer's output goes into σ(2·)
                weight, bias = 2 * weight, 2 * bias
            dtype = linear.weight.dtype
            activation = None if last else (torch.sigmoid_ if folded else activations[i])
            layers.append((weight.to(dtype), bias.to(dtype), activation))
        return cls(layers)

    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        h = z.reshape(-1, z.shape[-1])
        for weight, bias, activation in self.layers:
            h = activation(torch.addmm(bias, h, weight.t()))
        return h.reshape(*z.shape[:-1], -1)


def _signed_logits(logits: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """s·l in place for logits (rows, D) of draws (k, B) flattened with the example fastest, signs (B, D)."""
    return logits.view(-1, *signs.shape).mul_(signs).view(logits.shape)


@torch.no_grad()
def _block_log_prob(vae, layers: MLPLayers | None, z: torch.Tensor, signs: torch.Tensor,
                    scratch: Scratch) -> torch.Tensor:
    """log p(x | z) of one block of draws z (k, B, d): the decoder's logits, then the grouped products."""
    flat_z = z.reshape(-1, z.shape[-1])

    def recompute(index: torch.Tensor) -> torch.Tensor:   # the decoder itself, for the rare underflowing rows
        return vae.decoder(flat_z[index]) * signs[index % signs.shape[0]]

    if layers is None:                                     # another network: its own forward
        logits = vae.decoder(z).reshape(flat_z.shape[0], -1)
    else:
        h = layers.hidden(flat_z)
        logits = scratch.get(torch.Size([h.shape[0], layers.weight.shape[0]]), h)
        torch.addmm(layers.bias, h, layers.weight.t(), out=logits)
    return _bernoulli(_signed_logits(logits, signs), recompute).view(z.shape[:2])


def decoded_log_prob(vae, z: torch.Tensor, x: torch.Tensor, binary: bool | None = None,
                     scratch: Scratch | None = None, rows: int | None = None, fast: bool = True) -> torch.Tensor:
    """log p(x | z) for draws z (K, B, d) and examples x (B, D), summed over D: (K, B).

    ``fast=False`` takes the decoder and the likelihood's ``log_prob`` (the
    reference path). On a CPU the draws go through in blocks of about ``rows``
    (``CPU_BLOCK_ROWS``) draws, which keeps the activations and logits in cache
    for the passes after each GEMM; on a GPU the whole of z is one block.
    ``binary``: whether x holds only 0/1 (checked when None).
    """
    if rows is None:
        rows = CPU_BLOCK_ROWS if z.device.type == "cpu" else None
    num, batch = z.shape[0], z.shape[1] if z.dim() > 2 else 1
    step = num if rows is None else max(1, rows // batch)
    blocks = [z[i:i + step] for i in range(0, num, step)]
    if not (fast and isinstance(vae.likelihood, Bernoulli) and not torch.is_grad_enabled() and z.dim() == 3
            and z.dtype in (torch.float32, torch.float64) and (is_binary(x) if binary is None else binary)):
        return torch.cat([vae.likelihood(vae.decoder(block)).log_prob(x) for block in blocks])
    scratch = scratch or Scratch()
    layers, signs = scratch.layers(vae.decoder), x * 2 - 1
    return torch.cat([_block_log_prob(vae, layers, block, signs, scratch) for block in blocks])
