"""Few-step students: a run distilled from a teacher run's probability-flow ODE (``model.teacher: RUN``).

A diffusion or flow teacher draws an image by solving an ODE in 20 or more network evaluations (two networks' worth
per step when it is guided). The student learns to take the same noise to the same image in 1, 2 or 4 steps:

    pairs:     eps_i ~ N(0, I),  x_i = teacher.ode_solve(eps_i, labels=y_i)    (its sampler, steps and guidance)
    training:  s ~ p(s),  x_s = (1 - s) x_i + s eps_i,  || v_theta(x_s, s, y_i) - (eps_i - x_i) ||^2
    sampling:  x_1 = eps,  x <- x + (s' - s) v_theta(x, s, y)  on k equal Euler steps from s = 1 to s = 0

This is reflow (Liu et al. 2023, "Flow Straight and Fast", sec. 2.3: rectified flow trained on the coupling a
previous flow defines) with the teacher's deterministic ODE as the coupling; at s = 1 the loss is Luhman & Luhman's
(2021) knowledge distillation, x = eps - v_theta(eps, 1). The teacher's pairs join each noise to one image, so the
straight lines between them barely cross and the student's velocity field is nearly constant along each: one Euler
step lands close to the teacher's endpoint, and a few more correct what is left. Only ``ode_solve`` is asked of the
teacher (the capability of ``ddpm``, ``latent_ddpm``, ``flow`` and ``latent_flow``), so every teacher is
distilled the same way.

The student is the teacher's own network (a copy of its UNet or DiT, starting from the teacher's weights, as
progressive and consistency distillation start), read as a velocity on the straight path:

- a flow teacher's network already predicts that velocity: v = net(x_s, 1000 s, y);
- a DDPM teacher's network predicts eps, v or x_0 at a timestep t of its schedule: x_s is the variance-preserving
  x_t = x_s / sqrt((1 - s)^2 + s^2) at the continuous t whose signal-to-noise ratio is ((1 - s) / s)^2
  (interpolated in log-SNR between the schedule's timesteps), and the (eps, x_0) its output stands for gives
  v = eps - x_0. An Euler step of that velocity is exactly a DDIM step, so before training the student samples
  as the unguided teacher does under DDIM.

Guidance is distilled, not applied: the pairs are drawn with the teacher's guidance (``model.guidance``, default the
teacher's own sampling guidance), and the student draws a guided image in one pass per step (``--label`` chooses
the class; ``--guidance`` is refused). The teacher is a frozen parent (``genai_cli/lineage.py``): embedded in the
student's checkpoints, out of its parameters and optimizer, so a student samples after the teacher's run is gone.

The pairs are drawn before the first step (``prepare``, logged with their cost) from ``model.pair_seed``, and drawn
again from the same seed when a run resumes (the ODE is deterministic): they are never stored. The last
``held_out`` of them are not trained on: validation reports the student's endpoint error on them at 1, 2 and 4 steps
(``endpoint_mse_1`` ...), in model space, against the teacher's.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..capabilities import has
from ..errors import GenaiError
from ..hardware import resolve_precision
from ..registry import register_model
from .base import GenerativeModel, ImageSpec, RunRef, run_ref
from .diffusion import DDPM, build_backbone
from .flow import TIME_SCALE, Flow
from .latent_diffusion import LatentSpace

TEACHERS = ("ddpm", "latent_ddpm", "flow", "latent_flow")  # families with ode_solve whose network it reads
PAIR_CHUNK = 256  # pairs the teacher solves at once
REPORTED_STEPS = (1, 2, 4)  # the step counts validation reports the endpoint error at


@dataclass
class Config:
    teacher: RunRef = run_ref(accepts=TEACHERS)  # the run to distil: a run name, run folder or checkpoint
    pairs: int = 4096  # (noise, endpoint) pairs drawn from the teacher's ODE before the first step
    held_out: int = 256  # of them, kept out of training: validation's endpoint error
    pair_seed: int = 0  # the pairs' noise: the same pairs again on a resume
    guidance: float | None = None  # the teacher's guidance to distil (None: the teacher's sampling default)
    teacher_sampler: str | None = None  # the teacher's ODE solver (None: its default; ddpm's becomes dpm++2m)
    teacher_steps: int | None = None  # the teacher's steps (None: its default)
    steps: int = 2  # the student's sampling steps when --steps is not given
    # Where on the path training looks: a grid_share of each batch at the start points of the 1-, 2- and 4-step
    # Euler samplers (s = 1, 3/4, 1/2, 1/4: where sampling evaluates the network), the rest s ~ U(0, 1).
    grid_share: float = 0.5
    grid_steps: list[int] = field(default_factory=lambda: list(REPORTED_STEPS))
    init: Literal["teacher", "scratch"] = "teacher"  # the student's weights: the teacher's, or a fresh network


@register_model("distill", "A few-step student of a ddpm/flow run (reflow on its ODE's pairs); model.teacher: RUN")
class Distill(GenerativeModel):
    """A copy of the teacher's network trained on the teacher's ODE pairs, sampled in a few Euler steps."""

    Config = Config
    tiny = {"pairs": 24, "held_out": 8, "teacher_steps": 2}
    sample_options = frozenset({"steps", "labels"})
    capabilities = frozenset({"prepare"})

    def __init__(self, config: Config, spec: ImageSpec, parents):
        super().__init__(config, spec, parents)
        teacher = self.teacher
        if not has(teacher, "ode_solve"):  # the run_ref's families all have it; a checkpoint edited by hand may not
            raise GenaiError(f"model.teacher: a {type(teacher).__name__} run has no probability-flow ODE to distil; "
                             f"expected a run of family {' or '.join(TEACHERS)}")
        if not isinstance(teacher, (DDPM, Flow)):
            raise GenaiError(f"model.teacher: distill reads the network of a ddpm or flow run (and their latent "
                             f"variants), not of a {type(teacher).__name__}")
        if not 2 <= config.pairs or not 1 <= config.held_out < config.pairs:
            raise GenaiError(f"model.pairs ({config.pairs}) must exceed model.held_out ({config.held_out}) and "
                             f"held_out must be >= 1; e.g. pairs: 4096, held_out: 256")
        if not 0.0 <= config.grid_share <= 1.0:
            raise GenaiError(f"model.grid_share must be in [0, 1], got {config.grid_share}")
        if not config.grid_steps or any(k < 1 for k in config.grid_steps):
            raise GenaiError(f"model.grid_steps must be step counts >= 1, got {config.grid_steps}; e.g. [1, 2, 4]")
        # The Euler samplers' evaluation times s, fixed by the config: worked out once, not at every training step.
        self.grid_times = tuple(sorted({1 - i / k for k in config.grid_steps for i in range(k)}))
        if config.steps < 1:
            raise GenaiError(f"model.steps must be >= 1, got {config.steps}; the student samples in 1, 2 or 4")
        if config.guidance is not None and not teacher.conditional:
            raise GenaiError("model.guidance distils a guided teacher, but the teacher run is not class-conditional; "
                             "drop model.guidance")
        # The teacher options are checked by the teacher's ode_solve when the pairs are drawn, before the first step.
        # The teacher's backbone (UNet or DiT; "unet" whichever it is, as the teachers name it), trainable.
        if config.init == "teacher":
            self.unet = copy.deepcopy(teacher.unet).requires_grad_(True).train()
        elif config.init == "scratch":
            self.unet = build_backbone(teacher.config, teacher.model_shape,
                                       spec.num_classes if teacher.conditional else 0)
        else:
            raise GenaiError(f"unknown model.init '{config.init}'; valid: teacher, scratch")
        if isinstance(teacher, DDPM):
            abar = teacher.schedule.alphas_cumprod.double()
            # log-SNR of timesteps 0..T-1, decreasing in t; kept as a buffer so it follows .to(device).
            self.register_buffer("teacher_log_snr", (abar / (1 - abar)).log().float(), persistent=False)
        self._pairs = _PairStore()  # not weights: drawn again from pair_seed, shared with the EMA copy

    # -- the teacher ------------------------------------------------------------------------------
    @property
    def teacher(self):
        return self.parents["teacher"]

    @property
    def conditional(self) -> bool:
        return self.teacher.conditional

    @property
    def teacher_options(self) -> dict[str, Any]:
        cfg = self.config
        options = {"sampler": cfg.teacher_sampler, "steps": cfg.teacher_steps, "guidance": cfg.guidance}
        return {k: v for k, v in options.items() if v is not None}

    def draw_pairs(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The teacher's (noise, endpoint, labels) pairs, (N, *model_shape) twice and (N,) or None: the noise from
        ``pair_seed``, the endpoints by ``teacher.ode_solve`` in chunks, under the precision this machine samples in
        (as ``genai sample`` draws the teacher). Deterministic: a resumed run draws the same pairs."""
        cfg, teacher, device = self.config, self.teacher, self.device
        g = torch.Generator(device).manual_seed(cfg.pair_seed)
        noise = torch.randn((cfg.pairs, *teacher.model_shape), generator=g, device=device)
        labels = torch.arange(cfg.pairs, device=device) % self.spec.num_classes if self.conditional else None
        precision = resolve_precision("auto", device)
        ends = []
        with torch.no_grad(), precision.autocast(device):
            for i in range(0, cfg.pairs, PAIR_CHUNK):
                chunk_labels = None if labels is None else labels[i:i + PAIR_CHUNK]
                try:
                    end = teacher.ode_solve(noise[i:i + PAIR_CHUNK], labels=chunk_labels, **self.teacher_options)
                except GenaiError as e:
                    raise GenaiError(f"model.teacher_sampler / teacher_steps / guidance: {e}") from None
                ends.append(end.float())
        return noise, torch.cat(ends), labels

    @property
    def pairs(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(noise, endpoints, labels), drawn on first use (``prepare``, or the first step of a resumed run)."""
        if self._pairs.value is None or self._pairs.value[0].device != self.device:
            self._pairs.value = self.draw_pairs()
        return self._pairs.value

    @torch.no_grad()
    def prepare(self, train_images: Tensor) -> dict[str, float]:
        """Draws the pairs before the first step (the images are not needed: the teacher's ODE is the data), and
        returns what they cost for the run's log."""
        start, cpu = time.perf_counter(), time.process_time()
        self._pairs.value = None
        noise, ends, _ = self.pairs
        return {"pairs": noise.shape[0], "pair_seconds": time.perf_counter() - start,
                "pair_cpu_seconds": time.process_time() - cpu, "pair_endpoint_std": float(ends.std())}

    # -- the student's velocity on the straight path -----------------------------------------------------
    def velocity(self, x: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        """v_theta(x_s, s) (B, *model_shape), float32, for s (B,) in [0, 1]: the student's network read as dx_s/ds on
        x_s = (1 - s) x_0 + s eps (see the module's docstring for a DDPM teacher's conversion)."""
        if isinstance(self.teacher, Flow):  # a flow network: the velocity itself, time scaled as flow's
            return self.unet(x, s * TIME_SCALE, labels).float()
        log_snr = self.teacher_log_snr
        # Clamp s to the schedule's range (t = 0..T-1), so that both the time and the conversion stay finite.
        lo, hi = (1 / (1 + (log_snr[0] / 2).exp())), (1 / (1 + (log_snr[-1] / 2).exp()))  # s where SNR = table's
        s = s.float().clamp(float(lo), float(hi))
        a, b = 1 - s, s
        norm = (a * a + b * b).sqrt()
        a, b = (a / norm).view(-1, *[1] * (x.dim() - 1)), (b / norm).view(-1, *[1] * (x.dim() - 1))
        t = _continuous_timestep(log_snr, 2 * ((1 - s) / s).log())
        x_vp = x / norm.view_as(a)  # (B, *shape): the variance-preserving x_t with alpha = a, sigma = b
        out = self.unet(x_vp, t, labels).float()
        prediction = self.teacher.config.prediction
        if prediction == "v":  # Salimans & Ho sec. 4: x_0 = a x_t - b v, eps = b x_t + a v
            eps, x0 = b * x_vp + a * out, a * x_vp - b * out
        elif prediction == "eps":
            eps, x0 = out, (x_vp - b * out) / a
        else:
            eps, x0 = (x_vp - a * out) / b, out
        return eps - x0

    def loss(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Reflow on the teacher's pairs: a batch of pairs (as many as the loop's batch), s from ``_draw_s``, the
        squared error of the velocity against eps - x_0 (the straight path's, Liu et al. eq. 1)."""
        noise, ends, labels = self.pairs
        n_train = noise.shape[0] - self.config.held_out
        b = batch[0].shape[0]
        idx = torch.randint(0, n_train, (b,), device=noise.device)
        eps, x0 = noise[idx], ends[idx]
        y = None if labels is None else labels[idx]
        s = self._draw_s(b, noise.device)
        sv = s.view(-1, *[1] * (x0.dim() - 1))
        x_s = (1 - sv) * x0 + sv * eps
        v = self.velocity(x_s, s, y)
        return {"loss": ((v - (eps - x0)) ** 2).mean()}

    def _draw_s(self, b: int, device) -> Tensor:
        """(b,) times: a grid_share of them at the Euler samplers' evaluation points, the rest uniform."""
        s = torch.rand(b, device=device)
        on_grid = torch.rand(b, device=device) < self.config.grid_share
        times = torch.tensor(self.grid_times, device=device)
        pick = times[torch.randint(0, len(times), (b,), device=device)]
        return torch.where(on_grid, pick, s)

    @torch.no_grad()
    def validation_metrics(self, batches) -> dict[str, float]:
        """The loss over the validation batches, and the student's endpoint error on the held-out pairs at 1, 2 and
        4 steps: mean squared distance to the teacher's endpoint per number, in model space."""
        metrics = super().validation_metrics(batches)
        noise, ends, labels = self.pairs
        held = slice(noise.shape[0] - self.config.held_out, None)
        for k in REPORTED_STEPS:
            x = self.solve(noise[held], None if labels is None else labels[held], k)
            metrics[f"endpoint_mse_{k}"] = float(((x - ends[held]) ** 2).mean())
        return metrics

    # -- sampling -------------------------------------------------------------------------------
    def solve(self, noise: Tensor, labels: Tensor | None, steps: int) -> Tensor:
        """x_0 (B, *model_shape) from x_1 = ``noise`` by ``steps`` equal Euler steps of the student's velocity."""
        was_training = self.training
        self.eval()
        try:
            x = noise.float()
            grid = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
            for s, s_next in zip(grid[:-1], grid[1:], strict=True):
                x = x + (s_next - s) * self.velocity(x, s.expand(x.shape[0]), labels)
            return x
        finally:
            self.train(was_training)

    def check_sample_options(self, options) -> None:
        steps = options.get("steps")
        if steps is not None and steps < 1:
            raise GenaiError(f"steps must be >= 1, got {steps}; a distilled student samples in 1, 2 or 4")

    def network_evaluations(self, options) -> int:
        steps = options.get("steps") or self.config.steps
        return steps + (1 if isinstance(self.teacher, LatentSpace) else 0)  # a latent teacher decodes once

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, steps: int | None = None,
               labels=None) -> Tensor:
        """n images (n, C, H, W) in [0, 1] in ``steps`` Euler steps (default ``model.steps``). labels: as DDPM's
        (default: class i % K), for a conditional teacher; the guidance is the distilled one."""
        self.check_sample_options({"steps": steps})
        labels = self.class_labels(labels, n)
        noise = torch.randn((n, *self.teacher.model_shape), generator=generator, device=self.device)
        return self.teacher.from_model_space(self.solve(noise, labels, steps or self.config.steps))


class _PairStore:
    """Holds the pairs; ``copy.deepcopy`` (the loop's EMA copy of the model) shares it instead of copying them, so the
    EMA model validates on the very pairs, drawn once."""

    value: tuple[Tensor, Tensor, Tensor | None] | None = None

    def __deepcopy__(self, memo) -> _PairStore:
        return self


def _continuous_timestep(log_snr: Tensor, target: Tensor) -> Tensor:
    """(B,) float timesteps t in [0, T-1] where the schedule's log-SNR (``log_snr`` (T,), decreasing) equals
    ``target`` (B,), linearly interpolated between neighbouring timesteps (the UNet's sinusoidal time features take
    a real t)."""
    increasing = -log_snr  # (T,)
    j = torch.searchsorted(increasing, -target.contiguous()).clamp(1, log_snr.shape[0] - 1)  # (B,)
    lo, hi = increasing[j - 1], increasing[j]
    frac = ((-target - lo) / (hi - lo)).clamp(0, 1)
    return (j - 1).float() + frac

