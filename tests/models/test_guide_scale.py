"""The guides' σ = softplus(raw) + min_scale, clamped to [e^(low/2), e^(high/2)] under log_variance_bounds."""

import math

import torch
from torch.nn.functional import softplus

from pyro_vae.parts.guides import positive_scale

RAW = torch.tensor([-20.0, 0.0, 20.0])


def test_scale_is_softplus_plus_the_floor():
    assert torch.allclose(positive_scale(RAW, 0.1, None), softplus(RAW) + 0.1)


def test_log_variance_bounds_clamp_both_ends():
    want = torch.tensor([math.exp(-6.0 / 2), math.log(2.0), math.exp(2.0 / 2)])
    assert torch.allclose(positive_scale(RAW, 0.0, [-6.0, 2.0]), want)
