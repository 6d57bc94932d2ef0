"""The data contract: what one example looks like, shared by datasets, families and checkpoints.

Datasets produce a spec (``data.py``), a family is built for one (``models/``), a checkpoint stores it
(``asdict``) so a model can be rebuilt without its data, and a run that builds on another checks that
their specs agree (``lineage.py``). This module imports no family, so ``data.py`` and ``nn/`` depend on
it rather than on ``models/``.

Two kinds: ``ImageSpec`` (channels, size, classes, binary) and ``TokenSpec`` (a character vocabulary and a
block size: text). ``spec_to_dict`` stores the kind beside the fields and ``spec_from_dict`` tells the two
apart (checkpoints written before text arrived carry no ``kind`` and are images). Families say which kinds
they model (``GenerativeModel.modalities``); the loop and the CLI ask the spec, never the word "text".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from .errors import GenaiError


@dataclass(frozen=True)
class ImageSpec:
    """What the data looks like: every family is built for one image shape."""

    kind: ClassVar[str] = "image"
    sample_suffix: ClassVar[str] = ".png"  # what genai sample writes by default: a grid
    out_suffixes: ClassVar[tuple[str, ...]] = (".png", ".npz")  # what --out may end in
    out_hint: ClassVar[str] = "--out must end in .png (a grid) or .npz (raw images)"
    takes_prompts: ClassVar[bool] = False  # --prompt, --max-new-tokens, --blank
    real_data_modes: ClassVar[bool] = True  # completion, inpainting and walks between real samples
    sample_quality: ClassVar[str] = "images"  # how genai evaluate scores samples (evaluation/run.py)

    channels: int = 1
    size: int = 28  # square images, size x size
    num_classes: int = 0  # 0: the dataset has no labels
    binary: bool = False  # pixel values are exactly 0 or 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    @property
    def dims(self) -> int:
        return self.channels * self.size * self.size

    def describe(self) -> str:
        """'1x28x28', as error messages name a shape."""
        return "x".join(str(d) for d in self.shape)

    def describe_data(self) -> str:
        """What ``genai train`` and ``inspect`` print beside the dataset's name."""
        return f"{self.shape}" + (f", {self.num_classes} classes" if self.num_classes else "")

    def describe_rate(self, per_second: float) -> str:
        """A training rate of ``per_second`` samples, as the progress line and ``inspect`` print it."""
        return f"{per_second:,.0f} img/s"

    @property
    def scored_by_classes(self) -> bool:
        """Whether an evaluator network (a classifier of this data) can score samples: labelled images."""
        return self.num_classes >= 2

    def decode_samples(self, samples) -> list[str] | None:
        """What ``sample`` returned as texts, for a modality whose samples are texts; images: None."""
        return None


@dataclass(frozen=True)
class TokenSpec:
    """Sequences of ``block_size`` tokens from a vocabulary of characters (``vocab[i]`` is token i): text."""

    kind: ClassVar[str] = "tokens"
    sample_suffix: ClassVar[str] = ".txt"  # samples are texts
    out_suffixes: ClassVar[tuple[str, ...]] = (".txt",)
    out_hint: ClassVar[str] = "this run writes text: --out must end in .txt"
    takes_prompts: ClassVar[bool] = True
    real_data_modes: ClassVar[bool] = False
    sample_quality: ClassVar[str] = "texts"
    scored_by_classes: ClassVar[bool] = False

    vocab: str = ""
    block_size: int = 64
    num_classes: int = 0  # no labels

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def shape(self) -> tuple[int]:
        return (self.block_size,)

    @property
    def dims(self) -> int:
        return self.block_size

    def describe(self) -> str:
        return f"text ({self.block_size} characters of a {self.vocab_size}-character vocabulary)"

    def describe_data(self) -> str:
        return f"text, {self.block_size}-character blocks, {self.vocab_size}-character vocabulary"

    def describe_rate(self, per_second: float) -> str:
        return f"{per_second * self.block_size:,.0f} tokens/s"  # per_second blocks of block_size characters

    def encode(self, text: str, blank: str | None = None) -> list[int]:
        """Characters -> token ids; ``blank`` (a masked model's placeholder) -> -1. An unknown character is a one-line
        error naming it."""
        index = {c: i for i, c in enumerate(self.vocab)}
        ids = []
        for pos, c in enumerate(text):
            if blank is not None and c == blank:
                ids.append(-1)
            elif c in index:
                ids.append(index[c])
            else:
                raise GenaiError(f"character {c!r} (position {pos} of the prompt) is not in this model's vocabulary of "
                                 f"{self.vocab_size} characters; leave it out or replace it")
        return ids

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def decode_samples(self, samples) -> list[str]:
        """Token ids (N, L) -> the N texts."""
        return [self.decode(row) for row in samples.tolist()]


SPECS: dict[str, type] = {"image": ImageSpec, "tokens": TokenSpec}
Spec = ImageSpec | TokenSpec


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """What a checkpoint stores: the fields and the kind."""
    return {"kind": spec.kind, **asdict(spec)}


def spec_from_dict(raw: dict[str, Any]) -> Spec:
    """The spec a checkpoint stored with ``asdict(spec)`` (plus ``kind`` once there is more than one)."""
    fields = dict(raw)
    kind = fields.pop("kind", "image")
    if kind not in SPECS:
        raise GenaiError(f"data spec of kind '{kind}' is unknown to this version of genai; "
                         f"known: {', '.join(SPECS)}; upgrade genai to load it")
    try:
        return SPECS[kind](**fields)
    except TypeError as e:
        raise GenaiError(f"the stored data spec {raw} does not describe {kind} data ({e})") from None
