"""Device and precision follow what the hardware reports (genai_cli/hardware.py), on every CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import SPEC, invoke, metric_rows, tiny_config, tiny_model
from rich.console import Console

from genai_cli import cli, hardware
from genai_cli.config import from_dict
from genai_cli.errors import GenaiError
from genai_cli.train import Trainer

CPU = torch.device("cpu")


def test_auto_follows_cpu_capability(cpu_bf16):
    cpu_bf16(True, amx=True)
    p = hardware.resolve_precision("auto", CPU)
    assert (p.resolved, p.dtype) == ("bf16", torch.bfloat16) and "AMX" in p.reason
    cpu_bf16(True)
    assert hardware.resolve_precision("auto", CPU).describe() == "bf16 (CPU with AVX512-BF16)"
    cpu_bf16(False)
    p = hardware.resolve_precision("auto", CPU)
    assert (p.resolved, p.dtype, p.needs_scaler) == ("fp32", None, False)
    assert p.describe() == "fp32 (CPU without native bf16)"


def test_the_environment_overrides_what_the_cpu_reports(monkeypatch, cpu_bf16):
    cpu_bf16(False)
    monkeypatch.setenv(hardware.NATIVE_BF16_ENV, "1")
    p = hardware.resolve_precision("auto", CPU)
    assert p.resolved == "bf16" and hardware.NATIVE_BF16_ENV in p.reason
    cpu_bf16(True, amx=True)
    monkeypatch.setenv(hardware.NATIVE_BF16_ENV, "0")
    assert hardware.resolve_precision("auto", CPU).resolved == "fp32"
    monkeypatch.setenv(hardware.NATIVE_BF16_ENV, "yes")
    with pytest.raises(GenaiError, match="must be 1 or 0"):
        hardware.resolve_precision("auto", CPU)


def test_bf16_units_fall_back_to_the_cpu_flags(monkeypatch):
    """Without torch's private queries (renamed or gone in a later torch), /proc/cpuinfo's flags answer."""
    monkeypatch.delenv(hardware.NATIVE_BF16_ENV, raising=False)  # what the flags say, not an override
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert hardware.cpu_bf16_units() == {"amx": False, "avx512_bf16": True}
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_tile", "amx_bf16"})
    assert hardware.cpu_bf16_units()["amx"] and hardware.cpu_native_bf16()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    assert not hardware.cpu_native_bf16()


def test_auto_follows_cuda_capability(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.resolve_precision("auto", cuda).resolved == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    p = hardware.resolve_precision("auto", cuda)
    assert (p.resolved, p.needs_scaler) == ("fp16", True)


def test_explicit_requests_are_honoured(cpu_bf16):
    cpu_bf16(False)
    assert hardware.resolve_precision("bf16", CPU).resolved == "bf16"  # the user asked: it runs (emulated)
    assert hardware.resolve_precision("fp32", CPU).resolved == "fp32"
    with pytest.raises(GenaiError, match="fp16 needs a CUDA GPU"):
        hardware.resolve_precision("fp16", CPU)


def make_trainer(tmp_path, name, **train):
    run = tmp_path / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "samples").mkdir()
    console = Console(record=True, width=200)
    return Trainer(from_dict(tiny_config("ddpm", **train)), run, quiet=True, console=console), console


def test_emulated_bf16_warns_once(tmp_path, cpu_bf16):
    cpu_bf16(False)
    first, c1 = make_trainer(tmp_path, "a", precision="bf16")
    second, c2 = make_trainer(tmp_path, "b", precision="bf16")
    warnings = [line for line in (c1.export_text() + c2.export_text()).splitlines() if "emulated" in line]
    assert len(warnings) == 1, warnings
    assert "precision auto or fp32" in warnings[0]
    assert first.stepper.autocast_dtype == torch.bfloat16  # still runs bf16, as asked
    cpu_bf16(True)
    _, c3 = make_trainer(tmp_path, "c", precision="bf16")
    assert "emulated" not in c3.export_text()


def test_auto_trainer_without_native_bf16_runs_fp32(tmp_path, cpu_bf16):
    cpu_bf16(False)
    trainer, _ = make_trainer(tmp_path, "a", precision="auto")
    assert trainer.stepper.autocast_dtype is None and trainer.precision.resolved == "fp32"
    cpu_bf16(True)
    trainer, _ = make_trainer(tmp_path, "b", precision="auto")
    assert trainer.stepper.autocast_dtype == torch.bfloat16


def test_resolved_precision_in_config_yaml_and_inspect(tmp_path, config_file, cpu_bf16):
    cpu_bf16(False)
    invoke("train", config_file(precision="auto"), "--runs-dir", tmp_path / "runs", "--name", "r", "--quiet")
    text = (tmp_path / "runs" / "r" / "config.yaml").read_text()
    assert "precision: auto  # resolved: fp32 (CPU without native bf16)" in text
    assert yaml.safe_load(text)["train"]["precision"] == "auto"  # the request stays what was asked
    shown = invoke("inspect", tmp_path / "runs" / "r").stdout
    assert "auto -> fp32 (CPU without native bf16)" in " ".join(shown.split())


def test_sampling_follows_the_sampling_machine(tmp_path, config_file, cpu_bf16):
    """A run trained in bf16 (on a machine with it) samples in fp32 on a machine without it."""
    from genai_cli.api import load_checkpoint
    from genai_cli.evaluation.run import sampling_autocast

    cpu_bf16(True)
    invoke("train", config_file(precision="bf16"), "--runs-dir", tmp_path / "runs", "--name", "r", "--quiet")
    cpu_bf16(False)
    model = load_checkpoint(tmp_path / "runs" / "r" / "checkpoints" / "last.pt")
    seen = []
    model.unet.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    with sampling_autocast(CPU):
        model.sample(2, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=2)
    assert seen and not any(seen)
    cpu_bf16(True)
    seen.clear()
    with sampling_autocast(CPU):
        model.sample(2, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=2)
    assert seen and all(seen)


@pytest.mark.parametrize("native", [False, True])
def test_lstm_runs_under_bf16_autocast_on_every_cpu(cpu_bf16, shapes_batch, native):
    """Without native bf16 oneDNN has no bf16 LSTM kernel: the recurrent part must leave autocast there, also where
    the flags (or GENAI_CPU_NATIVE_BF16=1) say the CPU has bf16: the kernel is asked, not the assumption."""
    cpu_bf16(native)
    model = tiny_model("pixel_lstm", SPEC)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(shapes_batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.lstm.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # sampling, the fused kernel on the prefix
        images = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, *SPEC.shape)


def test_a_kernel_probe_answers_the_same_inside_sampling():
    """The LSTM probe backpropagates: first asked inside a draw (inference mode, no_grad) it must still record
    gradients, or it would call the kernel missing on every CPU and the LSTM would sample in fp32 for good."""
    lstm, x = torch.nn.LSTM(1, 1, batch_first=True), torch.zeros(1, 1, 1)

    def step():
        lstm(x)[0].sum().backward()
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            assert hardware.runs_here(step)
    assert not hardware.runs_here(lambda: torch.mm(torch.zeros(2, 3), torch.zeros(2, 3)))  # a RuntimeError: False


def test_machine_line_names_cpu_and_instruction_set():
    line = hardware.machine_line()
    assert torch.backends.cpu.get_cpu_capability() in line and "native bf16" in line and torch.__version__ in line


@pytest.mark.parametrize("slow", ["bf16", "fp32"])
def test_a_measured_auto_keeps_the_faster_precision(slow, monkeypatch):
    """Auto chose bf16; a probe of the workload that is (much) slower under ``slow`` makes it keep the other one.
    The probe sleeps, so the choice does not depend on this machine's arithmetic."""
    import time

    monkeypatch.setattr(hardware, "_measured", {})
    monkeypatch.setenv(hardware.PROBE_ENV, "1")  # the suite turns probes off (conftest); this test is of one
    monkeypatch.delenv(hardware.NATIVE_BF16_ENV, raising=False)  # an override of the CPU's answer skips probes too
    auto = hardware.Precision("auto", "bf16", "CPU with AMX")

    def probe():
        time.sleep(0.02 if torch.is_autocast_enabled("cpu") == (slow == "bf16") else 0.0)

    chosen = hardware.measured_precision(auto, CPU, probe, key=slow, rounds=3)
    assert chosen.resolved == ("fp32" if slow == "bf16" else "bf16")
    assert hardware.measured_precision(auto, CPU, lambda: 1 / 0, key=slow) is chosen  # remembered, not re-measured
    fixed = hardware.Precision("bf16", "bf16", "as requested")
    assert hardware.measured_precision(fixed, CPU, lambda: 1 / 0, key="x") is fixed  # an explicit request stands


def fake_steps(ms: dict[str, float]):
    """(run_step, clock): each step under precision p advances a fake clock by ms[p.resolved] milliseconds."""
    now = [0.0]

    def run_step(p):
        now[0] += ms[p.resolved] / 1000

    return run_step, lambda: now[0]


@pytest.mark.parametrize("ms, chosen", [({"bf16": 12.0, "fp32": 20.0}, "bf16"), ({"bf16": 30.0, "fp32": 20.0}, "fp32"),
                                        ({"bf16": 20.0, "fp32": 20.0}, "bf16")])
def test_the_probe_keeps_the_faster_precision(ms, chosen):
    auto = hardware.Precision("auto", "bf16", "CPU with AMX")
    run_step, clock = fake_steps(ms)
    p, record = hardware.probe_training_precision(auto, run_step, rounds=3, clock=clock)
    assert p.resolved == chosen and p.requested == "auto"
    assert record["bf16_ms_per_step"] == pytest.approx(ms["bf16"]) and record["fp32_ms_per_step"] == pytest.approx(
        ms["fp32"])
    assert record["probe_seconds"] == pytest.approx(4 * (ms["bf16"] + ms["fp32"]) / 1000)  # 1 untimed + 3 each
    assert "measured" in p.reason


def test_the_probe_runs_only_where_auto_chose_native_bf16(monkeypatch):
    monkeypatch.delenv(hardware.PROBE_ENV)
    monkeypatch.delenv(hardware.NATIVE_BF16_ENV, raising=False)
    bf16 = hardware.Precision("auto", "bf16", "CPU with AMX")
    assert hardware.training_probe_wanted(bf16, CPU)
    assert not hardware.training_probe_wanted(hardware.Precision("bf16", "bf16", "as requested"), CPU)
    assert not hardware.training_probe_wanted(hardware.Precision("auto", "fp32", "CPU without native bf16"), CPU)
    assert not hardware.training_probe_wanted(bf16, torch.device("cuda"))
    monkeypatch.setenv(hardware.NATIVE_BF16_ENV, "1")  # the override says what auto assumes: no timing
    assert not hardware.training_probe_wanted(bf16, CPU)
    monkeypatch.delenv(hardware.NATIVE_BF16_ENV)
    monkeypatch.setenv(hardware.PROBE_ENV, "0")
    assert not hardware.training_probe_wanted(bf16, CPU)
    monkeypatch.setenv(hardware.PROBE_ENV, "maybe")
    with pytest.raises(GenaiError, match="must be 1 or 0"):
        hardware.training_probe_wanted(bf16, CPU)


def test_a_probed_run_records_why_and_resumes_in_its_precision(tmp_path, config_file, cpu_bf16, monkeypatch):
    """auto on a CPU with bf16 units times the run's model; the probe (here: fp32 measured faster) is in the summary,
    metrics.jsonl and config.yaml, and a resumed run keeps the precision without probing again."""
    import json

    cpu_bf16(True, amx=True)
    monkeypatch.setenv(hardware.PROBE_ENV, "1")
    calls = []
    real = hardware.probe_training_precision

    def probe(auto, run_step, **kw):
        calls.append(auto)
        run_step(auto)  # the run's real step runs under each precision
        timed, clock = fake_steps({"bf16": 9.0, "fp32": 3.0})
        return real(auto, timed, clock=clock)

    monkeypatch.setattr("genai_cli.train.probe_training_precision", probe)
    cfg = config_file(precision="auto", max_steps=4, checkpoint_every=2)
    invoke("train", cfg, "--runs-dir", tmp_path / "runs", "--name", "r", "--quiet")
    run = tmp_path / "runs" / "r"
    assert len(calls) == 1
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["precision"]["resolved"] == "fp32" and state["summary"]["precision_probe"]["fp32_ms_per_step"] == 3.0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["precision"] for r in records if r["split"] == "precision_probe"] == ["fp32"]
    assert "resolved: fp32 (measured faster" in (run / "config.yaml").read_text()
    # Resumed on a machine where the probe would now pick bf16: the run goes on in fp32, unprobed.
    monkeypatch.setattr("genai_cli.train.probe_training_precision", lambda *a, **k: calls.append("again"))
    invoke("train", "--resume", run, "--set", "train.max_steps=6", "--runs-dir", tmp_path / "runs", "--quiet")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert len(calls) == 1 and state["step"] == 6 and state["precision"]["resolved"] == "fp32"


def test_token_by_token_sampling_runs_small_steps_on_one_thread_without_onednn_and_restores_both(monkeypatch):
    """A token's step is a few dozen tiny products: a second thread only adds a barrier per operation (a scheduler
    tick on a busy CPU) and oneDNN's set-up costs more than such an operation. The sampler's loop runs them on one
    thread without oneDNN; large work and the caller's settings are kept, and restored after an error too."""
    before = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(2)
    torch.backends.mkldnn.enabled = True
    try:
        model = tiny_model("transformer").eval()
        seen = []
        real = model.incremental

        def spy(n, *args):
            step = real(n, *args)

            def call(tokens, pos):
                seen.append((torch.get_num_threads(), torch.backends.mkldnn.enabled))
                return step(tokens, pos)
            return call
        monkeypatch.setattr(model, "incremental", spy)
        model.sample(2, generator=torch.Generator().manual_seed(0))
        assert set(seen) == {(1, False)}
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (2, True)
        with hardware.step_threads(hardware.SERIAL_BELOW_MACS, CPU):  # large work keeps the threads and oneDNN
            assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (2, True)
        with pytest.raises(RuntimeError), hardware.step_threads(16, CPU):
            assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (1, False)
            raise RuntimeError("a step failed")
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (2, True)
    finally:
        torch.set_num_threads(before[0])
        torch.backends.mkldnn.enabled = before[1]


@pytest.mark.parametrize("new_tokens, probed", [(1, False), (65, True)])
def test_auto_measures_a_texts_precision_only_when_the_text_is_longer_than_the_probe(new_tokens, probed, monkeypatch):
    """The decoding probe writes 8 x 8 tokens: `genai sample --max-new-tokens 1` would spend most of its time on it,
    so a text no longer than the probe takes auto's answer unmeasured."""
    import genai_cli.models  # noqa: F401  (registers the families)
    from genai_cli import generate
    from genai_cli.registry import MODELS
    from genai_cli.spec import TokenSpec

    calls = []
    monkeypatch.setattr(hardware, "training_probe_wanted", lambda *a: True)
    monkeypatch.setattr(hardware, "_measured", {})
    monkeypatch.setattr(hardware, "SERIAL_BELOW_MACS", 0)  # this tiny model's steps count as large ones here
    monkeypatch.setattr(hardware, "probe_training_precision", lambda auto, run, rounds: (calls.append(1), (auto,))[1])
    cls = MODELS.get("transformer")
    model = cls(cls.Config(d_model=16, heads=2, layers=1), TokenSpec(vocab="ab ", block_size=8))
    generate.draw(model, generate.SampleRequest(n=1, options={"max_new_tokens": new_tokens}), precision="auto")
    assert bool(calls) == probed


def test_a_text_of_small_steps_is_drawn_in_fp32_without_a_probe(monkeypatch):
    """Small steps run with oneDNN off, where bf16 products take ATen's reference kernel on every CPU: auto takes
    fp32 there without timing anything, and says why; an explicit bf16 is still honoured."""
    import genai_cli.models  # noqa: F401  (registers the families)
    from genai_cli import generate
    from genai_cli.registry import MODELS
    from genai_cli.spec import TokenSpec

    calls, seen = [], []
    monkeypatch.setattr(hardware, "training_probe_wanted", lambda p, d: p.requested == "auto")
    monkeypatch.setattr(hardware, "_measured", {})
    monkeypatch.setattr(hardware, "resolve_precision",
                        lambda requested, device: hardware.Precision(requested, "bf16", "a CPU with AMX"))
    monkeypatch.setattr(hardware, "probe_training_precision", lambda auto, run, rounds: (calls.append(1), (auto,))[1])
    cls = MODELS.get("transformer")
    model = cls(cls.Config(d_model=16, heads=2, layers=1), TokenSpec(vocab="ab ", block_size=8))
    real_sample = model.sample
    monkeypatch.setattr(model, "sample", lambda *a, **k: (seen.append(torch.is_autocast_enabled("cpu")),
                                                          real_sample(*a, **k))[1])
    request = generate.SampleRequest(n=1, options={"max_new_tokens": 65})
    generate.draw(model, request, precision="auto")
    assert not calls and seen == [False]  # no probe, and the draw ran without autocast
    assert "oneDNN" in hardware.measured_precision(hardware.Precision("auto", "bf16", ""), CPU, None, "k",
                                                   macs=65536).reason
    generate.draw(model, request, precision="bf16")
    assert not calls and seen[-1] is True



@pytest.mark.parametrize("mask", ["causal", "bool", "additive"])
def test_bf16_attention_on_a_cpu_is_computed_in_fp32_and_keeps_the_callers_dtype(mask):
    """The CPU's bf16 attention kernels are several times slower than fp32's over short sequences (hardware.attention):
    under bf16 the attention is fp32 SDPA of the same values, rounded once, and its gradients reach bf16 inputs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 49, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    keep = torch.rand(49, 49, generator=g) > 0.3
    keep.fill_diagonal_(True)
    options = {"causal": {"is_causal": True}, "bool": {"attn_mask": keep},
               "additive": {"attn_mask": torch.zeros(49, 49).masked_fill(~keep, -1e4).bfloat16()}}[mask]
    with torch.autocast("cpu", torch.bfloat16):
        y = hardware.attention(q, k, v, **options)
    fp32_options = {key: o.float() if key == "attn_mask" and o.is_floating_point() else o
                    for key, o in options.items()}
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), **fp32_options)
    assert y.dtype == torch.bfloat16 and torch.equal(y, reference.bfloat16())
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (q, k, v))
    # Outside bf16 it is torch's own SDPA call, bit for bit.
    x = [t.detach().float() for t in (q, k, v)]
    assert torch.equal(hardware.attention(*x, **fp32_options),
                       torch.nn.functional.scaled_dot_product_attention(*x, **fp32_options))


@pytest.fixture
def threads():
    """torch's CPU thread count, set for a test and restored after it."""
    before = torch.get_num_threads()

    def set_(n: int) -> None:
        torch.set_num_threads(n)
    yield set_
    torch.set_num_threads(before)


@pytest.fixture
def probes_on(monkeypatch, threads):
    """Where a run may choose its threads: 2 of them, OMP_NUM_THREADS unset, the start-up probes allowed."""
    threads(2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(hardware.PROBE_ENV, "1")


def clocked_probe_threads(seconds: dict[int, float], seen: list[int] | None = None, run: bool = False):
    """``hardware.probe_threads`` on a fake clock: a timed call at n threads takes ``seconds[n]`` (read at each
    call, so a test may change it); ``seen`` gets the thread count of each call; ``run``: the real call runs too."""
    real = hardware.probe_threads

    def probe(run_step, **kw):
        now = [0.0]

        def timed():
            if run:
                run_step()
            if seen is not None:
                seen.append(torch.get_num_threads())
            now[0] += seconds[torch.get_num_threads()]
        return real(timed, clock=lambda: now[0])
    return probe


def fake_probe_cores(monkeypatch, answer, on_call=lambda: None, all_threads_ms: float | None = None) -> None:
    """``probe_cores`` (hardware's and train's) answering ``answer()`` threads of 2 without timing anything:
    ``on_call()`` runs first (a test records the call); the record says 2.0 ms per test product on 1 thread against
    ``all_threads_ms`` on 2 (default: 9.0 where it cut the count, 1.0 where it kept 2)."""
    def probe_cores():
        on_call()
        count = answer()
        torch.set_num_threads(count)
        ms = all_threads_ms if all_threads_ms is not None else 9.0 if count == 1 else 1.0
        return count, {"threads": count, "of_threads": 2, "threads_2_ms_per_step": ms, "threads_1_ms_per_step": 2.0,
                       "timed": "product"}
    monkeypatch.setattr(hardware, "probe_cores", probe_cores)
    monkeypatch.setattr("genai_cli.train.probe_cores", probe_cores)


def thread_records(run) -> list[dict]:
    """A run's thread_probe rows of metrics.jsonl: its start's choice, then each change as it followed the load."""
    return metric_rows(run, "thread_probe")


@pytest.mark.parametrize("ms, chosen, steps", [({4: 900.0, 2: 40.0}, 2, {4: 2, 2: 4}), ({4: 20.0, 2: 30.0}, 4, None),
                                               ({4: 30.0, 2: 30.0}, 4, None)])
def test_the_thread_probe_keeps_the_faster_count(threads, ms, chosen, steps):
    """A busy core stalls every barrier of a many-threaded step: the probe times torch's count and half of it and
    keeps the faster (ties: more threads), and leaves torch set to it; a count twice as slow in the first round is
    not timed again."""
    threads(4)
    now, ran = [0.0], {4: 0, 2: 0}

    def run_step():
        ran[torch.get_num_threads()] += 1
        now[0] += ms[torch.get_num_threads()] / 1000
    count, record = hardware.probe_threads(run_step, rounds=3, clock=lambda: now[0])
    assert count == chosen == torch.get_num_threads() == record["threads"] and record["of_threads"] == 4
    assert ran == (steps or {4: 4, 2: 4})  # 1 untimed + 3 timed each, or fewer for a stalled count
    assert {k: v for k, v in record.items() if k.endswith("ms_per_step")} == {
        f"threads_{c}_ms_per_step": v for c, v in ms.items()}
    said = hardware.describe_threads(record)
    assert said == ("" if chosen == 4 else f"threads {chosen} of 4 (faster here: {ms[chosen]:.1f} ms/step on "
                                        f"{chosen} thread{'s' if chosen > 1 else ''}, {ms[4]:.1f} on 4)")


def test_the_thread_probe_restores_the_count_when_a_step_fails(threads):
    threads(2)

    def run_step():
        if torch.get_num_threads() == 1:
            raise RuntimeError("out of memory")
    with pytest.raises(RuntimeError):
        hardware.probe_threads(run_step)
    assert torch.get_num_threads() == 2


def test_the_thread_probe_runs_only_where_the_count_is_torchs_own(monkeypatch, threads):
    threads(2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(hardware.PROBE_ENV, raising=False)
    assert hardware.thread_probe_wanted(CPU)
    assert not hardware.thread_probe_wanted(torch.device("cuda"))
    monkeypatch.setenv(hardware.PROBE_ENV, "0")  # probes off
    assert not hardware.thread_probe_wanted(CPU)
    monkeypatch.delenv(hardware.PROBE_ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's count
    assert not hardware.thread_probe_wanted(CPU)
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads(1)
    assert not hardware.thread_probe_wanted(CPU)


def test_a_run_that_cut_its_threads_says_so_records_why_and_resumes_with_them(tmp_path, config_file, monkeypatch,
                                                                              probes_on, threads):
    """The probe's answer is in the run header, the summary and metrics.jsonl; a resumed run takes the count it
    started with, unprobed."""
    calls: list[int] = []
    monkeypatch.setattr("genai_cli.train.probe_threads", clocked_probe_threads({2: 2.0, 1: 0.05}, calls, run=True))
    monkeypatch.setattr("genai_cli.train.probe_cores", lambda: (2, {"threads": 2}))  # idle cores: the step decides
    cfg = config_file(precision="fp32", max_steps=4, checkpoint_every=2)
    r = invoke("train", cfg, "--runs-dir", tmp_path / "runs", "--name", "r")
    assert "threads 1 of 2 (faster here: 50.0 ms/step on 1 thread, 2000.0 on 2)" in r.stdout
    assert torch.get_num_threads() == 1
    run = tmp_path / "runs" / "r"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["summary"]["thread_probe"]["threads"] == 1
    assert [r["threads"] for r in thread_records(run)] == [1]
    probed = len(calls)
    threads(2)
    invoke("train", "--resume", run, "--set", "train.max_steps=6", "--runs-dir", tmp_path / "runs", "--quiet")
    assert probed and len(calls) == probed and torch.get_num_threads() == 1


def test_sample_and_evaluate_take_fewer_threads_where_a_core_is_busy(tmp_path, config_file, monkeypatch, threads,
                                                                     probes_on):
    """A command that runs one workload and ends times a parallel test product on torch's count and on half
    (``probe_cores``) and keeps the faster; it says so where it cut the count, keeps quiet where it did not, and
    never probes where the user set OMP_NUM_THREADS."""
    runs = tmp_path / "runs"
    monkeypatch.setenv(hardware.PROBE_ENV, "0")  # the tiny run itself is trained unprobed
    invoke("train", config_file(precision="fp32", max_steps=2), "--runs-dir", runs, "--name", "r", "--quiet")
    monkeypatch.setenv(hardware.PROBE_ENV, "1")
    products: list[int] = []
    busy = {2: 2.0, 1: 0.05}  # seconds per test product (the real product runs too)
    monkeypatch.setattr(hardware, "probe_threads", clocked_probe_threads(busy, products, run=True))
    threads(2)
    r = invoke("sample", runs / "r", "-n", "2", "--out", tmp_path / "a.png")
    said = "threads 1 of 2 (faster here: 50.0 ms per test product on 1 thread, 2000.0 on 2)"
    assert said in r.stderr and torch.get_num_threads() == 1 and set(products) == {1, 2}
    threads(2)
    r = invoke("evaluate", runs / "r", "-n", "4", "--runs-dir", runs, ok=False)  # no evaluator run: refused after
    assert said in r.stderr and torch.get_num_threads() == 1
    busy.update({2: 0.02})  # idle cores: the full count wins, nothing is said
    threads(2)
    r = invoke("sample", runs / "r", "-n", "2", "--out", tmp_path / "b.png")
    assert "threads" not in r.stderr and torch.get_num_threads() == 2
    products.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    invoke("sample", runs / "r", "-n", "2", "--out", tmp_path / "c.png")
    assert products == [] and torch.get_num_threads() == 2


def test_a_long_draw_follows_the_load_between_module_calls(monkeypatch, probes_on):
    """``following_load`` (genai sample, genai evaluate) picks the count at the start, then checks the cores again
    every few seconds at module calls through the draw, cutting at once and adding back after two free checks; it
    says each change, never probes inside a loop of small steps (its hook is detached there), and leaves no hook."""
    now, busy, said, probed = [0.0], [True], [], []
    fake_probe_cores(monkeypatch, lambda: 1 if busy[0] else 2, on_call=lambda: probed.append(now[0]))
    net = torch.nn.Linear(2, 2)
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    with torch.no_grad(), hardware.following_load(torch.device("cpu"), say=said.append, clock=lambda: now[0]):
        assert torch.get_num_threads() == 1 and said == ["threads 1 of 2 (faster here: 2.0 ms per test product "
                                                         "on 1 thread, 9.0 on 2)"]
        busy[0] = False
        for t in (1.0, 4.9):
            now[0] = t
            net(torch.ones(1, 2))
        assert probed == [0.0]  # not yet due
        now[0] = hardware.SAMPLE_FOLLOW_SECONDS
        net(torch.ones(1, 2))
        assert torch.get_num_threads() == 1 and len(probed) == 2  # free once: not yet
        with hardware.step_threads(1, torch.device("cpu")):  # a loop of small steps: one thread, no checks
            now[0] += hardware.CONFIRM_SECONDS
            net(torch.ones(1, 2))
            assert len(probed) == 2 and not hooks
        net(torch.ones(1, 2))  # after the loop: checked again, free again
        assert torch.get_num_threads() == 2 and len(probed) == 3
        assert said[-1] == "threads 2 of 2 again (the cores are free)"
        busy[0], now[0] = True, now[0] + hardware.SAMPLE_FOLLOW_SECONDS
        net(torch.ones(1, 2))
        assert torch.get_num_threads() == 1 and said[-1].startswith("threads 1 of 2")
    assert not hooks
    net(torch.ones(1, 2))
    assert len(probed) == 4


def test_the_core_probe_leaves_the_random_stream_alone(threads):
    """A run's checks of the cores come between its steps: they must not draw from torch's generator, or the run's
    noise would depend on when the load changed."""
    threads(2)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    hardware.probe_cores()
    assert torch.equal(torch.rand(4), expected)


def test_the_thread_count_follows_the_load_between_checks(monkeypatch, threads):
    """``LoadFollower.check`` probes the cores again only every ``every`` seconds, from torch's full count, and
    reports the record only where the count changed; it cuts threads at once but adds them only when a second check,
    ``CONFIRM_SECONDS`` later, finds the cores free too."""
    threads(1)  # the start chose half of 2
    now, busy, probed = [0.0], [True], []
    # Every probe starts from the full count.
    fake_probe_cores(monkeypatch, lambda: 1 if busy[0] else 2, on_call=lambda: probed.append(torch.get_num_threads()))
    follower = hardware.LoadFollower(2, every=20.0, clock=lambda: now[0])
    for t in (1.0, 2.0, 19.0):
        now[0] = t
        assert follower.check(0.1) is None and probed == []  # not yet due
    now[0] = 21.0
    assert follower.check(0.1) is None and probed == [2] and torch.get_num_threads() == 1  # still busy: no change
    # The core looks free for one check: a neighbour's pause. The count stays; the next check is 2 s later, not 20.
    busy[0], now[0] = False, 42.0
    assert follower.check(0.1) is None and probed == [2, 2] and torch.get_num_threads() == 1
    busy[0], now[0] = True, 43.0
    assert follower.check(0.1) is None and probed == [2, 2]  # not yet due
    now[0] = 44.0
    assert follower.check(0.1) is None and probed == [2, 2, 2] and torch.get_num_threads() == 1  # busy again
    now[0] = 46.0
    assert follower.check(0.1) is None and probed == [2, 2, 2]  # back to checks every 20 s
    # Free at two checks 2 s apart: the threads come back.
    busy[0], now[0] = False, 64.0
    assert follower.check(0.1) is None and torch.get_num_threads() == 1
    now[0] = 66.0
    record = follower.check(0.1)
    assert record["threads"] == 2 and torch.get_num_threads() == 2 and probed == [2] * 5  # the core is free again
    # A step far slower than the steps before it is checked at once, not 20 s later (but not within 2 s of a check),
    # and threads are cut at the first check that finds a core busy.
    busy[0] = True
    for t in (66.5, 67.0):
        now[0] = t
        assert follower.check(0.1) is None
    now[0] = 67.5
    assert follower.check(5.0) is None and probed == [2] * 5  # 1.5 s after the last check
    now[0] = 68.5
    assert follower.check(5.0)["threads"] == 1 and torch.get_num_threads() == 1 and probed == [2] * 6
    now[0] = 71.0
    assert follower.check(5.0) is None and probed == [2] * 6  # the first step after a check sets the typical


@pytest.mark.parametrize("cores, step_choice, follows", [(1, None, True), (2, 2, True), (2, 1, False)])
def test_a_run_follows_the_load_unless_its_steps_want_fewer_threads_on_idle_cores(
        tmp_path, config_file, monkeypatch, threads, probes_on, cores, step_choice, follows):
    """A run that starts beside a busy core takes half the threads without timing its step on all of them; on idle
    cores its step decides. It follows the load through training (a change is logged and said at its step) unless
    its step won on fewer threads on idle cores; a resumed run follows again from the count its start chose."""
    monkeypatch.setattr(hardware, "FOLLOW_SECONDS", 0.0)  # a check after every step
    stepped: list[int] = []
    seconds = {step_choice: 0.05, 3 - step_choice: 2.0} if step_choice else {}  # no step is timed beside a busy core
    monkeypatch.setattr("genai_cli.train.probe_threads", clocked_probe_threads(seconds, stepped))
    answers = iter([cores, 1, 1, 2, 2])  # the start's, then the loop's after steps 1..4 (free twice: threads added)
    fake_probe_cores(monkeypatch, lambda: next(answers), all_threads_ms=3.0)
    cfg = config_file(precision="fp32", max_steps=4)
    r = invoke("train", cfg, "--runs-dir", tmp_path / "runs", "--name", "r")
    assert bool(stepped) == (cores == 2)  # beside a busy core no step is timed
    start = cores if cores == 1 else step_choice
    if cores == 1:
        assert "threads 1 of 2 (faster here: 2.0 ms per test product on 1 thread, 3.0 on 2)" in r.stdout
    records = thread_records(tmp_path / "runs" / "r")
    changes = [(row["step"], row["threads"]) for row in records]
    if not follows:
        assert changes == [(0, 1)] and torch.get_num_threads() == 1
        return
    expected = [(0, start)] + ([(4, 2)] if start == 1 else [(1, 1), (4, 2)])
    assert changes == expected and torch.get_num_threads() == 2
    assert "step 4: threads 2 of 2 again (the cores are free)" in r.stdout
    assert "CPU threads" in invoke("inspect", tmp_path / "runs" / "r").stdout  # the history, as threads_history says
    assert cli.threads_history(records) == (
        f"{start} of 2 at the start; " + ("" if start == 1 else "1 from step 1, ")
        + "2 from step 4 (measured, following the load)")
    # A resumed run starts on the count its start chose and follows the load again.
    answers = iter([2, 2, 1])
    threads(2)
    invoke("train", "--resume", tmp_path / "runs" / "r", "--set", "train.max_steps=7", "--runs-dir", tmp_path / "runs",
           "--quiet")
    changes = [(row["step"], row["threads"]) for row in thread_records(tmp_path / "runs" / "r") if row["step"] > 4]
    assert changes == ([(6, 2)] if start == 1 else []) + [(7, 1)] and torch.get_num_threads() == 1


HEAP_STEPS = """
import ctypes, resource, sys, torch
from genai_cli.hardware import keep_freed_memory
mallopt = ctypes.CDLL(None).mallopt
mallopt(-3, 128 << 10), mallopt(-1, 128 << 10)  # glibc's documented defaults, held still (not adapted as it runs)
print(keep_freed_memory() if sys.argv[1] == "keep" else "glibc")
def step():  # a step's activations: 12 tensors of 4 MiB, all freed at its end
    xs = [torch.ones(1 << 20) for _ in range(12)]
    del xs
step(), step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc's malloc only")
def test_a_training_process_reuses_the_memory_its_steps_free_instead_of_faulting_it_in_again():
    def heap_steps(mode: str, **env) -> tuple[str, float]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
        out = subprocess.run([sys.executable, "-c", HEAP_STEPS, mode], env={**clean, **env}, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], float(out[1])

    _, given_back = heap_steps("glibc")
    assert given_back > 10_000  # each step's 48 MiB (12,288 pages) given back, then faulted in again page by page
    kept, faults = heap_steps("keep")
    assert kept == "True" and faults < given_back / 10  # served again from the heap (0 to a tensor's 1,024 pages)
    assert heap_steps("keep", GENAI_KEEP_FREED_MEMORY="0")[0] == "False"
    assert heap_steps("keep", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"  # a person's own setting is left alone


def test_the_trainer_keeps_freed_memory_on_a_cpu(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("genai_cli.train.keep_freed_memory", lambda: calls.append(True))
    make_trainer(tmp_path, "run", max_steps=1)
    assert calls == [True]
