"""The shared sampling layer: filters checked against their definitions, draws against the filtered softmax."""

import math

import pytest
import torch
from scipy.stats import chi2

from genai_cli.errors import GenaiError
from genai_cli.sampling import check_sampling_options, draw_categorical, filter_logits, sample_logits


def kept(logits, **kw):
    """The indices filter_logits keeps, as a set (for a 1-D row)."""
    out = filter_logits(torch.as_tensor(logits, dtype=torch.float32), **kw)
    return set(torch.nonzero(torch.isfinite(out)).flatten().tolist())


def log_probs(*p):
    return torch.tensor(p, dtype=torch.float64).log().float()


def test_no_filter_is_identity():
    x = torch.randn(4, 7)
    assert torch.equal(filter_logits(x), x)
    assert torch.equal(filter_logits(x, top_k=7, top_p=1.0), x)
    torch.testing.assert_close(filter_logits(x, temperature=2.0), x / 2)


def test_top_k_1_is_argmax():
    x = torch.randn(64, 10)
    out = filter_logits(x, top_k=1)
    assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(64, dtype=torch.long))
    assert torch.equal(out.argmax(-1), x.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_logits(x, top_k=1, generator=g), x.argmax(-1))


def test_top_k_keeps_the_k_largest_ties_to_lower_index():
    assert kept([0.1, 3.0, 2.0, -1.0], top_k=2) == {1, 2}
    assert kept([1.0, 1.0, 1.0, 0.0], top_k=2) == {0, 1}
    assert kept([0.0, 2.0, 2.0], top_k=1) == {1}
    assert kept([0.0, 1.0], top_k=5) == {0, 1}


@pytest.mark.parametrize("p, expected", [
    (0.1, {0}),          # the top value alone already reaches p
    (0.5, {0}),          # exactly reaching p is enough
    (0.7, {0, 1}),
    (0.75, {0, 1}),      # 0.5 + 0.25 reaches p exactly: not one value more
    (0.76, {0, 1, 2}),
    (0.95, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_nucleus(p, expected):
    assert kept(log_probs(0.5, 0.25, 0.15, 0.10), top_p=p) == expected


def test_top_p_with_ties_keeps_the_lower_indices():
    # 0.4 then three ties at 0.2: the nucleus for p = 0.5 has two values, the tie goes to index 1.
    logits = log_probs(0.2, 0.4, 0.2, 0.2)
    assert kept(logits, top_p=0.5) == {1, 0}
    assert kept(logits, top_p=0.8) == {1, 0, 2}
    assert kept(logits, top_p=1.0) == {0, 1, 2, 3}
    assert kept(torch.zeros(5), top_p=0.3) == {0, 1}
    assert kept(torch.zeros(5), top_p=1e-9) == {0}


def test_top_p_renormalises_after_top_k():
    logits = log_probs(0.5, 0.25, 0.15, 0.10)
    # Alone, 0.5 < 0.6 so the nucleus needs a second value; after top-k = 2 the survivors have
    # 0.5/0.75 = 0.67 and 0.25/0.75, so the top value alone reaches p.
    assert kept(logits, top_p=0.6) == {0, 1}
    assert kept(logits, top_k=2, top_p=0.6) == {0}
    assert kept(logits, top_k=2, top_p=0.7) == {0, 1}
    assert kept(logits, top_k=3, top_p=0.95) == {0, 1, 2}


def test_temperature_applies_before_top_p():
    # At temperature 2 the distribution flattens, so the nucleus for the same p grows.
    logits = log_probs(0.5, 0.25, 0.15, 0.10)
    assert kept(logits, top_p=0.7) == {0, 1}
    assert kept(logits, temperature=2.0, top_p=0.7) == {0, 1, 2}


def test_at_least_one_value_survives_every_filter():
    x = torch.randn(32, 6)
    for kw in [dict(top_k=1, top_p=1e-6), dict(temperature=0.0), dict(temperature=1e-3, top_p=1e-3)]:
        assert (torch.isfinite(filter_logits(x, **kw)).sum(-1) >= 1).all()


def test_temperature_zero_and_limit_equal_greedy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 9) * 3
    greedy = sample_logits(x, greedy=True)
    assert torch.equal(greedy, x.argmax(-1))
    assert torch.equal(sample_logits(x, temperature=0.0, generator=g), greedy)
    assert torch.equal(sample_logits(x, temperature=1e-4, generator=g), greedy)
    assert torch.equal(filter_logits(x, temperature=0.0).argmax(-1), greedy)


def test_removed_values_are_never_drawn():
    g = torch.Generator().manual_seed(1)
    logits = log_probs(0.3, 0.05, 0.25, 0.2, 0.15, 0.05).expand(20000, 6)
    cases = [(dict(top_k=2), {0, 2}), (dict(top_p=0.7), {0, 2, 3}), (dict(top_k=4, top_p=0.9), {0, 2, 3, 4})]
    for kw, allowed in cases:
        draws = sample_logits(logits, generator=g, **kw)
        assert set(draws.unique().tolist()) == allowed, kw


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.7), dict(temperature=0.6, top_k=4),
                                dict(temperature=1.5, top_p=0.9), dict(top_k=5, top_p=0.8)])
def test_draws_follow_the_filtered_softmax(kw):
    g = torch.Generator().manual_seed(2)
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 0.7])
    n = 40000
    draws = sample_logits(logits.expand(n, -1), generator=g, **kw)
    probs = torch.softmax(filter_logits(logits, **kw).double(), -1)
    support = probs > 0
    observed = torch.bincount(draws, minlength=7).double()
    assert observed[~support].sum() == 0
    expected = probs[support] * n
    stat = float(((observed[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    # A correct sampler fails this bound once in 100,000 runs.
    assert stat < chi2.ppf(1 - 1e-5, dof), (stat, dof)


def test_same_seed_same_draws_and_noise():
    x = torch.randn(50, 5)
    for kw in [dict(temperature=1.3, top_p=0.9), dict(greedy=True, noise_std=1.0), dict(noise_std=0.5, top_k=3)]:
        a = sample_logits(x, generator=torch.Generator().manual_seed(7), **kw)
        b = sample_logits(x, generator=torch.Generator().manual_seed(7), **kw)
        assert torch.equal(a, b)


def test_noise_on_logits_perturbs_greedy():
    x = torch.zeros(1, 4).expand(2000, 4) + torch.tensor([0.3, 0.0, 0.0, 0.0])
    assert set(sample_logits(x, greedy=True).tolist()) == {0}
    noisy = sample_logits(x, greedy=True, noise_std=1.0, generator=torch.Generator().manual_seed(0))
    assert set(noisy.tolist()) == {0, 1, 2, 3}
    assert torch.equal(sample_logits(x, greedy=True, noise_std=0.0), x.argmax(-1))


def test_shapes_dtypes_and_binary():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 2)  # two-class logits, as binary families produce
    out = sample_logits(x, generator=g)
    assert out.shape == (2, 3, 4) and out.dtype == torch.long and set(out.unique().tolist()) <= {0, 1}
    assert sample_logits(x.bfloat16(), generator=g, top_p=0.9).shape == (2, 3, 4)
    assert filter_logits(x.double(), top_k=1).dtype == torch.float64
    # Logits already at -inf (masked by a model) stay removed.
    masked = torch.tensor([[0.0, -math.inf, 1.0]]).expand(5000, 3)
    assert 1 not in sample_logits(masked, generator=g, temperature=3.0).tolist()


@pytest.mark.parametrize("kw, word", [
    (dict(top_k=0), "--top-k"), (dict(top_k=2.5), "--top-k"), (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.2), "--top-p"), (dict(temperature=-0.1), "--temperature"),
    (dict(temperature=float("nan")), "--temperature"), (dict(noise_std=-1.0), "--noise-std"),
    (dict(prefix_rows=13, height=12), "--prefix-rows"), (dict(prefix_rows=-1), "--prefix-rows"),
    (dict(noise_on="weights"), "--noise-on"),
])
def test_bad_values_are_refused_in_one_line(kw, word):
    with pytest.raises(GenaiError) as err:
        check_sampling_options(**kw)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_good_values_pass_and_filters_check_too():
    check_sampling_options(temperature=0.0, top_k=1, top_p=1.0, noise_std=0.0, prefix_rows=12, height=12)
    check_sampling_options()
    with pytest.raises(GenaiError):
        filter_logits(torch.zeros(3), top_k=0)
    with pytest.raises(GenaiError):
        sample_logits(torch.zeros(3), top_p=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 65), (16, 65), (3, 5, 7), (4, 2)])
def test_exponential_race_draws_what_multinomial_draws(shape, dtype):
    # draw_categorical replaces torch.multinomial(probs, 1) for speed: same generator stream, same draws.
    probs = torch.softmax(3 * torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(1)), -1)
    probs[..., 0] = 0  # a removed entry (top-k / top-p) is never drawn
    for seed in range(5):
        ours = draw_categorical(probs, torch.Generator().manual_seed(seed))
        ref = torch.multinomial(probs.reshape(-1, shape[-1]), 1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours, ref.reshape(shape[:-1])) and (ours != 0).all()
