"""Register / create / list for model families and datasets (torchvision's register_model, timm's create_model)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import GenaiError

T = TypeVar("T")


def did_you_mean(name: str, valid) -> str:
    """A ' (did you mean 'x'?)' hint, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    summary: str


class Registry(Generic[T]):
    """A named table of objects. Duplicate names raise; unknown names list the valid ones.

    ``populate`` names the module whose import registers the entries: the first lookup imports it, so a
    caller never depends on having imported the families first (``import genai_cli`` stays free of torch).
    """

    def __init__(self, kind: str, populate: str | None = None):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        # old name -> name: configs and runs written under a renamed entry still load
        self._aliases: dict[str, str] = {}
        self._populate = populate

    def _ensure(self) -> None:
        if self._populate is not None:
            module, self._populate = self._populate, None
            importlib.import_module(module)

    def register(self, name: str, summary: str = "", aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Register under ``name``; ``aliases`` (earlier names) resolve to it in ``get`` and ``in``, unlisted."""
        def decorator(obj: T) -> T:
            for key in (name, *aliases):
                if key in self._entries or key in self._aliases:
                    raise ValueError(f"{self.kind} '{key}' is already registered")
            doc = summary or (getattr(obj, "__doc__", None) or "").strip().splitlines()[0:1]
            self._entries[name] = Entry(name, obj, doc if isinstance(doc, str) else (doc[0] if doc else ""))
            self._aliases.update({alias: name for alias in aliases})
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        if name not in self._entries:
            raise KeyError(f"{self.kind} '{name}' is not registered")
        del self._entries[name]
        self._aliases = {a: n for a, n in self._aliases.items() if n != name}

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (itself, or what an alias stands for)."""
        self._ensure()
        return self._aliases.get(name, name)

    def aliases_of(self, name: str) -> list[str]:
        self._ensure()
        return sorted(a for a, n in self._aliases.items() if n == name)

    @contextmanager
    def scoped(self, name: str, obj: T, summary: str = "") -> Iterator[T]:
        """Register ``obj`` for the duration of a with-block (test-only families), then remove it."""
        self.register(name, summary)(obj)
        try:
            yield obj
        finally:
            self.unregister(name)

    def get(self, name: str) -> T:
        self._ensure()
        name = self._aliases.get(name, name)
        if name not in self._entries:
            valid = ", ".join(sorted(self._entries))
            raise GenaiError(f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; valid: {valid}")
        return self._entries[name].obj

    def names(self) -> list[str]:
        self._ensure()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: Any) -> bool:
        self._ensure()
        return name in self._entries or name in self._aliases


MODELS: Registry = Registry("model family", populate="genai_cli.models")
DATASETS: Registry = Registry("dataset")
register_model = MODELS.register
register_dataset = DATASETS.register
