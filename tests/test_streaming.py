"""Data larger than memory (genai_cli/streaming.py): a streamed image folder gives the images, the order and the
resumed run of the in-memory one; webdataset shards split across processes by shard, disjoint and complete; a text
read from its memory-mapped token ids equals the in-memory tokenisation; bad data fails in one line."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import checksum, tiny_config, train_losses
from PIL import Image
from typer.testing import CliRunner

from genai_cli import streaming
from genai_cli.cli import app
from genai_cli.config import DataConfig
from genai_cli.data import load_data
from genai_cli.errors import GenaiError

runner = CliRunner()


def png(seed: int, size=(12, 10)) -> bytes:
    """A small random RGB image (not square: the centre crop is exercised) as PNG bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 images in two class folders."""
    root = tmp_path_factory.mktemp("images")
    for i in range(24):
        (root / ("cats" if i % 2 else "dogs")).mkdir(exist_ok=True)
        (root / ("cats" if i % 2 else "dogs") / f"{i:03d}.png").write_bytes(png(i))
    return root


def write_shard(path: Path, samples: list[tuple[str, bytes, int | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, label in samples:
            members = [(f"{key}.png", image)] + ([(f"{key}.cls", str(label).encode())] if label is not None else [])
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three shards of 10, 10 and 8 labelled samples (labels 0..3)."""
    root = tmp_path_factory.mktemp("shards")
    counts, n = (10, 10, 8), 0
    for s, count in enumerate(counts):
        write_shard(root / f"part-{s:03d}.tar", [(f"{n + i:05d}", png(100 + n + i), (n + i) % 4) for i in range(count)])
        n += count
    return root


# -- image folders ------------------------------------------------------------------------------
def test_a_streamed_folder_holds_the_images_labels_split_and_batches_of_the_in_memory_one(folder):
    kept = load_data(DataConfig(name="image_folder", path=str(folder), image_size=8, stream=False))
    streamed = load_data(DataConfig(name="image_folder", path=str(folder), image_size=8, stream=True, workers=1))
    assert not kept.streamed and streamed.streamed
    assert streamed.spec == kept.spec and len(streamed) == len(kept) == 22
    assert torch.equal(streamed.train_x[:], kept.train_x) and torch.equal(streamed.val_x[:], kept.val_x)
    assert torch.equal(streamed.train_y, kept.train_y) and torch.equal(streamed.val_y, kept.val_y)
    for epoch, start in ((0, 0), (1, 1)):  # decoded by a DataLoader worker, from any batch of any epoch
        a = list(kept.epoch_batches(seed=3, epoch=epoch, start=start, batch_size=8))
        b = list(streamed.epoch_batches(seed=3, epoch=epoch, start=start, batch_size=8))
        assert len(a) == len(b) == 2 - start
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_streamed_folder_binarised_afresh_draws_from_the_in_memory_grey_levels(folder):
    from genai_cli.data import binarize_share

    cfg = dict(name="image_folder", path=str(folder), image_size=8, channels=1, binarize="stochastic", workers=0)
    kept, streamed = load_data(DataConfig(**cfg, stream=False)), load_data(DataConfig(**cfg, stream=True))
    (a, _), (b, _) = (next(d.epoch_batches(seed=1, epoch=0, start=0, batch_size=8)) for d in (kept, streamed))
    assert torch.equal(a, b), "the loop draws from the same grey levels"
    assert torch.equal(binarize_share(a, 7, 8, 0), binarize_share(b, 7, 8, 0))
    fixed = streamed.val_x[:]  # outside readers: one seeded draw per image, the same at every load
    assert set(fixed.unique().tolist()) <= {0, 255}
    assert torch.equal(fixed, load_data(DataConfig(**cfg, stream=True)).val_x[:])


def test_auto_streams_a_folder_above_the_memory_budget(folder):
    small = load_data(DataConfig(name="image_folder", path=str(folder), image_size=8))
    large = load_data(DataConfig(name="image_folder", path=str(folder), image_size=128, memory_budget_mb=1))
    assert not small.streamed and large.streamed  # 24 x 3 x 128 x 128 bytes = 1.1 MiB, over 1 MiB
    assert large.train_x.shape == (22, 3, 128, 128)


def test_a_streamed_run_resumed_equals_the_uninterrupted_one(folder, tmp_path, monkeypatch):
    """Stopped at step 3 and resumed, a streamed run crosses two epoch boundaries exactly as one never stopped (its
    batches are those of the in-memory folder: the test above)."""
    from genai_cli.train import Trainer

    raw = tiny_config("ddpm", max_steps=5, log_every=1, eval_every=100, checkpoint_every=100, sample_every=100)
    raw["data"] = {"name": "image_folder", "path": str(folder), "image_size": 8, "stream": True, "workers": 1}
    config = tmp_path / "streamed.yaml"
    config.write_text(yaml.safe_dump(raw))

    runs = tmp_path / "runs"

    def train(*args) -> int:
        return runner.invoke(app, ["train", *map(str, args), "--runs-dir", str(runs), "-q"]).exit_code

    assert train(config, "--name", "straight") == 0
    original = Trainer.after_step

    def stop_at_3(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "after_step", stop_at_3)
    assert train(config, "--name", "cut") == 130
    monkeypatch.undo()
    assert train("--resume", runs / "cut") == 0

    straight, cut = train_losses(runs / "straight"), train_losses(runs / "cut")
    assert len(straight) == 5 and straight == cut
    a, b = (torch.load(runs / r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in ("straight", "cut"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- webdataset shards --------------------------------------------------------------------------
def test_shards_are_read_by_brace_pattern_with_their_labels(shards):
    data = load_data(DataConfig(name="webdataset", path=str(shards / "part-{000..002}.tar"), image_size=8))
    assert data.streamed and data.spec.num_classes == 4 and data.spec.channels == 3
    assert len(data) + data.val_x.shape[0] == 28
    first = data.train_x.items[0]
    key = int(Path(first.name).stem)
    assert data.train_y[0] == key % 4  # the .cls member beside the image
    expected = streaming.decode_image(io.BytesIO(png(100 + key)), 8, 3)
    assert torch.equal(data.train_x[0], expected)


def test_shards_split_across_ranks_disjoint_and_complete(shards):
    data = load_data(DataConfig(name="webdataset", path=str(shards / "part-{000..002}.tar"), image_size=8,
                                workers=0))
    shard_of = [m.shard for m in data.train_x.items]
    mine = [data.rank_positions(r, 2) for r in range(2)]
    assert sorted(torch.cat(mine).tolist()) == list(range(len(data))), "every training sample, once"
    assert not {shard_of[i] for i in mine[0].tolist()} & {shard_of[i] for i in mine[1].tolist()}, "by shard"
    steps = data.steps_per_epoch(4, world=2)
    assert steps == min(len(m) for m in mine) // 2
    for r in range(2):  # each rank's batches come from its own shards, in a (seed, epoch) order, resumable
        seen = [x for x, _ in data.epoch_batches(seed=0, epoch=0, start=0, batch_size=4, rank=r, world=2)]
        again = [x for x, _ in data.epoch_batches(seed=0, epoch=0, start=1, batch_size=4, rank=r, world=2)]
        assert len(seen) == steps and all(x.shape == (2, 3, 8, 8) for x in seen)
        assert all(torch.equal(a, b) for a, b in zip(seen[1:], again))
        own = data.train_x[mine[r]]
        assert all(any(torch.equal(image, o) for o in own) for x in seen for image in x)
    with pytest.raises(GenaiError, match="3 shard\\(s\\) cannot be split across 4 processes"):
        data.steps_per_epoch(4, world=4)


# -- text ---------------------------------------------------------------------------------------
def test_memory_mapped_text_equals_the_in_memory_tokenisation(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "TEXT_CHUNK", 97)  # many chunks: the vocabulary and ids are built a chunk at a time
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "über", "naïve", "日本", "on\r\n", "mat.\n", "x\ry"]
    path = tmp_path / "book.txt"
    path.write_bytes(" ".join(rng.choice(words, 1500)).encode())
    cfg = dict(name="text_file", path=str(path), block_size=16)
    kept, mapped = load_data(DataConfig(**cfg, stream=False)), load_data(DataConfig(**cfg, stream=True))
    assert isinstance(mapped.train_x, streaming.TokenWindows) and (tmp_path / "book.txt.tokens").is_file()
    assert mapped.spec == kept.spec and len(mapped) == len(kept)
    assert torch.equal(mapped.train_x[:], kept.train_x) and torch.equal(mapped.val_x[:], kept.val_x)
    idx = torch.tensor([5, 0, len(kept) - 1])
    assert torch.equal(mapped.train_x[idx], kept.train_x[idx])
    limited = load_data(DataConfig(**cfg, stream=True, limit=7))
    assert torch.equal(limited.train_x[:], kept.train_x[:7])


def test_the_token_cache_is_reused_and_rebuilt_when_the_text_changes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcab" * 100)
    ids, vocab = streaming.token_cache(path)
    assert vocab == "abc" and ids[:5].tolist() == [0, 1, 2, 0, 1]
    stamp = (tmp_path / "t.txt.tokens").stat().st_mtime_ns
    streaming.token_cache(path)
    assert (tmp_path / "t.txt.tokens").stat().st_mtime_ns == stamp, "unchanged text: the cache is read, not rebuilt"
    path.write_text("xyzzy" * 101)
    ids, vocab = streaming.token_cache(path)
    assert vocab == "xyz" and len(ids) == 505 and ids[:3].tolist() == [0, 1, 2]


# -- bad input ----------------------------------------------------------------------------------
def bad_inputs(root: Path) -> dict[str, tuple[dict, str]]:
    """name -> (the data: section, a fragment of its one line)."""
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    for i in range(12):
        (root / "broken" / f"{i:02d}.png").write_bytes(png(i))
    (root / "broken" / "05.png").write_bytes(b"these bytes are not a picture")
    (root / "cut").mkdir()
    for i in range(12):
        whole = png(i, size=(64, 64))
        (root / "cut" / f"{i:02d}.png").write_bytes(whole[:len(whole) // 3])  # the header reads, the pixels do not
    (root / "shards").mkdir()
    write_shard(root / "shards" / "a-0.tar", [(f"{i}", png(i), 0) for i in range(6)])
    (root / "shards" / "a-1.tar").write_bytes(b"plain text, not a tar archive" * 40)
    write_shard(root / "shards" / "b-0.tar", [(f"{i}", b"not an image", 1) for i in range(8)])
    text = root / "latin1.txt"
    text.write_bytes("caf\xe9 ".encode("latin-1") * 200)
    return {
        "empty folder": ({"name": "image_folder", "path": str(root / "empty")}, "holds no images"),
        "not an image, in memory": ({"name": "image_folder", "path": str(root / "broken")}, "05.png' cannot be read"),
        "not an image, streamed": ({"name": "image_folder", "path": str(root / "broken"), "stream": True},
                                   "05.png' cannot be read"),
        "pixels cut, streamed": ({"name": "image_folder", "path": str(root / "cut"), "stream": True, "workers": 1},
                                 ".png' cannot be read (image file is truncated"),
        "shard not a tar": ({"name": "webdataset", "path": str(root / "shards" / "a-{0..1}.tar")},
                            "a-1.tar' is not a readable tar archive"),
        "shard missing": ({"name": "webdataset", "path": str(root / "shards" / "a-{0..2}.tar")}, "no shard"),
        "image in a shard": ({"name": "webdataset", "path": str(root / "shards" / "b-0.tar"), "workers": 0},
                             ".png' cannot be read (cannot identify image file"),
        "large text not utf-8": ({"name": "text_file", "path": str(text), "stream": True, "block_size": 8},
                                 "is not UTF-8 text"),
    }


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-data")
    return root, bad_inputs(root)


@pytest.mark.parametrize("case", ["empty folder", "not an image, in memory", "not an image, streamed",
                                  "pixels cut, streamed", "shard not a tar", "shard missing", "image in a shard",
                                  "large text not utf-8"])
def test_bad_data_gives_one_line_and_loses_nothing(bad, case):
    root, cases = bad
    data, needle = cases[case]
    family = "transformer" if data["name"] == "text_file" else "ddpm"
    raw = tiny_config(family, max_steps=2, batch_size=4, eval_every=100, sample_every=100, checkpoint_every=100)
    raw["data"] = {**data, "image_size": 8} if family == "ddpm" else data
    config = root / f"{case}.yaml"
    config.write_text(yaml.safe_dump(raw))
    before = {p: checksum(p) for p in root.iterdir() if p.is_dir() and p.name != "runs"}
    result = runner.invoke(app, ["train", str(config), "--runs-dir", str(root / "runs"), "-q"])
    assert result.exit_code not in (0, 130, None), (result.stdout, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert {p: checksum(p) for p in before} == before, "the data is left as it was"
    assert not any(root.rglob("*.tokens")), "no token cache of a text that does not decode"
