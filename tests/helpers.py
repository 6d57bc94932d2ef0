"""Helpers shared by the tests: tiny models and tiny configs."""

from __future__ import annotations

from typer.testing import CliRunner

import genai_cli  # noqa: F401  (registers every family)
from genai_cli.cli import app
from genai_cli.models.base import ImageSpec
from genai_cli.registry import MODELS

SPEC = ImageSpec(channels=1, size=8, num_classes=4, binary=False)


def tiny_cfg(family: str, **overrides):
    """The tiny Config of ``family``; its parent-run fields name the untrained parents ``tiny_parents`` builds."""
    from genai_cli.config import parent_refs

    cls = MODELS.get(family)
    refs = {key: f"untrained-{ref.accepts[0]}" for key, ref in parent_refs(cls.Config).items()}
    return cls.Config(**{**refs, **cls.tiny, **overrides})


def tiny_model(family: str, spec: ImageSpec = SPEC, **overrides):
    """A tiny model of ``family``; a family that builds on other runs gets untrained tiny parents."""
    from genai_cli.api import build_model
    from genai_cli.lineage import tiny_parents

    cls = MODELS.get(family)
    return build_model(family, tiny_cfg(family, **overrides), spec, parents=tiny_parents(cls, spec))


def tiny_config(family: str = "ddpm", **train) -> dict:
    cls = MODELS.get(family)
    return {
        "model": {"family": family, **cls.tiny},
        "data": {"name": "shapes", "image_size": 8, "limit": 64},
        "train": {"max_steps": 4, "batch_size": 8, "log_every": 2, "eval_every": 2, "checkpoint_every": 2,
                  "sample_every": 2, "sample_n": 4, "warmup_steps": 1, "eval_max_images": 16,
                  "precision": "fp32", **train},  # fp32: the same numbers on every CPU (auto is tested apart)
        "sample": {"n": 4},
    }


runner = CliRunner()


def invoke(*args, ok=True):
    """Run the CLI in-process; with ok, fail the test unless it exits 0."""
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result
