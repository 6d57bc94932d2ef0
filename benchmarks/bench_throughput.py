"""Training throughput: our UNet (DDPM family) against diffusers' UNet2DModel at matched widths, images/s.

    python benchmarks/bench_throughput.py [--batch 64] [--size 28] [--rounds 5] [--steps 3] [--threads 1]
                                         [--compile]

Both networks have widths 32, 64, 64, one ResBlock per level, self-attention in the middle block and 8
GroupNorm groups (1,062,497 parameters each). One training step is the same work on both sides: draw t and
the noise, add it, predict it, MSE, backward, clip the gradient norm at 1, AdamW step.

ours   ``DDPM.train_step`` with the toolkit's ``Stepper``, as the Trainer runs it, in each setting its config
       offers: fp32, ``train.precision: bf16`` (autocast; AVX512-BF16/AMX CPUs run its matmuls and convs
       natively), bf16 + ``train.channels_last``, and with --compile also ``train.compile`` (torch.compile of
       the loss, timed after its first, compiling call).
peer   diffusers' default: fp32, NCHW, eager.
The settings run alternately, ``--steps`` timed steps each per round, after one untimed warm-up step each, so
that a neighbour's load on a shared machine spreads over all of them; the table gives the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from bench_common import log, machine, markdown

from genai_cli.api import create_model
from genai_cli.models.base import Stepper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time train.compile (slow to compile on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler, UNet2DModel

    b, s = args.batch, args.size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 1, s, s, generator=g)
    y = torch.zeros(b, dtype=torch.long)

    class TrainCfg:
        lr, betas, weight_decay = 1e-4, [0.9, 0.999], 0.0

    def ours(precision: str, channels_last: bool = False, compile_loss: bool = False):
        torch.manual_seed(0)
        model = create_model("ddpm", image_size=s, base_channels=32, channel_mults=[1, 2, 2], num_res_blocks=1)
        opts = model.configure_optimizers(TrainCfg)
        stepper = Stepper(grad_clip=1.0, autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
        xb = x
        if channels_last:
            model.to(memory_format=torch.channels_last)
            xb = x.contiguous(memory_format=torch.channels_last)
        if compile_loss:
            from genai_cli.train import LossForward

            model.__dict__["loss"] = torch.compile(LossForward(model))  # what the Trainer routes loss through
        model.train()
        return lambda: model.train_step((xb, y), opts, stepper), sum(p.numel() for p in model.parameters())

    def peer():
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=s, in_channels=1, out_channels=1, layers_per_block=1,
                           block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) * 3,
                           up_block_types=("UpBlock2D",) * 3, norm_num_groups=8).train()
        sched = DDPMScheduler(num_train_timesteps=1000)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

        def step():
            x0 = x * 2 - 1
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (b,))
            loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, sum(p.numel() for p in unet.parameters())

    settings = {"ours fp32": ours("fp32"), "ours bf16": ours("bf16"), "ours bf16 + channels_last": ours("bf16", True)}
    if args.compile:
        settings["ours bf16 + compile"] = ours("bf16", False, True)
    settings["diffusers fp32 (default)"] = peer()
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for name, (step, _) in settings.items():
        t0 = time.perf_counter()
        step()  # warm-up (and compilation)
        log(f"{name}: warm-up {time.perf_counter() - t0:.1f}s")
    for r in range(args.rounds):
        for name, (step, _) in settings.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * b / (time.perf_counter() - t0))
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))

    peer_rate = statistics.median(rates["diffusers fp32 (default)"])
    rows = []
    for name, (_, params) in settings.items():
        med = statistics.median(rates[name])
        rows.append([name, f"{params:,}", f"{med:.1f}", f"{min(rates[name]):.1f}-{max(rates[name]):.1f}",
                     f"{med / peer_rate:.2f}x"])
    best = max((n for n in settings if n.startswith("ours")), key=lambda n: statistics.median(rates[n]))
    ratio = statistics.median(rates[best]) / peer_rate
    print(f"\nTraining throughput, batch {b} of {s}x{s}, {args.rounds} rounds x {args.steps} steps, {machine()}\n")
    print(markdown(["setting", "parameters", "images/s (median)", "range", "vs diffusers"], rows))
    print(f"\nbest: {best}, {ratio:.2f}x diffusers ({'meets' if ratio >= 2 else 'misses'} the target of >= 2x)")


if __name__ == "__main__":
    main()
