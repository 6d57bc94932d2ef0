"""The masked models: which tokens are masked, what the loss reads, how iterative filling proceeds, inpainting,
the likelihood bound, and MaskGIT over a tokenizer run."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SPEC, invoke, tiny_config, tiny_model

from genai_cli.errors import GenaiError
from genai_cli.generate import Inpaint, SampleRequest, draw
from genai_cli.nn.masked import (
    UNIFORM_RATES,
    MaskedTransformer,
    absorbing_bound,
    fill_tokens,
    gamma,
    mask_counts,
    masked_cross_entropy,
    random_mask,
)


def test_loss_reads_masked_positions_only():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 10, 5), torch.randint(0, 5, (4, 10))
    mask = random_mask(torch.tensor([1, 3, 5, 9]), 10)
    changed = torch.where(mask, targets, (targets + 1) % 5)  # every unmasked target replaced
    assert torch.equal(masked_cross_entropy(logits, targets, mask), masked_cross_entropy(logits, changed, mask))
    assert masked_cross_entropy(logits, targets, mask) != masked_cross_entropy(logits, (targets + 1) % 5, mask)


def test_mask_token_is_no_pixel_value():
    model = tiny_model("masked_pixel")  # 4 levels
    assert model.mask_id == model.levels == 4
    x = torch.rand(2, *SPEC.shape)
    assert model.network(model.tokens_of(x)).shape == (2, SPEC.dims, model.levels)  # logits over values only


@pytest.mark.parametrize("n", [1, 3, 49, 784])
def test_masked_share_follows_the_schedule_and_is_never_zero(n):
    u = torch.rand(512, generator=torch.Generator().manual_seed(5))  # the draw mask_counts makes from the seed
    uniform = mask_counts(512, n, "uniform", torch.Generator().manual_seed(5))
    lo, hi = UNIFORM_RATES
    assert torch.equal(uniform, torch.floor((lo + (hi - lo) * u) * n + 0.5).long().clamp(1, n))
    cosine = mask_counts(512, n, "cosine", torch.Generator().manual_seed(5))
    assert torch.equal(cosine, torch.ceil(torch.cos(math.pi / 2 * u) * n).long().clamp(1, n))
    for counts in (uniform, cosine):
        assert counts.min() >= 1 and counts.max() <= n
    assert torch.equal(random_mask(cosine, n).sum(1), cosine)


def test_iterative_fill_follows_the_schedule_and_never_changes_a_fixed_token():
    torch.manual_seed(0)
    b, n, k, steps = 3, 40, 6, 7
    start = torch.randint(0, k, (b, n))
    start[:, 5:] = k  # 35 masked, 5 given
    seen = []

    def predict(tokens, at):
        seen.append(tokens.clone())
        assert torch.equal(at, tokens == k)  # asked for the masked positions only
        return torch.randn(b, n, k)[at]

    trace = []
    out = fill_tokens(predict, start, k, steps, choice_temperature=2.0, generator=torch.Generator().manual_seed(1),
                      trace=trace)
    expected = [math.floor(35 * gamma(s / steps) + 1e-9) for s in range(1, steps)] + [0]
    assert [int(t[0]) for t in trace] == expected and all((t == t[0]).all() for t in trace)
    assert not (out == k).any()
    assert torch.equal(out[:, :5], start[:, :5])  # given tokens untouched
    for before, after in zip(seen, seen[1:] + [out]):
        fixed = before != k
        assert torch.equal(after[fixed], before[fixed])  # once fixed, never changed


@pytest.mark.parametrize("classes", [0, 3])
def test_lean_sampling_forward_gives_the_module_forward_and_follows_weight_changes(classes):
    """The sampling path (eval, no autograd) is ``forward``'s maths without the module calls: the same logits in fp32,
    at every position or at the asked ones only, the wholly masked grid's from its kept copy, and still after an
    optimizer step changes the weights it keeps."""
    torch.manual_seed(0)
    net = MaskedTransformer(9, 12, 16, 2, 2, 4, 0.1, num_classes=classes)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    tokens, at = torch.randint(0, 10, (3, 12)), torch.rand(3, 12) < 0.4
    blank, everywhere = torch.full((3, 12), net.mask_id), torch.ones(3, 12, dtype=torch.bool)
    labels = torch.tensor([0, 2, 3]) if classes else None
    for _ in range(2):
        net.eval()
        with torch.enable_grad():  # autograd on: the module path
            full, full_blank = net(tokens, labels), net(blank, labels)
        with torch.no_grad():
            torch.testing.assert_close(net(tokens, labels), full, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(net(tokens, labels, at), full[at], rtol=1e-6, atol=1e-6)
            for _ in range(2):  # computed, then read from the copy kept
                torch.testing.assert_close(net(blank, labels, everywhere), full_blank.flatten(0, 1), rtol=1e-5,
                                           atol=1e-6)
        net.train()
        net(tokens, labels).square().mean().backward()
        opt.step()


def test_lean_sampling_forward_under_bf16_autocast_keeps_the_residual_stream_in_fp32():
    """Under autocast (precision bf16, or auto on a CPU with bf16 units) the lean path's products are bf16 like the
    module forward's and its residual stream stays fp32 like forward's, so the two agree (a bf16 residual stream
    would be off by 0.03-0.2 here)."""
    torch.manual_seed(0)
    net = MaskedTransformer(9, 12, 32, 2, 3, 4, 0.0).eval()
    with torch.no_grad():
        for p in net.parameters():  # weights of a trained size, not the initialisation's
            p.add_(0.3 * torch.randn_like(p))
    tokens, at = torch.randint(0, 10, (3, 12)), torch.rand(3, 12) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.enable_grad():
            full = net(tokens).float()
        with torch.no_grad():
            lean = net(tokens, None, at).float()
    torch.testing.assert_close(lean, full[at], rtol=1e-3, atol=1e-3)


def test_at_least_one_token_is_fixed_per_step():
    trace = []
    tokens = torch.full((1, 4), 3)
    fill_tokens(lambda t, at: torch.zeros(int(at.sum()), 3), tokens, 3, 10, trace=trace)
    counts = [int(t) for t in trace]
    assert counts == [3, 2, 1, 0]  # 10 steps asked, 4 tokens: one per step, then done


def test_one_step_is_one_shot_filling():
    model = tiny_model("masked_pixel").eval()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    one_shot = model.sample(4, generator=g(), fill="one-shot")
    assert torch.equal(one_shot, model.sample(4, generator=g(), fill="iterative", steps=1))
    assert not torch.equal(one_shot, model.sample(4, generator=g(), fill="iterative", steps=4))
    with pytest.raises(GenaiError, match="one-shot fills every masked token in one pass"):
        model.sample(2, fill="one-shot", steps=3)


@pytest.mark.parametrize("region", ["top", "bottom", "left", "right", "center", "random:0.3"])
def test_inpainting_leaves_every_visible_pixel_as_given(region):
    model = tiny_model("masked_pixel", levels=256).eval()
    images = torch.randint(0, 256, (8, *SPEC.shape)).float() / 255
    samples = draw(model, SampleRequest(Inpaint(region), n=16, seed=2), images=images)
    grid = samples.images.view(8, 2 + 2, *SPEC.shape)  # per original: itself, what was given, 2 completions
    mask = Inpaint(region).pixels(8, SPEC.size, generator=torch.Generator().manual_seed(2))
    given = images.masked_fill(mask, 0.5)
    assert torch.equal(grid[:, 0], images) and torch.equal(grid[:, 1], given)
    for c in range(2, 4):
        assert torch.equal(grid[:, c][~mask.expand_as(images)], images[~mask.expand_as(images)])
        assert not torch.equal(grid[:, c], images)  # the region was redrawn


def test_absorbing_bound_weights_mask_sizes_correctly():
    """A model that knows nothing (uniform logits) scores N log K under every mask: the weights N / m over the
    strata must sum to exactly that."""
    n, k = 30, 7
    tokens = torch.randint(0, k, (5, n))
    bound = absorbing_bound(lambda t: torch.zeros(*t.shape, k), tokens, k, strata=6,
                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(bound, torch.full((5,), n * math.log(k)), rtol=1e-5)


def test_bound_is_a_likelihood_bound_of_the_model():
    model = tiny_model("masked_pixel", levels=2)
    x = (torch.rand(6, *SPEC.shape) > 0.5).float()
    bound = model.variational_bound((x, torch.zeros(6, dtype=torch.long)), generator=torch.Generator().manual_seed(0))
    assert bound.shape == (6,) and (bound < 0).all()
    metrics = model.validation_metrics([(x, torch.zeros(6, dtype=torch.long))])
    assert metrics["bits_per_dim_bound"] > 0 and "masked_share" in metrics


def test_masked_pixel_learns():
    """A few hundred steps on two fixed images: the masked loss falls well below chance."""
    torch.manual_seed(0)
    model = tiny_model("masked_pixel", levels=2, d_model=32, layers=2)
    x = (torch.rand(2, *SPEC.shape) > 0.5).float().repeat(8, 1, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model.loss((x, torch.zeros(16, dtype=torch.long)))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * math.log(2)


def test_maskgit_samples_through_its_tokenizer_with_guidance():
    model = tiny_model("maskgit", class_conditional=True).eval()
    tokenizer = model.parents["tokenizer"]
    assert model.seq_len == math.prod(tokenizer.token_grid) and model.vocab == tokenizer.num_codes
    assert not any(k.startswith("tokenizer") for k in model.state_dict())  # frozen parent, embedded apart
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = model.sample(4, generator=g(), labels=torch.tensor([0, 1, 2, 3]), guidance=3.0, steps=3)
    assert a.shape == (4, *SPEC.shape) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, model.sample(4, generator=g(), labels=torch.tensor([0, 1, 2, 3]), guidance=3.0, steps=3))
    with pytest.raises(GenaiError, match="not an option of family 'maskgit'"):
        draw(model, SampleRequest(Inpaint("top"), n=2), images=torch.rand(2, *SPEC.shape))


def test_cli_fills_and_inpaints(tmp_path):
    import yaml

    cfg = tiny_config("masked_pixel")
    path = tmp_path / "masked.yaml"
    path.write_text(yaml.safe_dump(cfg))
    invoke("train", path, "--runs-dir", tmp_path / "runs", "--name", "m", "--quiet")
    run = tmp_path / "runs" / "m"
    invoke("sample", run, "-n", "4", "--fill", "one-shot", "--out", tmp_path / "one.png", "--quiet")
    invoke("sample", run, "-n", "4", "--steps", "3", "--choice-temperature", "0", "--out", tmp_path / "it.png",
           "--quiet")
    invoke("sample", run, "-n", "4", "--mask", "center", "--out", tmp_path / "fill.png", "--quiet")
    assert (tmp_path / "fill.png").exists()
    bad = invoke("sample", run, "--mask", "middle", ok=False)
    assert bad.exit_code != 0 and "--mask must be one of" in bad.output
    both = invoke("sample", run, "--mask", "top", "--prefix-rows", "2", ok=False)
    assert "different ways of drawing" in both.output


def test_masked_models_can_be_calibrated():
    from genai_cli.evaluation.calibrate import calibration_families, prediction_logits

    assert {"masked", "maskgit"} <= set(calibration_families())
    model = tiny_model("masked_pixel")
    x = torch.rand(4, *SPEC.shape)
    logits, targets = prediction_logits(model, (x, torch.zeros(4, dtype=torch.long)))
    assert logits.shape == (targets.shape[0], model.levels) and targets.shape[0] >= 4
    again, _ = prediction_logits(model, (x, torch.zeros(4, dtype=torch.long)))
    assert torch.equal(logits, again)  # a fixed mask: the fit is reproducible
