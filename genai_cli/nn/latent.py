"""Latent-space walks shared by the autoencoder, the VAE and the GANs (``walk()`` in each family).

A walk is a grid of ``rows`` x ``steps`` latent points, decoded by the family: either a straight line
between two latents per row (interpolation), or one latent dimension varied while the others stay at
the row's start (traversal).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import GenaiError


def check_temperature(temperature: float) -> float:
    """Temperature scales a latent standard deviation: 0 (every draw at the mean) or more, finite."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise GenaiError(f"temperature must be a finite number >= 0, got {temperature!r}; use e.g. --temperature 0.8")
    return float(temperature)


def check_walk(rows: int, steps: int, latent_dim: int, images: Tensor | None, dim: int | None) -> None:
    """One-line errors for impossible walks, before any work is done."""
    if rows < 1 or steps < 1:
        raise GenaiError(f"a latent walk needs rows >= 1 and steps >= 1, got rows={rows}, steps={steps}")
    if images is not None and images.shape[0] < 2 * rows:
        raise GenaiError(f"a walk with {rows} rows needs {2 * rows} images (two per row), got {images.shape[0]}; "
                         "pass more images or fewer rows")
    if dim is not None and not 0 <= dim < latent_dim:
        raise GenaiError(f"latent dimension {dim} out of range; valid: 0..{latent_dim - 1} "
                         f"(the model's latent_dim is {latent_dim})")


def interpolate(start: Tensor, end: Tensor, steps: int) -> Tensor:
    """(R, D), (R, D) -> (R * steps, D): row r goes from start[r] to end[r] in equal steps, both ends included."""
    t = torch.linspace(0, 1, steps, device=start.device, dtype=start.dtype)  # (S,)
    return (start[:, None] + t[None, :, None] * (end - start)[:, None]).flatten(0, 1)


def traverse(start: Tensor, dim: int, values: Tensor) -> Tensor:
    """(R, D), dim, (S,) or (R, S) -> (R * S, D): row r is start[r] with coordinate ``dim`` set to each value."""
    steps = values.shape[-1]
    z = start[:, None, :].repeat(1, steps, 1)  # (R, S, D)
    z[:, :, dim] = values.to(z.dtype)
    return z.flatten(0, 1)
