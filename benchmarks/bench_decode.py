"""Decoding at batch 1 (issue 18 section 3): characters/s of the character transformer per lever, against
``transformers``' ``GPT2LMHeadModel.generate(use_cache=True)`` of the same shape measured in the same run; the LSTM's
batch-1 rate against its naive reference; MaskGIT's batch-1 latency against the cached causal model on the same tokens.

    python benchmarks/bench_decode.py [--threads 2] [--chars 63] [--rounds 5] [--cli-chars 10000] [--compile]
    python benchmarks/bench_decode.py --quick      # a few seconds: checks the script runs

Then, through the command a person types: ``genai sample RUN --prompt R --max-new-tokens N -n 1`` on a run of the
same shape (trained 2 steps on a text of the 65 characters; benchmarks/runs/decode/), timed as whole processes
for N = 1 and N = 1 + ``--cli-chars`` in pairs: the characters/s is the extra characters over the extra seconds,
so start-up is excluded and everything after it is in (auto's precision probe, the window sliding every 32
characters past the 64-character context). 10,000 characters by default: a process's start-up jitters by up to
0.5 s, which is most of the difference a 2,000-character pair makes once decoding runs at ~3,000 chars/s.

Shapes: ``configs/gpt_shakespeare_char.yaml`` (4 layers, 4 heads, width 128, context 64; 65 characters, Tiny
Shakespeare's vocabulary size), ``configs/lstm_shakespeare_char.yaml`` (2 layers of 256) and MaskGIT's
(``configs/maskgit_mnist.yaml``: width 128, 4 layers, 7x7 = 49 tokens of 256 codes). Weights are untrained: the
cost of a step does not depend on them (quality figures are bench_text.py's and bench_masked.py's).

Each row generates ``--chars`` characters after a one-character prompt (63: GPT-2's 64 learned positions hold the
whole text, so both sides run the same positions, none slides a window), batch 1 and batch 16, temperature 1.
The rows are timed in alternation, ``--rounds`` times, so that whatever else the machine runs slows every row
alike; the median round is reported, and each row's ratio to GPT-2's median.

Levers, each row adds one to the row above it:
  uncached            ``sample_naive``: the whole window re-run for every character (nanoGPT's ``generate``);
  KV cache, module forward  the cache, each step through ``Block.forward`` (split / transpose of q, k, v, a
                      concatenation, nn.Module calls) and ``torch.multinomial``: how decoding ran before this issue;
  + exponential-race draw   ``sampling.draw_categorical`` instead of ``torch.multinomial`` (the same draws);
  + one-token step    ``Block.step``: the fused q|k|v row written in place (addmm's out=) into the preallocated
                      cache, head-split views made once and narrowed per position, weights transposed once per
                      draw, one query without a mask, no module calls, fp32;
  + inference_mode    the token loop under ``torch.inference_mode`` instead of ``no_grad`` (no version counters,
                      no view tracking on each of the step's operations);
  + one thread        the loop of small steps on one CPU thread: each product is too small for a second thread,
                      which only adds a barrier (a scheduler tick on a busy machine);
  + oneDNN off        the same loop with oneDNN off (``hardware.step_threads``): its primitive set-up costs more
                      than these operations (GELU of 512 values: 9-16 us against 2); every row also checks the
                      sampling options once per draw (``sampling.token_sampler``);
  same, bf16 autocast what ``precision auto`` gives on a CPU with native bf16, without a measured choice;
  + fused step        the library's path now: for 1 to 4 texts in fp32 every block and the head as one compiled
                      call (``genai_cli/nn/fused.py``, C built on first use with the machine's compiler; its build
                      is timed apart); at batch 16 the same as the row above (the C step is for a few rows). Every
                      row above runs with ``GENAI_FUSED_STEP=0``.
  + torch.compile     (``--compile`` only) the one-token step compiled (static shapes: attention over the whole
                      cache with a mask); its warm-up seconds are reported, and the length past which it pays.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import string
import subprocess
import time
from unittest import mock

import torch
import torch.nn.functional as F
import yaml
from bench_common import ROOT, RUNS, log, machine, markdown
from bench_startup import genai, wall

import genai_cli.models.autoregressive as ar_module
import genai_cli.sampling as sampling
from genai_cli.api import build_model
from genai_cli.hardware import largest_layer, step_threads
from genai_cli.models import transformer as transformer_module
from genai_cli.models.base import ImageSpec
from genai_cli.nn import fused as fused_module
from genai_cli.nn.masked import MaskedTransformer, fill_tokens
from genai_cli.registry import MODELS
from genai_cli.spec import TokenSpec

VOCAB = "".join(sorted(set(string.ascii_letters + " \n.,;:!?'-&$3")))[:65]  # 65 characters, as Tiny Shakespeare


def multinomial_draw(probs, generator=None):
    """The draw before this issue: torch.multinomial over the flattened rows."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


class ModuleForwardStepper(transformer_module._Cached):
    """The cache, every step through ``Block.forward`` (the generic path) rather than ``Block.step``."""

    def __call__(self, tokens, pos):
        m = self.model
        prev = m.token_embedding(tokens[:, max(self.done - 1, 0):pos])
        if self.done == 0:
            prev = torch.cat([m.start.expand(tokens.shape[0], 1, -1), prev], dim=1)
        logits = m._run(prev, self.done, self.caches)
        self.done = pos + 1
        return logits[:, -1]


class CompiledStepper(transformer_module._Cached):
    """``Block.step`` over the whole cache with a mask, so that every step has the same shapes, compiled once."""

    compiled = None

    def __call__(self, tokens, pos):
        if not (self.done == pos and pos > 0):
            return super().__call__(tokens, pos)
        m = self.model
        if CompiledStepper.compiled is None:
            CompiledStepper.compiled = torch.compile(_static_step, dynamic=False, fullgraph=True)
        x = m.token_embedding(tokens[:, pos - 1]) + self.positions[pos]
        logits = CompiledStepper.compiled(m, x, torch.tensor(pos), [c.qkv for c in self.caches])
        self.done = pos + 1
        return logits


def _static_step(m, x, pos, caches):
    """One position through every block with static shapes: x (n, d), caches (T, n, 3d) each."""
    t, n, d3 = caches[0].shape
    d, heads = d3 // 3, m.config.heads
    valid = (torch.arange(t) <= pos).view(1, 1, 1, t)  # the keys written so far
    for block, cache in zip(m.blocks, caches):
        qkv = block.qkv(block.ln1(x))  # (n, 3d)
        cache.index_copy_(0, pos.view(1), qkv[None])
        q = qkv[:, :d].view(n, heads, 1, d // heads)
        k = cache[:, :, d:2 * d].view(t, n, heads, d // heads).permute(1, 2, 0, 3)
        v = cache[:, :, 2 * d:].view(t, n, heads, d // heads).permute(1, 2, 0, 3)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=valid)
        x = x + block.proj(y.reshape(n, d))
        x = x + block.mlp(block.ln2(x))
    return m.out(m.ln_f(x))


def ours(model, stepper_cls, draw, bf16: bool, inference: bool = True, small_steps=None, fused: bool = False):
    """A sampler of ``model`` with the given stepper class and draw function; ``inference``: the token loop under
    inference_mode (off: no_grad); ``small_steps``: a context to run the loop in instead of the library's
    ``step_threads`` (one thread, oneDNN off), e.g. ``caller_threads`` or ``one_thread_only``; ``fused``: the
    compiled step allowed (the library's default), else ``GENAI_FUSED_STEP=0``."""

    def run(n: int, chars: int, generator: torch.Generator) -> torch.Tensor:
        switch = mock.patch.dict(os.environ, {fused_module.ENV_SWITCH: "1" if fused else "0"})
        switch.start()  # read when the stepper is made, inside model.sample
        saved = sampling.draw_categorical, model.incremental, ar_module.step_threads, torch.inference_mode
        sampling.draw_categorical = draw
        if stepper_cls is not None:
            model.incremental = lambda n_, *a: stepper_cls(model, n_)
        if small_steps is not None:
            ar_module.step_threads = small_steps
        if not inference:
            torch.inference_mode = torch.no_grad
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if stepper_cls is None:
                    return model.sample_naive(n, generator=generator, prompt=VOCAB[0], max_new_tokens=chars)
                return model.sample(n, generator=generator, prompt=VOCAB[0], max_new_tokens=chars)
        finally:
            sampling.draw_categorical, model.incremental, ar_module.step_threads, torch.inference_mode = saved
            switch.stop()
    return run


def caller_threads(macs, device):
    """The loop before the small-step levers: the caller's thread count, oneDNN on."""
    return contextlib.nullcontext()


@contextlib.contextmanager
def one_thread_only(macs, device):
    """One thread, oneDNN left on: the one-thread lever alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gpt2(model, threads: int | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    torch.manual_seed(0)
    peer = GPT2LMHeadModel(GPT2Config(vocab_size=len(VOCAB), n_positions=model.seq_len, n_embd=c.d_model,
                                      n_layer=c.layers, n_head=c.heads, n_inner=c.mlp_ratio * c.d_model,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                      eos_token_id=None)).eval()

    def run(n: int, chars: int, generator: torch.Generator) -> torch.Tensor:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            with torch.no_grad():
                # pad_token_id 1, not the prompt's 0: no sequence ends early (no eos), so padding never happens, and a
                # prompt ending in the pad id would make transformers warn of right-padding on every call.
                return peer.generate(torch.zeros(n, 1, dtype=torch.long), do_sample=True, max_new_tokens=chars,
                                     min_new_tokens=chars, use_cache=True, top_k=0, pad_token_id=1,
                                     eos_token_id=None)
        finally:
            torch.set_num_threads(before)
    return run


def alternate(rows: dict, n: int, chars: int, rounds: int) -> dict[str, float]:
    """Median characters/s (n texts x chars / seconds) of each row, the rows timed in turn ``rounds`` times."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():  # warm-up: first calls, lazy initialisation
        fn(n, min(chars, 8), torch.Generator().manual_seed(0))
    for r in range(rounds):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn(n, chars, torch.Generator().manual_seed(r))
            times[name].append(time.perf_counter() - t0)
    return {name: n * chars / sorted(t)[len(t) // 2] for name, t in times.items()}


def maskgit_latency(rounds: int, steps: tuple[int, ...] = (4, 8, 12)) -> dict[str, float]:
    """ms per image at batch 1 of MaskGIT's filling (a 7x7 grid of 256 codes) at each of ``steps``, against the cached
    causal transformer of the same width and depth drawing the same 49 tokens one by one (bench_masked.py gives their
    FID), each under the library's loop rules (inference_mode, hardware.step_threads) as model.sample runs them,
    timed in alternation; and beside each step count the floor of its draw: the linear products every step after
    the first must make over all 49 rows, alone. Also on its own: ``python -c "import bench_decode as b;
    print(b.maskgit_latency(5))"``."""
    torch.manual_seed(0)
    masked = MaskedTransformer(256, 49, 128, 4, 4, 4, 0.0).eval()
    cls = MODELS.get("transformer")
    ar = cls(cls.Config(levels=256, d_model=128, heads=4, layers=4, dropout=0.0),
             ImageSpec(channels=1, size=7, binary=False)).eval()

    def loop_rules(n):  # as model.sample runs a draw of n
        rules = contextlib.ExitStack()
        rules.enter_context(torch.inference_mode())
        rules.enter_context(step_threads(n * 49 * largest_layer(masked), torch.device("cpu")))
        return rules

    def maskgit(s):
        def run(n, chars, g):
            with loop_rules(n):
                start = torch.full((n, 49), masked.mask_id)
                return fill_tokens(lambda t, at: masked(t, None, at), start, masked.mask_id, s,
                                   choice_temperature=4.5, generator=g)
        return run

    def floor(s):
        # What no schedule or kernel change can remove from an s-step draw: step 1 is the kept blank grid, and each
        # later step's products that need every row (all blocks' qkv: every key and value; all but the last
        # block's projection and MLP), the weights as contiguous (in, out) copies, as lean holds them.
        layers = [blk.qkv for blk in masked.blocks] + [
            layer for blk in masked.blocks[:-1] for layer in (blk.proj, blk.mlp[0], blk.mlp[2])]
        ops = [(layer.bias.detach(), torch.randn(49, layer.in_features), layer.weight.detach().t().contiguous())
               for layer in layers]

        def run(n, chars, g):
            with loop_rules(n):
                for _ in range(s - 1):
                    for bias, a, w in ops:
                        torch.addmm(bias, a, w)
        return run

    def ar_tokens(n, chars, g):
        with torch.no_grad():
            return ar.sample(n, generator=g)
    log("maskgit, batch 1")
    rows = ({f"maskgit {s} steps": maskgit(s) for s in steps}
            | {f"its products alone, {s} steps (floor)": floor(s) for s in steps}
            | {"cached AR, 49 tokens": ar_tokens})
    return {k: 1000 / v for k, v in alternate(rows, 1, 1, rounds).items()}  # ms per image (alternate: images/s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chars", type=int, default=63, help="characters per text (at most 63: GPT-2's window)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (minutes of warm-up)")
    parser.add_argument("--cli-chars", type=int, default=10000, help="characters of the genai sample rows (0: skip)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.chars, args.rounds, args.cli_chars = 16, 1, 64
    torch.set_num_threads(args.threads)
    spec = TokenSpec(vocab=VOCAB, block_size=64)
    cls = MODELS.get("transformer")
    torch.manual_seed(0)
    model = build_model("transformer", cls.Config(d_model=128, heads=4, layers=4, dropout=0.0), spec).eval()
    race = sampling.draw_categorical
    old = {"inference": False, "small_steps": caller_threads}  # the loop before this loop levers
    library = "+ fused step (library now), fp32"
    eager = "+ oneDNN off for small steps, fp32"
    rows = {
        "GPT2LMHeadModel.generate(use_cache=True)": gpt2(model),
        "GPT2LMHeadModel.generate(use_cache=True), 1 thread": gpt2(model, threads=1),
        "uncached (re-run the window)": ours(model, None, race, False, **old),
        "KV cache, module forward + multinomial": ours(model, ModuleForwardStepper, multinomial_draw, False, **old),
        "+ exponential-race draw": ours(model, ModuleForwardStepper, race, False, **old),
        "+ one-token step, fp32": ours(model, transformer_module._Cached, race, False, **old),
        "+ inference_mode": ours(model, transformer_module._Cached, race, False, small_steps=caller_threads),
        "+ one thread for small steps": ours(model, transformer_module._Cached, race, False,
                                             small_steps=one_thread_only),
        eager: ours(model, transformer_module._Cached, race, False),
        "same, bf16 autocast": ours(model, transformer_module._Cached, race, True),
        library: ours(model, transformer_module._Cached, race, False, fused=True),
    }
    t0 = time.perf_counter()
    fused_module.library.cache_clear()
    built = fused_module.library() is not None
    log(f"fused step: {'loaded or built' if built else 'NOT available (no C compiler): eager'} in "
        f"{time.perf_counter() - t0:.2f} s")
    if args.compile:
        t0 = time.perf_counter()
        ours(model, CompiledStepper, race, False)(1, 8, torch.Generator().manual_seed(0))
        warm = time.perf_counter() - t0
        log(f"torch.compile warm-up: {warm:.0f} s")
        rows["+ torch.compile of the step, fp32"] = ours(model, CompiledStepper, race, False)
    # The library's rows must draw what the uncached sampler draws (fp32, same seed).
    cached, uncached = (ours(model, stepper, race, False, fused=True)(1, args.chars, torch.Generator().manual_seed(5))
                        for stepper in (transformer_module._Cached, None))
    same = torch.equal(cached, uncached)
    table = []
    result = {}
    for n in (1, 16):
        log(f"transformer, batch {n}: {len(rows)} rows x {args.rounds} rounds")
        result[n] = alternate(rows, n, args.chars, args.rounds)
    ref = "GPT2LMHeadModel.generate(use_cache=True)"
    ref1 = ref + ", 1 thread"
    for name in rows:
        table.append([name] + [f"{result[n][name]:,.0f}" for n in (1, 16)]
                     + [f"{result[n][name] / result[n][r]:.2f}x" for r in (ref, ref1) for n in (1, 16)])

    # The LSTM: its one-step cell against its naive reference (re-running the sequence for every character).
    lcls = MODELS.get("lstm")
    lstm = build_model("lstm", lcls.Config(hidden=256, layers=2, embed=64), spec).eval()

    def lstm_rows(naive: bool):
        def run(n, chars, g):
            with torch.no_grad():
                fn = lstm.sample_naive if naive else lstm.sample
                return fn(n, generator=g, prompt=VOCAB[0], max_new_tokens=chars)
        return run
    log("lstm, batch 1")
    lstm_rate = alternate({"carried state": lstm_rows(False), "naive": lstm_rows(True)}, 1, args.chars, args.rounds)

    lat = maskgit_latency(max(args.rounds, 3) if not args.quick else 1)

    print(f"\nDecoding the gpt_shakespeare_char shape (0.8M parameters), {args.chars} characters after a 1-character "
          f"prompt, median of {args.rounds} alternating rounds, {args.threads} threads; {machine()}\n")
    print(markdown(["lever", "chars/s, batch 1", "chars/s, batch 16", "/ GPT-2, batch 1", "/ GPT-2, batch 16",
                    "/ GPT-2 1 thread, batch 1", "/ GPT-2 1 thread, batch 16"], table))
    print(f"\ncached (library) and uncached samples identical: {'yes' if same else 'NO'}")
    if args.compile:
        per_char = {n: 1 / result[n][library]
                    - 1 / result[n]["+ torch.compile of the step, fp32"] for n in (1,)}
        pays = f"{warm / per_char[1]:,.0f} characters" if per_char[1] > 0 else "never (not faster)"
        print(f"torch.compile warm-up {warm:.0f} s; at batch 1 it pays off past {pays}")
    print(f"\nLSTM (2 x 256), batch 1: {lstm_rate['carried state']:,.0f} chars/s carried state, "
          f"{lstm_rate['naive']:,.0f} naive: {lstm_rate['carried state'] / lstm_rate['naive']:.1f}x\n")
    print(markdown(["sampler, batch 1, 49 tokens", "ms per image", "AR / this"],
                   [[k, f"{v:.1f}", f"{lat['cached AR, 49 tokens'] / v:.2f}x"] for k, v in lat.items()]))
    if args.cli_chars:
        rate, base = through_cli(args.cli_chars, max(args.rounds, 3) if not args.quick else 1)
        # A pair whose longer command took no longer (a few characters, within the start-up's jitter) has no rate.
        shown = f"**{rate:,.0f} chars/s**" if rate > 0 else "not measurable (raise --cli-chars past the jitter)"
        print(f"\n`genai sample RUN --max-new-tokens {args.cli_chars} -n 1` (temperature 1), start-up excluded: "
              f"{shown} at batch 1 (median of pairs; the 1-character command took {base:.2f} s)")


def through_cli(chars: int, rounds: int) -> tuple[float, float]:
    """Characters/s of ``genai sample`` at batch 1 past its start-up: ``chars`` extra characters over the extra
    wall seconds of a paired 1-character command (median of ``rounds`` pairs); and the 1-character command's
    median seconds."""
    root = RUNS / "decode"
    run = root / "gpt-shape"
    if not (run / "checkpoints" / "last.pt").is_file():
        root.mkdir(parents=True, exist_ok=True)
        corpus = root / "corpus.txt"
        corpus.write_text("".join(random.Random(0).choices(VOCAB, k=20_000)))
        cfg = {"model": {"family": "transformer", "d_model": 128, "heads": 4, "layers": 4, "dropout": 0.0},
               "data": {"name": "text_file", "path": str(corpus), "block_size": 64},
               "train": {"max_steps": 2, "batch_size": 8, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
                         "sample_every": 2, "sample_n": 1, "warmup_steps": 1, "eval_max_images": 16,
                         "ema_decay": None}}
        (root / "gpt-shape.yaml").write_text(yaml.safe_dump(cfg))
        log("training the 2-step run of the gpt_shakespeare_char shape")
        subprocess.run(genai("train", str(root / "gpt-shape.yaml"), "--runs-dir", str(root), "--name", "gpt-shape",
                             "--force", "-q"), cwd=ROOT, check=True)
    out = root / "sample.txt"

    def command(new: int) -> list[str]:
        return genai("sample", str(run), "--prompt", VOCAB[0], "--max-new-tokens", str(new), "-n", "1",
                     "--temperature", "1", "-q", "--out", str(out))
    wall(command(1), ROOT)  # warm the file cache
    rates, bases = [], []
    for r in range(rounds):
        log(f"genai sample, round {r + 1}/{rounds}")
        base, long = wall(command(1), ROOT), wall(command(1 + chars), ROOT)
        rates.append(chars / (long - base) if long > base else 0.0)  # 0: lost in the start-up jitter
        bases.append(base)
    return statistics.median(rates), statistics.median(bases)


if __name__ == "__main__":
    main()
