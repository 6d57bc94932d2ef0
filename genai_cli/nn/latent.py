"""Latent-space walks shared by the autoencoder, the VAE and the GANs (``walk()`` in each family).

A walk is a grid of ``rows`` x ``steps`` latent points, decoded by the family. Two choices make one:

- where the points come from: random latents drawn exactly as ``sample()`` draws them (so ``temperature``
  scales them the same way), or the latents of real images (families with an encoder);
- how a row moves: a straight line between two latents (interpolation: row i goes from point 2i to point
  2i+1, both ends included), or one latent coordinate varied over +-3 standard deviations of the latent
  distribution while the others stay at the row's start (traversal of dimension ``dim``: row i starts at
  point i).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import GenaiError

TRAVERSE_SIGMAS = 3.0  # a traversal spans the latent distribution's mean +- this many standard deviations
# Running latent statistics: a plain average over the first 1/STATS_MOMENTUM batches, then an exponential moving
# average with this weight on the newest batch (batch norm's scheme).
STATS_MOMENTUM = 0.01


@torch.no_grad()
def update_latent_stats(model, z: Tensor) -> None:
    """Fold a batch of latents (B, ...) into ``model``'s buffers latent_mean, latent_std (per latent number) and
    latent_batches: what an autoencoder without a prior samples from (a Gaussian of its training latents)."""
    if z.shape[0] < 2:
        return  # no spread to measure in a batch of one
    model.latent_batches += 1
    w = max(STATS_MOMENTUM, 1.0 / float(model.latent_batches))
    model.latent_mean.lerp_(z.mean(0), w)
    model.latent_std.lerp_(z.std(0), w)


def check_temperature(temperature: float) -> float:
    """Temperature scales a latent standard deviation: 0 (every draw at the mean) or more, finite."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise GenaiError(f"temperature must be a finite number >= 0, got {temperature!r}; use e.g. --temperature 0.8")
    return float(temperature)


def walk_points(rows: int, dim: int | None) -> int:
    """How many latents a walk starts from: two per row (interpolation), or one per row (traversal)."""
    return rows if dim is not None else 2 * rows


def check_walk(rows: int, steps: int, latent_dim: int, images: Tensor | None, dim: int | None) -> None:
    """One-line errors for impossible walks, before any work is done."""
    if rows < 1 or steps < 1:
        raise GenaiError(f"a latent walk needs rows >= 1 and steps >= 1, got rows={rows}, steps={steps}")
    needed = walk_points(rows, dim)
    if images is not None and images.shape[0] < needed:
        per_row = "one per row" if dim is not None else "two per row"
        raise GenaiError(f"a walk with {rows} rows needs {needed} images ({per_row}), got {images.shape[0]}; "
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


def walk_latents(rows: int, steps: int, *, latent_dim: int, draw: Callable[[int, float], Tensor],
                 encode: Callable[[Tensor], Tensor] | None = None, images: Tensor | None = None,
                 dim: int | None = None, temperature: float = 1.0, mean: Tensor | None = None,
                 std: Tensor | None = None, name: str = "this model") -> Tensor:
    """The (rows * steps, latent_dim) latent points of a walk (see the module doc), for the family to decode.

    ``draw(k, temperature)`` gives k random latents exactly as the family's ``sample`` draws them;
    ``encode(images)`` the latents of real images (None: the family has no encoder). ``mean`` and ``std``
    (latent_dim,) describe the latent distribution a traversal spans (default: the standard normal).
    ``temperature`` scales random latents only: with ``images`` it must stay 1.
    """
    t = check_temperature(temperature)
    if images is not None and encode is None:
        raise GenaiError(f"{name} has no encoder to place real images in its latent space; "
                         "walk between random latent points instead (images=None)")
    check_walk(rows, steps, latent_dim, images, dim)
    count = walk_points(rows, dim)
    if images is None:
        points = draw(count, t)  # (count, D)
    else:
        if t != 1.0:
            raise GenaiError(f"temperature scales random latents; a walk between real images' latents has none "
                             f"(got temperature={temperature}): leave it at 1, or walk between random latents")
        points = encode(images[:count]).float()
    if dim is None:
        return interpolate(points[0::2], points[1::2], steps)
    spread = torch.linspace(-TRAVERSE_SIGMAS, TRAVERSE_SIGMAS, steps, device=points.device)  # (S,)
    values = spread if mean is None else mean[dim] + spread * std[dim]
    return traverse(points, dim, values)
