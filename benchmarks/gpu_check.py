"""The GPU path, exercised: every family trained briefly in every setting the CUDA path offers, and the CIFAR-10
recipe's training images/s against diffusers' UNet of the same size.

    python benchmarks/gpu_check.py [--steps 20] [--families ddpm,vae] [--compile-families ddpm,transformer,dcgan]
                                   [--ddp-families ddpm,dcgan] [--recipe-steps 10] [--device auto] [--runs-dir DIR]
                                   [--json results.json]

On a CUDA machine, for every registered family (and each family that models text, once more on text), on synthetic
shapes (16x16, batch 32, the family's ``tiny`` model):

train     ``--steps`` steps (20) in the precision ``auto`` resolves to (bf16 where the GPU has it, else fp16 with the
          grad scaler), through the toolkit's own entry point (``session.start_run``: ``train.assemble`` + the
          Trainer), validation, a grid and a checkpoint at the end; the cell gives the precision and images/s.
fp16      the same with ``train.precision: fp16``: autocast fp16 and ``torch.amp.GradScaler`` (its final scale is
          shown). **On a CPU there is no fp16 grad-scaler path** (``precision fp16`` is refused off CUDA), so the
          column runs ``bf16`` autocast instead and says so.
chlast    ``train.channels_last`` (convolutional families; the others refuse it, shown as n/a).
compile   ``train.compile`` (``--compile-families``; every family with ``--compile-families all``): the loss routed
          through ``torch.compile``, or a GAN's sub-networks compiled.
sample    the run's checkpoint loaded (``api.load_checkpoint``) and drawn from on the device (``generate.draw``):
          finite images in [0, 1], or texts.
DDP       ``genai train --nproc N`` (torchrun, ``--ddp-families``): 2 processes over NCCL where two GPUs are
          visible, one process on one GPU; on a CPU 2 processes over gloo (the same DDP code, another backend).

Then the CIFAR-10 recipe (``configs/ddpm_cifar10.yaml``: 35.7M parameters, batch 128, channels_last, precision
auto) trains on synthetic 3x32x32 images (the machine needs no network) for 3 x ``--recipe-steps`` steps; its
images/s over the last third (the Trainer's own log) is set against diffusers' ``UNet2DModel`` of the same widths,
depth, attention level, head width, groups and dropout, trained by the loop of diffusers' unconditional example
(noise, add_noise, MSE, backward, clip 1, AdamW) under the same autocast, timed over its last third too.

Without CUDA the same code runs on the CPU at tiny sizes (8x8 images, batch 8, 3 steps, the recipe at base width
8, batch 4): ``tests/test_gpu_check.py`` runs it so it cannot rot. The table names the GPU (or the CPU) it ran on;
the exit code is 1 when any cell failed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Console
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genai_cli import models  # noqa: E402, F401  (registers every family)
from genai_cli.config import from_dict, load_config, parent_refs  # noqa: E402
from genai_cli.registry import MODELS  # noqa: E402

RECIPE = ROOT / "configs" / "ddpm_cifar10.yaml"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40
COLUMNS = ("train", "fp16", "chlast", "compile", "sample", "DDP")
DEFAULT_COMPILE = ("ddpm", "transformer", "dcgan")  # the compiled loss, a compiled token model, a GAN's sub-networks
DEFAULT_DDP = ("ddpm", "dcgan")  # DDP around the loss; a family stepping its own optimizers (gradients averaged)


@dataclass
class Cell:
    status: str  # ok | n/a | FAIL
    text: str

    def __str__(self) -> str:
        return self.text if self.status == "ok" else f"{self.status}: {self.text}"


@dataclass
class Setup:
    device: torch.device
    steps: int
    size: int
    batch: int
    root: Path  # the runs folder of this check
    text_path: Path
    compile: set[str]
    ddp: set[str]
    log: Callable[[str], None]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def check(fn: Callable[[], Cell], what: str, log: Callable[[str], None]) -> Cell:
    """One cell: what ``fn`` reports, or FAIL with the first line of its error (the traceback goes to the log)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (a check reports every failure in its cell and goes on with the next)
        log(f"{what} failed:\n{traceback.format_exc()}")
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return Cell("FAIL", f"{type(e).__name__}: {first[:100]}")


# -- one family -----------------------------------------------------------------------------------
def family_order(names: list[str]) -> list[str]:
    """Parents before the families that build on them (their runs are the children's model.<field>)."""
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for ref in parent_refs(MODELS.get(name).Config).values():
            visit(ref.accepts[0])
        done.append(name)

    for name in names:
        visit(name)
    return done


def run_config(family: str, s: Setup, text: bool, **train) -> dict:
    """A short run of ``family``'s tiny model on synthetic shapes (or the text file), parents named by their run."""
    cls = MODELS.get(family)
    refs = {key: f"{ref.accepts[0]}-train" for key, ref in parent_refs(cls.Config).items()}
    model = {"family": family, **refs, **cls.tiny}
    if text:
        model.pop("levels", None)  # a text model's tokens are its characters
        data = {"name": "text_file", "path": str(s.text_path), "block_size": 16}
    else:
        data = {"name": "shapes", "image_size": s.size, "limit": 4 * s.batch}
    return {"model": model, "data": data,
            # the rate logged at the last step covers the second half: not the first steps (warm-up, compiling)
            "train": {"max_steps": s.steps, "batch_size": s.batch, "log_every": max(1, s.steps // 2),
                      "eval_every": s.steps,
                      "checkpoint_every": s.steps, "sample_every": s.steps, "sample_n": 4, "warmup_steps": 1,
                      "eval_max_images": 16, "precision": "auto", "device": s.device.type, **train},
            "sample": {"n": 4, **({"max_new_tokens": 16} if text else {})}}


def train_run(raw: dict, s: Setup, name: str):
    """``genai train``'s own path (session.start_run: train.assemble + Trainer.fit); returns (trainer, result)."""
    from genai_cli.session import start_run

    trainer = start_run(from_dict(raw, source=name), s.root, name=name, force=True, quiet=True,
                        console=Console(quiet=True))
    result = trainer.fit()
    if trainer.step != raw["train"]["max_steps"] or not math.isfinite(result["loss"]):
        raise RuntimeError(f"trained {trainer.step} steps, loss {result['loss']}")
    return trainer, result


def rate(result: dict) -> str:
    return f"{result.get('images_per_sec', 0):,.0f} img/s"


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules())


def check_family(family: str, s: Setup, text: bool = False) -> dict[str, Cell]:
    """The row of one family: its runs in each setting, its samples, and DDP."""
    row: dict[str, Cell] = {}
    stem = f"{family}{'-text' if text else ''}"
    built: dict = {}

    def train_auto() -> Cell:
        trainer, result = train_run(run_config(family, s, text), s, f"{stem}-train")
        built["model"] = trainer.model
        return Cell("ok", f"{trainer.precision.resolved} {rate(result)}")

    def fp16() -> Cell:
        if not s.cuda:  # precision fp16 is refused off CUDA: there is no fp16 grad scaler for the CPU
            _, result = train_run(run_config(family, s, text, precision="bf16"), s, f"{stem}-bf16")
            return Cell("ok", f"bf16 (CPU: no fp16 scaler) {rate(result)}")
        trainer, result = train_run(run_config(family, s, text, precision="fp16"), s, f"{stem}-fp16")
        scaler = trainer.stepper.scaler
        if scaler is None:
            raise RuntimeError("precision fp16 trained without a grad scaler")
        return Cell("ok", f"scale {scaler.get_scale():g} {rate(result)}")

    def channels_last() -> Cell:
        if "model" not in built or not has_conv(built["model"]):
            return Cell("n/a", "no conv")
        _, result = train_run(run_config(family, s, text, channels_last=True), s, f"{stem}-chlast")
        return Cell("ok", rate(result))

    def compiled() -> Cell:
        if family not in s.compile and "all" not in s.compile:
            return Cell("n/a", "not asked")
        t0 = time.perf_counter()
        _, result = train_run(run_config(family, s, text, compile=True), s, f"{stem}-compile")
        return Cell("ok", f"{rate(result)}, {time.perf_counter() - t0:.0f} s in all")

    def sample() -> Cell:
        from genai_cli.api import load_checkpoint
        from genai_cli.generate import SampleRequest, draw

        if not MODELS.get(family).generative:
            return Cell("n/a", "draws nothing")
        model = load_checkpoint(s.root / f"{stem}-train" / "checkpoints" / "last.pt", device=str(s.device))
        t0 = time.perf_counter()
        samples = draw(model, SampleRequest(n=4, seed=0), device=s.device)
        seconds = time.perf_counter() - t0
        if samples.texts is not None:
            if len(samples.texts) != 4:
                raise RuntimeError(f"{len(samples.texts)} texts instead of 4")
            return Cell("ok", f"4 texts {seconds:.2f} s")
        images = samples.images
        if images.shape[0] != 4 or not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise RuntimeError(f"images {tuple(images.shape)} outside [0, 1] or not finite")
        return Cell("ok", f"4 images {seconds:.2f} s")

    def ddp() -> Cell:
        if family not in s.ddp and "all" not in s.ddp:
            return Cell("n/a", "not asked")
        from genai_cli.runs import load_checkpoint_file
        from genai_cli.session import launch

        nproc = min(2, torch.cuda.device_count()) if s.cuda else 2
        backend = "nccl" if s.cuda else "gloo"
        raw = run_config(family, s, text)
        path = s.root.parent / f"{stem}-ddp.yaml"
        path.write_text(yaml.safe_dump(raw))
        name = f"{stem}-ddp"
        t0 = time.perf_counter()
        code = launch(nproc, from_dict(raw), s.root, name=name, force=True,
                      args=["train", str(path), "--name", name, "--force", "--runs-dir", str(s.root), "--quiet"])
        if code != 0:
            raise RuntimeError(f"genai train --nproc {nproc} exited with {code}")
        state = load_checkpoint_file(s.root / name / "checkpoints" / "last.pt")
        if state["step"] != s.steps or state["world_size"] != nproc:
            raise RuntimeError(f"step {state['step']}, {state['world_size']} processes")
        how = f"{backend} x{nproc}" if nproc > 1 else "1 process (one GPU)"
        return Cell("ok", f"{how}, {time.perf_counter() - t0:.0f} s")

    for column, fn in zip(COLUMNS, (train_auto, fp16, channels_last, compiled, sample, ddp)):
        row[column] = check(fn, f"{stem} {column}", s.log)
        s.log(f"{stem:<18} {column:<8} {row[column]}")
    return row


# -- the CIFAR-10 recipe against diffusers --------------------------------------------------------
def recipe_peer(unet, size: int, dropout: float, attention_levels: list[int]):
    """diffusers' UNet2DModel with our UNet's widths, ResBlocks per level, attention levels (and the middle block),
    attention heads of 32 channels (fewer when narrower), GroupNorm groups and dropout: the network of the same size."""
    from diffusers import UNet2DModel

    from genai_cli.nn.unet import norm_groups

    widths = tuple(unet.base_channels * m for m in unet.channel_mults)
    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(len(widths)))
    up = tuple("AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(len(widths))))
    return UNet2DModel(sample_size=size, in_channels=unet.in_channels, out_channels=unet.in_channels,
                       layers_per_block=unet.num_res_blocks, block_out_channels=widths, down_block_types=down,
                       up_block_types=up, dropout=dropout, attention_head_dim=min(32, min(widths)),
                       norm_num_groups=norm_groups(unet.base_channels))


def time_peer(peer, s: Setup, batch: int, size: int, window: int, dtype: torch.dtype | None) -> float:
    """diffusers' unconditional-training loop on ``peer`` for 3 x ``window`` steps; images/s over the last window."""
    from diffusers import DDPMScheduler

    device = s.device
    peer.to(device).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.AdamW(peer.parameters(), lr=2e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.rand(batch, 3, size, size, generator=g, device=device) * 2 - 1
    start = 0.0
    for step in range(3 * window):
        if step == 2 * window:
            if s.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = torch.randint(0, 1000, (batch,), generator=g, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = peer(scheduler.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # as our loop reads its loss every step
    if s.cuda:
        torch.cuda.synchronize()
    return window * batch / (time.perf_counter() - start)


def check_recipe(s: Setup, window: int) -> dict:
    """The CIFAR-10 recipe's training images/s (ours, through the Trainer) and the diffusers UNet's, same batch."""
    from genai_cli.runs import MetricsLog
    from genai_cli.session import start_run

    batch = 128 if s.cuda else 4
    overrides = ["data.name=shapes", "data.channels=3", f"data.limit={2 * batch}", f"train.max_steps={3 * window}",
                 f"train.batch_size={batch}", f"train.log_every={window}", f"train.eval_every={3 * window}",
                 f"train.checkpoint_every={3 * window}", f"train.sample_every={3 * window}", "train.sample_n=4",
                 "train.eval_max_images=16", f"train.device={s.device.type}"]
    if not s.cuda:
        overrides += ["model.base_channels=8"]
    cfg = load_config(RECIPE, overrides)
    trainer = start_run(cfg, s.root, name="cifar10-recipe", force=True, quiet=True, console=Console(quiet=True))
    trainer.fit()
    logged = [r for r in MetricsLog(trainer.run_dir / "metrics.jsonl").read() if r.get("split") == "train"]
    ours = float(logged[-1]["images_per_sec"])  # the window of the last `window` steps
    unet = trainer.model.unet
    peer = recipe_peer(unet, 32, cfg.model.dropout, list(cfg.model.attention_levels))
    precision = trainer.precision
    theirs = time_peer(peer, s, batch, 32, window, precision.dtype)
    return {"batch": batch, "precision": precision.resolved, "channels_last": cfg.train.channels_last,
            "ours_params": sum(p.numel() for p in trainer.model.parameters()),
            "peer_params": sum(p.numel() for p in peer.parameters()),
            "ours_images_per_sec": ours, "peer_images_per_sec": theirs, "ratio": ours / theirs}


# -- the table ------------------------------------------------------------------------------------
def where(device: torch.device) -> str:
    from genai_cli.hardware import machine_line

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"GPU: {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, "
                f"{torch.cuda.device_count()} visible) | torch {torch.__version__} | CUDA {torch.version.cuda}")
    return f"no CUDA: the CPU path at tiny sizes | {machine_line()}"


def table(rows: dict[str, dict[str, Cell]], recipe: dict | Cell | None, header: str) -> str:
    lines = [f"gpu_check on {header}", "", "| family | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    if isinstance(recipe, dict):
        lines += ["", f"CIFAR-10 recipe, training images/s at batch {recipe['batch']} ({recipe['precision']}, "
                      f"channels_last {'on' if recipe['channels_last'] else 'off'} for ours):", "",
                  "| network | parameters | images/s | / diffusers |", "|---|---:|---:|---:|",
                  f"| ours (Trainer) | {recipe['ours_params']:,} | {recipe['ours_images_per_sec']:,.1f} | "
                  f"{recipe['ratio']:.2f}x |",
                  f"| diffusers UNet2DModel | {recipe['peer_params']:,} | {recipe['peer_images_per_sec']:,.1f} | "
                  f"1.00x |"]
    elif recipe is not None:
        lines += ["", f"CIFAR-10 recipe: {recipe}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    parser.add_argument("--steps", type=int, help="training steps per check (default: 20 on CUDA, 3 on the CPU)")
    parser.add_argument("--size", type=int, help="image side of the family checks (default: 16 on CUDA, 8 on CPU)")
    parser.add_argument("--batch", type=int, help="batch of the family checks (default: 32 on CUDA, 8 on CPU)")
    parser.add_argument("--families", default="all", help="comma-separated families (default: every registered one)")
    parser.add_argument("--text", default="all", help="families also trained on text: all, none or a list")
    parser.add_argument("--compile-families", default=",".join(DEFAULT_COMPILE), help="or 'all', or 'none'")
    parser.add_argument("--ddp-families", default=",".join(DEFAULT_DDP), help="or 'all', or 'none'")
    parser.add_argument("--recipe-steps", type=int, help="timed steps of the CIFAR-10 recipe (10 on CUDA, 1 on CPU); "
                        "0 skips it")
    parser.add_argument("--runs-dir", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    from genai_cli.hardware import pick_device

    device = pick_device(args.device)
    cuda = device.type == "cuda"

    def names(value: str, pool: list[str]) -> list[str]:
        if value == "all":
            return pool
        if value == "none":
            return []
        chosen = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [v for v in chosen if v not in MODELS]
        if unknown:
            parser.error(f"unknown families {', '.join(unknown)}; known: {', '.join(MODELS.names())}")
        return chosen

    families = names(args.families, MODELS.names())
    text = [f for f in names(args.text, MODELS.names()) if "tokens" in MODELS.get(f).modalities and f in families]
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        folder = args.runs_dir or Path(tmp)
        root = folder / "runs"
        root.mkdir(parents=True, exist_ok=True)
        text_path = folder / "text.txt"
        text_path.write_text(TEXT, encoding="utf-8")
        s = Setup(device, args.steps or (20 if cuda else 3), args.size or (16 if cuda else 8),
                  args.batch or (32 if cuda else 8), root, text_path,
                  set(names(args.compile_families, MODELS.names()) if args.compile_families != "all" else ["all"]),
                  set(names(args.ddp_families, MODELS.names()) if args.ddp_families != "all" else ["all"]), log)
        rows = {}
        for family in family_order(families):
            rows[family] = check_family(family, s)
            if family in text:
                rows[f"{family} (text)"] = check_family(family, s, text=True)
        window = args.recipe_steps if args.recipe_steps is not None else (10 if cuda else 1)
        recipe = check(lambda: check_recipe(s, window), "the CIFAR-10 recipe", log) if window > 0 else None
    header = where(device)
    print(table(rows, recipe, header))
    if args.json:
        args.json.write_text(json.dumps({"device": header, "rows": {k: {c: asdict(v) for c, v in r.items()}
                                                                      for k, r in rows.items()},
                                         "recipe": asdict(recipe) if isinstance(recipe, Cell) else recipe}, indent=2))
    failed = [f"{k} {c}" for k, r in rows.items() for c, v in r.items() if v.status == "FAIL"]
    if isinstance(recipe, Cell) and recipe.status == "FAIL":
        failed.append("the CIFAR-10 recipe")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
