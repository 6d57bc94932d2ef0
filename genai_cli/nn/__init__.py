"""Layers and networks (no family logic). One helper lives here because layers of several modules share it."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def weights_key(tensors: Iterable[Tensor]) -> tuple:
    """A key that changes whenever one of ``tensors`` changes: its storage, dtype and device, and autograd's
    version counter, which every in-place update bumps (an optimizer step, ``load_state_dict``'s copy). Layers
    keep weights derived for sampling (masked, transposed) under it and derive them again when it differs.

    The version counter is ``Tensor._version``, not a documented attribute: where a torch lacks it, each call's key
    is new (the derived weights are made again every time: slower, never stale)."""
    return tuple((t.data_ptr(), getattr(t, "_version", object()), t.dtype, t.device) for t in tensors)
