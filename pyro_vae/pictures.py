"""The pictures of a run folder (``train.pictures``, ``pyro-vae pictures RUN``).

=================== ====================================================== =========
file                what                                                   drawn by
=================== ====================================================== =========
samples.png         64 draws E[x | z], z ~ p(z)                            cheap, all
reconstructions.png 16 test examples above E[x | z = mean of q(z|x)]       cheap, all
elbo.png            train and test ELBO per epoch (runs with an epoch)     cheap, all
latent.png          posterior means of up to 5,000 test examples in 2-D:   cheap, all
                    as they are (d ≤ 2), else the first two principal
                    components, and with ``all`` a t-SNE panel too
latent-z2.png, …    the same map of E_q[z_l | x] for each layer above z_1  cheap, all
                    (``model.latents``; latent.png is z_1's)
=================== ====================================================== =========

A conditional VAE (``model.condition: label``) draws its samples one row per
class y, E[x | z, y] with z ~ p(z | y), and reconstructs and maps the test
examples through q(z | x, y) at their labels.

``none`` draws nothing. t-SNE is the one slow picture (seconds to minutes for
a few thousand points), which is why it is left to ``all``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pyro_vae import progress
from pyro_vae.conditional import every_class, labels_for
from pyro_vae.data import Dataset
from pyro_vae.hierarchy import HierarchicalVAE
from pyro_vae.model import VAE

CHOICES = ("all", "cheap", "none")
SAMPLES, ORIGINALS, LATENT_POINTS = 64, 16, 5000


def plan(folder: Path, vae: VAE, data: Dataset, metrics: list[dict], which: str) -> list[tuple[str, Callable]]:
    """(label, draw) of each picture ``which`` asks for, in order (matplotlib is imported unless ``which`` is none)."""
    if which == "none":
        return []
    from pyro_vae import plots  # matplotlib: seconds of imports that a run without pictures should not pay

    folder = Path(folder)
    given = labels_for(vae, data.test_labels)  # the test labels a conditional VAE takes; None otherwise
    steps: list[tuple[str, Callable]] = [
        ("samples.png", lambda: draw_samples(vae, data, folder / "samples.png")),
        (
            "reconstructions.png",
            lambda: plots.reconstructions(
                data.test[:ORIGINALS],
                vae.reconstruct(data.test[:ORIGINALS], None if given is None else given[:ORIGINALS]),
                data.image_shape,
                folder / "reconstructions.png",
            ),
        ),
    ]
    if metrics:
        steps.append(("elbo.png", lambda: plots.elbo_curves(metrics, folder / "elbo.png")))
    subset = data.test[:LATENT_POINTS]
    if subset.shape[0] >= 2:  # a map of one point says nothing (and principal components need two)
        with_tsne = which == "all" and vae.latent_dim > 2
        labels = None if data.test_labels is None else data.test_labels[:LATENT_POINTS]
        label = "latent.png" + (f" (t-SNE of {min(subset.shape[0], plots.TSNE_POINTS)} points)" if with_tsne else "")
        steps.append(
            (
                label,
                lambda: plots.latent_map(
                    vae.encode(subset, None if given is None else given[:LATENT_POINTS])[0],
                    labels,
                    folder / "latent.png",
                    with_tsne=with_tsne,
                    class_names=data.class_names,
                ),
            )
        )
    if isinstance(vae, HierarchicalVAE) and subset.shape[0] >= 2:
        steps += [
            (f"latent-{name}.png", _layer_map(vae, subset, given, labels, name, folder, data))
            for name in vae.sites[:-1]
        ]
    return steps


def _layer_map(vae: HierarchicalVAE, subset, given, labels, name: str, folder: Path, data: Dataset) -> Callable:
    """Draws ``latent-{name}.png``: the map of E_q[z_l | x] of an upper layer (latent.png is z_1's); ``given``:
    the labels a conditional VAE takes (E_q[z_l | x, y]), None otherwise."""
    from pyro_vae import plots

    return lambda: plots.latent_map(
        vae.layer_means(subset, y=None if given is None else given[: subset.shape[0]])[name],
        labels,
        folder / f"latent-{name}.png",
        with_tsne=False,
        class_names=data.class_names,
    )


def draw_samples(vae: VAE, data: Dataset, path: Path) -> None:
    """``samples.png``: SAMPLES draws E[x | z], z ~ p(z); for a conditional VAE, a row of draws per class."""
    from pyro_vae import plots

    if not vae.num_classes:
        plots.image_grid(vae.sample(SAMPLES), data.image_shape, path, "E[x | z], z ~ p(z)")
        return
    per_class = max(1, SAMPLES // vae.num_classes)
    y = every_class(vae.num_classes, per_class).to(data.test.device)
    title = "E[x | z, y], z ~ p(z | y), one row per class y"
    plots.image_grid(vae.sample(len(y), y=y), data.image_shape, path, title, nrow=per_class)


def write(
    folder: Path, vae: VAE, data: Dataset, metrics: list[dict], which: str = "cheap", show_progress: bool = True
) -> list[Path]:
    """Draw the pictures ``which`` (``all``, ``cheap`` or ``none``) asks for into ``folder``; returns their paths.

    The progress bar moves one step per picture and names the picture being drawn (with t-SNE, how many points).
    """
    steps = plan(folder, vae, data, metrics, which)
    written = []
    with progress.bar(len(steps), "pictures", "picture", quiet=not show_progress, every=2.0) as bar:
        for label, draw in steps:
            bar.set_postfix_str(label)
            draw()
            bar.update(1)
            written.append(Path(folder) / label.split()[0])
    return written
