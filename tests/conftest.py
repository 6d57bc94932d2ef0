"""Shared fixtures: tiny models on tiny synthetic data, so the whole suite runs in minutes on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_config

from genai_cli import hardware
from genai_cli.config import DataConfig
from genai_cli.data import load_data, to_float

# One thread: tiny tensors gain nothing from two, and threads spin badly on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """The compiled decoding step (genai_cli/nn/fused.py) is built into the session's temporary folder, not the
    user's ~/.cache, once for the session (commands the tests start inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENAI_CACHE", str(tmp_path_factory.mktemp("genai-cache")))
        yield


@pytest.fixture(scope="session")
def shapes_batch():
    """A fixed batch (x, y) of 8x8 synthetic shapes with 4 classes."""
    data = load_data(DataConfig(name="shapes", image_size=8))
    return to_float(data.train_x[:16]), data.train_y[:16]


@pytest.fixture
def config_file(tmp_path: Path):
    def write(family: str = "ddpm", name: str = "tiny.yaml", **train) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tiny_config(family, **train)))
        return path

    return write


@pytest.fixture(autouse=True)
def no_precision_probe(monkeypatch):
    """``precision: auto`` resolves from what the CPU reports, untimed: a test's result must not depend on a timing
    (tests of the probe inject their timings)."""
    monkeypatch.setenv(hardware.PROBE_ENV, "0")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bf16, whatever this machine is."""
    monkeypatch.delenv(hardware.NATIVE_BF16_ENV, raising=False)

    def set_native(native: bool, amx: bool = False):
        units = {"amx": native and amx, "avx512_bf16": native and not amx}
        monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: units)
        monkeypatch.setattr(hardware, "_warned", set())

    return set_native


@pytest.fixture(params=["fp32", "bf16"])
def auto_precision(request, monkeypatch) -> str:
    """Run a test once with ``precision: auto`` resolving to fp32 on the CPU and once to bf16, on any CPU (through
    GENAI_CPU_NATIVE_BF16), so what fails only on one kind of processor fails on every machine. The value is the
    precision auto resolves to; a test comparing numbers takes its tolerance from it (``helpers.tolerance``)."""
    monkeypatch.setenv(hardware.NATIVE_BF16_ENV, "1" if request.param == "bf16" else "0")
    return request.param

