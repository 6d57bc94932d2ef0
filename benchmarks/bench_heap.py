"""Training steps with the heap kept (``hardware.keep_freed_memory``) against glibc's default, family by family.

    python benchmarks/bench_heap.py [--steps 30] [--warmup 5] [--rounds 3] [--threads 1] [--only ARM ...]

glibc's malloc gives the top of its heap back to the kernel once a few MiB there are free, and a training step
that frees its activations at its end faults them in again, page by page, at the next. The toolkit's training
process keeps them (``genai_cli/hardware.py``); ``GENAI_KEEP_FREED_MEMORY=0`` restores glibc's default. Each arm
is the Trainer of a bundled config (the latent arms: the scaling study's DiT-B and UNet-M, bf16 where the CPU has
it natively, on a spatial autoencoder trained here for a few seconds), run for --warmup + --steps steps in a
process of its own per setting (glibc's default adapts as a process runs: it cannot be restored in one), the two
settings alternating for --rounds rounds. Per step, over the --steps after the warm-up: milliseconds of process
CPU time (user + kernel), minor page faults, and the kernel's share; the table gives the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench_common import ROOT, RUNS, log, machine, markdown
from bench_latent import AUTOENCODER, LATENT, QUIET_SCHEDULES, train_for
from rich.console import Console

from genai_cli.config import load_config
from genai_cli.data import load_data
from genai_cli.hardware import HEAP_ENV, cpu_native_bf16
from genai_cli.runs import new_run
from genai_cli.train import Trainer

AE_RUN = "bench-heap-ae"
LATENT_ARM = ["model.autoencoder={ae}", "train.min_lr_ratio=1.0", "train.precision={bf16}"]
ARMS = {  # name: (config, overrides)
    "ddpm (quickstart)": ("configs/quickstart.yaml", []),
    "latent DiT-B": (LATENT, [*LATENT_ARM, "model.backbone=dit", "model.size=B"]),
    "latent UNet-M": (LATENT, [*LATENT_ARM, "model.backbone=unet", "model.size=M"]),
    "gpt_char": ("configs/gpt_char.yaml", []),
    "pixelcnn_mnist": ("configs/pixelcnn_mnist.yaml", []),
    "vae_mnist": ("configs/vae_mnist.yaml", []),
    "dcgan_mnist": ("configs/dcgan_mnist.yaml", []),
}


class CountingTrainer(Trainer):
    """The toolkit's Trainer that reads this process's CPU time and page faults after the warm-up and at the end."""

    def __init__(self, *args, warmup: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.warmup = warmup
        self.marks: list[tuple[float, int, float]] = []

    def after_step(self, logs, reporter, rate) -> None:
        if self.step in (self.warmup, self.total_steps):
            use = resource.getrusage(resource.RUSAGE_SELF)
            self.marks.append((time.process_time(), use.ru_minflt, use.ru_stime))
        super().after_step(logs, reporter, rate)


def child(args) -> None:
    """One arm, one setting (this process's environment): JSON of ms, faults and kernel ms per step on stdout."""
    config, overrides = ARMS[args.child]
    fill = {"ae": RUNS / AE_RUN, "bf16": "bf16" if cpu_native_bf16() else "fp32"}
    cfg = load_config(ROOT / config, [*QUIET_SCHEDULES, *(o.format(**fill) for o in overrides),
                                      f"train.max_steps={args.warmup + args.steps}"])
    run = new_run(RUNS, "bench-heap", "bench-heap", force=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    trainer = CountingTrainer(cfg, run, quiet=True, warmup=args.warmup, console=Console(stderr=True))
    trainer.fit()
    (t0, f0, s0), (t1, f1, s1) = trainer.marks
    print(json.dumps({"ms": (t1 - t0) * 1000 / args.steps, "faults": (f1 - f0) / args.steps,
                      "kernel_ms": (s1 - s0) * 1000 / args.steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=list(ARMS), choices=list(ARMS), metavar="ARM")
    parser.add_argument("--child", choices=list(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        return child(args)
    if not (RUNS / AE_RUN / "checkpoints" / "last.pt").exists() and any("latent" in a for a in args.only):
        log(f"autoencoder for the latent arms: {AUTOENCODER}, 5 CPU s")
        train_for(AUTOENCODER, 5.0, load_data(load_config(ROOT / AUTOENCODER).data), AE_RUN)
    env = {k: v for k, v in os.environ.items() if k != HEAP_ENV}
    env.update(OMP_NUM_THREADS=str(args.threads), GENAI_PRECISION_PROBE="0")  # no start-up timing of threads
    settings = {"glibc default": {**env, HEAP_ENV: "0"}, "heap kept": env}
    results: dict[tuple[str, str], list[dict]] = {}
    for arm in args.only:
        for r in range(args.rounds):
            for name, setting in settings.items():
                out = subprocess.run([sys.executable, __file__, "--child", arm, "--steps", str(args.steps),
                                      "--warmup", str(args.warmup), "--threads", str(args.threads)],
                                     env=setting, capture_output=True, text=True, check=True)
                results.setdefault((arm, name), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                log(f"{arm}, {name}, round {r + 1}: {results[arm, name][-1]}")
    rows = []
    for arm in args.only:
        med = {name: {k: statistics.median(m[k] for m in results[arm, name]) for k in ("ms", "faults", "kernel_ms")}
               for name in settings}
        d, k = med["glibc default"], med["heap kept"]
        rows.append([arm, f"{d['ms']:.1f}", f"{d['faults']:,.0f}", f"{d['kernel_ms']:.1f}", f"{k['ms']:.1f}",
                     f"{k['faults']:,.0f}", f"{k['kernel_ms']:.1f}", f"{d['ms'] / k['ms']:.2f}x"])
    print(f"\nTraining steps, glibc's default heap against the heap kept: per step, median of {args.rounds} rounds of "
          f"{args.steps} steps after {args.warmup}; {machine()}\n")
    print(markdown(["arm", "ms, default", "page faults", "kernel ms", "ms, kept", "page faults", "kernel ms",
                    "steps per CPU-s"], rows, right=set(range(1, 8))))


if __name__ == "__main__":
    main()
