"""Every family on the same footing: a fixed CPU budget of training on mnist5k, then ``genai evaluate``'s metrics.

    python benchmarks/bench_families.py [--budget 120] [--samples 500] [--threads 1] [--configs quickstart vae_mnist]

Each bundled mnist5k config trains through the toolkit's Trainer for ``--budget`` seconds of process CPU time
(``bench_common.BudgetTrainer``: the cosine schedule is planned to end where the budget does), then draws
``--samples`` images with the config's own sampling defaults and is measured against the validation split in
the evaluator network's feature space (one evaluator per image size, trained under benchmarks/runs/ when
missing). The autoregressive configs model binarised digits, so their real set is the binarised validation
split. bits/dim is the family's validation likelihood: exact for the autoregressive families (binary
pixels), the ELBO for the VAE (a continuous decoder: a density, not comparable with the discrete ones).
Prints a markdown table; runs are kept under benchmarks/runs/ (ignored by git).
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_common import ROOT, RUNS, BudgetTrainer, log, machine, markdown

from genai_cli.config import load_config
from genai_cli.evaluation.run import evaluate_run
from genai_cli.runs import new_run

CONFIGS = ["quickstart", "vae_mnist", "autoencoder_mnist", "dcgan_mnist", "cgan_mnist", "pixelcnn_mnist",
           "gated_pixelcnn_mnist", "row_lstm_mnist", "pixel_transformer_mnist", "pixel_lstm_mnist12"]


def train(config: str, budget: float) -> tuple[str, int, float, int]:
    cfg = load_config(ROOT / "configs" / f"{config}.yaml",
                      ["train.max_steps=1000000", "train.eval_every=1000000", "train.sample_every=1000000",
                       "train.checkpoint_every=1000000", "train.log_every=100"])
    RUNS.mkdir(parents=True, exist_ok=True)
    name = f"bench-family-{config}"
    run = new_run(RUNS, name, name, force=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    trainer = BudgetTrainer(cfg, run, quiet=True, budget=budget)
    trainer.fit()
    params = sum(p.numel() for p in trainer.model.parameters())
    return str(run), trainer.step, trainer.cpu_used, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="CPU seconds of training per config")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, results = [], {}
    for config in args.configs:
        log(f"{config}: training for {args.budget:.0f} CPU s")
        run, steps, used, params = train(config, args.budget)
        r = evaluate_run(run, root=RUNS, n=args.samples, device="cpu", train_missing=True, log=log)
        m = r["metrics"]
        results[config] = {"family": r["family"], "parameters": params, "steps": steps, "cpu_seconds": used, **m}
        bpd = m.get("bits_per_dim")
        rows.append([config, r["family"], f"{params:,}", f"{used:.0f} ({steps} steps)", f"{m['classifier_fid']:.2f}",
                     f"{m['coverage']:.3f}", f"{m['precision']:.3f}", str(m["classes_covered"]),
                     f"{bpd:.4f}" if bpd is not None else "-", f"{m['sample_seconds_per_64']:.2f}"])
        log(f"{config}: classifier-FID {m['classifier_fid']:.2f}")
    (RUNS / "families.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nFamilies on mnist5k, {args.budget:.0f} CPU s of training each, {args.samples} samples, {machine()}\n")
    print(markdown(["config", "family", "parameters", "CPU s (steps)", "classifier-FID", "coverage", "precision",
                    "classes >= 2 %", "bits/dim", "sampling s / 64"], rows, right=set(range(2, 10))))


if __name__ == "__main__":
    main()
