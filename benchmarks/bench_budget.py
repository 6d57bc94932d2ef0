"""Train bundled configs for a fixed CPU budget each and tabulate what they reach.

    python benchmarks/bench_budget.py likelihood [--seconds 150]   # issue 3: AR families, binarised mnist5k 28x28
    python benchmarks/bench_budget.py latent [--seconds 120]       # issue 4: AE, VAE (+/- remedies), GANs

Each entry runs the toolkit's own loop (Trainer, the same code as ``genai train``) with
``train.max_seconds`` as the budget, then reads the final validation metrics from the run. Runs are kept
under ``benchmarks/runs/`` (ignored by git) so their grids can be looked at with ``genai sample`` /
``genai inspect``. Prints a markdown table to paste into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genai_cli.config import load_config  # noqa: E402
from genai_cli.runs import new_run  # noqa: E402
from genai_cli.train import Trainer  # noqa: E402

# Published test NLL on binarised MNIST (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", Table 4),
# for context only: they train for days on 60,000 images; we train minutes on 4,500.
PUBLISHED = {"pixelcnn": "81.30", "row_lstm": "80.54"}

SUITES = {
    "likelihood": [  # (name, config, overrides)
        ("pixel_lstm", "pixel_lstm_mnist24.yaml", ["data.image_size=28"]),
        ("row_lstm", "row_lstm_mnist.yaml", []),
        ("pixelcnn", "pixelcnn_mnist.yaml", []),
        ("gated_pixelcnn", "gated_pixelcnn_mnist.yaml", []),
        ("pixel_transformer", "pixel_transformer_mnist.yaml", []),
    ],
    "latent": [
        ("autoencoder", "autoencoder_mnist.yaml", []),
        ("vae", "vae_mnist.yaml", []),
        ("vae_no_remedies", "vae_mnist.yaml", ["model.kl_warmup_steps=0", "model.free_bits=0.0"]),
        ("dcgan", "dcgan_mnist.yaml", []),
        ("dcgan_minibatch", "dcgan_minibatch_mnist.yaml", []),
        ("cgan", "cgan_mnist.yaml", []),
    ],
}

SHOWN = ["loss", "loss_d", "loss_g", "val_loss", "val_nll_nats", "val_bits_per_dim", "val_iwae_nats",
         "val_active_units", "val_kl_total", "val_d_x", "val_d_g_z"]


def run_one(name: str, config: str, overrides: list[str], seconds: float, runs: Path) -> dict:
    cfg = load_config(ROOT / "configs" / config, overrides + [
        f"train.max_seconds={seconds}", "train.max_steps=1000000000", "train.eval_every=1000000000",
        "train.sample_every=1000000000", "train.checkpoint_every=1000000000"])
    run_dir = new_run(runs, name, name, force=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    start = time.perf_counter()
    trainer = Trainer(cfg, run_dir, quiet=True)
    result = trainer.fit()
    return {"name": name, "params": sum(p.numel() for p in trainer.model.parameters()), "steps": result["step"],
            "seconds": time.perf_counter() - start, **{k: result.get(k) for k in SHOWN}}


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--seconds", type=float, default=150.0, help="training budget per entry (CPU seconds)")
    parser.add_argument("--only", default="", help="comma-separated entry names")
    args = parser.parse_args()
    runs = ROOT / "benchmarks" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, config, overrides in SUITES[args.suite]:
        if args.only and name not in args.only.split(","):
            continue
        rows.append(run_one(name, config, overrides, args.seconds, runs))
        print(rows[-1], flush=True)
    cols = ["name", "params", "steps", "seconds"] + [k for k in SHOWN if any(r.get(k) is not None for r in rows)]
    print(f"\nbudget {args.seconds:.0f} s of training per entry, {torch.get_num_threads()} threads\n")
    header = cols + (["published (nats)"] if args.suite == "likelihood" else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [fmt(r[c]) if c != "name" else r[c] for c in cols]
        if args.suite == "likelihood":
            cells.append(PUBLISHED.get(r["name"], "-"))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
