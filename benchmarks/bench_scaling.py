"""The scaling study of issue 21: DiT and UNet size presets in one autoencoder's latent space, against training FLOPs.

    python benchmarks/bench_scaling.py study [--budgets 8 24 72 200] [--arms unet:S,dit:S,unet:M,dit:B,unet:L,dit:L]
                                             [--samples 200] [--steps 8] [--ae-seconds 60] [--threads 1]
                                             [--precision fp32|bf16|auto] [--set KEY=VALUE ...]
                                             [--top-samples 1000 [--top-seeds 1 2 3]]
                                             [--name bench-scaling] [--out DIR] [--resume] [--merge JSON ...]
    python benchmarks/bench_scaling.py rescore --pairs DIT_RUN:UNET_RUN [...] [--guidance 1.25 1.5 2 2.5 3]
                                               [--budget 200] [--top-samples 1000] [--top-seeds 1 2 3] [--steps 8]
                                               [--threads 1] [--out JSON]
    python benchmarks/bench_scaling.py extend --runs RUN [...] --budgets 2400 3200 [--threads 1]
    python benchmarks/bench_scaling.py speed [--batch 64] [--steps 3] [--threads 1]

study: every arm is ``configs/latent_ddpm_mnist.yaml`` (class-conditional, v-prediction with min-SNR-5, EMA 0.995,
AdamW lr 2e-3, batch 64) with ``model.backbone`` and ``model.size`` set (the DiT presets of the latent grid have
long skips and local convolutions: latent_diffusion.LATENT_DIT_PRESETS; ``--set`` adds overrides to every arm, for
pilots), trained on the 4 x 7 x 7 latents of ONE
``spatial_ae`` run (``configs/spatial_ae_mnist.yaml``, trained first under benchmarks/runs/ when missing) of the
4,500 ``mnist5k`` training images. The learning rate is constant after the warm-up (``train.min_lr_ratio=1``), so
one run per arm gives every budget: the EMA weights are copied when the run's process CPU time in training steps
passes each of ``--budgets`` (seconds), as the DiT paper reads FID off one run per model at growing step counts.
Each copy is scored afterwards (not counted in its budget): the validation loss (the loop's own ``validate``: the
first ``eval_max_images`` validation images at a fixed seed) and classifier-FID of ``--samples`` samples
(DPM-Solver++(2M), ``--steps`` steps, guidance 2) in the evaluator network's features (``genai evaluate``'s
metrics). Training compute: the denoiser's FLOPs of one training step, forward and backward at the run's batch
size, counted by ``torch.utils.flop_counter`` (a grouped convolution's weight gradient divided by its groups:
``grouped_conv_backward_flop``; the frozen encoder's forward pass, the same for every arm, and the
optimizer are not counted), times the steps taken. Writes benchmarks/scaling/scaling.png (FID and validation loss
against training GFLOPs, log axes, one line per arm) and benchmarks/scaling/scaling.json, and prints the table and
the DiT-vs-UNet rows of benchmarks/README.md (an arm whose run ``train.max_steps`` stops before a budget has no
point there: paired only where both arms have one, named under the figure if it has none). ``--precision`` is every
arm's ``train.precision`` (fp32 by default: every arm in the same precision; bf16 or auto trains each at this
machine's native precision, where bf16 speeds the DiT more than the UNet; validation runs in the run's precision,
sampling in the machine's, as ``genai evaluate``).
Each budget's EMA weights are also saved as the run's ``checkpoints/budget_<seconds>.pt`` (to rescore later), and
``--top-samples`` scores the largest budget again with that many samples at each of ``--top-seeds`` (a 200-sample
FID near the floor moves by more than the arms differ), printed as the last table. Runs go to
benchmarks/runs/<--name>-<backbone>-<size>: a pilot's own ``--name`` leaves the study's runs alone.

rescore: the study's saved snapshots scored again at other guidance scales, both arms of each pair alike: each run's
(benchmarks/runs/<RUN>) ``checkpoints/budget_<--budget>.pt`` (its EMA weights), ``--top-samples`` samples at each of
``--top-seeds`` with the study's sampler (DPM-Solver++(2M), ``--steps`` steps) at each of ``--guidance``, scored as
the study scores them (classifier-FID and the rest of ``sample_quality`` against the same validation images, the
same evaluator); at guidance 2 it reproduces the study's ``--top-samples`` figures. Every seed's scores go to
``--out`` (default benchmarks/scaling/rescore.json) as they are measured; a second call with the same file skips what
it has (a killed call resumes; more seeds or guidances add to it; a different budget, sample count or step count
is refused). Prints per pair and guidance DiT's and UNet's mean classifier-FID over the seeds and their ratio, the
same pooled over the pairs (the mean of every seed of every pair), and each arm pooled at its own best guidance.

extend: each of the study's runs (benchmarks/runs/<RUN>) trained on from its last checkpoint, an exact resume (its
weights, EMA, optimizer state, data order and random state), to larger ``--budgets`` (total CPU seconds of training
steps, the study's included: counted on from its largest budget, where its loop stopped), saving each as
``checkpoints/budget_<seconds>.pt`` with its validation loss, for ``rescore --budget``. A larger budget costs only its
own seconds, not the study's again.

speed: parameters and training images per second of this process's CPU time (forward, backward, AdamW step; mean of
``--steps`` after one warm-up; with 1 thread, images/s of one core, which a machine shared with others keeps) of
every DiT preset on 1x28x28 and 3x32x32 pixels and on the 4 x 7 x 7 latent grid, in fp32 and, where the CPU runs
bf16 natively, under bf16 autocast; the UNet S preset of each space is measured beside them in the same run.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import time
from pathlib import Path

import torch
from bench_common import ROOT, RUNS, log, machine, markdown, mnist5k_with_evaluator
from bench_latent import AUTOENCODER, LATENT, QUIET_SCHEDULES, train_for
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

from genai_cli.api import load_checkpoint
from genai_cli.config import load_config
from genai_cli.evaluation.run import draw_samples, sample_quality
from genai_cli.hardware import cpu_native_bf16, keep_freed_memory
from genai_cli.runs import new_run
from genai_cli.train import Trainer

OUT = ROOT / "benchmarks" / "scaling"  # the committed figure and JSON; --out elsewhere for trial runs
AE_RUN = "bench-scaling-ae"
GUIDANCE = 2.0  # the study's classifier-free guidance scale, the same for every arm


class SnapshotTrainer(Trainer):
    """The toolkit's Trainer that copies the EMA weights when its process CPU time in training passes each budget,
    and stops at the last one."""

    def __init__(self, *args, budgets: list[float], **kwargs):
        super().__init__(*args, **kwargs)
        self.budgets = sorted(budgets)
        self.snapshots: list[dict] = []
        self.cpu_start = 0.0

    def run_steps(self, reporter):
        self.cpu_start = time.process_time()  # from the first step: the latent scale's measurement is set-up
        return super().run_steps(reporter)

    def after_step(self, logs, reporter, rate) -> None:
        used = time.process_time() - self.cpu_start
        while len(self.snapshots) < len(self.budgets) and used >= self.budgets[len(self.snapshots)]:
            state = {k: v.detach().clone() for k, v in self.sampling_model().state_dict().items()}
            self.snapshots.append({"budget": self.budgets[len(self.snapshots)], "cpu_seconds": used,
                                   "step": self.step, "train_loss": logs["loss"], "state": state})
        if len(self.snapshots) == len(self.budgets):
            self.total_steps = self.step  # the loop ends after this step
        super().after_step(logs, reporter, rate)


def save_snapshot(trainer: SnapshotTrainer, model, run: Path, snap: dict) -> dict:
    """Load one budget's EMA weights into ``model`` (the trainer's sampling model), save them as the run's
    ``checkpoints/budget_<seconds>.pt`` (the rest of the checkpoint is the run's end): to rescore it later; return
    the loop's validation of them."""
    model.load_state_dict(snap.pop("state"))
    torch.save({**trainer.state_dict(), "step": snap["step"], "optimizers": {}},
               run / "checkpoints" / f"budget_{snap['budget']:g}.pt")
    return trainer.validate()


def extend(args) -> None:
    """Train each of the study's runs on past its largest budget (see the module doc)."""
    from genai_cli.session import ResumePoint, resume_run

    for name in args.runs:
        run = RUNS / name
        done = [float(p.stem.removeprefix("budget_")) for p in (run / "checkpoints").glob("budget_*.pt")]
        if not done or not (run / "checkpoints" / "last.pt").exists():
            raise SystemExit(f"{run} has no budget snapshot and last checkpoint: not a run of the study")
        start = max(done)  # the study's loop ended at the step that passed its largest budget: last.pt's
        if min(args.budgets) <= start:
            raise SystemExit(f"{name} already trained {start:g} CPU s; extend it to larger budgets")
        # An exact resume (weights, EMA, optimizer, data order, random state), as genai train --resume does.
        trainer = resume_run(ResumePoint(run, run / "checkpoints" / "last.pt", load_config(run / "config.yaml")),
                             quiet=True, console=Console(stderr=True), trainer_class=SnapshotTrainer,
                             budgets=[b - start for b in args.budgets])
        trainer.fit()
        model = trainer.sampling_model()
        for budget, snap in zip(sorted(args.budgets), trainer.snapshots):
            snap["budget"] = budget
            val = save_snapshot(trainer, model, run, snap)
            log(f"{name}: {budget:g} CPU s, step {snap['step']}, val loss {val['val_loss']:.4f}")


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                               output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch's count of a convolution's backward (``flop_counter.conv_backward_flop``, torch 2.14) with its weight
    gradient divided by ``groups``: torch counts that term as a dense convolution of every input channel with every
    output channel, ``groups`` times too many for a grouped one (a depthwise 3x3 conv of 64 channels on 64 x 7 x 7:
    235 MFLOPs counted for a backward of 7.2). Its input-gradient term reads the grouped weight's shape: right."""
    raw = inspect.unwrap(conv_backward_flop)
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    flops = raw(*args, output_mask, out_shape, **kwargs)
    if groups > 1 and output_mask[1]:
        weight = raw(*args, [False, True, False], out_shape, **kwargs)
        flops += weight // groups - weight
    return flops


def step_flops(model, batch_size: int) -> int:
    """FLOPs of one training step of ``model``'s denoiser (forward + backward) at ``batch_size``, on its model space,
    grouped convolutions' backward counted right (``grouped_conv_backward_flop``)."""
    net = copy.deepcopy(model.unet).train().requires_grad_(True)  # the EMA copy is frozen
    x = torch.randn(batch_size, *model.model_shape)
    t = torch.randint(0, model.config.timesteps, (batch_size,))
    y = torch.randint(0, model.spec.num_classes, (batch_size,)) if model.config.class_conditional else None
    fix = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=fix) as counter:
        net(x, t, y).float().pow(2).mean().backward()
    return counter.get_total_flops()


def sampler_options(steps: int, guidance: float = GUIDANCE) -> dict:
    """The study's sampler: DPM-Solver++(2M) with ``steps`` steps at classifier-free guidance ``guidance``."""
    return {"sampler": "dpm++2m", "steps": steps, "guidance": guidance}


def score_at_seeds(model, evaluator, data, n: int, seeds: list[int], options: dict, done=None) -> list[dict]:
    """``sample_quality`` of ``n`` samples of ``model`` drawn with ``options`` at each of ``seeds`` (the sampling
    seed is also the KID's), one dict per seed; ``done(seed, quality)`` is called after each (to save it)."""
    cpu = torch.device("cpu")
    out = []
    for seed in seeds:
        out.append(sample_quality(evaluator, data, draw_samples(model, n, seed, options, cpu)[0], cpu, seed))
        if done is not None:
            done(seed, out[-1])
    return out


def study(args) -> None:
    cpu = torch.device("cpu")
    data_cfg, data, evaluator = mnist5k_with_evaluator()
    ae_run = RUNS / AE_RUN
    if not (ae_run / "checkpoints" / "last.pt").exists():
        log(f"autoencoder: {AUTOENCODER} for {args.ae_seconds:.0f} CPU s")
        ae_run = train_for(AUTOENCODER, args.ae_seconds, data, AE_RUN)[0]
    args.out.mkdir(parents=True, exist_ok=True)
    options = sampler_options(args.steps)
    results = json.loads((args.out / "scaling.json").read_text())["arms"] if args.resume else {}
    for path in args.merge:  # arms measured by another process of the same study (run side by side)
        results.update({k: v for k, v in json.loads(path.read_text())["arms"].items() if k not in results})
    for r in results.values():  # kept arms: the FLOPs counted again, so a fix to the count reaches them
        run = RUNS / f"{args.name}-{r['backbone']}-{r['size']}"
        if (run / "checkpoints" / "last.pt").exists():
            flops = step_flops(load_checkpoint(run / "checkpoints" / "last.pt"),
                               load_config(run / "config.yaml").train.batch_size)
            r["gflops_per_step"] = flops / 1e9
            for p in r["points"]:
                p["train_gflops"] = p["step"] * flops / 1e9
    for arm in args.arms.split(","):
        if arm in results:
            continue
        backbone, size = arm.split(":")
        cfg = load_config(ROOT / LATENT, [*QUIET_SCHEDULES, f"model.autoencoder={ae_run}",
                                          f"model.backbone={backbone}", f"model.size={size}",
                                          "train.min_lr_ratio=1.0", f"train.precision={args.precision}",
                                          f"train.eval_max_images={args.val_images}", f"train.seed={args.seed}",
                                          *args.set])
        run = new_run(RUNS, f"{args.name}-{backbone}-{size}", args.name, force=True)
        (run / "config.yaml").write_text(cfg.to_yaml())
        torch.manual_seed(args.seed)
        trainer = SnapshotTrainer(cfg, run, data=data, quiet=True, budgets=args.budgets,
                                  console=Console(stderr=True))
        trainer.fit()
        model = trainer.sampling_model()
        flops = step_flops(model, cfg.train.batch_size)
        params = sum(p.numel() for p in model.unet.parameters())
        points = []
        for snap in trainer.snapshots:
            val = save_snapshot(trainer, model, run, snap)
            fake, _ = draw_samples(model, args.samples, args.seed, options, cpu)
            quality = sample_quality(evaluator, data, fake, cpu, args.seed)
            points.append({**snap, "train_gflops": snap["step"] * flops / 1e9, "val_loss": val["val_loss"],
                           "classifier_fid": quality["classifier_fid"], "kid": quality["kid"],
                           "reference_fid": quality["reference_fid"]})
            log(f"{arm}: {snap['budget']:.0f} CPU s, step {snap['step']}, {points[-1]['train_gflops']:.0f} GFLOPs, "
                f"val loss {val['val_loss']:.4f}, classifier-FID {quality['classifier_fid']:.2f}")
        if args.top_samples and points:  # the largest budget again, with less noise: several seeds of more samples
            points[-1]["top_fids"] = [q["classifier_fid"] for q in score_at_seeds(model, evaluator, data,
                                                                                   args.top_samples, args.top_seeds,
                                                                                   options)]
            log(f"{arm}: {points[-1]['budget']:.0f} CPU s, classifier-FID of {args.top_samples} samples at seeds "
                f"{args.top_seeds}: {', '.join(f'{f:.2f}' for f in points[-1]['top_fids'])}")
        results[arm] = {"backbone": backbone, "size": size, "params": params, "gflops_per_step": flops / 1e9,
                        "points": points}
        write(results, args)  # after every arm: a killed study keeps what it measured
    order = args.arms.split(",")
    results = dict(sorted(results.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    write(results, args)
    report(results, args)


def write(results: dict, args) -> None:
    summary = {"machine": machine(), "budgets": args.budgets, "samples": args.samples, "steps": args.steps,
               "threads": args.threads, "precision": args.precision, "arms": results}
    (args.out / "scaling.json").write_text(json.dumps(summary, indent=2, default=float))
    plot(results, args.out)


def arm_label(r: dict) -> str:
    return f"{'DiT' if r['backbone'] == 'dit' else 'UNet'}-{r['size']} ({r['params'] / 1e6:.2f}M)"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    # An arm whose run stopped (train.max_steps) before its first budget has no point: named under the figure, not
    # drawn (a log axis with no data refuses to be drawn).
    drawn = [r for r in results.values() if r["points"]]
    for r in drawn:
        gflops = [p["train_gflops"] for p in r["points"]]
        style = "-o" if r["backbone"] == "dit" else "--s"
        axes[0].plot(gflops, [p["classifier_fid"] for p in r["points"]], style, label=arm_label(r))
        axes[1].plot(gflops, [p["val_loss"] for p in r["points"]], style, label=arm_label(r))
    for ax, name in zip(axes, ("classifier-FID", "validation loss (v, min-SNR-5)"), strict=True):
        if drawn:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap on a short log axis
        ax.set_xlabel("training compute (GFLOPs, forward + backward)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    if drawn:
        axes[0].legend(fontsize=8)
    unscored = [arm_label(r) for r in results.values() if not r["points"]]
    if unscored:
        fig.text(0.5, 0.01, f"no budget reached (the run stopped first): {', '.join(unscored)}", ha="center",
                 fontsize=8)
    fig.suptitle("latent diffusion on mnist5k (4x7x7 spatial_ae latents), CPU", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 if unscored else 0, 1, 1))
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)


def report(results: dict, args) -> None:
    rows = []
    for r in results.values():
        if not r["points"]:
            rows.append([f"{'DiT' if r['backbone'] == 'dit' else 'UNet'}-{r['size']}", f"{r['params']:,}",
                         f"{r['gflops_per_step']:.2f}", "no budget reached", "", "", "", ""])
        for p in r["points"]:
            rows.append([f"{'DiT' if r['backbone'] == 'dit' else 'UNet'}-{r['size']}", f"{r['params']:,}",
                         f"{r['gflops_per_step']:.2f}", f"{p['budget']:.0f}", str(p["step"]),
                         f"{p['train_gflops']:.0f}", f"{p['val_loss']:.4f}", f"{p['classifier_fid']:.2f}"])
    print(f"\nScaling study: latent_ddpm on mnist5k, budgets {args.budgets} CPU s per arm ({args.threads} thread, "
          f"{args.precision}), "
          f"{args.samples} samples each (dpm++2m {args.steps} steps, guidance {GUIDANCE:g}); {machine()}\n")
    print(markdown(["arm", "parameters", "GFLOPs / step", "CPU s", "steps", "train GFLOPs", "val loss",
                    "classifier-FID"], rows))
    pairs = [(d, u) for d, u in (("dit:S", "unet:S"), ("dit:B", "unet:M"), ("dit:L", "unet:L"))
             if d in results and u in results]
    if not pairs:
        return
    print("\nDiT against UNet at equal CPU budget (classifier-FID, DiT / UNet; target: <= 1.2x at the smallest "
          "budget, < 1x at the largest)\n")
    rows = []
    for d, u in pairs:
        unet_at = {p["budget"]: p for p in results[u]["points"]}
        for pd, pu in ((p, unet_at[p["budget"]]) for p in results[d]["points"] if p["budget"] in unet_at):
            ratio = pd["classifier_fid"] / pu["classifier_fid"]
            rows.append([f"{d} vs {u}", f"{pd['budget']:.0f}", f"{pd['classifier_fid']:.2f}",
                         f"{pu['classifier_fid']:.2f}", f"{ratio:.2f}"])
    print(markdown(["pair", "CPU s", "DiT FID", "UNet FID", "ratio"], rows))
    tops = [(d, u, results[d]["points"][-1], results[u]["points"][-1]) for d, u in pairs
            if results[d]["points"] and results[u]["points"]
            and results[d]["points"][-1]["budget"] == results[u]["points"][-1]["budget"]]
    tops = [(d, u, pd, pu) for d, u, pd, pu in tops if "top_fids" in pd and "top_fids" in pu]
    if tops:
        print(f"\nAt the largest budget, {args.top_samples} samples at seeds {args.top_seeds} (classifier-FID per "
              f"seed, mean)\n")
        rows = []
        for d, u, pd, pu in tops:
            md, mu = (sum(p["top_fids"]) / len(p["top_fids"]) for p in (pd, pu))
            rows.append([f"{d} vs {u}", f"{pd['budget']:.0f}", " / ".join(f"{f:.2f}" for f in pd["top_fids"]),
                         f"{md:.2f}", " / ".join(f"{f:.2f}" for f in pu["top_fids"]), f"{mu:.2f}", f"{md / mu:.2f}"])
        print(markdown(["pair", "CPU s", "DiT FID per seed", "DiT mean", "UNet FID per seed", "UNet mean", "ratio"],
                       rows))


# -- rescore -----------------------------------------------------------------------------------------
def rescore(args) -> None:
    pairs = [tuple(pair.split(":")) for pair in args.pairs]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit("--pairs takes DIT_RUN:UNET_RUN")
    settings = {"budget": args.budget, "samples": args.top_samples, "steps": args.steps}
    saved = json.loads(args.out.read_text()) if args.out.exists() else {**settings, "runs": {}}
    if any(saved[k] != v for k, v in settings.items()):
        raise SystemExit(f"{args.out} holds {({k: saved[k] for k in settings})}, not {settings}: another --out")
    runs = saved["runs"]
    _, data, evaluator = mnist5k_with_evaluator()

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({**saved, "machine": machine(), "threads": args.threads}, indent=2))
        tmp.replace(args.out)  # a kill while writing leaves the last whole file

    def recorder(name: str, key: str, have: dict):
        """``score_at_seeds``'s ``done`` for one run at one guidance: each seed's scores into ``have``, saved."""
        start = time.perf_counter()

        def done(seed: int, quality: dict) -> None:
            nonlocal start
            have[str(seed)] = {**{k: quality[k] for k in ("classifier_fid", "kid", "precision", "recall")},
                               "seconds": round(time.perf_counter() - start, 1)}
            log(f"{name} guidance {key} seed {seed}: classifier-FID {quality['classifier_fid']:.2f}, recall "
                f"{quality['recall']:.3f} ({have[str(seed)]['seconds']:.0f} s)")
            save()
            start = time.perf_counter()
        return done

    for guidance in args.guidance:
        key = f"{guidance:g}"
        for name in dict.fromkeys(run for pair in pairs for run in pair):
            have = runs.setdefault(name, {}).setdefault(key, {})
            seeds = [seed for seed in args.top_seeds if str(seed) not in have]
            if seeds:
                model = load_checkpoint(RUNS / name / "checkpoints" / f"budget_{args.budget:g}.pt")
                score_at_seeds(model, evaluator, data, args.top_samples, seeds, sampler_options(args.steps, guidance),
                               recorder(name, key, have))
    rescore_report(runs, pairs, args)


def rescore_report(runs: dict, pairs: list[tuple[str, str]], args) -> None:
    def fids(name: str, key: str) -> list[float]:
        return [runs[name][key][str(seed)]["classifier_fid"] for seed in args.top_seeds]

    def recall(name: str, key: str) -> float:
        return sum(runs[name][key][str(seed)]["recall"] for seed in args.top_seeds) / len(args.top_seeds)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    keys = [f"{g:g}" for g in args.guidance]
    print(f"\nThe {args.budget:g} CPU-s snapshots, {args.top_samples} samples at seeds {args.top_seeds} "
          f"(DPM-Solver++(2M), {args.steps} steps), classifier-FID per seed and mean; recall: mean over the seeds; "
          f"{machine()}\n")
    rows = []
    for key in keys:
        for d, u in pairs:
            fd, fu = fids(d, key), fids(u, key)
            rows.append([f"{d} vs {u}", key, " / ".join(f"{f:.2f}" for f in fd), f"{mean(fd):.2f}",
                         " / ".join(f"{f:.2f}" for f in fu), f"{mean(fu):.2f}", f"{mean(fd) / mean(fu):.2f}",
                         f"{recall(d, key):.3f} / {recall(u, key):.3f}"])
    print(markdown(["pair", "guidance", "DiT FID per seed", "DiT mean", "UNet FID per seed", "UNet mean",
                    "DiT / UNet", "recall DiT / UNet"], rows))
    pooled = {key: (mean([f for d, _ in pairs for f in fids(d, key)]),
                    mean([f for _, u in pairs for f in fids(u, key)])) for key in keys}
    print(f"\nPooled over the {len(pairs)} pairs ({len(pairs) * len(args.top_seeds)} FIDs per arm and guidance)\n")
    print(markdown(["guidance", "DiT mean", "UNet mean", "DiT / UNet"],
                   [[key, f"{md:.2f}", f"{mu:.2f}", f"{md / mu:.2f}"] for key, (md, mu) in pooled.items()]))
    best_d = min(keys, key=lambda k: pooled[k][0])
    best_u = min(keys, key=lambda k: pooled[k][1])
    print(f"\nEach arm at its best guidance, pooled: DiT {pooled[best_d][0]:.2f} (guidance {best_d}), UNet "
          f"{pooled[best_u][1]:.2f} (guidance {best_u}), DiT / UNet {pooled[best_d][0] / pooled[best_u][1]:.2f}")


# -- speed -------------------------------------------------------------------------------------------
def speed(args) -> None:
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import untrained_parent  # random weights of the family's config: speed does not need training

    from genai_cli.api import build_model
    from genai_cli.config import build_dataclass
    from genai_cli.models.base import ImageSpec, Stepper
    from genai_cli.models.diffusion import DIT_PRESETS
    from genai_cli.registry import MODELS

    class Train:
        lr, betas, weight_decay = 2e-4, [0.9, 0.999], 0.0

    precisions = ["fp32", "bf16"] if cpu_native_bf16() else ["fp32"]
    keep_freed_memory()  # the heap as a training process of the toolkit keeps it (train.assemble)

    def rate(family, spec, fields, parents, precision) -> tuple[int, float]:
        torch.manual_seed(0)
        cfg = build_dataclass(MODELS.get(family).Config, {"class_conditional": True, **fields}, "model")
        model = build_model(family, cfg, spec, parents).train()
        opts, stepper = model.configure_optimizers(Train), Stepper()
        x, y = torch.rand(args.batch, *spec.shape), torch.arange(args.batch) % 10
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            model.train_step((x, y), opts, stepper)  # warm-up
            start = time.process_time()  # this process's CPU time: steadier than the wall clock on a shared CPU
            for _ in range(args.steps):
                model.train_step((x, y), opts, stepper)
            seconds = time.process_time() - start
        return sum(p.numel() for p in model.unet.parameters()), args.batch * args.steps / seconds

    mnist, cifar = ImageSpec(1, 28, 10), ImageSpec(3, 32, 10)
    ae_cfg = {k: v for k, v in load_config(ROOT / AUTOENCODER).to_dict()["model"].items() if k != "family"}
    ae = {"autoencoder": untrained_parent("spatial_ae", mnist, **ae_cfg)}
    rows = []
    for label, family, spec, parents in [("ddpm", "ddpm", mnist, None), ("ddpm", "ddpm", cifar, None),
                                         ("latent_ddpm", "latent_ddpm", mnist, ae)]:
        extra = {"autoencoder": "ae"} if parents else {}
        for backbone, size in [("unet", "S"), *(("dit", s) for s in DIT_PRESETS)]:
            cells = []
            for precision in precisions:
                params, images = rate(family, spec, {"backbone": backbone, "size": size, **extra}, parents, precision)
                cells.append(f"{images:.1f}")
            shape = "4x7x7 latents" if parents else "x".join(map(str, spec.shape))
            rows.append([label, f"{backbone} {size}", shape, f"{params:,}", *cells])
            log(" | ".join(rows[-1]))
    print(f"\nDiT presets (and the UNet S preset beside them): training images per CPU-second (batch {args.batch}, "
          f"forward + backward + AdamW, mean of {args.steps} steps after one warm-up); {machine()}\n")
    print(markdown(["family", "backbone", "shape", "parameters", *(f"images / CPU-s {p}" for p in precisions)], rows,
                   right={3, 4, 5}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("study", help="DiT and UNet presets against training FLOPs in one latent space")
    s.add_argument("--budgets", type=float, nargs="+", default=[8.0, 24.0, 72.0, 200.0],
                   help="CPU seconds of training at which each arm is scored")
    s.add_argument("--arms", default="unet:S,dit:S,unet:M,dit:B,unet:L,dit:L")
    s.add_argument("--samples", type=int, default=200)
    s.add_argument("--steps", type=int, default=8, help="DPM-Solver++(2M) steps per sample")
    s.add_argument("--top-samples", type=int, default=0,
                   help="score the largest budget again with this many samples at each of --top-seeds (0: not)")
    s.add_argument("--top-seeds", type=int, nargs="+", default=[1, 2, 3])
    s.add_argument("--val-images", type=int, default=256)
    s.add_argument("--ae-seconds", type=float, default=60.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="every arm's train.precision (fp32: the same for all; bf16/auto: the machine's native one)")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every arm (after the study's own), e.g. train.lr=1e-3 for a pilot")
    s.add_argument("--resume", action="store_true", help="keep the arms OUT/scaling.json already has")
    s.add_argument("--out", type=Path, default=OUT, help="where scaling.png and scaling.json go")
    s.add_argument("--name", default="bench-scaling",
                   help="runs go to benchmarks/runs/NAME-<backbone>-<size> (a pilot's own NAME keeps the study's runs)")
    s.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="scaling.json files of the same study whose arms are kept (arms split over processes)")
    r = sub.add_parser("rescore", help="the study's saved snapshots scored again at other guidance scales")
    r.add_argument("--pairs", nargs="+", required=True, metavar="DIT_RUN:UNET_RUN",
                   help="run names under benchmarks/runs/, a DiT's and the UNet it is compared with")
    r.add_argument("--guidance", type=float, nargs="+", default=[1.25, 1.5, 2.0, 2.5, 3.0])
    r.add_argument("--budget", type=float, default=200.0, help="which snapshot: checkpoints/budget_<BUDGET>.pt")
    r.add_argument("--top-samples", type=int, default=1000, help="samples per seed")
    r.add_argument("--top-seeds", type=int, nargs="+", default=[1, 2, 3])
    r.add_argument("--steps", type=int, default=8, help="DPM-Solver++(2M) steps per sample")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", type=Path, default=OUT / "rescore.json",
                   help="where every seed's scores go as measured (and what a second call skips)")
    e = sub.add_parser("extend", help="train the study's runs on past their largest budget, saving new snapshots")
    e.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="run names under benchmarks/runs/")
    e.add_argument("--budgets", type=float, nargs="+", required=True,
                   help="total CPU seconds of training (the study's included) at which to save a snapshot")
    e.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("speed", help="training images/s of every DiT preset, fp32 and bf16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"study": study, "rescore": rescore, "extend": extend, "speed": speed}[args.command](args)


if __name__ == "__main__":
    main()
