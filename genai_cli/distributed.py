"""Data-parallel training over several processes, on PyTorch's own engine (torch.distributed, DDP).

torchrun starts one process per device and tells each where it stands through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); ``setup`` joins that process group with
``nccl`` on CUDA and ``gloo`` on the CPU. The rules the loop follows (genai_cli/train.py):

- ``train.batch_size`` is the global batch: every rank walks the same epoch order and takes its own
  contiguous slice of each batch, and gradients are averaged, so N processes take the same optimizer
  steps as one process with the whole batch (up to float rounding);
- only rank 0 writes (checkpoints, grids, metrics, TensorBoard); every rank resumes from the same
  checkpoint;
- random draws inside a step (DDPM's noise, a GAN's z, dropout) come from a seed made of
  (train.seed, rank, step), so ranks draw different noise and resuming needs no per-rank RNG state.

Multi-node needs nothing here: torchrun's rendezvous options (--nnodes, --node-rank, --rdzv-endpoint)
set the same environment. ``genai train --nproc N`` re-launches the command through torchrun.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import GenaiError

T = TypeVar("T")

# Rank 0 alone validates and draws grids while the others wait in the next all-reduce: be patient.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands. The default is a single process (rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_context = DistContext()


def context() -> DistContext:
    return _context


def under_torchrun() -> bool:
    """True in a process started by torchrun with more than one process in all."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join torchrun's process group (once; later calls return the same answer) and pick this rank's device.

    Outside torchrun this is a no-op returning the single-process context and ``device`` unchanged.
    """
    global _context
    if not under_torchrun():
        return _context, device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise GenaiError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); start at most "
                             f"{torch.cuda.device_count()} processes per node (--nproc / --nproc-per-node)")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise GenaiError(f"distributed training on '{device.type}' is not supported; use --set train.device=cpu "
                         f"or cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    _context = DistContext(rank=rank, world_size=world, local_rank=local, backend=backend)
    return _context, device


def shutdown(together: bool = False) -> None:
    """Leave the process group. ``together``: every rank got here the same way (a run that finished or stopped at
    the agreed step): wait for all at a barrier first, so that no rank tears down its connections while another
    still writes its last checkpoint or grid (a rank leaving early once ended the other with "terminate called
    without an active exception" in gloo's threads). Never after an error: a rank that failed alone would leave the
    others waiting at the barrier."""
    global _context
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
    _context = DistContext()


def check_batch(batch_size: int, grad_accum: int, world_size: int) -> None:
    """The global batch must split evenly into processes x micro-batches, or the ranks would disagree."""
    parts = world_size * grad_accum
    if batch_size % parts:
        fix = max(parts, batch_size // parts * parts)
        raise GenaiError(f"train.batch_size {batch_size} does not split into {world_size} process(es) x "
                         f"{grad_accum} micro-batch(es); use a multiple of {parts}, e.g. --set train.batch_size={fix}")


def share_from_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand every rank its result; a GenaiError on rank 0 is raised on every rank
    (so no rank is left waiting for one that has given up)."""
    if not _context.enabled:
        return fn()
    box: list[Any] = [None]
    if _context.is_main:
        try:
            box[0] = ("ok", fn())
        except GenaiError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise GenaiError(value)
    return value


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (DDP does this too; the manual path needs it)."""
    if not _context.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce the mean of the gradients, one flat buffer per dtype: what DDP's buckets do, for families
    that step their own optimizers (GANs) and for accumulated micro-batches."""
    if not _context.enabled:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
        dist.all_reduce(flat)
        flat /= _context.world_size
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))


def average_logs(logs: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each logged number over the ranks: the loss of the whole global batch."""
    if not _context.enabled:
        return logs
    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values /= _context.world_size
    return dict(zip(keys, values.tolist()))


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel: gradients are averaged in buckets while backward still runs.

    broadcast_buffers=False: buffers are either constants (noise schedules) or BatchNorm statistics, which
    each rank keeps from its own slice, as in a single process that ran the slices separately; rank 0's
    are the ones saved.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # torch 2.14 renamed the switch (the new one still syncs once at init, which broadcast_module does anyway).
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=ids, **{quiet: False})


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """torchrun on this machine (--standalone: a free port, no rendezvous server) running ``genai <args>`` in
    ``nproc`` processes, through ``run_torchrun`` below."""
    return [sys.executable, "-m", "genai_cli.distributed", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "genai_cli", *args]


def launch(nproc: int, args: list[str]) -> int:
    """Start torchrun with ``nproc`` processes running ``genai <args>``; returns the exit code to pass on."""
    import subprocess

    env = dict(os.environ)
    # torchrun sets one thread per process when unset (with a warning); share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    process = subprocess.Popen(torchrun_command(nproc, args), env=env)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            # torchrun passes Ctrl-C on to the workers (SIGTERM): they finish the step, rank 0 saves, all exit.
            continue


def run_torchrun(argv: list[str]) -> int:
    """torchrun's own ``main``, minus its failure report: a worker that fails has already printed its one-line
    error (rank 0) or traceback, so the launcher only passes its exit code on (rank 0's when it has one)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    # torch gives each of its elastic loggers its own level: quiet them one by one.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        main(argv)
    except SignalException:  # Ctrl-C / SIGTERM: torchrun has stopped the workers (rank 0 saved)
        return 130
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        if codes.get(0, 0) > 0:
            return codes[0]
        return max([c for c in codes.values() if c > 0], default=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
