"""The data contract: what one example looks like, shared by datasets, families and checkpoints.

Datasets produce a spec (``data.py``), a family is built for one (``models/``), a checkpoint stores it
(``asdict``) so a model can be rebuilt without its data, and a run that builds on another checks that
their specs agree (``lineage.py``). This module imports no family, so ``data.py`` and ``nn/`` depend on
it rather than on ``models/``.

Images today. A token-sequence spec (vocabulary, block size) joins ``ImageSpec`` here when text
arrives: it sets its own ``kind``, and ``spec_from_dict`` tells the two apart (checkpoints written
before then carry no ``kind`` and are images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import GenaiError


@dataclass(frozen=True)
class ImageSpec:
    """What the data looks like: every family is built for one image shape."""

    kind: ClassVar[str] = "image"

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


SPECS: dict[str, type] = {"image": ImageSpec}


def spec_from_dict(raw: dict[str, Any]) -> ImageSpec:
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
