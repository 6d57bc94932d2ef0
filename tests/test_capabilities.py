"""Capabilities are declared (genai_cli/capabilities.py): every registered family's declaration matches its methods,
the sampling modes it offers match what it declares, and the checker itself catches each kind of mismatch."""

from __future__ import annotations

import pytest
import torch
from helpers import SPEC, tiny_model
from torch import Tensor

from genai_cli.capabilities import CAPABILITIES, capabilities, has, problems, shown
from genai_cli.config import parent_refs
from genai_cli.models.base import GenerativeModel, ImageSpec
from genai_cli.registry import MODELS

FAMILIES = MODELS.names()


@pytest.mark.parametrize("binary", [False, True], ids=["grey", "binary"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_what_it_declares_and_nothing_else(family, binary):
    """Declared: present, callable as its protocol calls it. Undeclared: absent (or withdrawn to None). On grey
    levels and on binary data, since an instance may withdraw what its data cannot support (the Bernoulli VAE)."""
    spec = ImageSpec(SPEC.channels, SPEC.size, SPEC.num_classes, binary=binary)
    model = tiny_model(family, spec=spec)
    assert problems(model) == []
    assert capabilities(model) <= capabilities(MODELS.get(family)), "an instance narrows its class, never widens it"


def test_an_instance_withdraws_what_its_data_cannot_support():
    grey = tiny_model("vae")
    binary = tiny_model("vae", spec=ImageSpec(SPEC.channels, SPEC.size, SPEC.num_classes, binary=True))
    assert has(MODELS.get("vae"), "log_likelihood") and has(binary, "log_likelihood")
    assert not has(grey, "log_likelihood") and grey.log_likelihood is None


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_modes_match_the_declarations(family):
    """--interpolate / --traverse-dim draw through walk(); --traverse walks between real images' latents."""
    cls = MODELS.get(family)
    assert bool(cls.sample_options & {"interpolate", "traverse", "traverse_dim"}) == has(cls, "walk")
    if "traverse" in cls.sample_options:
        assert has(cls, "encode")


# What each run a family builds on must give it: the child reads its parent through that capability.
PARENT_NEEDS = {("maskgit", "tokenizer"): "tokenizer", ("latent_ddpm", "autoencoder"): "latent_grid",
                ("latent_flow", "autoencoder"): "latent_grid",
                ("distill", "teacher"): "ode_solve"}


@pytest.mark.parametrize("family", [f for f in FAMILIES if parent_refs(MODELS.get(f).Config)])
def test_the_runs_a_family_builds_on_declare_what_it_reads(family):
    for key, ref in parent_refs(MODELS.get(family).Config).items():
        need = PARENT_NEEDS[(family, key)]
        for parent in ref.accepts:
            assert has(MODELS.get(parent), need), f"{family}.{key} accepts {parent}, which gives no {need}"


def test_hooks_are_left_out_of_what_a_user_is_shown():
    assert shown(MODELS.get("dcgan")) == ["walk"] and has(MODELS.get("dcgan"), "manual_step")
    latent = MODELS.get("latent_ddpm")
    assert shown(latent) == ["reconstruct", "ode_solve"] and has(latent, "prepare")


# -- the checker catches each mismatch --------------------------------------------------------------
class _Tiny(GenerativeModel):
    def __init__(self):
        super().__init__(None, SPEC)
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_a_declared_capability_without_its_method_is_caught():
    class Claims(_Tiny):
        capabilities = frozenset({"encode"})

    assert problems(Claims()) == ["declares encode but has no method encode"]


def test_a_method_with_the_wrong_signature_is_caught():
    class Odd(_Tiny):
        capabilities = frozenset({"encode", "variational_bound"})
        bound_strata = 3

        def encode(self, x: Tensor, scale: float) -> Tensor:  # a required argument the caller never passes
            return x

        def variational_bound(self, batch, timesteps_per_image):  # no generator keyword
            return batch[0]

    found = problems(Odd())
    assert len(found) == 2 and all("cannot be called as" in p for p in found), found


def test_an_undeclared_method_or_hook_is_caught():
    class Quiet(_Tiny):
        def reconstruct(self, x: Tensor) -> Tensor:
            return x

        def prepare(self, train_images: Tensor) -> dict[str, float]:
            return {}

    assert sorted(problems(Quiet())) == ["has reconstruct but does not declare reconstruct",
                                         "overrides prepare but does not declare prepare"]


def test_a_declared_hook_must_override_the_default():
    class Idle(_Tiny):
        capabilities = frozenset({"prepare"})

    assert problems(Idle()) == ["declares prepare but keeps GenerativeModel's prepare"]


def test_unknown_names_fail_loudly():
    with pytest.raises(KeyError, match="unknown capability 'encoder'"):
        has(MODELS.get("vae"), "encoder")

    class Misspelt(_Tiny):
        capabilities = frozenset({"walks"})

    with pytest.raises(KeyError, match="unknown capabilities"):
        capabilities(Misspelt)


def test_every_capability_says_what_it_is():
    for c in CAPABILITIES.values():
        assert c.methods and c.summary and all(getattr(c.protocol, m).__doc__ for m in c.methods), c.name


def test_genai_list_shows_what_each_family_can_do():
    from typer.testing import CliRunner

    from genai_cli.cli import app

    r = CliRunner().invoke(app, ["list"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("│ vae "))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("│  "))  # the next family's row
    can = [line.split("│")[-2].strip() for line in lines[start:end]]  # the last column: one capability a line
    assert [c for c in can if c] == list(shown(MODELS.get("vae")))
    assert all(name in r.output for name, c in CAPABILITIES.items() if not c.hook)
