"""What ``genai evaluate`` shows: the results table, the calibration table, the comparison bar chart, the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GenaiError
from .metrics import ECE_BINS

# Rows of the results table, in order: (key, label, format). Keys not listed (diagnostics) follow.
ROWS = [
    ("classifier_fid", "classifier-FID (lower is better)", ".3f"),
    ("kid", "KID (lower is better)", ".5f"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
    ("density", "density", ".3f"),
    ("coverage", "coverage", ".3f"),
    ("class_entropy", "class entropy / log K", ".3f"),
    ("classes_covered", "classes with >= 2 % of samples", "d"),
    ("confident_share", "share classified with p >= 0.9", ".3f"),
    ("bits_per_dim", "bits/dim (validation)", ".4f"),
    ("bits_per_char", "bits/character (validation)", ".4f"),
    ("distinct_2grams", "distinct 2-grams in samples", ".3f"),
    ("distinct_4grams", "distinct 4-grams in samples", ".3f"),
    ("distinct_4grams_validation", "distinct 4-grams in as much validation text", ".3f"),
    ("chars_per_second", "characters written per second", ".1f"),
    ("sample_seconds_per_64", "sampling seconds per 64 images", ".2f"),
    ("reference_fid", "classifier-FID train vs validation (floor)", ".3f"),
]
CHART_KEYS = ["classifier_fid", "kid", "precision", "recall", "density", "coverage", "class_entropy", "bits_per_dim"]


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if fmt == "d":
        return f"{int(value):d}"
    return format(value, fmt)


def results_table(results: list[dict[str, Any]]):
    """One column per run, one row per metric: the table of ``genai evaluate``."""
    from rich.table import Table

    table = Table(title="genai evaluate", caption="classifier-FID is measured in the toolkit's evaluator network; "
                  "it is not comparable to Inception FID")
    table.add_column("metric")
    for r in results:
        table.add_column(Path(r["run"]).name, justify="right")
    head = [("family", lambda r: r["family"]), ("dataset", lambda r: r["dataset"]), ("step", lambda r: str(r["step"])),
            ("samples", lambda r: str(r.get("n_samples", "-"))),
            ("evaluator", lambda r: Path(r["evaluator"]).parent.parent.name if r.get("evaluator") else "-"),
            ("evaluator accuracy", lambda r: _fmt(r.get("evaluator_accuracy"), ".4f"))]
    head.append(("likelihood", lambda r: r.get("likelihood", "-")))
    for label, get in head:
        table.add_row(label, *[get(r) for r in results])
    known = {key for key, _, _ in ROWS}
    for key, label, fmt in ROWS:
        if any(key in r["metrics"] for r in results):
            table.add_row(label, *[_fmt(r["metrics"].get(key), fmt) for r in results])
    if any("class_histogram" in r for r in results):
        table.add_row("class histogram", *[" ".join(map(str, r.get("class_histogram") or [])) or "-" for r in results])
    extra = sorted({k for r in results for k in r["metrics"] if k not in known and k != "kid_std"})
    for key in extra:
        table.add_row(key.replace("_", " "), *[_fmt(r["metrics"].get(key), ".5g") for r in results])
    return table


def calibration_table(report: dict[str, Any]):
    """Before and after on the held-out half of the validation split; the caption says which images were which."""
    from rich.table import Table

    table = Table(title=f"temperature scaling: {report['run']}",
                  caption=f"T fitted on {report['fit_images']} validation images; NLL and ECE measured on the other "
                          f"{report['held_out_images']} (held out; split seed {report['split_seed']})")
    for col in ("held-out half", "before (T = 1)", f"after (T = {report['temperature']:.4f})"):
        table.add_column(col, justify="right")
    table.add_row("NLL, nats per prediction", f"{report['nll_before']:.5f}", f"{report['nll_after']:.5f}")
    table.add_row(f"ECE ({ECE_BINS} bins)", f"{report['ece_before']:.5f}", f"{report['ece_after']:.5f}")
    return table


def comparison_chart(results: list[dict[str, Any]], path: Path) -> Path:
    """One bar chart per metric that any run has, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CHART_KEYS if any(k in r["metrics"] for r in results)]
    if not keys:
        raise GenaiError("none of the runs has a metric to chart")
    names = [Path(r["run"]).name for r in results]
    labels = {key: label for key, label, _ in ROWS}
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        values = [r["metrics"].get(key, np.nan) for r in results]
        ax.bar(range(len(names)), values, color=[colours[i % len(colours)] for i in range(len(names))])
        ax.set_title(labels.get(key, key), fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_json(results: list[dict[str, Any]]) -> str:
    """One object for one run, a list for several; non-finite numbers become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    data = clean(results)
    return json.dumps(data[0] if len(data) == 1 else data, indent=2)
