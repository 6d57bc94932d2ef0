"""Issue 14: each family's failure, reproduced, beside the remedy that exists for it, measured.

    python benchmarks/bench_lessons.py [--only mode_collapse,vanishing,posterior_collapse,overconfidence]
    python benchmarks/bench_lessons.py --readme        # also writes the table into benchmarks/README.md
    python benchmarks/bench_lessons.py --quick         # a few steps each: checks the script end to end, no figures

Every lesson is a set of bundled configs (``configs/lesson_<failure>_<variant>.yaml``) that differ only in the
remedy; each is trained for its own steps through the toolkit's Trainer (the code of ``genai train``), under
``benchmarks/runs/lesson-<config>``, so ``genai inspect`` / ``genai sample`` work on them afterwards. Then:

    mode collapse       1,000 samples in the mnist5k evaluator: classes holding >= 2 % of them, the class-share
                        entropy / log 10; and over training, the share of the most frequent class in each
                        grid, averaged (collapse and hopping at any time, not only at the end); picture: the
                        last training grids and the class history of every grid
    vanishing gradient  the generator's gradient norm and D(G(z)) logged at every one of the first steps (the two
                        configs start from the same weights: same seed); picture: both curves and the grids
    posterior collapse  active units (Var_x E[z_u|x] > 0.01) and KL(q(z|x) || p(z)) on the validation split;
                        picture: the KL over training and the reconstructions of validation digits
    over-confidence     ECE (15 bins) on the held-out half of the validation split, before and after the
                        temperature fitted on the other half (``genai evaluate --calibrate``); picture: the
                        reliability diagrams

A lesson is reported as reproduced only when its failure config shows the failure by the threshold in ``FAILS``;
otherwise the table says "not reproduced". Pictures go to benchmarks/lessons/ (tracked) or, with --quick, to
benchmarks/runs/lessons-quick/.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bench_common import RUNS, evaluator_for, log, machine, markdown

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genai_cli.config import load_config  # noqa: E402
from genai_cli.data import peek_spec  # noqa: E402
from genai_cli.evaluation.calibrate import calibrate_run  # noqa: E402
from genai_cli.evaluation.evaluator import evaluator_outputs  # noqa: E402
from genai_cli.evaluation.metrics import class_statistics  # noqa: E402
from genai_cli.evaluation.report import draw_class_shares, draw_reliability, sample_grids  # noqa: E402
from genai_cli.runs import MetricsLog, new_run  # noqa: E402
from genai_cli.train import Trainer  # noqa: E402

PICTURES = ROOT / "benchmarks" / "lessons"
README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- lessons: written by bench_lessons.py --readme -->", "<!-- /lessons -->"
SAMPLES = 1000
FIRST_STEPS = 100  # the vanishing-gradient lesson averages the first this many steps
# --quick: a few steps on a few images, every schedule firing, so every code path runs; no figures.
QUICK = ["train.max_steps=4", "data.limit=64", "train.batch_size=16", "train.eval_max_images=32", "train.sample_n=8",
         "train.sample_every=2", "train.eval_every=2", "train.checkpoint_every=4", "train.log_every=1"]


@dataclass
class Lesson:
    key: str
    failure: str
    measure: str
    configs: list[tuple[str, str]]  # (what the variant is, config stem); the first one shows the failure


LESSONS = [
    Lesson("mode_collapse", "Mode collapse (GAN)", "classes >= 2 % of 1,000 samples / class entropy at the end / "
           "top-class share of the training grids, mean",
           [("DCGAN", "lesson_mode_collapse_dcgan"), ("+ minibatch discrimination", "lesson_mode_collapse_minibatch"),
            ("conditional GAN", "lesson_mode_collapse_cgan")]),
    Lesson("vanishing", "Vanishing generator gradient", f"G gradient norm / D(G(z)), mean of steps 1-{FIRST_STEPS}",
           [("minimax loss", "lesson_vanishing_minimax"), ("non-saturating loss", "lesson_vanishing_nonsaturating")]),
    Lesson("posterior_collapse", "Posterior collapse (VAE)", "active units of 16 / KL (nats)",
           [("PixelCNN decoder", "lesson_posterior_collapse_vae"), ("+ KL warm-up", "lesson_posterior_collapse_warmup"),
            ("+ free bits", "lesson_posterior_collapse_free_bits")]),
    Lesson("overconfidence", "Over-confidence (classifier)", "ECE / NLL (nats) on held-out digits",
           [("overfit classifier", "lesson_overconfidence_classifier"),
            ("label smoothing", "lesson_overconfidence_label_smoothing")]),
]


# -- training -----------------------------------------------------------------------------------
def train(stem: str, extra: list[str]) -> tuple[Trainer, Path, float]:
    cfg = load_config(ROOT / "configs" / f"{stem}.yaml", extra)
    run = new_run(RUNS, f"lesson-{stem}", stem, force=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    trainer = Trainer(cfg, run, quiet=True)
    start = time.process_time()
    trainer.fit()
    seconds = time.process_time() - start
    log(f"{stem}: {trainer.step} steps, {seconds:.0f} CPU s")
    return trainer, run, seconds


def last_grid(run: Path, prefix: str = "step_") -> Path:
    grids = sorted((run / "samples").glob(f"{prefix}*.png"))
    return grids[-1]


def records(run: Path, split: str) -> list[dict]:
    return [r for r in MetricsLog(run / "metrics.jsonl").read() if r.get("split") == split]


# -- measures -----------------------------------------------------------------------------------
def class_coverage(trainer: Trainer, n: int) -> dict:
    """Classes of n samples (seed 0, the labels in turn for the conditional GAN) in the mnist5k evaluator."""
    model = trainer.sampling_model().eval()
    evaluator, _, _ = evaluator_for(trainer.cfg.data, trainer.data.spec)
    with torch.no_grad():
        images = model.sample(n, generator=torch.Generator().manual_seed(0))
    _, probs = evaluator_outputs(evaluator, images.float().clamp(0, 1), torch.device("cpu"))
    return class_statistics(probs)


def measure(lesson: Lesson, trainer: Trainer, run: Path, n: int) -> dict:
    if lesson.key == "mode_collapse":
        stats = class_coverage(trainer, n)
        grids = sample_grids(MetricsLog(run / "metrics.jsonl").read())
        # Collapse or hopping at any time of training, not only at its end: the share of the most frequent class
        # in each grid, averaged over the grids (0.1 for ten classes drawn evenly, 1 for one digit throughout).
        top_share = float(np.mean([max(r["class_histogram"]) / sum(r["class_histogram"]) for r in grids]))
        dominant = [int(np.argmax(r["class_histogram"])) for r in grids]
        return {"covered": stats["classes_covered"], "entropy": stats["class_entropy"],
                "histogram": stats["class_histogram"], "top_share": top_share,
                "dominant_classes": len(set(dominant)),
                "cell": f"{stats['classes_covered']} / {stats['class_entropy']:.2f} / {top_share:.2f}"}
    if lesson.key == "vanishing":
        steps = [r for r in records(run, "train") if r["step"] <= FIRST_STEPS]
        g = float(np.mean([r["grad_norm_g"] for r in steps]))
        d = float(np.mean([r["d_g_z"] for r in steps]))
        return {"grad_norm_g": g, "d_g_z": d, "cell": f"{g:.3g} / {d:.3f}"}
    if lesson.key == "posterior_collapse":
        val = records(run, "val")[-1]
        return {"active": val["val_active_units"], "kl": val["val_kl_total"], "nelbo": val.get("val_nll_nats"),
                "cell": f"{val['val_active_units']:.0f} / {val['val_kl_total']:.2f}"}
    report = calibrate_run(str(run), root=RUNS)
    return {**report, "cell": f"{report['ece_before']:.3f} / {report['nll_before']:.3f} (accuracy "
                              f"{report['accuracy']:.3f})"}


# Does the failure config fail? (the threshold a lesson must pass to be reported as reproduced)
FAILS = {
    "mode_collapse": lambda m: m["covered"] <= 6 or m["entropy"] < 0.8 or m["top_share"] > 0.5,
    "vanishing": lambda m, other: m["grad_norm_g"] < 0.1 * other["grad_norm_g"],
    "posterior_collapse": lambda m: m["active"] <= 1,
    "overconfidence": lambda m: m["ece_before"] > 0.03 and m["temperature"] > 1.2,  # sure beyond its accuracy
}


def reproduced(lesson: Lesson, results: list[dict]) -> bool:
    if lesson.key == "vanishing":
        return FAILS["vanishing"](results[0], results[1])
    return FAILS[lesson.key](results[0])


# -- pictures -----------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show_png(ax, path: Path, title: str) -> None:
    from PIL import Image

    ax.imshow(np.asarray(Image.open(path).convert("RGB")))
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def picture(lesson: Lesson, runs: list[Path], results: list[dict], path: Path) -> Path:
    plt = _plt()
    labels = [label for label, _ in lesson.configs]
    k = len(runs)
    if lesson.key == "mode_collapse":
        fig, axes = plt.subplots(2, k, figsize=(3.6 * k, 7.2), height_ratios=[1.1, 1])
        for col, (run, label, r) in enumerate(zip(runs, labels, results)):
            show_png(axes[0, col], last_grid(run), f"{label}\nlast training grid")
            draw_class_shares(axes[1, col], sample_grids(MetricsLog(run / "metrics.jsonl").read()), colorbar=False)
            axes[1, col].set_title(f"classes of every grid; 1,000 samples: {r['covered']} classes, "
                                   f"entropy {r['entropy']:.2f}", fontsize=8)
    elif lesson.key == "vanishing":
        fig, axes = plt.subplots(1, 2 + k, figsize=(4.2 * (2 + k), 3.6))
        for run, label in zip(runs, labels):
            steps = records(run, "train")
            x = [r["step"] for r in steps]
            axes[0].semilogy(x, [max(r["grad_norm_g"], 1e-12) for r in steps], label=label)
            axes[1].plot(x, [r["d_g_z"] for r in steps], label=label)
        axes[0].set_title("generator gradient norm", fontsize=9)
        axes[1].set_title("D(G(z)) before the G step", fontsize=9)
        for ax in axes[:2]:
            ax.set_xlabel("step")
            ax.axvline(FIRST_STEPS, color="grey", lw=0.5, ls=":")
            ax.legend(fontsize=8)
        for ax, run, label in zip(axes[2:], runs, labels):
            show_png(ax, last_grid(run), f"{label}: last training grid")
    elif lesson.key == "posterior_collapse":
        fig, axes = plt.subplots(1, 1 + k, figsize=(4.0 * (1 + k), 3.8))
        for run, label in zip(runs, labels):
            val = records(run, "val")
            axes[0].semilogy([r["step"] for r in val], [max(r["val_kl_total"], 1e-4) for r in val], "o-", ms=3,
                             label=label)
        axes[0].set_title("KL(q(z|x) || p(z)), validation", fontsize=9)
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("nats per image")
        axes[0].legend(fontsize=8)
        for ax, run, label, r in zip(axes[1:], runs, labels, results):
            show_png(ax, last_grid(run, "recon_step_"), f"{label}: {r['active']:.0f} active units\n"
                                                         "validation digits (top), reconstructions")
    else:
        fig, axes = plt.subplots(2, 3, figsize=(10.5, 4.8), height_ratios=[3, 1])
        first, smooth = results
        panels = [(f"{labels[0]}, T = 1", {**first["reliability_before"], "ece": first["ece_before"]}),
                  (f"{labels[0]}, T = {first['temperature']:.2f}",
                   {**first["reliability_after"], "ece": first["ece_after"]}),
                  (f"{labels[1]}, T = 1", {**smooth["reliability_before"], "ece": smooth["ece_before"]})]
        for col, (label, bins) in enumerate(panels):
            draw_reliability(axes[0, col], axes[1, col], bins, label, legend=col == 0)
        axes[0, 0].set_ylabel("accuracy")
    fig.suptitle(lesson.failure, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- the table ----------------------------------------------------------------------------------
def table(done: list[tuple[Lesson, list[dict], bool, Path]], pictures: Path) -> str:
    rows = []
    for lesson, results, ok, pic in done:
        cells = [f"{label}: {r['cell']}" for (label, _), r in zip(lesson.configs, results)]
        if lesson.key == "overconfidence":  # the post-hoc remedy: the same run, its temperature fitted
            first = results[0]
            cells.insert(1, f"temperature scaling (T = {first['temperature']:.2f}): {first['ece_after']:.3f} / "
                            f"{first['nll_after']:.3f}")
        remedies = " <br> ".join(cells[1:])
        link = pic.relative_to(README.parent) if pic.is_relative_to(README.parent) else pic
        rows.append([lesson.failure, lesson.measure, cells[0], remedies,
                     "yes" if ok else "**not reproduced**", f"[{pic.name}]({link})"])
    return markdown(["failure", "measure", "without the remedy", "with each remedy", "failure shown", "picture"],
                    rows, right=set())


def write_readme(text: str) -> None:
    readme = README.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in readme and END in readme:
        readme = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)
    else:
        readme = readme.rstrip("\n") + "\n\n## Lessons: the failures, reproduced (issue 14)\n\n" + block + "\n"
    README.write_text(readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated lessons: " + ", ".join(x.key for x in LESSONS))
    parser.add_argument("--quick", action="store_true", help="a few steps each: checks the script, no figures")
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    args = parser.parse_args()
    chosen = [x for x in LESSONS if not args.only or x.key in args.only.split(",")]
    if args.only and len(chosen) != len(args.only.split(",")):
        parser.error(f"--only takes {', '.join(x.key for x in LESSONS)}")
    if args.quick and args.readme:
        parser.error("--quick is a smoke test, not figures: it does not write the README")
    extra = QUICK if args.quick else []
    pictures = RUNS / "lessons-quick" if args.quick else PICTURES
    done = []
    cpu = 0.0
    for lesson in chosen:
        if lesson.key == "mode_collapse":  # the evaluator must exist before training, for the grids to be scored
            cfg = load_config(ROOT / "configs" / f"{lesson.configs[0][1]}.yaml")
            evaluator_for(cfg.data, peek_spec(cfg.data))
    for lesson in chosen:
        results, runs = [], []
        for _, stem in lesson.configs:
            trainer, run, seconds = train(stem, extra)
            cpu += seconds
            results.append(measure(lesson, trainer, run, 50 if args.quick else SAMPLES))
            runs.append(run)
            print(json.dumps({"config": stem, **{k: v for k, v in results[-1].items()
                                                   if isinstance(v, (int, float, str))}}), flush=True)
        ok = reproduced(lesson, results)
        pic = picture(lesson, runs, results, pictures / f"{lesson.key}.png")
        done.append((lesson, results, ok, pic))
    text = (f"`python benchmarks/bench_lessons.py{' --quick' if args.quick else ''}`: {cpu / 60:.0f} CPU minutes "
            f"of training in all.\n{machine()}\n\n{table(done, pictures)}")
    print("\n" + text)
    if args.readme:
        write_readme(text)
        log(f"table written to {README}")


if __name__ == "__main__":
    main()
