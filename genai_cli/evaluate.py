"""``genai evaluate``: sample quality, mode collapse, likelihood and calibration, measured offline.

Sample quality is judged in the feature space of the toolkit's own evaluator network (the ``classifier``
family trained on the same dataset), never with downloaded Inception weights:

    classifier-FID   Fréchet distance between Gaussians fitted to real and sampled features (Heusel et al.
                     2017, eq. 6). Not comparable to Inception FID: another network, another feature space.
    KID              the unbiased squared MMD with the cubic polynomial kernel (Binkowski et al. 2018).
    precision, recall, density, coverage
                     k-nearest-neighbour manifolds of the two feature sets (Naeem et al. 2020, k = 5).
    mode collapse    the evaluator's class histogram of the samples, its entropy divided by log K (1: every
                     class equally often), the classes holding at least 2 % of the samples, and the share of
                     samples the evaluator classifies with probability >= 0.9.

FID and KID come from torchmetrics, handed the evaluator's features through an identity "feature
extractor" (its documented hook for custom networks), so each image goes through the evaluator once for
every metric; precision/recall/density/coverage from ``prdc``, the authors' package.

Likelihood is bits/dim of the validation split, from each family's ``validation_metrics`` (exact for the
autoregressive families; the ELBO and the IWAE bound for the VAE, whose continuous decoders give densities,
comparable with each other but not with discrete likelihoods), or for diffusion from ``variational_bound``
(Ho et al. eq. 5 with the discretised decoder: a bound on the probability of the 8-bit images, estimated from
``VLB_TIMESTEPS`` stratified timesteps on ``VLB_IMAGES`` images). Family diagnostics (active units, ...)
are whatever ``validation_metrics`` returns, shown in the same table.

Calibration (``--calibrate``): for a family that outputs logits (the autoregressive ones, and the
classifier), one temperature T is fitted post hoc on the validation split by minimising the NLL of
softmax(logits / T) (temperature scaling, Guo et al. 2017, sec. 4.2), and the NLL and expected calibration
error (15 equal-width confidence bins) are reported before and after. The fit is stored in
``runs/<name>/calibration.json`` (a bare checkpoint gets ``<checkpoint>.calibration.json`` beside it), with
the checkpoint step it belongs to, and is appended to ``metrics.jsonl``; ``genai sample RUN --temperature
calibrated`` reads it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import GenaiError
from .hardware import resolve_precision

CONFIDENT = 0.9  # a sample is confidently classified when the evaluator's top probability reaches this
MIN_CLASS_SHARE = 0.02  # a class is covered when it holds at least this share of the samples
PRDC_K = 5  # nearest neighbours of precision/recall/density/coverage (Naeem et al.'s default)
KID_SUBSETS = 100
MAX_REAL_IMAGES = 10_000  # real images (validation split) compared with the samples
ECE_BINS = 15
CALIBRATION_MAX_LOGITS = 2**25  # logits kept in memory for the temperature fit (128 MB of float32)
VLB_IMAGES = 500  # validation images of the diffusion bound (k + 1 network passes each)
VLB_TIMESTEPS = 10  # stratified timesteps per image of the diffusion bound
SAMPLE_CHUNK = 250  # images drawn per sample() call
FEATURE_CHUNK = 500  # images per evaluator forward

# The bundled evaluator config of each dataset (the command `genai evaluate` tells a user to run).
EVALUATOR_CONFIGS = {"mnist5k": "configs/classifier_mnist.yaml", "mnist": "configs/classifier_mnist_full.yaml",
                     "fashion_mnist": "configs/classifier_fashion_mnist.yaml",
                     "cifar10": "configs/classifier_cifar10.yaml"}
# What `--train-evaluator` trains: the model section of configs/classifier_mnist.yaml (a test keeps them equal),
# with a quick budget of 12 epochs or EVALUATOR_MAX_STEPS steps, whichever is fewer.
EVALUATOR_MODEL = {"family": "classifier", "channels": [16, 32, 64], "feature_dim": 128, "dropout": 0.3, "shift": 2}
EVALUATOR_TRAIN = {"epochs": 12, "batch_size": 64, "lr": 3.0e-3, "weight_decay": 1.0e-4, "warmup_steps": 50,
                   "ema_decay": 0.99, "log_every": 50, "eval_every": 250, "checkpoint_every": 250}
EVALUATOR_MAX_STEPS = 3000

# Rows of the results table, in order: (key, label, format). Keys not listed (diagnostics) follow.
ROWS = [
    ("classifier_fid", "classifier-FID (lower is better)", ".3f"),
    ("kid", "KID (lower is better)", ".5f"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
    ("density", "density", ".3f"),
    ("coverage", "coverage", ".3f"),
    ("class_entropy", "class entropy / log K", ".3f"),
    ("classes_covered", "classes with >= 2 % of samples", "d"),
    ("confident_share", "share classified with p >= 0.9", ".3f"),
    ("bits_per_dim", "bits/dim (validation)", ".4f"),
    ("sample_seconds_per_64", "sampling seconds per 64 images", ".2f"),
    ("reference_fid", "classifier-FID train vs validation (floor)", ".3f"),
]
CHART_KEYS = ["classifier_fid", "kid", "precision", "recall", "density", "coverage", "class_entropy", "bits_per_dim"]


# ---------------------------------------------------------------------------------------------
# Metrics on feature sets (pure functions of (N, D) tensors)
# ---------------------------------------------------------------------------------------------
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
    entropy = float(-(nonzero * nonzero.log()).sum()) / math.log(k)  # 1: uniform over the K classes
    return {"class_histogram": [int(c) for c in counts], "class_entropy": entropy,
            "classes_covered": int((share >= MIN_CLASS_SHARE).sum()),
            "confident_share": float((probs.max(1).values >= CONFIDENT).double().mean())}


# ---------------------------------------------------------------------------------------------
# Calibration: temperature scaling
# ---------------------------------------------------------------------------------------------
def expected_calibration_error(logits: Tensor, targets: Tensor, bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (share of predictions) x |accuracy - confidence|."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = torch.softmax(logits.float(), dim=-1)
    return float(multiclass_calibration_error(probs, targets, num_classes=logits.shape[-1], n_bins=bins, norm="l1",
                                              validate_args=False))


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


def temperature_scaling(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """Fit T and report the NLL (nats per prediction) and ECE before (T = 1) and after."""
    t = fit_temperature(logits, targets)
    return {
        "temperature": t,
        "nll_before": float(F.cross_entropy(logits.float(), targets)),
        "nll_after": float(F.cross_entropy(logits.float() / t, targets)),
        "ece_before": expected_calibration_error(logits, targets),
        "ece_after": expected_calibration_error(logits / t, targets),
        "accuracy": float((logits.argmax(-1) == targets).double().mean()),
        "predictions": int(targets.numel()),
    }


def prediction_logits(model, batch) -> tuple[Tensor, Tensor]:
    """(logits (N, K), targets (N,)) of a family that predicts categories: the autoregressive families
    (every sub-pixel is a prediction) or one defining ``calibration_logits`` (the classifier)."""
    if hasattr(model, "calibration_logits"):
        return model.calibration_logits(batch)
    if getattr(model, "discrete", False) and hasattr(model, "seq_logits"):
        tokens = model.tokenize(batch[0])  # (B, T)
        logits = model.seq_logits(tokens)  # (B, T, K)
        return logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    raise GenaiError(f"--calibrate fits a temperature to predicted categories; family '{model_family(model)}' "
                     f"outputs none; calibrate a discrete family ({', '.join(discrete_families())}) or the classifier")


def model_family(model) -> str:
    from .registry import MODELS

    return next((n for n in MODELS.names() if type(model) is MODELS.get(n)), type(model).__name__)


def discrete_families() -> list[str]:
    from .registry import MODELS

    return [n for n in MODELS.names() if MODELS.get(n).discrete]


def calibration_path(ckpt: Path) -> Path:
    from .runs import run_of_checkpoint

    run = run_of_checkpoint(ckpt)
    return run / "calibration.json" if run is not None else ckpt.with_name(ckpt.name + ".calibration.json")


def calibrated_temperature(ckpt: Path, step: int) -> float:
    """The temperature fitted by ``genai evaluate --calibrate`` for this checkpoint (at this step)."""
    path = calibration_path(ckpt)
    target = ckpt.parent.parent if path.name == "calibration.json" else ckpt
    if not path.is_file():
        raise GenaiError(f"'{target}' has no fitted temperature; fit one with: genai evaluate {target} --calibrate")
    try:
        record = json.loads(path.read_text())
        t, fitted_step = float(record["temperature"]), int(record["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise GenaiError(f"{path} is not a calibration record; refit: genai evaluate {target} --calibrate") from None
    if fitted_step != step:
        raise GenaiError(f"the temperature in {path} was fitted at step {fitted_step}, the checkpoint is at step "
                         f"{step}; refit with: genai evaluate {target} --calibrate")
    return t


# ---------------------------------------------------------------------------------------------
# The evaluator network: found by dataset, or trained on request
# ---------------------------------------------------------------------------------------------
def _shape(data_cfg) -> tuple[int, int] | None:
    from .data import peek_spec

    try:
        spec = peek_spec(data_cfg)
    except GenaiError:
        return None
    return spec.channels, spec.size


def find_evaluator(data_cfg, spec, root: Path) -> Path | None:
    """The checkpoint of a ``classifier`` run under ``root`` trained on the same dataset at the same image shape.

    Among several, prefer the same binarisation, then the same train/validation split (so the evaluator never
    trained on the validation images it compares against), then the newest.
    """
    import yaml

    from .config import DataConfig, build_dataclass

    candidates = []
    for cfg_path in sorted(root.glob("*/config.yaml")) if root.is_dir() else []:
        run = cfg_path.parent
        ckpt = run / "checkpoints" / "last.pt"
        if ".old-" in run.name or not ckpt.is_file():
            continue  # a run moved aside by --force, or one that never saved
        try:
            raw = yaml.safe_load(cfg_path.read_text()) or {}
            if (raw.get("model") or {}).get("family") != "classifier":
                continue
            other = build_dataclass(DataConfig, raw.get("data") or {}, "data")
        except (yaml.YAMLError, GenaiError, AttributeError, UnicodeDecodeError):
            continue
        if other.name != data_cfg.name or _shape(other) != (spec.channels, spec.size):
            continue
        if other.name == "image_folder" and other.path != data_cfg.path:
            continue
        same_split = (other.split_seed, other.val_fraction) == (data_cfg.split_seed, data_cfg.val_fraction)
        candidates.append(((other.binarize == data_cfg.binarize, same_split, ckpt.stat().st_mtime), ckpt))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def evaluator_command(data_cfg, spec, root: Path, target: str) -> str:
    """The one command that makes the missing evaluator."""
    from .data import NATIVE
    from .runs import runs_dir

    config = EVALUATOR_CONFIGS.get(data_cfg.name)
    if config is None:
        return f"genai evaluate {target} --train-evaluator"
    parts = [f"genai train {config}"]
    channels, size, _ = NATIVE[data_cfg.name]
    if spec.size != size:
        parts.append(f"--set data.image_size={spec.size}")
    if spec.channels != channels:
        parts.append(f"--set data.channels={spec.channels}")
    if root != runs_dir(None):
        parts.append(f"--runs-dir {root}")
    return " ".join(parts)


def evaluator_config(data_cfg) -> dict[str, Any]:
    """The raw config ``--train-evaluator`` trains: the bundled recipe on the evaluated run's dataset and shape."""
    data = {k: v for k, v in asdict(data_cfg).items() if k not in ("binarize", "limit")}  # one per dataset
    raw = {"model": dict(EVALUATOR_MODEL), "data": data, "train": dict(EVALUATOR_TRAIN)}
    return raw


def train_evaluator(data_cfg, root: Path, log: Callable[[str], None], console=None) -> Path:
    """Train the evaluator for this dataset with the normal Trainer (quick budget); return its checkpoint."""
    from .config import from_dict
    from .data import load_data
    from .runs import new_run
    from .train import Trainer

    raw = evaluator_config(data_cfg)
    cfg = from_dict(raw, source="the evaluator recipe")
    data = load_data(cfg.data)
    if data.spec.num_classes < 2:
        raise GenaiError(f"dataset '{data_cfg.name}' has no class labels, so no evaluator network can be trained; "
                         f"sample-quality metrics need a labelled dataset")
    steps_per_epoch = max(1, len(data) // cfg.train.batch_size)
    if cfg.train.epochs * steps_per_epoch > EVALUATOR_MAX_STEPS:
        raw["train"]["max_steps"] = EVALUATOR_MAX_STEPS
        cfg = from_dict(raw, source="the evaluator recipe")
    root.mkdir(parents=True, exist_ok=True)
    name = f"evaluator-{data_cfg.name}-{data.spec.channels}x{data.spec.size}"
    if (root / name).exists():
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = new_run(root, name, name)
    (run / "config.yaml").write_text(cfg.to_yaml())
    steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    log(f"training the evaluator network for '{data_cfg.name}' into {run} ({steps} steps)")
    trainer = Trainer(cfg, run, data=data, quiet=True, console=console)
    result = trainer.fit()
    log(f"evaluator trained: validation accuracy {result.get('val_accuracy', float('nan')):.4f}")
    return run / "checkpoints" / "last.pt"


def load_evaluator(ckpt: Path, spec, device: torch.device):
    from .api import model_from_state
    from .runs import load_checkpoint_file

    state = load_checkpoint_file(ckpt)
    if state["family"] != "classifier":
        raise GenaiError(f"evaluator '{ckpt}' is a '{state['family']}' run; --evaluator takes a classifier run")
    model = model_from_state(state).to(device).eval()
    if (model.spec.channels, model.spec.size) != (spec.channels, spec.size):
        raise GenaiError(f"evaluator '{ckpt}' reads {model.spec.channels}x{model.spec.size}x{model.spec.size} images, "
                         f"the run draws {spec.channels}x{spec.size}x{spec.size}; train an evaluator on the same data")
    accuracy = (state.get("summary") or {}).get("last_val_accuracy")
    return model, accuracy


@torch.no_grad()
def evaluator_outputs(evaluator, images: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """(features (N, D) float64, class probabilities (N, K)) of images (N, C, H, W) in [0, 1], on the CPU."""
    feats, probs = [], []
    for i in range(0, images.shape[0], FEATURE_CHUNK):
        x = images[i:i + FEATURE_CHUNK].to(device).float()
        f = evaluator.features(x)
        feats.append(f.double().cpu())
        probs.append(torch.softmax(evaluator.head(f).float(), -1).cpu())
    return torch.cat(feats), torch.cat(probs)


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
def sampling_autocast(device: torch.device):
    # Sampling follows the hardware it runs on (precision auto), not the precision the run trained in:
    # a run trained in bf16 on an AMX machine samples in fp32 on an AVX2 laptop, where bf16 is emulated.
    return resolve_precision("auto", device).autocast(device)


def draw_samples(model, n: int, seed: int, options: dict[str, Any], device: torch.device,
                 autocast) -> tuple[Tensor, float]:
    """n samples (n, C, H, W) on the CPU and the seconds it took, in chunks from one seeded generator."""
    g = torch.Generator(device).manual_seed(seed)
    chunks = []
    t0 = time.perf_counter()
    with autocast:
        for i in range(0, n, SAMPLE_CHUNK):
            chunks.append(model.sample(min(SAMPLE_CHUNK, n - i), generator=g, **options).float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(chunks).clamp(0, 1), time.perf_counter() - t0


@torch.no_grad()
def validation_metrics(model, data, cfg, device: torch.device, max_images: int) -> dict[str, float]:
    """The family's own validation_metrics over the validation split (bits/dim, diagnostics), in fp32."""
    from .data import to_float

    n = min(data.val_x.shape[0], max_images)
    bs = cfg.train.batch_size
    batches = ((to_float(data.val_x[i:i + bs]).to(device), data.val_y[i:i + bs].to(device)) for i in range(0, n, bs))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1234)  # the trainer's validation seed: the same numbers as its val records
        return model.validation_metrics(batches)


def sample_quality(evaluator, data, fake: Tensor, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Every sample-quality and mode-collapse metric of images fake (N, C, H, W) in [0, 1] against the validation
    split of ``data`` (a DataBundle), plus ``reference_fid``: training images against the same validation
    images, at the same set sizes, the floor classifier-FID can reach."""
    from .data import to_float

    real_f, _ = evaluator_outputs(evaluator, to_float(data.val_x[:MAX_REAL_IMAGES]), device)
    fake_f, fake_p = evaluator_outputs(evaluator, fake, device)
    metrics: dict[str, Any] = {"classifier_fid": frechet_distance(real_f, fake_f)}
    metrics["kid"], metrics["kid_std"] = kernel_distance(real_f, fake_f, seed)
    metrics.update(precision_recall_density_coverage(real_f, fake_f))
    metrics.update(class_statistics(fake_p))
    k = min(fake.shape[0], data.train_x.shape[0])
    train_f, _ = evaluator_outputs(evaluator, to_float(data.train_x[:k]), device)
    metrics["reference_fid"] = frechet_distance(real_f, train_f)
    return metrics


@torch.no_grad()
def variational_bits_per_dim(model, data, cfg, device: torch.device, images: int, seed: int) -> float:
    """bits/dim of the first ``images`` validation images from a family's ``variational_bound`` (diffusion)."""
    from .data import to_float

    g = torch.Generator(device).manual_seed(seed)
    total, bs = 0.0, cfg.train.batch_size
    for i in range(0, images, bs):
        batch = (to_float(data.val_x[i:min(i + bs, images)]).to(device), data.val_y[i:min(i + bs, images)].to(device))
        total -= float(model.variational_bound(batch, VLB_TIMESTEPS, generator=g).double().sum())
    return model.bits_per_dim(total / images, model.spec)


def resolve(target: str | None, root: Path):
    """(checkpoint path, state, model, config, run folder or None) of a run folder, run name or checkpoint."""
    from .api import model_from_state
    from .config import from_dict
    from .runs import load_checkpoint_file, resolve_checkpoint, run_of_checkpoint

    ckpt = resolve_checkpoint(target, root)
    state = load_checkpoint_file(ckpt)
    model = model_from_state(state)
    cfg = from_dict(state["config"], source=str(ckpt))
    return ckpt, state, model, cfg, run_of_checkpoint(ckpt)


def evaluate_run(target: str | None, *, root: Path, n: int = 1000, seed: int | None = None, device: str = "auto",
                 evaluator: str | None = None, train_missing: bool = False, sample_options: dict | None = None,
                 log: Callable[[str], None] = lambda s: None, console=None, record: bool = True) -> dict[str, Any]:
    """Every metric of one run; appended to its metrics.jsonl (split "evaluate") unless record is False.

    sample_options overrides the run's ``sample:`` defaults (e.g. {"sampler": "ddim", "steps": 50}).
    """
    from .data import load_data
    from .hardware import pick_device
    from .runs import MetricsLog, resolve_checkpoint

    if n < PRDC_K + 1:
        raise GenaiError(f"-n must be at least {PRDC_K + 1} (the nearest-neighbour metrics use k = {PRDC_K}), got {n}")
    ckpt, state, model, cfg, run = resolve(target, root)
    dev = pick_device(device)
    model.to(dev).eval()
    data = load_data(cfg.data)
    spec = model.spec
    seed = cfg.sample.seed if seed is None else seed
    result: dict[str, Any] = {"run": str(run or ckpt), "family": state["family"], "dataset": cfg.data.name,
                              "step": int(state["step"]), "seed": seed}
    metrics: dict[str, Any] = {}

    if model.generative:
        if evaluator is not None:
            ev_ckpt = resolve_checkpoint(evaluator, root)
        else:
            ev_ckpt = find_evaluator(cfg.data, spec, root)
            if ev_ckpt is None:
                if spec.num_classes < 2:
                    raise GenaiError(f"dataset '{cfg.data.name}' has no class labels, so there is no evaluator network "
                                     f"for its samples; sample-quality metrics need a labelled dataset")
                if not train_missing:
                    command = evaluator_command(cfg.data, spec, root, target or str(run or ckpt))
                    also = "" if "--train-evaluator" in command else " (or add --train-evaluator)"
                    raise GenaiError(f"no evaluator network for '{cfg.data.name}' "
                                     f"({spec.channels}x{spec.size}x{spec.size}) under '{root}'; make one with: "
                                     f"{command}{also}")
                ev_ckpt = train_evaluator(cfg.data, root, log, console)
        ev_model, ev_accuracy = load_evaluator(ev_ckpt, spec, dev)
        log(f"{result['run']}: {state['family']} on {cfg.data.name}, step {state['step']}; evaluator {ev_ckpt}")
        result["evaluator"] = str(ev_ckpt)
        result["evaluator_accuracy"] = ev_accuracy
        options = {**cfg.sample.options(), **(sample_options or {})}
        log(f"drawing {n} samples (seed {seed}{', ' if options else ''}"
            f"{', '.join(f'{k}={v}' for k, v in options.items())})")
        fake, seconds = draw_samples(model, n, seed, options, dev, sampling_autocast(dev))
        result["n_samples"] = n
        result["sample_options"] = options
        log(f"measuring against {min(data.val_x.shape[0], MAX_REAL_IMAGES)} validation images in the evaluator's "
            f"feature space")
        quality = sample_quality(ev_model, data, fake, dev, seed)
        result["class_histogram"] = quality.pop("class_histogram")
        metrics.update(quality)
        metrics["sample_seconds_per_64"] = seconds / n * 64

    log("validation metrics (likelihood, diagnostics)")
    val = validation_metrics(model, data, cfg, dev, max(cfg.train.eval_max_images, 2000))
    if "bits_per_dim" in val:
        metrics["bits_per_dim"] = val.pop("bits_per_dim")
        result["likelihood"] = "exact" if model.discrete else "lower bound (ELBO)"
    elif hasattr(model, "variational_bound"):
        k = min(data.val_x.shape[0], VLB_IMAGES)
        log(f"variational bound on {k} validation images ({VLB_TIMESTEPS} timesteps each)")
        metrics["bits_per_dim"] = variational_bits_per_dim(model, data, cfg, dev, k, seed)
        result["likelihood"] = f"variational bound ({VLB_TIMESTEPS} stratified timesteps per image)"
    metrics.update({f"val_{k}": v for k, v in val.items()})
    result["metrics"] = metrics
    if record and run is not None and _writable(run):
        MetricsLog(run / "metrics.jsonl").append({"step": result["step"], "split": "evaluate", **metrics,
                                                  "class_histogram": result.get("class_histogram"),
                                                  "evaluator": result.get("evaluator"), "n_samples": n, "seed": seed})
    return result


def calibrate_run(target: str | None, *, root: Path, device: str = "auto",
                  log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Fit the temperature of a discrete family on its validation split; store and return the report."""
    from .data import load_data, to_float
    from .hardware import pick_device
    from .runs import MetricsLog

    ckpt, state, model, cfg, run = resolve(target, root)
    dev = pick_device(device)
    model.to(dev).eval()
    data = load_data(cfg.data)
    bs = cfg.train.batch_size
    logits, targets, kept, images = [], [], 0, 0
    with torch.no_grad():
        for i in range(0, data.val_x.shape[0], bs):
            batch = (to_float(data.val_x[i:i + bs]).to(dev), data.val_y[i:i + bs].to(dev))
            z, y = prediction_logits(model, batch)  # (N, K), (N,)
            if kept and kept + z.numel() > CALIBRATION_MAX_LOGITS:
                break  # enough predictions (a 28x28 image at 256 levels gives 200k logits)
            logits.append(z.float())
            targets.append(y)
            kept += z.numel()
            images += batch[0].shape[0]
    report = temperature_scaling(torch.cat(logits), torch.cat(targets))
    report.update(step=int(state["step"]), checkpoint=str(ckpt), split="validation", images=images,
                  fitted_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    log(f"fitted T = {report['temperature']:.4f} on {report['predictions']:,} predictions ({images} validation images)")
    path = calibration_path(ckpt)
    if _writable(path.parent):
        path.write_text(json.dumps(report, indent=2) + "\n")
        report["saved_to"] = str(path)
        if run is not None:
            MetricsLog(run / "metrics.jsonl").append({"split": "calibration", **report})
    return {"run": str(run or ckpt), "family": state["family"], "dataset": cfg.data.name, **report}


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)


# ---------------------------------------------------------------------------------------------
# Presentation: the table, the JSON, the bar chart
# ---------------------------------------------------------------------------------------------
def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if fmt == "d":
        return f"{int(value):d}"
    return format(value, fmt)


def results_table(results: list[dict[str, Any]]):
    """One column per run, one row per metric: the table of ``genai evaluate``."""
    from rich.table import Table

    table = Table(title="genai evaluate", caption="classifier-FID is measured in the toolkit's evaluator network; "
                  "it is not comparable to Inception FID")
    table.add_column("metric")
    for r in results:
        table.add_column(Path(r["run"]).name, justify="right")
    head = [("family", lambda r: r["family"]), ("dataset", lambda r: r["dataset"]), ("step", lambda r: str(r["step"])),
            ("samples", lambda r: str(r.get("n_samples", "-"))),
            ("evaluator", lambda r: Path(r["evaluator"]).parent.parent.name if r.get("evaluator") else "-"),
            ("evaluator accuracy", lambda r: _fmt(r.get("evaluator_accuracy"), ".4f"))]
    head.append(("likelihood", lambda r: r.get("likelihood", "-")))
    for label, get in head:
        table.add_row(label, *[get(r) for r in results])
    known = {key for key, _, _ in ROWS}
    for key, label, fmt in ROWS:
        if any(key in r["metrics"] for r in results):
            table.add_row(label, *[_fmt(r["metrics"].get(key), fmt) for r in results])
    if any("class_histogram" in r for r in results):
        table.add_row("class histogram", *[" ".join(map(str, r.get("class_histogram") or [])) or "-" for r in results])
    extra = sorted({k for r in results for k in r["metrics"] if k not in known and k != "kid_std"})
    for key in extra:
        table.add_row(key.replace("_", " "), *[_fmt(r["metrics"].get(key), ".5g") for r in results])
    return table


def calibration_table(report: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"temperature scaling: {report['run']}")
    for col in ("", "before (T = 1)", f"after (T = {report['temperature']:.4f})"):
        table.add_column(col, justify="right")
    table.add_row("NLL, nats per prediction", f"{report['nll_before']:.5f}", f"{report['nll_after']:.5f}")
    table.add_row(f"ECE ({ECE_BINS} bins)", f"{report['ece_before']:.5f}", f"{report['ece_after']:.5f}")
    return table


def comparison_chart(results: list[dict[str, Any]], path: Path) -> Path:
    """One bar chart per metric that any run has, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CHART_KEYS if any(k in r["metrics"] for r in results)]
    if not keys:
        raise GenaiError("none of the runs has a metric to chart")
    names = [Path(r["run"]).name for r in results]
    labels = {key: label for key, label, _ in ROWS}
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        values = [r["metrics"].get(key, np.nan) for r in results]
        ax.bar(range(len(names)), values, color=[colours[i % len(colours)] for i in range(len(names))])
        ax.set_title(labels.get(key, key), fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_json(results: list[dict[str, Any]]) -> str:
    """One object for one run, a list for several; non-finite numbers become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    data = clean(results)
    return json.dumps(data[0] if len(data) == 1 else data, indent=2)
