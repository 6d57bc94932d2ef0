"""DDPM versus diffusers: the same data, the same CPU seconds of training, judged by classifier-FID.

    python benchmarks/bench_ddpm_vs_diffusers.py [--budget 480] [--samples 1000] [--steps 50] [--threads 1]
        [--peer-lrs 1e-4 1e-3]

Every model trains on the 4,500 training images of ``mnist5k`` (28x28) for ``--budget`` seconds of process CPU time
(1 thread by default, so CPU seconds are core seconds), then draws ``--samples`` images from its EMA weights;
``genai evaluate``'s metrics compare them with the 500 validation images in the evaluator network's feature space
(trained first under benchmarks/runs/ when missing).

ours          ``configs/quickstart.yaml`` as shipped, through the toolkit's Trainer (precision auto, class-conditional,
              v-prediction with min-SNR weighting), sampled as ``make demo`` does (its ``sample:`` section:
              DPM-Solver++(2M), 20 steps, classifier-free guidance 2); the cosine schedule is planned to end where
              the budget does (``bench_common.BudgetTrainer``).
ours uncond.  the same recipe without labels (``model.class_conditional=false``, no guidance): the same task as
              the peer's, sampled with DPM-Solver++(2M) 20 steps and with the peer's sampler (DDIM, ``--steps``).
peer          diffusers' ``UNet2DModel`` + ``DDPMScheduler`` trained as its unconditional-training example does:
              AdamW (betas 0.95/0.999, weight decay 1e-6), 500 warm-up steps then cosine over the example's 100
              epochs, batch 16, gradient clipping at 1, EMA with warm-up (inv_gamma 1, power 3/4, max 0.9999),
              fp32, MSE on the noise. Its network has our UNet's widths and depth (``bench_common.peer_unet``):
              the example's own (128...512 channels, six levels) cannot take 28x28 images. Each learning rate of
              ``--peer-lrs`` is trained; the one with the lower classifier-FID on ``--select-samples`` images is
              the peer, and gets the full ``--samples``, drawn with ``DDIMScheduler`` at ``--steps`` steps (fp32).
Prints a markdown table and the classifier-FID ratios ours / peer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from bench_common import RUNS, BudgetTrainer, evaluator_for, log, machine, markdown, peer_unet
from rich.console import Console

from genai_cli.config import load_config
from genai_cli.data import load_data, to_float
from genai_cli.evaluation.evaluator import evaluator_outputs
from genai_cli.evaluation.metrics import frechet_distance
from genai_cli.evaluation.run import draw_samples, load_run, sample_quality
from genai_cli.runs import new_run, save_grid

CONFIG = "configs/quickstart.yaml"


# -- ours ---------------------------------------------------------------------------------------
def train_ours(budget: float, data, name: str, overrides: tuple[str, ...] = ()):
    from bench_common import ROOT

    cfg = load_config(ROOT / CONFIG, ["train.max_steps=1000000", "train.max_seconds=null", "train.eval_every=1000000",
                                      "train.sample_every=1000000", "train.checkpoint_every=1000000",
                                      "train.log_every=100", *overrides])
    RUNS.mkdir(parents=True, exist_ok=True)
    run = new_run(RUNS, name, name, force=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    trainer = BudgetTrainer(cfg, run, data=data, quiet=True, budget=budget, console=Console(stderr=True))
    trainer.fit()
    return run, trainer.step, trainer.cpu_used, cfg


# -- the peer -----------------------------------------------------------------------------------
def train_peer(template, budget: float, data, lr: float, seed: int = 0, batch: int = 16):
    """The diffusers example's recipe for ``budget`` CPU seconds on a UNet2DModel of ``template``'s size (our
    UNet); returns (EMA model, steps, CPU seconds, scheduler)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    unet = peer_unet(template)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    n = data.train_x.shape[0]
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500, num_training_steps=(n // batch) * 100)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    g = torch.Generator().manual_seed(seed)
    step, start = 0, time.process_time()
    unet.train()
    while time.process_time() - start < budget:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            x0 = to_float(data.train_x[order[i:i + batch]]) * 2 - 1  # [-1, 1], as the example normalises
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
            pred = unet(scheduler.add_noise(x0, noise, t), t).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad()
            ema.step(unet.parameters())
            step += 1
            if step % 200 == 0:
                log(f"  peer lr {lr:g}: step {step}, loss {float(loss):.4f}, "
                    f"{time.process_time() - start:.0f}/{budget:.0f} CPU s")
            if time.process_time() - start >= budget:
                break
    used = time.process_time() - start
    ema.copy_to(unet.parameters())
    return unet.eval(), step, used, scheduler


@torch.no_grad()
def sample_peer(unet, ddpm_scheduler, n: int, steps: int, seed: int, chunk: int = 250) -> tuple[torch.Tensor, float]:
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(ddpm_scheduler.config)
    ddim.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for i in range(0, n, chunk):
        x = torch.randn((min(chunk, n - i), 1, 28, 28), generator=g)
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.0, generator=g).prev_sample
        out.append((x / 2 + 0.5).clamp(0, 1))
    return torch.cat(out), time.perf_counter() - t0


# -- the comparison -----------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480.0, help="CPU seconds of training per model")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--select-samples", type=int, default=200, help="samples that pick the peer's lr")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--peer-lrs", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")

    from genai_cli.config import DataConfig

    data_cfg = DataConfig(name="mnist5k", image_size=28)
    data = load_data(data_cfg)
    evaluator, ev_acc, ev_ckpt = evaluator_for(data_cfg, data.spec)
    log(f"evaluator {ev_ckpt} (validation accuracy {ev_acc})")

    def judge(images: torch.Tensor) -> dict:
        return sample_quality(evaluator, data, images, cpu, args.seed)

    rows, results = [], {}
    ddim = {"sampler": "ddim", "steps": args.steps}
    variants = [("ours", (), [("ours", None)]),
                ("ours uncond.", ("model.class_conditional=false", "model.guidance=1.0", "sample.guidance=null"),
                 [("ours uncond.", None), (f"ours uncond., DDIM {args.steps}", ddim)])]
    for name, overrides, draws in variants:
        log(f"{name}: {CONFIG} {' '.join(overrides)} for {args.budget:.0f} CPU s")
        run, steps, used, cfg = train_ours(args.budget, data, "bench-ddpm-" + name.split()[-1].strip("."), overrides)
        model = load_run(str(run), RUNS)[2].to(cpu).eval()
        for label, options in draws:
            options = options or cfg.sample.options()  # as make demo samples
            fake, secs = draw_samples(model, args.samples, args.seed, options, cpu)
            save_grid(fake[:64], run / "samples" / f"bench_{options['sampler']}{options.get('steps', '')}.png")
            sampler = f"{options['sampler']} {options.get('steps', '')}" + (
                f", guidance {options['guidance']:g}" if options.get("guidance", 1.0) != 1.0 else "")
            results[label] = {"steps": steps, "cpu_seconds": used, "lr": cfg.train.lr, "batch": cfg.train.batch_size,
                              "sampler": sampler, "sample_seconds": secs,
                              "parameters": sum(p.numel() for p in model.parameters()), **judge(fake)}
            log(f"{label}: classifier-FID {results[label]['classifier_fid']:.2f}")

    candidates = {}
    for lr in args.peer_lrs:
        log(f"peer: lr {lr:g} for {args.budget:.0f} CPU s")
        unet, psteps, pused, sched = train_peer(model.unet, args.budget, data, lr, args.seed)
        probe, _ = sample_peer(unet, sched, args.select_samples, args.steps, args.seed)
        fid = frechet_distance(*[evaluator_outputs(evaluator, x, cpu)[0] for x in (to_float(data.val_x), probe)])
        log(f"peer lr {lr:g}: {psteps} steps, classifier-FID on {args.select_samples} samples {fid:.2f}")
        candidates[lr] = (fid, unet, psteps, pused, sched)
    best_lr = min(candidates, key=lambda k: candidates[k][0])
    _, unet, psteps, pused, sched = candidates[best_lr]
    pfake, psecs = sample_peer(unet, sched, args.samples, args.steps, args.seed)
    save_grid(pfake[:64], RUNS / "bench-ddpm-peer.png")
    results["diffusers"] = {"steps": psteps, "cpu_seconds": pused, "lr": best_lr, "batch": 16,
                            "sampler": f"ddim {args.steps}", "sample_seconds": psecs,
                            "parameters": sum(p.numel() for p in unet.parameters()),
                            "selection_fid": {str(k): v[0] for k, v in candidates.items()}, **judge(pfake)}

    for side, r in results.items():
        rows.append([side, f"{r['parameters']:,}", f"{r['lr']:g}", str(r["batch"]), str(r["steps"]),
                     f"{r['cpu_seconds']:.0f}", r["sampler"], f"{r['sample_seconds'] / args.samples * 64:.1f}",
                     f"{r['classifier_fid']:.2f}", f"{r['kid']:.4f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                     f"{r['coverage']:.3f}", f"{r['confident_share']:.3f}", str(r["classes_covered"])])
    (RUNS / "ddpm_vs_diffusers.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nDDPM vs diffusers on mnist5k: {args.budget:.0f} CPU s of training each, {args.samples} samples, "
          f"{machine()}; floor (train vs val images) classifier-FID {results['ours']['reference_fid']:.2f}\n")
    print(markdown(["model", "parameters", "lr", "batch", "steps", "CPU s", "sampler", "sampling s / 64",
                    "classifier-FID", "KID", "precision", "recall", "coverage", "p >= 0.9", "classes >= 2 %"], rows,
                   right={1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14}))
    peer_fid = results["diffusers"]["classifier_fid"]
    for label in [k for k in results if k != "diffusers"]:
        ratio = results[label]["classifier_fid"] / peer_fid
        print(f"\nFID ratio {label} / diffusers = {ratio:.3f} ({'meets' if ratio <= 0.3 else 'misses'} the target "
              f"of <= 0.3)")
    print("\npeer lr picked from " + ", ".join(f"{k:g}: FID {v[0]:.2f}" for k, v in candidates.items())
          + f" on {args.select_samples} samples")


if __name__ == "__main__":
    main()
