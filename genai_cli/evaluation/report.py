"""What ``genai evaluate`` and ``genai inspect`` show: the results table, the calibration table and its reliability
diagram, the comparison bar chart, the history of the classes in the training grids, the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GenaiError
from ..runs import save_figure
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
    ("bits_per_dim_stderr", "bits/dim standard error (an estimate's)", ".4f"),
    ("bits_per_char", "bits/character (validation)", ".4f"),
    ("distinct_2grams", "distinct 2-grams in samples", ".3f"),
    ("distinct_4grams", "distinct 4-grams in samples", ".3f"),
    ("distinct_4grams_validation", "distinct 4-grams in as much validation text", ".3f"),
    ("chars_per_second", "characters written per second", ".1f"),
    ("sample_seconds_per_64", "sampling seconds per 64 images", ".2f"),
    ("reference_fid", "classifier-FID train vs validation (floor)", ".3f"),
]
CHART_KEYS = ["classifier_fid", "kid", "precision", "recall", "density", "coverage", "class_entropy", "bits_per_dim"]
# The figures genai inspect names of a run's newest evaluation, by their ROWS label up to its first parenthesis.
HEADLINE_KEYS = ["classifier_fid", "kid", "precision", "recall", "coverage", "bits_per_dim", "bits_per_char",
                 "distinct_4grams"]


def evaluation_summary(records: list[dict[str, Any]]) -> str:
    """'classifier-FID 11.2, KID 0.9, ... (1000 samples at step 910, seed 0; guidance=1.5) (newest of 3)' from a run's
    genai evaluate records of metrics.jsonl."""
    r = records[-1]
    names = {key: label.split(" (")[0] for key, label, _ in ROWS}
    said = ", ".join(f"{names[key]} {r[key]:.4g}" for key in HEADLINE_KEYS if isinstance(r.get(key), (int, float)))
    where = (f"{r['n_samples']} samples at step {r['step']}, seed {r['seed']}" if "n_samples" in r
             else f"step {r['step']}")
    options = r.get("sample_options") or {}
    where += f"; {', '.join(f'{k}={v}' for k, v in options.items())}" if options else ""
    return f"{said} ({where})" + (f" (newest of {len(records)})" if len(records) > 1 else "")


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_grids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's ``"split": "samples"`` records (the evaluator's reading of each training grid), in step order."""
    grids = [r for r in rows if r.get("split") == "samples" and r.get("class_histogram")]
    return sorted(grids, key=lambda r: r["step"])


def draw_class_shares(ax, grids: list[dict[str, Any]], colorbar: bool = True):
    """A heat map of the class shares of each grid on ``ax``: one column per grid, one row per class. A collapsed
    generator is one bright row, a mode-hopping one a bright cell that moves from row to row."""
    steps = [r["step"] for r in grids]
    counts = np.array([r["class_histogram"] for r in grids], dtype=float)  # (grids, K)
    shares = counts / counts.sum(1, keepdims=True).clip(min=1)
    image = ax.imshow(shares.T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int)
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_yticks(range(shares.shape[1]))
    ax.set_xlabel("step")
    ax.set_ylabel("class (evaluator)")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="share of the grid", fraction=0.04)
    return image


def class_history_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """The classes of the training grids over the steps: the class-share heat map (``draw_class_shares``), and
    below it the classes present and the mean confidence. None when the run has no scored grids."""
    grids = sample_grids(rows)
    if not grids:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in grids]
    k = len(grids[0]["class_histogram"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.2), height_ratios=[2.2, 1])
    draw_class_shares(top, grids)
    top.set_title(f"classes of each training grid ({sum(grids[-1]['class_histogram'])} samples)", fontsize=10)
    bottom.plot(steps, [r.get("classes_present") for r in grids], "o-", ms=3, label="classes present")
    bottom.set_ylim(0, k + 0.5)
    bottom.set_ylabel("classes")
    bottom.set_xlabel("step")
    conf = bottom.twinx()
    conf.plot(steps, [r.get("mean_confidence") for r in grids], "s--", ms=3, color="tab:orange",
              label="mean confidence")
    conf.set_ylim(0, 1.05)
    conf.set_ylabel("mean confidence")
    lines = bottom.get_lines() + conf.get_lines()
    bottom.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)  # atomically: inspect keeps a picture newer than metrics.jsonl
    plt.close(fig)
    return path


def draw_reliability(ax, hist, bins: dict[str, Any], label: str, legend: bool = True) -> None:
    """One reliability diagram (Guo et al. 2017, fig. 1) on ``ax``: the accuracy of each confidence bin as a bar
    against the diagonal of perfect calibration, the gap to the bin's mean confidence shaded (above the bar:
    over-confidence); ``hist`` gets the share of predictions per bin. ``bins``: ``reliability_bins`` output, plus an
    optional "ece" shown in the title."""
    edges = np.array(bins["edges"])
    width = np.diff(edges)
    acc = np.array([np.nan if a is None else a for a in bins["accuracy"]])
    conf = np.array([np.nan if c is None else c for c in bins["confidence"]])
    count = np.array(bins["count"], dtype=float)
    ax.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", edgecolor="black", color="tab:blue",
           label="accuracy")
    gap = np.where(np.isnan(acc), 0, conf - acc)
    ax.bar(edges[:-1], gap, bottom=np.nan_to_num(acc), width=width, align="edge", color="tab:red", alpha=0.35,
           edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ece = bins.get("ece")
    ax.set_title(label + (f"\nECE {ece:.4f}" if ece is not None else ""), fontsize=9)
    if legend:
        ax.legend(fontsize=7, loc="upper left")
    hist.bar(edges[:-1], count / max(count.sum(), 1), width=width, align="edge", color="grey")
    hist.set_xlim(0, 1)
    hist.set_xlabel("confidence")


def reliability_diagram(panels: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """Reliability diagrams side by side, one per panel ({label: ``reliability_bins`` output + optional "ece"}), the
    share of predictions per confidence bin beneath each."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(panels), figsize=(3.4 * len(panels), 4.6), squeeze=False,
                             height_ratios=[3, 1])
    for col, (label, bins) in enumerate(panels.items()):
        draw_reliability(axes[0, col], axes[1, col], bins, label, legend=col == 0)
    axes[0, 0].set_ylabel("accuracy")
    axes[1, 0].set_ylabel("share")
    if title:
        fig.suptitle(title, fontsize=10)
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
