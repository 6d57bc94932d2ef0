"""The compiled decoding step for a few texts (genai_cli/nn/fused.py): the same logits and cache rows as the eager
step, the same samples, and the eager step wherever it cannot be built or does not apply."""

from __future__ import annotations

import pytest
import torch

from genai_cli.api import build_model
from genai_cli.nn import fused
from genai_cli.registry import MODELS
from genai_cli.spec import ImageSpec, TokenSpec

SPEC = TokenSpec(vocab=" !,abcdehlorw", block_size=12)


@pytest.fixture
def compiled():
    if fused.library() is None:
        pytest.skip("no working C compiler here: the eager step serves")


def model_of(seed: int = 0, **config):
    torch.manual_seed(seed)
    cls = MODELS.get("transformer")
    model = build_model("transformer", cls.Config(**{"d_model": 24, "heads": 3, "layers": 2, **config}), SPEC)
    for p in model.parameters():  # away from the initialisation's zeros and ones, so every weight matters
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def text(model, fused_on: bool, monkeypatch, n: int = 1, chars: int = 40, seed: int = 3, **options):
    monkeypatch.setenv(fused.ENV_SWITCH, "1" if fused_on else "0")
    return model.sample(n, generator=torch.Generator().manual_seed(seed), prompt="he", max_new_tokens=chars,
                        **options)


@pytest.mark.parametrize("n", [1, 3])
def test_fused_step_gives_the_eager_logits_and_cache_rows(monkeypatch, compiled, n):
    model = model_of()
    tokens = torch.randint(0, len(SPEC.vocab), (n, SPEC.block_size), generator=torch.Generator().manual_seed(1))
    steppers = {}
    for on in (True, False):
        monkeypatch.setenv(fused.ENV_SWITCH, "1" if on else "0")
        steppers[on] = model.incremental(n)
    with torch.inference_mode():
        for pos in range(3, SPEC.block_size):  # a 3-token prefix, then one position at a time
            fast, slow = steppers[True](tokens, pos), steppers[False](tokens, pos)
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        assert steppers[True].fused and steppers[False].fused is False
        for a, b in zip(steppers[True].caches, steppers[False].caches):
            torch.testing.assert_close(a.qkv, b.qkv, rtol=1e-5, atol=1e-5)
            assert a.length == b.length == SPEC.block_size


@pytest.mark.parametrize("n", [1, fused.MAX_BATCH])
def test_texts_are_the_eager_texts_across_window_slides(monkeypatch, compiled, n):
    model = model_of(seed=2)
    for options in ({}, {"temperature": 1.5, "top_k": 5}, {"top_p": 0.8}, {"greedy": True}):
        # 40 characters past a 12-character context: the window slides (eagerly) between fused steps
        fast, slow = text(model, True, monkeypatch, n, **options), text(model, False, monkeypatch, n, **options)
        assert fast.shape == (n, 42) and torch.equal(fast, slow)
    naive = model.sample_naive(n, generator=torch.Generator().manual_seed(3), prompt="he", max_new_tokens=40)
    assert torch.equal(text(model, True, monkeypatch, n), naive)


def test_where_it_does_not_apply_the_eager_step_serves(monkeypatch, tmp_path):
    model = model_of()
    tokens = torch.zeros(1, SPEC.block_size, dtype=torch.long)
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    with torch.inference_mode():
        rows = fused.MAX_BATCH + 1  # past a few rows: Block.step's products over rows
        batch = model.incremental(rows)
        batch(tokens.expand(rows, -1), 2), batch(tokens.expand(rows, -1), 3)
        assert batch.fused is False
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a precision the C step does not compute in
            mixed = model.incremental(1)
            mixed(tokens, 2), mixed(tokens, 3)
        assert mixed.fused is False
    # No compiler: the library is None, the sample the same as the eager one.
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("GENAI_CACHE", str(tmp_path / "cache"))
    fused.library.cache_clear()
    try:
        assert fused.library() is None
        assert fused.fused_step(model, model.incremental(1).caches, 1) is None
        assert torch.equal(text(model, True, monkeypatch), text(model, False, monkeypatch))
    finally:
        fused.library.cache_clear()


def test_the_library_is_built_once_per_cpu_and_then_loaded(monkeypatch, tmp_path, compiled):
    monkeypatch.setenv("GENAI_CACHE", str(tmp_path))
    fused.library.cache_clear()
    try:
        assert fused.library() is not None
        built = list(tmp_path.glob("fused_step-*.so"))
        assert len(built) == 1 and not list(tmp_path.glob("tmp*"))  # the build folder aside is gone
        fused.library.cache_clear()
        monkeypatch.setattr(fused, "_compile", lambda *a: pytest.fail("rebuilt although the library was there"))
        assert fused.library() is not None
        # Another CPU (a home folder shared across machines) gets its own build, never this one.
        monkeypatch.setattr(fused, "_cpu_identity", lambda: "another processor")
        fused.library.cache_clear()
        compiled = []
        monkeypatch.setattr(fused, "_compile", lambda compiler, flags, target: compiled.append(target) or False)
        fused.library()
        assert compiled and compiled[0] != built[0]
    finally:
        fused.library.cache_clear()


def test_stepper_keeps_the_eager_step_for_the_exact_gelu_only(monkeypatch):
    model = model_of()
    model.blocks[0].mlp[1].approximate = "tanh"  # not what the C step computes
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    assert fused.fused_step(model, model.incremental(1).caches, 1) is None


def test_an_image_drawn_alone_is_the_eager_image(monkeypatch, compiled):

    spec = ImageSpec(channels=3, size=4)
    cls = MODELS.get("transformer")
    torch.manual_seed(4)
    model = cls(cls.Config(d_model=16, heads=2, layers=2, levels=4), spec).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    draws = []
    for on in (True, False):
        monkeypatch.setenv(fused.ENV_SWITCH, "1" if on else "0")
        draws.append(model.sample(1, generator=torch.Generator().manual_seed(0), temperature=1.2))
    assert draws[0].shape == (1, 3, 4, 4) and torch.equal(*draws)
