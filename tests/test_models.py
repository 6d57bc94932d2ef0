"""Registry-wide tests (timm's test_models.py): every family, on a tiny config, gets the same checks."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from helpers import SPEC, tiny_cfg, tiny_model, tiny_parents

from genai_cli.api import build_model, load_checkpoint
from genai_cli.capabilities import has
from genai_cli.models.base import ImageSpec
from genai_cli.registry import MODELS
from genai_cli.runs import save_checkpoint

FAMILIES = MODELS.names()
GENERATIVE = [f for f in FAMILIES if MODELS.get(f).generative]


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_finite_and_gradients_reach_every_parameter(family, shapes_batch):
    torch.manual_seed(0)
    model = tiny_model(family)
    out = model.loss(shapes_batch)
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_lower_the_loss(family, shapes_batch):
    cls = MODELS.get(family)
    if cls.adversarial:
        pytest.skip("an adversarial loss need not fall")
    torch.manual_seed(0)
    model = tiny_model(family)

    class T:
        lr, betas, weight_decay = 3e-3, [0.9, 0.999], 0.0

    opts = model.configure_optimizers(T)
    from genai_cli.models.base import Stepper

    stepper = Stepper(grad_clip=1.0)
    losses = []
    for step in range(40):
        model.current_step = step
        losses.append(model.train_step(shapes_batch, opts, stepper)["loss"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"loss did not fall: {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("family", GENERATIVE)
def test_sample_shape_range_and_seed(family):
    model = tiny_model(family).eval()
    a = model.sample(3, generator=torch.Generator().manual_seed(1))
    b = model.sample(3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, *SPEC.shape)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b), "same seed must give the same samples"


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_gives_same_samples(family, tmp_path):
    """save_checkpoint -> load_checkpoint, the files genai train writes and genai sample reads: the same weights,
    and for the same seed the same samples."""
    cls = MODELS.get(family)
    torch.manual_seed(0)
    cfg = tiny_cfg(family)
    model = build_model(family, cfg, SPEC, parents=tiny_parents(cls, SPEC)).eval()
    state = {"family": family, "config": {"model": {"family": family, **asdict(cfg)}}, "spec": asdict(SPEC),
             "model": model.state_dict(), "ema": None, "parents": model.parents.records()}
    save_checkpoint(state, tmp_path / "last.pt")
    torch.manual_seed(1)  # a different initialisation: only what the file holds may survive
    clone = load_checkpoint(tmp_path / "last.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, clone.state_dict()[key]), key
    if cls.generative:
        g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
        assert torch.equal(model.sample(2, generator=g()), clone.sample(2, generator=g()))


LIKELIHOOD = [f for f in FAMILIES if has(MODELS.get(f), "log_likelihood")]
BOUND = [f for f in FAMILIES if has(MODELS.get(f), "variational_bound")]


@pytest.mark.parametrize("binary", [False, True], ids=["grey", "binary"])
@pytest.mark.parametrize("family", LIKELIHOOD + BOUND)
def test_every_reported_likelihood_is_a_log_probability(family, binary, shapes_batch):
    """bits/dim are only reported from a normalised distribution of the pixels as stored (256 grey levels, or
    binary), so the log-likelihood or its bound is never above 0 and the bits/dim never below it. An instance
    without a likelihood on this data (a Bernoulli VAE on grey levels) reports no bits/dim at all."""
    x, y = shapes_batch
    spec = ImageSpec(SPEC.channels, SPEC.size, SPEC.num_classes, binary=binary)
    batch = ((x >= 0.5).float() if binary else x, y)
    torch.manual_seed(0)
    model = tiny_model(family, spec=spec).eval()
    with torch.no_grad():
        if has(model, "log_likelihood"):
            assert float(model.log_likelihood(batch).max()) <= 1e-4
            metrics = model.validation_metrics([batch])
            assert 0 < metrics["bits_per_dim"] < math.inf
        elif has(model, "variational_bound"):
            bound = model.variational_bound(batch, 2, generator=torch.Generator().manual_seed(0))
            assert float(bound.max()) <= 1e-4
        else:
            assert "bits_per_dim" not in model.validation_metrics([batch]), "no likelihood: no bits/dim"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_loss_is_finite(family, shapes_batch):
    torch.manual_seed(0)
    model = tiny_model(family)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(shapes_batch)["loss"]
    assert torch.isfinite(loss.float())


@pytest.mark.parametrize("family", FAMILIES)
def test_rgb_images(family):
    spec = ImageSpec(channels=3, size=8, num_classes=4)
    model = tiny_model(family, spec=spec)
    x = torch.rand(4, 3, 8, 8)
    assert torch.isfinite(model.loss((x, torch.arange(4) % 4))["loss"])
    if model.generative:
        assert model.eval().sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 8, 8)
