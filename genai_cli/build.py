"""Building a family's model from what describes it: a config, a data spec and the runs it builds on.

The one way a model is built: training, sampling, inspect, the Python API (``api`` re-exports these names), and a
parent run inside its child. It sits below ``models`` and ``api`` and beside ``lineage``: it finds a family
through the registry (whose first lookup imports the family modules), so nothing here imports upward, and
``lineage`` describes parents without building them (building a parent needs ``build_model`` again, for the
parent's own parents: that recursion lives here, in one module, instead of a cycle between two).

A parent is built explicitly, once, when the model that builds on it is built (``build_parent``): its weights
are loaded then, never on first access.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .config import build_dataclass, parent_refs
from .errors import GenaiError
from .lineage import (
    Parent,
    Parents,
    check_not_submodules,
    check_parent,
    embedded_parents,
    resolve_parents,
)
from .registry import MODELS
from .spec import Spec, spec_from_dict

if TYPE_CHECKING:  # annotations only: models is the layer above
    from .models.base import GenerativeModel


def build_model(family: str, model_cfg: Any, spec: Spec, parents: Mapping[str, Parent] | None = None, *,
                root: str | Path | None = None) -> GenerativeModel:
    """The one way a family is built (training, sampling, inspect, the API).

    A family whose Config has run_ref fields gets those runs built and frozen, as ``parents`` in its
    ``__init__``. ``parents`` maps the fields to resolved runs (embedded in a checkpoint, or from
    ``lineage.resolve_parent``); None resolves the config's references from disk, under ``root`` (the runs dir).

    The walk of a reference (``model.tokenizer: RUN``): ``lineage.resolve_parents`` reads and checks each run,
    ``build_parent`` builds it (this function again, for its own parents) and ``Parent.load`` freezes it, then the
    family gets them all in ``Parents``.
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
    if parents is None:  # from disk: resolve_parent checks each run as it reads it
        parents = resolve_parents(cls, model_cfg, spec, root=root)
    else:  # handed in (embedded in a checkpoint, or resolved elsewhere): checked against this family here
        check_parents(family, refs, parents, spec)
    for parent in parents.values():
        build_parent(parent)
    model = cls(model_cfg, spec, parents=Parents(parents))
    check_not_submodules(model)
    return model


def check_parents(family: str, refs: Mapping[str, Any], parents: Mapping[str, Parent], spec: Spec) -> None:
    """Parents handed to ``build_model`` fit the family's run_ref fields: no unknown field, every required one
    given, each of an accepted family and trained on the same data shape."""
    for key in parents:
        if key not in refs:
            raise GenaiError(f"family '{family}' has no parent field '{key}'; its parents: {', '.join(refs)}")
    for key, ref in refs.items():
        if key in parents:
            check_parent(parents[key], ref.accepts, spec, f"model.{key}", parents[key].name)
        elif ref.required:
            raise GenaiError(f"model.{key}: family '{family}' builds on {ref.expected()} and none was given "
                             f"(a checkpoint of it must embed its parents)")


def build_parent(parent: Parent) -> nn.Module:
    """The parent's model, built once (with its own parents), its weights loaded and frozen; kept on the Parent,
    so every model that builds on it (a child and its EMA copy) shares the one frozen copy."""
    if parent.model is None:
        parent.load(model_from_record(parent.family, parent.config, parent.spec, parent.parents,
                                      what=f"parent run '{parent.name}'"))
    return parent.model


def model_from_record(family: str, config: dict[str, Any], spec: Spec, parents: Mapping[str, Parent], *,
                      what: str, upgrade: str = "") -> GenerativeModel:
    """The model a record describes (a checkpoint, or a parent embedded in one), built without weights: its family
    looked up by name, its saved ``config["model"]`` section typed, its parents built."""
    if family not in MODELS:
        raise GenaiError(f"{what} is of family '{family}', unknown to this version of genai; "
                         f"known: {', '.join(MODELS.names())}{upgrade}")
    cls = MODELS.get(family)
    raw = {k: v for k, v in config["model"].items() if k != "family"}
    return build_model(family, build_dataclass(cls.Config, raw, "model"), spec, parents=parents)


def model_from_state(state: dict[str, Any], use_ema: bool = True) -> GenerativeModel:
    """A checkpoint's model (runs.load_checkpoint_file), in eval mode: its EMA weights unless ``use_ema`` is off."""
    family = state["family"]
    # The parents come from the checkpoint itself (hash-checked), never from disk: it samples alone.
    model = model_from_record(family, state["config"], spec_from_dict(state["spec"]), embedded_parents(state),
                              what="the checkpoint", upgrade="; upgrade genai to load it")
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise GenaiError(f"checkpoint weights do not fit family '{family}' ({str(e).splitlines()[0][:100]})") from None
    return model.eval()
