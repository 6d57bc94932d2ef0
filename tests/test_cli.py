"""The CLI end to end with Typer's CliRunner: train a tiny config, sample, inspect, list, resume."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from helpers import invoke, metric_rows
from PIL import Image


@pytest.fixture
def trained(tmp_path, config_file):
    runs = tmp_path / "runs"
    invoke("train", config_file(), "--runs-dir", runs, "--name", "t", "--quiet")
    return runs, runs / "t"


def test_train_writes_the_run_directory(trained):
    runs, run = trained
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_000002.png", "step_000004.png"]
    rows = metric_rows(run)
    assert {r["split"] for r in rows} == {"train", "val"}
    assert all("loss" in r for r in rows if r["split"] == "train")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["family"] == "ddpm" and saved["train"]["max_steps"] == 4


def test_sample_png_and_npz(trained, tmp_path):
    runs, run = trained
    r = invoke("sample", "--runs-dir", runs, "-n", 6, "--seed", 3)  # newest run by default
    assert (run / "samples" / "sample_3.png").is_file(), r.stdout
    out = tmp_path / "s.npz"
    invoke("sample", run / "checkpoints" / "last.pt", "--out", out, "-n", 5, "--sampler", "ddim", "--steps", 3)
    arr = np.load(out)["images"]
    assert arr.shape == (5, 1, 8, 8) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    png = tmp_path / "g.png"
    invoke("sample", run, "--out", png, "-n", 4, "--seed", 1)
    assert Image.open(png).size[0] > 8


def test_sample_refuses_unwritable_outputs_in_one_line(trained, tmp_path):
    runs, run = trained
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, needle in (("/proc/genai-x/grid.png", "not writable"), (a_file / "grid.png", "not a folder"),
                        (tmp_path, "--out must end")):
        r = invoke("sample", run, "-n", 2, "--out", out, ok=False)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    deep = tmp_path / "new" / "folder" / "grid.png"
    invoke("sample", run, "-n", 2, "--out", deep)  # missing folders are made
    assert deep.is_file()


def test_shared_options_on_every_command(trained, tmp_path):
    runs, run = trained
    r = invoke("sample", run, "-n", 2, "--out", tmp_path / "q.png", "--quiet", "--device", "cpu")
    assert r.stdout == "" and (tmp_path / "q.png").is_file()
    assert "steps trained" in invoke("inspect", "t", "--runs-dir", runs, "--device", "cpu").stdout
    r = invoke("list", "--runs-dir", runs)
    assert "runs in" in r.stdout and " t " in r.stdout


def test_same_seed_same_samples_from_the_cli(trained, tmp_path):
    _, run = trained
    for name in ("a.npz", "b.npz"):
        invoke("sample", run, "--out", tmp_path / name, "-n", 3, "--seed", 5, "--sampler", "ddim", "--steps", 4)
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])


def test_inspect_run_checkpoint_and_config(trained, config_file):
    runs, run = trained
    r = invoke("inspect", run)
    assert "ddpm" in r.stdout and "steps trained" in r.stdout and "parameters" in r.stdout
    assert (run / "loss_curve.png").is_file()
    assert "ddpm" in invoke("inspect", run / "checkpoints" / "last.pt").stdout
    r = invoke("inspect", config_file())
    assert "not trained" in r.stdout and "total" in r.stdout


def test_list_shows_families_and_datasets():
    r = invoke("list")
    for word in ("ddpm", "mnist5k", "shapes", "image_folder", "quickstart.yaml"):
        assert word in r.stdout
    # Piped (not a terminal), no flag or capability is cut short ("--choice-temperat…" in 80 columns).
    for word in ("--choice-temperature", "--traverse-dim", "calibration_logits", "likelihood_estimate"):
        assert word in r.stdout
    assert "…" not in r.stdout


def test_resume_continues_the_step_count(trained):
    runs, run = trained
    invoke("train", "--resume", run, "--set", "train.max_steps=6", "--runs-dir", runs, "--quiet")
    import torch

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 6
    steps = [r["step"] for r in metric_rows(run)]
    assert max(steps) == 6 and steps == sorted(steps)


def test_print_config(config_file):
    r = invoke("train", config_file(), "--set", "train.epochs=7", "--print-config")
    assert yaml.safe_load(r.stdout)["train"]["epochs"] == 7
