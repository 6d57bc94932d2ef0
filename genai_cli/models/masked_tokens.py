"""The model-level mixin of the masked families (``masked`` over pixels or characters, ``maskgit`` over a VQ-VAE's
tokens): loss, filling, inpainting and the likelihood bound. The layers and the math (schedules, ``fill_tokens``,
``absorbing_bound``) are in ``genai_cli.nn.masked``, whose module doc explains them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import GenaiError
from ..hardware import largest_layer, step_threads
from ..nn.autoregressive import check_modality_options, prompt_ids
from ..nn.masked import (
    BLANK,
    FILLS,
    MASK_SCHEDULES,
    MASKED_SAMPLE_OPTIONS,
    MaskedTransformer,
    absorbing_bound,
    fill_tokens,
    mask_counts,
    masked_cross_entropy,
    random_mask,
)
from ..sampling import check_sampling_options


class MaskedTokenModel:
    """Loss, generation, inpainting and the likelihood bound of a masked model over a sequence of N tokens.

    A mixin listed before ``GenerativeModel`` (like ``AutoregressiveImageModel``). A family sets ``self.network``
    (a ``MaskedTransformer``), ``self.vocab`` (K) and ``self.seq_len`` (N), and implements ``tokens_of`` (images ->
    tokens) and ``images_of`` (tokens -> images); its config has ``mask_schedule``, ``steps``, ``fill``,
    ``choice_temperature`` and ``label_smoothing`` (and ``class_conditional``/``cond_drop_prob``/``guidance`` for
    class-conditional models).
    """

    discrete = True
    sample_options: ClassVar[frozenset[str]] = MASKED_SAMPLE_OPTIONS
    capabilities: ClassVar[frozenset[str]] = frozenset({"calibration_logits"})
    network: MaskedTransformer

    def tokens_of(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> tokens (B, N) in 0..K-1."""
        raise NotImplementedError

    def images_of(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N) -> images (B, C, H, W) in [0, 1]."""
        raise NotImplementedError

    def build_network(self, vocab: int, seq_len: int) -> None:
        """Set ``vocab``, ``seq_len`` and the ``network`` from the config (class rows when class-conditional), after
        checking the config: what every masked family's ``__init__`` ends with."""
        cfg = self.config
        self.vocab, self.seq_len = vocab, seq_len
        self.network = MaskedTransformer(vocab, seq_len, cfg.d_model, cfg.heads, cfg.layers, cfg.mlp_ratio,
                                         cfg.dropout, self.spec.num_classes if self.class_conditional else 0)
        self.check_config()

    @property
    def conditional(self) -> bool:
        return self.class_conditional

    def check_config(self) -> None:
        """A bad model section fails when the model is built, with the key to fix, not after training."""
        cfg = self.config
        if cfg.mask_schedule not in MASK_SCHEDULES:
            raise GenaiError(f"unknown model.mask_schedule '{cfg.mask_schedule}'; valid: {', '.join(MASK_SCHEDULES)}")
        if not 0 <= getattr(cfg, "label_smoothing", 0.0) < 1:
            raise GenaiError(f"model.label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        if self.class_conditional:
            if self.spec.num_classes <= 0:
                raise GenaiError("model.class_conditional: true needs a labelled dataset (this one has no classes); "
                                 "set it to false or use a dataset with labels")
            if not 0 <= cfg.cond_drop_prob < 1:
                raise GenaiError(f"model.cond_drop_prob must be in [0, 1), got {cfg.cond_drop_prob}")
        elif getattr(cfg, "guidance", 1.0) != 1.0:
            raise GenaiError("model.guidance needs model.class_conditional: true; drop it or train with labels")
        self.check_fill_options(None, None, None, None)

    @property
    def mask_id(self) -> int:
        return self.network.mask_id

    @property
    def class_conditional(self) -> bool:
        return bool(getattr(self.config, "class_conditional", False))

    # -- training --------------------------------------------------------------------------------
    def loss(self, batch) -> dict[str, Tensor]:
        x, y = batch
        tokens = self.tokens_of(x)  # (B, N)
        b, n = tokens.shape
        mask = random_mask(mask_counts(b, n, self.config.mask_schedule, device=tokens.device), n)
        labels = None
        if self.class_conditional:  # label dropout trains the unconditional model for guidance (Ho & Salimans 2022)
            drop = torch.rand(b, device=y.device) < self.config.cond_drop_prob
            labels = torch.where(drop, torch.full_like(y, self.spec.num_classes), y)
        logits = self.network(torch.where(mask, self.mask_id, tokens), labels)
        ce = masked_cross_entropy(logits, tokens, mask, getattr(self.config, "label_smoothing", 0.0))
        return {"loss": ce, "masked_share": mask.float().mean()}

    # -- generation ------------------------------------------------------------------------------
    def predictor(self, labels: Tensor | None, guidance: float) -> Callable[[Tensor, Tensor], Tensor]:
        """(tokens, masked) -> logits at the masked positions (``fill_tokens``' ``predict``), with classifier-free
        guidance (Ho & Salimans 2022 eq. 6, on logits) when asked."""
        # Called in eval mode without autograd (the network's lean path): its weights are checked once for the draw.
        net, weights = self.network, self.network.lean_weights()
        if labels is None or guidance == 1.0:
            return lambda t, at: net(t, labels, at, weights).float()
        null = torch.full_like(labels, self.spec.num_classes)

        def guided(t: Tensor, at: Tensor) -> Tensor:
            both = net(torch.cat([t, t]), torch.cat([labels, null]), torch.cat([at, at]), weights)
            cond, uncond = both.float().chunk(2)  # (M, K) each: the masked rows of the first n, then the same again
            return uncond + guidance * (cond - uncond)

        return guided

    def check_sample_options(self, options) -> None:
        self.check_fill_options(*(options.get(k) for k in ("fill", "steps", "choice_temperature", "guidance")))

    def network_evaluations(self, options) -> int:
        """One pass per filling step (one-shot: one); a guided step is one pass over a batch of 2n."""
        return self.check_fill_options(*(options.get(k) for k in ("fill", "steps", "choice_temperature",
                                                                   "guidance")))[0]

    def check_fill_options(self, fill_mode: str | None, steps: int | None, choice_temperature: float | None,
                           guidance: float | None) -> tuple[int, float, float]:
        cfg = self.config
        fill_mode = fill_mode or cfg.fill
        if fill_mode not in FILLS:
            raise GenaiError(f"--fill must be one of {', '.join(FILLS)}, got '{fill_mode}'")
        if fill_mode == "one-shot":
            if steps is not None and steps != 1:
                raise GenaiError(f"--fill one-shot fills every masked token in one pass; drop --steps {steps} or "
                                 f"use --fill iterative")
            steps = 1
        steps = cfg.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise GenaiError(f"--steps must be an integer >= 1, got {steps!r}")
        ct = cfg.choice_temperature if choice_temperature is None else choice_temperature
        if not isinstance(ct, (int, float)) or not math.isfinite(ct) or ct < 0:
            raise GenaiError(f"--choice-temperature must be a finite number >= 0, got {ct!r}; 0 keeps the most "
                             f"likely tokens, MaskGIT uses 4.5")
        g = getattr(cfg, "guidance", 1.0) if guidance is None else guidance
        if guidance is not None and not self.class_conditional:
            raise GenaiError("--guidance needs a class-conditional model; train with model.class_conditional=true")
        if g < 0:
            raise GenaiError(f"--guidance must be >= 0, got {g}; 1 is plain conditional sampling")
        return steps, float(ct), float(g)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, fill: str | None = None,
               steps: int | None = None, choice_temperature: float | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, greedy: bool | None = None,
               noise_std: float | None = None, labels=None, guidance: float | None = None,
               known: Tensor | None = None, mask: Tensor | None = None, prompt: str | Tensor | None = None,
               max_new_tokens: int | None = None, blank: str | None = None,
               trace: list[Tensor] | None = None) -> Tensor:
        """n images (n, C, H, W) in [0, 1], every token masked at the start; or, with ``known`` (m, C, H, W) images
        in [0, 1] and ``mask`` (m, 1, H, W) bool (True: redraw), n // m completions of each, consecutive, whose
        pixels outside the mask are exactly the known ones (families that offer "inpaint").
        Text: n texts (n, L) of token ids: a whole block from scratch, or ``prompt`` with its ``blank`` characters
        (default "_") filled and ``max_new_tokens`` more blanks after it; the other characters stay as given."""
        check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, noise_std=noise_std)
        check_modality_options(self.spec, prompt, max_new_tokens)
        steps, ct, g = self.check_fill_options(fill, steps, choice_temperature, guidance)
        device = self.device
        labels = self.class_labels(labels, n)
        if self.spec.kind == "tokens":
            tokens = self._text_tokens(prompt, max_new_tokens, blank, n)
        elif known is None:
            tokens = torch.full((n, self.seq_len), self.mask_id, dtype=torch.long, device=device)
        else:
            known, mask = self._check_known(known, mask, n)
            tokens = torch.where(self.token_mask(mask), self.mask_id, self.tokens_of(known))
        was_training = self.training
        switch = was_training or self.network.training  # a walk over every module (the tokenizer's too): skipped
        if switch:                                      # when all is in eval mode already, as when sampling
            self.eval()
        try:
            # A few dozen small operations per step: autograd's bookkeeping skipped, one thread where each is small
            # (hardware.step_threads); the clone makes the result an ordinary tensor again.
            with torch.inference_mode(), step_threads(n * self.seq_len * largest_layer(self.network), device):
                tokens = fill_tokens(self.predictor(labels, g), tokens, self.mask_id, steps,
                                     temperature=1.0 if temperature is None else float(temperature), top_k=top_k,
                                     top_p=top_p, greedy=bool(greedy), noise_std=float(noise_std or 0.0),
                                     choice_temperature=ct, generator=generator, trace=trace)
            tokens = tokens.clone()
        finally:
            if switch:
                self.train(was_training)
        images = self.images_of(tokens)
        return images if known is None else torch.where(mask, images, known)

    def _text_tokens(self, prompt, max_new_tokens: int | None, blank: str | None, n: int) -> Tensor:
        """(n, L) ids with mask_id at the characters to fill (see ``sample``)."""
        blank = BLANK if blank is None else blank
        if not isinstance(blank, str) or len(blank) != 1:
            raise GenaiError(f"--blank must be one character, got {blank!r}")
        if prompt is None and max_new_tokens is None:
            ids = torch.full((self.seq_len,), -1, dtype=torch.long)  # a whole block from scratch
        else:
            ids = torch.cat([prompt_ids(self.spec, prompt, blank),
                             torch.full((max_new_tokens or 0,), -1, dtype=torch.long)])
        if ids.shape[0] > self.seq_len:
            raise GenaiError(f"this masked model reads {self.seq_len} characters at once; the prompt and "
                             f"--max-new-tokens make {ids.shape[0]}: shorten them")
        if not (ids == -1).any():
            raise GenaiError(f"nothing to fill: mark the characters to fill with '{blank}' in --prompt (or choose "
                             f"another placeholder with --blank), or add --max-new-tokens")
        return torch.where(ids >= 0, ids, self.mask_id).to(self.device).expand(n, -1).clone()

    def token_mask(self, pixel_mask: Tensor) -> Tensor:
        """(B, 1, H, W) bool pixels to redraw -> (B, N) bool tokens to mask (families that offer "inpaint")."""
        raise NotImplementedError

    def _check_known(self, known: Tensor, mask: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
        shape = tuple(self.spec.shape)
        if known.dim() != 4 or tuple(known.shape[1:]) != shape or n % known.shape[0]:
            raise GenaiError(f"images to inpaint have shape {tuple(known.shape)}, expected (m, "
                             f"{', '.join(map(str, shape))}) with {n} samples a multiple of m")
        if mask is None or mask.dtype != torch.bool or mask.shape != (known.shape[0], 1, *shape[1:]):
            raise GenaiError(f"the inpainting mask must be bool of shape ({known.shape[0]}, 1, {shape[1]}, {shape[2]})"
                             f" (True: redraw), got {None if mask is None else (mask.dtype, tuple(mask.shape))}")
        r = n // known.shape[0]
        device = self.device
        return (known.to(device).float().repeat_interleave(r, 0), mask.to(device).repeat_interleave(r, 0))

    @torch.no_grad()
    def calibration_logits(self, batch) -> tuple[Tensor, Tensor]:
        """(logits (M, K), targets (M,)) at the masked positions of a fixed draw from the training schedule: what
        ``genai evaluate --calibrate`` fits a temperature to (the predictions --temperature then rescales)."""
        x, y = batch
        tokens = self.tokens_of(x)
        g = torch.Generator(tokens.device).manual_seed(0)
        mask = random_mask(mask_counts(tokens.shape[0], tokens.shape[1], self.config.mask_schedule, g,
                                       tokens.device), tokens.shape[1], g)
        labels = y if self.class_conditional else None
        logits = self.network(torch.where(mask, self.mask_id, tokens), labels)
        return logits[mask].float(), tokens[mask]

    # -- likelihood ------------------------------------------------------------------------------
    @torch.no_grad()
    def token_nll_bound(self, batch, strata: int = 8, generator: torch.Generator | None = None) -> Tensor:
        """The absorbing-state upper bound on -log p(tokens) in nats, (B,) (class-conditional: -log p(tokens | y))."""
        x, y = batch
        labels = y if self.class_conditional else None
        return absorbing_bound(lambda t: self.network(t, labels).float(), self.tokens_of(x), self.mask_id, strata,
                               generator)
