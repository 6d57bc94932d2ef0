"""Few-step students of the demo's DDPM (issue 20, section 2): the teacher at 20 steps against its distilled
student at 1, 2 and 4 steps: quality, sampling speed, and what the distillation cost.

    python benchmarks/bench_distill.py [--teacher RUN] [--teacher-budget CPU_S] [--set model.pairs=2048 ...]
        [--budget CPU_S] [--samples 500] [--threads 2]

The teacher is RUN, or benchmarks/runs/quickstart (trained there first with configs/quickstart.yaml when missing,
as ``make demo`` trains it; ``--teacher-budget`` stops that training after so many CPU seconds instead, for a
machine too loaded to train the demo in time). The student is configs/distill_quickstart.yaml with that teacher
(``--set`` overrides any key), trained under benchmarks/runs/distill-quickstart, for ``--budget`` CPU seconds when
given (the pairs included) or for the config's steps. Both are judged in the toolkit's evaluator (the mnist5k
classifier): ``--samples`` images each from the same seed (the teacher with its sampling defaults: DPM-Solver++(2M),
20 steps, guidance 2; the student with the same labels, one column per digit), classifier-FID and the share
classified with p >= 0.9. Speed: seconds per 64 images, teacher and student drawn alternately (best of 2), in one
process, so a neighbour's load falls on both. The distillation's cost: CPU seconds of the pairs and of training.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import RUNS, BudgetTrainer, evaluator_for, log, machine, markdown

from genai_cli.api import model_from_state
from genai_cli.config import from_dict, load_config
from genai_cli.data import load_data
from genai_cli.evaluation.run import draw_samples, sample_quality
from genai_cli.runs import load_checkpoint_file, new_run, resolve_checkpoint
from genai_cli.session import start_run

CONFIGS = RUNS.parent.parent / "configs"
STUDENT_STEPS = (1, 2, 4)


def budget_run(config: str, name: str, budget: float, overrides: list[str]):
    """A run of ``config`` under benchmarks/runs/NAME stopped after ``budget`` CPU seconds (bench_common.BudgetTrainer),
    wherever the wall clock is; returns the Trainer, trained."""
    from rich.console import Console

    cfg = load_config(CONFIGS / config, ["train.max_steps=1000000", "train.max_seconds=null", *overrides])
    RUNS.mkdir(parents=True, exist_ok=True)
    run = new_run(RUNS, name, name, force=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    trainer = BudgetTrainer(cfg, run, quiet=True, budget=budget, console=Console(stderr=True))
    trainer.fit()
    return trainer


def teacher_run(ref: str | None, budget: float | None):
    if ref is not None:
        return resolve_checkpoint(ref, RUNS)
    ckpt = RUNS / "quickstart" / "checkpoints" / "last.pt"
    if not ckpt.exists():
        log("training configs/quickstart.yaml under benchmarks/runs/quickstart (the demo's run)")
        if budget is None:
            start_run(load_config(CONFIGS / "quickstart.yaml"), RUNS, name="quickstart", force=True, quiet=True).fit()
        else:
            # fp32, what auto's probe picks on the loaded Xeon; the probe alone took 4 minutes there under load
            budget_run("quickstart.yaml", "quickstart", budget, ["train.sample_every=1000000", "train.precision=fp32"])
    return ckpt


def distil(teacher_ckpt, overrides: list[str], budget: float | None) -> tuple[object, float, dict]:
    """The student run's checkpoint, the CPU seconds its run took (pairs included), and its summary."""
    overrides = [f"model.teacher={teacher_ckpt}", *overrides]
    log(f"distilling {teacher_ckpt} (configs/distill_quickstart.yaml, {' '.join(overrides[1:]) or 'as it is'})")
    cpu = time.process_time()
    if budget is None:
        trainer = start_run(load_config(CONFIGS / "distill_quickstart.yaml", overrides), RUNS,
                            name="distill-quickstart", force=True, quiet=True)
        trainer.fit()
    else:
        trainer = budget_run("distill_quickstart.yaml", "distill-quickstart", budget, overrides)
    return RUNS / "distill-quickstart" / "checkpoints" / "last.pt", time.process_time() - cpu, trainer.summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--teacher-budget", type=float, default=None)
    parser.add_argument("--student", default=None, help="an existing student run: skip the distillation")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--timing-samples", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")

    teacher_ckpt = teacher_run(args.teacher, args.teacher_budget)
    if args.student is None:
        student_ckpt, distil_cpu, summary = distil(teacher_ckpt, args.overrides, args.budget)
    else:
        student_ckpt, distil_cpu, summary = resolve_checkpoint(args.student, RUNS), float("nan"), {}
    t_state, s_state = load_checkpoint_file(teacher_ckpt), load_checkpoint_file(student_ckpt)
    teacher, student = model_from_state(t_state).to(cpu), model_from_state(s_state).to(cpu)
    cfg = from_dict(t_state["config"], source=str(teacher_ckpt))
    data = load_data(cfg.data)
    evaluator, accuracy, _ = evaluator_for(cfg.data, data.spec)
    t_options = cfg.sample.options()  # the demo's: dpm++2m, 20 steps, guidance 2

    def judged(model, options):
        fake, _ = draw_samples(model, args.samples, args.seed, options, cpu)
        return sample_quality(evaluator, data, fake, cpu, args.seed)

    def seconds(model, options) -> float:
        return draw_samples(model, args.timing_samples, args.seed, options, cpu)[1] / args.timing_samples * 64

    rows_q = {"teacher": judged(teacher, t_options)}
    log(f"teacher: FID {rows_q['teacher']['classifier_fid']:.2f}, confident {rows_q['teacher']['confident_share']:.3f}")
    for k in STUDENT_STEPS:
        rows_q[k] = judged(student, {"steps": k})
        log(f"student {k}: FID {rows_q[k]['classifier_fid']:.2f}, confident {rows_q[k]['confident_share']:.3f}")
    timings = {key: [] for key in rows_q}
    for _ in range(2):  # alternate, so a neighbour's load falls on every row
        timings["teacher"].append(seconds(teacher, t_options))
        for k in STUDENT_STEPS:
            timings[k].append(seconds(student, {"steps": k}))
    best = {key: min(v) for key, v in timings.items()}

    tq = rows_q["teacher"]
    rows = []
    for key, q in rows_q.items():
        name = "teacher, DPM-Solver++(2M) 20, guidance 2" if key == "teacher" else f"student, {key} Euler step(s)"
        nfe = (teacher.network_evaluations(t_options) if key == "teacher"
               else student.network_evaluations({"steps": key}))
        classes = sum(1 for c in q["class_histogram"] if c > 0)
        rows.append([name, str(nfe), f"{best[key]:.3f}", f"{best['teacher'] / best[key]:.1f}x",
                     f"{q['classifier_fid']:.2f}", f"{q['classifier_fid'] / tq['classifier_fid']:.2f}",
                     f"{q['confident_share']:.3f}", f"{q['confident_share'] / tq['confident_share']:.2f}",
                     str(classes)])
    s_cfg = s_state["config"]["model"]
    print(f"\nTeacher {teacher_ckpt} (step {t_state['step']}); student {student_ckpt} (step {s_state['step']}, "
          f"{s_cfg['pairs']} pairs from the teacher's {s_cfg.get('teacher_sampler') or 'default'} "
          f"{s_cfg.get('teacher_steps') or 'default'} steps, guidance {s_cfg.get('guidance') or 'the teacher’s'}); "
          f"{args.samples} samples each, evaluator accuracy {accuracy:.4f}; {machine()}\n")
    print(markdown(["sampler", "network evals", "s / 64 images", "speed-up", "classifier-FID", "x teacher",
                    "p >= 0.9", "x teacher", "classes"], rows))
    pair_cpu = summary.get("pair_cpu_seconds", float("nan"))
    print(f"\nDistillation cost: {distil_cpu:.0f} CPU seconds in all ({pair_cpu:.0f} drawing the pairs, "
          f"{distil_cpu - pair_cpu:.0f} training {s_state['step']} steps); the network evaluation of a guided "
          "teacher step is one pass over a batch of 2n (cond + uncond), the student's one pass over n.")


if __name__ == "__main__":
    main()
