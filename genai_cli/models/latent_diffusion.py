"""Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

Denoise in the compact latent space of a trained, frozen autoencoder instead of in pixel space: a 28x28 digit
becomes a 4 x 7 x 7 grid (``spatial_ae``, or a VQ-VAE's pre-quantisation latents), so every UNet pass works on
49 positions instead of 784 and sampling is several times faster at the same number of steps; the autoencoder's
decoder, run once per image, brings the pixels back. The autoencoder is a parent run (``model.autoencoder``),
resolved, frozen and embedded in this run's checkpoints (``genai_cli/lineage.py``).

    training:  z_0 = scale * E(x)               (B, c, s, s); then the DDPM loss on z_0 (Ho et al. Algorithm 1)
    sampling:  z_T ~ N(0, I) -> any DDPM sampler -> z_0;  x = D(z_0 / scale)   (B, C, S, S) in [0, 1]

``scale`` (Rombach et al. sec. 4.3.2 and appendix G, "scale_factor"): the autoencoder's latents have whatever
spread its training left (a KL weight of 1e-6 barely constrains it), while the forward process assumes data of
about unit variance, so the latents are multiplied by 1 / std, the standard deviation of every latent number of
the training images, measured once when training starts (``prepare``) and kept in the checkpoint (a buffer),
never a hard-coded constant. Like theirs it is a scale only: the latents' mean is logged, not subtracted.

Everything else is the DDPM family's, unchanged: noise schedule, objectives (eps / v / x_0, Min-SNR), samplers,
labels and classifier-free guidance. Two differences: x_0 is not clipped while sampling (``clip_x0`` clamps to
the pixel range [-1, 1]; latents are unbounded, so it is refused), and there is no variational bound (it would
bound the likelihood of latents, not of pixels). The UNet's size presets (``model.size``) fit a small grid: one
level (7x7 does not halve), widths and depths growing with the preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import GenaiError
from ..registry import register_model
from .base import ImageSpec, RunRef, run_ref
from .diffusion import DDPM
from .diffusion import Config as DDPMConfig

# Size presets of the latent UNet: one level, since the grids of 28x28 and 32x32 images (7x7, 8x8) are small enough
# for a few 3x3 convolutions and the always-attended bottleneck to see all of it. An even grid can take two
# levels explicitly (channel_mults: [1, 2]).
LATENT_PRESETS: dict[str, dict[str, Any]] = {
    "S": {"base_channels": 32, "channel_mults": [1], "num_res_blocks": 2, "attention_levels": []},
    "M": {"base_channels": 64, "channel_mults": [1], "num_res_blocks": 2, "attention_levels": [0]},
    "L": {"base_channels": 128, "channel_mults": [1], "num_res_blocks": 3, "attention_levels": [0]},
}
# The DiT presets of the latent grid (model.backbone: dit): diffusion.DIT_PRESETS' widths and depths on 1x1 patches,
# every latent position a token (49 on the 7x7 grid; 7 is prime, so only 1 and 7 divide it), with U-ViT's long skips
# and a depthwise 3x3 conv in every block (nn/dit.py, ``DiT``: measured in benchmarks/README.md, "Scaling"). The
# label table of S starts at N(0, 0.2), of B and L at N(0, 1): measured per size there (0.2 gave S better guided
# samples at the top budget and B worse ones at every budget).
LATENT_DIT_PRESETS: dict[str, dict[str, Any]] = {
    "S": {"patch_size": 1, "hidden_size": 64, "depth": 4, "num_heads": 2, "long_skip": True,
          "local_conv": True, "label_init_std": 0.2},
    "B": {"patch_size": 1, "hidden_size": 128, "depth": 6, "num_heads": 4, "long_skip": True,
          "local_conv": True, "label_init_std": 1.0},
    "L": {"patch_size": 1, "hidden_size": 192, "depth": 8, "num_heads": 6, "long_skip": True,
          "local_conv": True, "label_init_std": 1.0},
}
PREPARE_CHUNK = 500  # images encoded at once while measuring the latent scale


@dataclass
class Config(DDPMConfig):
    autoencoder: RunRef = run_ref(accepts=("spatial_ae", "vqvae"))  # the trained first stage: a run or path
    clip_x0: bool = False  # clamps x_0 to pixel range: refused here (latents are unbounded)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = LATENT_PRESETS
    DIT_PRESETS: ClassVar[dict[str, dict[str, Any]]] = LATENT_DIT_PRESETS


class LatentSpace:
    """The latent space of a frozen autoencoder, for a family built on ``diffusion.DenoisingFamily`` (latent_ddpm,
    latent_flow): list it before the family, ``class LatentDDPM(LatentSpace, DDPM)``, and give the config an
    ``autoencoder`` run reference. It replaces the pixel space's ``model_shape``, ``to_model_space`` and
    ``from_model_space`` with the scaled latent grid, and brings ``reconstruct`` and ``prepare`` (the scale)."""

    capabilities = frozenset({"reconstruct", "prepare"})

    def __init__(self, config, spec: ImageSpec, parents):
        super().__init__(config, spec, parents)
        # 1 / std of the training latents, measured by prepare() before the first step; persistent, so a checkpoint
        # (and a resumed run) keeps the factor it was trained with. 1 until measured.
        self.register_buffer("latent_scale", torch.ones(()))

    @property
    def autoencoder(self):
        return self.parents["autoencoder"]

    # -- the space being denoised ----------------------------------------------------------------
    @property
    def model_shape(self) -> tuple[int, int, int]:
        """(c, s, s): the autoencoder's latent grid."""
        return tuple(self.autoencoder.latent_shape)

    def check_model_shape(self, height: int, width: int) -> None:
        m = self.unet.size_multiple
        if height % m or width % m:
            levels = self.unet.num_levels
            raise GenaiError(f"the autoencoder's latent grid is {height}x{width}, which a UNet of {levels} levels "
                             f"cannot halve {levels - 1} times; use model.channel_mults with one entry (e.g. [1]) or "
                             f"an autoencoder with a grid divisible by {m}")

    @torch.no_grad()
    def to_model_space(self, x: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1] -> scaled latents (B, c, s, s), through the frozen encoder (no gradient)."""
        return self.autoencoder.encode_latent(x).float() * self.latent_scale

    def from_model_space(self, z0: Tensor) -> Tensor:
        """Scaled latents (B, c, s, s) -> images (B, C, S, S) in [0, 1], through the frozen decoder."""
        return self.autoencoder.decode_latent(z0.float() / self.latent_scale).float().clamp(0, 1)

    def network_evaluations(self, options) -> int:
        return super().network_evaluations(options) + 1  # the denoiser's steps, then the decoder once

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Images through the latent path and back, no diffusion: the ceiling the autoencoder sets on sample
        quality (the loop draws it beside the sample grids)."""
        return self.from_model_space(self.to_model_space(x))

    # -- measured before the first step -----------------------------------------------------------
    @torch.no_grad()
    def prepare(self, train_images: Tensor) -> dict[str, float]:
        """Set ``latent_scale`` = 1 / std of the training images' latents (every number of every grid), so the
        scaled latents have variance 1; returns the measurement for the run's log."""
        z = torch.cat([self.autoencoder.encode_latent(chunk).float()
                       for chunk in train_images.split(PREPARE_CHUNK)])  # (N, c, s, s)
        if z.shape[0] < 2:
            raise GenaiError(f"a latent family measures its latent scale on the training images, got {z.shape[0]}; "
                             f"use a dataset of at least 2 images")
        var = float(z.var())
        if not var > 0 or not torch.isfinite(z).all():
            raise GenaiError(f"the autoencoder's latents have variance {var} on the training images; it cannot "
                             f"be rescaled to 1: train the autoencoder run first (model.autoencoder)")
        self.latent_scale.fill_(var ** -0.5)
        return {"latent_images": z.shape[0], "latent_mean": float(z.mean()), "latent_var": var,
                "latent_scale": float(self.latent_scale), "latent_var_scaled": float((z * self.latent_scale).var())}


@register_model("latent_ddpm", "DDPM in a frozen autoencoder's latent grid (latent diffusion); model.autoencoder: RUN")
class LatentDDPM(LatentSpace, DDPM):
    """The DDPM family on ``scale * autoencoder.encode_latent(x)``; samples decode through the frozen autoencoder."""

    Config = Config
    tiny = {"base_channels": 8, "channel_mults": [1], "timesteps": 20}
    # Not DDPM's variational_bound: a bound over latents says nothing about the pixels' likelihood (withdrawn).
    capabilities = LatentSpace.capabilities | {"ode_solve"}  # DDPM's ODE, in the latent grid
    variational_bound = None

    def __init__(self, config: Config, spec: ImageSpec, parents):
        if config.clip_x0:
            raise GenaiError("model.clip_x0 clamps x_0 to the pixel range [-1, 1]; latents are unbounded: "
                             "set model.clip_x0=false for latent_ddpm")
        super().__init__(config, spec, parents)
