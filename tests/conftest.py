"""Shared fixtures: tiny models on tiny synthetic data, so the whole suite runs in minutes on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_config

from genai_cli.config import DataConfig
from genai_cli.data import load_data, to_float

# One thread: tiny tensors gain nothing from two, and threads spin badly on a busy machine.
torch.set_num_threads(1)


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
