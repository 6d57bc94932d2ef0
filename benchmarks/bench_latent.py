"""Latent diffusion against pixel diffusion at an equal CPU budget, and the UNet size presets' speed.

    python benchmarks/bench_latent.py compare [--budget 270] [--ae-seconds 60] [--samples 500] [--threads 1]
    python benchmarks/bench_latent.py presets [--batch 64] [--steps 2] [--threads 1]

compare: both arms train on the 4,500 training images of ``mnist5k`` for ``--budget`` seconds of process CPU time
(``bench_common.BudgetTrainer``: the cosine schedule is re-planned to end where the budget does), with the same
recipe (the demo's: class-conditional, v-prediction with min-SNR-5, EMA, lr 2e-3, batch 64) and are sampled with
the same sampler, steps and guidance (their ``sample:`` section: DPM-Solver++(2M), 20 steps, guidance 2).

pixel   ``configs/quickstart.yaml`` (the demo's 16-channel UNet on 28x28 pixels).
latent  ``configs/spatial_ae_mnist.yaml`` for ``--ae-seconds``, then ``configs/latent_ddpm_mnist.yaml`` on its
        4 x 7 x 7 latents for the rest of the budget: the autoencoder's training counts in latent diffusion's.

``--samples`` images from each EMA model are judged by ``genai evaluate``'s metrics in the evaluator network's
feature space (trained first under benchmarks/runs/ when missing). Sampling seconds per 64 images are given twice:
for the ``--samples`` draw, and the best of ``--speed-rounds`` 64-image draws taken alternately (pixel, latent,
pixel, ...), the fairer ratio on a shared machine. A third row judges the autoencoder's reconstructions of
training images: the ceiling its decoder sets on latent samples.

presets: parameters and training images/s (forward, backward, AdamW step; fp32; after one warm-up step) of every
``model.size`` preset: ddpm on 1x28x28 and 3x32x32, the CIFAR-10 recipe (configs/ddpm_cifar10.yaml), and
latent_ddpm on the 4 x 7 x 7 grid of configs/spatial_ae_mnist.yaml's autoencoder (its encoder pass included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_common import ROOT, RUNS, BudgetTrainer, evaluator_for, log, machine, markdown
from rich.console import Console

from genai_cli.config import DataConfig, load_config
from genai_cli.data import load_data, to_float
from genai_cli.evaluation.run import draw_samples, load_run, sample_quality
from genai_cli.runs import new_run, save_grid

PIXEL = "configs/quickstart.yaml"
AUTOENCODER = "configs/spatial_ae_mnist.yaml"
LATENT = "configs/latent_ddpm_mnist.yaml"
QUIET_SCHEDULES = ["train.max_steps=1000000", "train.max_seconds=null", "train.eval_every=1000000",
                   "train.sample_every=1000000", "train.checkpoint_every=1000000", "train.log_every=100",
                   "train.sample_n=20"]  # the final grid of each run: small, it is drawn inside the measured CPU time


def train_for(config: str, budget: float, data, name: str, overrides: tuple[str, ...] = ()):
    """Train ``config`` for ``budget`` CPU seconds of steps; returns (run folder, steps, CPU seconds with set-up, cfg).
    The CPU seconds include building the model and latent diffusion's scale measurement, not only the steps."""
    cfg = load_config(ROOT / config, [*QUIET_SCHEDULES, *overrides])
    RUNS.mkdir(parents=True, exist_ok=True)
    run = new_run(RUNS, name, name, force=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    start = time.process_time()
    trainer = BudgetTrainer(cfg, run, data=data, quiet=True, budget=budget, console=Console(stderr=True))
    result = trainer.fit()
    return run, trainer.step, time.process_time() - start, cfg, result


def compare(args) -> None:
    cpu = torch.device("cpu")
    data_cfg = DataConfig(name="mnist5k", image_size=28)
    data = load_data(data_cfg)
    evaluator, ev_acc, ev_ckpt = evaluator_for(data_cfg, data.spec)
    log(f"evaluator {ev_ckpt} (validation accuracy {ev_acc})")

    log(f"pixel: {PIXEL} for {args.budget:.0f} CPU s")
    pixel_run, pixel_steps, pixel_cpu, pixel_cfg, _ = train_for(PIXEL, args.budget, data, "bench-latent-pixel")
    log(f"latent: {AUTOENCODER} for {args.ae_seconds:.0f} CPU s")
    ae_run, ae_steps, ae_cpu, _, ae_result = train_for(AUTOENCODER, args.ae_seconds, data, "bench-latent-ae")
    rest = args.budget - ae_cpu
    log(f"latent: {LATENT} on {ae_run.name} for the remaining {rest:.0f} CPU s")
    latent_run, latent_steps, latent_cpu, latent_cfg, latent_result = train_for(
        LATENT, rest, data, "bench-latent-ldm", (f"model.autoencoder={ae_run}",))

    models = {"pixel DDPM": (load_run(str(pixel_run), RUNS)[2].to(cpu).eval(), pixel_cfg),
              "latent DDPM": (load_run(str(latent_run), RUNS)[2].to(cpu).eval(), latent_cfg)}
    options = pixel_cfg.sample.options()
    assert options == latent_cfg.sample.options(), "both arms must sample with the same sampler, steps and guidance"
    results = {}
    for label, (model, _) in models.items():
        fake, secs = draw_samples(model, args.samples, args.seed, options, cpu)
        save_grid(fake[:100], RUNS / f"bench-latent-{label.split()[0]}.png", nrow=10)
        results[label] = {"sample_seconds_per_64": secs / args.samples * 64, **sample_quality(evaluator, data, fake,
                                                                                              cpu, args.seed)}
        log(f"{label}: classifier-FID {results[label]['classifier_fid']:.2f}, {secs:.1f} s for {args.samples}")
    best = {label: float("inf") for label in models}
    for _ in range(args.speed_rounds):  # alternately, so that a neighbour's load hits both alike
        for label, (model, _) in models.items():
            best[label] = min(best[label], draw_samples(model, 64, args.seed, options, cpu)[1])
    ae = models["latent DDPM"][0].parents["autoencoder"]
    with torch.no_grad():
        recon = torch.cat([ae.reconstruct(to_float(data.train_x[i:i + 250])) for i in range(0, args.samples, 250)])
    ceiling = sample_quality(evaluator, data, recon[:args.samples].clamp(0, 1), cpu, args.seed)
    save_grid(recon[:100], RUNS / "bench-latent-recon.png", nrow=10)

    trainable = {label: sum(p.numel() for p in m.parameters()) for label, (m, _) in models.items()}
    frozen = sum(p.numel() for p in ae.parameters())
    train_cells = {"pixel DDPM": (f"{trainable['pixel DDPM']:,}", f"{pixel_steps}", f"{pixel_cpu:.0f}"),
                   "latent DDPM": (f"{trainable['latent DDPM']:,} + AE {frozen:,}", f"AE {ae_steps} + {latent_steps}",
                                   f"{ae_cpu:.0f} + {latent_cpu:.0f}")}
    rows = []
    for label, r in results.items():
        rows.append([label, *train_cells[label], f"{r['sample_seconds_per_64']:.2f}", f"{best[label]:.2f}",
                     f"{r['classifier_fid']:.2f}", f"{r['kid']:.4f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                     f"{r['coverage']:.3f}", f"{r['confident_share']:.3f}", str(r["classes_covered"])])
    rows.append(["AE reconstructions (ceiling)", "", "", "", "", "", f"{ceiling['classifier_fid']:.2f}",
                 f"{ceiling['kid']:.4f}", f"{ceiling['precision']:.3f}", f"{ceiling['recall']:.3f}",
                 f"{ceiling['coverage']:.3f}", f"{ceiling['confident_share']:.3f}", str(ceiling["classes_covered"])])
    speedup = best["pixel DDPM"] / best["latent DDPM"]
    fid_p, fid_l = results["pixel DDPM"]["classifier_fid"], results["latent DDPM"]["classifier_fid"]
    sampler = f"{options['sampler']} {options.get('steps', '')}, guidance {options.get('guidance', 1.0):g}"
    summary = {"budget": args.budget, "ae_seconds": ae_cpu, "ae_val_mse": ae_result.get("last_val_mse"),
               "latent_var": latent_result.get("latent_var"), "latent_scale": latent_result.get("latent_scale"),
               "speedup": speedup, "results": results, "ceiling": ceiling, "best_seconds_per_64": best}
    (RUNS / "bench_latent.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"\nPixel vs latent DDPM on mnist5k: {args.budget:.0f} CPU s of training each (the autoencoder's included), "
          f"{args.samples} samples each, {sampler}; {machine()}; floor (train vs val images) classifier-FID "
          f"{results['pixel DDPM']['reference_fid']:.2f}\n")
    print(markdown(["model", "parameters", "steps", "CPU s", "s / 64 images", "s / 64 (alternating, best)",
                    "classifier-FID", "KID", "precision", "recall", "coverage", "p >= 0.9", "classes >= 2 %"], rows))
    print(f"\nautoencoder: validation MSE {summary['ae_val_mse']:.5f} per pixel; latent variance measured "
          f"{summary['latent_var']:.4f} -> scale {summary['latent_scale']:.4f}")
    print(f"sampling speed-up latent / pixel at equal steps: {speedup:.1f}x "
          f"({'meets' if speedup >= 4 else 'misses'} the target of >= 4x)")
    print(f"classifier-FID latent {fid_l:.2f} vs pixel {fid_p:.2f} "
          f"({'meets' if fid_l <= fid_p else 'misses'} the target: no worse than pixel at the same budget)")


# -- presets ---------------------------------------------------------------------------------------
def presets(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import untrained_parent  # the tests' untrained parent: random weights of the family's config

    from genai_cli.api import build_model
    from genai_cli.config import build_dataclass
    from genai_cli.models.base import ImageSpec, Stepper
    from genai_cli.registry import MODELS

    class Train:
        lr, betas, weight_decay = 2e-4, [0.9, 0.999], 0.0

    def measure(family: str, spec: ImageSpec, fields: dict, parents=None) -> tuple[int, float]:
        torch.manual_seed(0)
        model = build_model(family, build_dataclass(MODELS.get(family).Config, fields, "model"), spec, parents).train()
        opts, stepper = model.configure_optimizers(Train), Stepper()
        x = torch.rand(args.batch, *spec.shape)
        y = torch.arange(args.batch) % 10
        model.train_step((x, y), opts, stepper)  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            model.train_step((x, y), opts, stepper)
        return sum(p.numel() for p in model.parameters()), args.batch * args.steps / (time.perf_counter() - start)

    mnist, cifar = ImageSpec(1, 28, 10), ImageSpec(3, 32, 10)
    ae_cfg = {k: v for k, v in load_config(ROOT / AUTOENCODER).to_dict()["model"].items() if k != "family"}
    ae = untrained_parent("spatial_ae", mnist, **ae_cfg)
    cifar_recipe = {k: v for k, v in load_config(ROOT / "configs" / "ddpm_cifar10.yaml").to_dict()["model"].items()
                    if k != "family"}
    rows = []
    for size in ("S", "M", "L"):
        for label, family, spec, fields, parents in [
                ("ddpm", "ddpm", mnist, {"size": size}, None),
                ("ddpm", "ddpm", cifar, {"size": size}, None),
                ("latent_ddpm (+ encoder)", "latent_ddpm", mnist, {"size": size, "autoencoder": "ae"},
                 {"autoencoder": ae})]:
            params, rate = measure(family, spec, fields, parents)
            shape = "4x7x7 latents of 1x28x28" if family == "latent_ddpm" else "x".join(map(str, spec.shape))
            rows.append([label, size, shape, f"{params:,}", f"{rate:.1f}"])
            log(" | ".join(rows[-1]))
    params, rate = measure("ddpm", cifar, cifar_recipe)
    rows.append(["ddpm_cifar10.yaml", "L, 4 levels", "3x32x32", f"{params:,}", f"{rate:.1f}"])
    print(f"\nUNet size presets: training images/s (batch {args.batch}, fp32, forward + backward + AdamW, mean of "
          f"{args.steps} steps after one warm-up); {machine()}\n")
    print(markdown(["family", "size", "shape", "parameters", "training images/s"], rows, right={3, 4}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="pixel vs latent DDPM at an equal CPU budget")
    c.add_argument("--budget", type=float, default=270.0, help="CPU seconds of training per arm")
    c.add_argument("--ae-seconds", type=float, default=60.0, help="of the latent arm's budget, for the autoencoder")
    c.add_argument("--samples", type=int, default=500)
    c.add_argument("--speed-rounds", type=int, default=2)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("presets", help="parameters and training images/s of every size preset")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compare(args) if args.command == "compare" else presets(args)


if __name__ == "__main__":
    main()
