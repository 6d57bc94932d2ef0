"""Flow matching against DDPM at an equal CPU budget, same UNet, mnist5k; and the flow family's two levers (issue 20).

    python benchmarks/bench_flow.py [--budget 150] [--samples 500] [--threads 2] [--lik-images 32] [--quick]

Every arm trains with the toolkit's own loop for ``--budget`` seconds of process CPU time
(``bench_common.BudgetTrainer``: the cosine schedule re-planned to end where the budget does), on the 4,500 training
images of mnist5k, with the demo's network and recipe (16-channel UNet [1, 2, 2], batch 64, lr 2e-3, EMA 0.995):

ddpm, cond / uncond       configs/quickstart.yaml (v-prediction, min-SNR-5), class-conditional or not
flow, cond / uncond       configs/flow_mnist.yaml (uniform t, independent coupling), class-conditional or not
flow, logit-normal t      configs/flow_mnist.yaml with model.t_sampling=logit_normal (mean 0, std 1), cond
flow, OT coupling         configs/flow_mnist.yaml with model.coupling=ot, cond

``--samples`` images from each EMA model, drawn from the same seed (conditional arms: the classes in turn, guidance 2),
are judged in the evaluator network's features (genai evaluate's metrics): classifier-FID and the share classified
with p >= 0.9, at 10 and 20 network evaluations (ddpm: DPM-Solver++(2M) at 10 and 20 steps; flow: Euler at 10 and
20 steps, Heun at 5 and 10). The network evaluations are counted (``network_calls``), not assumed. Then the
likelihood: the unconditional flow's bits/dim estimate (ODE + Hutchinson, dequantised) with its standard error, and
the unconditional DDPM's variational bound, on the same ``--lik-images`` validation images.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from bench_common import ROOT, RUNS, BudgetTrainer, log, machine, markdown, mnist5k_with_evaluator
from rich.console import Console

from genai_cli.config import load_config
from genai_cli.data import to_float
from genai_cli.evaluation.run import draw_samples, load_run, sample_quality
from genai_cli.runs import new_run, save_grid

QUIET = ["train.max_steps=1000000", "train.max_seconds=null", "train.eval_every=1000000",
         "train.sample_every=1000000", "train.checkpoint_every=1000000", "train.log_every=100", "train.sample_n=20"]
UNCOND = ["model.class_conditional=false", "model.guidance=1.0", "sample.guidance=null"]
ARMS = [  # (name, config, overrides, sampler rows: (sampler, steps)), most wanted first
    ("ddpm cond", "configs/quickstart.yaml", [], [("dpm++2m", 20), ("dpm++2m", 10)]),
    ("flow cond", "configs/flow_mnist.yaml", [], [("euler", 20), ("heun", 10), ("euler", 10), ("heun", 5)]),
    ("flow cond, logit-normal t", "configs/flow_mnist.yaml", ["model.t_sampling=logit_normal"], [("heun", 10)]),
    ("flow cond, OT coupling", "configs/flow_mnist.yaml", ["model.coupling=ot"], [("heun", 10)]),
    ("ddpm uncond", "configs/quickstart.yaml", UNCOND, [("dpm++2m", 20), ("dpm++2m", 10)]),
    ("flow uncond", "configs/flow_mnist.yaml", UNCOND, [("euler", 20), ("heun", 10), ("euler", 10), ("heun", 5)]),
]
HEADER = ["model", "steps trained", "CPU s", "sampler", "network evaluations", "classifier-FID", "p >= 0.9",
          "precision", "recall", "classes >= 2 %"]


def slug(name: str) -> str:
    return name.replace(",", "").replace(";", "+").replace(" ", "-")


def train_arm(name: str, config: str, overrides: list[str], budget: float, data, reuse: bool = False):
    """(run folder, steps, CPU seconds, cfg) of the arm trained for ``budget`` CPU seconds; with ``reuse``, a run of
    the same config and budget trained before (by another process: the machine is shared) is taken as it is."""
    cfg = load_config(ROOT / config, [*QUIET, *overrides])
    folder = "bench-flow-" + slug(name)
    run = RUNS / folder
    if reuse and (run / "checkpoints" / "last.pt").is_file() and (run / "config.yaml").read_text() == cfg.to_yaml():
        state = load_run(str(run), RUNS)[1]
        cpu_file = run / "bench_cpu_seconds.txt"
        cpu_s = float(cpu_file.read_text()) if cpu_file.is_file() else float("nan")
        log(f"{name}: reusing {run} (step {state['step']})")
        return run, int(state["step"]), cpu_s, cfg
    RUNS.mkdir(parents=True, exist_ok=True)
    run = new_run(RUNS, folder, folder, force=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    start = time.process_time()
    trainer = BudgetTrainer(cfg, run, data=data, quiet=True, budget=budget, console=Console(stderr=True))
    trainer.fit()
    (run / "bench_cpu_seconds.txt").write_text(f"{time.process_time() - start:.1f}")
    return run, trainer.step, time.process_time() - start, cfg


def likelihood(models, data, args, lik) -> None:
    """bits/dim of the first ``--lik-images`` validation images (with their labels: log p(x | y)) under the
    conditional flow (the estimate) and the conditional DDPM (its variational bound), into ``lik``."""
    k = args.lik_images
    batch = (to_float(data.val_x[:k]), data.val_y[:k])
    dims = math.log(2) * data.spec.dims
    g = torch.Generator().manual_seed(args.seed)
    flow, ddpm = models["flow cond"], models["ddpm cond"]
    before, start = flow.network_calls, time.perf_counter()
    bits = -flow.likelihood_estimate(batch, generator=g).double() / dims
    lik["flow"] = (float(bits.mean()), float(bits.std()) / math.sqrt(k), flow.network_calls - before,
                   time.perf_counter() - start)
    start = time.perf_counter()
    bound = -ddpm.variational_bound(batch, ddpm.bound_strata, generator=g).double() / dims
    lik["ddpm"] = (float(bound.mean()), float(bound.std()) / math.sqrt(k), None, time.perf_counter() - start)
    print(likelihood_table(lik, args, models), flush=True)


def likelihood_table(lik, args, models) -> str:
    return (f"\nbits/dim of {args.lik_images} validation images given their labels (8-bit; +- standard error over "
            f"the images):\n" + markdown(["model", "bits/dim", "+- s.e.", "what", "network evaluations", "seconds"], [
                ["flow cond", f"{lik['flow'][0]:.3f}", f"{lik['flow'][1]:.3f}",
                 "estimate: ODE (dopri5 1e-5) + Hutchinson trace, uniform dequantisation", str(lik["flow"][2]),
                 f"{lik['flow'][3]:.0f}"],
                ["ddpm cond", f"{lik['ddpm'][0]:.3f}", f"{lik['ddpm'][1]:.3f}",
                 f"variational bound, {models['ddpm cond'].bound_strata} stratified draws", "-",
                 f"{lik['ddpm'][3]:.0f}"]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=150.0, help="CPU seconds of training per arm")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lik-images", type=int, default=32, help="validation images of the likelihood rows")
    parser.add_argument("--only", default="", help="arm names separated by ';' (default: all): parts of the table "
                        "measured by separate processes, with the same settings")
    parser.add_argument("--reuse", action="store_true", help="take an arm's run trained before with the same config")
    parser.add_argument("--rows", type=int, default=4, help="at most this many sampler rows per arm (20 evaluations "
                        "first)")
    parser.add_argument("--likelihood-only", action="store_true",
                        help="only the likelihood rows, of the 'ddpm cond' and 'flow cond' runs trained before")
    parser.add_argument("--quick", action="store_true", help="3 CPU s per arm, 40 samples: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.budget, args.samples, args.lik_images = 3.0, 40, 4
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    _, data, evaluator = mnist5k_with_evaluator()

    rows, results, models, lik = [], {}, {}, {}
    out_name = "bench_flow.json" if not args.only else f"bench_flow-{slug(args.only)}.json"
    if args.likelihood_only:
        models = {name: load_run(str(RUNS / f"bench-flow-{slug(name)}"), RUNS)[2].to(cpu).eval()
                  for name in ("ddpm cond", "flow cond")}
        likelihood(models, data, args, lik)
        return
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER), flush=True)
    for name, config, overrides, samplers in ARMS:
        if args.likelihood_only or (args.only and name not in args.only.split(";")):
            continue
        log(f"{name}: {config} {' '.join(overrides)} for {args.budget:.0f} CPU s")
        run, steps, cpu_s, cfg = train_arm(name, config, overrides, args.budget, data, args.reuse)
        model = load_run(str(run), RUNS)[2].to(cpu).eval()
        models[name] = model
        for sampler, n_steps in samplers[:args.rows]:
            options = {**cfg.sample.options(), "sampler": sampler, "steps": n_steps}
            before = model.network_calls
            fake, secs = draw_samples(model, args.samples, args.seed, options, cpu)
            calls = model.network_calls - before
            chunks = math.ceil(args.samples / 250)  # draw_samples' sample() calls (SAMPLE_CHUNK)
            q = sample_quality(evaluator, data, fake, cpu, args.seed)
            key = f"{name} / {sampler} {n_steps}"
            results[key] = {"steps_trained": steps, "cpu_seconds": cpu_s, "nfe": calls / chunks,
                            "sample_seconds": secs, **{k: v for k, v in q.items() if k != "class_histogram"}}
            save_grid(fake[:100], RUNS / f"bench-flow-{slug(name)}-{sampler}{n_steps}.png", nrow=10)
            log(f"  {key}: {calls / chunks:g} evaluations, classifier-FID {q['classifier_fid']:.2f}, "
                f"p>=0.9 {q['confident_share']:.3f}, {secs:.1f} s")
            rows.append([name, str(steps), f"{cpu_s:.0f}", f"{sampler} {n_steps}", f"{calls / chunks:g}",
                         f"{q['classifier_fid']:.2f}", f"{q['confident_share']:.3f}", f"{q['precision']:.3f}",
                         f"{q['recall']:.3f}", str(q["classes_covered"])])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)  # as it comes: a shared machine may stop us
            (RUNS / out_name).write_text(json.dumps({"results": results, "budget": args.budget},
                                                             indent=2, default=float))
        if name == "flow cond" and "ddpm cond" in models and args.lik_images:
            likelihood(models, data, args, lik)

    (RUNS / out_name).write_text(json.dumps({"results": results, "likelihood": lik, "budget": args.budget},
                                                     indent=2, default=float))
    if not results:
        return
    print(f"\nFlow vs DDPM on mnist5k: {args.budget:.0f} CPU s of training each (process CPU time), {args.samples} "
          f"samples each (conditional: guidance 2, classes in turn); {machine()}; floor (train vs val) classifier-FID "
          f"{next(iter(results.values()))['reference_fid']:.2f}\n")
    print(markdown(HEADER, rows))
    if lik:
        print(likelihood_table(lik, args, models))
    for cond in ("cond", "uncond"):
        f20 = [results[k]["classifier_fid"] for k in results if k.startswith(f"flow {cond} /")
               and results[k]["nfe"] == 20]
        d20 = [results[k]["classifier_fid"] for k in results if k.startswith(f"ddpm {cond} /")
               and results[k]["nfe"] == 20]
        if f20 and d20:
            print(f"{cond}: best flow classifier-FID at 20 evaluations {min(f20):.2f} vs ddpm {min(d20):.2f} "
                  f"({'meets' if min(f20) <= min(d20) else 'misses'} the target flow <= ddpm)")


if __name__ == "__main__":
    main()
