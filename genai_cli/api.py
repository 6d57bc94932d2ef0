"""The Python API: create_model, load_checkpoint, list_models, and drawing (re-exported by genai_cli).

Drawing lives in ``genai_cli.generate``: ``draw(model, SampleRequest(mode=..., n=..., options=...))`` with one
mode of ``Plain``, ``Sweep``, ``Prefix``, ``Walk`` (``Inpaint`` is reserved), returning ``Samples``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import models  # noqa: F401  (importing the package registers every family)
from .config import build_dataclass, parent_refs
from .errors import GenaiError
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
from .lineage import Parent, Parents, check_not_submodules, check_parent, embedded_parents, resolve_parents
from .models.base import GenerativeModel
from .registry import MODELS
from .spec import ImageSpec, Spec, spec_from_dict


def build_model(family: str, model_cfg: Any, spec: Spec, parents: Mapping[str, Parent] | None = None, *,
                root: str | Path | None = None) -> GenerativeModel:
    """The one way a family is built (training, sampling, inspect, the API).

    A family whose Config has run_ref fields gets those runs built and frozen, as ``parents`` in its
    ``__init__``. ``parents`` maps the fields to resolved runs (embedded in a checkpoint, or from
    ``lineage.resolve_parent``); None resolves the config's references from disk, under ``root`` (the runs dir).
    """
    cls = MODELS.get(family)
    if spec.kind not in cls.modalities:
        takers = [n for n in MODELS.names() if spec.kind in MODELS.get(n).modalities]
        raise GenaiError(f"family '{family}' models {' and '.join(cls.modalities)}, but the data is "
                         f"{spec.describe()}; families for it: {', '.join(takers)}")
    refs = parent_refs(cls.Config)
    if not refs:
        if parents:
            raise GenaiError(f"family '{family}' builds on no other run, but was given parents {', '.join(parents)}")
        return cls(model_cfg, spec)
    if parents is None:
        parents = resolve_parents(cls, model_cfg, spec, root=root)
    for key in parents:
        if key not in refs:
            raise GenaiError(f"family '{family}' has no parent field '{key}'; its parents: {', '.join(refs)}")
    for key, ref in refs.items():
        if key in parents:
            check_parent(parents[key], ref.accepts, spec, f"model.{key}", parents[key].name)
        elif ref.required:
            raise GenaiError(f"model.{key}: family '{family}' builds on {ref.expected()} and none was given "
                             f"(a checkpoint of it must embed its parents)")
    model = cls(model_cfg, spec, parents=Parents(parents))
    check_not_submodules(model)
    return model


def create_model(name: str, *, channels: int = 1, image_size: int = 28, num_classes: int = 0, binary: bool = False,
                 **config: Any) -> GenerativeModel:
    """Build a family by name: ``create_model("ddpm", image_size=16, base_channels=32)``.

    The keyword arguments are the family's ``Config`` fields (the YAML ``model:`` section).
    """
    cls = MODELS.get(name)
    cfg = build_dataclass(cls.Config, config, "model")
    return build_model(name, cfg, ImageSpec(channels=channels, size=image_size, num_classes=num_classes,
                                            binary=binary))


def model_from_state(state: dict[str, Any], use_ema: bool = True) -> GenerativeModel:
    family = state["family"]
    if family not in MODELS:
        raise GenaiError(f"checkpoint family '{family}' is unknown to this version of genai; "
                         f"known: {', '.join(MODELS.names())}; upgrade genai to load it")
    cls = MODELS.get(family)
    model_raw = {k: v for k, v in state["config"]["model"].items() if k != "family"}
    # The parents come from the checkpoint itself (hash-checked), never from disk: it samples alone.
    model = build_model(family, build_dataclass(cls.Config, model_raw, "model"), spec_from_dict(state["spec"]),
                        parents=embedded_parents(state))
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
