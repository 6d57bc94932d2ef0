"""Data larger than memory (issue 22, section 1): peak memory of training on a streamed folder of 20,000 PNGs and on a
200 MB text read from its memory-mapped token ids, against the same model trained on a tiny in-memory set (the
model's own use), and the rate of the data path alone against the training step's.

    python benchmarks/bench_data.py [--images 20000] [--text-mb 200] [--steps 40] [--work /tmp/genai_bench_data]

The folder and the text are generated under --work once and reused (20,000 PNGs take a while). Each training runs
as ``genai train`` in a child process; its memory is the resident set of the process plus the private pages of its
DataLoader workers (/proc/PID/smaps_rollup; what a forked worker shares with its parent is counted once), sampled
every 250 ms. The data path alone: ``DataBundle.epoch_batches`` (the loop's
own reader: DataLoader workers decoding PNGs, or windows gathered from the map), timed over the same batches.
Targets: peak memory within 500 MB of the model's own use, the data path >= 2x the training step's images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from bench_common import ROOT, log, machine

from genai_cli.config import DataConfig
from genai_cli.data import load_data

RUNS = ROOT / "benchmarks" / "runs" / "data"
TARGET_MB, TARGET_RATIO = 500, 2.0


# -- the data, generated once -------------------------------------------------------------------
def make_folder(folder: Path, n: int, size: int = 64) -> Path:
    """n PNGs of size x size in 10 class folders: smooth random colour fields (upsampled 8x8 noise) with a bright
    disc, so they compress like photographs rather than like noise."""
    from PIL import Image, ImageDraw

    done = folder / ".complete"
    if done.is_file() and done.read_text() == f"{n} {size}":
        return folder
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(n):
        sub = folder / f"class_{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        x, y, r = (int(v) for v in rng.integers(8, size - 8, 3) // 2)
        ImageDraw.Draw(im).ellipse((x, y, x + r + 4, y + r + 4), fill=tuple(int(c) for c in rng.integers(128, 256, 3)))
        im.save(sub / f"{i:06d}.png")
        if (i + 1) % 5000 == 0:
            log(f"  {i + 1}/{n} PNGs ({time.perf_counter() - t0:.0f} s)")
    done.write_text(f"{n} {size}")
    return folder


def make_text(path: Path, mb: int) -> Path:
    """About mb MB of English-like text: words drawn from a 2,000-word vocabulary, lines of 60-100 characters."""
    if path.is_file() and path.stat().st_size >= mb * 10**6:
        return path
    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    p = 1 / np.arange(1, 27)
    vocab = ["".join(rng.choice(letters, rng.integers(1, 9), p=p / p.sum())) for _ in range(2000)]
    zipf = 1 / np.arange(1, 2001)
    tmp = path.with_suffix(".part")
    with open(tmp, "w") as f:
        written = 0
        while written < mb * 10**6:
            words = rng.choice(len(vocab), 200_000, p=zipf / zipf.sum())
            chunk = " ".join(vocab[w] for w in words).replace(" the ", ". The ") + "\n"
            f.write(chunk)
            written += len(chunk)
    tmp.replace(path)
    return path


# -- measuring a training run -------------------------------------------------------------------
def tree(pid: int) -> list[int]:
    """pid and its descendants (DataLoader workers)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            todo.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
        except OSError:
            pass
    return found


def resident_mb(pid: int) -> float:
    """The resident memory of a training process and its DataLoader workers: the process's RSS plus each worker's
    private pages (what it shares with its parent after the fork is in the parent's RSS already). Unlike PSS this
    does not shrink when other programs on the machine map the same libraries."""
    total = 0
    for p in tree(pid):
        keys = ("Rss:",) if p == pid else ("Private_Clean:", "Private_Dirty:")
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith(keys):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def train(name: str, data: dict, model: dict, train_cfg: dict, sample: dict) -> dict:
    """``genai train`` in a child process: its peak resident memory (MB) with its workers, and the loop's images/s.
    The closing validation and grid are kept small (32 images, 2 samples): the figures are the training steps'."""
    cfg = {"model": model, "data": data, "sample": sample,
           "train": {"log_every": 5, "eval_every": 10**6, "checkpoint_every": 10**6, "sample_every": 10**6,
                     "warmup_steps": 5, "ema_decay": None, "eval_max_images": 32, "sample_n": 2, **train_cfg}}
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # GENAI_PRECISION_PROBE=0: auto takes what the CPU reports without timing both precisions first (the same
    # precision in both runs of a pair, and no probe steps in the peak)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "GENAI_PRECISION_PROBE": "0"}
    child = subprocess.Popen([sys.executable, "-m", "genai_cli", "train", str(path), "--runs-dir", str(RUNS),
                              "--name", name, "--force", "-q"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak = 0.0
    while child.poll() is None:
        peak = max(peak, resident_mb(child.pid))
        time.sleep(0.25)
    if child.returncode != 0:
        raise SystemExit(f"training {name} failed ({child.returncode})")
    rows = [json.loads(line) for line in (RUNS / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_sec"] for r in rows if r.get("split") == "train"][1:]  # past the first (warm-up) record
    return {"peak_mb": peak, "train_rate": float(np.median(rates))}


def data_rate(data_cfg: dict, batch_size: int, batches: int) -> float:
    """Images (or sequences) per second of the loop's reader alone, past its first batch (worker start-up)."""
    data = load_data(DataConfig(**data_cfg))
    reader = data.epoch_batches(seed=0, epoch=0, start=0, batch_size=batch_size)
    next(reader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(reader)
    return batches * batch_size / (time.perf_counter() - t0)


def row(label: str, own: dict, big: dict, rate: float, unit: str) -> str:
    over = big["peak_mb"] - own["peak_mb"]
    ratio = rate / big["train_rate"]
    ok = "yes" if over <= TARGET_MB and ratio >= TARGET_RATIO else "**no**"
    return (f"| {label} | {own['peak_mb']:,.0f} | {big['peak_mb']:,.0f} | {over:+,.0f} | {big['train_rate']:,.1f} "
            f"| {own['train_rate']:,.1f} | {rate:,.0f} | {ratio:,.1f}x | {ok} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--text-mb", type=int, default=200)
    parser.add_argument("--steps", type=int, default=16, help="training steps of each run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/genai_bench_data"))
    parser.add_argument("--quick", action="store_true", help="2,000 PNGs, 20 MB of text, 10 steps: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.images, args.text_mb, args.steps = 2000, 20, 6
    args.work.mkdir(parents=True, exist_ok=True)
    log(f"generating (or reusing) {args.images} PNGs and {args.text_mb} MB of text under {args.work}")
    folder = make_folder(args.work / f"png{args.images}", args.images)
    text = make_text(args.work / f"text{args.text_mb}.txt", args.text_mb)
    small_folder = make_folder(args.work / "png256", 256)
    small_text = args.work / "small.txt"
    if not small_text.is_file():
        small_text.write_text(text.open().read(200_000))

    # Images: a small UNet (16 channels, 3 levels, no attention) at 64x64, batch 16, precision auto: a light model,
    # whose steps ask the most of the data path.
    unet = {"family": "ddpm", "base_channels": 16, "channel_mults": [1, 2, 2], "num_res_blocks": 1,
            "attention_levels": [], "timesteps": 1000}
    steps = {"max_steps": args.steps, "batch_size": 16, "log_every": 2}
    few_steps = {"sampler": "ddim", "steps": 2}
    image = {"name": "image_folder", "image_size": 64, "channels": 3}
    log("images: the model alone (256 PNGs in memory)")
    own = train("own_images", {**image, "path": str(small_folder)}, unet, steps, few_steps)
    log(f"images: {args.images} PNGs streamed")
    big = train("stream_images", {**image, "path": str(folder), "stream": True}, unet, steps, few_steps)
    log("images: the data path alone")
    t0 = time.perf_counter()
    indexed = load_data(DataConfig(**image, path=str(folder), stream=True))
    index_s = time.perf_counter() - t0
    rate = data_rate({**image, "path": str(folder), "stream": True}, 16, min(200, len(indexed) // 16 - 1))

    # Text: the gpt_shakespeare_char shape (4 layers, width 128, context 64), batch 12.
    gpt = {"family": "transformer", "d_model": 128, "heads": 4, "layers": 4, "dropout": 0.0}
    text_steps = {"max_steps": args.steps, "batch_size": 12, "log_every": 2}
    short = {"max_new_tokens": 16}
    for cache in (text.with_name(text.name + ".tokens"), text.with_name(text.name + ".tokens.json")):
        cache.unlink(missing_ok=True)  # time the tokenisation once
    t0 = time.perf_counter()
    tokens = load_data(DataConfig(name="text_file", path=str(text), block_size=64, stream=True))
    tokenise_s = time.perf_counter() - t0
    log("text: the model alone (200 kB in memory)")
    own_t = train("own_text", {"name": "text_file", "path": str(small_text), "block_size": 64}, gpt, text_steps, short)
    log(f"text: {args.text_mb} MB from the token map")
    mapped = {"name": "text_file", "path": str(text), "block_size": 64, "stream": True}
    big_t = train("map_text", mapped, gpt, text_steps, short)
    rate_t = data_rate(mapped, 12, 2000)

    print(f"\n{machine()} | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} | "
          f"load average {os.getloadavg()[0]:.1f} at the end (other jobs share the machine)\n")
    print("| data | peak memory, model alone (MB) | peak memory, large data (MB) | over the model | train "
          "images/s, large data | train images/s, in memory | data path alone, images/s | data / train | targets met |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|:---:|")
    print(row(f"{args.images:,} PNGs 64x64, streamed (ddpm, 16 channels, batch 16)", own, big, rate, "images"))
    print(row(f"{args.text_mb} MB text, memory-mapped ids (transformer 4x128, batch 12; sequences)", own_t, big_t,
              rate_t, "sequences"))
    print(f"\nindexing the folder (file list + header check of {len(indexed):,} training images): {index_s:.1f} s; "
          f"tokenising the text once ({len(tokens):,} training windows, {tokens.train_x.ids.nbytes / 1e6:,.0f} MB "
          f"of ids): {tokenise_s:.1f} s")


if __name__ == "__main__":
    main()
