"""The conditional GAN (Mirza & Osindero 2014): DCGAN with the class label given to both players.

G sees [z, onehot(y)] and D sees the image with onehot(y) appended as constant planes (Mirza & Osindero,
sec. 3.2: the label is an extra input layer of both players), so D judges "a real 7" rather than "a real
digit", and G must produce the digit it is asked for. Training, losses, minibatch discrimination and
optimizers are DCGAN's (see dcgan.py); fakes during training take the labels of the real batch, so the
label distribution matches the data's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import GenaiError
from ..nn.latent import check_temperature
from ..registry import register_model
from . import dcgan
from .base import ImageSpec


@dataclass
class Config(dcgan.Config):
    """The same knobs as DCGAN's; the label size comes from the dataset (ImageSpec.num_classes)."""


@register_model("cgan", "conditional DCGAN: the one-hot label goes to generator and discriminator")
class CGAN(dcgan.DCGAN):
    Config = Config
    tiny = {"latent_dim": 8, "widths": [8, 16], "minibatch": "stddev"}
    sample_options = dcgan.DCGAN.sample_options | {"labels"}

    def __init__(self, config: Config, spec: ImageSpec):
        if spec.num_classes < 1:
            raise GenaiError("cgan needs a labelled dataset (num_classes > 0), e.g. mnist5k; "
                             "for unlabelled data use the dcgan family")
        super().__init__(config, spec, label_dim=spec.num_classes)

    def generator_input(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.cat([z, F.one_hot(y, self.spec.num_classes).to(z.dtype)], 1)  # (B, latent_dim + K)

    def discriminator_input(self, x: Tensor, y: Tensor) -> Tensor:
        b, _, h, w = x.shape
        planes = F.one_hot(y, self.spec.num_classes).to(x.dtype)[:, :, None, None].expand(b, -1, h, w)
        return torch.cat([x, planes], 1)  # (B, C + K, H, W)

    def walk_labels(self, rows: int, steps: int) -> Tensor:
        """Row i of a walk draws class i % K."""
        return (torch.arange(rows, device=self.device) % self.spec.num_classes).repeat_interleave(steps)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0,
               labels: Tensor | int | None = None) -> Tensor:
        """G(z, y) for z ~ N(0, temperature^2 I); ``labels`` as in ``class_labels`` (default: classes in turn)."""
        y = self.class_labels(labels, n)
        z = self._noise(n, generator, check_temperature(temperature))
        return self._images(z, y)

    @torch.no_grad()
    def walk(self, rows: int, steps: int, *, generator: torch.Generator | None = None,
             images: Tensor | None = None, dim: int | None = None, temperature: float = 1.0,
             labels: Tensor | int | None = None) -> Tensor:
        """DCGAN's walk (see dcgan.py), conditioned: ``labels`` gives one class per row (an int for all rows, or
        a (rows,) tensor); by default row i draws class i % K (``walk_labels``)."""
        if labels is None:
            y = self.walk_labels(rows, steps)
        else:
            y = self.class_labels(labels, rows).repeat_interleave(steps)  # (rows * steps,)
        return self._walk(rows, steps, y, generator=generator, images=images, dim=dim, temperature=temperature)
