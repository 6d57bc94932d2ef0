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

    cls = MODELS.get(family)
    return build_model(family, tiny_cfg(family, **overrides), spec, parents=tiny_parents(cls, spec))


def tiny_config(family: str = "ddpm", **train) -> dict:
    """A tiny run config; a family that builds on other runs names them tiny-<family> (``train_tiny_parents``)."""
    from genai_cli.config import parent_refs

    cls = MODELS.get(family)
    refs = {key: f"tiny-{ref.accepts[0]}" for key, ref in parent_refs(cls.Config).items()}
    return {
        "model": {"family": family, **refs, **cls.tiny},
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


def train_tiny_parents(family: str, runs) -> None:
    """Train, under ``runs``, the tiny runs that ``tiny_config(family)`` builds on (two steps each)."""
    import yaml

    from genai_cli.config import parent_refs

    for ref in parent_refs(MODELS.get(family).Config).values():
        parent = ref.accepts[0]
        if (runs / f"tiny-{parent}").exists():
            continue
        train_tiny_parents(parent, runs)
        path = runs.parent / f"tiny-{parent}.yaml"
        path.write_text(yaml.safe_dump(tiny_config(parent, max_steps=2)))
        invoke("train", path, "--runs-dir", runs, "--name", f"tiny-{parent}", "-q")


def untrained_parent(family: str, spec: ImageSpec, **overrides):
    """A parent that was never trained: the family's ``tiny`` config (plus overrides), random weights, step 0.
    For tests (and benchmarks) that need a child family without training its parent first."""
    from dataclasses import asdict

    from genai_cli.api import build_model
    from genai_cli.config import build_dataclass
    from genai_cli.lineage import Parent, state_hash

    cls = MODELS.get(family)
    cfg = build_dataclass(cls.Config, {**cls.tiny, **overrides}, "model")
    parents = tiny_parents(cls, spec)
    model = build_model(family, cfg, spec, parents=parents)
    weights = model.state_dict()
    return Parent(name=f"untrained-{family}", step=0, hash=state_hash(weights, parents), family=family,
                  config={"model": {"family": family, **asdict(cfg)}}, spec=spec, source="(untrained)",
                  parents=parents, weights=weights)


def tiny_parents(cls, spec: ImageSpec) -> dict:
    """Untrained tiny parents for every run_ref of a family (its first accepted family each)."""
    from genai_cli.config import parent_refs

    return {key: untrained_parent(ref.accepts[0], spec) for key, ref in parent_refs(cls.Config).items()}


def tolerance(precision: str) -> dict[str, float]:
    """assert_close tolerances for values computed under ``precision`` (bf16 keeps 8 bits of mantissa: ~4e-3)."""
    return {"atol": 2e-2, "rtol": 2e-2} if precision == "bf16" else {"atol": 1e-5, "rtol": 1.3e-6}


def checksum(folder) -> str:
    """A hash of every name and byte under ``folder``: bad input must leave what is on disk as it was."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def metric_rows(run, split: str | None = None) -> list[dict]:
    """A run's metrics.jsonl rows (of one ``split`` if given). Strict: a line that is not JSON fails the test,
    where the toolkit's own reader (runs.MetricsLog) would skip it."""
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows if split is None else [r for r in rows if r["split"] == split]


def train_losses(run) -> dict[int, float]:
    """step -> training loss of a run's log, which must read like one run: no step twice (a resumed run appends
    after its checkpoint's step; in a distributed run only rank 0 writes)."""
    rows = metric_rows(run, "train")
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice in {run / 'metrics.jsonl'}"
    return {r["step"]: r["loss"] for r in rows}
