"""Pictures: sample and reconstruction grids, ELBO curves, the latent space, and the estimator comparison."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _show_images(ax, images: torch.Tensor, image_shape, nrow: int) -> None:
    if image_shape is None:  # flat vectors: one row per example, as a heat map
        ax.imshow(images.cpu().numpy(), aspect="auto", cmap="viridis")
        return
    from torchvision.utils import make_grid  # torchvision is slow to import: only when drawing

    grid = make_grid(images.reshape(-1, *image_shape).clamp(0, 1).cpu(), nrow=nrow, padding=1, pad_value=1.0)
    ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()


def image_grid(images: torch.Tensor, image_shape, path: Path, title: str) -> None:
    """Save ``images`` (n, D) as a square grid."""
    nrow = max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    fig, ax = plt.subplots(figsize=(6, 6))
    _show_images(ax, images, image_shape, nrow)
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def reconstructions(originals: torch.Tensor, recons: torch.Tensor, image_shape, path: Path) -> None:
    """Originals above their reconstructions, in matching columns."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 2.6))
    for ax, images, title in zip(axes, (originals, recons), ("test images", "reconstructions E[x | z = mean of q(z|x)]")):
        _show_images(ax, images, image_shape, nrow=images.shape[0])
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def elbo_curves(metrics: list[dict], path: Path) -> None:
    """Train and test ELBO per epoch, in nats per example."""
    epochs = [m["epoch"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [m["train_elbo"] for m in metrics], marker="o", label="train (estimator's bound)")
    ax.plot(epochs, [m["test_elbo"] for m in metrics], marker="s", label="test ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


TSNE_POINTS = 3000  # t-SNE is quadratic-ish in the points: a few thousand show the structure


def latent_map(means: torch.Tensor, labels: torch.Tensor | None, path: Path) -> None:
    """Posterior means in 2-D, coloured by label where there are labels.

    d = 2 is drawn as it is; for d > 2 two panels: the first two principal
    components (linear, keeps distances along them) and t-SNE of up to
    ``TSNE_POINTS`` points (scikit-learn; keeps neighbourhoods, which the first
    two components of a 50-d latent space mostly hide). Labels get a discrete
    colour map with one centred tick per label.
    """
    points = means.cpu().numpy()
    values = None if labels is None else labels.cpu().numpy()
    panels = []
    if points.shape[1] > 2:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        panels.append((PCA(n_components=2).fit_transform(points), values, ("PC 1 of E[z|x]", "PC 2 of E[z|x]"),
                       "principal components"))
        few = points[:TSNE_POINTS]
        embedded = TSNE(n_components=2, init="pca", perplexity=min(30.0, max(2.0, (len(few) - 1) / 3)),
                        random_state=0).fit_transform(few)
        panels.append((embedded, None if values is None else values[:TSNE_POINTS], ("t-SNE 1", "t-SNE 2"),
                       f"t-SNE of {len(few)} points"))
    elif points.shape[1] == 2:
        panels.append((points, values, ("E[z₁|x]", "E[z₂|x]"), "posterior means"))
    else:
        flat = torch.cat([torch.from_numpy(points), torch.zeros(points.shape[0], 1)], 1).numpy()
        panels.append((flat, values, ("E[z|x]", ""), "posterior means"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    scatter = None
    for ax, (xy, colour, names, title) in zip(axes[0], panels):
        if colour is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.8)
        else:
            classes = sorted(set(colour.tolist()))
            cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20", len(classes))
            index = {c: i for i, c in enumerate(classes)}
            scatter = ax.scatter(xy[:, 0], xy[:, 1], c=[index[c] for c in colour.tolist()], cmap=cmap, s=6, alpha=0.8,
                                 vmin=-0.5, vmax=len(classes) - 0.5)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_title(title)
    if scatter is not None:
        classes = sorted(set(values.tolist()))
        bar = fig.colorbar(scatter, ax=list(axes[0]), label="label", ticks=range(len(classes)))
        bar.set_ticklabels([str(c) for c in classes])
    fig.suptitle("posterior means of the test set")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


MARKERS = ("o", "D", "s", "^", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")


def snr_against_k(families: dict[str, list[dict]], path: Path) -> None:
    """Encoder and decoder SNR against K, log-log, one line per estimator family.

    Each family has its own marker (hollow, shrinking with the family's index)
    and line style, and is drawn a few percent to the right of the previous
    one, so families with identical values stay visible side by side; the
    values of families measured at one K only are listed in a box.
    """
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    all_k = sorted({r["k"] for group in families.values() for r in group})
    for ax, part in zip(axes, ("encoder", "decoder")):
        key = f"grad_snr_{part}"
        singles: list[str] = []
        for i, (name, group) in enumerate(families.items()):
            shift = 1.04 ** i
            ks = [r["k"] * shift for r in group]
            snr = [r[key] for r in group]
            ax.plot(ks, snr, label=name, marker=MARKERS[i % len(MARKERS)], markersize=max(4, 10 - i),
                    markerfacecolor="none", markeredgewidth=1.5, linestyle=LINESTYLES[i % len(LINESTYLES)],
                    color=f"C{i % 10}")
            if len(group) == 1:
                singles.append(f"{name} (K={group[0]['k']}): {snr[0]:.3g}")
        iwae = families.get("iwae")
        if iwae and len(iwae) > 1 and iwae[0][key] > 0:
            k0, s0 = iwae[0]["k"], iwae[0][key]
            ks = [r["k"] for r in iwae]
            power = -0.5 if part == "encoder" else 0.5
            ax.plot(ks, [s0 * (k / k0) ** power for k in ks], color="gray", linestyle="--", linewidth=1,
                    label="∝ 1/√K" if part == "encoder" else "∝ √K")
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
        ax.legend(fontsize=7, loc="upper left")
        if singles:  # the values of families measured at one K, which may sit on top of each other
            ax.text(0.98, 0.02, "\n".join(singles), transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                    bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bounds(rows: list[dict], path: Path) -> None:
    """Each estimator's bound on the fixed minibatch: mean ± std over the draws."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
    ax.errorbar([r["bound_mean"] for r in rows], range(len(rows)), xerr=[r["bound_std"] for r in rows],
                fmt="o", capsize=4)
    ax.set_yticks(range(len(rows)), [r["estimator"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("bound on the fixed minibatch, nats per example (mean ± std over draws)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def estimator_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Test ELBO against training step, one line per estimator."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=label)
    ax.set_xlabel("training step (same start, seed and minibatches for every estimator)")
    ax.set_ylabel("test ELBO, nats per example")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_curves(curves: dict[str, list[dict]], path: Path) -> None:
    """Test ELBO (solid) and validation ELBO (dashed, where a run has one) per epoch, one colour per run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, metrics) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        epochs = [m["epoch"] for m in metrics]
        ax.plot(epochs, [m["test_elbo"] for m in metrics], color=colour, label=f"{name} test")
        if any("validation_elbo" in m for m in metrics):
            ax.plot(epochs, [m.get("validation_elbo", float("nan")) for m in metrics], color=colour, linestyle="--",
                    label=f"{name} validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO, nats per example (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
