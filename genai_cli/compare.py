"""``genai compare``: the families side by side on one dataset, for the same training budget, measured by one evaluator.

    genai compare configs/compare/*.yaml --budget 2m [--seeds 3] [--name NAME] [--json]

Each argument is a config (trained here) or a run (taken as it is). A config trains for ``--budget`` seconds of
training steps (``train.max_seconds``: wall-clock seconds of optimizer steps on the run's device; validation, grids
and checkpoints are not counted; the cosine schedule is planned to end where the budget does), once per seed
(``train.seed`` + 0, 1, ...). Every member is an ordinary run under ``runs/<name>/``: ``<member>`` for the first
seed, ``<member>-seed<i>`` for the others, so it can be sampled and inspected like any run, and a killed comparison
resumes where it stopped (a finished run is reused, an unfinished one resumed from its last checkpoint, a measured
one not measured again: its numbers are kept in ``compare.json`` beside its checkpoints).

Parents (latent diffusion's autoencoder, MaskGIT's tokenizer, a student's teacher): a config's run reference that
names another member uses that member's first seed, trained first; one that names ``<config folder>/parents/<ref>.yaml``
has that config trained first, as ``runs/<name>/<ref>``, and the budget is shared: the parent trains for an equal
part of it and the member for the rest, so a member's whole training, parents included, costs one budget.

Every member is measured in the same evaluator network (the dataset's, found under ``runs/<name>/`` or the runs
folder, or trained into ``runs/<name>/`` first as ``genai evaluate --train-evaluator`` does): sample quality
(classifier-FID, confident share, coverage, classes covered), likelihood where the family has one (exact or a bound,
labelled, bits/dim), sampling speed (seconds per 64 samples at the member's own sampling settings, and network
evaluations per sample: ``GenerativeModel.network_evaluations``), training speed (images/s), and stability over the
seeds (the spread of classifier-FID, the share of seeds that collapsed or diverged, loss spikes).

What it writes in ``runs/<name>/``: ``report.md`` (the table, ``quality_vs_time.png``: classifier-FID against
sampling time, one point per member with error bars over seeds, and ``grids.png``: every member's samples under one
seed, a row each) and ``report.json`` (what ``--json`` prints).

Bad input is one line each and the rest goes on: a family with no sampler (the classifier), a member on another
dataset than the first, a config whose first step does not fit in the budget, a seed whose loss diverged.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, load_config, parent_refs
from .errors import GenaiError

GRID_SEED = 0  # every member's grid and evaluation samples are drawn from this seed
GRID_PER_MEMBER = 10  # images in each member's row of grids.png (one per class for 10-class conditional families)
SPIKE_WINDOW = 20  # a loss spike: a logged training loss above the median of the SPIKE_WINDOW before it ...
SPIKE_MADS = 5.0  # ... by more than this many median absolute deviations
MANIFEST = "compare.json"  # runs/<name>/compare.json: what the comparison was asked (the budget)
MEASURED = "compare.json"  # runs/<name>/<member>/compare.json: the member's measurement, reused when unchanged
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_budget(text: str | float) -> float:
    """'90s', '3m', '1.5h' or a number of seconds -> seconds (> 0); anything else is a one-line error."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h|sec|min)?\s*", str(text))
    if match is None or float(match.group(1)) <= 0:
        raise GenaiError(f"--budget must be a positive time such as 90s, 3m or 1h, got '{text}'")
    unit = (match.group(2) or "s")[0]
    return float(match.group(1)) * UNITS[unit]


def budget_label(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g} s"


@dataclass
class Member:
    """One argument of the comparison: a config to train (``cfg``) or a finished run taken as it is (``given``)."""

    name: str
    source: str  # the argument as given
    family: str
    cfg: Config  # the config (overrides applied) or the given run's own
    given: Path | None = None  # the run folder of a run taken as it is
    needs: list[str] = field(default_factory=list)  # members trained before this one (its parents)
    parent_configs: dict[str, Path] = field(default_factory=dict)  # parent run name -> its config, trained first
    runs: list[dict[str, Any]] = field(default_factory=list)  # one record per seed


def dataset_key(cfg: Config) -> tuple[str, int, int]:
    from .data import peek_spec

    spec = peek_spec(cfg.data)
    return cfg.data.name, spec.channels, spec.size


def describe_dataset(key: tuple[str, int, int]) -> str:
    return f"{key[0]} ({key[1]}x{key[2]}x{key[2]})"


def read_members(targets: list[str], root: Path, overrides: list[str], say: Callable[[str], None],
                 left_out: list[str]) -> list[Member]:
    """The members the arguments describe, in order; configs are loaded (a typo fails here, before any training).
    A family without a sampler and a member on another dataset than the first are left out, one line each."""
    from .registry import MODELS
    from .runs import load_checkpoint_file, resolve_checkpoint, run_of_checkpoint

    members: list[Member] = []
    first: tuple[str, int, int] | None = None
    for target in targets:
        path = Path(target)
        if path.suffix in (".yaml", ".yml"):
            cfg, given, stem = load_config(path, overrides), None, path.stem
        else:
            ckpt = resolve_checkpoint(target, root)
            run = run_of_checkpoint(ckpt)
            if run is None:
                raise GenaiError(f"'{target}' is a checkpoint outside a run folder; genai compare takes configs "
                                 f"(.yaml) and run folders or names")
            from .config import from_dict

            state = load_checkpoint_file(ckpt)
            cfg, given, stem = from_dict(state["config"], source=str(ckpt)), run, run.name
        if not MODELS.get(cfg.family).generative:
            left_out.append(f"{target}: family '{cfg.family}' draws no samples (it has no sampler); left out")
            say(left_out[-1])
            continue
        key = dataset_key(cfg)
        if first is None:
            first = key
        elif key != first:
            left_out.append(f"{target}: trained on {describe_dataset(key)}, the comparison is on "
                            f"{describe_dataset(first)}; left out (members must share a dataset)")
            say(left_out[-1])
            continue
        name, i = stem, 2
        while any(m.name == name for m in members):
            name, i = f"{stem}-{i}", i + 1
        members.append(Member(name, target, cfg.family, cfg, given))
    if not members:
        raise GenaiError("nothing to compare: " + ("; ".join(left_out) if left_out else "give configs or runs"))
    return members


def plan_parents(members: list[Member], compare_dir: Path, root: Path) -> list[Member]:
    """Each config's run references: another member (trained first), ``<config folder>/parents/<ref>.yaml`` (trained
    first under that name), or a run already there: in the comparison's folder, or in the runs folder (then the
    reference is made that run's path, as the member's runs resolve names in the comparison's folder). Returns the
    members in training order (parents first)."""
    by_name = {m.name: m for m in members}
    for m in members:
        if m.given is not None:
            continue
        for key in parent_refs(m.cfg.model):
            ref = getattr(m.cfg.model, key)
            if ref is None:
                continue
            ref = str(ref)
            candidate = Path(m.source).parent / "parents" / f"{ref}.yaml"
            if ref in by_name and ref != m.name:
                m.needs.append(ref)
            elif candidate.is_file():
                m.parent_configs[ref] = candidate
            elif "/" not in ref and not (compare_dir / ref).exists() and (root / ref).is_dir():
                setattr(m.cfg.model, key, str(root / ref))
    ordered: list[Member] = []

    def visit(m: Member, trail: tuple[str, ...]) -> None:
        if m in ordered:
            return
        if m.name in trail:
            raise GenaiError(f"members {' -> '.join((*trail, m.name))} build on each other in a circle")
        for dep in m.needs:
            visit(by_name[dep], (*trail, m.name))
        ordered.append(m)

    for m in members:
        visit(m, ())
    return ordered


# -- training ---------------------------------------------------------------------------------------------------------
def finished_state(run: Path) -> dict[str, Any] | None:
    """The last checkpoint of a run that finished its budget, or None (no checkpoint, or one mid-way)."""
    from .runs import load_checkpoint_file

    ckpt = run / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        return None
    state = load_checkpoint_file(ckpt)
    return state if (state.get("summary") or {}).get("finished") else None


class Diverged(Exception):
    """A seed's training stopped on a non-finite loss (or another error mid-training): recorded, not fatal."""


def train_budget(cfg: Config, compare_dir: Path, run_name: str, budget: float, seed: int,
                 say: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """Train (or resume, or reuse) ``compare_dir/run_name`` for ``budget`` seconds of training steps with
    ``train.seed = seed``. Returns (trained, resumed or reused; its last checkpoint's state). A GenaiError while
    starting is raised as it is; one while training (the loss became NaN) as ``Diverged``."""
    from rich.console import Console

    from .config import from_dict
    from .session import resume_point, resume_run, start_run

    run = compare_dir / run_name
    state = finished_state(run)
    if state is not None:
        return "reused", state
    silent = Console(quiet=True)
    if (run / "checkpoints" / "last.pt").is_file():
        say(f"{run_name}: resuming from its last checkpoint")
        trainer, status = resume_run(resume_point(str(run), compare_dir), quiet=True, console=silent), "resumed"
    else:
        raw = cfg.to_dict()
        raw["train"].update(max_seconds=budget, max_steps=10**9, seed=seed)
        cfg = from_dict(raw, source=f"{run_name} (genai compare)")
        say(f"{run_name}: training {cfg.family} for {budget_label(budget)} of steps (seed {seed})")
        # A folder without a checkpoint is a start killed before its first save: moved aside and started again.
        trainer = start_run(cfg, compare_dir, name=run_name, force=run.exists(), quiet=True, console=silent)
        status = "trained"
    try:
        trainer.fit()
    except GenaiError as e:
        raise Diverged(str(e)) from None
    return status, finished_state(run) or {}


def train_member(m: Member, compare_dir: Path, budget: float, seeds: int, overrides: list[str],
                 parents_done: dict[str, str | None], failed: set[str], left_out: list[str],
                 say: Callable[[str], None]) -> bool:
    """Train a member's parents (once) and its seeds; fill ``m.runs``. False (and a line in ``left_out``) when the
    member cannot be compared: a parent failed, a start failed, or its first step did not fit in the budget."""
    from .runs import load_checkpoint_file

    def leave(why: str) -> bool:
        left_out.append(f"{m.source}: {why}; left out")
        say(left_out[-1])
        failed.add(m.name)
        return False

    if m.given is not None:
        state = load_checkpoint_file(m.given / "checkpoints" / "last.pt")
        m.runs = [{"seed": m.cfg.train.seed, "status": "given", **train_record(m.given, state)}]
        return True
    for dep in m.needs:
        if dep in failed:
            return leave(f"it builds on member {dep}, which was left out")
    share = budget / (1 + len(m.parent_configs))  # a parent trained here takes an equal part of the budget
    for ref, path in m.parent_configs.items():
        if ref not in parents_done:
            try:
                parent_cfg = load_config(path, overrides)
                train_budget(parent_cfg, compare_dir, ref, share, parent_cfg.train.seed, say)
                parents_done[ref] = None
            except (GenaiError, Diverged) as e:
                parents_done[ref] = str(e)
        if parents_done[ref] is not None:
            return leave(f"its parent {ref} ({path}) did not train: {parents_done[ref]}")
    for i in range(seeds):
        run_name = m.name if i == 0 else f"{m.name}-seed{i}"
        seed = m.cfg.train.seed + i
        try:
            status, state = train_budget(m.cfg, compare_dir, run_name, share, seed, say)
        except Diverged as e:
            say(f"{run_name}: diverged: {e}")
            m.runs.append({"run": str(compare_dir / run_name), "seed": seed, "status": "diverged", "error": str(e)})
            continue
        except GenaiError as e:
            return leave(str(e))
        record = train_record(compare_dir / run_name, state)
        first = record["first_step_seconds"] if record["first_step_seconds"] is not None else record["train_seconds"]
        if first >= share:  # the loop checks the budget after a step: the first always runs
            return leave(f"its first training step took {first:.1f} s, more than the budget of "
                         f"{budget_label(share)}: no checkpoint within the budget (raise --budget or shrink the model)")
        say(f"{run_name}: {status}, {record['steps']} steps in {record['train_seconds']:.0f} s")
        m.runs.append({"seed": seed, "status": status, **record})
    return True


def loss_spikes(losses: list[float], window: int = SPIKE_WINDOW, mads: float = SPIKE_MADS) -> int:
    """Logged training losses above the median of the ``window`` before them by more than ``mads`` median absolute
    deviations (the deviation floored at 1 % of the median, so a flat stretch does not make every wiggle a spike)."""
    spikes = 0
    for i in range(window, len(losses)):
        before = losses[i - window:i]
        med = statistics.median(before)
        mad = max(statistics.median(abs(v - med) for v in before), 0.01 * abs(med), 1e-12)
        spikes += losses[i] > med + mads * mad
    return spikes


def train_record(run: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Steps, training seconds, images/s and loss spikes of a run, from its checkpoint and metrics.jsonl."""
    from .runs import MetricsLog

    rows = MetricsLog(run / "metrics.jsonl").read()
    losses = [r["loss"] for r in rows if r.get("split") == "train" and isinstance(r.get("loss"), (int, float))]
    steps, seconds = int(state.get("step", 0)), float(state.get("elapsed_seconds", 0.0))
    batch = int(state["config"]["train"]["batch_size"])
    first = next((r.get("elapsed_seconds") for r in rows if r.get("split") == "train" and r.get("step") == 1), None)
    return {"run": str(run), "steps": steps, "train_seconds": seconds, "first_step_seconds": first,
            "images_per_second": steps * batch / seconds if seconds > 0 else None,
            "loss_spikes": loss_spikes(losses), "logged_losses": len(losses)}


# -- measuring --------------------------------------------------------------------------------------------------------
def measure(run: Path, compare_dir: Path, *, n: int, evaluator: str, device: str,
            log: Callable[[str], None]) -> dict[str, Any]:
    """``genai evaluate``'s metrics of a run (``GRID_SEED``, the run's own sampling settings) plus its network
    evaluations per sample; kept in the run's compare.json and reused while the step, n and evaluator are the same."""
    from . import generate
    from .evaluation.run import evaluate_run, load_run

    cache = run / MEASURED
    key = {"step": None, "n": n, "seed": GRID_SEED, "evaluator": evaluator}
    ckpt, state, model, cfg, _ = load_run(str(run), compare_dir)
    key["step"] = int(state["step"])
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return saved["result"]
        except (json.JSONDecodeError, OSError, AttributeError):
            pass  # unreadable: measured again
    result = evaluate_run(str(run), root=compare_dir, n=n, seed=GRID_SEED, device=device, evaluator=evaluator,
                          log=log)
    result["sample_seed"] = result.pop("seed")  # the record's "seed" is the training seed
    p = generate.plan(model, generate.SampleRequest(n=1, options=cfg.sample.options()))
    result["network_evaluations"] = int(model.network_evaluations(p.options))
    result["parameters"] = sum(q.numel() for q in model.parameters())
    from .runs import write_text_atomically

    if os.access(run, os.W_OK):  # a run given as it is may be read-only: then it is measured again next time
        write_text_atomically(cache, json.dumps({"key": key, "result": result}, default=float))
    return result


def collapsed(metrics: dict[str, Any], classes: int) -> bool:
    """Mode collapse: the samples cover fewer than half the classes (a class is covered by >= 2 % of them)."""
    return metrics.get("classes_covered", classes) < classes / 2


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(member: Member, classes: int) -> dict[str, Any]:
    """One row of the table from a member's seed records."""
    runs = member.runs
    ok = [r for r in runs if "metrics" in r]
    s: dict[str, Any] = {"seeds": len(runs), "measured_seeds": len(ok)}
    for key in ("classifier_fid", "sample_seconds_per_64", "confident_share", "coverage", "classes_covered",
                "bits_per_dim", "precision", "recall"):
        s[key], s[f"{key}_std"] = mean_std([r["metrics"].get(key) for r in ok])
    for key in ("images_per_second", "steps", "train_seconds"):
        s[key], _ = mean_std([r.get(key) for r in runs])
    s["network_evaluations"] = ok[0]["network_evaluations"] if ok else None
    s["likelihood"] = ok[0].get("likelihood") if ok else None
    s["loss_spikes"] = sum(r.get("loss_spikes", 0) for r in runs)
    s["diverged_share"] = sum(r["status"] == "diverged" for r in runs) / len(runs) if runs else None
    s["collapsed_share"] = sum(collapsed(r["metrics"], classes) for r in ok) / len(ok) if ok else None
    return s


# -- the comparison ---------------------------------------------------------------------------------------------------
def check_manifest(compare_dir: Path, budget: float) -> None:
    """The budget a comparison folder was started with stays its budget: its finished members were trained for it."""
    path = compare_dir / MANIFEST
    if path.is_file():
        try:
            saved = float(json.loads(path.read_text())["budget_seconds"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError):
            saved = None
        if saved is not None and abs(saved - budget) > 1e-9:
            raise GenaiError(f"comparison '{compare_dir.name}' was trained with --budget {budget_label(saved)}; "
                             f"rerun with that budget to resume it, or give another --name")


def find_evaluator_run(cfg: Config, compare_dir: Path, root: Path, log: Callable[[str], None]) -> str:
    """The evaluator checkpoint of the members' dataset: one under the comparison's folder, else one under the runs
    folder, else one trained into the comparison's folder (then the members' training grids are scored too)."""
    from .data import peek_spec
    from .evaluation.evaluator import find_evaluator, resolve_evaluator

    spec = peek_spec(cfg.data)
    if not spec.scored_by_classes:
        raise GenaiError(f"genai compare measures samples in an evaluator network of a labelled image dataset; "
                         f"'{cfg.data.name}' is not one")
    found = find_evaluator(cfg.data, spec, compare_dir) or find_evaluator(cfg.data, spec, root)
    if found is None:
        found = Path(resolve_evaluator(None, cfg.data, spec, compare_dir, train_missing=True, log=log).source)
    return str(found)


def run_comparison(targets: list[str], *, budget: float, root: Path, seeds: int = 1, name: str | None = None,
                   n: int = 500, overrides: list[str] | None = None, device: str = "auto",
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train, measure and report (see the module doc). Returns the report (what ``report.json`` holds)."""
    from .data import peek_spec
    from .hardware import machine_line, pick_device
    from .runs import write_text_atomically

    if seeds < 1:
        raise GenaiError(f"--seeds must be at least 1, got {seeds}")
    if not targets:
        raise GenaiError("give the configs or runs to compare, e.g. genai compare configs/compare/*.yaml --budget 2m")
    dev = pick_device(device, "--device")
    name = name or f"compare-{budget:g}s"
    if "/" in name or name in ("", ".", ".."):
        raise GenaiError(f"--name '{name}' must be a plain folder name (no '/')")
    overrides = list(overrides or [])
    left_out: list[str] = []
    members = read_members(targets, root, overrides, log, left_out)
    compare_dir = root / name
    check_manifest(compare_dir, budget)
    members = plan_parents(members, compare_dir, root)
    compare_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(compare_dir / MANIFEST, json.dumps({"budget_seconds": budget, "targets": targets}))
    evaluator = find_evaluator_run(members[0].cfg, compare_dir, root, log)
    log(f"evaluator: {evaluator}")

    parents_done: dict[str, str | None] = {}
    failed: set[str] = set()
    kept: list[Member] = []
    for m in members:
        if not train_member(m, compare_dir, budget, seeds, overrides, parents_done, failed, left_out, log):
            continue
        for record in m.runs:
            if record["status"] != "diverged":
                log(f"{Path(record['run']).name}: measuring")
                record.update(measure(Path(record["run"]), compare_dir, n=n, evaluator=evaluator, device=device,
                                      log=log))
        kept.append(m)
    if not kept:
        raise GenaiError("nothing left to compare: " + "; ".join(left_out))
    classes = peek_spec(kept[0].cfg.data).num_classes
    report = {
        "name": name, "folder": str(compare_dir), "budget_seconds": budget, "seeds": seeds, "samples": n,
        "sample_seed": GRID_SEED, "dataset": describe_dataset(dataset_key(kept[0].cfg)), "machine": machine_line(),
        "device": str(dev), "evaluator": evaluator,
        "evaluator_accuracy": next((r.get("evaluator_accuracy") for m in kept for r in m.runs
                                    if r.get("evaluator_accuracy") is not None), None),
        "members": [{"member": m.name, "family": m.family, "source": m.source,
                     "budget_seconds": None if m.given is not None else budget / (1 + len(m.parent_configs)),
                     "parents": sorted({*m.parent_configs, *m.needs}), "summary": summarise(m, classes),
                     "runs": m.runs} for m in kept],
        "left_out": left_out,
    }
    write_report(report, compare_dir, dev)
    return report


# -- the report -------------------------------------------------------------------------------------------------------
def _num(value: Any, fmt: str, spread: Any = None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    text = format(value, fmt)
    return text + (f" ± {format(spread, fmt)}" if spread is not None else "")


def likelihood_kind(text: str | None) -> str:
    """evaluate's likelihood label in a word: exact, ELBO, bound or estimate (a flow's ODE + trace estimator)."""
    if not text:
        return ""
    for word, kind in (("exact", "exact"), ("ELBO", "ELBO"), ("bound", "bound")):
        if word in text:
            return kind
    return "estimate"


TABLE = ["member", "family", "parameters", "steps", "train img/s", "classifier-FID", "confident share", "coverage",
         "classes covered", "bits/dim", "s / 64 samples", "network evals / sample", "collapsed", "diverged",
         "loss spikes"]
NUMERIC = set(range(2, len(TABLE)))  # right-aligned columns


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in report["members"]:
        s = m["summary"]
        bpd = _num(s["bits_per_dim"], ".3f", s["bits_per_dim_std"])
        kind = likelihood_kind(s.get("likelihood"))
        seeds = s["seeds"]
        rows.append([
            m["member"], m["family"], _num(m["runs"][0].get("parameters"), ","), _num(s["steps"], ".0f"),
            _num(s["images_per_second"], ".0f"), _num(s["classifier_fid"], ".2f", s["classifier_fid_std"]),
            _num(s["confident_share"], ".2f"), _num(s["coverage"], ".2f"), _num(s["classes_covered"], ".1f"),
            f"{bpd} ({kind})" if kind else "-",
            _num(s["sample_seconds_per_64"], ".2f", s["sample_seconds_per_64_std"]),
            _num(s["network_evaluations"], "d"),
            f"{round((s['collapsed_share'] or 0) * seeds)}/{s['measured_seeds']}" if s["measured_seeds"] else "-",
            f"{round((s['diverged_share'] or 0) * seeds)}/{seeds}", str(s["loss_spikes"])])
    return rows


def markdown_table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A markdown table; the columns in ``right`` (default: all but the first) aligned right (the benchmarks' too)."""
    right = right if right is not None else set(range(1, len(header)))
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def quality_vs_time(report: dict[str, Any], path: Path) -> Path | None:
    """classifier-FID against seconds per 64 samples, one point per member, error bars over its seeds (log axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(m["member"], m["summary"]) for m in report["members"]
              if m["summary"]["classifier_fid"] is not None and m["summary"]["sample_seconds_per_64"] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (label, s) in enumerate(points):
        ax.errorbar(s["sample_seconds_per_64"], max(s["classifier_fid"], 1e-3), xerr=s["sample_seconds_per_64_std"],
                    yerr=s["classifier_fid_std"], fmt="o", capsize=4, color=f"C{i % 10}", label=label)
        ax.annotate(label, (s["sample_seconds_per_64"], max(s["classifier_fid"], 1e-3)), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling seconds per 64 samples (log)")
    ax.set_ylabel("classifier-FID (log; lower is better)")
    seeds = report["seeds"]
    ax.set_title(f"{report['dataset']}, {budget_label(report['budget_seconds'])} of training each"
                 + (f", error bars: std over {seeds} seeds" if seeds > 1 else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def member_grids(report: dict[str, Any], compare_dir: Path, device) -> Path | None:
    """Every member's first measured run drawn from ``GRID_SEED`` with its own sampling settings, one labelled row
    each (a conditional family draws the classes in turn), in one PNG."""
    from . import generate
    from .evaluation.run import load_run
    from .runs import labelled_grid

    rows, labels = [], []
    for m in report["members"]:
        run = next((r["run"] for r in m["runs"] if "metrics" in r), None)
        if run is None:
            continue
        _, _, model, cfg, _ = load_run(run, compare_dir)
        samples = generate.draw(model, generate.SampleRequest(n=GRID_PER_MEMBER, seed=GRID_SEED,
                                                              options=cfg.sample.options()), device=device)
        rows.append(samples.images.clamp(0, 1))
        labels.append(m["member"])
    if not rows:
        return None
    path = compare_dir / "grids.png"
    labelled_grid(rows, labels, path)
    return path


DEFINITIONS = f"""- **budget**: seconds of training steps (the loop's `train.max_seconds`: wall-clock time of optimizer
  steps on the run's device; validation, grids and checkpoints are not counted). A member whose parent was trained
  by the comparison spends an equal part of its budget on it.
- **classifier-FID**, **confident share** (samples the evaluator classifies with probability >= 0.9), **coverage**
  (Naeem et al. 2020), **classes covered** (classes holding >= 2 % of the samples): `genai evaluate`'s metrics, in the
  evaluator network's features (not comparable with Inception FID).
- **bits/dim**: exact for the autoregressive families, the ELBO for the VAE (a density: not comparable with discrete
  likelihoods), the variational bound for diffusion and the masked models, an estimate for flow matching (the ODE's
  change of variables with a Hutchinson trace, on dequantised pixels); `-` where the family has none.
- **s / 64 samples**: seconds to draw, at the member's own sampling settings (its config's `sample:`), per 64 samples;
  **network evals / sample**: passes through its networks to draw a batch (diffusion: its steps; autoregressive: one
  per pixel; MaskGIT: its filling steps and the decoder; a GAN or VAE: one).
- **collapsed**: seeds whose samples cover fewer than half the classes; **diverged**: seeds whose loss became
  non-finite; **loss spikes**: logged training losses more than {SPIKE_MADS:g} median absolute deviations above the
  median of the {SPIKE_WINDOW} logged before them, summed over seeds."""


def report_markdown(report: dict[str, Any], picture: Path | None, grids: Path | None) -> str:
    seeds = report["seeds"]
    lines = [f"# genai compare: {report['name']}", "",
             f"{len(report['members'])} members on {report['dataset']}, {budget_label(report['budget_seconds'])} of "
             f"training each, {seeds} seed{'s' if seeds > 1 else ''}; {report['samples']} samples per run (seed "
             f"{report['sample_seed']}), measured in the evaluator `{report['evaluator']}`"
             + (f" (validation accuracy {report['evaluator_accuracy']:.4f})" if report.get("evaluator_accuracy")
                else "") + ".", "", f"Machine: {report['machine']} | device {report['device']}", "",
             markdown_table(TABLE, table_rows(report), NUMERIC), ""]
    if seeds > 1:
        lines += ["Values are means over the seeds, ± their standard deviation.", ""]
    if picture is not None:
        lines += [f"![quality against sampling time]({picture.name})", ""]
    if grids is not None:
        lines += [f"![samples, seed {report['sample_seed']}, one row per member]({grids.name})", ""]
    if report["left_out"]:
        lines += ["Left out:", ""] + [f"- {why}" for why in report["left_out"]] + [""]
    lines += ["Members:", ""] + [
        f"- {m['member']}: {m['source']}" + (f", builds on {', '.join(m['parents'])}" if m["parents"] else "")
        + "; runs " + ", ".join(f"`{Path(r['run']).name}` ({r['status']})" for r in m["runs"]) for m in
        report["members"]] + ["", DEFINITIONS, ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], compare_dir: Path, device) -> None:
    """report.md, quality_vs_time.png, grids.png and report.json in the comparison's folder."""
    from .runs import write_text_atomically

    picture = quality_vs_time(report, compare_dir / "quality_vs_time.png")
    grids = member_grids(report, compare_dir, device)
    report["report"] = str(compare_dir / "report.md")
    write_text_atomically(compare_dir / "report.md", report_markdown(report, picture, grids))
    write_text_atomically(compare_dir / "report.json", to_json(report))


def to_json(report: dict[str, Any]) -> str:
    from .evaluation.report import to_json as results_json

    return results_json([report])  # one object; non-finite numbers become null
