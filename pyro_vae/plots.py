"""Pictures of a run: sample and reconstruction grids, ELBO curves, the latent space."""
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


def latent_map(means: torch.Tensor, labels: torch.Tensor | None, path: Path) -> None:
    """Posterior means in 2-D (PCA when d > 2), coloured by label where there are labels."""
    points = means.cpu().numpy()
    if points.shape[1] > 2:
        from sklearn.decomposition import PCA

        points = PCA(n_components=2).fit_transform(points)
        axes_names = ("PC 1 of E[z|x]", "PC 2 of E[z|x]")
    elif points.shape[1] == 2:
        axes_names = ("E[z₁|x]", "E[z₂|x]")
    else:
        points = torch.cat([torch.from_numpy(points), torch.zeros(points.shape[0], 1)], 1).numpy()
        axes_names = ("E[z|x]", "")
    fig, ax = plt.subplots(figsize=(6, 5))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.8)
    else:
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=6, alpha=0.8)
        fig.colorbar(scatter, ax=ax, label="label")
    ax.set_xlabel(axes_names[0])
    ax.set_ylabel(axes_names[1])
    ax.set_title("posterior means of the test set")
    fig.savefig(path, dpi=120, bbox_inches="tight")
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
