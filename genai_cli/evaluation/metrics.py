"""Metrics on feature sets and logits: pure functions of tensors, nothing about runs or files.

    classifier-FID   Fréchet distance between Gaussians fitted to real and sampled features (Heusel et al.
                     2017, eq. 6). Not comparable to Inception FID: another network, another feature space.
    KID              the unbiased squared MMD with the cubic polynomial kernel (Binkowski et al. 2018).
    precision, recall, density, coverage
                     k-nearest-neighbour manifolds of the two feature sets (Naeem et al. 2020, k = 5).
    mode collapse    the evaluator's class histogram of the samples, its entropy divided by log K (1: every
                     class equally often), the classes holding at least 2 % of the samples, and the share of
                     samples the evaluator classifies with probability >= 0.9. ``grid_statistics`` is the
                     same for the small grids the loop draws during training (a class is present with one
                     sample there), logged at every grid so that mode hopping shows over the steps.
    calibration      temperature scaling (Guo et al. 2017, sec. 4.2): the NLL and the expected calibration
                     error (15 equal-width confidence bins) before and after dividing the logits by T, and the
                     bins themselves (``reliability_bins``: the reliability diagram, Guo et al. fig. 1).

FID and KID come from torchmetrics, handed the features through an identity "feature extractor" (its
documented hook for custom networks), so each image goes through the evaluator once for every metric;
precision/recall/density/coverage from ``prdc``, the authors' package; ECE from torchmetrics.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError

CONFIDENT = 0.9  # a sample is confidently classified when the evaluator's top probability reaches this
MIN_CLASS_SHARE = 0.02  # a class is covered when it holds at least this share of the samples
PRDC_K = 5  # nearest neighbours of precision/recall/density/coverage (Naeem et al.'s default)
KID_SUBSETS = 100
ECE_BINS = 15


# -- sample quality and mode collapse: (N, D) feature sets, (N, K) class probabilities ------------------------------
class GivenFeatures(nn.Module):
    """An identity "feature extractor" for torchmetrics: update() receives features already computed."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim  # read by torchmetrics instead of probing with a dummy image

    def forward(self, features: Tensor) -> Tensor:
        return features


def _check_sets(real: Tensor, fake: Tensor, at_least: int) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {tuple(real.shape)}, {tuple(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) < at_least:
        raise GenaiError(f"the metrics need at least {at_least} real and {at_least} sampled images, got "
                         f"{real.shape[0]} and {fake.shape[0]}; raise -n")


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) of Gaussians fitted to two (N, D) feature sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_sets(real, fake, 2)
    metric = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1]))
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    return max(0.0, float(metric.compute()))  # the eigenvalue square roots can leave -1e-12 for equal sets


def kernel_distance(real: Tensor, fake: Tensor, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation over subsets of the unbiased MMD^2, cubic polynomial kernel."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_sets(real, fake, 2)
    size = min(1000, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "saves all features in a buffer": we hand it the features
        metric = KernelInceptionDistance(feature=GivenFeatures(real.shape[1]), subsets=KID_SUBSETS, subset_size=size)
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global RNG: fix them, leave it untouched
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall_density_coverage(real: Tensor, fake: Tensor, k: int = PRDC_K) -> dict[str, float]:
    """Naeem et al. 2020 on (N, D) feature sets, through the authors' ``prdc`` package."""
    from prdc import compute_prdc

    _check_sets(real, fake, k + 1)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes; stdout may be --json
        out = compute_prdc(real.float().cpu().numpy(), fake.float().cpu().numpy(), nearest_k=k)
    return {key: float(value) for key, value in out.items()}


def class_statistics(probs: Tensor) -> dict[str, Any]:
    """Mode collapse from the evaluator's class probabilities of the samples, (N, K)."""
    n, k = probs.shape
    counts = torch.bincount(probs.argmax(1), minlength=k).double()  # (K,)
    share = counts / n
    nonzero = share[share > 0]
    entropy = float((nonzero * -nonzero.log()).sum()) / math.log(k)  # 1: uniform over the K classes, 0: one class
    return {"class_histogram": [int(c) for c in counts], "class_entropy": entropy,
            "classes_covered": int((share >= MIN_CLASS_SHARE).sum()),
            "confident_share": float((probs.max(1).values >= CONFIDENT).double().mean())}


def grid_statistics(probs: Tensor) -> dict[str, Any]:
    """One training grid's classes from the evaluator's probabilities (N, K): the histogram of the top classes
    (sums to N), the classes with at least one sample, the class-share entropy / log K and the mean top
    probability."""
    n, k = probs.shape
    counts = torch.bincount(probs.argmax(1), minlength=k)  # (K,)
    share = counts.double() / n
    nonzero = share[share > 0]
    return {"class_histogram": [int(c) for c in counts], "classes_present": int((counts > 0).sum()),
            "class_entropy": float((nonzero * -nonzero.log()).sum()) / math.log(k),
            "mean_confidence": float(probs.max(1).values.double().mean())}


# -- calibration: (N, K) logits, (N,) targets --------------------------------------------------------------------------
def expected_calibration_error(logits: Tensor, targets: Tensor, bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (share of predictions) x |accuracy - confidence|."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = torch.softmax(logits.float(), dim=-1)
    return float(multiclass_calibration_error(probs, targets, num_classes=logits.shape[-1], n_bins=bins, norm="l1",
                                              validate_args=False))


def reliability_bins(logits: Tensor, targets: Tensor, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """The reliability diagram's numbers (Guo et al. 2017, fig. 1; DeGroot & Fienberg 1983): predictions grouped by
    top-class confidence into ``bins`` equal-width bins of [0, 1]; per bin the mean confidence, the accuracy and the
    count (empty bins: confidence and accuracy None). sum(count * |accuracy - confidence|) / N is the ECE."""
    probs = torch.softmax(logits.float(), dim=-1)  # (N, K)
    conf, pred = probs.max(-1)  # (N,)
    correct = (pred == targets).double()
    # bin b holds confidences in (b / bins, (b + 1) / bins], torchmetrics' convention (0 goes to the first bin)
    idx = (torch.ceil(conf.double() * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(idx, minlength=bins).double()  # (bins,)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, conf.double())
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, correct)
    mean_conf, accuracy = (conf_sum / count.clamp(min=1)).tolist(), (acc_sum / count.clamp(min=1)).tolist()
    return {"edges": torch.linspace(0, 1, bins + 1).tolist(), "count": [int(c) for c in count],
            "confidence": [v if c else None for v, c in zip(mean_conf, count.tolist())],
            "accuracy": [v if c else None for v, c in zip(accuracy, count.tolist())]}


def fit_temperature(logits: Tensor, targets: Tensor) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T) (Guo et al. 2017, sec. 4.2), by L-BFGS on log T.

    The NLL is convex in 1/T, so the optimum is unique.
    """
    logits, targets = logits.float(), targets.long()
    log_t = torch.zeros((), device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        raise GenaiError("the temperature fit diverged (the validation logits may be constant); retrain the model")
    return t


def calibration_metrics(logits: Tensor, targets: Tensor, temperature: float) -> dict[str, float]:
    """The NLL (nats per prediction) and ECE of softmax(logits) (before) and softmax(logits / T) (after)."""
    logits, t = logits.float(), temperature
    return {
        "nll_before": float(F.cross_entropy(logits, targets)),
        "nll_after": float(F.cross_entropy(logits / t, targets)),
        "ece_before": expected_calibration_error(logits, targets),
        "ece_after": expected_calibration_error(logits / t, targets),
        "accuracy": float((logits.argmax(-1) == targets).double().mean()),
        "predictions": int(targets.numel()),
    }


def temperature_scaling(fit_logits: Tensor, fit_targets: Tensor, held_logits: Tensor,
                        held_targets: Tensor) -> dict[str, float]:
    """Fit T on one set of predictions, report the NLL and ECE before and after on another (held out), so the
    improvement is not measured on the predictions T was fitted to."""
    t = fit_temperature(fit_logits, fit_targets)
    return {"temperature": t, **calibration_metrics(held_logits, held_targets, t),
            "fit_predictions": int(fit_targets.numel()),
            "reliability_before": reliability_bins(held_logits, held_targets),
            "reliability_after": reliability_bins(held_logits.float() / t, held_targets)}
