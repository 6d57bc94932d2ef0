"""The causal transformer's decoding step for a few texts at once (batch 1 to ``MAX_BATCH``) as one compiled call
(``fused_step.c``), where a C compiler is at hand: a person waiting for a text waits on ~60 tiny operations per
character, each a few microseconds of dispatch in eager PyTorch, which one call of plain loops does not pay. Past a
few rows a step is arithmetic, which ATen's matrix products do better: the eager step serves there.

``fused_step(model, caches, n)`` gives a stepper for one position, or None when the fused path does not apply (not
a CPU, not fp32, more than ``MAX_BATCH`` rows, no compiler): the caller then steps eagerly, the same maths.
The C source is compiled once per machine with ``cc -O3 -march=native`` (``$CC`` if set; without ``-march=native``
where the compiler refuses it) into ``$GENAI_CACHE`` (default ``~/.cache/genai``), named by a hash of the source,
the compiler, the flags and this CPU's model and flags, so a home folder shared by different machines never loads
a library built for another instruction set. About half a second, once; a compiler that is missing or fails is
tried once per process, and the eager step is the fallback, never an error.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("fused_step.c")
# Tried in order: the CPU's own vector width, then any compiler's baseline. (-ffast-math measured ~15 % faster here,
# but a shared library built with it may switch the whole process to flush denormals: not used.)
FLAGS = (("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared"), ("-O3", "-fopenmp-simd", "-fPIC", "-shared"))
ENV_SWITCH = "GENAI_FUSED_STEP"  # "0": always the eager step
MAX_BATCH = 4  # texts per step: the weights are read once a step, each row costs its dot products


def enabled() -> bool:
    """False where ``GENAI_FUSED_STEP=0``: every step eager (to compare the two, or to rule the C step out)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("GENAI_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genai"
    return Path(root)


def _cpu_identity() -> str:
    """This CPU's model name and feature flags (Linux), else what ``platform`` knows: part of the library's name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in text.splitlines()[:64] if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep))


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("d", "heads", "hidden", "layers", "vocab")] + \
               [(name, ctypes.c_void_p) for name in ("tok", "pos", "lnfw", "lnfb", "wout", "bout")] + \
               [("eps_f", ctypes.c_float), ("w", ctypes.c_void_p), ("eps", ctypes.c_void_p),
                ("cache", ctypes.c_void_p), ("scratch", ctypes.c_void_p)]


@cache
def library() -> ctypes.CDLL | None:
    """The compiled step, built on first use and kept in ``cache_dir()``; None without a working C compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None
    for flags in FLAGS:
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + compiler.encode()
                             + _cpu_identity().encode()).hexdigest()[:16]
        target = cache_dir() / f"fused_step-{key}.so"
        if target.exists() or _compile(compiler, flags, target):
            try:
                lib = ctypes.CDLL(str(target))
            except OSError:
                continue
            lib.genai_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            lib.genai_step.restype = None
            return lib
    return None


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> bool:
    """Build the library into ``target``, aside and then renamed (a concurrent build never leaves half a file)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                  timeout=120)
            if done.returncode or not built.exists():
                return False
            os.replace(built, target)
            return True
    except (OSError, subprocess.SubprocessError):
        return False


class FusedStep:
    """``stepper(seen, pos)`` for one position of a window of n texts: logits (n, K), the cache rows of ``pos``
    written. The logits tensor is reused from call to call (the sampler reads it before the next step)."""

    def __init__(self, lib: ctypes.CDLL, model, caches: list, n: int) -> None:
        blocks, d = model.blocks, model.config.d_model
        held = []  # every tensor whose memory the C side reads: kept alive as long as this stepper

        def ptr(t: Tensor) -> int:
            held.append(t)
            return t.data_ptr()
        weights = []  # PER_LAYER pointers per block, in fused_step.c's enum order
        for b in blocks:
            weights += [b.ln1.weight, b.ln1.bias, b.qkv.weight, b.qkv.bias, b.proj.weight, b.proj.bias,
                        b.ln2.weight, b.ln2.bias, b.mlp[0].weight, b.mlp[0].bias, b.mlp[2].weight, b.mlp[2].bias]
        self._w = (ctypes.c_void_p * len(weights))(*(ptr(w) for w in weights))
        self._eps = (ctypes.c_float * (2 * len(blocks)))(*(e for b in blocks for e in (b.ln1.eps, b.ln2.eps)))
        self._cache = (ctypes.c_void_p * len(caches))(*(ptr(c.qkv) for c in caches))
        hidden = blocks[0].mlp[0].out_features
        scratch = torch.empty(n * (2 * d + hidden) + model.seq_len, dtype=torch.float32)
        self.logits = torch.empty(n, model.levels, dtype=torch.float32)
        self._model = _Model(d=d, heads=model.config.heads, hidden=hidden, layers=len(blocks), vocab=model.levels,
                             tok=ptr(model.token_embedding.weight), pos=ptr(model.position_embedding),
                             lnfw=ptr(model.ln_f.weight), lnfb=ptr(model.ln_f.bias), wout=ptr(model.out.weight),
                             bout=ptr(model.out.bias), eps_f=model.ln_f.eps, w=ctypes.addressof(self._w),
                             eps=ctypes.addressof(self._eps), cache=ctypes.addressof(self._cache),
                             scratch=ptr(scratch))
        self._held, self._caches, self.n = held, caches, n
        self._call, self._ref, self._out = lib.genai_step, ctypes.byref(self._model), self.logits.data_ptr()

    def __call__(self, seen: Tensor, pos: int) -> Tensor:
        self._call(self._ref, seen.data_ptr(), seen.stride(0), seen.stride(1), self.n, pos, self._out)
        for kv in self._caches:
            kv.length = pos + 1
        return self.logits


def fused_step(model, caches: list, n: int) -> FusedStep | None:
    """The compiled stepper for ``model`` (a causal ``Transformer``) for ``n`` texts, or None where it does not apply:
    the eager ``Block.step`` serves instead (same maths, float rounding aside). The caller asks ``enabled()`` first,
    when its stepper is made."""
    if not 1 <= n <= MAX_BATCH or model.out.weight.device.type != "cpu":
        return None
    tensors = [p for p in model.parameters()] + [c.qkv for c in caches]
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    if any(b.mlp[1].approximate != "none" for b in model.blocks):  # the C step computes the exact (erf) GELU
        return None
    lib = library()
    return None if lib is None else FusedStep(lib, model, caches, n)
