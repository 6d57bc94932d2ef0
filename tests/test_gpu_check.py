"""benchmarks/gpu_check.py (issue 22, section 3) in its CPU mode, so that the GPU check cannot rot between the
sessions that have a GPU: the same code paths (training in each setting through session.start_run, sampling from
the checkpoint, torchrun, the CIFAR-10 recipe against diffusers' UNet) at tiny sizes on a few families that
together take every branch (a family with a parent, a network that draws nothing, text, a GAN's own step)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def rows_of(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_cpu_mode_trains_samples_and_times_the_recipe(tmp_path, capsys):
    pytest.importorskip("diffusers")
    code = gpu_check().main(["--device", "cpu", "--families", "latent_ddpm,classifier,transformer", "--steps", "2",
                             "--compile-families", "none", "--ddp-families", "none", "--runs-dir", str(tmp_path),
                             "--json", str(tmp_path / "r.json"), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = rows_of(tmp_path / "r.json")
    rows = result["rows"]
    # the parent first: latent_ddpm names its run
    assert list(rows) == ["spatial_ae", "latent_ddpm", "classifier", "transformer", "transformer (text)"]
    assert "no CUDA" in result["device"] and "gpu_check on no CUDA" in printed
    for name, row in rows.items():
        assert row["train"]["status"] == "ok" and "img/s" in row["train"]["text"], (name, row)
        assert row["fp16"]["text"].startswith("bf16 (CPU: no fp16 scaler)"), (name, row)
    assert rows["latent_ddpm"]["chlast"]["status"] == "ok" and rows["transformer"]["chlast"]["text"] == "no conv"
    assert rows["classifier"]["sample"] == {"status": "n/a", "text": "draws nothing"}
    assert rows["latent_ddpm"]["sample"]["text"].startswith("4 images")
    assert rows["transformer (text)"]["sample"]["text"].startswith("4 texts")
    recipe = result["recipe"]
    assert recipe["ours_params"] == recipe["peer_params"]  # the same network size on both sides
    assert recipe["ours_images_per_sec"] > 0 and recipe["peer_images_per_sec"] > 0
    assert "| diffusers UNet2DModel |" in printed


@pytest.mark.slow
def test_the_cpu_mode_compiles_and_runs_two_gloo_processes(tmp_path, capsys, monkeypatch):
    import functools

    import torch

    # Dynamo traces the route as on a GPU; the eager backend skips inductor's C++ build (a minute on a busy CPU)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    code = gpu_check().main(["--device", "cpu", "--families", "classifier,dcgan", "--steps", "2",
                             "--compile-families", "classifier", "--ddp-families", "dcgan", "--recipe-steps", "0",
                             "--runs-dir", str(tmp_path), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert code == 0, capsys.readouterr().out
    rows = rows_of(tmp_path / "r.json")["rows"]
    assert rows["classifier"]["compile"]["status"] == "ok", rows
    assert rows["dcgan"]["DDP"]["text"].startswith("gloo x2"), rows  # a family stepping its own optimizers


def test_a_failing_check_is_reported_in_its_cell_and_in_the_exit_code(tmp_path, capsys, monkeypatch):
    module = gpu_check()

    def broken(*args, **kwargs):
        raise RuntimeError("the loss became nan at step 1\nsecond line")

    monkeypatch.setattr(module, "train_run", broken)
    code = module.main(["--device", "cpu", "--families", "classifier", "--steps", "1", "--compile-families", "none",
                        "--ddp-families", "none", "--recipe-steps", "0", "--runs-dir", str(tmp_path), "--quiet"])
    out = capsys.readouterr()
    assert code == 1 and "FAILED: classifier train" in out.err
    assert "FAIL: RuntimeError: the loss became nan at step 1 |" in out.out
