"""genai export (issue 22, section 2): a run as a Hub-style folder (model.safetensors + config.json, the parents'
weights, a model card) that genai sample and genai_cli.load_pretrained load, drawing what the run draws; a changed
weight, a missing or corrupt folder and an occupied --out are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from helpers import invoke, tiny_config, train_tiny_parents

import genai_cli
from genai_cli.api import load_checkpoint
from genai_cli.generate import SampleRequest, draw


def train_run(tmp_path, family: str, name: str = "r") -> tuple:
    """A tiny trained run of ``family`` (its parents trained first); returns (runs dir, run folder)."""
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    if family == "text":
        (tmp_path / "corpus.txt").write_text("hello world, " * 40, encoding="utf-8")
        raw = {"model": {"family": "transformer", "d_model": 16, "heads": 2, "layers": 1},
               "data": {"name": "text_file", "path": str(tmp_path / "corpus.txt"), "block_size": 12},
               "train": {"max_steps": 4, "batch_size": 8, "sample_every": 2, "sample_n": 2, "eval_every": 2,
                         "checkpoint_every": 2, "warmup_steps": 1, "eval_max_images": 16, "precision": "fp32"},
               "sample": {"n": 2, "max_new_tokens": 16}}
    else:
        train_tiny_parents(family, runs)
        raw = tiny_config(family)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    invoke("train", path, "--runs-dir", runs, "--name", name, "-q")
    return runs, runs / name


def exported(tmp_path, family: str = "ddpm"):
    runs, run = train_run(tmp_path, family)
    out = tmp_path / "export"
    invoke("export", "r", "--runs-dir", runs, "--out", out)
    return runs, run, out


@pytest.mark.parametrize("family", ["ddpm", "text", "latent_ddpm"])
def test_an_export_samples_what_its_run_samples(tmp_path, family):
    runs, run, out = exported(tmp_path, family)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))  # no pickle anywhere
    mode = (out / "model.safetensors").stat().st_mode & 0o777
    assert mode == (out / "README.md").stat().st_mode & 0o777  # as shareable as the files beside it (the umask's)
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == ("transformer" if family == "text" else family) and config["step"] == 4
    assert config["config"]["data"] and config["spec"]["kind"] == ("tokens" if family == "text" else "image")
    suffix = ".txt" if family == "text" else ".npz"
    a, b = tmp_path / f"run{suffix}", tmp_path / f"export{suffix}"
    invoke("sample", run, "--seed", 3, "-n", 2, "--out", a, "-q")
    invoke("sample", out, "--seed", 3, "-n", 2, "--out", b, "-q")
    if family == "text":
        assert a.read_text() == b.read_text() and a.read_text().strip()
    else:
        np.testing.assert_array_equal(np.load(a)["images"], np.load(b)["images"])
    # the Python API: the same weights, so the same draw
    request = SampleRequest(n=2, seed=5)
    from_run = draw(load_checkpoint(run / "checkpoints" / "last.pt"), request, device="cpu")
    from_export = draw(genai_cli.load_pretrained(out), request, device="cpu")
    assert from_run.images.equal(from_export.images)
    card = (out / "README.md").read_text()
    assert f"`{config['family']}`" in card and "| steps trained | 4 |" in card
    assert (out / ("samples.txt" if family == "text" else "samples.png")).is_file()
    if family == "latent_ddpm":  # the parent is exported too, as an export of its own
        parent = out / "parents" / "autoencoder"
        assert (parent / "model.safetensors").is_file() and "parents/autoencoder/model.safetensors" in config["files"]
        assert json.loads((parent / "config.json").read_text())["family"] == "spatial_ae"
        assert "## Lineage" in card and "r <- tiny-spatial_ae @ step 2" in card
        shown = invoke("inspect", out).stdout  # genai inspect reads an export as it reads a run
        assert "latent_ddpm" in shown and "r <- tiny-spatial_ae @ step 2" in shown
        # the export samples on its own: with the parent run gone
        import shutil

        shutil.rmtree(runs)
        c = tmp_path / "alone.npz"
        invoke("sample", out, "--seed", 3, "-n", 2, "--out", c, "-q")
        np.testing.assert_array_equal(np.load(b)["images"], np.load(c)["images"])


def flip_a_byte(path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_changed_weight_is_refused_in_one_line(tmp_path):
    runs, run, out = exported(tmp_path, "latent_ddpm")
    invoke("sample", out, "--out", tmp_path / "ok.png", "-q")
    flip_a_byte(out / "parents" / "autoencoder" / "model.safetensors")
    r = invoke("sample", out, "--out", tmp_path / "a.png", ok=False)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "'parents/autoencoder/model.safetensors' does not match the sha256" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    invoke("export", "r", "--runs-dir", runs, "--out", out, "--force")  # a new export replaces the tampered one
    flip_a_byte(out / "model.safetensors")
    with pytest.raises(genai_cli.errors.GenaiError, match="'model.safetensors' does not match the sha256"):
        genai_cli.load_pretrained(out)
    # re-signing the changed file in config.json does not help: the weights no longer match the lineage hash
    from genai_cli.export import sha256_of

    config = json.loads((out / "config.json").read_text())
    config["files"]["model.safetensors"] = sha256_of(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    r = invoke("sample", out, "--out", tmp_path / "b.png", ok=False)
    assert r.exit_code == 2 and "the weights do not match the hash in config.json" in r.stderr


def test_bad_export_folders_and_an_occupied_out_are_one_line(tmp_path):
    runs, run, out = exported(tmp_path)

    def refused(*args, says: str):
        r = invoke(*args, ok=False)
        assert r.exit_code == 2 and says in r.stderr and "Traceback" not in r.output, r.output
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    refused("export", "r", "--runs-dir", runs, "--out", occupied, says="exists and is not empty")
    refused("export", "r", "--runs-dir", runs, "--out", occupied, "--force", says="holds no genai export")
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]  # nothing of it lost
    refused("export", "r", "--runs-dir", runs, "--out", out, says="--force to replace an earlier export")
    refused("export", "r", "--runs-dir", runs, says="give the folder to write")
    refused("export", "nope", "--runs-dir", runs, "--out", tmp_path / "x", says="neither a run folder")
    assert not (tmp_path / "x").exists()
    refused("export", out, "--out", tmp_path / "y", says="is already an export")
    refused("sample", out, "--no-ema", "--out", tmp_path / "s.png", says="holds only the moving average")
    (out / "config.json").write_text("{not json")
    refused("sample", out, "--out", tmp_path / "s.png", says="config.json' is corrupt")
    (out / "model.safetensors").unlink()
    (out / "config.json").unlink()
    refused("sample", out, "--out", tmp_path / "s.png", says="has no checkpoint")
    with pytest.raises(genai_cli.errors.GenaiError, match="it has no config.json"):
        genai_cli.load_pretrained(out)
    with pytest.raises(genai_cli.errors.GenaiError, match="not found"):
        genai_cli.load_pretrained(tmp_path / "missing")
    for leftover in out.iterdir():
        leftover.unlink()
    invoke("export", "r", "--runs-dir", runs, "--out", out)  # an empty folder is filled; with --force, replaced
    invoke("export", "r", "--runs-dir", runs, "--out", out, "--force")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temporary folder left behind


def test_a_checkpoint_alone_exports_with_a_grid_drawn_from_it(tmp_path):
    import shutil

    runs, run = train_run(tmp_path, "ddpm")
    alone = tmp_path / "alone.pt"
    shutil.copyfile(run / "checkpoints" / "last.pt", alone)
    shutil.rmtree(runs)  # no run folder, no training grid to copy
    invoke("export", alone, "--out", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["name"] == "alone" and (tmp_path / "out" / "samples.png").is_file()
    assert "![samples](samples.png)" in (tmp_path / "out" / "README.md").read_text()
