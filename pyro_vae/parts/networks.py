"""Encoders and decoders: plain PyTorch modules, chosen by ``model.encoder.type``.

An encoder maps a flat example x (…, D) to features h (…, H) that a guide turns
into the parameters of q_φ(z|x). A decoder maps z (…, d) to the D numbers a
likelihood needs per example (logits or means). Leading dimensions (particles,
batch) pass through unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pyro_vae.config import registry
from pyro_vae.config.spec import NetworkSpec, accepts
from pyro_vae.errors import UserInputError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


GATED = "gated"


class GatedLinear(nn.Module):
    """h = (W x + b) ⊙ σ(V x + c): the gated unit of the VampPrior paper's MLPs (Dauphin et al. 2017)."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.value, self.gate = nn.Linear(fan_in, fan_out), nn.Linear(fan_in, fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


def relu_start(layer: nn.Linear) -> nn.Linear:
    """He et al. (2015)'s start for a layer that feeds a ReLU: W ~ N(0, 2 / fan_in), b = 0.

    A ReLU passes half of a symmetric input's second moment, so weights of
    variance 2 / fan_in keep E[h²] the same from layer to layer. PyTorch's
    default (uniform, variance 1 / (3 fan_in)) shrinks it about sixfold per ReLU
    layer: the features reaching the output are small, the first steps move
    units by more than their input's scale, and units silent on every input
    (zero gradient) stay silent for the rest of training.
    """
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


def mlp(sizes: list[int], activation: str, final_activation: bool) -> nn.Sequential:
    """Linear layers between consecutive ``sizes`` with ``activation`` in between (``gated``: gated layers).

    A layer that feeds a ReLU starts as :func:`relu_start` says; every other layer keeps PyTorch's start.
    """
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        hidden = i < len(sizes) - 2 or final_activation
        if hidden and activation == GATED:
            layers.append(GatedLinear(fan_in, fan_out))
            continue
        linear = nn.Linear(fan_in, fan_out)
        layers.append(relu_start(linear) if hidden and activation == "relu" else linear)
        if hidden:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """x ↦ h through the hidden layers (h = x when there are none)."""

    def __init__(self, input_dim: int, hidden: list[int], activation: str):
        super().__init__()
        self.net = mlp([input_dim, *hidden], activation, final_activation=True)
        self.output_dim = hidden[-1] if hidden else input_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """z ↦ D outputs; with no hidden layers it is the linear map W z + b.

    Without gradients a tanh network runs its hidden layers as sigmoids, the
    same function: tanh(a) = 2σ(2a) − 1, so with g = σ(2a) the next layer sees
    W h + b = 2W g + (b − W·1). Each layer is one ``addmm`` whose factors of 2
    are its ``alpha`` and ``beta`` (exact in floating point): the first layer
    gives 2a = 2(W z + b), a middle one 2a = 4W g + 2(b − W·1), the last
    2W g + (b − W·1). The sigmoid kernel is several times cheaper than tanh's.
    """

    def __init__(self, latent_dim: int, hidden: list[int], output_dim: int, activation: str):
        super().__init__()
        self.net = mlp([latent_dim, *hidden, output_dim], activation, final_activation=False)
        self.folds_tanh = activation == "tanh" and bool(hidden)

    @property
    def output_bias(self) -> nn.Parameter:
        """The bias of the last layer, one entry per output (D,)."""
        return self.net[-1].bias  # type: ignore[return-value]  # nn.Sequential indexes as a Module

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) → (..., D)."""
        if torch.is_grad_enabled() or not self.folds_tanh:
            return self.net(z)
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        h = z.reshape(-1, z.shape[-1])
        for i, linear in enumerate(linears):
            weight: torch.Tensor = linear.weight
            bias: torch.Tensor = linear.bias if i == 0 else linear.bias - weight.sum(1)  # the input is g = σ(2a)
            gain = 1 if i == 0 else 2  # tanh(a) = 2g − 1
            if i == len(linears) - 1:
                return torch.addmm(bias, h, weight.t(), alpha=gain).view(*z.shape[:-1], -1)
            h = torch.addmm(bias, h, weight.t(), beta=2, alpha=2 * gain).sigmoid_()  # g = σ(2a)
        raise AssertionError("unreachable: an MLP decoder ends with a linear layer")


def _image(image_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """``image_shape``; for flat data (None) the line that a conv network needs images."""
    if image_shape is None:
        raise UserInputError(
            "'model.encoder.type' conv needs image data (digits, mnist, fashion-mnist, binarized-mnist); "
            "this dataset is flat vectors: use mlp"
        )
    return image_shape


def _conv_geometry(
    image_shape: tuple[int, int, int] | None, channels: list[int], activation: str
) -> tuple[int, int, int]:
    image_shape = _image(image_shape)
    if not channels:
        raise UserInputError(
            "a conv network needs at least one entry in 'channels' (model.encoder.channels, "
            "model.decoder.channels), e.g. [32, 64]"
        )
    if activation == GATED:
        raise UserInputError(
            "activation 'gated' is for mlp networks; a conv network takes relu, tanh, softplus, "
            "elu, gelu, silu or leaky_relu"
        )
    c, h, w = image_shape
    factor = 2 ** len(channels)
    if h % factor or w % factor:
        raise UserInputError(
            f"conv network with {len(channels)} stride-2 layers ('channels') needs image sides divisible by {factor}; "
            f"images are {h}x{w}"
        )
    return c, h // factor, w // factor


class ConvEncoder(nn.Module):
    """Stride-2 convolutions (kernel 4) halving the image per layer, then a linear layer to H."""

    def __init__(self, image_shape: tuple[int, int, int], channels: list[int], hidden: list[int], activation: str):
        super().__init__()
        c, h, w = _conv_geometry(image_shape, channels, activation)
        self.image_shape = image_shape
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip([image_shape[0], *channels[:-1]], channels):
            layers += [nn.Conv2d(fan_in, fan_out, 4, stride=2, padding=1), ACTIVATIONS[activation]()]
        self.conv = nn.Sequential(*layers)
        self.head = mlp([channels[-1] * h * w, *hidden], activation, final_activation=True)
        self.output_dim = hidden[-1] if hidden else channels[-1] * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        images = x.reshape(-1, *self.image_shape)
        return self.head(self.conv(images).flatten(1)).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """Linear layers to a small feature map, then stride-2 transposed convolutions up to the image.

    The last transposed convolution has no bias of its own; ``output_bias`` is
    one bias per output value (C·H·W), so the decoder can start at the mean image.
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: tuple[int, int, int],
        channels: list[int],
        hidden: list[int],
        activation: str,
    ):
        super().__init__()
        _, h, w = _conv_geometry(image_shape, channels, activation)
        self.start = (channels[-1], h, w)
        self.head = mlp([latent_dim, *hidden, math.prod(self.start)], activation, final_activation=True)
        layers: list[nn.Module] = []
        widths = [*reversed(channels), image_shape[0]]
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(widths) - 2
            layers.append(nn.ConvTranspose2d(fan_in, fan_out, 4, stride=2, padding=1, bias=not last))
            if not last:
                layers.append(ACTIVATIONS[activation]())
        self.deconv = nn.Sequential(*layers)
        self.output_bias = nn.Parameter(torch.zeros(math.prod(image_shape)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        maps = self.head(z.reshape(-1, z.shape[-1])).reshape(-1, *self.start)
        return (self.deconv(maps).flatten(1) + self.output_bias).reshape(*lead, -1)


@registry.register("network", "mlp")
def mlp_network(
    spec: NetworkSpec, role: str, input_dim: int, output_dim: int | None, image_shape: tuple[int, int, int] | None
) -> nn.Module:
    """Fully connected encoder or decoder (``hidden``, ``activation``)."""
    if role == "encoder":
        return MLPEncoder(input_dim, spec.hidden, spec.activation)
    assert output_dim is not None  # a decoder is always built with its output width
    return MLPDecoder(input_dim, spec.hidden, output_dim, spec.activation)


@dataclass
class ConvConfig:
    """``conv``: the channels of the stride-2 layers, one entry per halving of the image."""

    channels: list[int] = field(default_factory=lambda: [32, 64], metadata=accepts(1))


@registry.register("network", "conv", config=ConvConfig)
def conv_network(
    spec: NetworkSpec, role: str, input_dim: int, output_dim: int | None, image_shape: tuple[int, int, int] | None
) -> nn.Module:
    """Convolutional encoder or decoder for images (``channels``, then ``hidden``)."""
    channels = spec.options.channels
    shape = _image(image_shape)
    if role == "encoder":
        return ConvEncoder(shape, channels, spec.hidden, spec.activation)
    _conv_geometry(shape, channels, spec.activation)
    return ConvDecoder(input_dim, shape, channels, spec.hidden, spec.activation)
