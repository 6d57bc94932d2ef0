"""Run directories and checkpoints: atomic writes, exact resume, Ctrl-C, NaN stops."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import train_losses
from typer.testing import CliRunner

from genai_cli import load_checkpoint
from genai_cli.cli import app
from genai_cli.errors import GenaiError
from genai_cli.models.diffusion import DDPM
from genai_cli.runs import labelled_grid, load_checkpoint_file, make_grid, save_checkpoint, save_grid
from genai_cli.train import Trainer

runner = CliRunner()


def test_a_crash_during_a_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"family": "ddpm", "model": {"w": torch.ones(3)}, "step": 1}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk on fire")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        save_checkpoint({"family": "ddpm", "model": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    state = load_checkpoint_file(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "the temporary file must be cleaned up"


def test_load_checkpoint_api_gives_a_model_ready_to_sample(tmp_path, config_file):
    runs = tmp_path / "runs"
    r = runner.invoke(app, ["train", str(config_file()), "--runs-dir", str(runs), "--name", "a", "-q"])
    assert r.exit_code == 0, r.stderr
    model = load_checkpoint(runs / "a" / "checkpoints" / "last.pt")
    x = model.sample(2, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=3)
    assert x.shape == (2, 1, 8, 8)
    # A checkpoint from before runs could build on runs (no "parents") loads the same; an unknown data kind is refused.
    state = load_checkpoint_file(runs / "a" / "checkpoints" / "last.pt")
    assert state.pop("parents") == {}
    save_checkpoint(state, tmp_path / "old.pt")
    y = load_checkpoint(tmp_path / "old.pt").sample(2, generator=torch.Generator().manual_seed(0), sampler="ddim",
                                                    steps=3)
    assert torch.equal(x, y)
    save_checkpoint({**state, "spec": {**state["spec"], "kind": "video"}}, tmp_path / "text.pt")
    with pytest.raises(GenaiError, match="data spec of kind 'video' is unknown"):
        load_checkpoint(tmp_path / "text.pt")


def stop_then_resume(monkeypatch, cfg, run, *, code: int, message: str, saved_step: int) -> None:
    """Train ``cfg`` into ``run`` with what ``monkeypatch`` broke: it stops with exit ``code`` and ``message``, its
    last.pt at ``saved_step``; with the patch undone, ``--resume`` finishes it."""
    r = runner.invoke(app, ["train", str(cfg), "--runs-dir", str(run.parent), "--name", run.name, "-q"])
    assert r.exit_code == code and message in r.stderr, r.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == saved_step
    monkeypatch.undo()
    r = runner.invoke(app, ["train", "--resume", str(run), "--runs-dir", str(run.parent), "-q"])
    assert r.exit_code == 0, r.stderr


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(tmp_path, config_file, monkeypatch):
    cfg = config_file(max_steps=6, log_every=1, eval_every=2, checkpoint_every=100, sample_every=4)
    runs = tmp_path / "runs"
    assert runner.invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "--name", "straight", "-q"]).exit_code == 0

    original = Trainer.after_step

    def interrupt_at_3(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.step == 3:
            raise KeyboardInterrupt  # what Ctrl-C does

    monkeypatch.setattr(Trainer, "after_step", interrupt_at_3)
    stop_then_resume(monkeypatch, cfg, runs / "cut", code=130, message="checkpoint saved", saved_step=3)
    assert train_losses(runs / "straight") == train_losses(runs / "cut"), "resume must reproduce the losses exactly"
    a = torch.load(runs / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(runs / "cut" / "checkpoints" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, config_file, monkeypatch):
    cfg = config_file(max_steps=6, checkpoint_every=2)
    runs = tmp_path / "runs"
    original = DDPM.train_step

    def poisoned(self, *args, **kwargs):
        logs = original(self, *args, **kwargs)
        return {**logs, "loss": float("nan")} if self.current_step >= 3 else logs

    monkeypatch.setattr(DDPM, "train_step", poisoned)
    stop_then_resume(monkeypatch, cfg, runs / "nan", code=2, message="loss became nan at step 4", saved_step=2)


def test_force_moves_the_old_run_aside(tmp_path, config_file):
    runs = tmp_path / "runs"
    cfg = str(config_file(max_steps=2))
    for _ in range(2):
        r = runner.invoke(app, ["train", cfg, "--runs-dir", str(runs), "--name", "x", "--force", "-q"])
        assert r.exit_code == 0, r.stderr
    assert (runs / "x" / "checkpoints" / "last.pt").is_file()
    kept = [p for p in runs.iterdir() if p.name.startswith("x.old-")]
    assert len(kept) == 1 and (kept[0] / "checkpoints" / "last.pt").is_file()


def test_a_run_without_a_name_takes_the_configs_name_while_it_is_free(tmp_path, config_file):
    """A config that names another run by its config's name (MaskGIT's ``model.tokenizer: vqvae_mnist``) finds the
    run that config trained; a second run of the config gets the time in its name and leaves the first alone."""
    runs, cfg = tmp_path / "runs", config_file(max_steps=1)
    for _ in range(2):
        r = runner.invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "-q"])
        assert r.exit_code == 0, r.stderr
    first, second = sorted(p.name for p in runs.iterdir())
    assert first == cfg.stem and re.fullmatch(rf"{cfg.stem}-\d{{8}}-\d{{6}}", second)
    assert all((runs / name / "checkpoints" / "last.pt").is_file() for name in (first, second))
    (runs / first).rename(runs / "kept")  # a name without its run: the error points to the newest timed one
    r = runner.invoke(app, ["sample", str(runs / first), "--runs-dir", str(runs), "-n", "1"])
    assert r.exit_code != 0 and f"did you mean '{runs / second}'" in r.stderr, r.stderr


def test_unknown_checkpoint_family_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"family": "nope", "model": {}, "config": {}, "spec": {}}, path)
    with pytest.raises(GenaiError, match="unknown to this version"):
        load_checkpoint(path)


def test_a_time_budget_ends_training_early_and_cleanly(tmp_path, config_file):
    cfg = config_file(max_steps=100000, max_seconds=0.5, eval_every=100000, sample_every=100000,
                      checkpoint_every=100000)
    runs = tmp_path / "runs"
    r = runner.invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "--name", "budget", "-q"])
    assert r.exit_code == 0, r.stderr
    state = torch.load(runs / "budget" / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["step"] < 100000 and state["summary"]["finished"]
    assert state["elapsed_seconds"] >= 0.5


# -- PNG grids (drawn with Pillow: sampling never imports torchvision) ----------------------------
def test_a_grid_frames_each_image_in_grey_rows_of_nrow_and_rounds_to_the_nearest_byte(tmp_path):
    import numpy as np
    from PIL import Image

    images = torch.stack([torch.full((1, 2, 3), v) for v in (0.0, 0.25, 1.0)])  # three gray 2x3 images
    save_grid(images, tmp_path / "g.png", nrow=2)
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "g.png")).copy())  # (H, W, 3)
    # 2 columns, 2 rows; each cell is 2 pixels of padding then the image; one more padding strip at the end
    assert pixels.shape == (2 + 2 + 2 + 2 + 2, 2 + 3 + 2 + 3 + 2, 3)
    grey, cells = 128, {(0, 0): 0, (0, 1): 64, (1, 0): 255}  # 0.5 -> 128 and 0.25 -> 64: +0.5, then truncated
    expected = torch.full(pixels.shape, grey, dtype=torch.uint8)
    for (row, col), value in cells.items():
        expected[2 + row * 4:2 + row * 4 + 2, 2 + col * 5:2 + col * 5 + 3] = value
    assert torch.equal(pixels, expected), "the empty fourth cell stays grey"
    one = make_grid(torch.rand(1, 3, 4, 4), nrow=8)
    assert one.shape == (3, 4, 4), "a single image is not framed (torchvision's convention, kept)"


def test_the_pillow_grid_is_the_picture_torchvision_draws(tmp_path):
    from PIL import Image
    from torchvision.utils import save_image

    g = torch.Generator().manual_seed(0)
    cases = (((7, 1, 5, 4), 3, 2), ((4, 3, 6, 6), 2, 0), ((5, 3, 2, 2), 8, 1), ((1, 1, 3, 3), 4, 2))
    for shape, nrow, padding in cases:
        images = torch.rand(shape, generator=g)
        save_grid(images, tmp_path / "ours.png", nrow=nrow, padding=padding)
        save_image(images, tmp_path / "theirs.png", nrow=nrow, padding=padding, pad_value=0.5)
        ours, theirs = Image.open(tmp_path / "ours.png"), Image.open(tmp_path / "theirs.png")
        assert ours.mode == theirs.mode == "RGB" and ours.tobytes() == theirs.tobytes(), shape


def test_a_labelled_grid_has_one_enlarged_row_per_setting(tmp_path):
    from PIL import Image

    rows = [torch.zeros(3, 1, 8, 8), torch.ones(3, 1, 8, 8)]
    labelled_grid(rows, ["temperature=0.5", "temperature=1"], tmp_path / "s.png")
    im = Image.open(tmp_path / "s.png")
    scale, cell = 4, 8 + 2  # 8-pixel images are drawn 4x so the labels stay legible
    assert im.size == (130 + (3 * cell + 2) * scale, 2 * (cell + 2) * scale)
    assert im.getpixel((130 + 2 * scale, 2 * scale)) == (0, 0, 0)
    assert im.getpixel((130 + 2 * scale, (cell + 2) * scale + 2 * scale)) == (255, 255, 255)
    assert im.getpixel((130, 0)) == (128, 128, 128)


def test_train_tbptt_is_resolved_into_the_model_field_the_run_records_and_a_disagreement_is_refused():
    from helpers import tiny_config

    from genai_cli.config import from_dict

    raw = tiny_config("pixel_lstm")
    raw["train"]["tbptt"] = 16
    assert from_dict(raw).to_dict()["model"]["tbptt"] == 16, "config.yaml shows what the family trains with"
    raw["model"]["tbptt"] = 16
    assert from_dict(raw).model.tbptt == 16  # the resolved config.yaml read back (--resume) agrees with itself
    raw["model"]["tbptt"] = 8
    with pytest.raises(GenaiError, match=r"^train.tbptt = 16 and model.tbptt = 8 disagree; set one of them"):
        from_dict(raw)
