"""The interface every family implements (see shared/DESIGN.md).

A family is one file in this package: a ``Config`` dataclass (the YAML ``model:`` section, minus
``family``) and a ``GenerativeModel`` subclass registered with ``@register_model("name")``.
The training loop, the CLI and the run directory talk to families only through this class.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ImageSpec:
    """What the data looks like: every family is built for one image shape."""

    channels: int = 1
    size: int = 28  # square images, size x size
    num_classes: int = 0  # 0: the dataset has no labels
    binary: bool = False  # pixel values are exactly 0 or 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    @property
    def dims(self) -> int:
        return self.channels * self.size * self.size


class Stepper:
    """What a train_step needs from the loop: autocast, backward and an optimizer step.

    Keeping gradient clipping, mixed precision and grad scaling here lets a family that
    overrides ``train_step`` (a GAN) get them without knowing how they are configured.
    """

    def __init__(self, grad_clip: float | None = None, autocast_dtype: torch.dtype | None = None,
                 device_type: str = "cpu", scaler: torch.amp.GradScaler | None = None):
        self.grad_clip = grad_clip
        self.autocast_dtype = autocast_dtype
        self.device_type = device_type
        self.scaler = scaler

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def backward(self, loss: Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params) -> float:
        """Unscale, clip, step. Returns the gradient norm before clipping (inf/nan when it overflowed)."""
        params = [p for p in params if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.grad_clip:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        else:
            norms = [p.grad.detach().float().norm() for p in params]
            norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return norm


class GenerativeModel(nn.Module):
    """Base class of every family.

    Subclasses set ``Config`` and implement ``loss`` and ``sample``; likelihood models also
    implement ``log_likelihood``. A batch is ``(x, y)``: x (B, C, H, W) float in [0, 1], y (B,) long
    class indices (zeros when the dataset has no labels).
    """

    Config: ClassVar[type]
    # The sampling options (names as in the CLI, minus dashes) this family honours; the CLI refuses the rest.
    sample_options: ClassVar[frozenset[str]] = frozenset()
    # True for families drawing discrete pixels/tokens through genai_cli.sampling.
    discrete: ClassVar[bool] = False

    # Overrides that make the family tiny, used by the registry-wide tests (and handy in notebooks).
    tiny: ClassVar[dict[str, Any]] = {}
    # True for adversarial families, whose loss is not expected to fall monotonically.
    adversarial: ClassVar[bool] = False
    # False for helper networks trained by the same loop that draw no images (the evaluator classifier).
    generative: ClassVar[bool] = True

    def __init__(self, config: Any, spec: ImageSpec):
        super().__init__()
        self.config = config
        self.spec = spec
        # The loop sets this before every train_step (for schedules such as KL annealing).
        self.current_step = 0

    # -- training -------------------------------------------------------------------------------
    def loss(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Return {"loss": scalar tensor, ...anything worth logging}."""
        raise NotImplementedError

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        """One AdamW over all parameters; the loop adds warm-up + cosine decay to each optimizer."""
        return {"main": torch.optim.AdamW(self.parameters(), lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                                          weight_decay=train_cfg.weight_decay)}

    def train_step(self, batch, optimizers: dict[str, torch.optim.Optimizer], stepper: Stepper) -> dict[str, float]:
        """Default step: loss, backward, clip, step. GANs override this (manual optimisation)."""
        opt = optimizers["main"]
        opt.zero_grad(set_to_none=True)
        with stepper.autocast():
            out = self.loss(batch)
        stepper.backward(out["loss"])
        grad_norm = stepper.step(opt, self.parameters())
        logs = {k: float(v.detach()) for k, v in out.items()}
        logs["grad_norm"] = grad_norm
        return logs

    @torch.no_grad()
    def validation_metrics(self, batches) -> dict[str, float]:
        """Metrics over the validation split: mean loss terms, and nats/bits per dim where defined.

        Families add their diagnostics (active units, D(x), ...) by overriding and extending this.
        """
        sums: dict[str, float] = {}
        count = 0
        for batch in batches:
            b = batch[0].shape[0]
            out = {k: float(v) for k, v in self.loss(batch).items()}
            if self.log_likelihood is not None:
                out["nll_nats"] = -float(self.log_likelihood(batch).mean())
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v * b
            count += b
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        if "nll_nats" in metrics:
            metrics["bits_per_dim"] = self.bits_per_dim(metrics["nll_nats"], self.spec)
        return metrics

    @property
    def conditional(self) -> bool:
        """True when sample() draws class-conditioned images (its ``labels`` option is meaningful)."""
        return "labels" in self.sample_options

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options) -> Tensor:
        """Draw n images, (n, C, H, W) float in [0, 1]. Every random draw takes ``generator``."""
        raise NotImplementedError

    # Likelihood families override this; the loop reports bits/dim when it exists.
    log_likelihood = None  # (batch) -> Tensor (B,) of log p(x) in nats (or a lower bound)

    @staticmethod
    def bits_per_dim(nll_nats_per_image: Tensor | float, spec: ImageSpec) -> float:
        return float(nll_nats_per_image) / (spec.dims * math.log(2))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
