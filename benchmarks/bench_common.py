"""What the benchmarks of issue 5 share: the evaluator network, a CPU-second training budget, markdown tables.

Not a benchmark itself (``run_all.py`` skips it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genai_cli.compare import markdown_table as markdown  # noqa: E402,F401  (the benchmarks' tables)
from genai_cli.evaluation.evaluator import load_evaluator, resolve_evaluator  # noqa: E402
from genai_cli.hardware import machine_line  # noqa: E402
from genai_cli.train import Trainer  # noqa: E402

RUNS = ROOT / "benchmarks" / "runs"  # ignored by git


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def machine() -> str:
    """The machine every table ran on: CPU model, instruction set, native bf16, threads, torch (and GPU)."""
    return machine_line()


def evaluator_for(data_cfg, spec, root: Path = RUNS):
    """The evaluator network of this dataset under ``root``, trained there first when missing."""
    evaluator = resolve_evaluator(None, data_cfg, spec, root, train_missing=True, log=log)
    model, accuracy = load_evaluator(evaluator, torch.device("cpu"))
    return model, accuracy, evaluator.source


def mnist5k_with_evaluator():
    """(data config, DataBundle, evaluator network) of mnist5k at 28x28, the evaluator trained first when missing."""
    from genai_cli.config import DataConfig
    from genai_cli.data import load_data

    data_cfg = DataConfig(name="mnist5k", image_size=28)
    data = load_data(data_cfg)
    evaluator, accuracy, source = evaluator_for(data_cfg, data.spec)
    log(f"evaluator {source} (validation accuracy {accuracy})")
    return data_cfg, data, evaluator


def peer_unet(unet, size: int = 28):
    """diffusers' UNet2DModel with the widths and depth of our UNet (ResBlocks per level, attention in the middle
    block, GroupNorm groups of >= 4 channels): the same network size, for speed and quality comparisons."""
    from diffusers import UNet2DModel

    widths = tuple(unet.base_channels * m for m in unet.channel_mults)
    return UNet2DModel(sample_size=size, in_channels=unet.in_channels, out_channels=unet.in_channels,
                       layers_per_block=unet.num_res_blocks, block_out_channels=widths,
                       down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
                       norm_num_groups=max(1, min(8, unet.base_channels // 4)))


class BudgetTrainer(Trainer):
    """The toolkit's Trainer, stopped after ``budget`` seconds of process CPU time spent in training steps.

    The loop's cosine schedule reads ``total_steps`` at every step, so the planned length is re-estimated from
    the CPU time per step measured so far (at steps 10, 50, 100, then every 100): the learning rate decays to
    its floor where the budget ends, as it would in a run planned for that many steps.
    """

    def __init__(self, *args, budget: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget = budget
        self.cpu_start: float | None = None
        self.cpu_used = 0.0

    def fit(self):
        self.cpu_start = time.process_time()
        return super().fit()

    def after_step(self, logs, reporter, rate) -> None:
        # Everything between steps is counted too (logging, EMA): cheap with the schedules set far apart.
        self.cpu_used = time.process_time() - self.cpu_start
        if self.step in (10, 50, 100) or (self.step > 100 and self.step % 100 == 0):
            per_step = self.cpu_used / self.step
            self.total_steps = max(self.step + 1, int(self.budget / per_step))
        if self.cpu_used >= self.budget:
            self.total_steps = self.step  # the loop ends after this step
        super().after_step(logs, reporter, rate)
