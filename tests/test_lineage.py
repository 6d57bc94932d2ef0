"""Runs that build on other runs: a child family names a parent run in its config; the parent is resolved,
checked, frozen and embedded in the child's checkpoint, so the child samples and resumes without it.

Two test-only families, registered for this module only (the registry-wide tests never see them):
a child that learns a Gaussian over a frozen autoencoder's latents, and a grandchild that shifts the
child's Gaussian.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml
from helpers import SPEC, invoke, runner, tiny_config, tiny_parents
from torch import nn

from genai_cli import load_checkpoint
from genai_cli.api import build_model
from genai_cli.cli import app
from genai_cli.config import ParentRef, from_dict, parent_refs
from genai_cli.errors import GenaiError
from genai_cli.lineage import check_frozen, frozen_parameters, resolve_parent, state_hash
from genai_cli.models.base import GenerativeModel, RunRef, run_ref
from genai_cli.registry import MODELS, Registry
from genai_cli.runs import load_checkpoint_file, save_checkpoint
from genai_cli.train import Trainer


@dataclass
class PriorConfig:
    autoencoder: RunRef = run_ref(accepts="autoencoder")


class LatentPrior(GenerativeModel):
    """A diagonal Gaussian fitted to a frozen autoencoder's latents; samples decode through the autoencoder."""

    Config = PriorConfig

    def __init__(self, config, spec, parents):
        super().__init__(config, spec, parents)
        d = self.parents["autoencoder"].config.latent_dim
        self.mean = nn.Parameter(torch.zeros(d))
        self.log_std = nn.Parameter(torch.zeros(d))

    def encode(self, x):
        return self.parents["autoencoder"].encode(x)

    def decode(self, z):
        return torch.sigmoid(self.parents["autoencoder"].decode(z))

    def loss(self, batch):
        z = self.encode(batch[0])  # (B, D)
        nll = 0.5 * ((z - self.mean) / self.log_std.exp()) ** 2 + self.log_std
        return {"loss": nll.mean()}

    @torch.no_grad()
    def sample(self, n, *, generator=None):
        eps = torch.randn(n, self.mean.shape[0], generator=generator, device=self.mean.device)
        return self.decode(self.mean + self.log_std.exp() * eps)


@dataclass
class ShiftConfig:
    prior: RunRef = run_ref(accepts=("test_prior",))


class ShiftedPrior(GenerativeModel):
    """A learned shift of a frozen LatentPrior's mean: a child of a child."""

    Config = ShiftConfig

    def __init__(self, config, spec, parents):
        super().__init__(config, spec, parents)
        self.shift = nn.Parameter(torch.zeros_like(self.parents["prior"].mean))

    def loss(self, batch):
        prior = self.parents["prior"]
        z = prior.encode(batch[0])
        return {"loss": (((z - prior.mean - self.shift) / prior.log_std.exp()) ** 2).mean()}

    @torch.no_grad()
    def sample(self, n, *, generator=None):
        prior = self.parents["prior"]
        eps = torch.randn(n, self.shift.shape[0], generator=generator, device=self.shift.device)
        return prior.decode(prior.mean + self.shift + prior.log_std.exp() * eps)


class StoresItsParent(LatentPrior):
    """Wrong: keeping the parent as an attribute makes it a submodule (trained, averaged, saved)."""

    def __init__(self, config, spec, parents):
        super().__init__(config, spec, parents)
        self.ae = parents["autoencoder"]


@pytest.fixture(scope="module", autouse=True)
def test_families():
    with MODELS.scoped("test_prior", LatentPrior), MODELS.scoped("test_shift", ShiftedPrior):
        yield


def child_raw(ref: str, family: str = "test_prior", key: str = "autoencoder", **data) -> dict:
    raw = tiny_config(family, max_steps=2)
    raw["model"] = {"family": family, key: ref}
    raw["data"].update(data)
    return raw


def train(root, name: str, raw: dict, *extra, ok: bool = True):
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return invoke("train", path, "--runs-dir", root, "--name", name, "-q", *extra, ok=ok)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ae (autoencoder) <- child (test_prior) <- grandchild (test_shift), 2 steps each."""
    root = tmp_path_factory.mktemp("lineage")
    train(root, "ae", tiny_config("autoencoder", max_steps=2))
    train(root, "child", child_raw("ae"))
    train(root, "grandchild", child_raw("child", family="test_shift", key="prior"))
    return root


@pytest.fixture
def copied(runs, tmp_path):
    """A private copy of the runs, for tests that delete parents."""
    return shutil.copytree(runs, tmp_path / "runs")


def draw(target, out, *extra):
    invoke("sample", target, "-n", 6, "--seed", 3, "--out", out, *extra)
    return np.load(out)["images"]


# -- the config ---------------------------------------------------------------------------------
def test_a_parent_field_reads_as_a_run_reference():
    assert parent_refs(PriorConfig) == {"autoencoder": ParentRef(("autoencoder",))}
    assert from_dict(child_raw("runs/ae/checkpoints/best.pt")).model.autoencoder == "runs/ae/checkpoints/best.pt"
    assert from_dict(child_raw(42)).model.autoencoder == "42"  # a run named 42
    with pytest.raises(GenaiError, match=r"'model.autoencoder' must name a run .* got \[1\]$"):
        from_dict(child_raw([1]))
    raw = child_raw("ae")
    del raw["model"]["autoencoder"]
    with pytest.raises(GenaiError, match="'model.autoencoder' is not set: family 'test_prior' builds on a run of "
                                         "family autoencoder"):
        from_dict(raw)


def test_scoped_registration_leaves_nothing_behind():
    reg = Registry("thing")
    with reg.scoped("a", 1):
        assert reg.get("a") == 1
    assert "a" not in reg and reg.names() == []


# -- building, without training the parent -------------------------------------------------------
def test_an_untrained_tiny_parent_builds_the_child_and_only_the_child_learns(shapes_batch):
    parents = tiny_parents(LatentPrior, SPEC)
    model = build_model("test_prior", PriorConfig(autoencoder="untrained"), SPEC, parents=parents)
    ae = model.parents["autoencoder"]
    assert [n for n, _ in model.named_parameters()] == ["mean", "log_std"]
    assert set(model.state_dict()) == {"mean", "log_std"}
    model.train()
    assert not ae.training, "the parent stays in eval mode"
    model.loss(shapes_batch)["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in ae.parameters())
    a = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, *SPEC.shape) and torch.equal(a, model.sample(3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(GenaiError, match="optimizer 'main' holds weights of a frozen parent run"):
        check_frozen(model, {"main": torch.optim.AdamW([*model.parameters(), *ae.parameters()])})
    assert next(model.double().parents["autoencoder"].parameters()).dtype == torch.float64, ".to() moves parents"


def test_a_family_that_stores_its_parent_as_a_submodule_is_refused():
    with MODELS.scoped("test_bad", StoresItsParent), pytest.raises(TypeError, match=r"self.parents\['autoencoder'\]"):
        build_model("test_bad", PriorConfig(autoencoder="x"), SPEC, parents=tiny_parents(StoresItsParent, SPEC))


# -- training -----------------------------------------------------------------------------------
def test_the_parent_is_frozen_out_of_the_optimizer_and_the_ema_and_embedded(runs):
    (runs / "direct" / "checkpoints").mkdir(parents=True)
    trainer = Trainer(from_dict(child_raw("ae")), runs / "direct", quiet=True)
    parent = trainer.model.parents["autoencoder"]
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    frozen = {id(p) for p in parent.parameters()}
    optimised = {id(p) for opt in trainer.optimizers.values() for g in opt.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in trainer.model.parameters()} and frozen.isdisjoint(optimised)
    assert frozen.isdisjoint(id(p) for p in trainer.ema.module.parameters())
    assert trainer.ema.module.parents["autoencoder"] is parent, "the EMA copy shares the frozen parent"
    own_before = trainer.model.mean.detach().clone()
    trainer.fit()
    assert all(p.grad is None for p in parent.parameters())
    assert all(torch.equal(before[k], v) for k, v in parent.state_dict().items()), "the parent must not change"
    assert not torch.equal(own_before, trainer.model.mean.detach()), "the child's own weights learn"

    state = load_checkpoint_file(runs / "direct" / "checkpoints" / "last.pt")
    ae = load_checkpoint_file(runs / "ae" / "checkpoints" / "last.pt")
    record = state["parents"]["autoencoder"]
    assert (record["name"], record["step"], record["family"]) == ("ae", ae["step"], "autoencoder")
    assert record["hash"] == state_hash(ae["ema"]), "the parent's EMA weights, as sampling uses"
    assert all(torch.equal(record["model"][k], v) for k, v in ae["ema"].items())
    assert set(state["model"]) == set(state["ema"]) == {"mean", "log_std"}


def test_the_child_samples_after_its_parent_is_deleted(copied, tmp_path):
    before = draw(copied / "child", tmp_path / "a.npz")
    shutil.rmtree(copied / "ae")
    assert np.array_equal(before, draw(copied / "child", tmp_path / "b.npz"))
    model = load_checkpoint(copied / "child" / "checkpoints" / "last.pt")
    x = model.sample(6, generator=torch.Generator().manual_seed(3))
    assert x.shape == (6, *SPEC.shape) and not model.parents["autoencoder"].training


def test_resume_takes_the_parent_from_the_checkpoint(copied):
    shutil.rmtree(copied / "ae")
    invoke("train", "--resume", copied / "child", "--runs-dir", copied, "--set", "train.max_steps=4", "-q")
    state = load_checkpoint_file(copied / "child" / "checkpoints" / "last.pt")
    ae = load_checkpoint_file(copied / "grandchild" / "checkpoints" / "last.pt")["parents"]["prior"]["parents"]
    assert state["step"] == 4 and state["parents"]["autoencoder"]["hash"] == ae["autoencoder"]["hash"]


def test_a_grandchild_trains_samples_and_resumes_with_no_ancestor_on_disk(copied, tmp_path):
    state = load_checkpoint_file(copied / "grandchild" / "checkpoints" / "last.pt")
    prior = state["parents"]["prior"]
    assert prior["name"] == "child" and prior["parents"]["autoencoder"]["name"] == "ae"
    model = load_checkpoint(copied / "grandchild" / "checkpoints" / "last.pt")
    ae = model.parents["prior"].parents["autoencoder"]
    assert frozen_parameters(model) == 8 + sum(p.numel() for p in ae.parameters())  # every generation
    before = draw(copied / "grandchild", tmp_path / "a.npz")
    shutil.rmtree(copied / "ae")
    shutil.rmtree(copied / "child")
    assert np.array_equal(before, draw(copied / "grandchild", tmp_path / "b.npz"))
    invoke("train", "--resume", copied / "grandchild", "--runs-dir", copied, "--set", "train.max_steps=3", "-q")


def test_a_tampered_embedded_parent_is_refused(copied):
    path = copied / "child" / "checkpoints" / "last.pt"
    state = load_checkpoint_file(path)
    weights = state["parents"]["autoencoder"]["model"]
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key] + 1
    save_checkpoint(state, path)
    with pytest.raises(GenaiError, match="embedded parent 'ae' does not match its hash"):
        load_checkpoint(path)


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ref, data, needle", [
    ("nope", {}, "model.autoencoder: 'nope' is neither a run folder nor a checkpoint file"),
    ("child", {}, "model.autoencoder: 'child' is a test_prior run; expected a run of family autoencoder"),
    ("ae", {"image_size": 16}, "model.autoencoder: 'ae' was trained on 1x8x8 images but this run's data is 1x16x16"),
])
def test_a_wrong_parent_is_refused_with_one_line(runs, ref, data, needle):
    r = train(runs, "refused", child_raw(ref, **data), ok=False)
    assert r.exit_code == 2 and needle in r.stderr and "expected a run of family autoencoder" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert not (runs / "refused").exists(), "a refused run leaves no folder"
    spec = SPEC if not data else type(SPEC)(1, 16, 4)
    with pytest.raises(GenaiError, match=needle.split(": ", 1)[1].replace("(", r"\(")) as e:
        resolve_parent(ref, accepts=("autoencoder",), root=runs, spec=spec, role="model.autoencoder")
    assert "\n" not in str(e.value)


def test_a_missing_parent_with_a_config_of_its_name_says_how_to_train_it(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the bundled configs name their parents after a config: configs/<name>.yaml
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "spatial_ae_mnist.yaml").write_text("model: {family: spatial_ae}\n")
    with pytest.raises(GenaiError, match=r"train it first: genai train configs/spatial_ae_mnist\.yaml$"):
        resolve_parent("spatial_ae_mnist", accepts=("autoencoder",), root=runs, role="model.autoencoder")
    with pytest.raises(GenaiError) as e:  # no config of that name: no advice
        resolve_parent("nope", accepts=("autoencoder",), root=runs, role="model.autoencoder")
    assert "genai train" not in str(e.value)


# -- inspect ------------------------------------------------------------------------------------
def test_inspect_shows_the_lineage(runs):
    child = load_checkpoint_file(runs / "child" / "checkpoints" / "last.pt")["parents"]["autoencoder"]
    grand = load_checkpoint_file(runs / "grandchild" / "checkpoints" / "last.pt")["parents"]["prior"]
    r = runner.invoke(app, ["inspect", "grandchild", "--runs-dir", str(runs)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.stderr
    assert f"grandchild <- child @ step 2, {grand['hash'][:12]} (test_prior, model.prior)" in r.stdout
    assert f"child <- ae @ step 2, {child['hash'][:12]} (autoencoder, model.autoencoder)" in r.stdout
    assert "frozen in the runs it builds on" in r.stdout
    r = invoke("inspect", runs / "child.yaml", "--runs-dir", runs)  # a config: resolved and built, not trained
    assert f"builds on: child <- ae @ step 2, {child['hash'][:12]}" in r.stdout
