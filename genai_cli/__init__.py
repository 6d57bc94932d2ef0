"""genai: train and sample generative image models from one YAML config each.

The API names below are loaded on first use (module ``__getattr__``, PEP 562): importing ``genai_cli`` (as
``genai --help`` does, through ``genai_cli.cli``) imports no torch. Any ``genai_cli.models`` import, or the
first API name used, registers the model families.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the submodule that defines it
_API = {
    "create_model": "api", "list_models": "api", "load_checkpoint": "api",
    "load_pretrained": "api",
    "draw": "generate", "SampleRequest": "generate", "Samples": "generate", "Plain": "generate",
    "Sweep": "generate", "Prefix": "generate", "Walk": "generate", "Inpaint": "generate",
    "validation_images": "generate",
}

__all__ = ["create_model", "list_models", "load_checkpoint", "load_pretrained", "draw", "SampleRequest", "Samples",
           "Plain", "Sweep", "Prefix", "Walk", "Inpaint", "validation_images", "__version__"]

if TYPE_CHECKING:
    from .api import create_model, list_models, load_checkpoint, load_pretrained
    from .generate import Inpaint, Plain, Prefix, SampleRequest, Samples, Sweep, Walk, draw, validation_images


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        importlib.import_module(".api", __name__)  # registers the families before anything is built
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'genai_cli' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
