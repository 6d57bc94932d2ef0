"""Faults: kill -9 at random moments (during checkpoint writes too), SIGTERM, NaN/Inf, checkpoint rotation.

Also a script: ``python tests/test_faults.py --kills 10`` prints what each kill hit.

The training processes are forked from this one and run the real CLI (``genai train``), so each start costs
no second import of torch; SIGKILL gives them no chance to clean up, exactly like ``kill -9``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import tiny_config, train_losses, train_tiny_parents  # noqa: E402

import genai_cli.models  # noqa: E402, F401  (registers the families the tests are parametrised over)
from genai_cli.capabilities import has  # noqa: E402
from genai_cli.registry import MODELS  # noqa: E402
from genai_cli.runs import load_checkpoint_file  # noqa: E402

STEPS = 60
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks training processes")


def start(argv: list[str]) -> int:
    """Fork a process running ``genai <argv>``; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # the children's progress lines would only clutter the test output
            from genai_cli.cli import app

            app(argv, prog_name="genai")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"training (pid {pid}) did not finish in {timeout:.0f} s; killed it")


def wait_for(condition, pid: int, what: str, timeout: float = 60, poll: float = 0.001) -> None:
    """Poll until ``condition()`` holds while child ``pid`` runs. A child that dies first, or a deadline that
    passes (the child is then killed), fails the test with a message instead of hanging it."""
    deadline = time.monotonic() + timeout
    while not condition():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise AssertionError(f"training (pid {pid}) ended with exit code {os.waitstatus_to_exitcode(status)} "
                                 f"before {what}")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"no {what} within {timeout:.0f} s; killed training (pid {pid})")
        time.sleep(poll)


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def config(folder: Path, **train) -> Path:
    # base_channels 16: a checkpoint of about 2.6 MB, so a write takes long enough to be hit.
    raw = tiny_config("ddpm", **{"max_steps": STEPS, "log_every": 1, "eval_every": 5, "checkpoint_every": 1,
                                 "sample_every": 20, **train})
    raw["model"]["base_channels"] = 16
    path = folder / "faults.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def temp_files(run: Path) -> list[str]:
    return [p.name for folder in (run, run / "checkpoints") for p in folder.glob(".*.tmp-*")]


def kill_repeatedly(folder: Path, kills: int, seed: int = 0, log=print) -> dict:
    """Train, kill -9, resume, ... ``kills`` times, then resume to the end; compare with a run never killed."""
    rng = random.Random(seed)
    cfg = config(folder)
    runs = folder / "runs"
    common = ["--runs-dir", str(runs), "-q"]
    assert wait(start(["train", str(cfg), "--name", "straight", *common])) == 0
    run = runs / "cut"
    checkpoints = run / "checkpoints"
    mid_write = 0
    for k in range(kills):
        argv = ["train", str(cfg), "--name", "cut", *common] if k == 0 else ["train", "--resume", str(run), *common]
        before = inode(checkpoints / "last.pt") if k else None
        pid = start(argv)
        # Each kill comes after one new checkpoint, so that every round makes progress.
        wait_for(lambda before=before: inode(checkpoints / "last.pt") not in (None, before), pid,
                 f"kill {k + 1}: a new last.pt")
        during_write = k % 2 == 1
        if during_write:  # wait for a checkpoint write to begin, then kill at once
            pattern = checkpoints / f".last.pt.tmp-{pid}"
            wait_for(pattern.exists, pid, f"kill {k + 1}: a checkpoint write", timeout=30, poll=0.0002)
        else:
            time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        code = wait(pid)
        assert code == -signal.SIGKILL, f"kill {k + 1}: the run ended by itself (exit {code}); raise STEPS"
        left = [name for name in temp_files(run) if name.endswith(f"-{pid}")]
        mid_write += bool(left)
        state = load_checkpoint_file(checkpoints / "last.pt")  # must load, every time
        log(f"kill {k + 1:2d} ({'in a write' if during_write else 'at random'}): last.pt at step {state['step']:2d}"
            f"{', cut a write: ' + ', '.join(left) if left else ''}")
    assert wait(start(["train", "--resume", str(run), *common])) == 0
    assert not temp_files(run), "resume tidies temporary files left by kills"
    straight, cut = train_losses(runs / "straight"), train_losses(run)
    a = torch.load(runs / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(checkpoints / "last.pt", weights_only=True)
    same = straight == cut and all(torch.equal(a[part][key], b[part][key]) for part in ("model", "ema")
                                   for key in a[part])
    log(f"{kills} kills, {mid_write} during a checkpoint write; resumed run equals the uninterrupted one: {same}")
    return {"mid_write": mid_write, "same": same, "steps": sorted(cut)}


@pytest.mark.slow
def test_kill_minus_9_ten_times_then_resume_equals_uninterrupted(tmp_path):
    result = kill_repeatedly(tmp_path, kills=10)
    assert result["same"], "after 10 kills the resumed run must equal the run never killed, bit for bit"
    assert result["steps"] == list(range(1, STEPS + 1))
    assert result["mid_write"] >= 1, "no kill landed during a checkpoint write"


def test_sigterm_stops_at_a_step_boundary_and_resume_is_exact(tmp_path):
    cfg = config(tmp_path, checkpoint_every=100, max_steps=12)
    runs = tmp_path / "runs"
    common = ["--runs-dir", str(runs), "-q"]
    assert wait(start(["train", str(cfg), "--name", "straight", *common])) == 0
    pid = start(["train", str(cfg), "--name", "cut", *common])
    metrics = runs / "cut" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().count('"train"') >= 2, pid, "two logged steps",
             poll=0.002)
    os.kill(pid, signal.SIGTERM)
    assert wait(pid) == 130, "SIGTERM: finish the step, save, exit 130"
    state = load_checkpoint_file(runs / "cut" / "checkpoints" / "last.pt")
    assert 2 <= state["step"] < 12
    assert wait(start(["train", "--resume", str(runs / "cut"), *common])) == 0
    assert train_losses(runs / "straight") == train_losses(runs / "cut")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, bad):
    from typer.testing import CliRunner

    from genai_cli.cli import app
    from genai_cli.models.diffusion import DDPM

    original = DDPM.train_step

    def poisoned(self, *args, **kwargs):
        logs = original(self, *args, **kwargs)
        return {**logs, "loss": bad} if self.current_step == 4 else logs

    monkeypatch.setattr(DDPM, "train_step", poisoned)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(max_steps=8, checkpoint_every=2)))
    runs = tmp_path / "runs"
    r = CliRunner().invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "--name", "x", "-q"])
    assert r.exit_code == 2 and f"loss became {bad} at step 5" in r.stderr and len(r.stderr.splitlines()) == 1
    assert load_checkpoint_file(runs / "x" / "checkpoints" / "last.pt")["step"] == 4


def test_rotation_keeps_the_last_k_and_the_best(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from genai_cli.cli import app
    from genai_cli.train import Trainer

    fake_val = iter([3.0, 1.0, 2.0, 2.5, 4.0, 5.0])  # the best validation loss comes at step 2

    def validate(self):
        return {"val_loss": next(fake_val)}

    monkeypatch.setattr(Trainer, "validate", validate)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(max_steps=6, checkpoint_every=1, eval_every=1, keep_checkpoints=2)))
    runs = tmp_path / "runs"
    r = CliRunner().invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "--name", "x", "-q"])
    assert r.exit_code == 0, r.stderr
    folder = runs / "x" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "step_000005.pt", "step_000006.pt"]
    best = load_checkpoint_file(folder / "best.pt")
    assert best["step"] == 2 and best["summary"]["best_val_loss"] == 1.0
    assert load_checkpoint_file(folder / "step_000005.pt")["step"] == 5
    assert load_checkpoint_file(folder / "last.pt")["step"] == 6


@pytest.mark.parametrize("family", MODELS.names())
def test_exact_resume_across_families_and_an_epoch_boundary(tmp_path, monkeypatch, family):
    """Two optimizers and random z (GANs), reparameterisation noise (VAE), dropout, diffusion noise, and for the
    likelihood families images binarised afresh at every visit (data.binarize: stochastic): stopped at step 7
    and resumed, the run crosses into epoch 1 (8 steps per epoch) exactly as the one never stopped."""
    from typer.testing import CliRunner

    from genai_cli.cli import app
    from genai_cli.train import Trainer

    cls = MODELS.get(family)
    raw = tiny_config(family, max_steps=10, log_every=1, eval_every=5, checkpoint_every=100, sample_every=100)
    if "dropout" in {f.name for f in dataclasses.fields(cls.Config)}:
        raw["model"]["dropout"] = 0.1
    if has(cls, "log_likelihood"):  # the binarised-likelihood protocol: fresh Bernoulli draws at every visit
        raw["data"]["binarize"] = "stochastic"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    runs = tmp_path / "runs"
    train_tiny_parents(family, runs)
    invoke = CliRunner().invoke
    assert invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "--name", "straight", "-q"]).exit_code == 0
    original = Trainer.after_step

    def stop_at_7(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.step == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "after_step", stop_at_7)
    assert invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "--name", "cut", "-q"]).exit_code == 130
    monkeypatch.undo()
    r = invoke(app, ["train", "--resume", str(runs / "cut"), "--runs-dir", str(runs), "-q"])
    assert r.exit_code == 0, r.stderr
    assert train_losses(runs / "straight") == train_losses(runs / "cut")
    a, b = (torch.load(runs / run / "checkpoints" / "last.pt", weights_only=True) for run in ("straight", "cut"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name, opt in a["optimizers"].items():
        for index, state in opt["state"].items():
            for k, v in state.items():
                assert torch.equal(v, b["optimizers"][name]["state"][index][k]), (name, index, k)


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="kill -9 a training run at random moments, then resume")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        outcome = kill_repeatedly(Path(tmp), args.kills, args.seed)
    sys.exit(0 if outcome["same"] else 1)
