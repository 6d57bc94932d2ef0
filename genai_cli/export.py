"""genai export: a run as a folder anyone can load, laid out as a Hugging Face Hub model folder.

    DIR/model.safetensors                the weights sampling uses (the EMA when the run kept one): tensors only,
                                         no optimizer, no pickle
    DIR/config.json                      the family, the resolved config (model, data, train, sample), the data
                                         spec, the step, the training summary, the lineage, and the sha256 of
                                         every file below
    DIR/parents/<field>/model.safetensors  each run it builds on (``lineage.py``), itself an export (its own
    DIR/parents/<field>/config.json        config.json; its parents under its own parents/), down the whole lineage
    DIR/README.md                        a model card: family, data, steps, evaluation figures, a sample grid
    DIR/samples.png (.txt for text)      the sample grid the card shows

``huggingface_hub`` can upload the folder as it is (safetensors plus config.json, subfolders per component as
diffusers pipelines keep theirs); nothing here needs the network. ``load_export`` reads a folder back into the
form of a checkpoint (``runs.load_checkpoint_file``), so ``build.model_from_state`` builds it like any run:
``genai sample DIR`` and ``genai_cli.load_pretrained(DIR)`` draw the same samples as the run for the same seed.
Every file is checked against the sha256 its config.json records before anything is read from it, and each parent
against its lineage hash (``lineage.Parent.from_record``): a changed weight is refused in one line.

An export is written into a temporary folder beside DIR and renamed into place, so a failed export leaves nothing
half-written; an existing non-empty DIR is replaced only with ``force`` and only when it is itself an export.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .errors import GenaiError

EXPORT_FORMAT = 1  # config.json's "genai_export": what this version writes and reads
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
PARENTS = "parents"


@dataclass
class Exported:
    """What ``export_run`` wrote: the folder, its files (relative path -> sha256) and the sample it shows."""

    path: Path
    files: dict[str, str]
    sample: str | None
    parents: int  # runs of the lineage exported beside the model (all generations)


# -- writing ------------------------------------------------------------------------------------
def export_run(target: str | None, out: str | Path, *, root: str | Path | None = None, force: bool = False) -> Exported:
    """Export the run (folder, name or checkpoint; None: the newest) into ``out``. Returns what was written."""
    from .build import model_from_state
    from .lineage import embedded_parents, state_hash
    from .runs import load_checkpoint_file, resolve_checkpoint, run_of_checkpoint, runs_dir

    out = Path(out)
    if target is not None and is_export(Path(target)):
        raise GenaiError(f"'{target}' is already an export; copy the folder, or export the run it came from")
    ckpt = resolve_checkpoint(target, runs_dir(root))
    check_out(out, force)
    state = load_checkpoint_file(ckpt)
    model = model_from_state(state)  # the export holds what loads: refuse a checkpoint that does not build
    run = run_of_checkpoint(ckpt)
    ema = state.get("ema") is not None
    weights = state["ema"] if ema else state["model"]
    parents = embedded_parents(state, where=str(ckpt))  # hash-checked
    meta = {
        "name": run.name if run is not None else ckpt.stem,
        "step": int(state.get("step", 0)),
        "hash": state_hash(weights, parents),
        "source": str(ckpt),
        "summary": state.get("summary") or {},
        "family": state["family"],
        "config": state["config"],
        "spec": state["spec"],
        "weights": "ema" if ema else "raw",
        "precision": state.get("precision"),
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        files = write_export(tmp, meta, weights, parents)
        sample = write_sample(tmp, model, state, run)
        (tmp / CARD).write_text(model_card(tmp, meta, model, parents, files, sample, run), encoding="utf-8")
        replace_folder(tmp, out)
    except OSError as e:
        raise GenaiError(f"cannot write the export to '{out}': {e.strerror or e}; choose another --out") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return Exported(out, files, sample, count_lineage(parents))


def check_out(out: Path, force: bool) -> None:
    """Refuse, before any work, an --out that is a file, or a non-empty folder (without ``force``, or with it when
    the folder is not an earlier export: --force never deletes what genai did not write)."""
    if out.exists() and not out.is_dir():
        raise GenaiError(f"--out '{out}' is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise GenaiError(f"--out '{out}' exists and is not empty; choose a new folder, or --force to replace "
                             f"an earlier export there")
        if not is_export(out):
            raise GenaiError(f"--out '{out}' is not empty and holds no genai export (no {CONFIG} of one); --force "
                             f"replaces only an earlier export: choose a new or empty folder")
    parent = out.resolve().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise GenaiError(f"cannot write the export to '{out}': '{parent}' is not writable; choose another --out")


def replace_folder(new: Path, out: Path) -> None:
    """Put the finished folder ``new`` at ``out``: renamed into place; an earlier export there is set aside first
    and removed only once the new one is in place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old)


def write_export(folder: Path, meta: dict[str, Any], weights: Mapping[str, Tensor],
                 parents: Mapping[str, Any]) -> dict[str, str]:
    """model.safetensors, the parents' exports under parents/<field>/, and config.json naming the sha256 of each
    file beneath it. Returns those files (relative path -> sha256)."""
    from safetensors.torch import save_file

    # one contiguous CPU copy per tensor: safetensors stores neither views, shared storage nor channels_last strides
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in weights.items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", "genai_family": meta["family"]})
    os.chmod(folder / WEIGHTS, 0o666 & ~current_umask())  # safetensors writes 0600: an export is made to be shared
    files = {WEIGHTS: sha256_of(folder / WEIGHTS)}
    lineage = {}
    for key, parent in parents.items():
        sub = folder / PARENTS / key
        sub.mkdir(parents=True)
        record = parent.record()
        sub_files = write_export(sub, {k: v for k, v in record.items() if k not in ("model", "parents")},
                                 record["model"], parent.parents)
        files.update({f"{PARENTS}/{key}/{name}": digest for name, digest in sub_files.items()})
        files[f"{PARENTS}/{key}/{CONFIG}"] = sha256_of(sub / CONFIG)
        lineage[key] = {"path": f"{PARENTS}/{key}", "name": parent.name, "step": parent.step, "hash": parent.hash,
                        "family": parent.family}
    config = {"genai_export": EXPORT_FORMAT, "genai_version": __version__, **meta, "parents": lineage, "files": files}
    (folder / CONFIG).write_text(json.dumps(finite(config), indent=2) + "\n", encoding="utf-8")
    return files


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def finite(value: Any) -> Any:
    """A value JSON writes as strict JSON: NaN and infinities (a diverged loss in a summary) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def count_lineage(parents: Mapping[str, Any]) -> int:
    return sum(1 + count_lineage(p.parents) for p in parents.values())


SAMPLE = "samples"  # DIR/samples.png (or .txt): the card's sample grid


def write_sample(folder: Path, model, state: dict[str, Any], run: Path | None) -> str | None:
    """The card's samples: the run's newest training grid, copied; drawn with the run's sampling defaults when the
    run folder has none (a checkpoint exported on its own). None for a network that draws nothing (classifier)."""
    if not model.generative:
        return None
    suffix = model.spec.sample_suffix
    name = f"{SAMPLE}{suffix}"
    grids = sorted((run / "samples").glob(f"step_*{suffix}")) if run is not None else []
    if grids:
        shutil.copyfile(grids[-1], folder / name)
        return name
    from .config import from_dict
    from .generate import SampleRequest, draw

    cfg = from_dict(state["config"])
    draw(model, SampleRequest(n=cfg.sample.n, seed=cfg.sample.seed, options=cfg.sample.options()),
         device="cpu").save(folder / name)
    return name


def evaluation_figures(meta: dict[str, Any], run: Path | None) -> list[tuple[str, str]]:
    """(name, value) rows for the card: the last validation of training and the newest ``genai evaluate``."""
    rows = []
    summary = meta["summary"]
    if isinstance(summary.get("last_loss"), (int, float)):
        rows.append(("last training loss", f"{summary['last_loss']:.5g}"))
    if isinstance(summary.get("best_val_loss"), (int, float)):
        rows.append(("best validation loss", f"{summary['best_val_loss']:.5g} (step {summary.get('best_step', '?')})"))
    for key, value in summary.items():
        if key.startswith("last_val_") and isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((f"validation {key[9:].replace('_', ' ')} (last)", f"{value:.5g}"))
    if run is not None:
        from .runs import MetricsLog

        evaluated = [r for r in MetricsLog(run / "metrics.jsonl").read() if r.get("split") == "evaluate"]
        if evaluated:
            newest = evaluated[-1]
            for key, value in newest.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append((f"genai evaluate: {key.replace('_', ' ')}", f"{value:.5g}"))
    return rows


CARD_TEXT_CHARS = 1500  # of a text run's samples, shown in the card


def model_card(folder: Path, meta: dict[str, Any], model, parents: Mapping[str, Any], files: dict[str, str],
               sample: str | None, run: Path | None) -> str:
    """README.md: the Hub's YAML header, then what the model is, how it was trained and how to load it."""
    from .lineage import describe
    from .spec import spec_from_dict

    spec = spec_from_dict(meta["spec"])
    data = meta["config"].get("data", {})
    train = meta["config"].get("train", {})
    family = meta["family"]
    lines = ["---", "library_name: genai", f"tags: [genai, {family}, generative]", "---", "",
             f"# {meta['name']}", "",
             f"A `{family}` model trained with genai {__version__} and exported with `genai export`: the "
             f"weights in `{WEIGHTS}`, how to build them in `{CONFIG}`.", "",
             "| | |", "|---|---|",
             f"| family | `{family}` |",
             f"| data | `{data.get('name', '?')}`, {spec.describe_data()} |",
             f"| steps trained | {meta['step']:,} |",
             f"| batch size | {train.get('batch_size', '?')} |",
             f"| parameters | {sum(p.numel() for p in model.parameters()):,} |",
             f"| weights | {'the moving average (EMA)' if meta['weights'] == 'ema' else 'the trained weights'} |"]
    precision = meta.get("precision") or {}
    if precision:
        lines.append(f"| precision | {precision.get('requested', '?')} -> {precision.get('resolved', '?')} |")
    for name, value in evaluation_figures(meta, run):
        lines.append(f"| {name} | {value} |")
    if parents:
        lines += ["", "## Lineage", "", "The frozen runs it builds on, exported under `parents/`:", "", "```",
                  *describe(meta["name"], parents), "```"]
    if sample is not None:
        lines += ["", "## Samples", ""]
        if sample.endswith(".png"):
            lines.append(f"![samples]({sample})")
        else:  # text: the first samples inline, all of them in the file
            text = (folder / sample).read_text(encoding="utf-8")
            lines += ["```text", text[:CARD_TEXT_CHARS].rstrip(), "```", "", f"All of them: [{sample}]({sample})"]
    lines += ["", "## Use", "", "```bash", "genai sample . -n 16 --seed 0 --out grid.png   # in this folder", "```", "",
              "```python", "import genai_cli", "", "model = genai_cli.load_pretrained(\".\")",
              "samples = genai_cli.draw(model, genai_cli.SampleRequest(n=16, seed=0))", "```", "",
              "## Files", "", "Checked against these sha256 on every load (`config.json` records them):", "",
              "| file | sha256 |", "|---|---|", *[f"| `{f}` | `{d}` |" for f, d in files.items()], ""]
    return "\n".join(lines)


# -- reading ------------------------------------------------------------------------------------
def is_export(path: Path) -> bool:
    """A folder holding config.json and model.safetensors (an export), not a run folder."""
    return path.is_dir() and (path / CONFIG).is_file() and not (path / "checkpoints").is_dir()


def read_config(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise GenaiError(f"export folder '{folder}' not found")
    if not folder.is_dir():
        raise GenaiError(f"'{folder}' is not an export folder (a folder with {CONFIG} and {WEIGHTS})")
    path = folder / CONFIG
    if not path.is_file():
        raise GenaiError(f"'{folder}' is not a genai export: it has no {CONFIG}; export a run with "
                         f"genai export RUN --out {folder}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GenaiError(f"'{path}' is corrupt ({type(e).__name__}: {str(e)[:80]}); export the run again") from None
    if not isinstance(config, dict) or "genai_export" not in config:
        raise GenaiError(f"'{path}' is not the config of a genai export (no 'genai_export' key)")
    if config["genai_export"] != EXPORT_FORMAT:
        raise GenaiError(f"'{folder}' is a genai export of format {config['genai_export']}; this version reads "
                         f"format {EXPORT_FORMAT}: upgrade genai")
    return config


def check_files(folder: Path, files: Any) -> None:
    """Every file config.json names exists and has the sha256 it records (a changed weight is refused here)."""
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise GenaiError(f"'{folder / CONFIG}' names no sha256 for {WEIGHTS}; the export is corrupt: export the run "
                         f"again")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise GenaiError(f"export '{folder}' is incomplete: '{name}' is missing; export the run again")
        if sha256_of(path) != digest:
            raise GenaiError(f"export '{folder}': '{name}' does not match the sha256 in {CONFIG} (changed or "
                             f"corrupt); refused: export the run again")


def read_record(folder: Path, where: str, *, checked: bool = False) -> dict[str, Any]:
    """An export folder as a lineage record: name, step, hash, family, config, spec, weights and its parents."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_config(folder)
    if not checked:
        check_files(folder, config.get("files"))
    try:
        weights = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise GenaiError(f"'{folder / WEIGHTS}' cannot be read ({str(e)[:80]}); export the run again") from None
    lineage = config.get("parents") or {}
    if not isinstance(lineage, dict):
        raise GenaiError(f"'{folder / CONFIG}': 'parents' is not a mapping; the export is corrupt")
    parents = {}
    for key, entry in lineage.items():
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or Path(path).is_absolute() or ".." in Path(path).parts:
            raise GenaiError(f"'{folder / CONFIG}': parent '{key}' names no folder inside the export; corrupt")
        parents[key] = read_record(folder / path, f"{where} > {key}", checked=True)
    record = {k: config.get(k) for k in ("name", "step", "hash", "source", "summary", "family", "config", "spec")}
    return {**record, "model": weights, "parents": parents, "weights": config.get("weights"),
            "precision": config.get("precision")}


def load_export(folder: str | Path) -> dict[str, Any]:
    """An export folder -> a checkpoint-like state (family, config, spec, model, parents, step, summary) that
    ``build.model_from_state`` builds; every file checked against its sha256 and every parent against its hash."""
    folder = Path(folder)
    from .lineage import embedded_parents, state_hash
    from .runs import upgrade_saved

    record = upgrade_saved(read_record(folder, str(folder)))  # an export of an older version reads as it was trained
    for key in ("family", "config", "spec"):
        if not record.get(key):
            raise GenaiError(f"'{folder / CONFIG}' has no '{key}'; the export is corrupt: export the run again")

    parents = embedded_parents(record, where=str(folder))  # each parent's weights against its lineage hash
    if state_hash(record["model"], parents) != record.get("hash"):
        raise GenaiError(f"export '{folder}': the weights do not match the hash in {CONFIG} (changed or corrupt); "
                         f"refused: export the run again")
    return {**record, "ema": None, "step": int(record.get("step") or 0)}


def load_target(target: str | None, root: str | Path | None = None, *, use_ema: bool = True) -> tuple[Path, dict]:
    """What ``genai sample`` reads: an export folder, or a run / run name / checkpoint (``runs.resolve_checkpoint``).
    Returns (the file it stands for, the checkpoint-like state)."""
    from .runs import load_checkpoint_file, resolve_checkpoint, runs_dir

    root = runs_dir(root)
    if target is not None:
        folder = Path(target) if Path(target).exists() else root / target
        if is_export(folder):
            state = load_export(folder)
            if not use_ema and state.get("weights") == "ema":
                raise GenaiError(f"export '{folder}' holds only the moving average (EMA) of the weights; --no-ema "
                                 f"needs the run's own checkpoint")
            return folder / CONFIG, state
    ckpt = resolve_checkpoint(target, root)
    return ckpt, load_checkpoint_file(ckpt)


def load_pretrained(folder: str | Path, device: str = "cpu"):
    """An export folder (``genai export``) -> the model, in eval mode, ready to ``sample`` or ``draw``."""
    from .build import model_from_state

    return model_from_state(load_export(folder)).to(device)
