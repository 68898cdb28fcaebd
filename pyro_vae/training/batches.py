"""Which training examples each step takes: an epoch's data order, uniform or stratified by label.

**Uniform** (the default): a fresh permutation of the N training examples per epoch, cut into
⌈N/B⌉ batches of B; every site of the program is scaled by N/B, so a step's loss is an unbiased
estimate of the objective summed over the N examples.

**Stratified** (``data.labeled_per_batch`` = B_l, the semi-supervised M2 only): every batch holds
B_l of the N_l labeled examples and B_u = B − B_l of the N_u unlabeled ones. An epoch is one pass
over the unlabeled examples (⌈N_u/B_u⌉ steps); the labeled ones are drawn from back-to-back
permutations of the labeled set, so each is seen about B_l·N_u / (B_u·N_l) times an epoch. The
program scales the labeled examples' sites by N_l/B_l and the unlabeled ones' by N_u/B_u
(:class:`pyro_vae.semisupervised.SemiSupervisedVAE`), so each part of the batch estimates its sum
over the training set without bias, and the step's loss is again an unbiased estimate of the whole
objective::

    E[ (N_l/B_l) Σ_{batch, labeled} ℓ + (N_u/B_u) Σ_{batch, unlabeled} u ]  =  Σ_{labeled} ℓ + Σ_{unlabeled} u

With a few labeled examples among many (100 of 60,000), a uniform batch of 100 holds one of them in
about one step of six; stratified, every step sees B_l of them with a weight that is N_l/B_l instead
of N/B: the same objective, with the variance of its labeled term cut.

Both orders depend on (seed, epoch) alone, so a resumed run repeats its interrupted epoch exactly.
"""

from __future__ import annotations

import math

import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of ``epoch``'s data order, seeded by (seed, epoch) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: a permutation of ``num_examples`` that depends on (seed, epoch) only."""
    return torch.randperm(num_examples, generator=epoch_generator(seed, epoch))


def stratified_steps(labeled: torch.Tensor, labeled_per_batch: int, batch_size: int) -> int:
    """⌈N_u / (B − B_l)⌉: the steps of a stratified epoch (``labeled``: (N,) bool)."""
    return math.ceil(int((~labeled).sum()) / (batch_size - labeled_per_batch))


def stratified_order(
    labeled: torch.Tensor, labeled_per_batch: int, batch_size: int, seed: int, epoch: int
) -> torch.Tensor:
    """The data order of a stratified ``epoch``: indices into the N examples whose slice
    ``[s·B, (s+1)·B)`` is step s's batch, B_l labeled examples then up to B − B_l unlabeled ones.

    ``labeled``: (N,) bool, which examples keep their label. Returns a (N_steps·B_l + N_u,) long tensor.
    """
    generator = epoch_generator(seed, epoch)
    labeled = labeled.cpu()
    with_label, without = labeled.nonzero().squeeze(1), (~labeled).nonzero().squeeze(1)
    per_unlabeled = batch_size - labeled_per_batch
    steps = stratified_steps(labeled, labeled_per_batch, batch_size)
    unlabeled = without[torch.randperm(without.numel(), generator=generator)]
    rounds = math.ceil(steps * labeled_per_batch / with_label.numel())
    cycled = torch.cat([with_label[torch.randperm(with_label.numel(), generator=generator)] for _ in range(rounds)])
    return torch.cat(
        [
            torch.cat(
                [
                    cycled[s * labeled_per_batch : (s + 1) * labeled_per_batch],
                    unlabeled[s * per_unlabeled : (s + 1) * per_unlabeled],
                ]
            )
            for s in range(steps)
        ]
    )
