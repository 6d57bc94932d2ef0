"""Start-up time of ``genai sample`` and ``genai inspect`` against ``python -c "import torch"`` (issue 18, section 2).

    python benchmarks/bench_startup.py [--repeats 5] [--quick] [--tree PATH]

Trains a tiny text run (a 1-block transformer on a repeated sentence) and a tiny image run (PixelCNN on 8x8
shapes), a few seconds each, then times whole processes: ``import torch`` and each genai command run as pairs,
one right after the other, so that a busy machine slows both members of a pair alike. The pairs are interleaved
(each round takes the commands in another order) and the ratio command / import torch is taken pair by pair;
the table gives the medians. ``--tree`` times the genai_cli package of another checkout (e.g. an older commit
unpacked with ``git archive``), for before / after figures from the same venv on the same machine.
Runs go to benchmarks/runs/startup/ (ignored by git). ``--quick``: 2 rounds, a check that it runs, not figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genai_cli.hardware import machine_line  # noqa: E402

RUNS = ROOT / "benchmarks" / "runs" / "startup"
TARGET = 1.3  # issue 18: at most 1.3x the wall time of import torch

TRAIN = {"max_steps": 4, "batch_size": 8, "log_every": 2, "eval_every": 4, "checkpoint_every": 4, "sample_every": 4,
         "sample_n": 2, "warmup_steps": 1, "eval_max_images": 16, "precision": "fp32", "ema_decay": None}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def genai(*args: str) -> list[str]:
    # -m from the tree's root: its genai_cli comes first on sys.path (before the venv's editable install)
    return [sys.executable, "-m", "genai_cli", *args]


def train_runs(tree: Path, root: Path) -> dict[str, Path]:
    """The tiny text and image runs under ``root``, trained with ``tree``'s package (kept when they exist)."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    configs = {
        "text": {"model": {"family": "transformer", "d_model": 16, "heads": 2, "layers": 1},
                 "data": {"name": "text_file", "path": str(corpus), "block_size": 12},
                 "train": TRAIN, "sample": {"n": 1, "max_new_tokens": 16}},
        "image": {"model": {"family": "pixelcnn", "channels": 12, "layers": 2, "levels": 4},
                  "data": {"name": "shapes", "image_size": 8, "limit": 64},
                  "train": TRAIN, "sample": {"n": 4}},
    }
    runs = {}
    for name, cfg in configs.items():
        run = root / name
        if not (run / "checkpoints" / "last.pt").is_file():
            path = root / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            log(f"training the tiny {name} run")
            subprocess.run(genai("train", str(path), "--runs-dir", str(root), "--name", name, "--force", "-q"),
                           cwd=tree, check=True)
        runs[name] = run
    return runs


def wall(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each command is timed once per round")
    parser.add_argument("--quick", action="store_true", help="2 rounds: check that it runs")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose genai_cli is timed")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    tree = args.tree.resolve()
    if not (tree / "genai_cli" / "__init__.py").is_file():
        parser.error(f"--tree {tree} has no genai_cli package")
    runs = train_runs(tree, RUNS / ("this" if tree == ROOT else tree.name))
    out = Path(tempfile.mkdtemp(prefix="genai-startup-"))
    commands = {
        "sample text run (--prompt, 1 new token)": genai("sample", str(runs["text"]), "--prompt", "the",
                                                         "--max-new-tokens", "1", "-n", "1", "-q",
                                                         "--out", str(out / "s.txt")),
        "sample image run (-n 1)": genai("sample", str(runs["image"]), "-n", "1", "-q",
                                         "--out", str(out / "s.png")),
        "inspect text run": genai("inspect", str(runs["text"])),
        "inspect image run": genai("inspect", str(runs["image"])),
    }
    torch_cmd = [sys.executable, "-c", "import torch"]
    wall(torch_cmd, tree)  # warm the file cache: the first process pays for reading the libraries from disk
    for cmd in commands.values():
        wall(cmd, tree)
    times: dict[str, list[float]] = {name: [] for name in commands}
    torch_times: list[float] = []
    ratios: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # each command leads a round in turn
        for name in order:
            base = wall(torch_cmd, tree)
            took = wall(commands[name], tree)
            torch_times.append(base)
            times[name].append(took)
            ratios[name].append(took / base)
        log(f"round {r + 1}/{repeats}: " + ", ".join(f"{n.split(' (')[0]} {ratios[n][-1]:.2f}x" for n in names))

    print(f"\nStart-up, {repeats} rounds of pairs (import torch, then the command), median of each; "
          f"tree {tree}{' (--quick)' if args.quick else ''}\n")
    print(f"Machine: {machine_line()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| command | wall s (median) | ratio to import torch (median of pairs) | min - max ratio | "
          f"target <= {TARGET}x |")
    print("|---|---:|---:|---:|:---:|")
    print(f"| `python -c \"import torch\"` | {statistics.median(torch_times):.2f} | 1.00 | | |")
    for name in names:
        ratio = statistics.median(ratios[name])
        print(f"| genai {name} | {statistics.median(times[name]):.2f} | **{ratio:.2f}** | "
              f"{min(ratios[name]):.2f} - {max(ratios[name]):.2f} | {'met' if ratio <= TARGET else 'not met'} |")


if __name__ == "__main__":
    main()
