"""A BERT-style masked model (``masked``; ``masked_pixel`` is its first name): a bidirectional transformer that
predicts masked pixels, or characters of a text, from both sides.

The image is the raster sequence of sub-pixel tokens of the autoregressive families (K intensity levels, 2 on
binarised data), but instead of painting left to right the model fills blanks anywhere: trained by masking a
share of the tokens (``model.mask_schedule``: 15-40 % uniformly, or MaskGIT's cosine schedule over all rates) and
scoring the masked ones, it generates by filling a fully masked image one-shot or iteratively (predict, keep the
most confident, re-mask the rest), and inpaints real images (``genai sample --mask bottom``: the autoregressive
``--prefix-rows`` is the one-sided special case). Everything but the tokenisation is ``nn/masked.py``.

Its likelihood is a bound, not exact: the absorbing-state bound of masked diffusion (see ``nn/masked.py``), an
upper bound on the NLL reported in bits/dim beside the autoregressive families' exact values; tight only when
the model was trained across all mask rates (``mask_schedule: cosine``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..nn.autoregressive import TEXT_OPTIONS, dequantize, image_to_tokens, quantize, token_shape, tokens_to_image
from ..nn.masked import MASKED_SAMPLE_OPTIONS
from ..registry import register_model
from .base import GenerativeModel, ImageSpec
from .masked_tokens import MaskedTokenModel

VALIDATION_STRATA = 4  # mask sizes drawn per image for the bound logged at each evaluation
VALIDATION_BOUND_IMAGES = 256  # validation images it is estimated on (each costs VALIDATION_STRATA passes)


@dataclass
class Config:
    levels: int = 0  # K intensity levels per sub-pixel; 0: 2 on binary data, else 256
    d_model: int = 64
    heads: int = 4
    layers: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    mask_schedule: Literal["uniform", "cosine"] = "cosine"  # uniform: 15-40 % (BERT); cosine: MaskGIT's, all rates
    label_smoothing: float = 0.0
    fill: Literal["iterative", "one-shot"] = "iterative"  # default way of generating
    steps: int = 16  # iterative filling steps
    choice_temperature: float = 1.0  # Gumbel noise on the confidences, annealed to 0 (MaskGIT uses 4.5 on tokens)
    class_conditional: bool = False
    cond_drop_prob: float = 0.1
    guidance: float = 1.0


@register_model("masked", "BERT-style bidirectional transformer over pixels or characters: one-shot/iterative "
                          "fill, inpainting, a likelihood bound", aliases=("masked_pixel",))
class Masked(MaskedTokenModel, GenerativeModel):
    Config = Config
    tiny = {"d_model": 16, "heads": 2, "layers": 1, "levels": 4, "steps": 4}
    sample_options = MASKED_SAMPLE_OPTIONS | TEXT_OPTIONS | {"inpaint", "labels", "guidance", "blank"}
    modalities = ("image", "tokens")
    # Mask sizes genai evaluate draws per image for the bound: each is a full pass over every token, and the
    # stratified N / m weights keep the estimate's spread small (diffusion's bound takes 10 timesteps).
    bound_strata = 4
    capabilities = MaskedTokenModel.capabilities | {"variational_bound"}

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        self.levels, seq_len = token_shape(config.levels, spec)
        self.build_network(self.levels, seq_len)

    def tokens_of(self, x: Tensor) -> Tensor:
        if self.spec.kind == "tokens":
            return x.long()
        return image_to_tokens(quantize(x, self.levels))  # (B, H * W * C)

    def images_of(self, tokens: Tensor) -> Tensor:
        if self.spec.kind == "tokens":
            return tokens  # a text model's samples are its token ids
        return dequantize(tokens_to_image(tokens, self.spec), self.levels)

    def token_mask(self, pixel_mask: Tensor) -> Tensor:
        return image_to_tokens(pixel_mask.expand(-1, self.spec.channels, -1, -1))  # every channel of a pixel

    # -- likelihood: a bound, estimated from drawn mask sizes ------------------------------------
    @torch.no_grad()
    def variational_bound(self, batch, timesteps_per_image: int = 8,
                          generator: torch.Generator | None = None) -> Tensor:
        """A lower bound on log p(x) of the quantised images, nats (B,) (genai evaluate reports its bits/dim)."""
        return -self.token_nll_bound(batch, timesteps_per_image, generator)

    @torch.no_grad()
    def validation_metrics(self, batches) -> dict[str, float]:
        batches = list(batches)
        metrics = super().validation_metrics(batches)
        total, count = 0.0, 0
        for x, y in batches:
            if count >= VALIDATION_BOUND_IMAGES:
                break
            x, y = x[:VALIDATION_BOUND_IMAGES - count], y[:VALIDATION_BOUND_IMAGES - count]
            total += float(self.token_nll_bound((x, y), VALIDATION_STRATA).double().sum())
            count += x.shape[0]
        metrics["nll_bound_nats"] = total / max(count, 1)
        metrics["bits_per_dim_bound"] = self.bits_per_dim(metrics["nll_bound_nats"], self.spec)
        if self.spec.kind == "tokens":
            metrics["bits_per_char_bound"] = metrics["bits_per_dim_bound"]
        return metrics
