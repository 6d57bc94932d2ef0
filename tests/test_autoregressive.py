"""The raster-order families: causality, cached = naive sampling, likelihood, prefixes, options, TBPTT."""

import math

import pytest
import torch

import genai_cli.models  # noqa: F401  (registers the families)
from genai_cli.errors import GenaiError
from genai_cli.models.autoregressive import AutoregressiveImageModel
from genai_cli.models.base import ImageSpec
from genai_cli.nn.autoregressive import (
    conv_logits_to_seq,
    dequantize,
    image_to_tokens,
    quantize,
    resolve_levels,
    tokens_to_image,
)
from genai_cli.registry import MODELS

# Every raster-order family in the registry (the autoregressive ones), plus config variants that change the network
# enough to deserve their own run (a variant is not a family: it has no registry entry).
AR = [name for name in MODELS.names() if issubclass(MODELS.get(name), AutoregressiveImageModel)]
VARIANTS = {"pixelcnn": [("gated_pixelcnn", {"gated": True})]}
FAMILIES = [(name, {}) for name in AR] + [(name, extra) for name in AR for _, extra in VARIANTS.get(name, [])]
FAMILY_IDS = AR + [vid for name in AR for vid, _ in VARIANTS.get(name, [])]
RECURRENT = [name for name in AR if MODELS.get(name).has_hidden_state]
WIDE = {"pixelcnn": {"channels": 24}, "row_lstm": {"hidden": 24}}
GREY = ImageSpec(channels=1, size=5)
RGB = ImageSpec(channels=3, size=4)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on shared, busy cores two threads make each small op ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(name, extra=None, spec=GREY, dtype=torch.float64, seed=0, **overrides):
    cls = MODELS.get(name)
    torch.manual_seed(seed)
    return cls(cls.Config(**{**cls.tiny, **(extra or {}), **overrides}), spec).to(dtype)


def images(spec, n, seed=1):
    return torch.rand(n, *spec.shape, generator=torch.Generator().manual_seed(seed))


def position_grads(model, tokens, i):
    """|d logits[:, i] / d input of each position|, summed: (T,)."""
    e = model.embed(tokens).detach().requires_grad_()
    logits = model.logits_from_embedding(e)
    (grad,) = torch.autograd.grad(logits[:, i].sum(), e)
    return grad.abs().reshape(tokens.shape[0], tokens.shape[1], -1).sum(dim=(0, 2))


# -- layout helpers ---------------------------------------------------------------------------------
def test_quantise_tokens_and_logit_layout_agree():
    x = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.84, 1.0])
    assert quantize(x, 2).tolist() == [0, 0, 0, 1, 1, 1]  # halves round up: 0.5 is white
    assert quantize(x, 4).tolist() == [0, 0, 1, 2, 3, 3]
    assert quantize(torch.tensor([1 / 6, 0.5]), 4).tolist() == [1, 2]
    assert torch.equal(quantize(dequantize(torch.arange(16), 16), 16), torch.arange(16))
    img = torch.randint(0, 7, (2, 3, 4, 4))
    spec = ImageSpec(channels=3, size=4)
    tokens = image_to_tokens(img)
    assert torch.equal(tokens_to_image(tokens, spec), img)
    assert tokens[0, 1].item() == img[0, 1, 0, 0].item() and tokens[0, 3].item() == img[0, 0, 0, 1].item()
    # Logits (B, C * K, H, W) whose level-k entry of channel c is 1 where img is k: argmax recovers the tokens.
    onehot = torch.nn.functional.one_hot(img, 7).permute(0, 1, 4, 2, 3).reshape(2, 3 * 7, 4, 4).float()
    assert torch.equal(conv_logits_to_seq(onehot, 3, 7).argmax(-1), tokens)


def test_levels_resolution_and_refusal():
    assert resolve_levels(0, ImageSpec(binary=True)) == 2
    assert resolve_levels(0, ImageSpec(binary=False)) == 256
    assert resolve_levels(16, ImageSpec()) == 16
    with pytest.raises(GenaiError, match="levels"):
        make("pixelcnn", levels=1)


# -- causality --------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
@pytest.mark.parametrize("name, extra", FAMILIES, ids=FAMILY_IDS)
def test_logits_see_only_earlier_positions(name, extra, spec):
    # Wider than tiny and a batch of 16, so that some ReLU along every path is active for some image.
    model = make(name, extra, spec, **WIDE.get(name, {}))
    tokens = torch.randint(0, model.levels, (16, spec.dims), generator=torch.Generator().manual_seed(0))
    per_row = spec.size * spec.channels
    for i in range(spec.dims):
        grad = position_grads(model, tokens, i)
        assert grad[i:].max() == 0, f"position {i} sees position {i + int(grad[i:].argmax())}"
        if i % per_row:  # the previous sub-pixel, in the same row, must be seen (the test is not vacuous)
            assert grad[i - 1] > 0, f"position {i} does not see position {i - 1}"


def test_gated_pixelcnn_has_no_blind_spot():
    spec = ImageSpec(channels=1, size=6)
    tokens = torch.randint(0, 4, (2, spec.dims), generator=torch.Generator().manual_seed(0))
    target, up_right = 3 * 6 + 1, 2 * 6 + 3  # pixel (3, 1) and pixel (2, 3): one row up, two columns right
    plain = make("pixelcnn", spec=spec, first_kernel=3, kernel=3, layers=4)
    gated = make("pixelcnn", {"gated": True}, spec=spec, kernel=3, layers=4)
    assert position_grads(plain, tokens, target)[up_right] == 0
    assert position_grads(gated, tokens, target)[up_right] > 0


# -- sampling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
@pytest.mark.parametrize("name, extra", FAMILIES, ids=FAMILY_IDS)
def test_stepper_logits_equal_the_full_forward(name, extra, spec):
    model = make(name, extra, spec, dtype=torch.float32).eval()
    # Every future token is non-zero: a stepper that read ahead would differ from the causal forward.
    tokens = torch.randint(1, model.levels, (3, spec.dims), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.seq_logits(tokens)
        for start in (0, 2 * spec.size * spec.channels):  # from scratch, and after a two-row prefix
            step = model.incremental(3)
            for pos in range(start, spec.dims):
                torch.testing.assert_close(step(tokens, pos), full[:, pos], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
@pytest.mark.parametrize("name, extra", FAMILIES, ids=FAMILY_IDS)
def test_cached_sampling_equals_naive_sampling(name, extra, spec):
    model = make(name, extra, spec)  # float64, so the two paths' rounding cannot flip a draw
    prefix = images(spec, 2)
    for options in [{}, dict(temperature=1.4, top_k=3, top_p=0.9), dict(noise_std=0.7, greedy=True),
                    dict(prefix_rows=2, prefix=prefix, temperature=0.8)]:
        fast = model.sample(4, generator=torch.Generator().manual_seed(3), **options)
        slow = model.sample_naive(4, generator=torch.Generator().manual_seed(3), **options)
        assert torch.equal(fast, slow), options


@pytest.mark.parametrize("name, extra", FAMILIES, ids=FAMILY_IDS)
def test_samples_are_levels_and_reproducible(name, extra):
    model = make(name, extra, dtype=torch.float32, levels=4)
    model.train()
    a = model.sample(3, generator=torch.Generator().manual_seed(0), temperature=1.5, top_p=0.9)
    b = model.sample(3, generator=torch.Generator().manual_seed(0), temperature=1.5, top_p=0.9)
    assert model.training, "sample must restore the training mode"
    assert a.shape == (3, *GREY.shape) and torch.equal(a, b)
    assert set((a * 3).round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert torch.equal(a * 3, (a * 3).round())
    binary = make(name, extra, dtype=torch.float32, levels=2).sample(3, generator=torch.Generator().manual_seed(0))
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    greedy = [model.sample(2, generator=torch.Generator().manual_seed(s), greedy=True) for s in (0, 1)]
    assert torch.equal(*greedy)


@pytest.mark.parametrize("name, extra", FAMILIES, ids=FAMILY_IDS)
def test_sampling_follows_weights_loaded_in_place(name, extra):
    # Steppers may keep derived weights (masked kernels) between calls: a load must not leave them stale.
    model, other = make(name, extra, dtype=torch.float32, seed=0), make(name, extra, dtype=torch.float32, seed=1)
    model.sample(2, generator=torch.Generator().manual_seed(0))
    model.load_state_dict(other.state_dict())
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(model.sample(2, generator=g()), other.sample(2, generator=g()))


@pytest.mark.parametrize("name, extra", FAMILIES, ids=FAMILY_IDS)
def test_prefix_completion(name, extra):
    spec = RGB
    model = make(name, extra, spec, dtype=torch.float32, levels=4)
    real = images(spec, 2)
    kept = dequantize(quantize(real, 4), 4)
    out = model.sample(4, generator=torch.Generator().manual_seed(0), prefix_rows=2, prefix=real)
    # Two completions per image, consecutive: rows 0-1 are the quantised originals.
    assert torch.equal(out[:, :, :2], kept.repeat_interleave(2, dim=0)[:, :, :2])
    whole = model.sample(2, generator=torch.Generator().manual_seed(0), prefix_rows=spec.size, prefix=real)
    assert torch.equal(whole, kept)
    plain = model.sample(2, generator=torch.Generator().manual_seed(0), prefix_rows=0, prefix=real)
    assert torch.equal(plain, model.sample(2, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(GenaiError, match="--prefix-rows"):
        model.sample(2, prefix_rows=spec.size + 1, prefix=real)
    with pytest.raises(GenaiError, match="prefix"):
        model.sample(2, prefix_rows=1)
    with pytest.raises(GenaiError, match="shape"):
        model.sample(3, prefix_rows=1, prefix=real)


@pytest.mark.parametrize("name, extra", FAMILIES, ids=FAMILY_IDS)
def test_bad_and_unknown_options(name, extra):
    model = make(name, extra, dtype=torch.float32)
    image_options = {"temperature", "top_k", "top_p", "greedy", "noise_std", "noise_on", "prefix_rows"}
    text_options = {"prompt", "max_new_tokens"} if "tokens" in model.modalities else set()
    assert model.sample_options == image_options | text_options
    assert model.discrete
    with pytest.raises(TypeError):
        model.sample(2, guidance=3.0)
    for bad in [dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(noise_std=-0.1),
                dict(noise_on="weights")]:
        with pytest.raises(GenaiError):
            model.sample(2, **bad)


@pytest.mark.parametrize("name", RECURRENT)
def test_noise_on_the_hidden_state(name):
    model = make(name, dtype=torch.float32)
    plain = model.sample(4, generator=torch.Generator().manual_seed(0), greedy=True)
    noisy = [model.sample(4, generator=torch.Generator().manual_seed(0), greedy=True, noise_std=2.0,
                          noise_on="hidden") for _ in range(2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], plain)
    with pytest.raises(GenaiError, match="naive"):
        model.sample_naive(2, noise_std=1.0, noise_on="hidden")


@pytest.mark.parametrize("name, extra", [f for f in FAMILIES if f[0] not in RECURRENT])
def test_no_hidden_state_refuses_hidden_noise(name, extra):
    with pytest.raises(GenaiError, match="--noise-on logits"):
        make(name, extra, dtype=torch.float32).sample(2, noise_std=0.5, noise_on="hidden")


# -- likelihood and training ------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [2, 16])
@pytest.mark.parametrize("name, extra", FAMILIES, ids=FAMILY_IDS)
def test_uniform_logits_give_log_k_per_dimension(name, extra, levels):
    model = make(name, extra, RGB, dtype=torch.float32, levels=levels)
    torch.nn.init.zeros_(model.out.weight)
    torch.nn.init.zeros_(model.out.bias)
    batch = (images(RGB, 3), torch.zeros(3, dtype=torch.long))
    ll = model.log_likelihood(batch)
    assert ll.shape == (3,)
    torch.testing.assert_close(ll, torch.full((3,), -RGB.dims * math.log(levels)))
    out = model.loss(batch)
    torch.testing.assert_close(out["loss"], torch.tensor(math.log(levels)))
    torch.testing.assert_close(out["bits_per_dim"], torch.tensor(math.log2(levels)))
    assert model.bits_per_dim(-ll.mean().detach(), RGB) == pytest.approx(math.log2(levels))


@pytest.mark.parametrize("name, extra", FAMILIES, ids=FAMILY_IDS)
def test_loss_under_bf16_autocast(name, extra):
    model = make(name, extra, RGB, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss((images(RGB, 2), torch.zeros(2, dtype=torch.long)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32


def test_pixel_lstm_tbptt_truncates_gradients_not_values():
    full, cut = make("pixel_lstm"), make("pixel_lstm", tbptt=4)
    cut.load_state_dict(full.state_dict())
    tokens = torch.randint(0, 4, (2, GREY.dims), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cut.seq_logits(tokens), full.seq_logits(tokens))
    # Position 10 lies in the chunk of positions 8..11, whose first input is token 7.
    grad = position_grads(cut, tokens, 10)
    assert grad[:7].max() == 0 and (grad[7:10] > 0).all()
    assert (position_grads(full, tokens, 10)[:10] > 0).all()


def test_row_lstm_tbptt_truncates_gradients_not_values():
    full, cut = make("row_lstm"), make("row_lstm", tbptt=2)
    cut.load_state_dict(full.state_dict())
    tokens = torch.randint(0, 4, (2, GREY.dims), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cut.seq_logits(tokens), full.seq_logits(tokens))
    # Pixel (3, 2) in the chunk of rows 2-3: the first layer at row 2 reads row 1, nothing reaches row 0.
    grad = position_grads(cut, tokens, 3 * 5 + 2)
    assert grad[:5].max() == 0 and grad[5:10].max() > 0
    assert position_grads(full, tokens, 3 * 5 + 2)[:5].max() > 0


@pytest.mark.parametrize("name, field, value", [("row_lstm", "hidden", 16), ("pixelcnn", "channels", 10)])
def test_rgb_groups_need_divisible_widths(name, field, value):
    with pytest.raises(GenaiError, match="divisible"):
        make(name, spec=RGB, **{field: value})


def test_config_refusals():
    with pytest.raises(GenaiError, match="heads"):
        make("pixel_transformer", d_model=10, heads=4)
    with pytest.raises(GenaiError, match="odd"):
        make("pixelcnn", kernel=4)
    with pytest.raises(GenaiError, match="tbptt"):
        make("pixel_lstm", tbptt=-1)


def test_derived_weights_key_follows_in_place_updates_replacements_and_moves():
    """Layers keep sampling's derived weights (masked, transposed) under nn.weights_key: an optimizer step, a loaded
    state and a dtype change must each give a new key, and an untouched weight the same one."""
    from genai_cli.nn import weights_key

    layer = torch.nn.Linear(3, 2)
    key = weights_key(layer.parameters())
    assert weights_key(layer.parameters()) == key
    with torch.no_grad():
        layer.weight.add_(1.0)  # what an optimizer step does
    stepped = weights_key(layer.parameters())
    assert stepped != key
    layer.load_state_dict(torch.nn.Linear(3, 2).state_dict())
    loaded = weights_key(layer.parameters())
    assert loaded not in (key, stepped)
    assert weights_key(layer.double().parameters()) != loaded
