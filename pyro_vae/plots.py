"""Pictures: sample and reconstruction grids, ELBO curves, the latent space, and the estimator comparison.

Every picture is drawn through matplotlib's object interface
(:class:`matplotlib.figure.Figure` and ``Figure.savefig``), never through
``pyplot``: drawing neither selects a backend nor opens a figure in the
program that imports the package. Each function saves its file and returns
the figure, so its layout can be inspected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib import colormaps, ticker
from matplotlib.figure import Figure

TSNE_POINTS = 3000  # t-SNE is quadratic-ish in the points: a few thousand show the structure


def _save(fig: Figure, path: Path, dpi: int = 120) -> Figure:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig


def _show_images(ax, images: torch.Tensor, image_shape, nrow: int, limits: tuple[float, float] | None = None):
    """Images as a grid without axes; flat vectors as a heat map, one row per example (returned for a colour bar)."""
    if image_shape is None:
        low, high = limits if limits is not None else (None, None)
        heat = ax.imshow(
            images.cpu().numpy(), aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest"
        )
        ax.set_ylabel("example")
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        return heat
    grid = tile(images.reshape(-1, *image_shape).clamp(0, 1).cpu(), nrow)
    ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    return None


def tile(images: torch.Tensor, nrow: int, padding: int = 1, pad_value: float = 1.0) -> torch.Tensor:
    """Images (n, C, H, W) as one (C, rows·(H+p)+p, nrow·(W+p)+p) grid, row by row, ``padding`` p between them.

    torchvision's ``make_grid`` does the same, but importing torchvision takes
    seconds, more than drawing all the pictures of a run on a small machine.
    """
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    blank = images.new_full((rows * nrow - n, c, h, w), pad_value)
    cells = torch.nn.functional.pad(torch.cat([images, blank]), (0, padding, 0, padding), value=pad_value)
    grid = cells.reshape(rows, nrow, c, h + padding, w + padding).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(c, rows * (h + padding), nrow * (w + padding))
    return torch.nn.functional.pad(grid, (padding, 0, padding, 0), value=pad_value)


def image_grid(images: torch.Tensor, image_shape, path: Path, title: str, nrow: int | None = None) -> Figure:
    """Save ``images`` (n, D) as a grid of ``nrow`` images per row, square by default (flat vectors: a heat map of
    n rows)."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.add_subplot()
    heat = _show_images(ax, images, image_shape, nrow)
    if heat is not None:
        ax.set_xlabel("dimension")
        fig.colorbar(heat, ax=ax)
    ax.set_title(title)
    return _save(fig, path)


def reconstructions(originals: torch.Tensor, recons: torch.Tensor, image_shape, path: Path) -> Figure:
    """Originals above their reconstructions, in matching columns (flat vectors: two heat maps on one colour scale)."""
    vectors = image_shape is None
    fig = Figure(figsize=(8, 6 if vectors else 2.6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=vectors)
    both = torch.cat([originals, recons])
    limits = (float(both.min()), float(both.max()))
    heat = None
    for ax, images, title in zip(
        axes, (originals, recons), ("test examples", "reconstructions E[x | z = mean of q(z|x)]")
    ):
        heat = _show_images(ax, images, image_shape, nrow=images.shape[0], limits=limits)
        ax.set_title(title, fontsize=9)
    if heat is not None:
        axes[1].set_xlabel("dimension")
        fig.colorbar(heat, ax=list(axes), label="value")
    return _save(fig, path)


def elbo_curves(metrics: list[dict], path: Path) -> Figure:
    """Train and test ELBO per epoch, in nats per example; whole epochs on the x axis."""
    epochs = [m["epoch"] for m in metrics]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(epochs, [m["train_elbo"] for m in metrics], marker="o", label="train (estimator's bound)")
    ax.plot(epochs, [m["test_elbo"] for m in metrics], marker="s", label="test ELBO")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def principal_components(points: torch.Tensor) -> torch.Tensor:
    """The projections of ``points`` (n, d) on their first two principal axes.

    With X the centred points and X = U S Vᵀ its thin SVD, the projections
    are X V[:, :2] = U[:, :2] S[:2]; each axis's sign is fixed so that its
    largest |loading| is positive (the same picture on every run).
    """
    centred = points - points.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = vh[:2]
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return centred @ (axes * signs).T


def tsne(points: torch.Tensor) -> torch.Tensor:
    """scikit-learn's t-SNE of ``points`` (at most ``TSNE_POINTS``), PCA-initialized, seed 0."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (points.shape[0] - 1) / 3))
    embedded = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=0).fit_transform(points.numpy())
    return torch.from_numpy(embedded)


def latent_panels(means: torch.Tensor, with_tsne: bool) -> list[tuple[torch.Tensor, int, tuple[str, str], str]]:
    """(2-d points, how many of the labels they take, axis names, panel title) of each latent-map panel.

    d = 2: the means as they are; d = 1: the means on a line; d > 2: the first
    two principal components (linear, keeps distances along them), and with
    ``with_tsne`` t-SNE of up to ``TSNE_POINTS`` points (keeps neighbourhoods,
    which the first two components of a 50-d latent space mostly hide).
    """
    points = means.detach().float().cpu()
    n = points.shape[0]
    if points.shape[1] == 2:
        return [(points, n, ("E[z₁|x]", "E[z₂|x]"), "")]
    if points.shape[1] == 1:
        return [(torch.cat([points, torch.zeros(n, 1)], 1), n, ("E[z|x]", ""), "")]
    panels = [(principal_components(points), n, ("PC 1 of E[z|x]", "PC 2 of E[z|x]"), "principal components")]
    if with_tsne:
        few = min(n, TSNE_POINTS)
        panels.append((tsne(points[:few]), few, ("t-SNE 1", "t-SNE 2"), f"t-SNE of {few} points"))
    return panels


def latent_map(
    means: torch.Tensor,
    labels: torch.Tensor | None,
    path: Path,
    with_tsne: bool = False,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Posterior means in 2-D (:func:`latent_panels`), coloured by label where there are labels.

    Labels get a discrete colour map with one centred tick per label, named by
    ``class_names[label]`` where the dataset has names. One title: the
    figure's, or with two panels the figure's over each panel's own method.
    """
    panels = latent_panels(means, with_tsne)
    values = None if labels is None else labels.cpu().tolist()
    classes = sorted(set(values)) if values is not None else []
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"].resampled(max(1, len(classes)))
    fig = Figure(figsize=(6 * len(panels), 5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    scatter = None
    for ax, (xy, count, names, title) in zip(axes, panels):
        if values is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.8)
        else:
            index = {c: i for i, c in enumerate(classes)}
            scatter = ax.scatter(
                xy[:, 0],
                xy[:, 1],
                c=[index[c] for c in values[:count]],
                cmap=cmap,
                s=6,
                alpha=0.8,
                vmin=-0.5,
                vmax=len(classes) - 0.5,
            )
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_title(title)
    if scatter is not None:
        bar = fig.colorbar(scatter, ax=list(axes), label="class" if class_names else "label", ticks=range(len(classes)))
        bar.set_ticklabels([class_names[c] if class_names else str(c) for c in classes])
    fig.suptitle("posterior means E[z|x] of the test set")
    return _save(fig, path)


MARKERS = ("o", "D", "s", "^", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")


def snr_against_k(families: dict[str, list[dict]], path: Path) -> Figure:
    """Encoder and decoder SNR against K, log-log, one line per estimator family.

    Each family has its own marker (hollow, shrinking with the family's index)
    and line style, and is drawn a few percent to the right of the previous
    one, so families with identical values stay visible side by side. Each
    panel's legend sits outside it, on its right; a family measured at one K
    only has its value in its legend entry (such points may sit on each other).
    """
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    all_k = sorted({r["k"] for group in families.values() for r in group})
    for ax, part in zip(axes, ("encoder", "decoder")):
        key = f"grad_snr_{part}"
        for i, (name, group) in enumerate(families.items()):
            shift = 1.04**i
            snr = [r[key] for r in group]
            label = name if len(group) > 1 else f"{name} (K={group[0]['k']}): {snr[0]:.3g}"
            ax.plot(
                [r["k"] * shift for r in group],
                snr,
                label=label,
                marker=MARKERS[i % len(MARKERS)],
                markersize=max(4, 10 - i),
                markerfacecolor="none",
                markeredgewidth=1.5,
                linestyle=LINESTYLES[i % len(LINESTYLES)],
                color=f"C{i % 10}",
            )
        iwae = families.get("iwae")
        if iwae and len(iwae) > 1 and iwae[0][key] > 0:
            k0, s0 = iwae[0]["k"], iwae[0][key]
            ks = [r["k"] for r in iwae]
            power = -0.5 if part == "encoder" else 0.5
            ax.plot(
                ks,
                [s0 * (k / k0) ** power for k in ks],
                color="gray",
                linestyle="--",
                linewidth=1,
                label="∝ 1/√K" if part == "encoder" else "∝ √K",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(all_k, [str(k) for k in all_k])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("K (particles per bound; families drawn a few % apart)")
        ax.set_ylabel("mean per-parameter SNR |E[g]| / std[g]")
        ax.set_title(f"{part} ({'guide, φ' if part == 'encoder' else 'model, θ'})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return _save(fig, path, dpi=100)


def bounds(rows: list[dict], path: Path) -> Figure:
    """Each estimator's bound on the fixed minibatch: mean ± std over the draws."""
    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    ax.errorbar(
        [r["bound_mean"] for r in rows], range(len(rows)), xerr=[r["bound_std"] for r in rows], fmt="o", capsize=4
    )
    ax.set_yticks(range(len(rows)), [r["estimator"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("bound on the fixed minibatch, nats per example (mean ± std over draws)")
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi=100)


def estimator_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Figure:
    """Test ELBO against training step, one line per estimator."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=label)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("training step (same start, seed and minibatches for every estimator)")
    ax.set_ylabel("test ELBO, nats per example")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi=100)


def run_curves(curves: dict[str, list[dict]], path: Path) -> Figure:
    """Test ELBO (solid) and validation ELBO (dashed, where a run has one) per epoch, one colour per run."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, metrics) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        epochs = [m["epoch"] for m in metrics]
        ax.plot(epochs, [m["test_elbo"] for m in metrics], color=colour, label=f"{name} test")
        if any("validation_elbo" in m for m in metrics):
            ax.plot(
                epochs,
                [m.get("validation_elbo", float("nan")) for m in metrics],
                color=colour,
                linestyle="--",
                label=f"{name} validation",
            )
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO, nats per example (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
