"""Masked prediction (issue 11): MaskGIT and the masked pixel model beside the DDPM and PixelCNN rows, at an equal
CPU budget on mnist5k, and MaskGIT's sampling speed against autoregressive sampling of the same tokens.

    python benchmarks/bench_masked.py [--budget 120] [--samples 500] [--threads 1] [--tokenizer-share 0.35]
    python benchmarks/bench_masked.py --quick      # a few seconds each: checks the script runs
    python benchmarks/bench_masked.py --only maskgit --budget 300   # MaskGIT (+ its tokenizer) and the speed table
    python benchmarks/bench_masked.py --speed-only  # the speed table again, on the runs masked.json names

1. Families. Each entry trains through the toolkit's Trainer for ``--budget`` CPU seconds (``BudgetTrainer``) and
   is measured by ``genai evaluate``'s code (classifier-FID, coverage, bits/dim) on ``--samples`` samples drawn
   with its config's defaults. MaskGIT's budget includes its tokenizer's: the vqvae run trains for
   ``--tokenizer-share`` of it, MaskGIT for the rest. The masked pixel model runs twice, trained on the cosine
   schedule (all mask rates) and on BERT's 15-40 %: its bits/dim is the absorbing-state bound (an upper bound on
   the NLL), beside the exact likelihood of the PixelCNN on the same binarised split.
2. Speed. A causal transformer of MaskGIT's size (the pixel transformer family over the 7x7 token grid, K = the
   tokenizer's codes, with its key/value cache) is trained on the same tokens for as many steps, at the same batch
   size and learning rate, as MaskGIT got; then seconds per 64 images for MaskGIT at 8 and 12 steps and for the
   autoregressive draw (49 tokens one by one), each decoded by the same tokenizer, with their evaluator figures.
   MaskGIT runs at each of ``--variants`` (steps, choice temperature, guidance; guidance 1 is one pass per step,
   as the AR model takes): fewer steps are faster, the question is at what FID. One image alone is timed for
   every row in turn, ``--rounds`` times (median), so that the machine's load hits every sampler alike.
Prints markdown tables; runs are kept under benchmarks/runs/ (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from bench_common import ROOT, RUNS, BudgetTrainer, evaluator_for, log, machine, markdown

from genai_cli.config import load_config
from genai_cli.data import load_data, to_float
from genai_cli.evaluation.run import evaluate_run, sample_quality
from genai_cli.models.transformer import Config as ARConfig
from genai_cli.models.transformer import Transformer
from genai_cli.runs import new_run
from genai_cli.spec import ImageSpec

QUIET_SCHEDULE = ["train.max_steps=1000000", "train.eval_every=1000000", "train.sample_every=1000000",
                  "train.checkpoint_every=1000000", "train.log_every=100"]


def train(name: str, config: str, budget: float, overrides: list[str]) -> tuple[str, BudgetTrainer]:
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", QUIET_SCHEDULE + overrides)
    RUNS.mkdir(parents=True, exist_ok=True)
    run = new_run(RUNS, name, name, force=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    trainer = BudgetTrainer(cfg, run, quiet=True, budget=budget)
    trainer.fit()
    return str(run), trainer


def families(args) -> dict:
    b, share = args.budget, args.tokenizer_share
    entries = [  # (row, [(run name, config, budget, overrides)], schedule note)
        ("ddpm (quickstart)", [("bench-masked-ddpm", "quickstart", b, [])], ""),
        ("pixelcnn", [("bench-masked-pixelcnn", "pixelcnn_mnist", b, [])], "exact"),
        ("masked_pixel, cosine", [("bench-masked-pixel-cosine", "masked_pixel_mnist", b, [])], "bound, all rates"),
        ("masked_pixel, uniform 15-40 %", [("bench-masked-pixel-uniform", "masked_pixel_mnist", b,
                                           ["model.mask_schedule=uniform"])], "bound, 15-40 % only"),
        ("maskgit (+ vqvae)", [("bench-masked-vqvae", "vqvae_mnist", b * share, []),
                               ("bench-masked-maskgit", "maskgit_mnist", b * (1 - share),
                                ["model.tokenizer=bench-masked-vqvae"])], ""),
    ]
    if args.only:
        entries = [e for e in entries if any(word in e[0] for word in args.only)]
    rows, results = [], {}
    for row, stages, note in entries:
        used, steps, params = 0.0, [], 0
        for name, config, budget, overrides in stages:
            log(f"{name}: training {config} for {budget:.0f} CPU s")
            run, trainer = train(name, config, budget, overrides + args.set)
            used += trainer.cpu_used
            steps.append(str(trainer.step))
            params += sum(p.numel() for p in trainer.model.parameters())
        r = evaluate_run(run, root=RUNS, n=args.samples, device="cpu", train_missing=True, log=log)
        m = r["metrics"]
        results[row] = {"run": run, "cpu_seconds": used, "steps": steps, "parameters": params, **m}
        bpd = m.get("bits_per_dim")
        rows.append([row, f"{params:,}", f"{used:.0f} ({' + '.join(steps)} steps)", f"{m['classifier_fid']:.2f}",
                     f"{m['coverage']:.3f}", f"{m['precision']:.3f}", str(m["classes_covered"]),
                     f"{bpd:.4f} ({note})" if bpd is not None else "-", f"{m['sample_seconds_per_64']:.2f}"])
        log(f"{row}: classifier-FID {m['classifier_fid']:.2f}")
    print(f"\nMasked families beside DDPM and PixelCNN on mnist5k, {b:.0f} CPU s of training each (MaskGIT: vqvae "
          f"{share:.0%} + maskgit {1 - share:.0%}), {args.samples} samples, {machine()}\n")
    print(markdown(["entry", "parameters", "CPU s (steps)", "classifier-FID", "coverage", "precision",
                    "classes >= 2 %", "bits/dim", "sampling s / 64"], rows))
    return results


def token_images(tokens: torch.Tensor, k: int, grid: tuple[int, int]) -> torch.Tensor:
    """(N, h * w) token ids -> (N, 1, h, w) 'images' id / (K - 1), which the pixel transformer quantises back to ids."""
    return tokens.view(-1, 1, *grid).float() / (k - 1)


def speed(args, maskgit_run: str, steps: int) -> None:
    from genai_cli.api import load_checkpoint

    maskgit = load_checkpoint(f"{maskgit_run}/checkpoints/last.pt").eval()
    tokenizer = maskgit.parents["tokenizer"]
    k, grid, c = tokenizer.num_codes, tokenizer.token_grid, maskgit.config
    cfg = load_config(ROOT / "configs" / "maskgit_mnist.yaml", args.set)
    data = load_data(cfg.data)
    with torch.no_grad():
        train_tokens = torch.cat([tokenizer.tokenize(to_float(data.train_x[i:i + 500]))
                                  for i in range(0, len(data), 500)])
    # The same size as MaskGIT's transformer; unconditional (the class row of MaskGIT is a small extra).
    ar = Transformer(ARConfig(levels=k, d_model=c.d_model, heads=c.heads, layers=c.layers, mlp_ratio=c.mlp_ratio),
                          ImageSpec(1, grid[0]))
    saved = RUNS / "masked-ar.pt"  # the AR model of this MaskGIT run, reused by --speed-only
    # weights_only: tensors, a string and a float, never code from the file
    state = torch.load(saved, weights_only=True) if args.speed_only and saved.exists() else None
    if state is not None and state["maskgit"] == maskgit_run:
        ar.load_state_dict(state["weights"])
        ar_cpu = state["cpu_seconds"]
        log(f"autoregressive token transformer: reused {saved}")
    else:
        opt = torch.optim.AdamW(ar.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        bs, g = cfg.train.batch_size, torch.Generator().manual_seed(0)
        log(f"autoregressive token transformer: {steps} steps on the same tokens")
        t0 = time.process_time()
        for step in range(steps):
            lr = cfg.train.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, len(train_tokens), (bs,), generator=g)
            loss = ar.loss((token_images(train_tokens[idx], k, grid), None))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ar_cpu = time.process_time() - t0
        torch.save({"maskgit": maskgit_run, "weights": ar.state_dict(), "cpu_seconds": ar_cpu}, saved)
    ar.eval()
    evaluator, _, _ = evaluator_for(cfg.data, data.spec)
    n = args.samples
    rows = []

    def measure(name: str, draw, token_passes: int) -> None:
        """Seconds for a batch of 64, then the evaluator figures (one image alone: ``single_image`` below)."""
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            t = time.perf_counter()
            draw(64, g)
            per64 = time.perf_counter() - t
            images = torch.cat([draw(min(250, n - i), g) for i in range(0, n, 250)])
        q = sample_quality(evaluator, data, images.clamp(0, 1), torch.device("cpu"))
        rows.append([name, per64, draw, token_passes, q, images[:64]])
        log(f"{name}: {per64:.3f} s / 64, classifier-FID {q['classifier_fid']:.2f}")

    def ar_draw(m, g, naive=False):
        fn = ar.sample_naive if naive else ar.sample
        ids = torch.floor(fn(m, generator=g).view(m, -1) * (k - 1) + 0.5).long()
        return tokenizer.detokenize(ids)

    n_tok = grid[0] * grid[1]
    measure(f"autoregressive, key/value cache ({n_tok} steps)", ar_draw, n_tok)
    measure(f"autoregressive, no cache ({n_tok} steps)", lambda m, g: ar_draw(m, g, naive=True),
            n_tok * (n_tok + 1) // 2)
    for variant in args.variants:  # steps:choice temperature:guidance[:temperature] (guided: 2 rows per pass)
        s, ct, w, temp = (variant + ":1").split(":")[:4]
        s, ct, w, temp = int(s), float(ct), float(w), float(temp)
        measure(f"maskgit, {s} steps, choice temperature {ct:g}, guidance {w:g}"
                + (f", temperature {temp:g}" if temp != 1 else ""),
                lambda m, g, s=s, ct=ct, w=w, temp=temp: maskgit.sample(m, generator=g, steps=s, guidance=w,
                                                                        choice_temperature=ct, temperature=temp),
                s * n_tok * (1 if w == 1 else 2))
    # One image alone, every sampler in turn for args.rounds rounds (the load hits all alike), median round.
    single = {i: [] for i in range(len(rows))}
    for r in range(args.rounds):
        for i, row in enumerate(rows):
            g = torch.Generator().manual_seed(r)
            with torch.no_grad():
                t = time.perf_counter()
                row[2](1, g)
                single[i].append(time.perf_counter() - t)
    for i, row in enumerate(rows):
        row[2] = sorted(single[i])[len(single[i]) // 2]
    ref64, ref1 = rows[0][1], rows[0][2]
    from genai_cli.runs import save_grid

    for i, row in enumerate(rows):
        save_grid(row[5], RUNS / f"masked-speed-{i}.png", nrow=8)
    print(f"\nSampling the same {grid[0]}x{grid[1]} tokens of {k} codes (after {steps} training steps each; the AR "
          f"model trained {ar_cpu:.0f} CPU s), decoded by the same tokenizer; {n} samples for the evaluator figures; "
          f"{machine()}\n")
    print(markdown(["sampler", "token-passes / image", "s / 64 images", "speed-up vs cached AR", "s / 1 image",
                    "speed-up (1 image)", "classifier-FID", "coverage", "grid"],
                   [[r[0], str(r[3]), f"{r[1]:.3f}", f"{ref64 / r[1]:.2f}x", f"{r[2]:.4f}", f"{ref1 / r[2]:.2f}x",
                     f"{r[4]['classifier_fid']:.2f}", f"{r[4]['coverage']:.3f}",
                     f"benchmarks/runs/masked-speed-{i}.png"] for i, r in enumerate(rows)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="CPU seconds of training per entry")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokenizer-share", type=float, default=0.35)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for every entry")
    parser.add_argument("--only", nargs="*", default=[], help="train only the entries whose name holds a word")
    parser.add_argument("--speed-only", action="store_true", help="no training: the speed table of masked.json's "
                        "MaskGIT run")
    parser.add_argument("--variants", nargs="*", default=["12:4.5:1", "8:4.5:1", "4:4.5:1", "4:2:1", "12:4.5:2",
                                                           "4:4.5:2", "4:2:2", "4:2:3"],
                        help="MaskGIT rows of the speed table, steps:choice temperature:guidance[:temperature]")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds of the one-image timings")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: check that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.budget, args.samples = 6.0, 100
    torch.set_num_threads(args.threads)
    if args.speed_only:
        results = json.loads((RUNS / "masked.json").read_text())
    else:
        results = families(args)
        (RUNS / "masked.json").write_text(json.dumps(results, indent=2, default=float))
    mg = results["maskgit (+ vqvae)"]
    speed(args, mg["run"], int(mg["steps"][-1]))


if __name__ == "__main__":
    main()
