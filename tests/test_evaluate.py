"""genai evaluate: the metrics on synthetic feature sets, temperature scaling, the evaluator lookup, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import invoke, metric_rows, tiny_config, tiny_model

from genai_cli.config import DataConfig
from genai_cli.data import load_data
from genai_cli.errors import GenaiError
from genai_cli.evaluation import calibrate, metrics
from genai_cli.evaluation import evaluator as evaluators
from genai_cli.models.base import ImageSpec
from genai_cli.registry import MODELS


def gaussian_set(n=600, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)


# -- metrics on feature sets --------------------------------------------------------------------
def test_frechet_distance_is_zero_for_a_set_and_grows_with_a_mean_shift():
    x = gaussian_set()
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # Shifting every feature by c leaves the covariance alone: the distance is exactly ||c||^2.
    small, large = metrics.frechet_distance(x, x + 0.5), metrics.frechet_distance(x, x + 2.0)
    assert small == pytest.approx(16 * 0.25, rel=1e-4) and large == pytest.approx(16 * 4.0, rel=1e-4)
    assert metrics.frechet_distance(x, gaussian_set(seed=1)) > 1.0


def test_kid_of_identical_distributions_is_near_zero_and_grows_with_a_shift():
    # KID is unbiased for two independent sets: two draws of one distribution give ~0 (either sign). (A set
    # against itself is not independent: its identical pairs count as cross-set similarity, so KID < 0.)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 500, 16, generator=g, dtype=torch.float64)
    same, std = metrics.kernel_distance(x, y)
    shifted, _ = metrics.kernel_distance(x, y + 0.5)
    assert abs(same) < 0.02 * shifted and shifted > 10 * std
    assert metrics.kernel_distance(x, y + 1.0)[0] > shifted
    assert metrics.kernel_distance(x, y, seed=3) == metrics.kernel_distance(x, y, seed=3)  # seeded subsets


def test_precision_recall_density_coverage():
    x = gaussian_set()
    same = metrics.precision_recall_density_coverage(x, x)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = metrics.precision_recall_density_coverage(x, x + 100.0)
    assert far["precision"] == 0.0 and far["coverage"] == 0.0
    # A collapsed sample (all near one real point) is precise but covers little of the real set.
    collapsed = metrics.precision_recall_density_coverage(x, x[:1].repeat(50, 1) + 1e-3 * gaussian_set(50, seed=2))
    assert collapsed["precision"] == 1.0 and collapsed["coverage"] < 0.05


def test_a_collapsed_sample_covers_one_class():
    collapsed = torch.zeros(200, 10)
    collapsed[:, 7] = 1.0  # one digit repeated, always classified as 7
    stats = metrics.class_statistics(collapsed)
    assert stats["classes_covered"] == 1 and stats["class_entropy"] == 0.0 and stats["confident_share"] == 1.0
    assert stats["class_histogram"][7] == 200
    uniform = metrics.class_statistics(torch.eye(10).repeat(20, 1) * 0.5 + 0.05)
    assert uniform["classes_covered"] == 10 and uniform["class_entropy"] == pytest.approx(1.0)
    assert uniform["confident_share"] == 0.0


# -- calibration --------------------------------------------------------------------------------
def test_temperature_scaling_recovers_overconfidence_and_lowers_ece():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 5, generator=g) * 1.5
    targets = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    sure = true_logits * 3.0  # a model three times too sure of itself
    fit, held = slice(0, 10000), slice(10000, None)
    report = metrics.temperature_scaling(sure[fit], targets[fit], sure[held], targets[held])
    assert report["predictions"] == report["fit_predictions"] == 10000  # fitted on one half, measured on the other
    assert report["temperature"] == pytest.approx(3.0, rel=0.1)
    assert report["ece_after"] < 0.3 * report["ece_before"]
    assert report["nll_after"] < report["nll_before"]
    # A calibrated model keeps T ~ 1.
    assert metrics.fit_temperature(true_logits, targets) == pytest.approx(1.0, abs=0.1)


def test_ece_of_a_perfectly_calibrated_binary_predictor():
    # Confidence 0.8, right 80 % of the time: no calibration error.
    logits = torch.tensor([[math.log(4.0), 0.0]]).repeat(1000, 1)
    targets = (torch.arange(1000) % 5 == 0).long()
    assert metrics.expected_calibration_error(logits, targets) == pytest.approx(0.0, abs=1e-4)


# -- the classifier family ----------------------------------------------------------------------
def test_classifier_outputs_and_refusals(shapes_batch):
    model = tiny_model("classifier").eval()
    x, y = shapes_batch
    assert model.features(x).shape == (16, 16) and model.logits(x).shape == (16, 4)
    val = model.validation_metrics([shapes_batch])
    assert 0 <= val["accuracy"] <= 1 and val["error_rate"] == pytest.approx(1 - val["accuracy"])
    with pytest.raises(GenaiError, match="draws no images"):
        model.sample(2)
    with pytest.raises(TypeError):
        model.sample(2, temperature=1.0)
    with pytest.raises(GenaiError, match="labelled dataset"):
        tiny_model("classifier", spec=ImageSpec(1, 8, 0))


def test_bundled_evaluator_configs_follow_the_recipe():
    from genai_cli.config import load_config

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "configs" / "classifier_mnist.yaml").read_text())
    recipe = evaluators.evaluator_config(DataConfig(name="mnist5k"))
    assert raw["model"] == recipe["model"] and raw["data"]["name"] == "mnist5k"
    for name, path in evaluators.EVALUATOR_CONFIGS.items():
        cfg = load_config(root / path)
        assert cfg.family in evaluators.evaluator_families() and cfg.data.name == name
    assert evaluators.evaluator_families() == ("classifier",)  # declared on the family class: evaluator = True


# -- the evaluator lookup -----------------------------------------------------------------------
def write_run(root, name, family, data):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"family": family}, "data": data}))
    return run / "checkpoints" / "last.pt"


def test_find_evaluator_matches_dataset_and_shape(tmp_path):
    spec = ImageSpec(1, 8, 4)
    data = DataConfig(name="shapes", image_size=8)
    assert evaluators.find_evaluator(data, spec, tmp_path) is None
    write_run(tmp_path, "other-data", "classifier", {"name": "digits"})
    write_run(tmp_path, "other-size", "classifier", {"name": "shapes", "image_size": 12})
    write_run(tmp_path, "not-a-classifier", "ddpm", {"name": "shapes", "image_size": 8})
    assert evaluators.find_evaluator(data, spec, tmp_path) is None
    good = write_run(tmp_path, "good", "classifier", {"name": "shapes", "image_size": 8})
    write_run(tmp_path, "other-split", "classifier", {"name": "shapes", "image_size": 8, "split_seed": 5})
    assert evaluators.find_evaluator(data, spec, tmp_path) == good


def test_evaluator_command_names_the_bundled_config(tmp_path):
    spec = ImageSpec(1, 28, 10)
    cmd = evaluators.evaluator_command(DataConfig(name="mnist5k"), spec, tmp_path, "runs/a")
    assert cmd == f"genai train configs/classifier_mnist.yaml --runs-dir {tmp_path}"
    cmd = evaluators.evaluator_command(DataConfig(name="mnist5k", image_size=16), ImageSpec(1, 16, 10), tmp_path, "a")
    assert "--set data.image_size=16" in cmd
    assert evaluators.evaluator_command(DataConfig(name="shapes"), spec, tmp_path, "runs/a") == \
        "genai evaluate runs/a --train-evaluator"


# -- the CLI end to end -------------------------------------------------------------------------
@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluators, "EVALUATOR_MAX_STEPS", 6)  # a quick evaluator is enough to exercise the plumbing
    root = tmp_path / "runs"

    def train(family, name, **train_overrides):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config(family, **train_overrides)))
        invoke("train", path, "--runs-dir", root, "--name", name, "--quiet")
        return root / name

    return root, train


def test_evaluate_without_an_evaluator_says_the_command(runs):
    root, train = runs
    run = train("ddpm", "d")
    r = invoke("evaluate", run, "--runs-dir", root, "-n", 16, ok=False)
    assert r.exit_code != 0
    assert r.stderr.count("\n") == 1 and "no evaluator network" in r.stderr
    assert f"genai evaluate {run} --train-evaluator" in r.stderr


def test_evaluate_trains_the_evaluator_then_compares_runs(runs):
    root, train = runs
    a, b = train("ddpm", "a"), train("vae", "b")
    r = invoke("evaluate", a, "--runs-dir", root, "-n", 16, "--train-evaluator", "--json", "-q")
    result = json.loads(r.stdout)
    m = result["metrics"]
    for key in ("classifier_fid", "kid", "precision", "recall", "density", "coverage", "class_entropy",
                "classes_covered", "confident_share", "sample_seconds_per_64", "reference_fid"):
        assert key in m and np.isfinite(m[key]), key
    assert sum(result["class_histogram"]) == 16 and result["evaluator"].startswith(str(root / "evaluator-shapes-1x8"))
    # The evaluator was started like any genai train run: config.yaml written whole, with the resolved precision.
    ev_run = Path(result["evaluator"]).parent.parent
    config_text = (ev_run / "config.yaml").read_text()
    assert "# resolved: " in config_text
    assert yaml.safe_load(config_text)["model"]["family"] in evaluators.evaluator_families()
    records = metric_rows(a)
    assert records[-1]["split"] == "evaluate" and records[-1]["classifier_fid"] == pytest.approx(m["classifier_fid"])
    # Sampling options replace the run's sample: defaults for the draw, and are recorded with its figures.
    r = invoke("evaluate", a, "--runs-dir", root, "-n", 16, "--sampler", "ddim", "--steps", 3, "--json", "-q")
    other = json.loads(r.stdout)
    assert other["sample_options"]["sampler"] == "ddim" and other["sample_options"]["steps"] == 3
    assert other["metrics"]["classifier_fid"] != pytest.approx(m["classifier_fid"])
    assert metric_rows(a)[-1]["sample_options"] == other["sample_options"]
    said = invoke("inspect", a).stdout  # genai inspect tells the newest evaluation
    assert "evaluated" in said and "classifier-FID" in said and "sampler=ddim" in said and "(newest" in said
    for flags, needle in ((["--top-k", 5], "--top-k is not an option of family 'ddpm'"),
                          (["--temperature", "warm"], "--temperature takes a number"),
                          (["--calibrate", "--guidance", 1.5], "it takes no -n, --guidance")):
        r = invoke("evaluate", a, "--runs-dir", root, "-n", 16, *flags, ok=False)  # refused before any work
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    # The second time the evaluator is found; two runs give one table and a bar chart.
    r = invoke("evaluate", a, b, "--runs-dir", root, "-n", 16, "--chart", root / "cmp.png")
    assert (root / "cmp.png").is_file() and "bits/dim" in r.stdout and "classifier-FID" in r.stdout
    assert len(list(root.glob("evaluator-*"))) == 1


def test_calibrate_then_sample_with_the_calibrated_temperature(runs, tmp_path):
    root, train = runs
    run = train("pixelcnn", "p")
    r = invoke("sample", run, "-n", 2, "--temperature", "calibrated", ok=False)
    assert r.exit_code == 2 and f"genai evaluate {run} --calibrate" in r.stderr
    r = invoke("sample", run, "-n", 2, "--temperature", "warm", ok=False)
    assert "a number or 'calibrated'" in r.stderr
    r = invoke("evaluate", run, "--calibrate", "--runs-dir", root, "--json", "-q")
    report = json.loads(r.stdout)
    # T is fitted on one half of the validation images and measured on the other, held-out half.
    val_images = load_data(DataConfig(name="shapes", image_size=8)).val_x.shape[0]
    assert report["validation_images"] == val_images == report["fit_images"] + report["held_out_images"]
    assert report["measured_on"] == "held-out half" and report["held_out_images"] > 0
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["temperature"] == pytest.approx(report["temperature"]) and saved["step"] == 4
    assert report["temperature"] > 0 and report["nll_after"] <= report["nll_before"] + 1e-6
    diagram = run / "reliability.png"  # drawn beside calibration.json: before and after, on the held-out half
    assert diagram.stat().st_size > 1000 and report["reliability_diagram"] == str(diagram)
    assert sum(report["reliability_before"]["count"]) == report["predictions"]
    invoke("sample", run, "-n", 2, "--temperature", "calibrated", "--out", tmp_path / "c.npz")
    invoke("sample", run, "-n", 2, "--sweep", "temperature=calibrated,1", "--out", tmp_path / "s.png")
    # Training further makes the fit stale.
    invoke("train", "--resume", run, "--set", "train.max_steps=6", "--runs-dir", root, "--quiet")
    r = invoke("sample", run, "-n", 2, "--temperature", "calibrated", ok=False)
    assert "fitted at step 4" in r.stderr and "--calibrate" in r.stderr


def test_calibration_split_halves_are_disjoint_seeded_and_whole():
    fit, held = calibrate.calibration_split(101)
    assert len(fit) == 51 and len(held) == 50
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(101))  # disjoint, together every image
    assert all(torch.equal(a, b) for a, b in zip((fit, held), calibrate.calibration_split(101)))  # seeded
    with pytest.raises(GenaiError, match="at least 2 validation images"):
        calibrate.calibration_split(1)


@pytest.mark.parametrize("option", [["-n", "50"], ["--seed", "3"], ["--evaluator", "runs/x"], ["--chart", "c.png"],
                                    ["--train-evaluator"]])
def test_calibrate_refuses_the_options_it_would_ignore(tmp_path, option):
    r = invoke("evaluate", "--calibrate", *option, "--runs-dir", tmp_path, ok=False)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert f"it takes no {option[0]}" in r.stderr


def test_evaluator_of_a_wrong_family_is_one_line(runs):
    root, train = runs
    run = train("ddpm", "d")
    r = invoke("evaluate", run, "--evaluator", run, "--runs-dir", root, "-n", 16, ok=False)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: --evaluator: ") and "ddpm run" in r.stderr and "classifier" in r.stderr


def test_calibrate_refuses_continuous_families(runs):
    root, train = runs
    run = train("ddpm", "d")
    r = invoke("evaluate", run, "--calibrate", "--runs-dir", root, ok=False)
    assert r.exit_code == 2 and "outputs none" in r.stderr
    from genai_cli.cli import parse_temperature

    with pytest.raises(GenaiError, match="samples from logits"):
        parse_temperature("calibrated", "vae", MODELS.get("vae"), run / "checkpoints" / "last.pt", 4)


# -- the diffusion bound ------------------------------------------------------------------------
def test_diffusion_bound_is_unbiased_across_strata(shapes_batch):
    torch.manual_seed(0)
    model = tiny_model("ddpm").eval()  # T = 20
    x = (shapes_batch[0][:4] * 255).round() / 255, shapes_batch[1][:4]  # 8-bit levels, as the data is
    g = torch.Generator().manual_seed(0)
    # 19 strata of one timestep each: every t is scored (only the noise is drawn); 2 strata: t is drawn too.
    every_t = torch.stack([model.variational_bound(x, 19, generator=g).double().sum() for _ in range(20)])
    sampled = torch.stack([model.variational_bound(x, 2, generator=g).double().sum() for _ in range(200)])
    assert torch.isfinite(every_t).all() and (every_t < 0).all()  # a log-probability of discrete data
    standard_error = (every_t.var() / every_t.numel() + sampled.var() / sampled.numel()).sqrt()
    assert abs(sampled.mean() - every_t.mean()) < 4 * standard_error  # the same expectation
    assert 0 < model.bits_per_dim(-float(every_t.mean()) / 4, model.spec) < 1000
