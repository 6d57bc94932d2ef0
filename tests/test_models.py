"""Registry-wide tests (timm's test_models.py): every family, on a tiny config, gets the same checks."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import SPEC, tiny_model

from genai_cli.models.base import ImageSpec
from genai_cli.registry import MODELS

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


@pytest.mark.parametrize("family", GENERATIVE)
def test_save_then_load_gives_same_samples(family):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)  # a different initialisation, overwritten by the load
    clone = tiny_model(family).eval()
    clone.load_state_dict(torch.load(buf, weights_only=True))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(model.sample(2, generator=g()), clone.sample(2, generator=g()))


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
