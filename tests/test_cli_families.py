"""CLI flows that only some families take: discrete sampling options, prefix completion, sweeps,
latent walks and class labels. Each family refuses what it cannot honour."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from genai_cli.capabilities import has
from genai_cli.cli import app
from genai_cli.registry import MODELS

runner = CliRunner()
# The families that walk their latent space, from their declarations; those that also encode walk from real images.
WALKERS = [f for f in MODELS.names() if has(MODELS.get(f), "walk")]
ENCODING_WALKERS = [f for f in WALKERS if has(MODELS.get(f), "encode")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import yaml
    from helpers import tiny_config

    root = tmp_path_factory.mktemp("fam")
    for family in ("pixel_lstm", *WALKERS):
        cfg = root / f"{family}.yaml"
        raw = tiny_config(family, max_steps=2)
        raw["data"]["binarize"] = True  # exact prefixes: binary pixels survive any quantisation
        cfg.write_text(yaml.safe_dump(raw))
        r = runner.invoke(app, ["train", str(cfg), "--runs-dir", str(root), "--name", family, "-q"])
        assert r.exit_code == 0, r.stderr
    return root


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r


def test_discrete_options_change_samples_and_repeat_with_the_seed(runs, tmp_path):
    def draw(name, *opts):
        r = run("sample", runs / "pixel_lstm", "-n", 6, "--seed", 1, "--out", tmp_path / name, *opts)
        assert r.exit_code == 0, r.stderr
        return np.load(tmp_path / name)["images"]

    plain = draw("a.npz")
    assert np.array_equal(plain, draw("b.npz"))
    greedy = draw("g.npz", "--greedy")
    assert np.array_equal(greedy, draw("g2.npz", "--temperature", "0"))  # temperature 0 is greedy
    assert not np.array_equal(plain, draw("t.npz", "--temperature", "1.5", "--top-p", "0.9"))
    hidden = draw("h.npz", "--greedy", "--noise-std", "1", "--noise-on", "hidden")
    assert not np.array_equal(greedy, hidden)


def test_prefix_completion_keeps_the_given_rows(runs, tmp_path):
    out = tmp_path / "p.npz"
    r = run("sample", runs / "pixel_lstm", "--prefix-rows", 3, "-n", 4, "--out", out)
    assert r.exit_code == 0, r.stderr
    images = np.load(out)["images"].reshape(4, 3, 1, 8, 8)  # per original: original, prefix shown, 1 completion
    original, completion = images[:, 0], images[:, 2]
    assert np.array_equal(original[..., :3, :], completion[..., :3, :])


def test_sweep_draws_one_labelled_png(runs, tmp_path):
    out = tmp_path / "sweep.png"
    r = run("sample", runs / "pixel_lstm", "--sweep", "temperature=0.5,1,1.5", "--sweep", "top_p=0.8,1", "-n", 3,
            "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "6 settings" in r.stdout
    width, height = Image.open(out).size
    assert height >= 6 * 8 and width > 3 * 8


@pytest.mark.parametrize("family, opts", [
    *[(f, ["--interpolate"]) for f in WALKERS],
    *[(f, opts) for f in ENCODING_WALKERS for opts in (["--traverse"], ["--traverse-dim", "1"],
                                                         ["--traverse", "--traverse-dim", "1"])]])
def test_latent_walks(runs, tmp_path, family, opts):
    out = tmp_path / "w.npz"
    r = run("sample", runs / family, "-n", 16, "--out", out, *opts)
    assert r.exit_code == 0, r.stderr
    assert np.load(out)["images"].shape == (16, 1, 8, 8)


def test_walks_honour_n_temperature_and_labels(runs, tmp_path):
    def walk(name, family, *opts):
        r = run("sample", runs / family, "--seed", 2, "--out", tmp_path / name, *opts)
        assert r.exit_code == 0, r.stderr
        return np.load(tmp_path / name)

    assert walk("a.npz", "vae", "--interpolate", "-n", 4)["images"].shape == (4, 1, 8, 8)  # one row of 4
    assert walk("b.npz", "vae", "--interpolate", "-n", 24)["images"].shape == (24, 1, 8, 8)
    hot, cold = walk("h.npz", "dcgan", "--interpolate", "-n", 8), walk("c.npz", "dcgan", "--interpolate", "-n", 8,
                                                                      "--temperature", "0.3")
    assert not np.array_equal(hot["images"], cold["images"])
    interpolation, traversal = hot["images"], walk("t.npz", "dcgan", "--traverse-dim", "0", "-n", 8)["images"]
    assert not np.array_equal(interpolation, traversal)
    assert list(walk("l.npz", "cgan", "--interpolate", "-n", 16, "--label", 3)["labels"]) == [3] * 16
    assert list(walk("d.npz", "cgan", "--interpolate", "-n", 16)["labels"]) == [0] * 8 + [1] * 8


@pytest.mark.parametrize("family, opts, needle", [
    ("pixel_lstm", ["--sweep", "temperature=1,2", "--prefix-rows", "2"], "--sweep and --prefix-rows are different"),
    ("vae", ["--sweep", "temperature=1,2", "--interpolate"], "--sweep and --interpolate are different"),
    ("vae", ["--interpolate", "--traverse"], "--interpolate and --traverse are different"),
    ("vae", ["--interpolate", "--traverse-dim", "1"], "--interpolate and --traverse-dim are different"),
    ("vae", ["--traverse", "--temperature", "0.5"], "--temperature scales random latents"),
    ("vae", ["--interpolate", "-n", "12"], "-n must be a multiple of 8"),
    ("dcgan", ["--traverse"], "--traverse is not an option of family 'dcgan'; families that take it: autoencoder, vae"),
    ("pixel_lstm", ["--sweep", "temperature=1,2", "--temperature", "1"], "--temperature is given and swept"),
    ("pixel_lstm", ["--sweep", "temperature=1,2", "--out", "x.npz"], "--sweep draws a labelled PNG"),
    ("pixel_lstm", ["--sweep", "prefix_rows=1,2"], "--sweep cannot vary 'prefix_rows'"),
])
def test_modes_refused_when_combined(runs, tmp_path, family, opts, needle):
    r = run("sample", runs / family, "--out", tmp_path / "never.png", *opts)
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "never.png").exists()


def test_cgan_labels(runs, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert run("sample", runs / "cgan", "--label", 1, "-n", 4, "--out", a).exit_code == 0
    assert run("sample", runs / "cgan", "--label", 2, "-n", 4, "--out", b).exit_code == 0
    assert (np.load(a)["labels"] == 1).all()
    assert not np.array_equal(np.load(a)["images"], np.load(b)["images"])
    default = tmp_path / "d.npz"
    assert run("sample", runs / "cgan", "-n", 8, "--out", default).exit_code == 0
    assert list(np.load(default)["labels"]) == [0, 1, 2, 3, 0, 1, 2, 3]  # one row per class


@pytest.mark.parametrize("family, opts, needle", [
    ("pixel_lstm", ["--top-k", "0"], "--top-k must be"),
    ("pixel_lstm", ["--top-p", "0"], "--top-p must be in (0, 1]"),
    ("pixel_lstm", ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ("pixel_lstm", ["--temperature", "-1"], "--temperature must be"),
    ("pixel_lstm", ["--prefix-rows", "9"], "beyond the image height 8"),
    ("pixel_lstm", ["--steps", "5"], "--steps is not an option of family 'lstm'"),
    ("pixel_lstm", ["--label", "1"], "--label is not an option"),
    ("vae", ["--top-k", "3"], "--top-k is not an option of family 'vae'"),
    ("vae", ["--traverse-dim", "99"], "out of range"),
    ("cgan", ["--label", "4"], "out of range; this model's classes are 0..3"),
    ("dcgan", ["--label", "1"], "families that take it: cgan"),
    ("dcgan", ["--prefix-rows", "2"], "--prefix-rows is not an option"),
])
def test_refusals(runs, family, opts, needle):
    r = run("sample", runs / family, *opts)
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
