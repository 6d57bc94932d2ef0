"""Sampling speed of the autoregressive families: naive full re-forward per token vs incremental.

    python benchmarks/bench_ar_sampling.py [--size 28] [--n 8] [--threads 1] [--device cpu]

For each family at its default config (binary pixels, K = 2; weights untrained, which does not change
the cost), both samplers draw n images of size x size (784 pixels at 28x28) from the same seed:
  incremental  ``model.sample``: carried LSTM state, key/value cache, or one pixel per layer per token
               (best of three runs);
  naive        ``model.sample_naive``: every token re-runs the forward (over tokens 0..t for the
               sequence models, over the whole image for the convolutional ones).
The naive sampler is first timed on ``--probe`` token positions spread evenly over the image and its
total extrapolated (its cost per token is constant, or linear in t, so the even spread is unbiased);
when that estimate is under ``--full-naive-budget`` seconds the whole naive sampler runs instead and
the two samplers' images are compared. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import genai_cli.models  # noqa: E402,F401  (registers the families)
from genai_cli.hardware import machine_line  # noqa: E402
from genai_cli.models.base import ImageSpec  # noqa: E402
from genai_cli.registry import MODELS  # noqa: E402
from genai_cli.sampling import sample_logits  # noqa: E402

FAMILIES = [("pixel_lstm", {}), ("row_lstm", {}), ("pixelcnn", {}), ("pixelcnn", {"gated": True}),
            ("pixel_transformer", {})]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_estimate(model, tokens: torch.Tensor, probe: int, device: torch.device) -> float:
    """Seconds the naive sampler would take, from ``probe`` evenly spread token positions."""
    t_len = tokens.shape[1]
    positions = torch.linspace(0, t_len - 1, probe).round().long().unique().tolist()
    g = torch.Generator(device).manual_seed(0)
    model.naive_logits(tokens, positions[-1])  # warm-up
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for pos in positions:
            sample_logits(model.naive_logits(tokens, pos), generator=g)
    sync(device)
    return (time.perf_counter() - start) / len(positions) * t_len


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--n", type=int, default=8, help="images per sampling call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe", type=int, default=16, help="token positions timed for the naive estimate")
    parser.add_argument("--full-naive-budget", type=float, default=20.0,
                        help="run the whole naive sampler when its estimate is below this many seconds")
    parser.add_argument("--families", nargs="*", default=None, help="subset, e.g. pixel_lstm gated_pixelcnn")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = ImageSpec(channels=1, size=args.size, binary=True)

    rows = []
    for name, extra in FAMILIES:
        label = "gated_pixelcnn" if extra.get("gated") else name
        if args.families and label not in args.families:
            continue
        cls = MODELS.get(name)
        torch.manual_seed(0)
        model = cls(cls.Config(**{"levels": 2, **extra}), spec).to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        gen = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
        model.sample(1, generator=gen())  # warm-up
        runs = [timed(lambda: model.sample(args.n, generator=gen()), device) for _ in range(3)]  # noqa: B023
        fast, t_inc = runs[0][0], min(t for _, t in runs)  # best of three: the cheap side is the noisy one
        tokens = model.tokenize(fast)
        estimate = naive_estimate(model, tokens, args.probe, device)
        if estimate <= args.full_naive_budget:
            slow, t_naive = timed(lambda: model.sample_naive(args.n, generator=gen()), device)  # noqa: B023
            how, same = "measured", "yes" if torch.equal(fast, slow) else "NO"
        else:
            t_naive, how, same = estimate, f"estimated ({args.probe} of {spec.dims} tokens)", "(tests, 8x8)"
        rows.append((label, params, t_naive, how, t_inc, same))
        print(f"{label}: naive {t_naive:.2f}s ({how}), incremental {t_inc:.3f}s", file=sys.stderr, flush=True)

    print(f"\nSampling {args.n} images of {args.size}x{args.size} = {spec.dims} tokens, K = 2, "
          f"{device.type}; {machine_line()}\n")
    print("| family | parameters | naive (s) | naive timing | incremental (s) | ratio | same samples |")
    print("|---|---:|---:|---|---:|---:|---|")
    for label, params, t_naive, how, t_inc, same in rows:
        print(f"| {label} | {params:,} | {t_naive:.2f} | {how} | {t_inc:.3f} | {t_naive / t_inc:.0f}x | {same} |")


if __name__ == "__main__":
    main()
