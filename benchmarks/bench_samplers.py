"""Samplers of the demo's DDPM: quality and seconds per 64 images at each step count, and the same network
size in diffusers sampled with its DDIM (issue 9, section 3).

    python benchmarks/bench_samplers.py [--run RUN] [--samples 1000] [--threads 2]
        [--grid ddim:10,25,50 dpm++2m:10,15,20 heun:10,20] [--peer-steps 50]

RUN is a trained DDPM run (default: benchmarks/runs/quickstart, trained there first with configs/quickstart.yaml
when missing). Every row draws ``--samples`` images from the same seed with the run's sampling defaults (labels
and guidance of a class-conditional run) but the row's sampler and steps, and is judged in the toolkit's
evaluator (the mnist5k classifier): classifier-FID, coverage, share classified with p >= 0.9, classes present.

The peer row times diffusers' ``UNet2DModel`` + ``DDIMScheduler`` on a network of the same widths, depth and
parameter count as the run's UNet (untrained: the time of a sampling loop does not depend on the weights),
against our DDIM at the same steps, batch and guidance-free forward passes: the ratio is ours/peer seconds.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import RUNS, evaluator_for, log, machine, markdown, peer_unet

from genai_cli.api import model_from_state
from genai_cli.config import from_dict, load_config
from genai_cli.data import load_data
from genai_cli.evaluation.run import draw_samples, sample_quality
from genai_cli.runs import load_checkpoint_file, resolve_checkpoint
from genai_cli.session import start_run

CHUNK = 250  # images per sample() call, as genai evaluate draws them


def trained_run(ref: str | None):
    if ref is not None:
        return resolve_checkpoint(ref, RUNS)
    ckpt = RUNS / "quickstart" / "checkpoints" / "last.pt"
    if not ckpt.exists():
        log("training configs/quickstart.yaml under benchmarks/runs/quickstart (the demo's run)")
        cfg = load_config(RUNS.parent.parent / "configs" / "quickstart.yaml")
        start_run(cfg, RUNS, name="quickstart", force=True, quiet=True).fit()
    return ckpt


@torch.no_grad()
def time_peer(unet, n: int, steps: int, seed: int) -> float:
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for i in range(0, n, CHUNK):
        x = torch.randn((min(CHUNK, n - i), 1, 28, 28), generator=g)
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", nargs="*", default=["ddim:10,25,50", "dpm++2m:10,15,20", "heun:10,20"])
    parser.add_argument("--peer-steps", type=int, default=50)
    parser.add_argument("--peer-samples", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")

    ckpt = trained_run(args.run)
    state = load_checkpoint_file(ckpt)
    model = model_from_state(state).to(cpu)
    cfg = from_dict(state["config"], source=str(ckpt))
    data = load_data(cfg.data)
    evaluator, accuracy, _ = evaluator_for(cfg.data, data.spec)
    base = cfg.sample.options()
    rows = []
    for entry in args.grid:
        sampler, counts = entry.split(":")
        for steps in (int(s) for s in counts.split(",")):
            options = {**base, "sampler": sampler, "steps": steps}
            fake, secs = draw_samples(model, args.samples, args.seed, options, cpu)
            q = sample_quality(evaluator, data, fake, cpu, args.seed)
            classes = sum(1 for c in q["class_histogram"] if c > 0)
            log(f"{sampler} {steps}: {secs / args.samples * 64:.2f} s/64, FID {q['classifier_fid']:.2f}, "
                f"confident {q['confident_share']:.3f}")
            rows.append([sampler, str(steps), f"{secs / args.samples * 64:.2f}", f"{q['classifier_fid']:.2f}",
                         f"{q['coverage']:.3f}", f"{q['confident_share']:.3f}", str(classes)])

    # Speed against the peer: the same network size, DDIM at the same steps, unguided, the same batch.
    peer = peer_unet(model.unet).eval()
    ours_params = sum(p.numel() for p in model.unet.parameters())
    peer_params = sum(p.numel() for p in peer.parameters())
    plain = {"sampler": "ddim", "steps": args.peer_steps}
    if getattr(model, "conditional", False):
        plain["guidance"] = 1.0  # one forward pass per step, as the peer
    timings = {"ours": [], "peer": []}
    for _ in range(2):  # alternate, so a neighbour's load falls on both
        _, secs = draw_samples(model, args.peer_samples, args.seed, plain, cpu)
        timings["ours"].append(secs)
        timings["peer"].append(time_peer(peer, args.peer_samples, args.peer_steps, args.seed))
    ours_s, peer_s = min(timings["ours"]), min(timings["peer"])

    print(f"\nSamplers of {ckpt} (step {state['step']}), {args.samples} samples each, evaluator accuracy "
          f"{accuracy:.4f}; {machine()}\n")
    print(markdown(["sampler", "steps", "s / 64 images", "classifier-FID", "coverage", "p >= 0.9", "classes"], rows,
                   right={1, 2, 3, 4, 5, 6}))
    print(f"\nDDIM-{args.peer_steps}, {args.peer_samples} images in chunks of {CHUNK}, no guidance (best of 2):\n")
    print(markdown(["network", "parameters", "s / 64 images", "ours / peer"],
                   [["ours (genai UNet)", f"{ours_params:,}", f"{ours_s / args.peer_samples * 64:.2f}",
                     f"{ours_s / peer_s:.2f}"],
                    ["diffusers UNet2DModel", f"{peer_params:,}", f"{peer_s / args.peer_samples * 64:.2f}", "1.00"]]))


if __name__ == "__main__":
    main()
