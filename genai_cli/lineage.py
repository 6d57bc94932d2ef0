"""Runs that build on other runs: resolve a parent run, check it, freeze it, embed it.

A family names the run it builds on in a field of its Config (``genai_cli.config.run_ref``):

    autoencoder: RunRef = run_ref(accepts=("autoencoder", "vae"))

and the YAML gives a run name, a run folder or a checkpoint path. Before the model is built the
reference is resolved like ``genai sample RUN`` resolves its target (``runs.resolve_checkpoint``) and
checked: the run exists, is of an accepted family and was trained on the same image shape. The family
then gets the parent's model, built and frozen (eval mode, ``requires_grad=False``), through
``parents`` in ``__init__`` (``self.parents["autoencoder"]``). Parents are not submodules, so their
weights are in no ``parameters()``, ``state_dict()``, optimizer or EMA.

Every checkpoint of the child embeds its parents, so it alone still samples and resumes after the
parent run is moved or deleted (a resumed run never reads the parent from disk again):

    state["parents"] = {"autoencoder": {            # the Config field
        "name": "ae-mnist", "step": 5000, "hash": sha256 of the weights (and of the grandparents' hashes),
        "source": "runs/ae-mnist/checkpoints/last.pt", "summary": {...},
        "family": "autoencoder", "config": {...}, "spec": {...},
        "model": {weights: the EMA weights when the run had them, as sampling uses},
        "parents": {...},                           # its own parents, embedded the same way
    }}

A record is itself a minimal checkpoint (family, config, spec, model, parents), so a child of a child
works the same way. ``resolve_parent`` is the generic resolver (``genai evaluate --evaluator`` uses it).

This module describes, resolves and checks parents; it builds none. ``build.build_parent`` builds one (its family's
model, with its own parents, through ``build.build_model``), and this module stays below the families.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import ParentRef, parent_refs
from .errors import GenaiError
from .spec import ImageSpec, spec_from_dict, spec_to_dict


def state_hash(weights: Mapping[str, Tensor], parents: Mapping[str, Parent] | None = None) -> str:
    """sha256 over the tensors (name, dtype, shape, bytes, in name order) and the parents' own hashes."""
    h = hashlib.sha256()
    for key in sorted(weights):
        t = weights[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(weights[key].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    for key in sorted(parents or {}):
        h.update(f"parent {key}={parents[key].hash}|".encode())
    return h.hexdigest()


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return self  # a frozen parent keeps eval mode: no dropout, its BatchNorm statistics never move


def freeze(model: nn.Module) -> nn.Module:
    model.eval().requires_grad_(False)
    model.train = types.MethodType(_stay_in_eval, model)  # the child's .train() does not reach it anyway
    return model


@dataclass(eq=False)
class Parent:
    """A resolved parent run: everything a child's checkpoint embeds about it."""

    name: str  # the parent run's name (its folder)
    step: int  # the step its weights come from
    hash: str  # state_hash of its weights (and of its own parents)
    family: str
    config: dict[str, Any]  # its whole config (Config.to_dict form)
    spec: ImageSpec
    source: str  # where it was read when first resolved (informative: it may be gone since)
    summary: dict[str, Any] = field(default_factory=dict)  # its training summary (losses, accuracy...)
    parents: dict[str, Parent] = field(default_factory=dict)  # its own parents (grandparents of the child)
    weights: dict[str, Tensor] | None = None  # None once built: the model holds them
    _model: nn.Module | None = field(default=None, repr=False)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], name: str, source: str) -> Parent:
        """From a run's checkpoint (runs.load_checkpoint_file): its EMA weights when present, as sampling uses."""
        weights = state["ema"] if state.get("ema") is not None else state["model"]
        parents = embedded_parents(state, where=source)
        return cls(name=name, step=int(state.get("step", 0)), hash=state_hash(weights, parents),
                   family=state["family"], config=state["config"], spec=spec_from_dict(state["spec"]),
                   source=source, summary=dict(state.get("summary") or {}), parents=parents, weights=weights)

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str) -> Parent:
        """From a record embedded in a checkpoint; its weights must still match its hash."""
        try:
            parents = embedded_parents(record, where=f"{where} > {record['name']}")
            parent = cls(name=str(record["name"]), step=int(record["step"]), hash=str(record["hash"]),
                         family=str(record["family"]), config=record["config"], spec=spec_from_dict(record["spec"]),
                         source=str(record.get("source", "?")), summary=dict(record.get("summary") or {}),
                         parents=parents, weights=record["model"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise GenaiError(f"{where}: the embedded parent record is incomplete ({type(e).__name__}: {e}); "
                             f"the checkpoint is corrupt or from another program") from None
        if state_hash(parent.weights, parents) != parent.hash:
            raise GenaiError(f"{where}: the embedded parent '{parent.name}' does not match its hash "
                             f"{parent.hash[:12]}; the checkpoint is corrupt")
        return parent

    @property
    def model(self) -> nn.Module | None:
        """The frozen model once built (``build.build_parent``), else None."""
        return self._model

    def load(self, model: nn.Module) -> nn.Module:
        """Load this run's weights into ``model`` (built from this record by ``build.build_parent``), freeze it and
        keep it: the weights then live in the model only."""
        if self._model is not None:
            raise ValueError(f"parent run '{self.name}' is already built")
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as e:
            raise GenaiError(f"the weights of parent run '{self.name}' do not fit family '{self.family}' "
                             f"({str(e).splitlines()[0][:100]})") from None
        self._model, self.weights = freeze(model), None
        return self._model

    def record(self) -> dict[str, Any]:
        """What a child's checkpoint stores under state["parents"][field]."""
        weights = self._model.state_dict() if self._model is not None else self.weights
        return {"name": self.name, "step": self.step, "hash": self.hash, "source": self.source,
                "summary": self.summary, "family": self.family, "config": self.config, "spec": spec_to_dict(self.spec),
                "model": weights, "parents": {k: p.record() for k, p in self.parents.items()}}


class Parents(Mapping[str, nn.Module]):
    """The frozen runs a model builds on: config field -> built parent model (``model.parents``).

    Not a Module, so nothing of it is in the child's parameters(), state_dict(), optimizers or EMA;
    ``copy.deepcopy`` (the EMA's copy of the model) shares it rather than copying frozen weights.
    Every parent is built before (``build.build_model`` builds them first): reading one loads nothing.
    """

    def __init__(self, resolved: Mapping[str, Parent]):
        unbuilt = [key for key, parent in resolved.items() if parent.model is None]
        if unbuilt:
            raise ValueError(f"parents {', '.join(unbuilt)} are not built; build.build_parent builds one, "
                             f"build.build_model builds a model with its parents")
        self.resolved: dict[str, Parent] = dict(resolved)

    def __getitem__(self, key: str) -> nn.Module:
        if key not in self.resolved:
            raise KeyError(f"no parent '{key}'; this model builds on: {', '.join(self.resolved) or 'nothing'}")
        return self.resolved[key].model

    def __iter__(self) -> Iterator[str]:
        return iter(self.resolved)

    def __len__(self) -> int:
        return len(self.resolved)

    def __deepcopy__(self, memo) -> Parents:
        return self

    def __repr__(self) -> str:
        return f"Parents({', '.join(f'{k}={p.name}@{p.step}' for k, p in self.resolved.items())})"

    def records(self) -> dict[str, dict[str, Any]]:
        return {k: p.record() for k, p in self.resolved.items()}

    def hashes(self) -> dict[str, str]:
        return {k: p.hash for k, p in self.resolved.items()}


# -- resolution ---------------------------------------------------------------------------------
def same_shape(a: ImageSpec, b: ImageSpec) -> bool:
    return type(a) is type(b) and a.shape == b.shape


def check_parent(parent: Parent, accepts: tuple[str, ...], spec: ImageSpec | None, role: str, ref: str) -> None:
    expected = ParentRef(tuple(accepts)).expected()
    if parent.family not in accepts:
        raise GenaiError(f"{role}: '{ref}' is a {parent.family} run; expected {expected}")
    if spec is not None and not same_shape(parent.spec, spec):
        raise GenaiError(f"{role}: '{ref}' was trained on {parent.spec.describe()} images but this run's data is "
                         f"{spec.describe()}; expected {expected} trained on the same image shape")


def resolve_parent(ref: str | Path, *, accepts: tuple[str, ...], root: str | Path | None = None,
                   spec: ImageSpec | None = None, role: str = "parent run") -> Parent:
    """A run name (under ``root``, default the runs dir), a run folder or a checkpoint -> the checked Parent.

    Raises a one-line GenaiError, prefixed with ``role`` (e.g. 'model.autoencoder', '--evaluator'), that names
    what was expected and what was found: no such run, a family not in ``accepts``, another image shape
    than ``spec``."""
    from .runs import load_checkpoint_file, resolve_checkpoint, run_of_checkpoint, runs_dir

    root = runs_dir(root)
    expected = ParentRef(tuple(accepts)).expected()
    if ref is None or not str(ref).strip():
        raise GenaiError(f"{role}: no run given; expected {expected} (a run name, run folder or checkpoint)")
    try:
        ckpt = resolve_checkpoint(str(ref), root)
        state = load_checkpoint_file(ckpt)
    except GenaiError as e:
        raise GenaiError(f"{role}: {e}; expected {expected}{how_to_train(str(ref), root)}") from None
    run = run_of_checkpoint(ckpt)
    name = run.name if run is not None else ckpt.stem
    parent = Parent.from_checkpoint(state, name=name, source=str(ckpt))
    check_parent(parent, accepts, spec, role, str(ref))
    return parent


def how_to_train(ref: str, root: Path) -> str:
    """For a parent run that is not there, the command that makes it when a config of its name is at hand
    (configs/<name>.yaml, as the bundled configs name their parents), else ''."""
    config = Path("configs") / f"{Path(ref).name}.yaml"
    missing = not Path(ref).exists() and not (root / ref).exists()
    return f"; train it first: genai train {config}" if missing and config.is_file() else ""


def resolve_parents(cls, model_cfg: Any, spec: ImageSpec | None, root: str | Path | None = None) -> dict[str, Parent]:
    """Every run_ref field of a family's config, resolved from disk (a new run, genai inspect CONFIG)."""
    parents = {}
    for key, ref in parent_refs(cls.Config).items():
        value = getattr(model_cfg, key)
        if value is None:
            if ref.required:
                raise GenaiError(f"config key 'model.{key}' is not set: this family builds on {ref.expected()}; "
                                 f"set it to a run name, run folder or checkpoint")
            continue
        parents[key] = resolve_parent(value, accepts=ref.accepts, root=root, spec=spec, role=f"model.{key}")
    return parents


def embedded_parents(state: dict[str, Any], where: str = "checkpoint") -> dict[str, Parent]:
    """The parents a checkpoint (or an embedded record) carries, hash-checked; {} when it has none."""
    records = state.get("parents") or {}
    if not isinstance(records, dict):
        raise GenaiError(f"{where}: 'parents' is not a mapping; the checkpoint is corrupt")
    return {k: Parent.from_record(r, where=f"{where}: parent '{k}'") for k, r in records.items()}


def ancestors(model: nn.Module) -> list[nn.Module]:
    """Every frozen model a model builds on: its parents, their parents, and so on."""
    found = []
    for parent in model.parents.values():
        found += [parent, *ancestors(parent)]
    return found


def frozen_parameters(model: nn.Module) -> int:
    """How many weights the runs a model builds on hold (all generations)."""
    return sum(p.numel() for m in ancestors(model) for p in m.parameters())


def check_frozen(model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
    """No optimizer may hold an ancestor's weights (a family's own configure_optimizers could hand them in)."""
    frozen = {id(p) for ancestor in ancestors(model) for p in ancestor.parameters()}
    for name, opt in optimizers.items():
        if any(id(p) in frozen for group in opt.param_groups for p in group["params"]):
            raise GenaiError(f"optimizer '{name}' holds weights of a frozen parent run; a family optimises only "
                             f"its own parameters (self.parameters()), never self.parents[...]")


def check_not_submodules(model: nn.Module) -> None:
    """A family must read its parents through ``self.parents``: stored as an attribute, a parent would become a
    submodule, and its weights would be trained, averaged and saved as the child's own."""
    frozen = {id(m): key for key, parent in model.parents.items() for m in parent.modules()}
    for name, module in model.named_modules():
        if id(module) in frozen:
            raise TypeError(f"{type(model).__name__}.{name} is (part of) its frozen parent '{frozen[id(module)]}'; "
                            f"read it through self.parents['{frozen[id(module)]}'] instead of storing it as an "
                            f"attribute, so it stays out of the trained and saved weights")


def check_same_parents(model: nn.Module, state: dict[str, Any], where: str) -> None:
    """A checkpoint resumed into a model must have been trained on the very same parents (by hash)."""
    saved = {k: r.get("hash") for k, r in (state.get("parents") or {}).items()}
    if saved != model.parents.hashes():
        have = ", ".join(f"{k}={h[:12]}" for k, h in model.parents.hashes().items()) or "none"
        was = ", ".join(f"{k}={str(h)[:12]}" for k, h in saved.items()) or "none"
        raise GenaiError(f"{where} was trained on parents {was}, but this run has {have}; resume with the parents "
                         f"embedded in the checkpoint")


def describe(name: str, parents: Mapping[str, Parent], depth: int = 0) -> list[str]:
    """One line per parent, grandparents indented: 'child <- ae @ step 500, 3f2a9c0d1e2b (autoencoder, model.x)'."""
    lines = []
    for key, p in parents.items():
        lines.append(f"{'  ' * depth}{name} <- {p.name} @ step {p.step}, {p.hash[:12]} ({p.family}, model.{key})")
        lines += describe(p.name, p.parents, depth + 1)
    return lines
