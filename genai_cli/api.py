"""The Python API: create_model, load_checkpoint, load_pretrained, list_models, and drawing (re-exported by genai_cli).

Drawing lives in ``genai_cli.generate``: ``draw(model, SampleRequest(mode=..., n=..., options=...))`` with one
mode of ``Plain``, ``Sweep``, ``Prefix``, ``Walk`` (``Inpaint`` is reserved), returning ``Samples``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import models  # noqa: F401  (importing the package registers every family)
from .build import build_model, model_from_state  # noqa: F401  (the one way a model is built, re-exported)
from .config import build_dataclass
from .export import load_pretrained  # noqa: F401  (a genai export folder -> its model, re-exported)
from .generate import (  # noqa: F401  (the drawing API, re-exported)
    Inpaint,
    Plain,
    Prefix,
    SampleRequest,
    Samples,
    Sweep,
    Walk,
    draw,
    validation_images,
)
from .models.base import GenerativeModel
from .registry import MODELS
from .spec import ImageSpec


def create_model(name: str, *, channels: int = 1, image_size: int = 28, num_classes: int = 0, binary: bool = False,
                 **config: Any) -> GenerativeModel:
    """Build a family by name: ``create_model("ddpm", image_size=16, base_channels=32)``.

    The keyword arguments are the family's ``Config`` fields (the YAML ``model:`` section).
    """
    cls = MODELS.get(name)
    cfg = build_dataclass(cls.Config, config, "model")
    return build_model(name, cfg, ImageSpec(channels=channels, size=image_size, num_classes=num_classes,
                                            binary=binary))


def load_checkpoint(path: str | Path, use_ema: bool = True, device: str = "cpu") -> GenerativeModel:
    """Load a checkpoint written by ``genai train``: the model, ready to ``sample``."""
    from .runs import load_checkpoint_file

    return model_from_state(load_checkpoint_file(Path(path)), use_ema=use_ema).to(device)


def list_models() -> list[str]:
    return MODELS.names()
