"""genai compare: members trained for one budget, measured by one evaluator, reported, resumed; bad input: one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import invoke, tiny_config, tiny_model

from genai_cli.compare import loss_spikes, parse_budget
from genai_cli.errors import GenaiError
from genai_cli.evaluation import evaluator as evaluators
from genai_cli.evaluation import run as evaluation_run

QUIET_SCHEDULES = {"log_every": 1, "eval_every": 10**6, "sample_every": 10**6, "checkpoint_every": 10**6}


def test_budget_reads_seconds_minutes_and_hours():
    assert parse_budget("90s") == 90 and parse_budget("3m") == 180 and parse_budget("1.5h") == 5400
    assert parse_budget("45") == 45 and parse_budget("2min") == 120
    for bad in ("", "3 weeks", "-1m", "0s", "m"):
        with pytest.raises(GenaiError, match="--budget must be a positive time"):
            parse_budget(bad)


def test_loss_spikes_counts_jumps_not_noise():
    g = torch.Generator().manual_seed(0)
    noisy = (2.0 + 0.05 * torch.randn(60, generator=g)).tolist()
    assert loss_spikes(noisy) == 0
    assert loss_spikes(noisy[:40] + [9.0] + noisy[40:]) == 1
    falling = [3.0 / (1 + i / 10) for i in range(60)]
    assert loss_spikes(falling) == 0


@pytest.mark.parametrize("family, options, network", [
    ("ddpm", {"sampler": "heun", "steps": 3}, "unet"),
    ("ddpm", {"sampler": "dpm++2m", "steps": 4}, "unet"),
    ("masked_pixel", {"steps": 3}, "network"),
])
def test_network_evaluations_match_the_passes_sampling_makes(family, options, network):
    model = tiny_model(family).eval()
    calls = []
    getattr(model, network).register_forward_hook(lambda *a: calls.append(1))
    model.sample(2, generator=torch.Generator().manual_seed(0), **options)
    assert model.network_evaluations(options) == len(calls)


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(evaluators, "EVALUATOR_MAX_STEPS", 6)  # a quick evaluator exercises the plumbing
    monkeypatch.setattr(evaluation_run, "VLB_IMAGES", 16)


def write(path, family, **changes):
    cfg = tiny_config(family, **QUIET_SCHEDULES)
    for section, values in changes.items():
        cfg[section].update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_compare_trains_measures_reports_and_resumes(tmp_path, quick):
    cfgs, root = tmp_path / "cfgs", tmp_path / "runs"
    ar = write(cfgs / "ar.yaml", "pixelcnn")
    latent = write(cfgs / "latent.yaml", "latent_ddpm", model={"autoencoder": "ae"})
    write(cfgs / "parents" / "ae.yaml", "spatial_ae")  # trained first, as runs/c/ae, for half the budget
    classifier = write(cfgs / "classifier.yaml", "classifier")
    other = write(cfgs / "other.yaml", "vae", data={"name": "digits"})
    args = [ar, latent, classifier, other, "--budget", "1s", "-n", 16, "--runs-dir", root, "--name", "c"]
    r = invoke("compare", *args, "--json")
    report = json.loads(r.stdout)
    assert [m["member"] for m in report["members"]] == ["ar", "latent"]
    # The classifier and the member on another dataset are left out, one line each, and the rest goes on.
    assert len(report["left_out"]) == 2
    assert "draws no samples" in report["left_out"][0] and "classifier" in report["left_out"][0]
    assert "digits" in report["left_out"][1] and "members must share a dataset" in report["left_out"][1]
    assert all(line.count("\n") == 0 for line in report["left_out"])
    ar_m, latent_m = report["members"]
    assert latent_m["parents"] == ["ae"] and latent_m["budget_seconds"] == pytest.approx(0.5)
    assert ar_m["budget_seconds"] == pytest.approx(1.0)
    assert (root / "c" / "ae" / "checkpoints" / "last.pt").is_file()
    s = latent_m["summary"]
    assert s["network_evaluations"] == 20 + 1  # the tiny latent_ddpm: ddpm over T = 20 steps, then the decoder
    for key in ("classifier_fid", "sample_seconds_per_64", "confident_share", "coverage", "classes_covered",
                "images_per_second"):
        assert s[key] is not None, key
    assert s["bits_per_dim"] is None and s["likelihood"] is None  # latent diffusion has no bound on pixels
    assert ar_m["summary"]["bits_per_dim"] > 0 and ar_m["summary"]["likelihood"] == "exact"
    assert ar_m["summary"]["network_evaluations"] == 8 * 8 and ar_m["runs"][0]["status"] == "trained"
    assert s["collapsed_share"] in (0.0, 1.0) and s["diverged_share"] == 0.0
    folder = root / "c"
    text = (folder / "report.md").read_text()
    for column in ("classifier-FID", "confident share", "coverage", "classes covered", "bits/dim", "s / 64 samples",
                   "network evals / sample", "train img/s", "collapsed", "diverged", "loss spikes"):
        assert f"| {column} |" in text or f" {column} |" in text, column
    assert "quality_vs_time.png" in text and "grids.png" in text and "Left out" in text
    assert (folder / "quality_vs_time.png").stat().st_size > 0 and (folder / "grids.png").stat().st_size > 0
    assert json.loads((folder / "report.json").read_text())["members"][0]["member"] == "ar"

    # Again with two seeds: the finished first seeds (and the parent) are reused, not trained or measured again.
    stamp = (folder / "ar" / "checkpoints" / "last.pt").stat().st_mtime_ns
    r = invoke("compare", ar, latent, "--budget", "1s", "-n", 16, "--runs-dir", root, "--name", "c", "--seeds", 2,
               "--json", "-q")
    again = json.loads(r.stdout)
    runs = {m["member"]: [x["status"] for x in m["runs"]] for m in again["members"]}
    assert runs == {"ar": ["reused", "trained"], "latent": ["reused", "trained"]}
    assert (folder / "ar" / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp
    assert (folder / "ar-seed1").is_dir() and again["members"][0]["runs"][1]["seed"] == 1
    assert again["members"][0]["summary"]["classifier_fid_std"] is not None  # a spread over two seeds
    assert "±" in (folder / "report.md").read_text()

    # A seed killed mid-way (its last checkpoint is not a finished one) is resumed from it, not started again.
    ckpt = folder / "ar-seed1" / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    state["summary"]["finished"] = False
    torch.save(state, ckpt)
    r = invoke("compare", ar, "--budget", "1s", "-n", 16, "--runs-dir", root, "--name", "c", "--seeds", 2, "--json",
               "-q")
    resumed = json.loads(r.stdout)["members"][0]["runs"]
    assert [x["status"] for x in resumed] == ["reused", "resumed"] and resumed[1]["steps"] > state["step"]

    # Another budget on the same folder is refused in one line (its members were trained for 1 s).
    r = invoke("compare", ar, "--budget", "2s", "--runs-dir", root, "--name", "c", ok=False)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "was trained with --budget 1 s" in r.stderr


def test_a_member_whose_first_step_exceeds_the_budget_is_left_out(tmp_path, quick):
    vae = write(tmp_path / "vae.yaml", "vae")
    r = invoke("compare", vae, "--budget", "0.000001s", "-n", 16, "--runs-dir", tmp_path / "runs", "-q", ok=False)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "nothing left to compare" in r.stderr and "first training step took" in r.stderr


def test_compare_bad_input_is_one_line(tmp_path):
    classifier = write(tmp_path / "classifier.yaml", "classifier")
    for args, message in [
        ([classifier, "--budget", "1m"], "nothing to compare"),
        ([tmp_path / "missing.yaml", "--budget", "1m"], "not found"),
        ([tmp_path / "nope", "--budget", "1m"], "neither a run folder nor a checkpoint"),
        ([write(tmp_path / "v.yaml", "vae"), "--budget", "soon"], "--budget must be a positive time"),
        ([write(tmp_path / "v.yaml", "vae"), "--budget", "1m", "--seeds", 0], "--seeds must be at least 1"),
    ]:
        r = invoke("compare", *args, "--runs-dir", tmp_path / "runs", "-q", ok=False)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
