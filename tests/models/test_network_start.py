"""The networks' start: a layer that feeds a ReLU starts at He et al.'s variance, the others at PyTorch's."""

import math

import pytest
import torch

from pyro_vae.parts.networks import mlp


def layers_of(net):
    return [m for m in net if isinstance(m, torch.nn.Linear)]


def test_a_layer_feeding_a_relu_starts_at_variance_two_over_fan_in_with_zero_bias():
    torch.manual_seed(0)
    first, second, last = layers_of(mlp([784, 200, 200, 50], "relu", final_activation=False))
    for layer, fan_in in ((first, 784), (second, 200)):
        n = layer.weight.numel()
        # the sample variance of n normal draws has relative standard error sqrt(2 / n); 5 standard errors
        assert layer.weight.var().item() == pytest.approx(2 / fan_in, rel=5 * math.sqrt(2 / n))
        assert torch.count_nonzero(layer.bias) == 0
    # the output layer feeds no ReLU: PyTorch's uniform start, variance 1 / (3 fan_in)
    assert last.weight.var().item() == pytest.approx(1 / (3 * 200), rel=5 * math.sqrt(0.8 / last.weight.numel()))


def test_other_activations_keep_pytorch_start():
    torch.manual_seed(0)
    first = layers_of(mlp([784, 200, 50], "tanh", final_activation=False))[0]
    bound = 1 / math.sqrt(784)
    assert first.weight.abs().max().item() <= bound
    assert first.weight.var().item() == pytest.approx(1 / (3 * 784), rel=5 * math.sqrt(0.8 / first.weight.numel()))
    assert torch.count_nonzero(first.bias) > 0


def test_a_relu_stack_keeps_the_second_moment_of_its_input():
    """What the start is for: E[h²] of the last hidden layer stays of the order of the input's through two ReLUs."""
    torch.manual_seed(0)
    net = mlp([200, 200, 200], "relu", final_activation=True)
    x = torch.randn(4096, 200)
    with torch.no_grad():
        h = net(x)
    # each ReLU layer: E[h²] = 2/fan_in · fan_in · E[x²] / 2 = E[x²]; with PyTorch's start it would be about 1/36
    assert h.pow(2).mean().item() == pytest.approx(x.pow(2).mean().item(), rel=0.25)
