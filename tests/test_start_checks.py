"""Every option a run uses later is checked when it starts, before its first step (issue 18 §1): the sample-grid
options (its ``sample:`` section against the model it builds), the options ``genai sample`` and ``genai evaluate``
later draw with (the same section, through the same ``generate.plan``), and its parents. Each late failure is the
same one-line error as before, now raised before any training, leaving no run folder behind."""

from __future__ import annotations

import pytest
import yaml
from helpers import invoke, tiny_config


def refused_at_start(tmp_path, config: dict, *overrides: str) -> str:
    """Train ``config``; assert it fails in one line before any step (no run folder left); return the line."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    r = invoke("train", path, "--runs-dir", runs, "--name", "late", "-q", *[a for o in overrides for a in ("--set", o)],
               ok=False)
    assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "step 1" not in r.stdout and "done:" not in r.stdout
    assert not (runs / "late").exists(), "a run refused at start leaves no folder"
    return lines[0]


def test_guidance_left_in_the_sample_section_of_an_unconditional_model(tmp_path):
    """The issue's case: the model's conditioning switched off, its config's sample: section still guiding."""
    cfg = tiny_config("ddpm")
    cfg["sample"]["guidance"] = 2.0
    line = refused_at_start(tmp_path, cfg, "model.class_conditional=false", "model.guidance=1")
    assert "guidance needs a class-conditional model" in line


@pytest.mark.parametrize("family, key, value, needle", [
    ("ddpm", "sampler", "dpm", "unknown sampler 'dpm'"),
    ("ddpm", "steps", 10_000, "steps must be in"),
    ("ddpm", "eta", 0.5, "eta applies to the ddim sampler only"),
    ("masked_pixel", "fill", "twice", "--fill must be one of"),
    ("masked_pixel", "choice_temperature", -1.0, "--choice-temperature must be a finite number"),
    ("pixelcnn", "top_k", 0, "--top-k must be at least 1"),
    ("pixelcnn", "top_p", 1.5, "top"),
    ("transformer", "prompt", "ROMEO:", "--prompt is for text runs"),  # an image run of a text-capable family
])
def test_a_bad_sampling_value_is_refused_before_the_first_step(tmp_path, family, key, value, needle):
    cfg = tiny_config(family)
    cfg["sample"][key] = value
    assert needle in refused_at_start(tmp_path, cfg)


def test_a_missing_parent_is_refused_before_the_first_step(tmp_path):
    cfg = tiny_config("latent_ddpm")  # builds on tiny-spatial_ae, which this runs folder does not hold
    line = refused_at_start(tmp_path, cfg)
    assert "tiny-spatial_ae" in line


def test_the_grid_draws_what_genai_sample_draws(tmp_path, config_file, monkeypatch):
    """One sampling path: the last training grid equals genai sample's grid at the grid's n and seed. Both in fp32:
    the run trains in fp32, and auto is told the CPU lacks native bf16, so genai sample runs fp32 too."""
    import numpy as np
    from PIL import Image

    from genai_cli.hardware import NATIVE_BF16_ENV

    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    runs = tmp_path / "runs"
    invoke("train", config_file("ddpm", max_steps=2, sample_every=2, sample_n=4), "--runs-dir", runs, "--name", "r",
           "-q")
    grid = runs / "r" / "samples" / "step_000002.png"
    invoke("sample", runs / "r", "-n", 4, "--seed", 0, "--out", tmp_path / "same.png", "-q")
    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(tmp_path / "same.png")))
