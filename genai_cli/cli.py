"""The thin command line: parse options, call one function, print with rich.

Every user mistake surfaces as one line on stderr ("error: ..."), exit code 2, and no traceback.
The module imports only typer, rich and the standard library, so that ``genai --help`` and shell completion
start fast: each command imports torch and the package's heavy modules inside its body.
"""

from __future__ import annotations

import functools
import os
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import GenaiError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, sample and inspect generative image models from one YAML config each.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# Options several commands share, spelled and explained the same everywhere.
RUNS_DIR_HELP = "Folder of runs (default: $GENAI_RUNS_DIR or ./runs)."
DEVICE_HELP = "auto (CUDA, then MPS, then the CPU), cpu, cuda or mps."


def fail(message: str, code: int = 2):
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def one_line_errors(fn):
    """Turn GenaiError into one line on stderr with a non-zero exit code.

    Also registers the model families (importing torch) once a command runs: after option parsing, so that
    --help and completion never pay for it, and before the body, which may look families up by name."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            from . import models  # noqa: F401  (registers every family)

            return fn(*args, **kwargs)
        except GenaiError as e:
            fail(str(e))

    return wrapper


# -- train --------------------------------------------------------------------------------------
@app.command()
@one_line_errors
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML config (optional with --resume)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set train.epochs=3"),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the config's name, or "
                                       "<config>-<time> when that run exists)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue this run (folder or name)."),
    force: bool = typer.Option(False, "--force", help="Start over on an existing name (old run moved aside)."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_DIR_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    nproc: int = typer.Option(1, "--nproc", help="Data-parallel processes on this machine (starts torchrun; "
                              "one per GPU on CUDA). train.batch_size stays the global batch."),
):
    """Train a model from CONFIG, writing a run folder with checkpoints, metrics and sample grids."""
    from . import distributed
    from .config import load_config
    from .runs import runs_dir as resolve_runs_dir
    from .session import resume_point

    root = resolve_runs_dir(runs_dir)
    point = None
    if resume is not None:
        point = resume_point(resume, root, config=config, overrides=set_)
        cfg = point.config
    elif config is None:
        raise GenaiError("give a config to train (e.g. genai train configs/quickstart.yaml) or --resume RUN")
    else:
        cfg = load_config(config, set_)
    if print_config:
        out.print(cfg.to_yaml(), markup=False)
        return
    if nproc != 1:
        from .session import launch

        raise typer.Exit(launch(
            nproc, cfg, root, name=name, force=force, resuming=point.run if point else None,
            args=["train", *([str(config)] if config is not None else []), *[a for s in set_ for a in ("--set", s)],
                  *(["--name", name] if name else []), *(["--resume", resume] if resume else []),
                  *(["--force"] if force else []), "--runs-dir", str(root), *(["--quiet"] if quiet else [])]))
    from .hardware import describe_threads
    from .session import resume_run, start_run

    together = False  # every rank ends at the same step (finished or an agreed stop): they leave at a barrier
    try:
        if point is None:
            trainer = start_run(cfg, root, name=name, stem=Path(config).stem, force=force, quiet=quiet, console=out)
        else:
            trainer = resume_run(point, quiet=quiet, console=out)
        ctx = distributed.context()
        talk = out if ctx.is_main else Console(quiet=True)
        processes = f" x {ctx.world_size} processes" if ctx.enabled else ""
        counted = trainer.summary.get("thread_probe")
        cut = describe_threads(counted) if counted else ""
        talk.print(f"run [bold]{trainer.run_dir}[/] | family {cfg.family} | data {cfg.data.name} "
                   f"{trainer.data.spec.describe_data()} | "
                   f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters "
                   f"| device {trainer.device} | precision {trainer.precision.describe()}{f' | {cut}' if cut else ''}"
                   f"{processes} | steps {trainer.step}->{trainer.total_steps}")
        try:
            result = trainer.fit()
        except KeyboardInterrupt:
            together = True  # every rank stopped after the same step
            if ctx.is_main:
                err.print(f"interrupted at step {trainer.step}; checkpoint saved; continue with: "
                          f"genai train --resume {trainer.run_dir}", markup=False)
            raise typer.Exit(130) from None
        together = True
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rate = trainer.data.spec.describe_rate  # the run's unit: img/s, tokens/s
        talk.print("done: " + ", ".join(rate(v) if k == "images_per_sec" else f"{k} {v:.4g}" for k, v in shown.items()))
        talk.print(f"samples: {trainer.run_dir / 'samples'} | next: genai sample {trainer.run_dir}")
    except GenaiError:
        if not distributed.context().is_main:
            # From here on every rank fails alike (rank 0's errors are shared, losses averaged): rank 0 says it.
            raise typer.Exit(2) from None
        raise
    finally:
        distributed.shutdown(together=together)


# -- sample -------------------------------------------------------------------------------------
def parse_temperature(value: Any, family: str, cls, ckpt: Path, step: int) -> Any:
    """A number, or 'calibrated': the temperature fitted by genai evaluate --calibrate for this checkpoint.
    (For a family without a temperature the value is passed on, for the sampler to refuse --temperature.)"""
    if "temperature" not in cls.sample_options:
        return value
    if isinstance(value, str) and value.strip().lower() == "calibrated":
        if not cls.discrete:
            raise GenaiError(f"--temperature calibrated needs a family that samples from logits genai evaluate "
                             f"--calibrate can fit; family '{family}' takes a number")
        from .evaluation.calibrate import calibrated_temperature

        return calibrated_temperature(ckpt, int(step))
    try:
        return float(value)
    except (TypeError, ValueError):
        raise GenaiError(f"--temperature must be a number or 'calibrated', got '{value}'") from None


def sampling_flags(fn, rows=None):
    """Give ``fn(..., **options)`` one Typer option per row of genai_cli/options.py (the sampling options and the
    modes; ``rows``: those only), so a new option needs no edit here: the flags, their help and their types come
    from the table."""
    import inspect

    from .options import OPTIONS

    sig = inspect.signature(fn)
    fixed = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added, hints = [], {}
    for o in OPTIONS if rows is None else rows:
        if o.type is bool:
            default, hint = typer.Option(False, o.cli_flag, help=o.help), bool
        else:
            default, hint = typer.Option(None, o.cli_flag, help=o.help), Optional[o.cli_type or o.type]
        added.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint))
        hints[o.name] = hint
    fn.__signature__ = sig.replace(parameters=[*fixed, *added])
    fn.__annotations__ = {**{k: v for k, v in typing.get_type_hints(fn).items()}, **hints}
    return fn


def drawing_flags(fn):
    """``sampling_flags`` without the modes and --label: the options of a plain draw of every class, as ``genai
    evaluate`` measures one."""
    from .options import OPTIONS

    return sampling_flags(fn, [o for o in OPTIONS if not o.mode and o.name != "labels"])


@app.command()
@one_line_errors
@sampling_flags
def sample(
    target: Optional[str] = typer.Argument(None, help="Run folder, run name or checkpoint (default: newest run)."),
    n: Optional[int] = typer.Option(None, "-n", help="Number of images (default: the config's sample.n); per row "
                                    "with --sweep (default 8); walks draw rows of 8 (n <= 8: one row of n)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: the config's sample.seed)."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .png grid or .npz array file."),
    sweep: list[str] = typer.Option([], "--sweep", help="Mode: one labelled row per value, e.g. "
                                    "--sweep temperature=0.5,1,1.5 (several --sweep: every combination)."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the raw weights instead of their moving average."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_DIR_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
    **flags: Any,
):
    """Draw images from a trained model into a PNG grid (or an .npz of raw images); texts from a text run (printed,
    and written to a .txt).

    One mode at a time: plain samples (default), --sweep, --prefix-rows, --mask, or a latent walk (--interpolate,
    --traverse, --traverse-dim). Options a family or a mode cannot honour are refused."""
    from . import generate as gen
    from .api import model_from_state
    from .config import from_dict
    from .export import load_target
    from .hardware import following_load, pick_device
    from .runs import run_of_checkpoint
    from .runs import runs_dir as resolve_runs_dir

    ckpt, state = load_target(target, resolve_runs_dir(runs_dir), use_ema=not no_ema)  # a run, checkpoint or export
    model = model_from_state(state, use_ema=not no_ema)
    cfg = from_dict(state["config"], source=str(ckpt))

    def temp(value: Any) -> Any:
        return parse_temperature(value, state["family"], type(model), ckpt, state["step"])

    from .options import MODE_KEYS

    # A flag left off is None (False for a switch): not given.
    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    options = {k: temp(v) if k == "temperature" else v for k, v in given.items() if k not in MODE_KEYS}
    sweeps = [(k, tuple(temp(v) if k == "temperature" else v for v in values))
              for k, values in gen.parse_sweeps(sweep)]
    mode = gen.select_mode(sweeps=sweeps, **{k: v for k, v in given.items() if k in MODE_KEYS})
    request = gen.SampleRequest(mode=mode, n=n, seed=seed, options=options,
                                defaults={"n": cfg.sample.n, "seed": cfg.sample.seed, **cfg.sample.options()})
    plan = gen.plan(model, request)  # every refusal happens here, before any work
    run = run_of_checkpoint(ckpt)
    suffix = model.spec.sample_suffix
    out_file = gen.check_out_path(out_path or (run / "samples" if run else Path(".")) / f"sample_{plan.seed}{suffix}",
                                  plan.mode, model.spec)
    dev = pick_device(device, "--device")
    images = gen.validation_images(cfg.data, plan.real_images) if plan.real_images else None
    # Fewer CPU threads while another process holds a core.
    with following_load(dev, say=(lambda line: None) if quiet else (lambda line: err.print(line, markup=False))):
        samples = gen.draw(model, request, images=images, device=dev)
    samples.save(out_file)
    if not quiet:
        if samples.texts is not None:
            out.print(samples.text(), markup=False, highlight=False, soft_wrap=True)
        nfe = samples.network_evaluations
        passes = f", {nfe} network evaluations per sample" if nfe and nfe > 1 else ""
        out.print(f"wrote {out_file} ({samples.describe()}, seed {plan.seed}{passes})", markup=False)


# -- export -------------------------------------------------------------------------------------
@app.command()
@one_line_errors
def export(
    target: Optional[str] = typer.Argument(None, help="Run folder, run name or checkpoint (default: newest run)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="The folder to write (new or empty)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export in --out."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_DIR_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
):
    """Write a run as a model folder anyone can load: model.safetensors (the EMA weights, no optimizer, no pickle),
    config.json (config, data spec, lineage, sha256 of every file), its parents' weights and a README.md model card.
    genai sample DIR and genai_cli.load_pretrained(DIR) load it."""
    from .export import export_run
    from .runs import runs_dir as resolve_runs_dir

    if out_dir is None:
        raise GenaiError("give the folder to write: genai export RUN --out DIR")
    done = export_run(target, out_dir, root=resolve_runs_dir(runs_dir), force=force)
    if not quiet:
        lineage = f", {done.parents} parent run(s) under parents/" if done.parents else ""
        shown = f", samples {done.sample}" if done.sample else ""
        out.print(f"wrote {done.path}: {len(done.files)} files checked by sha256{lineage}, README.md{shown} | "
                  f"next: genai sample {done.path}", markup=False)


# -- inspect ------------------------------------------------------------------------------------
def parameter_table(model) -> Table:
    table = Table(title="parameters per module")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    for name, child in model.named_children():
        table.add_row(name, f"{sum(p.numel() for p in child.parameters()):,}")
    table.add_row("[bold]total", f"[bold]{sum(p.numel() for p in model.parameters()):,}")
    return table


def config_table(cfg_dict: dict[str, Any]) -> Table:
    table = Table(title="config")
    table.add_column("key")
    table.add_column("value")
    for section, values in cfg_dict.items():
        for k, v in values.items():
            table.add_row(f"{section}.{k}", str(v))
    return table


def human_size(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1024:
            return f"{num:.0f} {unit}"
        num /= 1024
    return f"{num:.1f} TB"


def write_loss_curve(rows: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    from .runs import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("split") == "val" and r.get("val_loss") is not None]
    if not train and not val:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


@app.command()
@one_line_errors
def inspect(
    target: Optional[str] = typer.Argument(None, help="Run, checkpoint, export or YAML config (default: newest "
                                           "run)."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_DIR_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " Encodes the latent-space plot."),
):
    """Tell what a run, checkpoint, export or config is, how big, how training went and where its files are."""
    from rich.markup import escape

    from .api import build_model, model_from_state
    from .capabilities import has
    from .config import load_config
    from .data import peek_spec
    from .export import load_target
    from .hardware import pick_device
    from .lineage import describe as describe_lineage
    from .lineage import frozen_parameters
    from .runs import MetricsLog, run_of_checkpoint, up_to_date
    from .runs import runs_dir as resolve_runs_dir

    dev = pick_device(device, "--device")  # an unavailable device is refused whatever the target
    if target is not None and Path(target).suffix in (".yaml", ".yml"):
        cfg = load_config(target)
        spec = peek_spec(cfg.data)
        model = build_model(cfg.family, cfg.model, spec, root=resolve_runs_dir(runs_dir))  # resolves its parents
        out.print(f"[bold]{target}[/]: family [bold]{cfg.family}[/], data {cfg.data.name} {spec.describe_data()}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters (not trained)")
        for line in describe_lineage(Path(target).stem, model.parents.resolved):
            out.print(f"builds on: {line}", markup=False)
        out.print(parameter_table(model))
        out.print(config_table(cfg.to_dict()))
        return
    ckpt, state = load_target(target, resolve_runs_dir(runs_dir))  # a run, checkpoint or genai export
    model = model_from_state(state)
    cfg = state["config"]
    summary = state.get("summary") or {}
    table = Table(title=f"{ckpt}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("family", state["family"])
    table.add_row("dataset", f"{cfg['data']['name']} {model.spec.describe_data()}")
    vocab = getattr(model.spec, "vocab", None)
    if vocab is not None:
        more = " ..." if len(vocab) > 60 else ""
        table.add_row("vocabulary", escape(f"{len(vocab)} characters: {vocab[:60]!r}{more}"))
    frozen = frozen_parameters(model)
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}"
                  + (f" (+ {frozen:,} frozen in the runs it builds on)" if frozen else ""))
    if model.parents:  # this run <- parent run @ step, hash; a parent's own parents indented below it
        this = run_of_checkpoint(ckpt)
        lines = describe_lineage(this.name if this is not None else state.get("name") or ckpt.name,
                                 model.parents.resolved)
        table.add_row("lineage", escape("\n".join(lines)))
    table.add_row("steps trained", f"{state['step']:,}" + (" (finished)" if summary.get("finished") else ""))
    table.add_row("time spent", f"{state.get('elapsed_seconds', 0):.0f} s training"
                  + (f", {model.spec.describe_rate(summary['images_per_sec'])}" if "images_per_sec" in summary else ""))
    table.add_row("precision", f"{cfg['train'].get('precision', 'fp32')}"
                  + (f" -> {summary['precision']}" if "precision" in summary else ""))
    for key in ("first_loss", "last_loss", "best_val_loss"):
        if key in summary:
            table.add_row(key.replace("_", " "), f"{summary[key]:.5g}")
    for key, value in summary.items():
        if key.startswith("last_val_") and key != "last_val_loss" and isinstance(value, (int, float)):
            table.add_row(key[5:].replace("_", " "), f"{value:.5g}")
    table.add_row("saved", str(state.get("saved_at", "?")))
    run = run_of_checkpoint(ckpt)
    if run is not None:
        ckpts = sorted((run / "checkpoints").glob("*.pt"))
        table.add_row("checkpoints", ", ".join(f"{p.name} ({human_size(p.stat().st_size)})" for p in ckpts))
        grids = sorted((run / "samples").glob("*.png"))
        if grids:
            table.add_row("grids", f"{len(grids)} in {run / 'samples'}, newest {grids[-1].name}")
        rows = MetricsLog(run / "metrics.jsonl").read()
        train_losses = [r["loss"] for r in rows if r.get("split") == "train" and r.get("loss") is not None]
        if train_losses:
            table.add_row("logged train loss", f"first {train_losses[0]:.5g}, last {train_losses[-1]:.5g}, "
                          f"best {min(train_losses):.5g} ({len(train_losses)} records)")
        probes = [r for r in rows if r.get("split") == "thread_probe"]
        if probes:
            table.add_row("CPU threads", threads_history(probes))
        evaluations = [r for r in rows if r.get("split") == "evaluate"]
        if evaluations:
            from .evaluation.report import evaluation_summary

            table.add_row("evaluated", escape(evaluation_summary(evaluations)))
        # The curve is drawn again only when metrics.jsonl changed after it: matplotlib costs ~0.5 s of start-up.
        curve = run / "loss_curve.png"
        if up_to_date(curve, run / "metrics.jsonl") or (os.access(run, os.W_OK) and write_loss_curve(rows, curve)):
            table.add_row("loss curve", str(curve))
        history = class_history(model, cfg, rows, run)
        if history is not None:
            table.add_row("class history", escape(history))
        table.add_row("metrics", str(run / "metrics.jsonl"))
        if has(model, "encode") and os.access(run, os.W_OK):
            from .config import from_dict
            from .data import load_data, to_float
            from .evaluation.latent_plot import plot_latents

            model.to(dev)
            data = load_data(from_dict(cfg, source=str(ckpt)).data)
            k = min(2000, data.val_x.shape[0])
            path = plot_latents(model, to_float(data.val_x[:k]), data.val_y[:k], run / "latents_pca.png")
            table.add_row("latent space", f"{path} (PCA of {k} validation latents, coloured by class)")
    if vocab is not None and model.generative:
        table.add_row("a sample", escape(text_sample(model, cfg, dev)))
    out.print(table)
    out.print(parameter_table(model))
    out.print(config_table(cfg))


def threads_history(probes: list[dict[str, Any]], shown: int = 4) -> str:
    """'2 of 2 at the start; 1 from step 142, 2 from step 430' from a run's thread_probe records (its start's, then
    each change of the count as it followed the load: hardware.LoadFollower)."""
    first, changes = probes[0], probes[1:]
    said = f"{first['threads']:.0f} of {first['of_threads']:.0f} at the start"
    if changes:
        said += "; " + ", ".join(f"{r['threads']:.0f} from step {r['step']}" for r in changes[:shown])
        said += f" and {len(changes) - shown} more changes" if len(changes) > shown else ""
    return said + " (measured, following the load)" if first.get("follow") else said + " (measured)"


def class_history(model, cfg: dict[str, Any], rows: list[dict[str, Any]], run: Path) -> str | None:
    """What inspect says of the classes of a run's training grids: the picture of their history
    (class_history.png, beside loss_curve.png), or one line on how to get the evaluator that scores them.
    None for runs it does not apply to (text, unlabelled data, helper networks)."""
    from .config import from_dict
    from .evaluation.evaluator import evaluator_command, find_evaluator
    from .evaluation.report import class_history_chart
    from .runs import up_to_date

    if not model.generative or not model.spec.scored_by_classes:
        return None
    path = run / "class_history.png"
    if not up_to_date(path, run / "metrics.jsonl"):  # drawn again only when the log changed after it
        path = class_history_chart(rows, path) if os.access(run, os.W_OK) else None
    if path is not None:
        return f"{path} (the evaluator's classes of each training grid)"
    if any(r.get("split") == "samples" and r.get("class_histogram") for r in rows):
        return "not drawn: the run folder is not writable"
    data_cfg = from_dict(cfg).data
    if find_evaluator(data_cfg, model.spec, run.parent) is None:
        command = evaluator_command(data_cfg, model.spec, run.parent, str(run))
        return f"none: no evaluator network scored the grids; make one with: {command} (then train again)"
    return f"none: the run trained before the evaluator under {run.parent} existed; train again to score its grids"


INSPECT_SAMPLE_CHARS = 160


def text_sample(model, cfg: dict, dev) -> str:
    """One short text drawn with the run's sampling defaults (seed 0), as inspect shows a text run."""
    from .config import from_dict
    from .generate import SampleRequest, draw

    options = {**from_dict(cfg).sample.options(), "max_new_tokens": INSPECT_SAMPLE_CHARS}
    return draw(model, SampleRequest(n=1, seed=0, options=options), device=dev).texts[0]


# -- evaluate -----------------------------------------------------------------------------------
SAMPLES_PER_RUN = 1000  # genai evaluate -n


@app.command()
@one_line_errors
@drawing_flags
def evaluate(
    targets: Optional[list[str]] = typer.Argument(None, help="Runs (folders, names or checkpoints) to measure and "
                                                  "compare (default: the newest run)."),
    n: Optional[int] = typer.Option(None, "-n", help=f"Samples drawn per run (default: {SAMPLES_PER_RUN})."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (default: the config's sample.seed)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout instead of a table."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Fit a temperature on half the validation split and "
                                   "measure it on the other half (families that predict categories); "
                                   "genai sample --temperature calibrated uses it."),
    train_evaluator: bool = typer.Option(False, "--train-evaluator", help="Train the evaluator network when none "
                                         "exists for the dataset (a quick run in the runs folder)."),
    evaluator: Optional[str] = typer.Option(None, "--evaluator", help="Evaluator run to measure samples in "
                                            "(default: the newest one trained on the same dataset)."),
    chart: Optional[Path] = typer.Option(None, "--chart", help="Bar-chart PNG of the runs' metrics "
                                         "(default with several runs: <runs dir>/comparison.png)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_DIR_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
    **flags: Any,
):
    """Measure samples offline (classifier-FID, KID, precision/recall/density/coverage, class histogram),
    bits/dim and diagnostics; or --calibrate a sampling temperature.

    The sampling options (--guidance, --steps, --sampler, --temperature, ...) replace the run's sample: defaults
    for this draw, e.g. to measure another guidance scale; they are recorded with the results."""
    from .evaluation import report
    from .options import flag_of
    from .runs import runs_dir as resolve_runs_dir

    root = resolve_runs_dir(runs_dir)
    targets = targets or [None]
    log = (lambda text: None) if quiet else (lambda text: err.print(text, markup=False))
    options = {k: v for k, v in flags.items() if v is not None and v is not False}  # the flags given
    if "temperature" in options:
        try:
            options["temperature"] = float(options["temperature"])
        except ValueError:
            raise GenaiError(f"genai evaluate --temperature takes a number, got '{options['temperature']}' (a "
                             f"calibrated one is measured by --calibrate)") from None
    if calibrate:
        given = [flag for flag, value in (("-n", n), ("--seed", seed), ("--evaluator", evaluator), ("--chart", chart),
                                          ("--train-evaluator", train_evaluator or None)) if value is not None]
        given += [flag_of(k) for k in options]
        if given:
            raise GenaiError(f"--calibrate fits a temperature on the validation split and draws no samples; "
                             f"it takes no {', '.join(given)}")
        from .evaluation.calibrate import calibrate_run
        from .registry import MODELS

        reports = [calibrate_run(t, root=root, device=device, log=log) for t in targets]
        if json_out:
            typer.echo(report.to_json(reports))  # plain stdout: rich would touch the text
            return
        for r in reports:
            out.print(report.calibration_table(r))
            hint = (f"; use it with: genai sample {r['run']} --temperature calibrated"
                    if "temperature" in MODELS.get(r["family"]).sample_options else "")
            out.print(f"saved to {r.get('saved_to', '(not saved: folder not writable)')}{hint}", markup=False)
            if "reliability_diagram" in r:
                out.print(f"reliability diagram: {r['reliability_diagram']}", markup=False)
        return
    from .evaluation.run import evaluate_run
    from .hardware import following_load, pick_device

    with following_load(pick_device(device, "--device"), say=log):  # fewer CPU threads while a core is busy
        results = [evaluate_run(t, root=root, n=SAMPLES_PER_RUN if n is None else n, seed=seed, device=device,
                                evaluator=evaluator, train_missing=train_evaluator, sample_options=options or None,
                                log=log, console=err)
                   for t in targets]
    chart_path = None
    if chart is not None or len(results) > 1:
        chart_path = report.comparison_chart(results, chart or root / "comparison.png")
    if json_out:
        typer.echo(report.to_json(results))
        return
    out.print(report.results_table(results))
    if chart_path is not None:
        out.print(f"bar chart: {chart_path}", markup=False)


# -- compare ------------------------------------------------------------------------------------
@app.command()
@one_line_errors
def compare(
    targets: list[str] = typer.Argument(..., help="Configs (.yaml, trained here) and runs (taken as they are)."),
    budget: str = typer.Option(..., "--budget", help="Training time per config: 90s, 3m, 1h (seconds of training "
                               "steps on the run's device)."),
    seeds: int = typer.Option(1, "--seeds", help="Training seeds per config (the spread over them: error bars, "
                              "collapsed and diverged shares)."),
    name: Optional[str] = typer.Option(None, "--name", help="Folder of the comparison under the runs folder (default: "
                                       "compare-<budget>); the same name resumes it."),
    n: int = typer.Option(500, "-n", help="Samples drawn per run to measure."),
    set_: list[str] = typer.Option([], "--set", help="Override a key of every config: --set data.limit=1000"),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of a table."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " Where members are measured."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_DIR_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
):
    """Train every config for the same budget (or take finished runs), measure them with one evaluator and write
    runs/<name>/report.md: quality, likelihood, sampling and training speed, stability over seeds."""
    from .compare import NUMERIC, TABLE, markdown_table, parse_budget, run_comparison, table_rows, to_json
    from .runs import runs_dir as resolve_runs_dir

    log = (lambda text: None) if quiet else (lambda text: err.print(text, markup=False))
    report = run_comparison(targets, budget=parse_budget(budget), root=resolve_runs_dir(runs_dir), seeds=seeds,
                            name=name, n=n, overrides=set_, device=device, log=log)
    if json_out:
        typer.echo(to_json(report))
        return
    out.print(markdown_table(TABLE, table_rows(report), NUMERIC), markup=False)  # 15 columns: wider than a terminal
    for why in report["left_out"]:
        out.print(f"left out: {why}", markup=False)
    out.print(f"report: {report['report']}", markup=False)


# -- list ---------------------------------------------------------------------------------------
def bundled_configs() -> list[Path]:
    seen: dict[str, Path] = {}
    for folder in (Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"):
        for p in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            seen.setdefault(p.name, p)
    return list(seen.values())


def runs_table(root: Path) -> Table | None:
    """The runs under ``root`` (newest first), read from their config.yaml: no checkpoint is loaded."""
    import yaml

    rows = []
    for run in root.iterdir() if root.is_dir() else []:
        last = run / "checkpoints" / "last.pt"
        if not (run / "config.yaml").is_file():
            continue
        try:
            raw = yaml.safe_load((run / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            raw = {}
        raw = raw if isinstance(raw, dict) else {}
        saved = last.stat().st_mtime if last.is_file() else None
        rows.append((saved or 0.0, run.name, str((raw.get("model") or {}).get("family", "?")),
                     str((raw.get("data") or {}).get("name", "?")), saved))
    if not rows:
        return None
    import time

    table = Table(title=f"runs in {root}")
    for col in ("run", "family", "dataset", "last checkpoint"):
        table.add_column(col)
    for _, name, family, dataset, saved in sorted(rows, reverse=True):
        table.add_row(name, family, dataset, time.strftime("%Y-%m-%d %H:%M", time.localtime(saved)) if saved
                      else "(none)")
    return table


LIST_PIPE_WIDTH = 160  # genai list's width when its output is not a terminal


@app.command("list")
@one_line_errors
def list_cmd(
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_DIR_HELP),
):
    """List model families, datasets, bundled configs and the runs in the runs folder."""
    import yaml

    from . import api  # noqa: F401  (registers the families)
    from .capabilities import CAPABILITIES, shown
    from .options import flag_of
    from .registry import DATASETS, MODELS
    from .runs import runs_dir as resolve_runs_dir

    # Piped (grep, less, a file), rich would lay the tables out in 80 columns; a terminal sets its own width.
    view = out if out.is_terminal else Console(highlight=False, soft_wrap=True, width=LIST_PIPE_WIDTH)
    table = Table(title="model families")
    for col in ("family", "data", "what", "sample options", "can"):
        table.add_column(col, overflow="fold")  # one name per line; a narrow terminal folds a long one, never cuts it
    kinds = {"image": "images", "tokens": "text"}
    for e in MODELS.entries():
        aliases = MODELS.aliases_of(e.name)
        name = e.name + (f"\n(was {', '.join(aliases)})" if aliases else "")
        table.add_row(name, ", ".join(kinds.get(k, k) for k in e.obj.modalities), e.summary,
                      "\n".join(flag_of(o) for o in sorted(e.obj.sample_options)), "\n".join(shown(e.obj)))
    view.print(table)
    table = Table(title="capabilities (the can column)")
    table.add_column("capability")
    table.add_column("gives")
    for c in CAPABILITIES.values():
        if not c.hook:
            table.add_row(c.name, c.summary)
    view.print(table)
    table = Table(title="datasets")
    table.add_column("dataset")
    table.add_column("what")
    for e in DATASETS.entries():
        table.add_row(e.name, e.summary)
    view.print(table)
    table = Table(title="bundled configs")
    for col in ("config", "family", "dataset"):
        table.add_column(col)
    for p in bundled_configs():
        try:
            raw = yaml.safe_load(p.read_text()) or {}
            shown = str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)
            table.add_row(shown, str((raw.get("model") or {}).get("family", "?")),
                          str((raw.get("data") or {}).get("name", "?")))
        except yaml.YAMLError:
            table.add_row(str(p), "(invalid YAML)", "")
    view.print(table)
    runs = runs_table(resolve_runs_dir(runs_dir))
    if runs is not None:
        view.print(runs)


def main() -> None:
    app(prog_name="genai")


if __name__ == "__main__":
    sys.exit(main())
