"""The evaluator network: a small CNN classifier whose features judge samples offline (``genai evaluate``).

Inception-based FID needs weights downloaded at run time, and its ImageNet features say little about
28x28 digits; the FID authors advise a feature network trained on the domain instead. This family is
that network: trained by the same loop as every other family (``genai train configs/classifier_mnist.yaml``),
it reports held-out accuracy, and ``genai evaluate`` reads two things from it:

    features(x)  (B, feature_dim)  the penultimate layer: the space of classifier-FID, KID and PRDC
    logits(x)    (B, num_classes)  the class histogram of samples (mode collapse) and their confidence

Layout: per stage two 3x3 convs with SiLU, then 2x2 max pooling (ceil mode, so odd sizes such as 7 work);
a global average pool; a linear layer to ``feature_dim`` (the features); dropout; a linear classifier.
No batch norm: the network behaves the same in train and eval mode apart from dropout, and the EMA of
the weights that the loop keeps needs no running statistics.

It draws no images (``generative = False``): the loop writes no grids for it and ``sample`` refuses.
It is declared an evaluator (``evaluator = True``): ``genai evaluate --evaluator RUN`` accepts its runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError
from ..registry import register_model
from .base import GenerativeModel, ImageSpec


@dataclass
class Config:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # width of each stage; each halves H, W
    feature_dim: int = 128  # the penultimate layer: the feature space of classifier-FID
    dropout: float = 0.3  # before the last layer, training only
    shift: int = 2  # augmentation: random translation by up to this many pixels (0: none)
    label_smoothing: float = 0.0


@register_model("classifier", "small CNN classifier: the domain feature network of `genai evaluate` (no sampling)")
class Classifier(GenerativeModel):
    Config = Config
    tiny = {"channels": [8, 16], "feature_dim": 16, "dropout": 0.0, "shift": 1}
    sample_options = frozenset()
    capabilities = frozenset({"calibration_logits"})
    generative = False
    evaluator = True
    # What `genai evaluate --train-evaluator` trains: the model section of configs/classifier_mnist.yaml (a test
    # keeps them equal), 12 epochs or genai_cli.evaluation.evaluator.EVALUATOR_MAX_STEPS steps, whichever is fewer.
    evaluator_recipe = {
        "model": {"channels": [16, 32, 64], "feature_dim": 128, "dropout": 0.3, "shift": 2},
        "train": {"epochs": 12, "batch_size": 64, "lr": 3.0e-3, "weight_decay": 1.0e-4, "warmup_steps": 50,
                  "ema_decay": 0.99, "log_every": 50, "eval_every": 250, "checkpoint_every": 250},
    }

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        if spec.num_classes < 2:
            raise GenaiError("the classifier family needs a labelled dataset with at least 2 classes; "
                             "use mnist5k, mnist, fashion_mnist, cifar10, digits, shapes or a labelled image_folder")
        if not config.channels or any(c < 1 for c in config.channels):
            raise GenaiError(f"model.channels must be a non-empty list of positive widths, got {config.channels}")
        if config.feature_dim < 1:
            raise GenaiError(f"model.feature_dim must be >= 1, got {config.feature_dim}")
        if not 0 <= config.dropout < 1:
            raise GenaiError(f"model.dropout must be in [0, 1), got {config.dropout}")
        if config.shift < 0 or config.shift >= spec.size:
            raise GenaiError(f"model.shift must be in 0..{spec.size - 1} (pixels), got {config.shift}")
        layers: list[nn.Module] = []
        c_in = spec.channels
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
                       nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.to_features = nn.Linear(c_in, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, spec.num_classes)

    # -- the two outputs evaluate reads -----------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> penultimate features (B, feature_dim)."""
        h = self.body(x * 2 - 1)  # (B, C_last, H', W'), inputs centred on 0
        return F.silu(self.to_features(h.mean((2, 3))))  # global average pool -> (B, feature_dim)

    def logits(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> class logits (B, num_classes)."""
        return self.head(self.dropout(self.features(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)

    def calibration_logits(self, batch) -> tuple[Tensor, Tensor]:
        """(logits (B, K), targets (B,)): what ``genai evaluate --calibrate`` fits a temperature on."""
        x, y = batch
        return self.logits(x), y

    # -- training ---------------------------------------------------------------------------------
    def _shift(self, x: Tensor) -> Tensor:
        """Translate each image by its own random offset of up to ``shift`` pixels, zero-filled. (B, C, H, W)."""
        s = self.config.shift
        b, _, h, w = x.shape
        padded = F.pad(x, (s, s, s, s))  # (B, C, H + 2s, W + 2s)
        dy = torch.randint(0, 2 * s + 1, (b,), device=x.device)
        dx = torch.randint(0, 2 * s + 1, (b,), device=x.device)
        rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, :, None]  # (B, H, 1)
        cols = (torch.arange(w, device=x.device)[None] + dx[:, None])[:, None, :]  # (B, 1, W)
        batch_idx = torch.arange(b, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch_idx, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)

    def loss(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        x, y = batch
        if self.training and self.config.shift:
            x = self._shift(x)
        logits = self.logits(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        accuracy = (logits.argmax(1) == y).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}

    @torch.no_grad()
    def validation_metrics(self, batches) -> dict[str, float]:
        """Held-out loss and accuracy (the base class averages loss() over the split), plus the error rate."""
        metrics = super().validation_metrics(batches)
        metrics["error_rate"] = 1.0 - metrics["accuracy"]
        return metrics

    # -- no sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options) -> Tensor:
        if options:
            raise TypeError(f"unexpected sampling options {sorted(options)}")
        raise GenaiError("the classifier family is the evaluator network and draws no images; "
                         "sample a generative run, or use it with genai evaluate")
