"""Run directories, atomic checkpoint save/load, metrics logs and PNG grids.

    runs/<name>/config.yaml            the resolved config, exactly what was trained
    runs/<name>/checkpoints/last.pt    family, config, weights, EMA, optimizers, step, rng, metrics, and the
                                       frozen runs it builds on, embedded (lineage.py)
    runs/<name>/samples/step_000500.png
    runs/<name>/metrics.jsonl          one JSON object per logged step / evaluation
"""

from __future__ import annotations

import glob
import json
import math
import os
import pickle
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import GenaiError

CHECKPOINT_FORMAT = 1


def runs_dir(option: str | Path | None = None) -> Path:
    return Path(option or os.environ.get("GENAI_RUNS_DIR") or "runs")


def timed_name(stem: str) -> str:
    """The name of a run of ``stem`` once ``runs/<stem>`` exists: ``<stem>-<date>-<time>`` (``timed_runs`` reads it)."""
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def timed_runs(root: Path, stem: str) -> list[Path]:
    """The runs with a checkpoint named ``timed_name(stem)`` (a ``-2``... where two started in one second), oldest
    first."""
    named = re.compile(rf"{re.escape(stem)}-\d{{8}}-\d{{6}}(-\d+)?")
    found = root.glob(f"{glob.escape(stem)}-*/checkpoints/last.pt") if stem and root.is_dir() else []
    return sorted(c.parent.parent for c in found if named.fullmatch(c.parent.parent.name))


def new_run(root: Path, name: str | None, stem: str, force: bool = False) -> Path:
    """Create runs/<name>. Without a name: runs/<stem> (the config's name, so a config's ``model.tokenizer:
    vqvae_mnist`` finds the run of configs/vqvae_mnist.yaml), or runs/<stem>-<time> when that exists. An existing
    run is never overwritten: --force moves a named one aside first."""
    if name is None:
        name = stem if stem and not (root / stem).exists() else timed_name(stem)
        base, i = name, 2
        while (root / name).exists():
            name, i = f"{base}-{i}", i + 1
    if "/" in name or name in ("", ".", ".."):
        raise GenaiError(f"run name '{name}' must be a plain folder name (no '/')")
    path = root / name
    if path.exists():
        if not force:
            raise GenaiError(f"run '{path}' already exists; continue it with --resume {path}, "
                             f"pick another --name, or --force to start over (the old run is kept aside)")
        aside = root / f"{name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        path.rename(aside)
    try:
        (path / "checkpoints").mkdir(parents=True)
        (path / "samples").mkdir()
    except PermissionError:
        raise GenaiError(f"cannot create run folder '{path}': permission denied; use --runs-dir or GENAI_RUNS_DIR "
                         f"to write elsewhere") from None
    return path


def check_writable(path: Path) -> None:
    if not os.access(path, os.W_OK):
        raise GenaiError(f"run folder '{path}' is not writable; fix its permissions or use --runs-dir")


# -- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, fsync, then rename: a killed run never leaves a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def link_atomically(src: Path, dst: Path) -> None:
    """Give ``src`` a second name ``dst`` (a hard link: no second copy on disk), replacing ``dst`` atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_text_atomically(path: Path, text: str) -> None:
    """A kill while writing leaves the old file whole (config.yaml is read again by every --resume)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def up_to_date(path: Path, source: Path) -> bool:
    """True when ``path`` exists and was written no earlier than ``source`` (a picture drawn from a log that has
    not changed since: ``genai inspect`` draws it again only when this is False)."""
    try:
        return path.stat().st_mtime_ns >= source.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (a temporary file, then rename), so that a killed command
    never leaves a truncated picture that ``up_to_date`` would then keep."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def trim_metrics(path: Path, step: int) -> None:
    """On resume: drop records past the checkpoint (the resumed run writes them again, identically) and a
    last line cut by a kill, so the log reads like one uninterrupted run. Rewritten atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    write_text_atomically(path, "".join(f"{line}\n" for line in keep))


# -- records saved by earlier versions -----------------------------------------------------------
# A run's saved config is resolved (every field written), so a model field missing from it was added after the run
# was trained. Most new fields default to the old behaviour; these do not (their preset now turns them on), so a
# saved model section that lacks one means the value below: (field, what the section must hold, value meant).
SAVED_BEFORE: tuple[tuple[str, dict[str, Any], Any], ...] = (
    ("long_skip", {"backbone": "dit"}, False),  # DiT's U-ViT skips, on in the latent presets since they came
    ("local_conv", {"backbone": "dit"}, False),  # its per-block 3x3 conv, likewise
    ("label_init_std", {"backbone": "dit"}, 1.0),  # the label table's init, 0.2 in the latent S preset since it came
)


def upgrade_saved(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's records as this version reads them (its own config and every embedded parent's, in place): a
    field of ``SAVED_BEFORE`` absent from a saved model section gets the value that section was trained with."""
    config, parents = state.get("config"), state.get("parents")  # a corrupt record is refused where it is read
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict):
        for key, where, value in SAVED_BEFORE:
            if key not in model and all(model.get(k) == v for k, v in where.items()):
                model[key] = value
    for record in parents.values() if isinstance(parents, dict) else ():
        if isinstance(record, dict):
            upgrade_saved(record)
    return state


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint from a stranger cannot execute code."""
    if not path.is_file():
        raise GenaiError(f"checkpoint '{path}' not found")
    try:
        with warnings.catch_warnings():  # torch warns of a pickle protocol it may not read; the error below says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):
            raise GenaiError(f"checkpoint '{path}' holds Python objects other than weights (loading it could run "
                             f"code); refused. Only load checkpoints written by genai") from None
        raise GenaiError(f"checkpoint '{path}' is corrupt, truncated or not a weights-only file; refused "
                         f"(use a checkpoint written by genai)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GenaiError(f"checkpoint '{path}' is corrupt or truncated ({first[:120]}); "
                         f"use another checkpoint or retrain") from None
    if not isinstance(state, dict) or "family" not in state or "model" not in state:
        raise GenaiError(f"'{path}' is not a genai checkpoint (no family/model inside)")
    return upgrade_saved(state)


def newest_run(root: Path) -> Path:
    candidates = [p for p in root.glob("*/checkpoints/last.pt")] if root.is_dir() else []
    if not candidates:
        raise GenaiError(f"no runs with a checkpoint under '{root}'; train one first: "
                         f"genai train configs/quickstart.yaml")
    return max(candidates, key=lambda p: p.stat().st_mtime).parent.parent


def resolve_checkpoint(target: str | None, root: Path) -> Path:
    """A run folder, a run name under the runs dir, or a checkpoint file -> the checkpoint path."""
    if target is None:
        return newest_run(root) / "checkpoints" / "last.pt"
    p = Path(target)
    if not p.exists() and (root / target).exists():
        p = root / target
    if p.is_dir():
        ckpt = p / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise GenaiError(f"run '{p}' has no checkpoint (checkpoints/last.pt); it never reached its first save")
        return ckpt
    if p.is_file():
        return p
    later = timed_runs(root, p.name)
    hint = (f"did you mean '{later[-1]}', the newest run named {p.name}-<time>?" if later
            else f"runs live under '{root}'")
    raise GenaiError(f"'{target}' is neither a run folder nor a checkpoint file ({hint})")


def run_of_checkpoint(ckpt: Path) -> Path | None:
    run = ckpt.parent.parent
    return run if ckpt.parent.name == "checkpoints" and (run / "config.yaml").is_file() else None


# -- metrics and images -------------------------------------------------------------------------
class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill: the rest of the log is still good
        return rows


def grid_rows(n: int) -> int:
    """Images per row for a roughly square grid."""
    return max(1, math.ceil(math.sqrt(n)))


TEXT_SEPARATOR = "\n----\n"  # between the texts of a .txt of samples


GRID_PAD_VALUE = 0.5  # grey between the images: both black and white digits stand out against it


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = GRID_PAD_VALUE) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] -> one (C, H', W') picture of ``nrow`` images per row, each framed by ``padding``
    pixels of ``pad_value`` (the last row's empty cells grey too); gray images (C = 1) become RGB (C = 3).

    The picture torchvision's make_grid draws with the same arguments (one image alone comes back unframed, as
    there), written here so that sampling and inspecting never import torchvision (seconds of start-up: its
    models pull in torch._dynamo)."""
    if images.dim() != 4:
        raise GenaiError(f"a grid takes images of shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, c, h, w = images.shape
    if n == 1:
        return images[0]
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    cell_h, cell_w = h + padding, w + padding
    # every image in the bottom-right corner of a cell of (h + padding, w + padding); the grid adds one more
    # padding strip on the right and at the bottom, so each image has padding on all four sides
    cells = images.new_full((rows * cols, c, cell_h, cell_w), pad_value)
    cells[:n, :, padding:, padding:] = images
    grid = images.new_full((c, rows * cell_h + padding, cols * cell_w + padding), pad_value)
    grid[:, :rows * cell_h, :cols * cell_w] = (cells.view(rows, cols, c, cell_h, cell_w)
                                                .permute(2, 0, 3, 1, 4).reshape(c, rows * cell_h, cols * cell_w))
    return grid


def to_pil(picture: torch.Tensor):
    """(3, H, W) in [0, 1] -> an RGB PIL image, each value rounded to the nearest of 0..255."""
    from PIL import Image

    pixels = (picture.float().cpu() * 255 + 0.5).clamp(0, 255).to(torch.uint8)  # +0.5 then truncate: rounding
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, padding: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.float().clamp(0, 1).cpu()
    to_pil(make_grid(images, nrow=nrow or grid_rows(images.shape[0]), padding=padding)).save(path)


def labelled_grid(rows: list[torch.Tensor], labels: list[str], path: Path) -> None:
    """One PNG, one labelled row per setting (the sweep grid)."""
    from PIL import Image, ImageDraw

    grids = [make_grid(r.float().clamp(0, 1).cpu(), nrow=r.shape[0], padding=2) for r in rows]
    scale = max(1, 32 // rows[0].shape[-1])  # small images are enlarged so the labels stay legible
    width_label = 130
    h, w = grids[0].shape[1] * scale, grids[0].shape[2] * scale
    canvas = Image.new("RGB", (width_label + w, h * len(grids)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (g, text) in enumerate(zip(grids, labels)):
        arr = (g.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        im = Image.fromarray(arr).resize((w, h), Image.NEAREST)
        canvas.paste(im, (width_label, i * h))
        draw.text((4, i * h + h // 2 - 6), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
