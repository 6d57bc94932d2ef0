"""Training throughput per precision / compile / memory-layout setting, against the machine's matmul peak.

    python benchmarks/bench_precision.py [--config configs/pixelcnn_mnist.yaml] [--steps 60] [--warmup 5]
                                         [--settings fp32,bf16,fp32+cl,bf16+cl,fp32+compile,bf16+compile]
    python benchmarks/bench_precision.py --attention [--threads 1]   # bf16 attention per kernel and length

1. Peak: the best of several (n x n) @ (n x n) products, fp32 and bf16, in FLOP/s (2 n^3 per product) with
   the threads this process has (torch.get_num_threads()).
2. For each setting, the config's model and data (train.* overridden), the same seed: ``--warmup`` steps
   (which include torch.compile's compile time, reported apart), then ``--steps`` timed steps of the real loop
   (Trainer.train_batch: autocast, backward, clipping, AdamW; the lr schedule set as in fit), timed in
   ``--chunks`` equal chunks. images/s is batch_size * steps / seconds of the fastest chunk: on a machine
   shared with other work, the least disturbed stretch (the peak, too, is the best of several runs).
3. FLOPs of one step (forward + backward) are counted once, eagerly in fp32, by torch.utils.flop_counter;
   "of peak" is FLOP/s reached divided by the peak of the setting's precision.
4. Quality after the same number of steps: the validation metrics of the trained weights (bits/dim for
   likelihood families, the loss otherwise), so a setting that trains faster but worse shows it.
Prints a markdown table. Settings that cannot run here (fp16 without CUDA) are listed with the reason.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from genai_cli.config import load_config  # noqa: E402
from genai_cli.data import load_data  # noqa: E402
from genai_cli.errors import GenaiError  # noqa: E402
from genai_cli.hardware import machine_line, pick_device  # noqa: E402
from genai_cli.train import Trainer, epoch_order, lr_factor  # noqa: E402

SETTINGS = {  # name -> (precision, compile, channels_last)
    "auto": ("auto", False, False),  # what the toolkit picks on this machine (genai_cli/hardware.py)
    "fp32": ("fp32", False, False), "bf16": ("bf16", False, False), "fp16": ("fp16", False, False),
    "fp32+cl": ("fp32", False, True), "bf16+cl": ("bf16", False, True),
    "fp32+compile": ("fp32", True, False), "bf16+compile": ("bf16", True, False),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Bench:
    def __init__(self, config: str, overrides: list[str], data):
        self.config, self.overrides, self.data = config, overrides, data

    def trainer(self, precision: str, compile_: bool, channels_last: bool, steps: int, folder: Path) -> Trainer:
        cfg = load_config(self.config, [*self.overrides, f"train.precision={precision}", f"train.compile={compile_}",
                                        f"train.channels_last={channels_last}", f"train.max_steps={steps}",
                                        "train.ema_decay=null"])
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "samples").mkdir()
        return Trainer(cfg, folder, data=self.data, quiet=True, console=Console(quiet=True))

    @staticmethod
    def step(trainer: Trainer) -> None:
        """One step as Trainer.fit takes it (order, slice, lr schedule), without logs, grids or checkpoints."""
        t = trainer.cfg.train
        epoch, i = divmod(trainer.step, trainer.steps_per_epoch)
        idx = epoch_order(len(trainer.data), t.seed, epoch)[i * t.batch_size:(i + 1) * t.batch_size]
        x, y = trainer.batch(trainer.data.train_x[idx], trainer.data.train_y[idx])
        for opt in trainer.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(trainer.step, t.warmup_steps, trainer.total_steps,
                                                             t.min_lr_ratio)
        trainer.train_batch(x, y)
        trainer.step += 1

    def flops_per_step(self, folder: Path) -> float:
        trainer = self.trainer("fp32", False, False, 1, folder)
        with FlopCounterMode(display=False) as counter:
            self.step(trainer)
        return float(counter.get_total_flops())


def attention_table(lengths: tuple[int, ...] = (49, 64, 128, 196, 256, 400, 784), tokens: int = 12 * 64 * 4,
                    head_dim: int = 32, rounds: int = 3) -> str:
    """Forward + backward of one attention call over ``tokens`` query positions (B = tokens / L sequences of L,
    4 heads) on bf16 inputs, per kernel: what ``hardware.attention`` chose against SDPA's own bf16 kernels.
    ms per call, the median of ``rounds`` alternating calls (``hardware.time_alternating``)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from genai_cli.compare import markdown_table
    from genai_cli.hardware import attention, time_alternating

    def bf16_kernel(backend):
        def run(q, k, v, **options):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, **options)
        return run
    kernels = {"bf16 flash (torch's choice)": bf16_kernel(SDPBackend.FLASH_ATTENTION),
               "bf16 math": bf16_kernel(SDPBackend.MATH), "fp32 flash, cast (hardware.attention)": attention}
    rows = []
    for length in lengths:
        for causal in (False, True):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(max(1, tokens // length), 4, length, head_dim, generator=g, dtype=torch.bfloat16)
                       .requires_grad_() for _ in range(3))

            def call(kernel, q=q, k=k, v=v, causal=causal):
                return lambda: kernel(q, k, v, is_causal=causal).float().sum().backward()
            ms = time_alternating({name: call(kernel) for name, kernel in kernels.items()}, rounds)
            rows.append([str(length), "causal" if causal else "full", *(f"{ms[name]:.1f}" for name in kernels)])
    return markdown_table(["positions", "mask", *(f"{name}, ms" for name in kernels)], rows, right={2, 3, 4})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "pixelcnn_mnist.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set overrides")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--settings", default="auto,fp32,bf16,fp16,fp32+cl,bf16+cl,fp32+compile,bf16+compile")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention", action="store_true", help="only the attention kernels' table: forward + "
                        "backward of bf16 attention per kernel and sequence length")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention:
        print(f"# bf16 attention, forward + backward, 3072 query positions, 4 heads of 32; {machine_line()}\n")
        print(attention_table())
        return
    overrides = [f"train.device={args.device}", *args.overrides]
    cfg = load_config(args.config, overrides)
    data = load_data(cfg.data)
    bench = Bench(args.config, overrides, data)
    device = pick_device(cfg.train.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if device.type != "cuda":
        del dtypes["fp16"]
    peaks = {p: matmul_peak(dt, device, args.matmul_size) for p, dt in dtypes.items()}
    print(f"# {Path(args.config).name}: {cfg.family}, batch {cfg.train.batch_size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up; device {device}; {machine_line()}\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        flops = bench.flops_per_step(Path(tmp) / "flops")
        for name in args.settings.split(","):
            precision, compile_, channels_last = SETTINGS[name]
            folder = Path(tmp) / name
            try:
                trainer = bench.trainer(precision, compile_, channels_last, args.warmup + args.steps, folder)
            except GenaiError as e:
                rows.append((name, None, None, None, str(e)))
                continue
            start = time.perf_counter()
            for _ in range(args.warmup):
                bench.step(trainer)
            sync(trainer.device)
            warm = time.perf_counter() - start
            per_chunk = max(1, args.steps // args.chunks)
            seconds = float("inf")
            for _ in range(args.chunks):
                start = time.perf_counter()
                for _ in range(per_chunk):
                    bench.step(trainer)
                sync(trainer.device)
                seconds = min(seconds, (time.perf_counter() - start) / per_chunk)  # per step
            val = trainer.validate()
            quality = ", ".join(f"{k[4:]} {val[k]:.4f}" for k in ("val_bits_per_dim", "val_loss") if k in val)
            ran = trainer.precision.resolved  # auto's choice on this machine
            if name == "auto":
                name = f"auto -> {trainer.precision.describe()}"
            rows.append((name, ran, seconds, warm if compile_ else 0.0, quality))
            print(f"{name}: {1000 * seconds:.0f} ms/step", file=sys.stderr, flush=True)
    # The peak again after the runs: on a shared machine the better of the two is the machine's.
    peaks = {p: max(v, matmul_peak(dtypes[p], device, args.matmul_size)) for p, v in peaks.items()}
    print(f"matmul peak (n = {args.matmul_size}): "
          + ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in peaks.items()) + "\n")
    print(f"one training step (forward + backward): {flops / 1e9:.2f} GFLOP\n")
    print("| setting | images/s | step ms | GFLOP/s | of peak | compile s | quality after the steps |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, precision, seconds, warm, quality in rows:
        if seconds is None:
            print(f"| {name} | - | - | - | - | - | cannot run here: {quality} |")
            continue
        rate = flops / seconds
        print(f"| {name} | {cfg.train.batch_size / seconds:.0f} | {1000 * seconds:.0f} | {rate / 1e9:.1f} | "
              f"{rate / peaks[precision]:.1%} | {warm:.0f} | {quality} |")


if __name__ == "__main__":
    main()
