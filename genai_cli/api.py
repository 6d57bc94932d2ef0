"""The Python API: create_model, load_checkpoint, list_models (re-exported by genai_cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import models  # noqa: F401  (importing the package registers every family)
from .config import build_dataclass
from .errors import GenaiError
from .models.base import GenerativeModel, ImageSpec
from .registry import MODELS


def build_model(family: str, model_cfg: Any, spec: ImageSpec) -> GenerativeModel:
    cls = MODELS.get(family)
    return cls(model_cfg, spec)


def create_model(name: str, *, channels: int = 1, image_size: int = 28, num_classes: int = 0, binary: bool = False,
                 **config: Any) -> GenerativeModel:
    """Build a family by name: ``create_model("ddpm", image_size=16, base_channels=32)``.

    The keyword arguments are the family's ``Config`` fields (the YAML ``model:`` section).
    """
    cls = MODELS.get(name)
    cfg = build_dataclass(cls.Config, config, "model")
    return cls(cfg, ImageSpec(channels=channels, size=image_size, num_classes=num_classes, binary=binary))


def model_from_state(state: dict[str, Any], use_ema: bool = True) -> GenerativeModel:
    family = state["family"]
    if family not in MODELS:
        raise GenaiError(f"checkpoint family '{family}' is unknown to this version of genai; "
                         f"known: {', '.join(MODELS.names())}; upgrade genai to load it")
    cls = MODELS.get(family)
    model_raw = {k: v for k, v in state["config"]["model"].items() if k != "family"}
    model = cls(build_dataclass(cls.Config, model_raw, "model"), ImageSpec(**state["spec"]))
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise GenaiError(f"checkpoint weights do not fit family '{family}' ({str(e).splitlines()[0][:100]})") from None
    return model.eval()


def load_checkpoint(path: str | Path, use_ema: bool = True, device: str = "cpu") -> GenerativeModel:
    """Load a checkpoint written by ``genai train``: the model, ready to ``sample``."""
    from .runs import load_checkpoint_file

    return model_from_state(load_checkpoint_file(Path(path)), use_ema=use_ema).to(device)


def list_models() -> list[str]:
    return MODELS.names()
