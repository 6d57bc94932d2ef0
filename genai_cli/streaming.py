"""Data larger than memory: images decoded when they are drawn (a large folder, or tar shards in the webdataset
layout) and text read as token ids from a memory-mapped file.

Every source here is map-style: ``source[idx]`` gives the uint8 images (or long token ids) that an in-memory
DataBundle would hold at ``idx``, decoded the same way. So the training order stays the epoch order of
(seed, epoch), a resumed run draws exactly what an uninterrupted one drew, and the readers outside the loop
(validation, ``genai evaluate``, ``inspect``) slice a source as they slice a tensor. What streams in the loop
(DataLoader workers decoding batches ahead of the step) is in ``data.DataBundle.epoch_batches``.

- ``ImageSource``: image files, or members of tar shards (``ShardMember``: a shard, an offset, a size); decoded
  with Pillow, centre-cropped and resized, exactly as ``image_folder`` loads a small folder.
- ``shard_index``: the members of tar shards named by a brace pattern (``shards-{000..099}.tar``, expanded by the
  webdataset package), grouped into samples by webdataset's key rule (``000123.png`` + ``000123.cls``). Only the
  tar headers and the small label members are read.
- ``token_cache`` / ``TokenWindows``: a text tokenised once into ``<file>.tokens`` beside it (as nanoGPT's
  train.bin), rewritten when the text's size or modification time changes; windows are read from the map.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import GenaiError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LABEL_SUFFIXES = ("cls", "label", "class")  # the webdataset conventions for an integer class label
TEXT_CHUNK = 1 << 24  # characters read at a time while tokenising a large text (16 M)
TOKENS_FORMAT = 1  # bump when the layout of <file>.tokens changes: older caches are rebuilt


@dataclass(frozen=True)
class ShardMember:
    """One image inside a tar shard: read by seeking to its bytes (local shards only)."""

    shard: str
    offset: int  # where the member's data starts in the tar file
    size: int
    name: str  # the member's name in the tar, for messages

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


def decode_image(item: Path | ShardMember, size: int, channels: int) -> Tensor:
    """One image file (or shard member) -> uint8 (C, size, size): converted to grey (channels 1) or RGB, centre-cropped
    to a square, resized with bicubic filtering. A file that does not decode raises one line naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(item.read()) if isinstance(item, ShardMember) else item) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    # Pillow reports a broken file as any of these (SyntaxError: "broken PNG file"; ValueError: bad tile data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise GenaiError(f"image '{item}' cannot be read ({e}); remove it or fix it") from None
    return torch.from_numpy(arr.copy()).reshape(size, size, -1).permute(2, 0, 1)


def image_seed(key: int, position: int) -> int:
    """The seed of one image's fixed draw: (key, position) hashed into the 32 bits torch's CPU generator keeps."""
    return int.from_bytes(hashlib.blake2b(f"{key}:{position}".encode(), digest_size=4).digest(), "little")


def positions(idx, n: int) -> list[int]:
    """An index (int, slice, list or tensor) into n items as a list of positions."""
    if isinstance(idx, slice):
        return list(range(n)[idx])
    return torch.as_tensor(idx, dtype=torch.long).reshape(-1).tolist()


class ImageSource:
    """Images decoded when read: ``source[idx]`` -> uint8 (B, C, H, W) (an int index: (C, H, W)).

    ``binarize``: None (grey levels), "threshold" (at 128, as the in-memory path does) or "fixed": one stochastic
    binarisation per image, seeded by ``draw_seed`` and its position (what outside readers see of a
    ``data.binarize: stochastic`` set; the loop draws its own from the grey levels)."""

    def __init__(self, items: Sequence[Path | ShardMember], size: int, channels: int, binarize: str | None = None,
                 draw_seed: int = 0):
        self.items = list(items)
        self.size, self.channels = size, channels
        self.binarize, self.draw_seed = binarize, draw_seed

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.items), self.channels, self.size, self.size))

    def __getitem__(self, idx) -> Tensor:
        if isinstance(idx, int):
            return self[[idx]][0]
        where = positions(idx, len(self.items))
        if not where:
            return torch.empty((0, self.channels, self.size, self.size), dtype=torch.uint8)
        x = torch.stack([decode_image(self.items[i], self.size, self.channels) for i in where])
        if self.binarize == "threshold":
            x = (x >= 128).to(torch.uint8) * 255
        elif self.binarize == "fixed":
            draws = (torch.Generator().manual_seed(image_seed(self.draw_seed, i)) for i in where)
            u = torch.stack([torch.rand(x.shape[1:], generator=g) for g in draws])
            x = (u < x.float() / 255).to(torch.uint8) * 255
        return x

    def subset(self, idx) -> ImageSource:
        return ImageSource([self.items[i] for i in positions(idx, len(self.items))], self.size, self.channels,
                           self.binarize, self.draw_seed)

    def with_binarize(self, binarize: str | None, draw_seed: int = 0) -> ImageSource:
        return ImageSource(self.items, self.size, self.channels, binarize, draw_seed)

    def shards(self) -> list[str] | None:
        """The shard of each item, or None for files of a folder."""
        if self.items and isinstance(self.items[0], ShardMember):
            return [m.shard for m in self.items]
        return None

    def check_headers(self) -> None:
        """Open every image far enough to read its header (Pillow reads no pixels): a file that is not an image
        fails here, before the first step, not when the loop first draws it."""
        from PIL import Image, UnidentifiedImageError

        for item in self.items:
            if isinstance(item, ShardMember):
                continue  # read at the first draw: a header check would read every shard once more
            try:
                with Image.open(item):
                    pass
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise GenaiError(f"image '{item}' cannot be read ({e}); remove it or fix it") from None


# -- tar shards (the webdataset layout) ----------------------------------------------------------
def expand_shards(pattern: str) -> list[str]:
    """A brace pattern (``data/shards-{000..099}.tar``; several joined by ``::``) -> the shard paths, as webdataset
    expands them. Every shard must exist."""
    from webdataset.shardlists import expand_urls

    paths = expand_urls(pattern)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise GenaiError(f"data.path '{pattern}': no shard {missing[0]}{more}; check the pattern (e.g. "
                         f"shards-{{000..099}}.tar) and that the files are local")
    return paths


def shard_index(pattern: str) -> tuple[list[ShardMember], list[int]]:
    """(the image of every sample, its label or -1) over the shards ``pattern`` names, in shard order. A sample is
    the tar members sharing a key (webdataset's rule: the name up to the first dot of its last component); its
    image is the first member with an image suffix, its label the integer in a .cls/.label/.class member."""
    from webdataset.tariterators import base_plus_ext

    images: list[ShardMember] = []
    labels: list[int] = []
    for shard in expand_shards(pattern):
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard, "r:") as tar:  # "r:": plain tar, whose members can be read by seeking
                for member in tar:
                    if not member.isfile():
                        continue
                    key, suffix = base_plus_ext(member.name)
                    if key is None:
                        continue
                    sample = samples.setdefault(key, {})
                    suffix = suffix.lower()
                    if "image" not in sample and Path("x." + suffix).suffix in IMAGE_SUFFIXES:
                        sample["image"] = ShardMember(shard, member.offset_data, member.size, member.name)
                    elif suffix in LABEL_SUFFIXES:
                        sample["label"] = tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise GenaiError(f"shard '{shard}' is not a readable tar archive ({e}); rebuild it or leave it out of "
                             f"data.path") from None
        except OSError as e:
            raise GenaiError(f"shard '{shard}' cannot be read: {e.strerror or e}") from None
        for key, sample in samples.items():
            if "image" not in sample:
                continue
            images.append(sample["image"])
            raw = sample.get("label")
            try:
                labels.append(int(raw.decode().strip()) if raw is not None else -1)
            except ValueError:
                raise GenaiError(f"shard '{shard}': the label of sample '{key}' is {raw[:20]!r}, not an integer "
                                 f"class index") from None
    if not images:
        raise GenaiError(f"data.path '{pattern}': the shards hold no images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))} members)")
    return images, labels


# -- text as token ids in a memory map -----------------------------------------------------------
def _text_chunks(path: Path):
    """The text of ``path`` TEXT_CHUNK characters at a time, read as ``Path.read_text`` reads it (UTF-8, universal
    newlines), so the ids equal those of the in-memory path."""
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(TEXT_CHUNK):
                yield chunk
    except FileNotFoundError:
        raise GenaiError(f"dataset 'text_file': no file {path}; check data.path") from None
    except UnicodeDecodeError as e:
        raise GenaiError(f"dataset 'text_file': {path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None
    except OSError as e:
        raise GenaiError(f"dataset 'text_file': cannot read {path}: {e.strerror or e}") from None


def token_cache(path: Path) -> tuple[np.ndarray, str]:
    """(token ids as a read-only memory map, the vocabulary) of a UTF-8 text. The ids live in ``<file>.tokens``
    beside the text, with ``<file>.tokens.json`` saying which text (its size and modification time) they are
    of; a text that changed is tokenised again. Two passes over the text, a chunk at a time: the vocabulary
    (every character, sorted, as the in-memory path has it), then the ids; the text is never whole in memory."""
    bin_path, meta_path = path.with_name(path.name + ".tokens"), path.with_name(path.name + ".tokens.json")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise GenaiError(f"dataset 'text_file': no file {path}; check data.path") from None
    stamp = {"format": TOKENS_FORMAT, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("text") == stamp:
            dtype = np.dtype(meta["dtype"])
            if bin_path.stat().st_size == meta["length"] * dtype.itemsize:
                return _open_map(bin_path, dtype, meta["length"]), meta["vocab"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass  # no cache, or not one of this text: (re)build it
    chars: set[str] = set()
    for chunk in _text_chunks(path):
        chars.update(chunk)
    vocab = "".join(sorted(chars))
    codes = np.array([ord(c) for c in vocab], dtype=np.uint32)  # sorted, so searchsorted maps a code to its id
    dtype = np.dtype(np.uint16 if len(vocab) <= 1 << 16 else np.uint32)
    tmp = bin_path.with_name(f".{bin_path.name}.tmp-{os.getpid()}")
    length = 0
    try:
        with open(tmp, "wb") as out:
            for chunk in _text_chunks(path):
                ids = np.searchsorted(codes, np.frombuffer(chunk.encode("utf-32-le"), dtype="<u4"))
                out.write(ids.astype(dtype).tobytes())
                length += len(chunk)
        os.replace(tmp, bin_path)
        meta = {"text": stamp, "dtype": dtype.name, "length": length, "vocab": vocab}
        meta_tmp = meta_path.with_name(f".{meta_path.name}.tmp-{os.getpid()}")
        meta_tmp.write_text(json.dumps(meta))
        os.replace(meta_tmp, meta_path)  # written last: a cut tokenisation leaves no stamp that claims it finished
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GenaiError(f"dataset 'text_file': cannot write the token ids beside the text ({bin_path}): "
                         f"{e.strerror or e}; copy the text to a writable folder") from None
    return _open_map(bin_path, dtype, length), vocab


def _open_map(path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    if length == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


class TokenWindows:
    """Training (or validation) sequences of a text, read from its token ids: window ``j`` is
    ``ids[start_j : start_j + block_size]``, where the windows of each block of the split start every ``stride``
    characters (``Tensor.unfold`` of the in-memory path, without materialising it). ``source[idx]`` -> long (B, T)."""

    def __init__(self, ids: np.ndarray, blocks: list[int], block_chars: int, block_size: int, stride: int,
                 limit: int | None = None):
        self.ids, self.blocks, self.block_chars = ids, np.asarray(blocks, dtype=np.int64), block_chars
        self.block_size, self.stride = block_size, stride
        self.per_block = (block_chars - block_size) // stride + 1
        n = len(blocks) * self.per_block
        self.n = n if limit is None else min(n, limit)

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.block_size))

    def __getitem__(self, idx) -> Tensor:
        if isinstance(idx, int):
            return self[[idx]][0]
        j = np.asarray(positions(idx, self.n), dtype=np.int64)
        starts = self.blocks[j // self.per_block] * self.block_chars + (j % self.per_block) * self.stride  # (B,)
        return torch.from_numpy(self.ids[starts[:, None] + np.arange(self.block_size)].astype(np.int64))
