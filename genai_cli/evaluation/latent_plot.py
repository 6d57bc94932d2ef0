"""The "latent space of an autoencoder" figure: a 2-D PCA of encoded images, coloured by class.

Used by ``genai inspect`` for every family declaring the ``encode`` capability, ``encode(x) -> (B, latent_dim)``
(autoencoder, vae, spatial_ae). Draws on a bare matplotlib ``Figure`` (Agg canvas), never pyplot, so no global
backend state changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from torch import Tensor

from ..capabilities import has
from ..errors import GenaiError


@torch.no_grad()
def encode_all(model, images: Tensor, batch_size: int = 256) -> Tensor:
    """(N, C, H, W) in [0, 1] -> (N, latent_dim) float32 on the CPU, encoded in eval mode."""
    if not has(model, "encode"):
        raise GenaiError(f"{type(model).__name__} has no encoder, so it has no latent space of images to plot")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        parts = [model.encode(images[i:i + batch_size].to(device)).float().cpu()
                 for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def plot_latents(model, images: Tensor, labels: Tensor, path: str | Path) -> Path:
    """Encode ``images`` (N, C, H, W), project the latents on their first two principal components, and save
    a scatter plot coloured by ``labels`` (N,) to ``path`` (PNG). Returns the path."""
    if images.shape[0] < 2:
        raise GenaiError(f"a latent plot needs at least 2 images, got {images.shape[0]}")
    z = encode_all(model, images).numpy()  # (N, D)
    n_comp = min(2, z.shape[1])
    pca = PCA(n_components=n_comp)
    p = pca.fit_transform(z)  # (N, n_comp)
    ratios = list(pca.explained_variance_ratio_) + [0.0]
    y_axis = p[:, 1] if n_comp == 2 else 0 * p[:, 0]  # a 1-D latent is shown on a line
    labels = labels.cpu().numpy()

    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    points = ax.scatter(p[:, 0], y_axis, c=labels, cmap="tab10", s=5, alpha=0.7, vmin=0, vmax=max(9, labels.max()))
    if len(set(labels.tolist())) > 1:
        ax.legend(*points.legend_elements(), title="class", loc="best", fontsize=7, markerscale=0.8)
    ax.set_xlabel(f"PC 1 ({ratios[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({ratios[1]:.0%} of variance)")
    ax.set_title(f"{type(model).__name__}: {z.shape[1]}-d latents of {z.shape[0]} images")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
