"""genai_cli.generate: every way of drawing, as library code. Tiny untrained models, no runs: modes refused
when combined or given options they cannot honour, each mode's output shape and layout, labels returned, walks
that honour -n and --temperature, output files that cannot be written, and a CLI that starts without torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_model, tolerance

import genai_cli
from genai_cli.capabilities import has
from genai_cli.errors import GenaiError
from genai_cli.generate import (
    Inpaint,
    Plain,
    Prefix,
    SampleRequest,
    Sweep,
    Walk,
    check_out_path,
    draw,
    plan,
    select_mode,
)
from genai_cli.hardware import resolve_precision
from genai_cli.registry import MODELS

SHAPE = (1, 8, 8)
CPU = torch.device("cpu")
WALKERS = [f for f in MODELS.names() if has(MODELS.get(f), "walk")]  # the families --interpolate draws from


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: tiny_model(name).eval() for name in (*WALKERS, "pixelcnn", "ddpm", "masked_pixel")}


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# -- modes are exclusive, chosen once ------------------------------------------------------------
@pytest.mark.parametrize("flags, named", [
    (dict(sweeps=[("temperature", (1,))], interpolate=True), "--sweep and --interpolate"),
    (dict(interpolate=True, traverse=True), "--interpolate and --traverse"),
    (dict(prefix_rows=3, sweeps=[("top_k", (2,))]), "--sweep and --prefix-rows"),
    (dict(interpolate=True, traverse_dim=1), "--interpolate and --traverse-dim"),
    (dict(prefix_rows=2, traverse=True, traverse_dim=0), "--prefix-rows, --traverse and --traverse-dim"),
])
def test_two_modes_at_once_are_refused(flags, named):
    with pytest.raises(GenaiError) as e:
        select_mode(**flags)
    assert named in one_line(e) and "one at a time" in str(e.value)


def test_flags_select_one_mode():
    assert select_mode() == Plain()
    assert select_mode(interpolate=True) == Walk("random")
    assert select_mode(traverse=True) == Walk("real")
    assert select_mode(traverse_dim=2) == Walk("random", 2)
    assert select_mode(traverse=True, traverse_dim=2) == Walk("real", 2)  # one walk: traversal from real images
    assert select_mode(prefix_rows=3) == Prefix(3)
    assert select_mode(sweeps=[("top_k", [1, 2])]) == Sweep.of(top_k=[1, 2])


@pytest.mark.parametrize("family, request_, needle", [
    ("vae", SampleRequest(Walk("real"), options={"temperature": 0.5}), "--temperature scales random latents"),
    ("dcgan", SampleRequest(Walk("real")), "--traverse is not an option of family 'dcgan'; families that take it: "
                                           + ", ".join(f for f in WALKERS if has(MODELS.get(f), "encode"))),
    ("vae", SampleRequest(Walk(dim=4)), "--traverse-dim 4 is out of range; latent dims are 0..3"),
    ("vae", SampleRequest(Walk(), n=12), "-n must be a multiple of 8"),
    ("pixelcnn", SampleRequest(Walk()), "--interpolate is not an option of family 'pixelcnn'"),
    ("vae", SampleRequest(Prefix(2)), "--prefix-rows is not an option of family 'vae'"),
    ("pixelcnn", SampleRequest(Prefix(9)), "beyond the image height 8"),
    ("pixelcnn", SampleRequest(Sweep.of(temperature=[1, 2]), options={"temperature": 1.0}),
     "--temperature is given and swept"),
    ("pixelcnn", SampleRequest(Sweep.of(labels=[1, 2])), "--sweep cannot vary 'labels'"),
    ("pixelcnn", SampleRequest(Sweep.of(top_k=[2, 0])), "--top-k must be at least 1"),
    ("ddpm", SampleRequest(Sweep.of(top_k=[2])), "--top-k is not an option of family 'ddpm'"),
    ("pixelcnn", SampleRequest(options={"prefix_rows": 3}), "chooses a way of drawing"),
    ("ddpm", SampleRequest(options={"labels": 1}), "--label needs a class-conditional model"),
    ("cgan", SampleRequest(options={"labels": 4}), "--label 4 is out of range; this model's classes are 0..3"),
    ("cgan", SampleRequest(n=0), "-n must be at least 1"),
    ("vae", SampleRequest(options={"temperature": -1.0}), "--temperature must be"),
    ("pixelcnn", SampleRequest(Inpaint("bottom")), "--mask is not an option of family 'pixelcnn'"),
    ("masked_pixel", SampleRequest(Inpaint("middle")), "--mask must be one of"),
    ("masked_pixel", SampleRequest(Inpaint("random:2")), "random:P needs P in (0, 1]"),
])
def test_plan_refuses_what_cannot_be_honoured(models, family, request_, needle):
    with pytest.raises(GenaiError) as e:
        plan(models[family], request_)
    assert needle in one_line(e), str(e.value)


def test_defaults_apply_only_where_the_mode_takes_them(models):
    defaults = {"n": 10, "seed": 4, "temperature": 0.7}
    p = plan(models["vae"], SampleRequest(Walk("real"), defaults=defaults))
    assert "temperature" not in p.options  # a default the mode cannot take is not used (an explicit one is refused)
    assert (p.n, p.rows, p.per_row, p.seed, p.real_images) == (8, 1, 8, 4, 2)  # 10 rounded down to whole rows
    assert plan(models["vae"], SampleRequest(defaults=defaults)).options == {"temperature": 0.7}


# -- each mode's output ----------------------------------------------------------------------------
def test_plain_returns_the_labels_it_drew(models):
    cycled = draw(models["cgan"], SampleRequest(n=6, seed=1))
    assert cycled.images.shape == (6, *SHAPE) and cycled.labels.tolist() == [0, 1, 2, 3, 0, 1]
    assert cycled.nrow == 4  # one class per column
    threes = draw(models["cgan"], SampleRequest(n=4, seed=1, options={"labels": 3}))
    assert threes.labels.tolist() == [3, 3, 3, 3]
    again = models["cgan"].sample(4, generator=torch.Generator().manual_seed(1), labels=3)
    torch.testing.assert_close(threes.images, again)  # the labels returned are the ones drawn with
    assert draw(models["dcgan"], SampleRequest(n=3)).labels is None


def test_sweep_draws_one_row_per_setting_from_the_same_seed(models):
    s = draw(models["pixelcnn"], SampleRequest(Sweep.of(temperature=[0.5, 1.0], greedy=[False, True]), n=3, seed=2))
    assert s.images.shape == (12, *SHAPE) and s.nrow == 3
    assert s.row_names == ["temperature=0.5 greedy=False", "temperature=0.5 greedy=True",
                           "temperature=1.0 greedy=False", "temperature=1.0 greedy=True"]
    plain = draw(models["pixelcnn"], SampleRequest(n=3, seed=2, options={"temperature": 1.0}))
    torch.testing.assert_close(s.images[6:9], plain.images)
    assert "4 settings x 3 images" == s.describe()


def test_prefix_completes_real_images(models):
    real = (torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    p = plan(models["pixelcnn"], SampleRequest(Prefix(3), n=6))
    assert (p.real_images, p.rows, p.per_row) == (6, 6, 1)
    s = draw(models["pixelcnn"], SampleRequest(Prefix(3), n=8, seed=0), images=real)
    assert s.images.shape == (8 * 3, *SHAPE) and s.nrow == 3  # per original: itself, the prefix shown, 1 completion
    grid = s.images.view(8, 3, *SHAPE)
    torch.testing.assert_close(grid[:, 0], real)
    torch.testing.assert_close(grid[:, 2, :, :3], real[:, :, :3])  # the given rows are kept
    assert (grid[:, 1, :, 3:] == 0.5).all()
    with pytest.raises(GenaiError, match="needs 8 real images"):
        draw(models["pixelcnn"], SampleRequest(Prefix(3), n=16))
    assert plan(models["pixelcnn"], SampleRequest(Prefix(3), n=64)).per_row == 8
    assert plan(models["pixelcnn"], SampleRequest(Prefix(0), n=5)).mode == Plain()


@pytest.mark.parametrize("family", WALKERS)
def test_interpolation_ends_are_the_samples_it_walks_between(models, family, auto_precision):
    """Fails if the walk ignores --interpolate (no line), --temperature or -n. draw() runs under precision auto: the
    ends are compared with samples drawn under the same precision, at its tolerance."""
    model = models[family]
    walk = draw(model, SampleRequest(Walk(), n=16, seed=5, options={"temperature": 0.5}))
    assert walk.images.shape == (16, *SHAPE) and walk.nrow == 8
    rows = walk.images.view(2, 8, *SHAPE)
    extra = {"labels": torch.tensor([0, 0, 1, 1])} if family == "cgan" else {}  # row i draws class i
    with torch.no_grad(), resolve_precision("auto", CPU).autocast(CPU):
        ends = model.sample(4, generator=torch.Generator().manual_seed(5), temperature=0.5, **extra).float()
    torch.testing.assert_close(rows[:, 0], ends[0::2], **tolerance(auto_precision))
    torch.testing.assert_close(rows[:, -1], ends[1::2], **tolerance(auto_precision))
    assert not torch.allclose(rows[:, 3], rows[:, 0])
    hot = draw(model, SampleRequest(Walk(), n=16, seed=5))
    assert not torch.allclose(hot.images, walk.images)
    if family == "cgan":
        assert walk.labels.tolist() == [0] * 8 + [1] * 8
        sevens = draw(model, SampleRequest(Walk(), n=8, options={"labels": 2}))
        assert sevens.labels.tolist() == [2] * 8
    else:
        assert walk.labels is None


@pytest.mark.parametrize("n, rows, steps", [(4, 1, 4), (8, 1, 8), (24, 3, 8)])
def test_walks_honour_n(models, n, rows, steps):
    for mode in (Walk(), Walk(dim=1)):
        s = draw(models["dcgan"], SampleRequest(mode, n=n))
        assert s.images.shape == (n, *SHAPE) and s.nrow == steps
        assert plan(models["dcgan"], SampleRequest(mode, n=n)).rows == rows
    assert draw(models["dcgan"], SampleRequest(Walk(steps=3), n=6)).nrow == 3


def test_real_walks_interpolate_between_the_images_latents(models, auto_precision):
    model = models["vae"]
    real = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    p = plan(model, SampleRequest(Walk("real"), n=16))
    assert p.real_images == 4
    s = draw(model, SampleRequest(Walk("real"), n=16), images=real)
    rows = s.images.view(2, 8, *SHAPE)
    with torch.no_grad(), resolve_precision("auto", CPU).autocast(CPU):  # as draw() decodes
        decoded = model.mean_image(model.decode(model.encode(real))).float()
    torch.testing.assert_close(rows[:, 0], decoded[0::2], **tolerance(auto_precision))
    torch.testing.assert_close(rows[:, -1], decoded[1::2], **tolerance(auto_precision))
    assert plan(model, SampleRequest(Walk("real", dim=0), n=16)).real_images == 2  # one start per row
    traversal = draw(model, SampleRequest(Walk("real", dim=0), n=16), images=real)
    assert not torch.allclose(traversal.images, s.images)  # traversal and interpolation differ
    with pytest.raises(GenaiError, match="uses no real images"):
        draw(model, SampleRequest(Walk(), n=8), images=real)


def test_the_api_exports_drawing():
    for name in ("draw", "SampleRequest", "Samples", "Plain", "Sweep", "Prefix", "Walk", "Inpaint"):
        assert getattr(genai_cli, name) is getattr(sys.modules["genai_cli.generate"], name)


# -- output files ---------------------------------------------------------------------------------
def test_unwritable_outputs_are_refused_before_drawing(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for path, needle in ((tmp_path / "grid.jpg", "--out must end in .png"),
                         ("/proc/genai-nope/grid.png", "not writable"),
                         (a_file / "grid.png", "is a file, not a folder"),
                         (tmp_path, "--out must end")):
        with pytest.raises(GenaiError) as e:
            check_out_path(path)
        assert needle in one_line(e), str(e.value)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(GenaiError, match="is a folder"):
        check_out_path(tmp_path / "dir.png")
    with pytest.raises(GenaiError, match="labelled PNG"):
        check_out_path(tmp_path / "s.npz", Sweep.of(top_k=[1]))
    missing = tmp_path / "new" / "deeper" / "grid.png"
    assert check_out_path(missing) == missing and not missing.parent.exists()  # made when saving, not before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(GenaiError, match="not writable"):
        check_out_path(locked / "sub" / "grid.png")


def test_samples_save_png_and_npz(models, tmp_path):
    import numpy as np

    s = draw(models["cgan"], SampleRequest(n=4))
    s.save(tmp_path / "a" / "grid.png")
    s.save(tmp_path / "b.npz")
    assert (tmp_path / "a" / "grid.png").is_file()
    assert np.load(tmp_path / "b.npz")["labels"].tolist() == [0, 1, 2, 3]


# -- the CLI starts without torch --------------------------------------------------------------------
def test_cli_and_help_import_no_torch():
    code = ("import sys\n"
            "import genai_cli, genai_cli.cli\n"
            "assert 'torch' not in sys.modules, 'import'\n"
            "sys.argv = ['genai', '--help']\n"
            "try:\n"
            "    genai_cli.cli.main()\n"
            "except SystemExit:\n"
            "    pass\n"
            "sys.argv = ['genai', 'sample', '--help']\n"
            "try:\n"
            "    genai_cli.cli.main()\n"
            "except SystemExit:\n"
            "    pass\n"
            "assert 'torch' not in sys.modules, 'help'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and "--interpolate" in r.stdout


def test_truncation_keeps_the_vae_latents_inside_and_is_refused_elsewhere(models, monkeypatch):
    """--truncation (declared in options.py, honoured by vae.py alone): every latent coordinate decoded lies within
    +-c times the temperature; a bad value and a family without it are refused in one line."""
    model = models["vae"]
    seen = []
    monkeypatch.setattr(model, "draw", lambda z, generator=None: seen.append(z) or torch.zeros(z.shape[0], *SHAPE))
    draw(model, SampleRequest(n=64, seed=1, options={"truncation": 0.5, "temperature": 2.0}), precision="fp32")
    assert seen[0].abs().max() <= 1.0 and seen[0].abs().max() > 0.5
    draw(model, SampleRequest(n=64, seed=1, options={"temperature": 2.0}), precision="fp32")
    assert seen[1].abs().max() > 1.0  # without it, the prior's tails are drawn
    with pytest.raises(GenaiError, match="--truncation must be a positive number"):
        plan(model, SampleRequest(options={"truncation": 0}))
    with pytest.raises(GenaiError, match="not an option of family 'dcgan'.*vae"):
        plan(models["dcgan"], SampleRequest(options={"truncation": 1.0}))
    assert len(plan(model, SampleRequest(Sweep.of(truncation=[0.5, 1.0]))).settings) == 2
