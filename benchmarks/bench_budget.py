"""Train bundled configs for a fixed CPU budget each and tabulate what they reach.

    python benchmarks/bench_budget.py likelihood [--seconds 150]   # issue 3: AR families + VAE, binarised mnist5k
    python benchmarks/bench_budget.py latent [--seconds 120]       # issue 4: AE, VAE (+/- remedies), GANs
    python benchmarks/bench_budget.py likelihood --quick           # a few seconds each: checks the script runs

Each entry runs the toolkit's own loop (Trainer, the same code as ``genai train``) with
``train.max_seconds`` as the budget, then reads the final validation metrics from the run. Runs are kept
under ``benchmarks/runs/`` (ignored by git) so their grids can be looked at with ``genai sample`` /
``genai inspect``. Prints a markdown table to paste into benchmarks/README.md.

The likelihood suite runs every entry under both binarisations (``--binarize``): ``threshold`` (at 0.5, what
the bundled configs use) and ``stochastic`` (each training image binarised afresh by Bernoulli draws from its
grey levels at every visit, the validation split drawn once with a fixed seed), the protocol of the published
binarised-MNIST figures, which are shown beside the stochastic rows only.
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
# for context only: they train for days on 60,000 images; we train minutes on 4,500. Their data is the stochastic
# binarisation of Salakhutdinov & Murray 2008 (test digits drawn once), so they sit beside our stochastic rows.
PUBLISHED = {"pixelcnn": "81.30", "row_lstm": "80.54"}

SUITES = {
    "likelihood": [  # (name, config, overrides); each run once per --binarize mode
        ("pixel_lstm", "pixel_lstm_mnist24.yaml", ["data.image_size=28"]),
        ("row_lstm", "row_lstm_mnist.yaml", []),
        ("pixelcnn", "pixelcnn_mnist.yaml", []),
        ("gated_pixelcnn", "gated_pixelcnn_mnist.yaml", []),
        ("pixel_transformer", "pixel_transformer_mnist.yaml", []),
        ("vae", "vae_mnist.yaml", []),  # Bernoulli decoder on binary pixels: the ELBO and IWAE bounds
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


BINARIZE = ("threshold", "stochastic")
QUICK = ["data.limit=256", "train.eval_max_images=64", "train.batch_size=32", "train.sample_n=1"]  # --quick: no figures


def run_one(name: str, config: str, overrides: list[str], seconds: float, runs: Path,
            binarize: str | None = None) -> dict:
    if binarize is not None:
        overrides = [*overrides, f"data.binarize={binarize}"]
        name = f"{name}-{binarize}"
    cfg = load_config(ROOT / "configs" / config, overrides + [
        f"train.max_seconds={seconds}", "train.max_steps=1000000000", "train.eval_every=1000000000",
        "train.sample_every=1000000000", "train.checkpoint_every=1000000000"])
    run_dir = new_run(runs, name, name, force=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    start = time.perf_counter()
    trainer = Trainer(cfg, run_dir, quiet=True)
    result = trainer.fit()
    return {"name": name, "binarize": binarize, "params": sum(p.numel() for p in trainer.model.parameters()),
            "steps": result["step"], "seconds": time.perf_counter() - start, **{k: result.get(k) for k in SHOWN}}


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--seconds", type=float, default=150.0, help="training budget per entry (CPU seconds)")
    parser.add_argument("--only", default="", help="comma-separated entry names")
    parser.add_argument("--binarize", default=",".join(BINARIZE),
                        help="likelihood suite: comma-separated data.binarize modes, each entry runs under each")
    parser.add_argument("--quick", action="store_true",
                        help="3 s per entry on 256 training images: checks the script end to end, no figures")
    args = parser.parse_args()
    modes = [m for m in args.binarize.split(",") if m]
    if args.suite == "likelihood" and (not modes or set(modes) - set(BINARIZE)):
        parser.error(f"--binarize takes {', '.join(BINARIZE)} (comma-separated), got '{args.binarize}'")
    seconds = 3.0 if args.quick else args.seconds
    runs = ROOT / "benchmarks" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, config, overrides in SUITES[args.suite]:
        if args.only and name not in args.only.split(","):
            continue
        extra = QUICK if args.quick else []
        for mode in modes if args.suite == "likelihood" else [None]:
            rows.append(run_one(name, config, overrides + extra, seconds, runs, binarize=mode))
            print(rows[-1], flush=True)
    cols = ["name", "params", "steps", "seconds"] + [k for k in SHOWN if any(r.get(k) is not None for r in rows)]
    print(f"\nbudget {seconds:.0f} s of training per entry, {torch.get_num_threads()} threads"
          f"{' (--quick: a smoke test, not figures)' if args.quick else ''}\n")
    header = cols + (["published, stochastic binarisation (nats)"] if args.suite == "likelihood" else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [fmt(r[c]) if c != "name" else r[c] for c in cols]
        if args.suite == "likelihood":  # the published figures are on stochastically binarised MNIST
            family = r["name"].rsplit("-", 1)[0]
            cells.append(PUBLISHED.get(family, "-") if r["binarize"] == "stochastic" else "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
