"""Data-parallel training: 2 CPU processes with gloo take the same steps as 1 process with the same global batch.

PixelCNN's loss is a deterministic function of the batch, so the comparison is exact up to float rounding.
DDPM and the GANs draw noise inside the step; each rank draws its own (seed, rank, step) stream, so their
2-process runs are reproducible but not equal to a 1-process run: for them the test checks that the
ranks stay identical (same weights everywhere after training).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_config, train_losses
from rich.console import Console
from typer.testing import CliRunner

from genai_cli import distributed
from genai_cli.cli import app
from genai_cli.config import from_dict
from genai_cli.train import Trainer

runner = CliRunner()
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the ranks")
REPO = Path(__file__).resolve().parent.parent


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def test_torchrun_two_gloo_processes_equal_one_process_even_through_ctrl_c(tmp_path):
    """End to end: genai train --nproc 2 starts torchrun; Ctrl-C stops both ranks after the same step (exit 130,
    one line); --resume --nproc 2 finishes; the result equals a single process's run."""
    steps = 30
    cfg = tmp_path / "pixelcnn.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config("pixelcnn", max_steps=steps, log_every=1, eval_every=10,
                                              checkpoint_every=1, sample_every=steps)))
    runs = tmp_path / "runs"
    r = runner.invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "--name", "one", "-q"])
    assert r.exit_code == 0, r.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    genai = [sys.executable, "-m", "genai_cli", "train", "--runs-dir", str(runs), "-q", "--nproc", "2"]
    p = subprocess.Popen([*genai, str(cfg), "--name", "two"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = runs / "two" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count('"train"') >= 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "x 2 processes" in out and out.count("run ") == 1, "only rank 0 talks"
    assert len(err.strip().splitlines()) == 1 and "checkpoint saved" in err, err
    stopped = torch.load(runs / "two" / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped < steps
    p = subprocess.run([*genai, "--resume", str(runs / "two")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr
    one, two = train_losses(runs / "one"), train_losses(runs / "two")
    assert one.keys() == two.keys() == set(range(1, steps + 1))
    loss_error = max(abs(one[s] - two[s]) for s in one)
    a = torch.load(runs / "one" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(runs / "two" / "checkpoints" / "last.pt", weights_only=True)
    weight_error = max(max_difference(a["model"], b["model"]), max_difference(a["ema"], b["ema"]))
    print(f"DDP equivalence over {steps} steps (stopped at {stopped}, resumed): max |loss difference| "
          f"{loss_error:.2e}, max |weight difference| {weight_error:.2e}")
    assert loss_error < 1e-4 and weight_error < 1e-4
    assert b["world_size"] == 2 and b["step"] == steps
    assert sorted(p.name for p in (runs / "two" / "checkpoints").iterdir()) == \
        sorted(p.name for p in (runs / "one" / "checkpoints").iterdir())


# -- in-process ranks (fork: no second import of torch, so these stay fast) ------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, fn, *args, timeout: float = 120) -> None:
    """Run fn(rank, *args) in `world` forked processes joined by gloo, as torchrun would; all must succeed."""
    port = free_port()
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                fn(rank, *args)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                distributed.shutdown()
                os._exit(code)
        pids.append(pid)
    deadline = time.monotonic() + timeout
    codes = {}
    while len(codes) < world:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            pytest.fail("ranks did not finish in time")
        time.sleep(0.05)
    assert list(codes.values()) == [0] * world, codes


def train_rank(rank: int, raw: dict, run: Path, out: Path) -> None:
    if rank == 0:
        (run / "checkpoints").mkdir(parents=True)
        (run / "samples").mkdir()
    trainer = Trainer(from_dict(raw), run, quiet=True, console=Console(quiet=True))
    trainer.fit()
    torch.save({n: p.detach() for n, p in trainer.model.named_parameters()}, out / f"rank{rank}.pt")


def single(raw: dict, run: Path) -> Trainer:
    (run / "checkpoints").mkdir(parents=True)
    (run / "samples").mkdir()
    trainer = Trainer(from_dict(raw), run, quiet=True, console=Console(quiet=True))
    trainer.fit()
    return trainer


@needs_fork
def test_accumulated_micro_batches_over_two_ranks_equal_one_process(tmp_path):
    """grad_accum 2 on 2 ranks: DDP stays silent, the stepper averages the banked gradients once."""
    raw = tiny_config("pixelcnn", max_steps=3, log_every=1, ema_decay=None, grad_accum=2)
    run_ranks(2, train_rank, raw, tmp_path / "two", tmp_path)
    plain = tiny_config("pixelcnn", max_steps=3, log_every=1, ema_decay=None)
    reference = single(plain, tmp_path / "one")
    two = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert max_difference({n: p.detach() for n, p in reference.model.named_parameters()}, two) < 1e-5
    one_losses, two_losses = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert max(abs(one_losses[s] - two_losses[s]) for s in one_losses) < 1e-5


@needs_fork
@pytest.mark.parametrize("family", ["dcgan", "ddpm"])
def test_ranks_stay_identical_for_families_that_draw_noise(tmp_path, family):
    """A GAN steps its own optimizers (gradients averaged by the stepper); DDPM goes through DDP. Either way
    every rank ends with the same weights, and the run is written once."""
    raw = tiny_config(family, max_steps=3, log_every=1)
    run_ranks(2, train_rank, raw, tmp_path / "run", tmp_path)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert max_difference(a, b) == 0.0
    assert set(train_losses(tmp_path / "run")) == {1, 2, 3}


def test_step_seeds_differ_across_ranks_and_steps():
    from genai_cli.train import step_seed

    seeds = {step_seed(0, r, s) for r in range(4) for s in range(1000)}
    assert len(seeds) == 4000 and all(0 <= s < 2**32 for s in seeds)


def test_batch_must_split_over_processes_and_micro_batches():
    from genai_cli.errors import GenaiError

    distributed.check_batch(8, 2, 2)
    with pytest.raises(GenaiError, match="use a multiple of 4"):
        distributed.check_batch(6, 1, 4)


def test_torchrun_command_names_the_module():
    cmd = distributed.torchrun_command(3, ["train", "c.yaml"])
    assert cmd[1:3] == ["-m", "genai_cli.distributed"] and "--nproc-per-node=3" in cmd
    assert cmd[-4:] == ["-m", "genai_cli", "train", "c.yaml"]
