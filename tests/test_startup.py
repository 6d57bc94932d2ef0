"""genai sample and genai inspect import only what they use (issue 18, section 2): torchvision's models pull in
torch._dynamo, seconds of start-up for a command that compiles nothing and reads no torchvision dataset.
Behaviour, not timing: each command runs in a fresh process that then lists the modules it imported.
(The timings: benchmarks/bench_startup.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from helpers import tiny_config

# inspect draws loss_curve.png with matplotlib: the one heavy import it uses, so not in this list
HEAVY = ("torchvision", "torch._dynamo", "sklearn", "torchmetrics", "scipy", "transformers", "diffusers")

# Runs the CLI in this process, then prints the heavy modules it imported. SystemExit is the CLI's way out.
PROBE = """
import json, sys
from genai_cli.cli import main
sys.argv = ["genai", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    if e.code:
        raise
heavy = {heavy!r}
print(json.dumps(sorted({{h for m in sys.modules for h in heavy if m == h or m.startswith(h + ".")}})))
"""


def imported_heavy(*args, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=heavy), *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny image run (PixelCNN on 8x8 shapes, labelled) and a tiny text run (a 1-block transformer)."""
    from helpers import invoke

    root = tmp_path_factory.mktemp("startup")
    runs = root / "runs"
    image = tiny_config("pixelcnn", max_steps=2)
    (root / "corpus.txt").write_text("hello world, " * 100)
    text = {"model": {"family": "transformer", "d_model": 16, "heads": 2, "layers": 1},
            "data": {"name": "text_file", "path": str(root / "corpus.txt"), "block_size": 12},
            "train": {**image["train"], "ema_decay": None}, "sample": {"n": 1, "max_new_tokens": 8}}
    for name, cfg in (("image", image), ("text", text)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        invoke("train", root / f"{name}.yaml", "--runs-dir", runs, "--name", name, "-q")
    return runs


@pytest.mark.parametrize("command", ["sample-image", "sample-text", "inspect-image", "inspect-text"])
def test_sample_and_inspect_import_no_torchvision_dynamo_or_plot_stacks(tiny_runs, tmp_path, command):
    verb, kind = command.split("-")
    args = [verb, tiny_runs / kind]
    if verb == "sample":
        args += ["-n", "1", "-q", "--out", tmp_path / ("s.png" if kind == "image" else "s.txt")]
        if kind == "text":
            args += ["--prompt", "hello", "--max-new-tokens", "1"]
    heavy = imported_heavy(*args)
    assert heavy == [], f"genai {verb} on a {kind} run imported {heavy}"


def test_inspect_draws_its_pictures_again_only_when_the_metrics_changed(tiny_runs):
    """matplotlib costs inspect ~0.5 s of start-up: loss_curve.png (and class_history.png) are drawn again only
    when metrics.jsonl was written after them, and a second inspect of an unchanged run imports no matplotlib."""
    import os

    run = tiny_runs / "image"
    curve, metrics = run / "loss_curve.png", run / "metrics.jsonl"
    curve.unlink(missing_ok=True)
    assert "matplotlib" in imported_heavy("inspect", run, heavy=("matplotlib",))  # no picture yet: drawn
    drawn = curve.stat().st_mtime_ns
    assert imported_heavy("inspect", run, heavy=("matplotlib",)) == []  # unchanged log: the picture is kept
    assert curve.stat().st_mtime_ns == drawn
    later = drawn / 1e9 + 10
    os.utime(metrics, (later, later))  # the run logged again
    assert "matplotlib" in imported_heavy("inspect", run, heavy=("matplotlib",))
    assert curve.stat().st_mtime_ns > drawn
