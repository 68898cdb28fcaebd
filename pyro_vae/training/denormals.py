"""Training steps on a CPU with subnormal floats flushed to zero, the caller's setting restored after.

A float32 below 2⁻¹²⁶ ≈ 1.2·10⁻³⁸ in magnitude is subnormal, and x86 processors take one
to many times longer for every arithmetic operation that reads or writes one. Adam's
first moment m ← β₁ m + (1 − β₁) g of a weight whose gradient is 0 (the encoder's
weights from a pixel that is 0 in every image, as MNIST's borders are, or from a ReLU
unit silent on every input) decays geometrically through that range, so a run's
steps slow down epoch after epoch. Flushing them to zero (``torch.set_flush_denormal``:
the processor's flush-to-zero and denormals-are-zero modes, which JAX's XLA sets by
default) keeps every step at the speed of the first; it changes a number only where a
subnormal would have reached a result above the float's resolution, which the
weights' updates (lr · m / (√v + ε) added to weights of order 10⁻²) do not.

The mode belongs to the thread that sets it: with several intra-op threads, only the
calling thread's share of each operation is flushed. The optimizer's update, where the
subnormals live, therefore runs on the calling thread alone (:func:`calling_thread_only`;
Adam's elementwise update gains little from a second thread and loses much to
subnormals in its share), and the compiled whole step flushes Adam's moments inside its
graph (:func:`pyro_vae.training.whole_step.adam_update`). Only the training steps run
under the mode; the evaluations between epochs do not.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def flushing() -> bool:
    """Whether this thread flushes subnormal floats to zero now: half the smallest normal float32 comes out 0."""
    return bool((torch.tensor(torch.finfo(torch.float32).tiny) / 2).item() == 0.0)


@contextlib.contextmanager
def flushed(device: torch.device) -> Iterator[None]:
    """Subnormal floats flushed to zero on this thread inside the block (a CPU ``device``; any other runs as is),
    the setting from before restored after."""
    if device.type != "cpu":
        yield
        return
    before = flushing()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


@contextlib.contextmanager
def calling_thread_only(device: torch.device) -> Iterator[None]:
    """On a CPU, the block on the calling thread alone (torch's intra-op thread count 1, the count from before
    restored after), so that this thread's flush-to-zero mode covers every element it computes; any other
    device runs as is."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
