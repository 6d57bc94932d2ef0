"""The one training loop. It knows nothing about any family: it calls ``train_step``, ``sample`` and
``validation_metrics`` and keeps everything else (schedule, EMA, checkpoints, grids, logs, resume).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__
from .api import build_model
from .config import Config
from .data import DataBundle, load_data, to_float
from .errors import GenaiError
from .models.base import GenerativeModel, Stepper
from .runs import CHECKPOINT_FORMAT, MetricsLog, save_checkpoint, save_grid


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GenaiError("train.device is 'cuda' but no CUDA GPU is visible; use --set train.device=auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GenaiError("train.device is 'mps' but MPS is not available; use --set train.device=auto")
    return torch.device(name)


def make_stepper(cfg: Config, device: torch.device) -> Stepper:
    precision = cfg.train.precision
    if precision == "fp16" and device.type != "cuda":
        raise GenaiError("train.precision fp16 needs a CUDA GPU; on the CPU use bf16 (fast on AMX) or fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return Stepper(grad_clip=cfg.train.grad_clip, autocast_dtype=dtype, device_type=device.type, scaler=scaler)


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay
    (min(decay, (1 + t) / (10 + t))) so short runs are not dominated by the initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema_p = [p for p in self.module.parameters()]
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - d)
        for eb, b in zip(self.module.buffers(), model.buffers()):
            eb.copy_(b)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch depends only on (seed, epoch): resume needs no sampler state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class Reporter:
    """A rich progress bar, or plain log lines with --quiet / when stdout is not a terminal."""

    def __init__(self, total: int, start: int, quiet: bool, console: Console):
        self.console = console
        self.plain = quiet or not console.is_terminal
        self.total = total
        self.progress = None
        if not self.plain:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     console=console, transient=False)
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def update(self, step: int, info: str, log_line: bool) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif log_line:
            self.console.print(f"step {step}/{self.total} | {info}", highlight=False)

    def message(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(text, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, data: DataBundle | None = None, quiet: bool = False,
                 console: Console | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.console = console or Console(stderr=False)
        self.quiet = quiet
        t = cfg.train
        torch.manual_seed(t.seed)
        self.device = pick_device(t.device)
        self.data = data or load_data(cfg.data)
        if len(self.data) < t.batch_size:
            raise GenaiError(f"train.batch_size {t.batch_size} is larger than the training set ({len(self.data)} "
                             f"images); lower it, e.g. --set train.batch_size={max(1, len(self.data) // 2)}")
        self.model: GenerativeModel = build_model(cfg.family, cfg.model, self.data.spec).to(self.device)
        self.optimizers = self.model.configure_optimizers(t)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay else None
        self.stepper = make_stepper(cfg, self.device)
        self.steps_per_epoch = len(self.data) // t.batch_size
        self.total_steps = t.max_steps if t.max_steps is not None else t.epochs * self.steps_per_epoch
        self.step = 0
        self.elapsed = 0.0
        self.summary: dict[str, Any] = {}
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "genai_version": __version__,
            "family": self.cfg.family,
            "config": self.cfg.to_dict(),
            "spec": asdict(self.data.spec),
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "step": self.step,
            "rng": rng,
            "elapsed_seconds": self.elapsed,
            "summary": self.summary,
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            if self.ema and state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
        except (RuntimeError, KeyError) as e:
            raise GenaiError(f"checkpoint does not match this config ({str(e).splitlines()[0][:100]}); "
                             f"resume with the run's own config") from None
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_seconds", 0.0))
        self.summary = dict(state.get("summary") or {})
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def save(self) -> Path:
        path = self.run_dir / "checkpoints" / "last.pt"
        save_checkpoint(self.state_dict(), path)
        return path

    # -- pieces -------------------------------------------------------------------------------
    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)

    def sampling_model(self) -> GenerativeModel:
        return self.ema.module if self.ema else self.model

    def validate(self) -> dict[str, float]:
        model = self.sampling_model()
        model.eval()
        n = min(self.data.val_x.shape[0], self.cfg.train.eval_max_images)
        bs = self.cfg.train.batch_size
        batches = (self.batch(self.data.val_x[i:i + bs], self.data.val_y[i:i + bs]) for i in range(0, n, bs))
        # A fixed seed makes validation comparable across steps and leaves the training RNG untouched.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.stepper.autocast():
            torch.manual_seed(1234)
            metrics = model.validation_metrics(batches)
        return {f"val_{k}": v for k, v in metrics.items()}

    def write_grid(self) -> Path | None:
        model = self.sampling_model()
        if not model.generative:
            return None
        model.eval()
        g = torch.Generator(self.device).manual_seed(self.cfg.train.sample_seed)
        with self.stepper.autocast():
            images = model.sample(self.cfg.train.sample_n, generator=g, **self.cfg.sample.options())
        path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        save_grid(images, path)
        return path

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        reporter = Reporter(self.total_steps, self.step, self.quiet, self.console)
        n = len(self.data)
        window_time, window_images = 0.0, 0
        last_logs: dict[str, float] = {}
        try:
            while self.step < self.total_steps:
                epoch, pos = divmod(self.step, self.steps_per_epoch)
                order = epoch_order(n, t.seed, epoch)
                for i in range(pos, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    t0 = time.perf_counter()
                    idx = order[i * t.batch_size:(i + 1) * t.batch_size]
                    batch = self.batch(self.data.train_x[idx], self.data.train_y[idx])
                    for opt in self.optimizers.values():
                        for group in opt.param_groups:
                            group["lr"] = group["initial_lr"] * lr_factor(self.step, t.warmup_steps,
                                                                         self.total_steps, t.min_lr_ratio)
                    self.model.train()
                    self.model.current_step = self.step
                    logs = self.model.train_step(batch, self.optimizers, self.stepper)
                    if not math.isfinite(logs["loss"]):
                        raise GenaiError(f"loss became {logs['loss']} at step {self.step + 1}; training stopped, "
                                         f"the last good checkpoint is kept; lower train.lr or use train.grad_clip "
                                         f"and --resume {self.run_dir}")
                    if self.ema:
                        self.ema.update(self.model, self.step)
                    self.step += 1
                    dt = time.perf_counter() - t0
                    self.elapsed += dt
                    window_time += dt
                    window_images += t.batch_size
                    last_logs = logs
                    self.summary.setdefault("first_loss", logs["loss"])
                    self.summary["last_loss"] = logs["loss"]
                    self.summary["epoch"] = epoch
                    self.after_step(logs, reporter, window_images / max(window_time, 1e-9))
                    if self.step % t.log_every == 0:
                        window_time, window_images = 0.0, 0
        except KeyboardInterrupt:
            reporter.close()
            self.save()
            raise
        except GenaiError:
            reporter.close()
            raise
        reporter.close()
        final: dict[str, Any] = {"step": self.step, **last_logs}
        if self.step % t.eval_every != 0 or self.step == 0:
            final.update(self.evaluate())
        if self.step % t.sample_every != 0:
            self.write_grid()
        self.save()
        self.summary["finished"] = True
        self.save()
        return {**self.summary, **final}

    def evaluate(self) -> dict[str, float]:
        val = self.validate()
        if "val_loss" in val:
            self.summary["best_val_loss"] = min(self.summary.get("best_val_loss", math.inf), val["val_loss"])
        for k, v in val.items():
            self.summary[f"last_{k}"] = v
        self.metrics.append({"step": self.step, "split": "val", **val})
        return val

    def after_step(self, logs: dict[str, float], reporter: Reporter, rate: float) -> None:
        """Logs, validation, grids and checkpoints on their schedules. rate: training images/s (steps only)."""
        t = self.cfg.train
        self.summary["images_per_sec"] = rate
        info = f"loss {logs['loss']:.4f} | {rate:.0f} img/s"
        if self.step % t.log_every == 0 or self.step == 1:
            lr = next(iter(self.optimizers.values())).param_groups[0]["lr"]
            self.metrics.append({"step": self.step, "split": "train", "lr": lr, "images_per_sec": round(rate, 2),
                                 "elapsed_seconds": round(self.elapsed, 3), **logs})
        if self.step % t.eval_every == 0:
            val = self.evaluate()
            info += "".join(f" | {k} {v:.4f}" for k, v in val.items() if k in ("val_loss", "val_bits_per_dim"))
            reporter.message(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if self.step % t.sample_every == 0:
            self.write_grid()
        if self.step % t.checkpoint_every == 0:
            self.save()
        reporter.update(self.step, info, log_line=self.step % t.log_every == 0)


def is_interactive() -> bool:
    return sys.stdout.isatty()
