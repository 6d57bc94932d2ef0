"""``genai evaluate --calibrate``: one sampling temperature fitted post hoc, and measured on images it never saw.

For a family that outputs categorical predictions (the discrete families: every sub-pixel is a prediction; or one
giving ``calibration_logits``, the classifier), one temperature T is fitted by minimising the NLL of
softmax(logits / T) (temperature scaling, Guo et al. 2017, sec. 4.2).

The validation split is cut in two halves by a seeded permutation of its images (``SPLIT_SEED``, fixed so a refit
of the same checkpoint gives the same T; the first half gets the odd image): T is fitted on the first half, and the
NLL and expected calibration error before (T = 1) and after are reported on the second, held-out half. Whole
images go to one half or the other (the predictions within an image are not independent). Each half keeps at most
``CALIBRATION_MAX_LOGITS / 2`` logits in memory; the report says how many images each half actually used.

The fit is stored in ``runs/<name>/calibration.json`` (a bare checkpoint gets ``<checkpoint>.calibration.json``
beside it) with the checkpoint step it belongs to, and appended to ``metrics.jsonl``; ``genai sample RUN
--temperature calibrated`` reads it. The reliability diagram of the held-out half, before and after, is drawn beside
it (``reliability.png``, or ``<checkpoint>.reliability.png``): accuracy per confidence bin against the diagonal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..capabilities import has
from ..errors import GenaiError
from .metrics import temperature_scaling

SPLIT_SEED = 0  # the permutation that cuts the validation split into the fit half and the held-out half
CALIBRATION_MAX_LOGITS = 2**25  # logits kept in memory, both halves together (128 MB of float32)


def calibration_families() -> list[str]:
    """Families whose predictions a temperature can be fitted to."""
    from ..registry import MODELS

    return [n for n in MODELS.names() if has(MODELS.get(n), "seq_logits") or has(MODELS.get(n), "calibration_logits")]


def prediction_logits(model, batch) -> tuple[Tensor, Tensor]:
    """(logits (N, K), targets (N,)) of a family that predicts categories: a discrete family (every sub-pixel is a
    prediction, through its ``tokenize`` / ``seq_logits``) or one giving ``calibration_logits``."""
    if has(model, "calibration_logits"):
        return model.calibration_logits(batch)
    if has(model, "seq_logits"):
        tokens = model.tokenize(batch[0])  # (B, T)
        logits = model.seq_logits(tokens)  # (B, T, K)
        return logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    raise GenaiError(f"--calibrate fits a temperature to predicted categories; family '{model_family(model)}' "
                     f"outputs none; calibrate one of: {', '.join(calibration_families())}")


def model_family(model) -> str:
    from ..registry import MODELS

    return next((n for n in MODELS.names() if type(model) is MODELS.get(n)), type(model).__name__)


def calibration_split(n: int, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Indices (fit, held_out) of n validation images: a seeded permutation cut in two halves, disjoint, together
    all n (the fit half gets the odd one)."""
    if n < 2:
        raise GenaiError(f"--calibrate needs at least 2 validation images (one to fit, one to measure), got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = (n + 1) // 2
    return order[:half], order[half:]


@torch.no_grad()
def collect_predictions(model, data, indices: Tensor, batch_size: int, device: torch.device,
                        max_logits: int) -> tuple[Tensor, Tensor, int]:
    """(logits (N, K) float32, targets (N,), images used) of the validation images ``indices``, in that order,
    stopping before the logits would pass ``max_logits`` (a 28x28 image at 256 levels gives 200k of them)."""
    from ..data import model_input

    logits, targets, kept, images = [], [], 0, 0
    for i in range(0, indices.numel(), batch_size):
        idx = indices[i:i + batch_size]
        batch = (model_input(data.val_x[idx], data.spec).to(device), data.val_y[idx].to(device))
        z, y = prediction_logits(model, batch)  # (N, K), (N,)
        if kept and kept + z.numel() > max_logits:
            break
        logits.append(z.float())
        targets.append(y)
        kept += z.numel()
        images += idx.numel()
    return torch.cat(logits), torch.cat(targets), images


def calibrate_run(target: str | None, *, root: Path, device: str = "auto",
                  log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Fit the temperature of a run on one half of its validation split, measure it on the other; store and
    return the report."""
    from ..data import load_data
    from ..hardware import pick_device
    from ..runs import MetricsLog
    from .run import load_run, writable

    ckpt, state, model, cfg, run = load_run(target, root)
    dev = pick_device(device, "--device")
    model.to(dev).eval()
    data = load_data(cfg.data)
    n = data.val_x.shape[0]
    fit_idx, held_idx = calibration_split(n)
    bs = cfg.train.batch_size
    fit_z, fit_y, fit_images = collect_predictions(model, data, fit_idx, bs, dev, CALIBRATION_MAX_LOGITS // 2)
    held_z, held_y, held_images = collect_predictions(model, data, held_idx, bs, dev, CALIBRATION_MAX_LOGITS // 2)
    report = temperature_scaling(fit_z, fit_y, held_z, held_y)
    report.update(step=int(state["step"]), checkpoint=str(ckpt), split="validation", split_seed=SPLIT_SEED,
                  validation_images=n, fit_images=fit_images, held_out_images=held_images,
                  measured_on="held-out half", fitted_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    log(f"fitted T = {report['temperature']:.4f} on {report['fit_predictions']:,} predictions ({fit_images} "
        f"validation images); measured on the other {held_images} ({report['predictions']:,} predictions)")
    path = calibration_path(ckpt)
    if writable(path.parent):
        path.write_text(json.dumps(report, indent=2) + "\n")
        report["saved_to"] = str(path)
        report["reliability_diagram"] = str(draw_reliability(report, reliability_path(ckpt), str(run or ckpt)))
        if run is not None:
            MetricsLog(run / "metrics.jsonl").append({"split": "calibration", **report})
    return {"run": str(run or ckpt), "family": state["family"], "dataset": cfg.data.name, **report}


def calibration_path(ckpt: Path) -> Path:
    from ..runs import run_of_checkpoint

    run = run_of_checkpoint(ckpt)
    return run / "calibration.json" if run is not None else ckpt.with_name(ckpt.name + ".calibration.json")


def reliability_path(ckpt: Path) -> Path:
    path = calibration_path(ckpt)
    return path.with_name("reliability.png" if path.name == "calibration.json" else ckpt.name + ".reliability.png")


def draw_reliability(report: dict[str, Any], path: Path, title: str) -> Path:
    """The held-out half's reliability diagram before (T = 1) and after temperature scaling."""
    from .report import reliability_diagram

    t = report["temperature"]
    return reliability_diagram({"before (T = 1)": {**report["reliability_before"], "ece": report["ece_before"]},
                                f"after (T = {t:.3f})": {**report["reliability_after"], "ece": report["ece_after"]}},
                               path, title=f"{title}: held-out half of the validation split")


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
