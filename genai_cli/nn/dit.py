"""The diffusion transformer (DiT; Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

A drop-in for the UNet (same forward signature, ``(x, t, y) -> an x-shaped output``):

    x (B, C, H, W) -> patchify: (B, N, p*p*C), N = (H/p)(W/p) -> linear to width d, + fixed 2-D sine-cosine positions
      -> depth x adaLN-Zero block, each conditioned on c = time embedding + label embedding
      -> final adaLN + linear back to p*p*C per token -> unpatchify: (B, C, H, W)

adaLN-Zero (the paper's sec. 3.2 and Fig. 3): each block regresses from c a shift, scale and gate for its attention
and its MLP branch; LayerNorm's output is modulated, h * (1 + scale) + shift, and each branch is multiplied by its
gate before the residual sum. The regression is zero-initialised, so every gate starts at 0 and a fresh block is the
identity; the final linear is zero-initialised too, so a fresh DiT outputs 0. The label table has ``num_classes + 1``
rows, the last one the null label of classifier-free guidance, as in the UNet.

The attention and MLP of each block are the toolkit's transformer ``Block`` (nn/transformer.py, bidirectional);
adaLN-Zero wraps it instead of copying it. Sizes: ``patch_size`` must divide both sides of the space denoised
(``check_image_size`` says so in one line).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import GenaiError
from .transformer import Block
from .unet import timestep_embedding

FREQUENCY_DIM = 256  # sinusoidal features of t fed to the time MLP (DiT's frequency_embedding_size)


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C): non-overlapping p x p patches in row-major order, each flattened
    as (row within patch, column within patch, channel), DiT's layout."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, p: int, channels: int, height: int, width: int) -> Tensor:
    """``patchify``'s inverse: (B, (H/p)(W/p), p*p*C) -> (B, C, H, W)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height // p, width // p, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
    return x.reshape(b, channels, height, width)


def sincos_position_embedding(dim: int, rows: int, cols: int) -> Tensor:
    """Fixed 2-D sine-cosine positions (MAE/DiT's get_2d_sincos_pos_embed): (rows * cols, dim), half the features
    for the row index and half for the column, each as the Transformer's 1-D sinusoids (Vaswani et al. sec. 3.5)."""
    if dim % 4:
        raise GenaiError(f"the DiT's width must be a multiple of 4 for its 2-D position embedding, got {dim}")
    rr, cc = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    # timestep_embedding gives [cos, sin] of position * 10000^(-i / (dim/4)), i < dim/4, for each axis.
    return torch.cat([timestep_embedding(rr.flatten(), dim // 2), timestep_embedding(cc.flatten(), dim // 2)], dim=1)


def modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: h (B, N, d) * (1 + scale) + shift, with (B, d) shift and scale broadcast over the tokens."""
    return h * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero around the toolkit's transformer block: x + gate_a attn(modulate(LN x)), then
    x + gate_m MLP(modulate(LN x)), the six (B, d) shift/scale/gate vectors regressed from the condition c.

    Two options, both off in DiT itself (``DiT``'s docstring says why the latent presets turn them on):
    ``skip``: a linear map of [x, skip] (2d -> d) first, U-ViT's long skip (Bao et al. 2023), ``skip`` being the
    output of the mirror block of the first half. ``local``: x + a depthwise 3 x 3 convolution of the token grid
    before the attention, the conditional position encoding of Chu et al. 2021 ("PEG") in every block.
    """

    def __init__(self, d: int, heads: int, mlp_ratio: int, dropout: float, skip: bool = False, local: bool = False):
        super().__init__()
        self.block = Block(d, heads, mlp_ratio, dropout, causal=False)
        # LayerNorm without its own affine (DiT): the modulation is the affine.
        self.block.ln1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.block.ln2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero: every gate starts at 0, the block at the identity
        nn.init.zeros_(self.ada[1].bias)
        self.skip = nn.Linear(2 * d, d) if skip else None
        self.local = nn.Conv2d(d, d, 3, padding=1, groups=d) if local else None

    def forward(self, x: Tensor, c: Tensor, grid: tuple[int, int] | None = None, skip: Tensor | None = None) -> Tensor:
        """x (B, N, d) tokens of a ``grid`` = (rows, cols) patch grid (``local`` needs it), c (B, d), ``skip``
        (B, N, d) the long skip's tokens (a block built with ``skip`` needs them)."""
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        if self.local is not None:
            b, n, d = x.shape
            x = x + self.local(x.transpose(1, 2).reshape(b, d, *grid)).flatten(2).transpose(1, 2)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c).chunk(6, dim=1)  # (B, d) each
        b = self.block
        x = x + gate_a[:, None] * b.attention(modulate(b.ln1(x), shift_a, scale_a))
        return x + gate_m[:, None] * b.mlp(modulate(b.ln2(x), shift_m, scale_m))


class DiT(nn.Module):
    """eps_theta(x_t, t[, y]) as a transformer over p x p patches of an (in_channels, height, width) input.

    width d, depth blocks of ``heads`` heads, MLP width mlp_ratio * d. num_classes > 0 adds a label table whose
    row num_classes is the null label (classifier-free guidance); y=None means that row.

    label_std: the label table's initial std (``_init_weights`` says why it is not DiT's 0.02).
    long_skip: U-ViT's long skips (Bao et al. 2023): block depth-1-i takes block i's output, i < depth // 2.
    local: a depthwise 3 x 3 convolution of the token grid in every block (``DiTBlock``). Off, this is DiT; the
    latent presets turn both on: on the 49 tokens of the 7x7 latent grid, trained for a few hundred steps, they
    took DiT-S's validation loss at 500 steps from 0.073 to 0.051 (benchmarks/README.md, "Scaling").
    """

    def __init__(self, in_channels: int, height: int, width: int, patch_size: int = 2, hidden: int = 64,
                 depth: int = 4, heads: int = 2, mlp_ratio: int = 4, dropout: float = 0.0, num_classes: int = 0,
                 long_skip: bool = False, local: bool = False, label_std: float = 1.0):
        super().__init__()
        if patch_size < 1 or hidden < 1 or depth < 1 or heads < 1:
            raise GenaiError(f"the DiT needs patch_size, width, depth and heads >= 1, got {patch_size}, {hidden}, "
                             f"{depth}, {heads}")
        if hidden % heads:
            raise GenaiError(f"the DiT's width {hidden} is not divisible by its {heads} heads; "
                             f"set model.num_heads to a divisor of model.hidden_size")
        if not 0.0 <= dropout < 1.0:
            raise GenaiError(f"dropout must be in [0, 1), got {dropout}")
        if not label_std > 0:
            raise GenaiError(f"the DiT's label table needs a positive init std (model.label_init_std), got {label_std}")
        self.label_std = label_std
        self.in_channels, self.patch_size, self.hidden, self.depth, self.heads = in_channels, patch_size, hidden, \
            depth, heads
        self.num_classes = num_classes
        self.height, self.width = height, width
        self.check_image_size(height, width)
        patch_dim = patch_size * patch_size * in_channels
        self.embed = nn.Linear(patch_dim, hidden)  # DiT's PatchEmbed: a stride-p conv, i.e. a linear map per patch
        self.register_buffer("pos", sincos_position_embedding(hidden, height // patch_size, width // patch_size),
                             persistent=False)  # (N, d), fixed: follows from the sizes the config stores
        self.time_mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        skips = depth // 2 if long_skip else 0  # the last ``skips`` blocks take a long skip
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, dropout, skip=i >= depth - skips, local=local)
                                    for i in range(depth))
        self.skips = skips
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, N(0, 0.02) for the time MLP, and zeros for every adaLN
        regression and the output layer (adaLN-Zero); but N(0, label_std^2) for the label table, 1 by default
        (nn.Embedding's default, the UNet's), not DiT's 0.02. With the time MLP at 0.02 too, a 0.02 label row leaves
        the condition c, the only input of every adaLN regression, near 0, and the label barely moves the network for
        hundreds of Adam steps (lr 2e-3 moves a weight by at most 2e-3 a step): DiT trains for 400k steps, a CPU
        budget for a few hundred. Measured: DiT-S's classifier-FID at 72 CPU-s fell from 139 to 63 at 1. The latent
        S preset starts at 0.2 (benchmarks/README.md, "Scaling": better guided samples at the top budget for S, worse
        at every budget for B). The long skips and local convolutions keep torch's default initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=self.label_std)
        for blk in self.blocks:
            for layer in (blk.skip, blk.local):
                if layer is not None:
                    layer.reset_parameters()
        for layer in [*(blk.ada[1] for blk in self.blocks), self.ada_out[1], self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def size_multiple(self) -> int:
        """Sides must be a multiple of this (the UNet's attribute of the same name): the patch size."""
        return self.patch_size

    def check_image_size(self, height: int, width: int | None = None) -> None:
        """Raise GenaiError unless patch_size divides both sides (one side: a square)."""
        width = height if width is None else width
        p = self.patch_size
        if height % p or width % p or height < 1 or width < 1:
            side = math.gcd(height, width)
            fits = ", ".join(str(k) for k in range(1, side + 1) if side % k == 0)
            raise GenaiError(f"the DiT's patch size {p} does not divide the {height}x{width} grid it denoises; "
                             f"set model.patch_size to one of {fits}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) timesteps, y (B,) labels in 0..num_classes (num_classes = no label)."""
        b, c, h, w = x.shape
        if (h, w) != (self.height, self.width):
            raise GenaiError(f"this DiT was built for {self.height}x{self.width} inputs, got {h}x{w}")
        cond = self.time_mlp(timestep_embedding(t, FREQUENCY_DIM))  # (B, d)
        if self.class_emb is not None:
            if y is None:  # no label given: the null row, i.e. the unconditional model
                y = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            cond = cond + self.class_emb(y)
        elif y is not None:
            raise GenaiError("this DiT has no class conditioning (num_classes=0) but labels were given; "
                             "build it with num_classes > 0")
        p = self.patch_size
        tokens = self.embed(patchify(x, p))  # (B, N, d)
        tokens = tokens + self.pos.to(tokens.dtype)
        grid, saved = (h // p, w // p), []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, cond, grid, saved.pop() if block.skip is not None else None)
            if i < self.skips:
                saved.append(tokens)  # for the mirror block, depth - 1 - i
        shift, scale = self.ada_out(cond).chunk(2, dim=1)
        tokens = self.out(modulate(self.norm_out(tokens), shift, scale))  # (B, N, p*p*C)
        return unpatchify(tokens, p, c, h, w)
