"""Gradient statistics over repeated draws: per-element mean and variance, and signal-to-noise summaries.

For R draws of a gradient vector g, per element: the mean E[g] and the unbiased
variance Var[g] (Welford's streaming update, float64, :class:`Moments`); then
(:func:`snr_summary`)

    var        = mean over all elements of Var[g]
    snr        = mean over elements of |E[g]| / std[g]      (as Rainforth et al. 2018 average per-parameter SNRs)
    snr_median = the median instead of the mean

Elements whose gradient does not vary over the draws (std ≤ 10⁻⁶·|E[g]|:
identically zero, like the weights of an always-blank pixel, or
deterministic) have no SNR and are left out of the SNR summaries.
"""

from __future__ import annotations

import torch

NOT_VARYING = 1e-6  # relative std below which an element's gradient counts as not varying


class Moments:
    """Per-element mean and variance of a stream of equally long vectors (Welford, float64)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, vector: torch.Tensor) -> None:
        vector = vector.detach().to(torch.float64)
        if self.mean is None:
            self.mean, self.m2 = torch.zeros_like(vector), torch.zeros_like(vector)
        self.count += 1
        delta = vector - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (vector - self.mean)

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased (R − 1) variance per element."""
        return self.m2 / max(self.count - 1, 1)


def snr_summary(mean: torch.Tensor, variance: torch.Tensor) -> dict:
    """Summaries of per-element gradient moments.

    ``snr`` / ``snr_median``: the mean / median over elements of |mean| / std,
    over the elements whose gradient varies (std > 10⁻⁶·|mean|); ``var``: the
    mean of the variance over all elements; ``varying``: how many elements
    entered the SNR. NaN where no element varies (or there are none).
    """
    mean, variance = mean.double().flatten(), variance.double().flatten().clamp_min(0)
    std = variance.sqrt()
    varying = std > NOT_VARYING * mean.abs()
    snr = mean[varying].abs() / std[varying]
    nan = float("nan")
    return {
        "snr": snr.mean().item() if snr.numel() else nan,
        "snr_median": snr.median().item() if snr.numel() else nan,
        "var": variance.mean().item() if variance.numel() else nan,
        "varying": int(varying.sum()),
        "elements": mean.numel(),
    }


def flat_gradient(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """All the parameters' gradients as one vector (zeros where a parameter got none)."""
    parts = [
        torch.zeros(p.numel(), device=p.device) if p.grad is None else p.grad.detach().reshape(-1) for p in parameters
    ]
    return torch.cat(parts) if parts else torch.zeros(0)
