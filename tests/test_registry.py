"""The registry fills itself: library code works without importing the families first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_loads_without_importing_the_families_first():
    code = ("from genai_cli.config import load_config; "
            f"cfg = load_config({str(ROOT / 'configs' / 'quickstart.yaml')!r}); print(cfg.family)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ddpm"
