"""Training options of the loop: bf16 vs fp32, gradient accumulation, channels-last, torch.compile, TensorBoard."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_config
from rich.console import Console
from typer.testing import CliRunner

from genai_cli.capabilities import has
from genai_cli.cli import app
from genai_cli.config import from_dict
from genai_cli.errors import GenaiError
from genai_cli.registry import MODELS
from genai_cli.train import EMA, LossForward, Trainer

runner = CliRunner()


def fit(tmp: Path, family: str, **train) -> tuple[Trainer, list[float]]:
    run = tmp / f"run-{len(list(tmp.iterdir()))}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "samples").mkdir()
    raw = tiny_config(family, **{"max_steps": 8, "log_every": 1, "eval_every": 100, "sample_every": 100,
                                 "checkpoint_every": 100, "warmup_steps": 1, "lr": 2e-3, **train})
    trainer = Trainer(from_dict(raw), run, quiet=True, console=Console(quiet=True))
    losses = []
    original = trainer.after_step

    def record(logs, *args):
        losses.append(logs["loss"])
        original(logs, *args)

    trainer.after_step = record
    trainer.fit()
    return trainer, losses


def first(**capabilities) -> str:
    """The first registered family whose class attributes have these values."""
    return next(name for name in MODELS.names()
                if all(getattr(MODELS.get(name), k, None) == v for k, v in capabilities.items()))


# A discrete family (without a recurrent kernel: those run their recurrence in fp32) and the diffusion family.
BF16_FAMILIES = [first(discrete=True, has_hidden_state=False),
                 next(n for n in MODELS.names() if has(MODELS.get(n), "variational_bound"))]


@pytest.mark.parametrize("family", BF16_FAMILIES)
def test_bf16_loss_stays_close_to_fp32(tmp_path, family):
    """bf16 autocast is a first-class CPU setting: over a short run its losses track fp32's."""
    _, fp32 = fit(tmp_path, family)
    _, bf16 = fit(tmp_path, family, precision="bf16")
    worst = max(abs(a - b) / abs(a) for a, b in zip(fp32, bf16))
    print(f"{family}: bf16 vs fp32 worst relative loss difference {worst:.2%}")
    assert worst < 0.01, f"bf16 drifted from fp32 by {worst:.3%}: {fp32} vs {bf16}"
    assert fp32 != bf16, "bf16 autocast did not take effect"


def test_accumulated_micro_batches_equal_one_batch(tmp_path):
    one, losses_one = fit(tmp_path, "pixelcnn", ema_decay=None)
    four, losses_four = fit(tmp_path, "pixelcnn", ema_decay=None, grad_accum=4)
    assert max(abs(a - b) for a, b in zip(losses_one, losses_four)) < 1e-5
    for p, q in zip(one.model.parameters(), four.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_ema_warmup_off_averages_at_the_decay_from_the_first_step(tmp_path):
    model = torch.nn.Linear(2, 2)
    start = model.weight.detach().clone()
    plain, warm = EMA(model, 0.9, warmup=False), EMA(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    plain.update(model, 0)
    warm.update(model, 0)
    assert torch.allclose(plain.module.weight, start + 0.1)  # 0.9 x the average + 0.1 x the weights
    assert torch.allclose(warm.module.weight, start + 0.9)  # the warm-up's decay at step 0: 1 / 10
    assert warm.rate(2_000) == 0.9 and [warm.rate(s) for s in (0, 10)] == [0.1, 0.55]
    trainer, _ = fit(tmp_path, "pixelcnn", ema_decay=0.99, ema_warmup=False)
    assert trainer.ema.rate(0) == 0.99


def test_channels_last_trains_a_conv_family_the_same(tmp_path):
    plain, losses_plain = fit(tmp_path, "autoencoder", max_steps=3)
    nhwc, losses_nhwc = fit(tmp_path, "autoencoder", max_steps=3, channels_last=True)
    conv = next(p for p in nhwc.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert max(abs(a - b) for a, b in zip(losses_plain, losses_nhwc)) < 1e-4


def test_channels_last_is_refused_for_a_family_without_convolutions(tmp_path):
    with pytest.raises(GenaiError, match="channels_last is for convolutional families"):
        fit(tmp_path, "pixel_transformer", channels_last=True)


def test_compile_goes_through_the_loss_or_the_sub_networks(tmp_path, monkeypatch):
    """torch.compile itself is exercised by benchmarks/bench_precision.py (a first compile takes ~30 s here);
    this checks what the loop hands to it."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    trainer, _ = fit(tmp_path, "pixelcnn", compile=True, max_steps=2)
    assert len(compiled) == 1 and isinstance(compiled[0], LossForward) and compiled[0].model is trainer.model
    children = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: children.append(self))
    gan, _ = fit(tmp_path, first(adversarial=True), compile=True, max_steps=2)
    assert children == list(gan.model.children())  # a GAN steps its own optimizers: its networks are compiled


def test_tensorboard_gets_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(max_steps=2, log=["jsonl", "tensorboard"])))
    runs = tmp_path / "runs"
    r = runner.invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "--name", "tb", "-q"])
    assert r.exit_code == 0, r.stderr
    events = EventAccumulator(str(runs / "tb" / "tensorboard")).Reload()
    assert {"train/loss", "val/val_loss"} <= set(events.Tags()["scalars"])
    assert "samples" in events.Tags()["images"]
    assert (runs / "tb" / "metrics.jsonl").is_file()


def test_tensorboard_missing_is_one_clear_line_and_leaves_no_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an install without it looks like
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(max_steps=2, log=["tensorboard"])))
    runs = tmp_path / "runs"
    r = runner.invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "--name", "tb", "-q"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == ["error: train.log asks for tensorboard but the tensorboard package is "
                                             "not installed; pip install 'genai-cli[tensorboard]' or drop it from "
                                             "train.log"]
    assert not (runs / "tb").exists()


def test_unknown_log_sink_is_refused():
    with pytest.raises(GenaiError, match="did you mean 'tensorboard'"):
        from_dict(tiny_config(log=["tensorbord"]))
