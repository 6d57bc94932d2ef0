"""``make bench``: run every benchmark in turn, print their markdown tables, and keep them in one file.

    python benchmarks/run_all.py [--only ddpm_vs_diffusers throughput] [--quick]

Each entry is a script of this folder with its arguments (append yours to BENCHMARKS). ``--quick`` uses each
entry's small budget: a smoke test of the whole suite in minutes, not figures to report. The tables go to
stdout and to benchmarks/runs/results.md (ignored by git); progress goes to stderr. The diffusers
comparisons need the ``bench`` extra: pip install -e ".[bench]".
On a machine shared with others, hold the benchmark lock: flock /tmp/genai_bench.lock make bench
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, script and arguments, extra arguments for --quick)
BENCHMARKS: list[tuple[str, list[str], list[str]]] = [
    ("ddpm_vs_diffusers", ["bench_ddpm_vs_diffusers.py"],
     ["--budget", "20", "--samples", "100", "--select-samples", "50", "--steps", "10"]),
    ("throughput", ["bench_throughput.py"], ["--rounds", "2", "--steps", "1"]),
    ("samplers", ["bench_samplers.py"], ["--samples", "50", "--grid", "ddim:10", "dpm++2m:10", "--peer-samples", "20",
                                         "--peer-steps", "5"]),
    ("families", ["bench_families.py"], ["--budget", "15", "--samples", "50"]),
    ("ar_sampling", ["bench_ar_sampling.py"], ["--size", "12", "--n", "2"]),
    ("lessons", ["bench_lessons.py"], ["--quick"]),
    ("latent", ["bench_latent.py", "compare"], ["--budget", "30", "--ae-seconds", "10", "--samples", "50"]),
    ("masked", ["bench_masked.py"], ["--quick"]),
    ("text", ["bench_text.py"], ["--quick", "--data", "python_docs"]),
    ("decode", ["bench_decode.py"], ["--quick"]),
    ("startup", ["bench_startup.py"], ["--quick"]),
    ("precision", ["bench_precision.py"],
     ["--steps", "2", "--warmup", "1", "--chunks", "1", "--settings", "auto,fp32,bf16", "--matmul-size", "256"]),
    ("scaling", ["bench_scaling.py", "study"],
     ["--budgets", "2", "4", "--arms", "unet:S,dit:S", "--samples", "20", "--steps", "2", "--val-images", "64",
      "--out", str(HERE / "runs" / "scaling-quick")]),
    ("dit_speed", ["bench_scaling.py", "speed"], ["--steps", "1"]),
    ("heap", ["bench_heap.py"], ["--rounds", "1", "--steps", "2", "--warmup", "1", "--only", "ddpm (quickstart)"]),
    ("data", ["bench_data.py"], ["--quick"]),
    ("flow", ["bench_flow.py"], ["--quick"]),
    ("distill", ["bench_distill.py"], ["--teacher-budget", "10", "--set", "train.max_steps=2", "--set",
                                       "model.pairs=32", "--set", "model.held_out=8", "--samples", "32",
                                       "--timing-samples", "16"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="names: " + ", ".join(n for n, _, _ in BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="tiny budgets: check that everything runs")
    args = parser.parse_args()
    unknown = set(args.only or []) - {n for n, _, _ in BENCHMARKS}
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}")
    if importlib.util.find_spec("diffusers") is None:
        sys.exit("the benchmarks compare with diffusers, which is not installed: pip install -e \".[bench]\"")
    out_dir = HERE / "runs"
    out_dir.mkdir(exist_ok=True)
    report = [f"# genai benchmarks, {time.strftime('%Y-%m-%d %H:%M')}{' (--quick)' if args.quick else ''}\n"]
    failed = []
    for name, command, quick in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(HERE / command[0]), *command[1:], *(quick if args.quick else [])]
        print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        print(proc.stdout, flush=True)
        took = time.perf_counter() - start
        shown = ' '.join(['python', f'benchmarks/{command[0]}', *cmd[2:]])
        report.append(f"## {name}\n\n`{shown}` ({took:.0f} s)\n{proc.stdout}\n")
        if proc.returncode != 0:
            failed.append(name)
    (out_dir / "results.md").write_text("\n".join(report))
    print(f"tables written to {out_dir / 'results.md'}", file=sys.stderr)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
