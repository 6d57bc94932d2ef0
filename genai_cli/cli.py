"""The thin command line: parse options, call one function, print with rich.

Every user mistake surfaces as one line on stderr ("error: ..."), exit code 2, and no traceback.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
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

RUNS_DIR_HELP = "Folder of runs (default: $GENAI_RUNS_DIR or ./runs)."


def fail(message: str, code: int = 2):
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def one_line_errors(fn):
    """Turn GenaiError into one line on stderr with a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
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
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: <config>-<time>)."),
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
    from .config import apply_overrides, from_dict, load_config, load_yaml
    from .runs import check_writable, load_checkpoint_file, new_run, resolve_checkpoint
    from .runs import runs_dir as resolve_runs_dir

    root = resolve_runs_dir(runs_dir)
    run_path: Path | None = None
    if resume is not None:
        ckpt = resolve_checkpoint(resume, root)
        run_path = ckpt.parent.parent
        if not (run_path / "config.yaml").is_file():
            raise GenaiError(f"'{resume}' is not a run folder (no config.yaml); --resume takes a run, not a file")
        saved = load_yaml(run_path / "config.yaml")
        if config is not None:
            cfg = load_config(config, set_)
            if cfg.to_dict()["model"] != saved.get("model") or cfg.to_dict()["data"] != saved.get("data"):
                raise GenaiError(f"{config} describes another model or dataset than run '{run_path}'; "
                                 f"resume with --resume alone (and --set train.* to change training)")
        else:
            cfg = from_dict(apply_overrides(saved, set_), source=str(run_path / "config.yaml"))
    elif config is None:
        raise GenaiError("give a config to train (e.g. genai train configs/quickstart.yaml) or --resume RUN")
    else:
        cfg = load_config(config, set_)
    if print_config:
        out.print(cfg.to_yaml(), markup=False)
        return

    from .hardware import pick_device
    from .train import Trainer, write_text_atomically

    if nproc != 1:
        # Check here what would otherwise fail N times over in the N processes, then hand over to torchrun.
        if nproc < 1:
            raise GenaiError(f"--nproc must be at least 1, got {nproc}")
        if distributed.under_torchrun():
            raise GenaiError("--nproc starts torchrun; under torchrun leave it out (torchrun sets the processes)")
        distributed.check_batch(cfg.train.batch_size, cfg.train.grad_accum, nproc)
        device = pick_device(cfg.train.device)
        if device.type == "mps":
            raise GenaiError("--nproc on MPS is not supported; use --set train.device=cpu")
        if device.type == "cuda":
            import torch

            if nproc > torch.cuda.device_count():
                raise GenaiError(f"--nproc {nproc} asks for more GPUs than the {torch.cuda.device_count()} visible; "
                                 f"use --nproc {torch.cuda.device_count()} or --set train.device=cpu")
        if run_path is None:
            from .data import load_data

            load_data(cfg.data)
            if name is not None and (root / name).exists() and not force:
                new_run(root, name, "", force=False)  # an existing name: raises the usual one-line error
        else:
            check_writable(run_path)
        args = ["train", *([str(config)] if config is not None else []), *[a for s in set_ for a in ("--set", s)],
                *(["--name", name] if name else []), *(["--resume", resume] if resume else []),
                *(["--force"] if force else []), "--runs-dir", str(root), *(["--quiet"] if quiet else [])]
        raise typer.Exit(distributed.launch(nproc, args))

    data = None
    if run_path is None:
        from .data import load_data

        data = load_data(cfg.data)  # before creating the folder: a dataset that cannot be had leaves nothing
    ctx, _ = distributed.setup(pick_device(cfg.train.device))  # joins torchrun's processes, if any
    try:
        if run_path is None:

            def create() -> Path:
                try:
                    root.mkdir(parents=True, exist_ok=True)
                except PermissionError:
                    raise GenaiError(f"cannot create the runs folder '{root}': permission denied; use --runs-dir or "
                                     f"GENAI_RUNS_DIR to write elsewhere") from None
                return new_run(root, name, Path(config).stem, force=force)

            run_path = distributed.share_from_main(create)  # rank 0 names and makes the folder
            try:
                trainer = Trainer(cfg, run_path, data=data, quiet=quiet, console=out)
            except GenaiError:
                if ctx.is_main:  # nothing was trained: remove the empty folder we just made
                    for sub in ("checkpoints", "samples"):
                        (run_path / sub).rmdir()
                    run_path.rmdir()
                raise
            if ctx.is_main:
                write_text_atomically(run_path / "config.yaml", cfg.to_yaml(trainer.precision.describe()))
        else:
            distributed.share_from_main(lambda: check_writable(run_path))
            trainer = Trainer(cfg, run_path, quiet=quiet, console=out)
            trainer.load_state_dict(load_checkpoint_file(ckpt))  # every rank resumes from the same checkpoint
            if trainer.step >= trainer.total_steps:
                raise GenaiError(f"run '{run_path}' already trained {trainer.step} of {trainer.total_steps} steps; "
                                 f"raise the budget, e.g. --set train.epochs={cfg.train.epochs * 2}")
            if ctx.is_main:
                write_text_atomically(run_path / "config.yaml", cfg.to_yaml(trainer.precision.describe()))
        talk = out if ctx.is_main else Console(quiet=True)
        processes = f" x {ctx.world_size} processes" if ctx.enabled else ""
        talk.print(f"run [bold]{run_path}[/] | family {cfg.family} | data {cfg.data.name} {trainer.data.spec.shape} "
                   f"| {sum(p.numel() for p in trainer.model.parameters()):,} parameters | device {trainer.device} "
                   f"| precision {trainer.precision.describe()}"
                   f"{processes} | steps {trainer.step}->{trainer.total_steps}")
        try:
            result = trainer.fit()
        except KeyboardInterrupt:
            if ctx.is_main:
                err.print(f"interrupted at step {trainer.step}; checkpoint saved; continue with: "
                          f"genai train --resume {run_path}", markup=False)
            raise typer.Exit(130) from None
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        talk.print("done: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        talk.print(f"samples: {run_path / 'samples'} | next: genai sample {run_path}")
    except GenaiError:
        if not ctx.is_main:
            # From here on every rank fails alike (rank 0's errors are shared, losses averaged): rank 0 says it.
            raise typer.Exit(2) from None
        raise
    finally:
        distributed.shutdown()


# -- sample -------------------------------------------------------------------------------------
OPTION_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "greedy": "--greedy",
                "noise_std": "--noise-std", "noise_on": "--noise-on", "prefix_rows": "--prefix-rows",
                "steps": "--steps", "sampler": "--sampler", "eta": "--eta", "guidance": "--guidance",
                "labels": "--label", "interpolate": "--interpolate", "traverse": "--traverse",
                "traverse_dim": "--traverse-dim"}


def refuse_unsupported(family: str, cls, options: dict[str, Any]) -> None:
    from .registry import MODELS

    for key in options:
        if key not in cls.sample_options:
            takers = [n for n in MODELS.names() if key in MODELS.get(n).sample_options]
            raise GenaiError(f"{OPTION_FLAGS.get(key, key)} is not an option of family '{family}'; "
                             f"families that take it: {', '.join(takers) or 'none'}")


def parse_sweeps(sweeps: list[str]) -> list[tuple[str, list[Any]]]:
    import yaml

    parsed = []
    for text in sweeps:
        key, sep, values = text.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise GenaiError(f"--sweep expects option=v1,v2,..., got '{text}' (example: --sweep temperature=0.5,1,1.5)")
        if key not in OPTION_FLAGS or key in ("labels", "interpolate", "traverse", "traverse_dim", "prefix_rows"):
            raise GenaiError(f"--sweep cannot vary '{key}'; sweepable: temperature, top_k, top_p, noise_std, steps, "
                             f"eta, guidance, greedy")
        parsed.append((key, [yaml.safe_load(v) for v in values.split(",")]))
    return parsed


def parse_temperature(value: Any, family: str, cls, ckpt: Path, step: int) -> float:
    """A number, or 'calibrated': the temperature fitted by genai evaluate --calibrate for this checkpoint."""
    if isinstance(value, str) and value.strip().lower() == "calibrated":
        if not cls.discrete:
            raise GenaiError(f"--temperature calibrated needs a family that samples from logits; family '{family}' "
                             f"takes a number (its temperature scales the latent noise)")
        from .evaluate import calibrated_temperature

        return calibrated_temperature(ckpt, int(step))
    try:
        return float(value)
    except (TypeError, ValueError):
        raise GenaiError(f"--temperature must be a number or 'calibrated', got '{value}'") from None


@app.command()
@one_line_errors
def sample(
    target: Optional[str] = typer.Argument(None, help="Run folder, run name or checkpoint (default: newest run)."),
    n: Optional[int] = typer.Option(None, "-n", help="Number of images (default: the config's sample.n)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: the config's sample.seed)."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .png grid or .npz array file."),
    temperature: Optional[str] = typer.Option(None, "--temperature", help="Divide logits / scale latent noise; "
                                              "'calibrated': the T fitted by genai evaluate --calibrate."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely values."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Keep the smallest set with probability >= p."),
    greedy: bool = typer.Option(False, "--greedy", help="Take the most likely value (argmax)."),
    noise_std: Optional[float] = typer.Option(None, "--noise-std", help="Gaussian noise added before each draw."),
    noise_on: Optional[str] = typer.Option(None, "--noise-on", help="Where --noise-std goes: logits or hidden."),
    prefix_rows: Optional[int] = typer.Option(None, "--prefix-rows", help="Complete real images from R rows."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Diffusion: number of sampling steps."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Diffusion: ddpm or ddim."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM: 0 deterministic, 1 DDPM-like."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    label: Optional[int] = typer.Option(None, "--label", help="Class to draw (conditional families)."),
    sweep: list[str] = typer.Option([], "--sweep", help="One labelled row per value: --sweep temperature=0.5,1,1.5"),
    interpolate: bool = typer.Option(False, "--interpolate", help="Walk between two latent points."),
    traverse: bool = typer.Option(False, "--traverse", help="Walk between two real images' latents."),
    traverse_dim: Optional[int] = typer.Option(None, "--traverse-dim", help="Vary one latent dimension."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the raw weights instead of their moving average."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_DIR_HELP),
):
    """Draw images from a trained model into a PNG grid (or an .npz of raw images)."""
    import numpy as np
    import torch

    from .api import model_from_state
    from .config import from_dict
    from .hardware import pick_device
    from .registry import MODELS
    from .runs import grid_rows, labelled_grid, load_checkpoint_file, resolve_checkpoint, run_of_checkpoint, save_grid
    from .runs import runs_dir as resolve_runs_dir

    ckpt = resolve_checkpoint(target, resolve_runs_dir(runs_dir))
    state = load_checkpoint_file(ckpt)
    model = model_from_state(state, use_ema=not no_ema)
    cfg = from_dict(state["config"], source=str(ckpt))
    cls = MODELS.get(state["family"])
    spec = model.spec

    options: dict[str, Any] = dict(cfg.sample.options())
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "greedy": greedy or None,
             "noise_std": noise_std, "noise_on": noise_on, "prefix_rows": prefix_rows, "steps": steps,
             "sampler": sampler, "eta": eta, "guidance": guidance, "labels": label, "interpolate": interpolate or None,
             "traverse": traverse or None, "traverse_dim": traverse_dim}
    given = {k: v for k, v in given.items() if v is not None}
    sweeps = parse_sweeps(sweep)
    refuse_unsupported(state["family"], cls, {**given, **{k: None for k, _ in sweeps}})
    if "temperature" in given:
        given["temperature"] = parse_temperature(given["temperature"], state["family"], cls, ckpt, state["step"])
    sweeps = [(k, [parse_temperature(v, state["family"], cls, ckpt, state["step"]) if k == "temperature"
                   and v == "calibrated" else v for v in values]) for k, values in sweeps]
    options.update(given)
    for key in ("steps", "top_k"):
        if key in options and options[key] < 1:
            raise GenaiError(f"{OPTION_FLAGS[key]} must be at least 1, got {options[key]}")
    if cls.discrete:
        from .sampling import check_sampling_options

        check_sampling_options(temperature=options.get("temperature"), top_k=options.get("top_k"),
                               top_p=options.get("top_p"), noise_std=options.get("noise_std"),
                               prefix_rows=options.get("prefix_rows"), height=spec.size)
    elif options.get("temperature") is not None and options["temperature"] < 0:
        raise GenaiError(f"--temperature must be >= 0, got {options['temperature']}")
    if n is not None and n < 1:
        raise GenaiError(f"-n must be at least 1, got {n}")
    count = n if n is not None else (8 if sweeps else cfg.sample.n)
    seed = cfg.sample.seed if seed is None else seed
    if "labels" in options:
        if not 0 <= label < spec.num_classes:
            raise GenaiError(f"--label {label} is out of range; this model's classes are 0..{spec.num_classes - 1}")
        options["labels"] = torch.full((count,), label, dtype=torch.long)

    dev = pick_device(device)
    model.to(dev)
    if isinstance(options.get("labels"), torch.Tensor):
        options["labels"] = options["labels"].to(dev)

    def generator() -> torch.Generator:
        return torch.Generator(dev).manual_seed(seed)

    def real_images(k: int) -> torch.Tensor:
        from .data import load_data, to_float

        data = load_data(cfg.data)
        if data.val_x.shape[0] < k:
            raise GenaiError(f"the validation split has only {data.val_x.shape[0]} images; ask for fewer (-n)")
        return to_float(data.val_x[:k]).to(dev)

    run = run_of_checkpoint(ckpt)
    default_out = (run / "samples" if run else Path(".")) / f"sample_{seed}.png"
    out_file = out_path or default_out
    if out_file.suffix not in (".png", ".npz"):
        raise GenaiError(f"--out must end in .png (a grid) or .npz (raw images), got '{out_file}'")
    nrow = None
    labels_out = options.get("labels")
    walk = options.pop("interpolate", None) or options.pop("traverse", None)
    dim = options.pop("traverse_dim", None)
    options.pop("interpolate", None), options.pop("traverse", None)
    if sweeps:
        if out_file.suffix != ".png":
            raise GenaiError("--sweep draws a labelled PNG; use --out NAME.png")
        rows, names = [], []
        for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in sweeps]):
            opts = {**options, **dict(combo)}
            if cls.discrete:
                from .sampling import check_sampling_options

                check_sampling_options(temperature=opts.get("temperature"), top_k=opts.get("top_k"),
                                       top_p=opts.get("top_p"), noise_std=opts.get("noise_std"))
            rows.append(model.sample(count, generator=generator(), **opts).cpu())
            names.append(" ".join(f"{k}={v}" for k, v in combo))
        labelled_grid(rows, names, out_file)
        out.print(f"wrote {out_file} ({len(rows)} settings x {count} images, seed {seed})")
        return
    if walk or dim is not None:
        if dim is not None and not 0 <= dim < getattr(model.config, "latent_dim", 10**9):
            raise GenaiError(f"--traverse-dim {dim} is out of range; latent dims are 0..{model.config.latent_dim - 1}")
        rows, steps_per_row = max(1, count // 8), 8
        images = real_images(2 * rows) if hasattr(model, "encode") and dim is None else None
        result = model.walk(rows, steps_per_row, generator=generator(), images=images, dim=dim)
        nrow = steps_per_row
    elif options.get("prefix_rows"):
        originals = min(8, count)
        per = max(1, count // originals)
        real = real_images(originals)
        prefix = real.repeat_interleave(per, 0)
        completions = model.sample(originals * per, generator=generator(), prefix=prefix, **options)
        masked = real.clone()
        masked[:, :, options["prefix_rows"]:, :] = 0.5  # show what the model was given
        result = torch.cat([real[:, None], masked[:, None], completions.view(originals, per, *spec.shape)], 1)
        result = result.flatten(0, 1)
        nrow = per + 2
    else:
        result = model.sample(count, generator=generator(), **options)
        if model.conditional and labels_out is None and spec.num_classes:
            labels_out = torch.arange(count) % spec.num_classes
            nrow = spec.num_classes
    result = result.float().cpu()
    if out_file.suffix == ".npz":
        arrays = {"images": result.numpy().astype(np.float32)}
        if labels_out is not None:
            arrays["labels"] = labels_out.cpu().numpy()
        out_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out_file, **arrays)
    else:
        save_grid(result, out_file, nrow=nrow or grid_rows(result.shape[0]))
    out.print(f"wrote {out_file} ({result.shape[0]} images {tuple(result.shape[1:])}, seed {seed})")


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@app.command()
@one_line_errors
def inspect(
    target: Optional[str] = typer.Argument(None, help="Run, checkpoint or YAML config (default: newest run)."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_DIR_HELP),
):
    """Tell what a run, checkpoint or config is, how big, how training went and where its files are."""
    from .api import build_model, model_from_state
    from .config import load_config
    from .data import peek_spec
    from .runs import MetricsLog, load_checkpoint_file, resolve_checkpoint, run_of_checkpoint
    from .runs import runs_dir as resolve_runs_dir

    if target is not None and Path(target).suffix in (".yaml", ".yml"):
        cfg = load_config(target)
        spec = peek_spec(cfg.data)
        model = build_model(cfg.family, cfg.model, spec)
        out.print(f"[bold]{target}[/]: family [bold]{cfg.family}[/], data {cfg.data.name} {spec.shape}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters (not trained)")
        out.print(parameter_table(model))
        out.print(config_table(cfg.to_dict()))
        return
    ckpt = resolve_checkpoint(target, resolve_runs_dir(runs_dir))
    state = load_checkpoint_file(ckpt)
    model = model_from_state(state)
    cfg = state["config"]
    summary = state.get("summary") or {}
    table = Table(title=f"{ckpt}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("family", state["family"])
    table.add_row("dataset", f"{cfg['data']['name']} {tuple(model.spec.shape)}, {model.spec.num_classes} classes")
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    table.add_row("steps trained", f"{state['step']:,}" + (" (finished)" if summary.get("finished") else ""))
    table.add_row("time spent", f"{state.get('elapsed_seconds', 0):.0f} s training"
                  + (f", {summary['images_per_sec']:.0f} img/s" if "images_per_sec" in summary else ""))
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
        curve = run / "loss_curve.png"
        if os.access(run, os.W_OK) and write_loss_curve(rows, curve):
            table.add_row("loss curve", str(curve))
        table.add_row("metrics", str(run / "metrics.jsonl"))
        if hasattr(model, "encode") and os.access(run, os.W_OK):
            from .config import from_dict
            from .data import load_data, to_float
            from .models.latent_plot import plot_latents

            data = load_data(from_dict(cfg, source=str(ckpt)).data)
            k = min(2000, data.val_x.shape[0])
            path = plot_latents(model, to_float(data.val_x[:k]), data.val_y[:k], run / "latents_pca.png")
            table.add_row("latent space", f"{path} (PCA of {k} validation latents, coloured by class)")
    out.print(table)
    out.print(parameter_table(model))
    out.print(config_table(cfg))


# -- evaluate -----------------------------------------------------------------------------------
@app.command()
@one_line_errors
def evaluate(
    targets: Optional[list[str]] = typer.Argument(None, help="Runs (folders, names or checkpoints) to measure and "
                                                  "compare (default: the newest run)."),
    n: int = typer.Option(1000, "-n", help="Samples drawn per run."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (default: the config's sample.seed)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout instead of a table."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Fit a temperature on the validation split (discrete "
                                   "families); genai sample --temperature calibrated uses it."),
    train_evaluator: bool = typer.Option(False, "--train-evaluator", help="Train the evaluator network when none "
                                         "exists for the dataset (a quick classifier run in the runs folder)."),
    evaluator: Optional[str] = typer.Option(None, "--evaluator", help="Classifier run to use (default: found by "
                                            "dataset)."),
    chart: Optional[Path] = typer.Option(None, "--chart", help="Bar-chart PNG when comparing runs "
                                         "(default: <runs dir>/comparison.png)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_DIR_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
):
    """Measure samples offline (classifier-FID, KID, precision/recall/density/coverage, class histogram),
    bits/dim and diagnostics; or --calibrate a sampling temperature."""
    from . import evaluate as ev
    from .runs import runs_dir as resolve_runs_dir

    root = resolve_runs_dir(runs_dir)
    targets = targets or [None]
    log = (lambda text: None) if quiet else (lambda text: err.print(text, markup=False))
    if calibrate:
        reports = [ev.calibrate_run(t, root=root, device=device, log=log) for t in targets]
        if json_out:
            typer.echo(ev.to_json(reports))  # plain stdout: rich would touch the text
        for r in [] if json_out else reports:
            from .registry import MODELS

            out.print(ev.calibration_table(r))
            hint = (f"; use it with: genai sample {r['run']} --temperature calibrated"
                    if "temperature" in MODELS.get(r["family"]).sample_options else "")
            out.print(f"saved to {r.get('saved_to', '(not saved: folder not writable)')}{hint}", markup=False)
        return
    results = [ev.evaluate_run(t, root=root, n=n, seed=seed, device=device, evaluator=evaluator,
                               train_missing=train_evaluator, log=log, console=err) for t in targets]
    chart_path = None
    if len(results) > 1:
        chart_path = ev.comparison_chart(results, chart or root / "comparison.png")
    if json_out:
        typer.echo(ev.to_json(results))
        return
    out.print(ev.results_table(results))
    if chart_path is not None:
        out.print(f"bar chart: {chart_path}", markup=False)


# -- list ---------------------------------------------------------------------------------------
def bundled_configs() -> list[Path]:
    seen: dict[str, Path] = {}
    for folder in (Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"):
        for p in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            seen.setdefault(p.name, p)
    return list(seen.values())


@app.command("list")
@one_line_errors
def list_cmd():
    """List model families, datasets and bundled configs."""
    import yaml

    from . import api  # noqa: F401  (registers the families)
    from .registry import DATASETS, MODELS

    table = Table(title="model families")
    for col in ("family", "what", "sample options"):
        table.add_column(col)
    for e in MODELS.entries():
        table.add_row(e.name, e.summary, ", ".join(OPTION_FLAGS.get(o, o) for o in sorted(e.obj.sample_options)))
    out.print(table)
    table = Table(title="datasets")
    table.add_column("dataset")
    table.add_column("what")
    for e in DATASETS.entries():
        table.add_row(e.name, e.summary)
    out.print(table)
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
    out.print(table)


def main() -> None:
    app(prog_name="genai")


if __name__ == "__main__":
    sys.exit(main())
