"""Text as a second modality: the vocabulary, the datasets, causality over characters, learning a string, prompts,
the masked model's blanks, and what image runs and text runs refuse."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import invoke

from genai_cli.api import build_model, load_checkpoint
from genai_cli.config import DataConfig
from genai_cli.data import load_data
from genai_cli.errors import GenaiError
from genai_cli.generate import SampleRequest, Sweep, draw
from genai_cli.registry import MODELS
from genai_cli.spec import TokenSpec, spec_from_dict, spec_to_dict

TEXT_FAMILIES = [n for n in MODELS.names() if "tokens" in MODELS.get(n).modalities]
AR_TEXT = [n for n in TEXT_FAMILIES if n != "masked"]
SPEC = TokenSpec(vocab=" !,abcdehlorw", block_size=12)
PHRASE = "hello world, "


def text_model(family: str, spec: TokenSpec = SPEC, **overrides):
    cls = MODELS.get(family)
    tiny = {k: v for k, v in cls.tiny.items() if k != "levels"}  # a text model's tokens are its characters
    return build_model(family, cls.Config(**{**tiny, **overrides}), spec)


def write_text(tmp_path, text: str, block: int = 12, **train) -> dict:
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return {"data": {"name": "text_file", "path": str(path), "block_size": block},
            "train": {"batch_size": 16, "log_every": 50, "eval_every": 1000, "checkpoint_every": 1000,
                      "sample_every": 1000, "sample_n": 1, "warmup_steps": 10, "eval_max_images": 16,
                      "precision": "fp32", "ema_decay": None, **train},
            "sample": {"n": 2, "max_new_tokens": 20}}


def test_vocabulary_round_trips_and_is_stored_with_the_spec():
    text = "To be, or not to be: that is the question."
    assert SPEC.decode(SPEC.encode("hello, world!")) == "hello, world!"
    spec = TokenSpec(vocab="".join(sorted(set(text))), block_size=8)
    assert spec.decode(spec.encode(text)) == text
    assert spec_from_dict(spec_to_dict(spec)) == spec
    with pytest.raises(GenaiError, match="character 'z' .* not in this model's vocabulary"):
        SPEC.encode("hello z")


def test_text_file_split_is_contiguous_blocks_without_overlap(tmp_path):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(5000))
    (tmp_path / "t.txt").write_text(text)
    data = load_data(DataConfig(name="text_file", path=str(tmp_path / "t.txt"), block_size=16, val_fraction=0.1))
    assert data.spec.vocab == "abcdefghijklmnopqrstuvwxyz" and data.train_x.shape[1] == 16
    decoded = [data.spec.decode(row) for row in data.val_x.tolist()]
    assert all(chunk in text for chunk in decoded)  # contiguous characters of the corpus
    train = {data.spec.decode(row) for row in data.train_x.tolist()}
    assert not train & set(decoded) or len(set(text[i:i + 16] for i in range(0, 5000))) < 5000  # periodic text
    again = load_data(DataConfig(name="text_file", path=str(tmp_path / "t.txt"), block_size=16, val_fraction=0.1))
    assert torch.equal(again.val_x, data.val_x)  # seeded by data.split_seed


def test_offline_default_and_download_errors(tmp_path):
    docs = load_data(DataConfig(name="python_docs", block_size=32))
    assert docs.spec.vocab_size > 50 and docs.train_x.shape[0] > 1000
    with pytest.raises(GenaiError, match="tiny_shakespeare.*python_docs"):
        load_data(DataConfig(name="tiny_shakespeare", root=str(tmp_path), download=False))
    with pytest.raises(GenaiError, match="needs data.path"):
        load_data(DataConfig(name="text_file"))


@pytest.mark.parametrize("family", AR_TEXT)
def test_causality_over_characters(family):
    torch.manual_seed(0)
    model = text_model(family).eval()
    tokens = torch.randint(0, SPEC.vocab_size, (2, SPEC.block_size))
    base = model.seq_logits(tokens)
    for j in (0, 5, SPEC.block_size - 1):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % SPEC.vocab_size
        out = model.seq_logits(changed)
        assert torch.allclose(out[:, :j + 1], base[:, :j + 1], atol=1e-6)  # position t reads tokens < t only
        if j + 1 < SPEC.block_size:
            assert not torch.allclose(out[:, j + 1], base[:, j + 1])


@pytest.mark.parametrize("family", AR_TEXT)
def test_cache_matches_the_naive_sampler_past_the_context(family):
    model = text_model(family).eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    # 30 characters after a 4-character prompt: the transformer's 12-character window slides twice.
    cached = model.sample(3, generator=g(), prompt="hell", max_new_tokens=30)
    naive = model.sample_naive(3, generator=g(), prompt="hell", max_new_tokens=30)
    assert cached.shape == (3, 34) and torch.equal(cached, naive)
    assert SPEC.decode(cached[0, :4].tolist()) == "hell"


@pytest.mark.parametrize("family", AR_TEXT)
def test_learns_a_repeated_string_and_writes_it_greedily(tmp_path, family):
    raw = write_text(tmp_path, PHRASE * 60, max_steps=250, lr=1e-2)
    cls = MODELS.get(family)
    raw["model"] = {"family": family, **{k: v for k, v in cls.tiny.items() if k != "levels"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    invoke("train", tmp_path / "c.yaml", "--runs-dir", tmp_path / "runs", "--name", "r", "-q")
    r = invoke("sample", tmp_path / "runs" / "r", "--prompt", "hello", "--greedy", "--max-new-tokens", "26",
               "-n", "1", "--out", tmp_path / "o.txt")
    written = (tmp_path / "o.txt").read_text()
    assert written.startswith("hello world, hello world, hello"), written
    assert "hello world, hello" in r.stdout  # printed too


def test_masked_model_fills_blanks_and_keeps_the_rest():
    model = text_model("masked").eval()
    prompt = "he__o w_rld"  # 11 characters: within the 12-character block
    out = model.sample(3, generator=torch.Generator().manual_seed(0), prompt=prompt)
    for row in out.tolist():
        text = SPEC.decode(row)
        assert len(text) == len(prompt)
        assert all(a == b for a, b in zip(text, prompt) if b != "_")
    with pytest.raises(GenaiError, match="nothing to fill"):
        model.sample(1, prompt="hello")
    out = model.sample(1, prompt="he##o", blank="#", fill="one-shot")
    assert SPEC.decode(out[0].tolist()).startswith("he") and SPEC.decode(out[0].tolist()).endswith("o")


def test_unknown_prompt_character_is_one_line(tmp_path):
    raw = write_text(tmp_path, PHRASE * 20, max_steps=2)
    raw["model"] = {"family": "transformer", "d_model": 16, "heads": 2, "layers": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    done = invoke("train", tmp_path / "c.yaml", "--runs-dir", tmp_path / "runs", "--name", "t").stdout
    assert " tokens/s" in done and "images_per_sec" not in done and "img/s" not in done  # the end says characters
    r = invoke("sample", tmp_path / "runs" / "t", "--prompt", "hello Z", ok=False)
    assert r.exit_code == 2 and "character 'Z'" in r.output and len(r.output.strip().splitlines()) == 1
    r = invoke("sample", tmp_path / "runs" / "t", "--prefix-rows", "2", ok=False)
    assert r.exit_code == 2 and "--prefix-rows works on images; this run models text" in r.output
    r = invoke("sample", tmp_path / "runs" / "t", "--out", tmp_path / "x.png", ok=False)
    assert "--out must end in .txt" in r.output
    # A sweep continues the same prompt once per setting, one labelled block each.
    invoke("sample", tmp_path / "runs" / "t", "--prompt", "he", "--sweep", "temperature=0.5,1", "-n", "2",
           "--out", tmp_path / "sweep.txt", "-q")
    sweep = (tmp_path / "sweep.txt").read_text()
    assert "=== temperature=0.5 ===" in sweep and "=== temperature=1.0 ===" in sweep
    ev = invoke("evaluate", tmp_path / "runs" / "t", "-n", "6", "--runs-dir", tmp_path / "runs", "--json")
    assert '"bits_per_char"' in ev.stdout and '"distinct_4grams"' in ev.stdout
    insp = invoke("inspect", tmp_path / "runs" / "t")
    assert "vocabulary" in insp.stdout and "a sample" in insp.stdout
    assert " tokens/s" in insp.stdout and "img/s" not in insp.stdout  # a text run's rate is in characters


def test_training_rates_are_told_in_the_units_of_the_data():
    from genai_cli.spec import ImageSpec, TokenSpec

    assert ImageSpec(1, 28, 10).describe_rate(401.4) == "401 img/s"
    assert TokenSpec(vocab="ab", block_size=64).describe_rate(300.0) == "19,200 tokens/s"  # 300 blocks of 64


def test_image_run_refuses_prompts():
    from helpers import tiny_model

    model = tiny_model("transformer")
    with pytest.raises(GenaiError, match="--prompt is for text runs"):
        draw(model, SampleRequest(options={"prompt": "hi"}, n=1))
    with pytest.raises(GenaiError, match="--max-new-tokens is for text runs"):
        draw(model, SampleRequest(Sweep.of(temperature=[1.0]), options={"max_new_tokens": 3}, n=1))


def test_text_checkpoint_samples_the_same_after_loading(tmp_path):
    from genai_cli.runs import save_checkpoint

    cfg = MODELS.get("transformer").Config(d_model=16, heads=2, layers=1)
    model = build_model("transformer", cfg, SPEC).eval()
    from dataclasses import asdict

    state = {"family": "transformer", "config": {"model": {"family": "transformer", **asdict(cfg)}},
             "spec": spec_to_dict(SPEC), "model": model.state_dict(), "ema": None, "parents": {}}
    save_checkpoint(state, tmp_path / "last.pt")
    clone = load_checkpoint(tmp_path / "last.pt")
    assert clone.spec == SPEC
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a, b = (m.sample(2, generator=g(), max_new_tokens=5) for m in (model, clone))
    assert torch.equal(a, b)


def test_image_families_refuse_text():
    with pytest.raises(GenaiError, match="family 'pixelcnn' models image.*families for it: .*transformer"):
        build_model("pixelcnn", MODELS.get("pixelcnn").Config(), SPEC)


def test_transformer_one_token_step_equals_the_module_forward_and_restarts_clean():
    # Block.step (decoding's path) against Block.forward over the whole window; restart() reuses the cache buffers
    # for a new window and must forget the old one.
    model = text_model("transformer", d_model=32, heads=4, layers=2).eval()
    tokens = torch.randint(0, len(SPEC.vocab), (2, SPEC.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.seq_logits(tokens)  # (2, T, K)
        step = model.incremental(2)
        for _ in range(2):
            buffers = [c.qkv for c in step.caches]
            for pos in range(SPEC.block_size):
                torch.testing.assert_close(step(tokens, pos), full[:, pos], rtol=1e-4, atol=1e-5)
            step = step.restart()
            assert all(c.qkv is b for c, b in zip(step.caches, buffers))
