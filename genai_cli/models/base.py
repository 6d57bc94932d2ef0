"""The interface every family implements (docs/ARCHITECTURE.md maps where it sits).

A family is one file in this package: a ``Config`` dataclass (the YAML ``model:`` section, minus
``family``) and a ``GenerativeModel`` subclass registered with ``@register_model("name")``.
The training loop, the CLI and the run directory talk to families only through this class.

A family that builds on another run (MaskGIT on a VQ-VAE, latent diffusion on an autoencoder) declares
the config field that names it, ``autoencoder: RunRef = run_ref(accepts=("autoencoder", "vae"))``, and
takes ``parents`` in ``__init__``: ``parents["autoencoder"]`` is that run's model, built, frozen and
embedded in this run's checkpoints (see ``genai_cli/lineage.py``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..capabilities import has
from ..config import RunRef, run_ref  # noqa: F401  (re-exported: a family declares the runs it builds on)
from ..errors import GenaiError
from ..lineage import Parents
from ..spec import ImageSpec  # the data contract lives in spec.py; families import it from here


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

    Subclasses set ``Config`` and implement ``loss`` and ``sample``; what else a family can do (a likelihood, an
    encoder, walks...) it declares in ``capabilities`` and implements as ``genai_cli.capabilities`` describes. A
    batch is ``(x, y)``: x (B, C, H, W) float in [0, 1], y (B,) long class indices (zeros when the dataset has no
    labels).
    """

    Config: ClassVar[type]
    # The sampling options (names as in the CLI, minus dashes) this family honours; the CLI refuses the rest.
    sample_options: ClassVar[frozenset[str]] = frozenset()
    # True for families drawing discrete pixels/tokens through genai_cli.sampling.
    discrete: ClassVar[bool] = False
    # The kinds of data (genai_cli.spec: "image", "tokens") the family models; build_model refuses the others.
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    # What the family can do beyond loss and sample (genai_cli.capabilities: names, signatures, meanings). Callers
    # ask has(model, name); an instance its config cannot serve narrows it in __init__.
    capabilities: ClassVar[frozenset[str]] = frozenset()

    # Overrides that make the family tiny, used by the registry-wide tests (and handy in notebooks).
    tiny: ClassVar[dict[str, Any]] = {}
    # True for adversarial families, whose loss is not expected to fall monotonically.
    adversarial: ClassVar[bool] = False
    # False for helper networks trained by the same loop that draw no images (the evaluator classifier).
    generative: ClassVar[bool] = True
    # True for networks genai evaluate measures samples in: they give features(x) (B, D) and head(features)
    # (B, K) logits, and evaluator_recipe ({"model": {...}, "train": {...}}) is what --train-evaluator trains.
    evaluator: ClassVar[bool] = False
    evaluator_recipe: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Any, spec: ImageSpec, parents: Parents | None = None):
        super().__init__()
        self.config = config
        self.spec = spec
        # The frozen runs this model builds on, by config field (families without run_ref fields: none).
        # Deliberately not submodules: their weights stay out of parameters(), state_dict(), the optimizers
        # and the EMA; the checkpoint embeds them apart, with their name, step and hash.
        self.parents = parents if parents is not None else Parents({})
        # The loop sets this before every train_step (for schedules such as KL annealing).
        self.current_step = 0

    # -- training -------------------------------------------------------------------------------
    def loss(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Return {"loss": scalar tensor, ...anything worth logging}."""
        raise NotImplementedError

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        """One AdamW over the trainable parameters; the loop adds warm-up + cosine decay to each optimizer."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        # fused: one kernel over all parameters instead of ~5 ops per tensor (on the CPU the default is the per-tensor
        # loop): 4.1 -> 1.3 ms per step for the 4-layer character transformer, about 4 % of its step (issue 18).
        fused = bool(trainable) and all(p.device.type in ("cpu", "cuda") for p in trainable)
        return {"main": torch.optim.AdamW(trainable, lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                                          weight_decay=train_cfg.weight_decay, fused=fused or None)}

    def train_step(self, batch, optimizers: dict[str, torch.optim.Optimizer], stepper: Stepper) -> dict[str, float]:
        """Default step: loss, backward, clip, step. GANs override this (manual optimisation) and declare the
        "manual_step" capability."""
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
            if has(self, "log_likelihood"):
                out["nll_nats"] = -float(self.log_likelihood(batch).mean())
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v * b
            count += b
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        if "nll_nats" in metrics:
            metrics["bits_per_dim"] = self.bits_per_dim(metrics["nll_nats"], self.spec)
            if self.spec.kind == "tokens":  # a text's dimensions are its characters
                metrics["bits_per_char"] = metrics["bits_per_dim"]
        return metrics

    @property
    def conditional(self) -> bool:
        """True when sample() draws class-conditioned images (its ``labels`` option is meaningful)."""
        return "labels" in self.sample_options

    def class_labels(self, labels, n: int) -> Tensor | None:
        """The (n,) long class indices a conditional model draws with, on its device: None -> the classes in turn
        (i % K, one class per column of a K-wide grid), an int -> n copies, a (n,) tensor (or one value) -> itself.
        Anything else, or a class outside 0..K-1, is a one-line GenaiError. An unconditional model: None (labels
        given to it are refused)."""
        k = self.spec.num_classes
        if not self.conditional:
            if labels is not None:
                raise GenaiError("labels need a class-conditional model; "
                                 "train with model.class_conditional=true or drop the label option")
            return None
        if labels is None:
            return torch.arange(n, device=self.device) % k
        if isinstance(labels, bool) or not isinstance(labels, (int, Tensor)):
            raise GenaiError(f"labels must be an int or a LongTensor of class indices, got {type(labels).__name__}")
        y = torch.as_tensor(labels)
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise GenaiError(f"labels must be integer class indices, got dtype {y.dtype}")
        y = y.expand(n) if y.dim() == 0 else y.reshape(-1)
        if y.shape[0] != n:
            raise GenaiError(f"got {y.shape[0]} labels for {n} samples; pass one label per sample or a single int")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise GenaiError(f"label {bad} out of range; valid labels are 0..{k - 1}")
        return y.to(device=self.device, dtype=torch.long)

    # -- sampling -------------------------------------------------------------------------------
    def check_sample_options(self, options: dict[str, Any]) -> None:
        """Refuse, in one line, option values ``sample`` would refuse (given ones or the run's defaults), without
        drawing: ``generate.plan`` calls it, so a bad value fails before a run's first step, not at its first grid.
        Families whose options interact with their config (diffusion's sampler and guidance) override it."""

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options) -> Tensor:
        """Draw n images, (n, C, H, W) float in [0, 1]. Every random draw takes ``generator``."""
        raise NotImplementedError

    def network_evaluations(self, options: dict[str, Any]) -> int:
        """How many passes through the family's networks one ``sample`` call takes at these options (a run's
        ``sample:`` defaults merged in, as ``generate.plan`` merges them). A batch shares them, so this is the
        network evaluations per sample that ``genai compare`` reports: here one, a generator's or a decoder's pass.
        Families that draw in several passes (diffusion steps, tokens, filling steps) override it."""
        return 1

    # log_likelihood, variational_bound, encode, reconstruct, walk...: no placeholders here. A family that gives
    # one declares it in ``capabilities`` (see genai_cli.capabilities for each signature and meaning).

    @torch.no_grad()
    def prepare(self, train_images: Tensor) -> dict[str, float]:
        """Called once when a new run starts, before the first step, with a sample of training images (N, C, H, W)
        in [0, 1]: for what a family measures on its data rather than learns (latent diffusion's latent scale).
        Store the result in a buffer, so the checkpoint keeps it and a resumed run never measures again.
        Returns what is worth logging (metrics.jsonl at step 0, and the run's summary). A family that overrides
        it declares the "prepare" capability: the loop draws the images only for those."""
        return {}

    @staticmethod
    def bits_per_dim(nll_nats_per_image: Tensor | float, spec: ImageSpec) -> float:
        return float(nll_nats_per_image) / (spec.dims * math.log(2))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _apply(self, fn, recurse=True):
        """``.to(device)``, ``.float()``...: the frozen parents go along (they are not submodules)."""
        super()._apply(fn, recurse)
        for parent in self.parents.values():
            parent._apply(fn, recurse)
        return self
