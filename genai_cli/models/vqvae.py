"""The VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017): an encoder to a grid of latents, a quantiser that
snaps each latent to one of K codes, and a decoder from the codes back to the image.

    x (B, C, S, S) --SpatialEncoder--> z_e (B, D, s, s) --quantiser--> z_q (B, D, s, s), tokens (B, s, s)
                   --SpatialDecoder--> logits (B, C, S, S),  s = S / 2^downsamples (7 for 28 with 2)

Two quantisers by config (``genai_cli.nn.quantize``): ``codebook`` (nearest neighbour in a learned codebook,
straight-through gradient, commitment weight beta; EMA updates, k-means initialisation and dead-code restarts
as options) and ``fsq`` (finite scalar quantisation, Mentzer et al. 2023: each channel rounded to a few fixed
levels, e.g. [8, 6, 5] = 240 codes; nothing to collapse). The loss is the reconstruction error plus the
quantiser's terms (eq. 3):

    L = recon(x, dec(z_q)) + ||sg[z_e] - e||^2 (no EMA) + beta ||z_e - sg[e]||^2     (codebook)
    L = recon(x, dec(z_q))                                                          (fsq)

Codebook collapse shows in two numbers logged every step and every evaluation: ``usage`` (the share of codes
used) and ``perplexity`` (exp of the entropy of the code histogram: K when all are used equally, 1 when one
takes everything). The training loop writes reconstruction grids (``reconstruct``).

It is a tokenizer for the families that build on it (MaskGIT): ``tokenize`` gives (B, s * s) code indices in
raster order, ``detokenize`` decodes them. On its own it has no prior over its tokens, so ``sample`` is only
honest: it draws each grid position independently from the histogram of the training tokens at that position
(counted during training, +1 smoothing), through ``genai_cli.sampling``. Those samples look like digits
pasted together from parts: the independent-token prior that MaskGIT's learned prior replaces.

Images enter the encoder scaled to [-1, 1]; the decoder's output goes through a sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import GenaiError
from ..nn.quantize import FSQ, CodebookQuantizer, code_stats, histogram_stats
from ..nn.spatial import SpatialDecoder, SpatialEncoder
from ..registry import register_model
from ..sampling import check_sampling_options, sample_logits
from .base import GenerativeModel, ImageSpec

CODEBOOK_DIM = 16  # latent_channels of a codebook quantiser when the config leaves it out


@dataclass
class Config:
    width: int = 64  # channels of the encoder and decoder
    downsamples: int = 2  # stride-2 levels: 28 -> 14 -> 7
    res_blocks: int = 1  # residual blocks per level
    latent_channels: int | None = None  # D; None: 16 for a codebook, len(fsq_levels) for fsq (which it must equal)
    quantizer: Literal["codebook", "fsq"] = "codebook"
    codebook_size: int = 256  # K (codebook only)
    beta: float = 0.25  # commitment weight (codebook only; the paper's 0.25)
    ema: bool = True  # codebook learned by moving averages (appendix A.1) rather than by its loss term
    ema_decay: float = 0.99  # gamma of the EMA updates, and of the code usage the dead-code restart reads
    kmeans_init: bool = True  # codebook set by k-means on the first training batch's encoder outputs
    restart_dead: bool = True  # codes used less than dead_code_threshold times per batch (EMA) restart
    dead_code_threshold: float = 0.5
    fsq_levels: list[int] = field(default_factory=lambda: [8, 6, 5])  # levels per channel (fsq only): 240 codes
    recon: Literal["bce", "mse"] = "bce"  # per-pixel reconstruction loss, averaged over pixels


@register_model("vqvae", "VQ-VAE with a codebook or FSQ quantiser; a tokenizer for MaskGIT")
class VQVAE(GenerativeModel):
    Config = Config
    tiny = {"width": 8, "downsamples": 2, "codebook_size": 16, "fsq_levels": [3, 3]}
    sample_options = frozenset({"temperature", "top_k", "top_p", "greedy"})
    capabilities = frozenset({"reconstruct", "tokenizer", "latent_grid"})
    # Not ``discrete``: that promises predictions of its tokens (--temperature calibrated, exact likelihoods), and
    # this model has none (its tokenize has no seq_logits beside it); its draws go through genai_cli.sampling all
    # the same.

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        c = config
        if c.quantizer == "fsq":
            d = len(c.fsq_levels) if c.latent_channels is None else c.latent_channels
            if d != len(c.fsq_levels):
                raise GenaiError(f"model.latent_channels = {d} but FSQ quantises one channel per level, and "
                                 f"model.fsq_levels {c.fsq_levels} has {len(c.fsq_levels)}: leave latent_channels out")
            self.quantizer = FSQ(c.fsq_levels)
        else:
            d = CODEBOOK_DIM if c.latent_channels is None else c.latent_channels
            self.quantizer = CodebookQuantizer(c.codebook_size, d, beta=c.beta, ema=c.ema, decay=c.ema_decay,
                                               kmeans_init=c.kmeans_init, restart_dead=c.restart_dead,
                                               dead_code_threshold=c.dead_code_threshold)
        self.encoder = SpatialEncoder(spec.channels, spec.size, c.width, c.downsamples, d, c.res_blocks)
        self.decoder = SpatialDecoder(spec.channels, spec.size, c.width, c.downsamples, d, c.res_blocks)
        s = self.encoder.grid
        self._latent_shape = (d, s, s)
        # Histogram of the training tokens per grid position, (s * s, K): the independent-token prior of sample().
        self.register_buffer("token_counts", torch.zeros(s * s, self.num_codes))

    # -- the interface the families built on it use -------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(D, s, s): the pre-quantisation latent grid."""
        return self._latent_shape

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    @property
    def token_grid(self) -> tuple[int, int]:
        return self._latent_shape[1:]

    def encode_latent(self, x: Tensor) -> Tensor:
        """(B, C, S, S) in [0, 1] -> z_e (B, D, s, s) float32, before quantisation."""
        return self.encoder(x * 2 - 1).float()

    def _decode_codes(self, z_q: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(z_q).float())

    def decode_latent(self, z: Tensor) -> Tensor:
        """Pre-quantisation latents (B, D, s, s) -> images (B, C, S, S) in [0, 1]: quantise, then decode."""
        return self._decode_codes(self.quantizer.quantize(z)[0])

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """(B, C, S, S) in [0, 1] -> the decoded quantised encoding, same shape, in [0, 1]."""
        return self.decode_latent(self.encode_latent(x))

    @torch.no_grad()
    def tokenize(self, x: Tensor) -> Tensor:
        """(B, C, S, S) in [0, 1] -> (B, s * s) long code indices in raster order."""
        return self.quantizer.quantize(self.encode_latent(x))[1].flatten(1)

    @torch.no_grad()
    def detokenize(self, tokens: Tensor) -> Tensor:
        """(B, s * s) long code indices in raster order -> images (B, C, S, S) in [0, 1]."""
        h, w = self.token_grid
        if tokens.ndim != 2 or tokens.shape[1] != h * w:
            raise GenaiError(f"detokenize needs (B, {h * w}) tokens for a {h}x{w} grid, got {tuple(tokens.shape)}")
        if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < self.num_codes):
            raise GenaiError(f"tokens must be code indices in 0..{self.num_codes - 1}, got {int(tokens.min())}.."
                             f"{int(tokens.max())}")
        return self._decode_codes(self.quantizer.codes(tokens.view(-1, h, w)))

    # -- training -----------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The loss terms and the tokens (B, s, s) of a batch of images."""
        z_q, idx, terms = self.quantizer(self.encode_latent(x))  # (B, D, s, s), (B, s, s)
        logits = self.decoder(z_q).float()  # (B, C, S, S)
        x_hat = torch.sigmoid(logits)
        mse = F.mse_loss(x_hat, x)
        recon = F.binary_cross_entropy_with_logits(logits, x) if self.config.recon == "bce" else mse
        out = {"loss": recon + sum(terms.values()), "recon": recon.detach(), "mse": mse.detach(),
               **{k: v.detach() for k, v in terms.items()}, **code_stats(idx, self.num_codes)}
        return out, idx

    def loss(self, batch):
        out, idx = self._forward(batch[0])
        if self.training:
            self._count_tokens(idx)
        return out

    @torch.no_grad()
    def _count_tokens(self, idx: Tensor) -> None:
        flat = idx.flatten(1)  # (B, T)
        positions = torch.arange(flat.shape[1], device=flat.device).expand_as(flat)
        self.token_counts.view(-1).index_add_(0, (positions * self.num_codes + flat).flatten(),
                                             torch.ones(flat.numel(), device=flat.device))

    @torch.no_grad()
    def validation_metrics(self, batches) -> dict[str, float]:
        """Mean loss terms and pixel MSE; usage and perplexity of the histogram of all validation tokens."""
        sums: dict[str, float] = {}
        counts = torch.zeros(self.num_codes, device=self.token_counts.device)
        n = 0
        for batch in batches:
            out, idx = self._forward(batch[0])
            b = batch[0].shape[0]
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
            counts += torch.bincount(idx.flatten(), minlength=self.num_codes)
            n += b
        metrics = {k: v / max(n, 1) for k, v in sums.items()}
        metrics.update({k: float(v) for k, v in histogram_stats(counts).items()})
        return metrics

    # -- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, greedy: bool = False) -> Tensor:
        """Each grid position drawn independently from its training-token histogram (log counts + 1 as logits),
        then decoded: no dependence between positions (the prior MaskGIT learns instead)."""
        check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p)
        logits = (self.token_counts + 1).log()  # (T, K)
        tokens = sample_logits(logits.expand(n, *logits.shape), temperature=temperature, top_k=top_k, top_p=top_p,
                               greedy=greedy, generator=generator)  # (n, T)
        return self.detokenize(tokens)
