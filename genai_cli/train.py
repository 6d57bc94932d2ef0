"""The one training loop. It knows nothing about any family: it calls ``train_step``, ``sample`` and
``validation_metrics`` and keeps everything else (schedule, EMA, checkpoints, grids, logs, resume,
precision, gradient accumulation, torch.compile and data-parallel training over processes).

Two parts. ``assemble`` builds a run before its first step (distribution, data, parents, the model, optimizers,
EMA, precision, with auto's probe, compile/DDP, the grid evaluator) into ``RunParts``; ``Trainer`` is the loop over
them, and ``run_steps`` reads: draw a batch, set the learning rate, step, average the EMA, then ``after_step`` logs,
evaluates, samples and checkpoints on their schedules. ``session`` starts and resumes runs through both.

Exact resume: a run stopped at any step and resumed takes the same steps as one never stopped (bit for
bit on the CPU). The data order of an epoch depends only on (seed, epoch); the random draws of a step
only on (seed, rank, step); the learning rate only on the step; weights, EMA, optimizer and grad-scaler
states are in the checkpoint. Nothing else carries over from one step to the next.
"""

from __future__ import annotations

import copy
import hashlib
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from . import __version__, distributed
from .build import build_model
from .capabilities import has
from .config import Config
from .data import DataBundle, binarize_share, epoch_order, load_data, model_input, to_float
from .errors import GenaiError
from .generate import SampleRequest, draw, plan
from .hardware import (
    LoadFollower,
    Precision,
    describe_change,
    keep_freed_memory,
    pick_device,
    probe_cores,
    probe_threads,
    probe_training_precision,
    resolve_precision,
    thread_probe_wanted,
    training_probe_wanted,
    warn_if_emulated,
)
from .lineage import Parent, check_frozen, check_same_parents
from .models.base import GenerativeModel, Stepper
from .runs import (
    CHECKPOINT_FORMAT,
    MetricsLog,
    link_atomically,
    save_checkpoint,
    save_grid,
    trim_metrics,
)
from .spec import spec_to_dict


class LoopStepper(Stepper):
    """The family-facing Stepper plus what the loop adds to every optimizer step, whoever calls it:

    - gradient accumulation: on all but the last micro-batch, ``step`` banks the gradients and does not
      step; on the last it steps on their mean (so k micro-batches of B/k equal one batch of B);
    - ``sync``: the cross-process gradient mean, for families that step their own optimizers (GANs) and
      for accumulated micro-batches; DDP does it during backward otherwise.
    """

    def __init__(self, *args: Any, accum_steps: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.accum_steps = accum_steps
        self.micro = 0  # index of the current micro-batch, set by the loop
        self.sync = None  # callable(params) averaging gradients over processes, or None
        self._bank: dict[int, torch.Tensor] = {}  # id(parameter) -> summed gradient of earlier micro-batches

    def step(self, optimizer: torch.optim.Optimizer, params) -> float:
        params = list(params)
        if self.accum_steps > 1:
            if self.micro < self.accum_steps - 1:
                for p in params:
                    if p.grad is not None:
                        banked = self._bank.get(id(p))
                        self._bank[id(p)] = p.grad.detach().clone() if banked is None else banked.add_(p.grad)
                return 0.0
            for p in params:
                banked = self._bank.pop(id(p), None)
                if banked is not None:
                    p.grad = banked if p.grad is None else p.grad.add_(banked)
                if p.grad is not None:
                    p.grad.div_(self.accum_steps)
        if self.sync is not None:
            self.sync(params)
        return super().step(optimizer, params)


def make_stepper(cfg: Config, device: torch.device, precision: Precision) -> LoopStepper:
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    return LoopStepper(grad_clip=cfg.train.grad_clip, autocast_dtype=precision.dtype, device_type=device.type,
                       scaler=scaler, accum_steps=cfg.train.grad_accum)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the random draws of one step on one rank. torch's CPU generator keeps only 32 bits of a
    seed, so (seed, rank, step) is hashed into 32 bits rather than added up (which would collide)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{rank}:{step}".encode(), digest_size=4).digest(), "little")


PREPARE_IMAGES = 2000  # training images a family's prepare() measures on (latent statistics)


class EMA:
    """Exponential moving average of the weights, by default with the usual warm-up of the decay
    (min(decay, (1 + t) / (10 + t))) so short runs are not dominated by the initialisation; ``warmup=False``
    averages at ``decay`` from the first step.
    The frozen parents a model builds on are not its parameters: the copy shares them, the average skips them."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def rate(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.rate(step)
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


class LossForward(nn.Module):
    """A family's ``loss`` as the ``forward`` of a module, so that DDP and torch.compile can wrap it."""

    def __init__(self, model: GenerativeModel):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return type(self.model).loss(self.model, batch)


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
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                                     transient=False)
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


def tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise GenaiError("train.log asks for tensorboard but the tensorboard package is not installed; "
                         "pip install 'genai-cli[tensorboard]' or drop it from train.log") from None
    return SummaryWriter


@dataclass
class RunParts:
    """Everything a run is made of before its first step: ``assemble`` builds it, the loop (``Trainer``) runs it."""

    cfg: Config
    run_dir: Path
    dist: distributed.DistContext
    device: torch.device
    console: Console
    data: DataBundle
    model: GenerativeModel
    optimizers: dict[str, torch.optim.Optimizer]
    ema: EMA | None
    precision: Precision
    stepper: LoopStepper
    ddp: nn.Module | None  # the DDP wrapper, for no_sync while accumulating
    loss_route: Any  # what model.loss is routed through during a step (DDP, compile), or None
    tb_class: Any  # TensorBoard's SummaryWriter when train.log asks for it
    grid_evaluator: tuple[Any, str] | None  # (network, its checkpoint) scoring every grid, rank 0 only
    precision_probe: dict[str, float] | None = None  # the timings auto chose by (new runs only)
    thread_probe: dict[str, float] | None = None  # the timings the CPU thread count was chosen by (new runs only)


def assemble(cfg: Config, run_dir: Path, *, data: DataBundle | None = None, console: Console | None = None,
             parents: dict[str, Parent] | None = None, precision: Precision | None = None,
             threads: bool = False) -> RunParts:
    """Distribution, data, parents, the model on its device, optimizers, EMA, precision, compile/DDP and the evaluator
    lookup, in the order they depend on each other. ``precision``: the one a resumed run started with (its checkpoint
    says); None resolves ``train.precision`` here, timing fp32 against bf16 where auto needs it. ``threads``: this
    process is the run's own (``session.start_run``): a new run may also choose its CPU thread count by timing it
    (``hardware.probe_threads``), a process-wide setting that a caller holding its own count (a benchmark) keeps."""
    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    dist, device = distributed.setup(pick_device(t.device))
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for the tensors each step frees and allocates again
    console = (console or Console(stderr=False)) if dist.is_main else Console(quiet=True)  # only rank 0 talks
    data = data or load_data(cfg.data)
    if len(data) < t.batch_size:
        raise GenaiError(f"train.batch_size {t.batch_size} is larger than the training set ({len(data)} "
                         f"images); lower it, e.g. --set train.batch_size={max(1, len(data) // 2)}")
    distributed.check_batch(t.batch_size, t.grad_accum, dist.world_size)
    tb_class = tensorboard_writer_class() if "tensorboard" in t.log else None
    # A new run's parents (model.<field>: RUN) are resolved under the runs dir; a resumed run passes its checkpoint's.
    model = build_model(cfg.family, cfg.model, data.spec, parents, root=run_dir.parent).to(device)
    if t.channels_last:
        if not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules()):
            raise GenaiError(f"train.channels_last is for convolutional families; '{cfg.family}' has no 2-D "
                             f"convolution; drop it (--set train.channels_last=false)")
        model.to(memory_format=torch.channels_last)
    if model.generative:  # options the first grid would refuse fail now, not after minutes of training
        plan(model, grid_request(cfg))
    distributed.broadcast_module(model)
    optimizers = model.configure_optimizers(t)
    check_frozen(model, optimizers)
    for opt in optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    probe = counted = None
    if precision is None:
        precision = resolve_precision(t.precision, device)
        # One process (torchrun sets each rank's threads): time the step on fewer threads where a busy core would
        # stall torch's (a resumed run keeps the count it started with, session.resume_run).
        want_threads = threads and not dist.enabled and thread_probe_wanted(device)
        if want_threads or training_probe_wanted(precision, device):
            # Every rank must train in the same precision: rank 0 measures, all take its answer.
            precision, probe, counted = distributed.share_from_main(
                lambda: probe_run(cfg, model, data, device, precision, want_threads))
    if dist.is_main:
        warn_if_emulated(precision, device, lambda line: console.print(line, markup=False))
    ema = EMA(model, t.ema_decay, t.ema_warmup) if t.ema_decay and dist.is_main else None
    stepper = make_stepper(cfg, device, precision)
    ddp, loss_route = route_loss(cfg, model, dist, device, stepper)
    grid = None
    if dist.is_main and model.generative:
        from .evaluation.network import grid_evaluator

        try:
            grid = grid_evaluator(cfg.data, data.spec, run_dir.parent, device)
        except GenaiError as e:  # an evaluator run that cannot be read: train on, unscored, and say so
            console.print(f"sample grids are not scored: {e}", markup=False, highlight=False)
    return RunParts(cfg, run_dir, dist, device, console, data, model, optimizers, ema, precision, stepper, ddp,
                    loss_route, tb_class, grid, probe, counted)


def grid_request(cfg: Config) -> SampleRequest:
    """What every training grid draws: train.sample_n samples from train.sample_seed with the config's sample:
    options, as ``genai sample`` would (one path: ``generate.plan`` checks it, ``generate.draw`` draws it)."""
    return SampleRequest(n=cfg.train.sample_n, seed=cfg.train.sample_seed, options=cfg.sample.options())


def probe_run(cfg: Config, model: GenerativeModel, data: DataBundle, device: torch.device, auto: Precision,
              threads: bool) -> tuple[Precision, dict[str, float] | None, dict[str, float] | None]:
    """``probe_run_threads`` (where ``threads``), then ``hardware.probe_training_precision`` (where auto wants
    it) on the run's own model: full steps (the family's train_step, its optimizers) of one micro-batch of the first
    training batch, on a copy, so the run's weights, optimizer state and random draws are untouched (exact resume
    and the same-seed result do not depend on the probes). Returns (precision, its record, the threads' record)."""
    t = cfg.train
    share = max(1, t.batch_size // (t.grad_accum * distributed.context().world_size))
    idx = epoch_order(len(data), t.seed, 0)[:share]
    x = model_input(data.train_images(idx, step_seed(t.seed, -1, 0)).to(device), data.spec)
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batch = (x, data.train_y[idx].to(device))
    copy_ = copy.deepcopy(model).train()
    optimizers = copy_.configure_optimizers(t)

    def run_step(p: Precision) -> None:
        copy_.train_step(batch, optimizers, Stepper(grad_clip=t.grad_clip, autocast_dtype=p.dtype,
                                                   device_type=device.type))

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(t.seed)
        counted = probe_run_threads(lambda: run_step(auto)) if threads else None
        if not training_probe_wanted(auto, device):
            return auto, None, counted
        return (*probe_training_precision(auto, run_step), counted)


def probe_run_threads(run_step) -> dict[str, Any]:
    """A new run's CPU thread count and the record of why, with ``follow``: whether it follows the load from now on
    (``Trainer.follow_load``). A core held by another process (``probe_cores``, ~25 ms): half of torch's count, no
    step timed (a step on all threads then stalls for seconds: 10.3 s against 0.21 measured), and follow. Idle cores:
    the run's step decides (``probe_threads``); it follows unless fewer threads won, steps too small for more."""
    most = torch.get_num_threads()
    count, record = probe_cores()
    if count < most:
        return {**record, "follow": True}
    record = probe_threads(run_step)[1]
    return {**record, "follow": record["threads"] == most}


def route_loss(cfg: Config, model: GenerativeModel, dist: distributed.DistContext, device: torch.device,
               stepper: LoopStepper) -> tuple[nn.Module | None, Any]:
    """DDP and torch.compile: (the DDP wrapper or None, what ``model.loss`` goes through during a step or None).
    Families with the default train_step have their ``loss`` routed through DDP (gradients averaged in buckets
    during backward) and/or a compiled graph; families that step their own optimizers (GANs) get their sub-networks
    compiled and their gradients averaged by the stepper."""
    t = cfg.train
    own_step = type(model).train_step is not GenerativeModel.train_step
    ddp = route = None
    if not own_step and (dist.enabled or t.compile):
        route = LossForward(model)
        if dist.enabled:
            route = ddp = distributed.wrap_ddp(route, device)
        if t.compile:
            route = torch.compile(route)
    elif t.compile:
        for child in model.children():
            child.compile()
    if dist.enabled and (own_step or t.grad_accum > 1):
        # Accumulating: DDP stays silent (no_sync) and the summed micro-batch gradients are averaged once.
        stepper.sync = distributed.average_gradients
    return ddp, route


@contextmanager
def routed_loss(model: GenerativeModel, route: Any) -> Iterator[None]:
    """During a step, ``model.loss`` goes through ``route`` (DDP / the compiled graph; ``route_loss`` made it): an
    instance attribute shadows the method, so validation and sampling outside the step use the plain one."""
    if route is None:
        yield
        return
    model.__dict__["loss"] = route
    try:
        yield
    finally:
        del model.__dict__["loss"]


def score_grid(network: nn.Module, images: torch.Tensor, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    """The evaluator's reading of a grid (N, C, H, W) in [0, 1]: its class histogram (sums to N), classes present and
    mean confidence (``grid_statistics``), and each sample's predicted class (N,). A generator hopping between modes
    shows as a histogram that changes from grid to grid."""
    from .evaluation.metrics import grid_statistics
    from .evaluation.network import evaluator_outputs

    _, probs = evaluator_outputs(network, images.float().clamp(0, 1), device)  # (N, K)
    return grid_statistics(probs), probs.argmax(1)


def started_precision(state: dict[str, Any], requested: str) -> Precision | None:
    """The precision a checkpointed run started with, when it still answers ``requested`` (train.precision may be
    changed with --set on resume: then it resolves afresh). None for checkpoints from before it was stored."""
    saved = state.get("precision")
    if not isinstance(saved, dict) or saved.get("requested") != requested:
        return None
    return Precision(saved["requested"], saved["resolved"], saved["reason"])


class StopSignals:
    """While entered: the first Ctrl-C (SIGINT) or a SIGTERM (a scheduler, torchrun) sets ``requested``, and the loop
    finishes the current step, saves and stops, every rank at the same step. A second Ctrl-C stops a single process
    at once; under torchrun (``distributed``), which signals its workers more than once, the ranks always stop
    together at a step boundary. Outside the main thread signals cannot be caught: nothing is installed."""

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.requested = False  # a SIGINT/SIGTERM reached this process

    def on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested and not self.distributed:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignals:
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class Trainer:
    """The loop over an assembled run. ``Trainer(cfg, run_dir, ...)`` assembles one (``assemble``) and takes it;
    ``Trainer.from_parts`` takes one already assembled (``session`` does, to pass a resumed run's precision)."""

    def __init__(self, cfg: Config, run_dir: Path, *, data: DataBundle | None = None, quiet: bool = False,
                 console: Console | None = None, parents: dict[str, Parent] | None = None,
                 precision: Precision | None = None, parts: RunParts | None = None):
        parts = parts or assemble(cfg, run_dir, data=data, console=console, parents=parents, precision=precision)
        self.cfg, self.run_dir, self.quiet = parts.cfg, parts.run_dir, quiet
        self.dist, self.device, self.console = parts.dist, parts.device, parts.console
        self.is_main = self.dist.is_main  # only rank 0 writes and talks
        self.data, self.model, self.optimizers, self.ema = parts.data, parts.model, parts.optimizers, parts.ema
        self.precision, self.stepper = parts.precision, parts.stepper
        self.ddp, self.loss_route = parts.ddp, parts.loss_route
        self.tb_class, self.grid_evaluator = parts.tb_class, parts.grid_evaluator
        t = self.cfg.train
        self.steps_per_epoch = self.data.steps_per_epoch(t.batch_size, self.dist.world_size)
        self.total_steps = t.max_steps if t.max_steps is not None else t.epochs * self.steps_per_epoch
        self.step = 0
        self.elapsed = 0.0
        self.summary: dict[str, Any] = {}
        if parts.precision_probe is not None:
            self.summary["precision_probe"] = parts.precision_probe
        self.follower: LoadFollower | None = None  # the CPU thread count following the load (follow_load)
        if parts.thread_probe is not None:
            self.summary["thread_probe"] = parts.thread_probe
            self.follow_load(parts.thread_probe)
        if self.grid_evaluator is not None:
            self.summary["grid_evaluator"] = self.grid_evaluator[1]
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.tb = None
        self.best_pending = False  # validation improved since the last best.pt
        self.stops = StopSignals(self.dist.enabled)
        self.shared_elapsed = 0.0  # training seconds, averaged over ranks (train.max_seconds)
        self.stop_agreed = False  # some rank's stop request, as all ranks learnt it in the last step's all-reduce

    def follow_load(self, record: dict[str, Any]) -> None:
        """Keep the CPU thread count this process chose at the run's start (``record``, ``probe_run``) following the
        load from now on (``hardware.LoadFollower``), where the start's timing said it depends on the load."""
        if record.get("follow"):
            self.follower = LoadFollower(int(record["of_threads"]))

    @classmethod
    def from_parts(cls, parts: RunParts, *, quiet: bool = False, **options) -> Trainer:
        """The Trainer (or subclass) of assembled ``parts``; ``options``: a subclass's own keywords."""
        return cls(parts.cfg, parts.run_dir, quiet=quiet, parts=parts, **options)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        scaler = self.stepper.scaler
        return {
            "format": CHECKPOINT_FORMAT,
            "genai_version": __version__,
            "family": self.cfg.family,
            "config": self.cfg.to_dict(),
            "spec": spec_to_dict(self.data.spec),
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "parents": self.model.parents.records(),  # frozen, embedded: the checkpoint samples without them on disk
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            # What ran, so that a resumed run keeps it rather than resolving (or probing) auto afresh.
            "precision": {"requested": self.precision.requested, "resolved": self.precision.resolved,
                          "reason": self.precision.reason},
            "step": self.step,
            "rng": rng,  # informative: each step reseeds from (seed, rank, step)
            "world_size": self.dist.world_size,
            "elapsed_seconds": self.elapsed,
            "summary": self.summary,
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_parents(self.model, state, "the checkpoint")
        try:
            self.model.load_state_dict(state["model"])
            if self.ema and state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
        except (RuntimeError, KeyError) as e:
            raise GenaiError(f"checkpoint does not match this config ({str(e).splitlines()[0][:100]}); "
                             f"resume with the run's own config") from None
        if self.stepper.scaler is not None and state.get("grad_scaler"):
            self.stepper.scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_seconds", 0.0))
        self.summary = dict(state.get("summary") or {})
        self.summary.pop("finished", None)
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def save(self, snapshot: bool = False) -> Path:
        """Write checkpoints/last.pt atomically; with ``snapshot`` also keep it as step_N.pt, rotating out all
        but the newest train.keep_checkpoints of those. Rank 0 only."""
        folder = self.run_dir / "checkpoints"
        path = folder / "last.pt"
        save_checkpoint(self.state_dict(), path)
        keep = self.cfg.train.keep_checkpoints
        if snapshot and keep > 0:
            link_atomically(path, folder / f"step_{self.step:06d}.pt")
            snapshots = sorted(folder.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
            for old in snapshots[:-keep]:
                old.unlink()
        return path

    def save_best(self, same_as_last: bool) -> Path:
        """checkpoints/best.pt: the state with the lowest validation loss so far."""
        path = self.run_dir / "checkpoints" / "best.pt"
        if same_as_last:
            link_atomically(self.run_dir / "checkpoints" / "last.pt", path)
        else:
            save_checkpoint(self.state_dict(), path)
        self.best_pending = False
        return path

    # -- pieces -------------------------------------------------------------------------------
    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = model_input(x.to(self.device, non_blocking=True), self.data.spec)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def sampling_model(self) -> GenerativeModel:
        return self.ema.module if self.ema else self.model

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One optimizer step on this rank's share (x, y) of the global batch, in train.grad_accum micro-batches.
        Returns the logs averaged over micro-batches and ranks (gradient norms: of the final, averaged gradient)."""
        k = self.cfg.train.grad_accum
        torch.manual_seed(step_seed(self.cfg.train.seed, self.dist.rank, self.step))
        self.model.train()
        self.model.current_step = self.step
        sums: dict[str, float] = {}
        logs: dict[str, float] = {}
        for i, micro in enumerate(zip(x.chunk(k), y.chunk(k))):
            self.stepper.micro = i
            silent = self.ddp.no_sync() if self.ddp is not None and k > 1 else nullcontext()
            with routed_loss(self.model, self.loss_route), silent:
                logs = self.model.train_step(micro, self.optimizers, self.stepper)
            for key, v in logs.items():
                sums[key] = sums.get(key, 0.0) + v
        mean = {key: logs[key] if key.startswith("grad_norm") else v / k for key, v in sums.items()}
        mean["stop"] = float(self.stops.requested)  # one rank asked to stop: all stop after this same step
        mean["elapsed"] = self.elapsed  # averaged, so every rank takes the same time-budget decision
        mean = distributed.average_logs(mean, self.device)
        self.shared_elapsed = mean.pop("elapsed")
        self.stop_agreed = mean.pop("stop") > 0
        return mean

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
        samples = draw(model, grid_request(self.cfg), precision=self.precision.resolved)
        path = samples.save(self.run_dir / "samples" / f"step_{self.step:06d}{self.data.spec.sample_suffix}")
        if samples.texts is not None:
            if self.tb is not None:
                self.tb.add_text("samples", samples.text(), self.step)
            return path
        images = samples.images
        if has(model, "reconstruct"):  # a row of validation images over a row of their reconstructions
            real = to_float(self.data.val_x[:8].to(self.device))
            with torch.no_grad(), self.stepper.autocast():
                recon = model.reconstruct(real).float()
            save_grid(torch.cat([real, recon]), path.with_name(f"recon_{path.name}"), nrow=real.shape[0])
        if self.tb is not None:
            from torchvision.utils import make_grid

            self.tb.add_image("samples", make_grid(images.clamp(0, 1), pad_value=0.5), self.step)
        if self.grid_evaluator is not None:  # logged as split "samples" (genai inspect draws the history)
            stats, predicted = score_grid(self.grid_evaluator[0], images, self.device)
            self.log({"step": self.step, "split": "samples", "grid_size": images.shape[0], **stats})
            if self.tb is not None:
                import numpy as np

                bins = np.arange(len(stats["class_histogram"]) + 1) - 0.5
                self.tb.add_histogram("samples/classes", predicted, self.step, bins=bins)
        return path

    def log(self, record: dict[str, Any]) -> None:
        """One record to metrics.jsonl and/or TensorBoard (train.log)."""
        if "jsonl" in self.cfg.train.log:
            self.metrics.append(record)
        if self.tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{split}/{key}", value, record["step"])

    # -- the loop -----------------------------------------------------------------------------
    def open_run(self) -> None:
        """Rank 0, before the first step: tidy what a killed run may have left, open TensorBoard."""
        for folder in (self.run_dir, self.run_dir / "checkpoints"):
            for stale in folder.glob(".*.tmp-*"):  # temporary files of writes a kill cut short
                stale.unlink(missing_ok=True)
        trim_metrics(self.metrics.path, self.step)
        if self.tb_class is not None:
            # purge_step: events past the checkpoint, written before a kill, are hidden when rewritten.
            self.tb = self.tb_class(log_dir=str(self.run_dir / "tensorboard"), purge_step=self.step or None)

    def prepare(self) -> None:
        """What the family measures on its data before the first step of a new run (a resumed run has it in its
        checkpoint). Every rank measures the same images, so the buffers agree; the EMA copies buffers each step.
        Families that measure nothing (the base class's prepare) cost no images."""
        if not has(self.model, "prepare"):
            return
        idx = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.cfg.train.seed))
        images = model_input(self.data.train_images(idx[:PREPARE_IMAGES]), self.data.spec).to(self.device)
        prepared = self.model.prepare(images)
        if prepared:
            self.summary.update(prepared)
            if self.is_main:
                self.log({"step": 0, "split": "prepare", **prepared})

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        self.summary["precision"] = self.precision.describe()  # what ran (inspect shows it beside the request)
        if self.is_main:
            self.open_run()
        reporter = Reporter(self.total_steps, self.step, self.quiet, self.console)
        if self.step == 0:
            if self.is_main and "precision_probe" in self.summary:  # why auto chose what it did (genai inspect)
                self.log({"step": 0, "split": "precision_probe", "precision": self.precision.resolved,
                          **self.summary["precision_probe"]})
            if self.is_main and "thread_probe" in self.summary:
                self.log({"step": 0, "split": "thread_probe", **self.summary["thread_probe"]})
            self.prepare()
        try:
            with self.stops:
                last_logs = self.run_steps(reporter)
        except KeyboardInterrupt:
            reporter.close()
            if self.is_main:
                self.save()
            self.close()
            raise
        except GenaiError:
            reporter.close()
            self.close()
            raise
        reporter.close()
        final: dict[str, Any] = {"step": self.step, **last_logs}
        if self.is_main:
            if self.step % t.eval_every != 0 or self.step == 0:
                final.update(self.evaluate())
            if self.step % t.sample_every != 0:
                self.write_grid()
            self.summary["finished"] = True
            self.save(snapshot=True)
            if self.best_pending:
                self.save_best(same_as_last=True)
        self.close()
        return {**self.summary, **final}

    def run_steps(self, reporter: Reporter) -> dict[str, float]:
        """Steps until train.max_steps/epochs; returns the last step's logs. Raises KeyboardInterrupt at a step
        boundary when a stop was asked for."""
        t = self.cfg.train
        window_time, window_images = 0.0, 0
        logs: dict[str, float] = {}
        batches, batches_epoch = iter(()), -1  # this rank's batches of the epoch (read ahead when streamed)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            epoch, i = divmod(self.step, self.steps_per_epoch)
            if batches_epoch != epoch:
                batches_epoch = epoch
                batches = self.data.epoch_batches(t.seed, epoch, i, t.batch_size, self.dist.rank, self.dist.world_size,
                                                  pin_memory=self.device.type == "cuda")
            batch = self.draw_batch(*next(batches))
            self.set_lr()
            logs = self.train_batch(*batch)
            if not math.isfinite(logs["loss"]):
                raise GenaiError(f"loss became {logs['loss']} at step {self.step + 1}; training stopped, "
                                 f"the last good checkpoint is kept; lower train.lr or use train.grad_clip "
                                 f"and --resume {self.run_dir}")
            if self.ema:
                self.ema.update(self.model, self.step)
            self.step += 1
            dt = time.perf_counter() - t0
            if self.follower is not None and (changed := self.follower.check(dt)) is not None:
                self.log({"step": self.step, "split": "thread_probe", **changed})
                reporter.message(f"step {self.step}: {describe_change(changed)}")
            self.elapsed += dt
            window_time += dt
            window_images += t.batch_size
            self.summary.setdefault("first_loss", logs["loss"])
            self.summary["last_loss"] = logs["loss"]
            self.summary["epoch"] = epoch
            self.after_step(logs, reporter, window_images / max(window_time, 1e-9))  # log, evaluate, sample, save
            if self.step % t.log_every == 0:
                window_time, window_images = 0.0, 0
            if self.stop_agreed:
                raise KeyboardInterrupt
            if t.max_seconds is not None and self.shared_elapsed >= t.max_seconds:
                self.total_steps = self.step  # the budget is spent: finish as if this were the last step
        return logs

    def draw_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share (x, y) of the global batch (``DataBundle.epoch_batches``), on the device. Images drawn
        afresh at each visit (data.binarize: stochastic) come from a seed of (seed, step) alone, "rank" -1 being no
        rank's step draws: the global batch's draw is sliced, so a resumed run and any number of processes see the
        same pixels."""
        t = self.cfg.train
        if self.data.train_levels is not None:
            x = binarize_share(x, step_seed(t.seed, -1, self.step), t.batch_size, self.dist.rank)
        return self.batch(x, y)

    def set_lr(self) -> None:
        """Warm-up + cosine at this step. Under a time budget the cosine follows time: its total is the steps the
        budget allows at the rate measured so far."""
        t = self.cfg.train
        total = self.total_steps
        if t.max_seconds is not None and self.shared_elapsed > 0:
            total = min(total, max(self.step + 1, round(self.step * t.max_seconds / self.shared_elapsed)))
        factor = lr_factor(self.step, t.warmup_steps, total, t.min_lr_ratio)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def evaluate(self) -> dict[str, float]:
        val = self.validate()
        loss = val.get("val_loss")
        if loss is not None and math.isfinite(loss) and loss < self.summary.get("best_val_loss", math.inf):
            self.summary["best_val_loss"] = loss
            self.summary["best_step"] = self.step
            self.best_pending = True
        for k, v in val.items():
            self.summary[f"last_{k}"] = v
        self.log({"step": self.step, "split": "val", **val})
        return val

    def after_step(self, logs: dict[str, float], reporter: Reporter, rate: float) -> None:
        """Logs, validation, grids and checkpoints on their schedules (rank 0 only). rate: training images/s."""
        if not self.is_main:
            return
        t = self.cfg.train
        self.summary["images_per_sec"] = rate
        info = f"loss {logs['loss']:.4f} | {self.data.spec.describe_rate(rate)}"
        if self.step % t.log_every == 0 or self.step == 1:
            lr = next(iter(self.optimizers.values())).param_groups[0]["lr"]
            self.log({"step": self.step, "split": "train", "lr": lr, "images_per_sec": round(rate, 2),
                      "elapsed_seconds": round(self.elapsed, 3), **logs})
        if self.step % t.eval_every == 0:
            val = self.evaluate()
            info += "".join(f" | {k} {v:.4f}" for k, v in val.items() if k in ("val_loss", "val_bits_per_dim"))
            reporter.message(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if self.step % t.sample_every == 0:
            self.write_grid()
        scheduled = self.step % t.checkpoint_every == 0
        if scheduled:
            self.save(snapshot=True)
        if self.best_pending:
            self.save_best(same_as_last=scheduled)
        reporter.update(self.step, info, log_line=self.step % t.log_every == 0)


def is_interactive() -> bool:
    return sys.stdout.isatty()
