"""What the decoder's output-bias start does to the first training steps: one JSON line per checkpoint step.

Trains a packaged spec (MLP networks) with ``--set`` overrides by the package's ``Trainer`` and,
at each of ``--at`` global steps, prints the test ELBO and KL (first ``--examples``
test images), the active units (Cov_x E_q[z_j|x] > 0.01), the latent dimensions
with a mean KL above 0.1 nats, the share of *silent* hidden units per layer of
each network (output ≤ 0 on every one of those images: for a ReLU unit its
gradient is zero there, so it stays silent), the mean hidden output of the
decoder, the mean logit of the never-lit training pixels, and the gradient norm
of every linear layer's weight on one minibatch. The statistics draw from a fork
of torch's generator, so the training steps are those of a plain run.

    PYRO_VAE_DATA=../shared/data python benchmarks/decoder_start.py --set model.encoder.activation=relu \
        --set model.decoder.activation=relu --set model.decoder.init_bias=data-mean
    PYRO_VAE_DATA=../shared/data python benchmarks/decoder_start.py --set model.encoder.activation=relu \
        --set model.decoder.activation=relu --set model.decoder.init_bias=zero
"""

from __future__ import annotations

import argparse
import json

import pyro
import torch
from torch import nn

from pyro_vae import evaluation
from pyro_vae.config.spec import load_spec
from pyro_vae.training.trainer import Trainer


def hidden_outputs(net: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every hidden layer (after its activation, or of a gated layer) of an MLP."""
    outputs, h = [], x
    for layer in net:
        h = layer(h)
        if not isinstance(layer, nn.Linear):
            outputs.append(h)
    return outputs


def silent_share(outputs: list[torch.Tensor]) -> list[float]:
    """Per layer, the share of units whose output is ≤ 0 on every example."""
    return [round(float((h.amax(0) <= 0).float().mean()), 3) for h in outputs]


def gradient_norms(trainer: Trainer, batch: torch.Tensor) -> dict:
    """‖∂(−ELBO per example)/∂W‖ of each linear layer of decoder and encoder, on ``batch``."""
    vae = trainer.vae
    vae.zero_grad()
    loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, batch) / batch.shape[0]
    loss.backward()
    norms = {
        f"grad_{name}": [round(float(m.weight.grad.norm()), 3) for m in net if isinstance(m, nn.Linear)]
        for name, net in (("decoder", vae.decoder.net), ("encoder", vae.encoder.net))
    }
    vae.zero_grad()
    return norms


@torch.no_grad()
def latent_statistics(trainer: Trainer, x: torch.Tensor) -> dict:
    """Test ELBO and KL, active units, silent units, decoder activity and never-lit pixel logits on ``x``."""
    vae = trainer.vae
    mean, scale = vae.encode(x)
    kl_per_dim = (0.5 * (mean**2 + scale**2 - 1) - scale.log()).mean(0)
    z = mean + scale * torch.randn_like(scale)
    decoder_hidden = hidden_outputs(vae.decoder.net, z)
    never_lit = trainer.data.train.mean(0) == 0
    bound = evaluation.test_elbo(vae, x, seed=0)
    return {
        "test_elbo": round(bound["test_elbo"], 2),
        "test_kl": round(bound["test_kl"], 2),
        "active_units": int((mean.var(0) > 0.01).sum()),
        "dims_kl_above_0.1": int((kl_per_dim > 0.1).sum()),
        "silent_encoder": silent_share(hidden_outputs(vae.encoder.net, x)),
        "silent_decoder": silent_share(decoder_hidden),
        "decoder_hidden_mean": [round(float(h.mean()), 3) for h in decoder_hidden],
        "never_lit_bias": round(float(vae.decoder.output_bias[never_lit].mean()), 2),
        "never_lit_logit": round(float(vae.decoder(z)[:, never_lit].mean()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mnist")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--at", default="0,20,50,100,200,400,600", help="global steps, ascending")
    parser.add_argument("--examples", type=int, default=2000, help="test images for the statistics")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = [int(s) for s in args.at.split(",")]
    trainer = Trainer(load_spec(args.config, args.set), None, show_progress=False)
    x = trainer.data.test[: args.examples]
    batch = trainer.data.training_batch(torch.arange(min(100, trainer.data.num_train)))
    done = 0
    for step in steps:
        trainer.run_steps(step - done)
        done = step
        with torch.random.fork_rng():  # the statistics' draws leave training's generator as it was
            row = {"step": step, **latent_statistics(trainer, x), **gradient_norms(trainer, batch)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
