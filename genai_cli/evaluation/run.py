"""Evaluating one run: draw its samples, measure them in the evaluator's features, score the likelihood of the
validation split, and append the result to the run's ``metrics.jsonl`` (``"split": "evaluate"``).

Likelihood is bits/dim of the validation split, from each family's ``validation_metrics`` (exact for the
autoregressive families; the ELBO and the IWAE bound for the VAE, whose continuous decoders give densities,
comparable with each other but not with discrete likelihoods), or, for a family declaring ``variational_bound``
(diffusion, the masked model), from that bound (for diffusion Ho et al. eq. 5 with the discretised decoder: a bound
on the probability of the 8-bit images), estimated from the family's ``bound_strata`` stratified draws on
``VLB_IMAGES`` images. Family diagnostics
(active units, ...) are whatever ``validation_metrics`` returns, shown in the same table.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..capabilities import has
from ..errors import GenaiError
from ..hardware import resolve_precision
from .evaluator import evaluator_outputs, load_evaluator, resolve_evaluator
from .metrics import PRDC_K, class_statistics, frechet_distance, kernel_distance, precision_recall_density_coverage

MAX_REAL_IMAGES = 10_000  # real images (validation split) compared with the samples
VLB_IMAGES = 500  # validation images of a variational bound (bound_strata network passes or more each)
ESTIMATE_IMAGES = 100  # validation images of a likelihood estimate (an adaptive ODE solve with a backward pass each)
SAMPLE_CHUNK = 250  # images drawn per sample() call
TEXT_SAMPLES = 32  # texts a text run's evaluation writes (at most -n)
TEXT_NEW_TOKENS = 256  # their length, unless the run's sample section says


def sampling_autocast(device: torch.device):
    # Sampling follows the hardware it runs on (precision auto), not the precision the run trained in:
    # a run trained in bf16 on an AMX machine samples in fp32 on an AVX2 laptop, where bf16 is emulated.
    return resolve_precision("auto", device).autocast(device)


def draw_samples(model, n: int, seed: int, options: dict[str, Any], device: torch.device) -> tuple[Tensor, float]:
    """n samples (n, C, H, W) on the CPU and the seconds it took, through ``generate.draw`` (in chunks of
    ``SAMPLE_CHUNK`` from one seeded generator, in the precision this machine runs best). Text runs: token ids."""
    from ..generate import SampleRequest, draw

    t0 = time.perf_counter()
    samples = draw(model, SampleRequest(n=n, seed=seed, options=options, chunk=SAMPLE_CHUNK), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if samples.texts is not None:
        return samples.images.long(), seconds  # token ids
    return samples.images.clamp(0, 1), seconds


@torch.no_grad()
def validation_metrics(model, data, cfg, device: torch.device, max_images: int) -> dict[str, float]:
    """The family's own validation_metrics over the validation split (bits/dim, diagnostics), in fp32."""
    from ..data import model_input

    n = min(data.val_x.shape[0], max_images)
    bs = cfg.train.batch_size
    batches = ((model_input(data.val_x[i:i + bs], data.spec).to(device), data.val_y[i:i + bs].to(device))
               for i in range(0, n, bs))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1234)  # the trainer's validation seed: the same numbers as its val records
        return model.validation_metrics(batches)


def sample_quality(evaluator, data, fake: Tensor, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Every sample-quality and mode-collapse metric of images fake (N, C, H, W) in [0, 1] against the validation
    split of ``data`` (a DataBundle), plus ``reference_fid``: training images against the same validation
    images, at the same set sizes, the floor classifier-FID can reach."""
    from ..data import to_float

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


def variational_bits_per_dim(model, data, cfg, device: torch.device, images: int, seed: int, strata: int) -> float:
    """bits/dim of the first ``images`` validation images from a family's ``variational_bound``, ``strata``
    stratified draws per image."""
    nats = per_image_log_p(lambda batch, g: model.variational_bound(batch, strata, generator=g), data, cfg, device,
                           images, seed)
    return model.bits_per_dim(-float(nats.mean()), model.spec)


def per_image_log_p(score: Callable, data, cfg, device: torch.device, images: int, seed: int) -> Tensor:
    """(images,) float64 ``score(batch, generator)`` (log p(x) in nats, a bound or an estimate) of the first
    ``images`` validation images, in batches of the run's batch size, from one seeded generator."""
    from ..data import to_float

    g = torch.Generator(device).manual_seed(seed)
    bs, out = cfg.train.batch_size, []  # no torch.no_grad here: an estimate may need gradients (a divergence)
    for i in range(0, images, bs):
        batch = (to_float(data.val_x[i:min(i + bs, images)]).to(device), data.val_y[i:min(i + bs, images)].to(device))
        out.append(score(batch, g).detach().double().cpu())
    return torch.cat(out)


def estimated_bits_per_dim(model, data, cfg, device: torch.device, images: int, seed: int) -> tuple[float, float]:
    """(bits/dim, its standard error) of the first ``images`` validation images from a family's
    ``likelihood_estimate``: the mean over images, and the spread of the per-image estimates over sqrt(images)
    (which holds both the images' spread and the estimator's noise)."""
    nats = per_image_log_p(lambda batch, g: model.likelihood_estimate(batch, generator=g), data, cfg, device,
                           images, seed)
    bits = -nats / (model.spec.dims * math.log(2))
    stderr = float(bits.std()) / math.sqrt(images) if images > 1 else float("nan")
    return float(bits.mean()), stderr


def distinct_ngrams(texts: list[str], n: int) -> float:
    """The share of distinct n-grams among all n-grams of the texts: low when a model loops on the same phrases."""
    grams = [t[i:i + n] for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def text_quality(model, data, k: int, seed: int, options: dict[str, Any], device: torch.device,
                 log: Callable[[str], None]) -> dict[str, float]:
    """A text run's samples: distinct 1..4-gram shares of k texts (beside the same shares in as many characters of
    validation text, the reference a model that does not loop reaches), and characters written per second."""
    new = options.get("max_new_tokens") or TEXT_NEW_TOKENS
    options = {**options, "max_new_tokens": new}
    log(f"writing {k} texts of {new} characters (seed {seed})")
    tokens, seconds = draw_samples(model, k, seed, options, device)
    given = tokens.shape[1] - new
    texts = [model.spec.decode(row[given:]) for row in tokens.long().tolist()]
    rows = -(-k * new // data.val_x.shape[1])  # the validation windows that hold k texts' worth of characters
    real = "".join(model.spec.decode(row) for row in data.val_x[:rows].tolist())
    chunks = [real[i * new:(i + 1) * new] for i in range(min(k, len(real) // new))]
    metrics = {"chars_per_second": k * new / seconds}
    for n in range(1, 5):
        metrics[f"distinct_{n}grams"] = distinct_ngrams(texts, n)
        metrics[f"distinct_{n}grams_validation"] = distinct_ngrams(chunks, n)
    return metrics


def load_run(target: str | None, root: Path):
    """(checkpoint path, state, model, config, run folder or None) of a run folder, run name or checkpoint."""
    from ..api import model_from_state
    from ..config import from_dict
    from ..runs import load_checkpoint_file, resolve_checkpoint, run_of_checkpoint

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
    from ..data import load_data
    from ..hardware import pick_device
    from ..runs import MetricsLog

    if n < PRDC_K + 1:
        raise GenaiError(f"-n must be at least {PRDC_K + 1} (the nearest-neighbour metrics use k = {PRDC_K}), got {n}")
    ckpt, state, model, cfg, run = load_run(target, root)
    dev = pick_device(device, "--device")
    model.to(dev).eval()
    data = load_data(cfg.data)
    spec = model.spec
    seed = cfg.sample.seed if seed is None else seed
    result: dict[str, Any] = {"run": str(run or ckpt), "family": state["family"], "dataset": cfg.data.name,
                              "step": int(state["step"]), "seed": seed}
    metrics: dict[str, Any] = {}
    options = {**cfg.sample.options(), **(sample_options or {})}  # the run's sampling defaults, then the caller's
    if model.generative and sample_options:  # options the family cannot honour: refused before any work
        from ..generate import SampleRequest, plan

        plan(model, SampleRequest(n=n, seed=seed, options=options))

    if model.generative and spec.sample_quality == "texts":
        metrics.update(text_quality(model, data, min(n, TEXT_SAMPLES), seed, options, dev, log))
        result["n_samples"] = min(n, TEXT_SAMPLES)
        result["sample_options"] = options
    elif model.generative:
        ev_run = resolve_evaluator(evaluator, cfg.data, spec, root, train_missing=train_missing,
                                   target=target or str(run or ckpt), log=log, console=console)
        ev_model, ev_accuracy = load_evaluator(ev_run, dev)
        log(f"{result['run']}: {state['family']} on {cfg.data.name}, step {state['step']}; evaluator "
            f"{ev_run.source} (step {ev_run.step})")
        result["evaluator"] = ev_run.source
        result["evaluator_accuracy"] = ev_accuracy
        log(f"drawing {n} samples (seed {seed}{', ' if options else ''}"
            f"{', '.join(f'{k}={v}' for k, v in options.items())})")
        fake, seconds = draw_samples(model, n, seed, options, dev)
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
        for key in [k for k in val if k.startswith("bits_per_")]:  # a modality's own unit: bits_per_char of text
            metrics[key] = val.pop(key)
    elif has(model, "variational_bound"):
        k, strata = min(data.val_x.shape[0], VLB_IMAGES), model.bound_strata
        log(f"variational bound on {k} validation images ({strata} strata each)")
        metrics["bits_per_dim"] = variational_bits_per_dim(model, data, cfg, dev, k, seed, strata)
        result["likelihood"] = f"variational bound ({strata} stratified draws per image)"
    elif has(model, "likelihood_estimate"):
        k = min(data.val_x.shape[0], ESTIMATE_IMAGES)
        log(f"likelihood estimate on {k} validation images (ODE change of variables, Hutchinson trace)")
        metrics["bits_per_dim"], metrics["bits_per_dim_stderr"] = estimated_bits_per_dim(model, data, cfg, dev, k,
                                                                                           seed)
        result["likelihood"] = "estimate (ODE + Hutchinson trace, dequantised; +- bits_per_dim_stderr)"
    metrics.update({f"val_{k}": v for k, v in val.items()})
    result["metrics"] = metrics
    if record and run is not None and writable(run):
        MetricsLog(run / "metrics.jsonl").append({"step": result["step"], "split": "evaluate", **metrics,
                                                  "class_histogram": result.get("class_histogram"),
                                                  "evaluator": result.get("evaluator"), "n_samples": n, "seed": seed,
                                                  "sample_options": result.get("sample_options")})
    return result


def writable(path: Path) -> bool:
    return os.access(path, os.W_OK)
