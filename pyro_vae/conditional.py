r"""Conditional VAEs (``model.condition: label``; Sohn, Lee & Yan 2015): the label y conditions every part.

With K classes and the one-hot label e_y ∈ {0, 1}^K::

    model:  z ~ p_θ(z | y)     = N(μ_θ(e_y), diag σ_θ(e_y)²)
            x ~ p_θ(x | z, y)  = lik(dec_θ([z, e_y]))
    guide:  z ~ q_φ(z | x, y)  = head_φ([enc_φ(x), e_y])

so the ELBO bounds the conditional log-likelihood::

    log p(x | y) ≥ E_q[log p(x|z,y)] − KL(q(z|x,y) ‖ p(z|y))

and ``evaluate``'s importance-sampled estimate log (1/K) Σ_k p(x, z_k | y) / q(z_k | x, y)
estimates log p(x | y). The label is observed, never sampled: it is an argument ``y``
(integer class indices, shape (B,)) of both Pyro programs, as the data x is.

The prior's network is one linear layer of e_y (for a one-hot input, a table of each
class's μ and log σ: every function of y), started at zero so that p(z | y) starts
as N(0, I). ``model.prior.type`` ``standard-normal`` and ``learned-normal`` both become
this conditional Gaussian (its per-class mean and scale are learned); the other priors
are refused by the spec.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.errors import UserInputError
from pyro_vae.parts.distributions import DiagonalNormal


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e_y: (..., num_classes), 1 at each label's class, by comparison (no value-dependent shapes, so it traces)."""
    return (y.unsqueeze(-1) == torch.arange(num_classes, device=y.device)).to(dtype)


def with_label(h: torch.Tensor, y: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """[h, e_y] along the last dimension, e_y broadcast over h's leading (particle) dimensions; h when y is None."""
    if y is None:
        return h
    e = one_hot(y, num_classes, h.dtype)
    return torch.cat([h, e.expand(*h.shape[:-1], num_classes)], dim=-1)


def padded(h: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[h, 0]: a probe input of the width a conditional part takes (h itself for num_classes 0)."""
    return torch.cat([h, h.new_zeros(*h.shape[:-1], num_classes)], dim=-1) if num_classes else h


class ConditionalNormal(nn.Module):
    """p(z | y) = N(μ(e_y), diag exp(ρ(e_y))²), (μ, ρ) one linear layer of e_y, zero at the start (N(0, I))."""

    def __init__(self, num_classes: int, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Linear(num_classes, 2 * latent_dim)
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)

    def forward(self, label: torch.Tensor) -> dist.TorchDistribution:
        """The prior for one-hot labels (B, K): batch shape (B,), event shape (d,)."""
        loc, log_scale = self.net(label).split(self.latent_dim, dim=-1)
        return DiagonalNormal(loc, log_scale.exp())


def label_width(condition: str, num_classes: int | None) -> int:
    """K, the one-hot label's width, for ``model.condition`` ``label``; 0 for ``none``.

    A conditional model on data without labels is a one-line UserInputError.
    """
    if condition == "none":
        return 0
    if not num_classes:
        raise UserInputError(
            "'model.condition' is 'label' but the data have no labels; datasets with labels: digits, mnist, "
            "fashion-mnist, or data.name file with a .npz of arrays x and labels"
        )
    return num_classes


def check_label_argument(num_classes: int, y: torch.Tensor | None) -> None:
    """A conditional VAE's programs need ``y``; an unconditional VAE's take none (a ValueError otherwise)."""
    if num_classes and y is None:
        raise ValueError("this VAE is conditional (model.condition: label): pass the labels as y")
    if not num_classes and y is not None:
        raise ValueError("this VAE is not conditional (model.condition: none): it takes no labels y")


def labels_for(vae, labels: torch.Tensor | None) -> torch.Tensor | None:
    """``labels`` for a conditional VAE, None for one whose figures are not conditional on them (an unconditional
    VAE, or M2, which scores log p(x))."""
    return labels if vae.conditions_on_labels else None


def program_kwargs(y: torch.Tensor | None) -> dict:
    """The keyword arguments that hand ``y`` to the model and guide: ``{"y": y}``, or none for an unconditional VAE."""
    return {} if y is None else {"y": y}


def every_class(num_classes: int, per_class: int) -> torch.Tensor:
    """``per_class`` copies of each class 0 … num_classes − 1, in class order: one grid row per class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def sample_labels(argument: str, num_classes: int, count: int) -> torch.Tensor:
    """The labels of ``sample --label``: ``count`` copies of the class ``argument`` names, or (``all``) of every class.

    Anything but a class 0 … num_classes − 1 or ``all`` is a one-line UserInputError.
    """
    if argument == "all":
        return every_class(num_classes, count)
    if not (argument.isdigit() and int(argument) < num_classes):
        raise UserInputError(f"--label is {argument!r}; accepted: a class 0 … {num_classes - 1}, or all")
    return torch.full((count,), int(argument), dtype=torch.long)
