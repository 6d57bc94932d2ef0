"""MaskGIT (Chang et al. 2022): a bidirectional transformer over the token grid of a trained VQ-VAE run.

``model.tokenizer: RUN`` names the ``vqvae`` run; it is frozen and embedded in this run's checkpoints (see
``genai_cli/lineage.py``), so the checkpoint alone samples. Training masks ceil(gamma(r) N) of an image's N
tokens, r ~ U(0, 1), gamma the cosine schedule (sec. 3.2), at least one, and scores the masked ones (optionally
label-smoothed, as the paper's code does). Sampling starts from a fully masked grid and, in ``--steps``
iterations, predicts every masked token, draws them through ``genai_cli.sampling`` and keeps the most confident
(Gumbel noise on the confidences, ``--choice-temperature`` x (1 - s / S)); the tokenizer decodes the grid. With
a labelled dataset and ``class_conditional``, classes condition the model and classifier-free guidance
(``--guidance``) mixes the logits, as the DDPM family mixes its noise estimates. Everything but the tokenizer is
``nn/masked.py``, shared with the masked pixel model.

Because N is the token grid (49 tokens for 28x28 images with a 7x7 grid), 12 steps draw a whole image in 12
forward passes, against 49 for an autoregressive transformer over the same tokens and 784 over pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from ..lineage import Parents
from ..nn.masked import MASKED_SAMPLE_OPTIONS
from ..registry import register_model
from .base import GenerativeModel, ImageSpec, RunRef, run_ref
from .masked_tokens import MaskedTokenModel


@dataclass
class Config:
    tokenizer: RunRef = run_ref(accepts=("vqvae",))  # the trained VQ-VAE run (name, folder or checkpoint)
    d_model: int = 128
    heads: int = 4
    layers: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    mask_schedule: Literal["uniform", "cosine"] = "cosine"  # cosine: MaskGIT's; uniform: 15-40 %
    label_smoothing: float = 0.1
    fill: Literal["iterative", "one-shot"] = "iterative"
    steps: int = 12
    choice_temperature: float = 4.5  # the paper's
    class_conditional: bool = False
    cond_drop_prob: float = 0.1
    guidance: float = 1.0


@register_model("maskgit", "MaskGIT: confidence-ordered iterative unmasking of a trained vqvae run's tokens")
class MaskGIT(MaskedTokenModel, GenerativeModel):
    Config = Config
    tiny = {"d_model": 16, "heads": 2, "layers": 1, "steps": 4, "dropout": 0.0}
    sample_options = MASKED_SAMPLE_OPTIONS | {"labels", "guidance"}

    def __init__(self, config: Config, spec: ImageSpec, parents: Parents):
        super().__init__(config, spec, parents)
        tokenizer = self.parents["tokenizer"]
        h, w = tokenizer.token_grid
        self.build_network(tokenizer.num_codes, h * w)

    def tokens_of(self, x: Tensor) -> Tensor:
        return self.parents["tokenizer"].tokenize(x)  # (B, h * w), frozen

    def images_of(self, tokens: Tensor) -> Tensor:
        return self.parents["tokenizer"].detokenize(tokens).float()

    def network_evaluations(self, options) -> int:
        return super().network_evaluations(options) + 1  # the filling steps, then the tokenizer's decoder once
