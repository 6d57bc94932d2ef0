"""Starting and resuming a run: the one way a run folder comes to be and the one way training continues in it.

``start_run`` is what ``genai train CONFIG`` and ``genai evaluate --train-evaluator`` both call: it loads the
data before touching the disk (a dataset that cannot be had leaves nothing behind), creates ``runs/<name>``
(``<stem>-<time>`` unless a name is given; an existing name is refused, or moved aside with ``force``), builds
the run (``train.assemble``: data, model, optimizers, precision, engines) and its loop (``train.Trainer``), removing
the empty folder again when that fails, and writes ``config.yaml`` atomically, with the
precision it resolved to as a comment. ``resume_point`` + ``resume_run`` are ``genai train --resume``: the run's
own config (with ``--set`` overrides), the Trainer reloaded from the checkpoint, and ``config.yaml`` rewritten.

Both return the Trainer: ``trainer.fit()`` trains, ``trainer.run_dir`` is the folder. Under torchrun every
rank calls them: rank 0 names and writes, every rank gets a Trainer loaded from the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import distributed
from .config import Config
from .errors import GenaiError

if TYPE_CHECKING:
    from rich.console import Console

    from .data import DataBundle
    from .train import Trainer


class ResumePoint(NamedTuple):
    run: Path  # the run folder
    checkpoint: Path  # usually run/checkpoints/last.pt; a step_N.pt resumes from that step
    config: Config  # what the resumed run trains with


def resume_point(ref: str, root: Path, *, config: str | Path | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> ResumePoint:
    """Where ``--resume REF`` continues: the run's saved config with ``overrides`` (``--set``) applied, or
    ``config`` when it describes the same model and data (only ``train.*`` may change)."""
    from .config import apply_overrides, from_dict, load_config, load_yaml
    from .runs import resolve_checkpoint

    ckpt = resolve_checkpoint(ref, root)
    run = ckpt.parent.parent
    if not (run / "config.yaml").is_file():
        raise GenaiError(f"'{ref}' is not a run folder (no config.yaml); --resume takes a run, not a file")
    saved = load_yaml(run / "config.yaml")
    if config is not None:
        cfg = load_config(config, list(overrides))
        if cfg.to_dict()["model"] != saved.get("model") or cfg.to_dict()["data"] != saved.get("data"):
            raise GenaiError(f"{config} describes another model or dataset than run '{run}'; "
                             f"resume with --resume alone (and --set train.* to change training)")
    else:
        cfg = from_dict(apply_overrides(saved, list(overrides)), source=str(run / "config.yaml"))
    return ResumePoint(run, ckpt, cfg)


def start_run(cfg: Config, root: Path, *, name: str | None = None, stem: str = "run", force: bool = False,
              data: DataBundle | None = None, quiet: bool = False, console: Console | None = None) -> Trainer:
    """A new run folder under ``root`` and the Trainer that fills it (not yet trained). Returns the Trainer."""
    from .data import load_data
    from .hardware import pick_device
    from .runs import new_run, write_text_atomically
    from .train import Trainer, assemble

    data = data or load_data(cfg.data)  # before creating the folder: a dataset that cannot be had leaves nothing
    ctx, _ = distributed.setup(pick_device(cfg.train.device))  # joins torchrun's processes, if any

    def create() -> Path:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise GenaiError(f"cannot create the runs folder '{root}': permission denied; use --runs-dir or "
                             f"GENAI_RUNS_DIR to write elsewhere") from None
        return new_run(root, name, stem, force=force)

    run = distributed.share_from_main(create)  # rank 0 names and makes the folder
    try:
        trainer = Trainer.from_parts(assemble(cfg, run, data=data, console=console, threads=True), quiet=quiet)
    except GenaiError:
        if ctx.is_main:  # nothing was trained: remove the empty folder just made
            for sub in ("checkpoints", "samples"):
                (run / sub).rmdir()
            run.rmdir()
        raise
    if ctx.is_main:
        write_text_atomically(run / "config.yaml", cfg.to_yaml(trainer.precision.describe()))
    return trainer


def resume_run(point: ResumePoint, *, quiet: bool = False, console: Console | None = None,
               trainer_class: type[Trainer] | None = None, **options) -> Trainer:
    """The Trainer of an existing run, loaded from its checkpoint (model, EMA, optimizers, step). Refuses a run
    that has already trained its whole budget. ``trainer_class``: a Trainer subclass to build instead (a
    benchmark's), given ``options`` as its own keywords. Returns the Trainer."""
    import torch

    from .hardware import pick_device, resolve_precision, thread_probe_wanted
    from .lineage import embedded_parents
    from .runs import check_writable, load_checkpoint_file, write_text_atomically
    from .train import Trainer, assemble, started_precision

    run, ckpt, cfg = point
    _, device = distributed.setup(pick_device(cfg.train.device))  # joins torchrun's processes, if any
    distributed.share_from_main(lambda: check_writable(run))
    state = load_checkpoint_file(ckpt)  # every rank resumes from the same checkpoint
    # The precision the run started with (auto may have chosen it by timing): never probed again, so the resumed
    # steps are those of an uninterrupted run. Older checkpoints resolve the request as they did then, untimed.
    precision = started_precision(state, cfg.train.precision) or resolve_precision(cfg.train.precision, device)
    # The CPU thread count the run started with, where its start measured it (train.probe_run_threads): not timed
    # again, so the resumed steps' parallel reductions split as the uninterrupted run's did; where the start said
    # the count depends on the load, it follows the load from the first check on, as the run did.
    counted = (state.get("summary") or {}).get("thread_probe")
    counted = counted if counted and thread_probe_wanted(device) else None
    if counted:
        torch.set_num_threads(int(counted["threads"]))
    parts = assemble(cfg, run, console=console, parents=embedded_parents(state, where=str(ckpt)), precision=precision)
    trainer = (trainer_class or Trainer).from_parts(parts, quiet=quiet, **options)
    trainer.load_state_dict(state)
    if counted:  # and from here on, the count follows the load as the run's start said it should
        trainer.follow_load(counted)
    if trainer.step >= trainer.total_steps:
        raise GenaiError(f"run '{run}' already trained {trainer.step} of {trainer.total_steps} steps; "
                         f"raise the budget, e.g. --set train.epochs={cfg.train.epochs * 2}")
    if trainer.is_main:
        write_text_atomically(run / "config.yaml", cfg.to_yaml(trainer.precision.describe()))
    return trainer


def launch(nproc: int, cfg: Config, root: Path, *, args: list[str], name: str | None = None, force: bool = False,
           resuming: Path | None = None) -> int:
    """Start ``nproc`` data-parallel processes running ``genai`` with ``args`` (torchrun), after checking here what
    would otherwise fail ``nproc`` times over in them. Returns torchrun's exit code."""
    import torch

    from .hardware import pick_device
    from .runs import check_writable, new_run

    if nproc < 1:
        raise GenaiError(f"--nproc must be at least 1, got {nproc}")
    if distributed.under_torchrun():
        raise GenaiError("--nproc starts torchrun; under torchrun leave it out (torchrun sets the processes)")
    distributed.check_batch(cfg.train.batch_size, cfg.train.grad_accum, nproc)
    device = pick_device(cfg.train.device)
    if device.type == "mps":
        raise GenaiError("--nproc on MPS is not supported; use --set train.device=cpu")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise GenaiError(f"--nproc {nproc} asks for more GPUs than the {torch.cuda.device_count()} visible; "
                         f"use --nproc {torch.cuda.device_count()} or --set train.device=cpu")
    if resuming is None:
        from .data import load_data

        load_data(cfg.data)
        if name is not None and (root / name).exists() and not force:
            new_run(root, name, "", force=False)  # an existing name: raises the usual one-line error
    else:
        check_writable(resuming)
    return distributed.launch(nproc, args)
