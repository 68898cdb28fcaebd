"""What is checked before a run touches its folder: memory, the data's support, one first model/guide pass.

Each check either passes silently or raises a one-line :class:`UserInputError`,
so bad input fails before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import torch

from pyro_vae.conditional import labels_for, program_kwargs
from pyro_vae.config.spec import Spec
from pyro_vae.data import Dataset
from pyro_vae.errors import UserInputError, one_line
from pyro_vae.infer import estimators
from pyro_vae.model import VAE, check_likelihood_support
from pyro_vae.training.device import is_out_of_memory


def check_memory(vae: VAE, device: torch.device) -> None:
    """Refuse a model whose parameters, gradients and Adam state cannot fit in free memory.

    Needed: 4 × the parameters' bytes (parameters, gradients, Adam's two moments),
    less the parameters already allocated, against the device's free memory
    (``MemAvailable`` on a Linux CPU; no check where that cannot be read cheaply).
    """
    needed = 4 * sum(p.numel() * p.element_size() for p in vae.parameters())
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            meminfo = Path("/proc/meminfo").read_text().split()
            available = int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024
        except (OSError, ValueError, IndexError):
            return  # not Linux: no cheap way to ask
    held = sum(p.numel() * p.element_size() for p in vae.parameters())  # already allocated
    if needed - held > available:
        count = sum(p.numel() for p in vae.parameters())
        raise UserInputError(
            f"the model has {count:,} parameters: training needs about {needed / 2**30:.1f} GiB (parameters, "
            f"gradients, Adam state) but {available / 2**30:.1f} GiB is free on {device}; reduce model.encoder.hidden, "
            f"model.decoder.hidden, model.latent_dim or model.prior.pseudo_inputs"
        )


def check_data_support(vae: VAE, data: Dataset, spec: Spec, device: torch.device) -> None:
    """Refuse data the likelihood cannot take: the training split (under dynamic binarization, one binarized draw
    of up to 4,096 examples from torch's global generator) and the test split."""
    name = spec.model.likelihood.type
    train = data.train
    if data.binarize == "dynamic":
        train = data.training_batch(torch.arange(min(data.num_train, 4096), device=device))
    check_likelihood_support(vae, train, name, f"data '{spec.data.name}' (binarize: {data.binarize})")
    check_likelihood_support(vae, data.test, name, f"the test split of '{spec.data.name}'")


def first_pass(elbo, vae: VAE, data: Dataset, spec: Spec, device: torch.device) -> None:
    """One validated model/guide pass of ``elbo`` on two examples (and their labels, for a conditional VAE), the
    generators left untouched.

    Data the network cannot take, or a spec whose distributions are invalid
    from the start, fail here with one line, before a run folder is written.
    """
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), pyro.validation_enabled(True):
            index = torch.arange(min(2, data.num_train), device=device)
            labels = labels_for(vae, data.train_labels)
            x, y = data.training_batch(index), None if labels is None else labels[index]
            estimators.bound(elbo, vae.model, vae.guide, x, num_data=data.num_train, **program_kwargs(y))
    except (RuntimeError, ValueError) as exc:
        if is_out_of_memory(exc):
            raise
        shape = f"examples of {data.data_dim} values" + (f" (images {data.image_shape})" if data.image_shape else "")
        raise UserInputError(
            f"the spec and data '{spec.data.name}' ({shape}) fail a first model/guide pass: {one_line(exc, 300)}"
        ) from None
