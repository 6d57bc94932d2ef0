"""Device and precision, chosen from what the hardware reports.

Training, sampling and evaluation all resolve ``device: auto`` and ``precision: auto`` here, so a run
trained in bf16 on a machine with native bf16 samples in fp32 on one without, and nothing outside this
module needs to know which processor it runs on.

Why it matters on the CPU: bf16 autocast is fast only where the processor has bf16 instructions (AMX
tiles, about 6x fp32 on a matrix product; AVX512-BF16, about 2x). Elsewhere (AVX2, most laptops and many
cloud CPUs) PyTorch emulates bf16 and a matrix product runs tens of times *slower* than in fp32.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import GenaiError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_warned: set[str] = set()  # warnings already printed by this process


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str, option: str = "train.device") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; an explicit device that is not there is a one-line error naming
    ``option``, where the user asked for it (``train.device`` in a config, ``--device`` on the command line)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GenaiError(f"{option} is 'cuda' but no CUDA GPU is visible; use {_auto(option)}")
    if name == "mps" and not mps_available():
        raise GenaiError(f"{option} is 'mps' but MPS is not available; use {_auto(option)}")
    return torch.device(name)


def _auto(option: str) -> str:
    return f"{option} auto" if option.startswith("--") else f"--set {option}=auto"


# Set to 1 or 0 to make ``auto`` act as if the CPU had (1) or lacked (0) native bf16, whatever it reports: for the
# test suite, which runs its precision-dependent tests both ways on any CPU, and for comparing the two on one machine.
NATIVE_BF16_ENV = "GENAI_CPU_NATIVE_BF16"


def cpu_bf16_units() -> dict[str, bool]:
    """Which bf16 units the CPU has and the OS lets a process use: {"amx": AMX tiles, "avx512_bf16": ...}.

    torch answers through private functions (they also check that the kernel enabled AMX for this process); they may
    change without notice, so this is the one place that calls them, and without them the CPU's flags in
    /proc/cpuinfo answer (Linux; elsewhere: none)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if callable(amx) and callable(avx):
        return {"amx": bool(amx()), "avx512_bf16": bool(avx())}
    flags = cpu_flags()
    return {"amx": "amx_bf16" in flags and "amx_tile" in flags, "avx512_bf16": "avx512_bf16" in flags}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AMX tiles or AVX512-BF16); ``GENAI_CPU_NATIVE_BF16`` overrides."""
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise GenaiError(f"{NATIVE_BF16_ENV} must be 1 or 0 (pretend the CPU has or lacks native bf16), got "
                         f"'{forced}'; unset it to use what the CPU reports")
    units = cpu_bf16_units()
    return units["amx"] or units["avx512_bf16"]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 arithmetic in hardware (not emulated)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return cpu_native_bf16()
    return False  # MPS: fp32 (bf16 support there depends on the OS version; not worth the risk by default)


# Multiply-adds of an operation below which a loop of such operations runs in the small-step setting. Sampling one
# token (or pixel) at a time runs thousands of them in sequence: at batch 1 the gpt_shakespeare_char step's largest
# product is 128 x 512 (65k), a MaskGIT filling step's 49 rows x 65k (3.2M). Each costs its dispatch more than its
# arithmetic, so two settings decide its speed:
# - one thread: every parallel operation wakes the other threads and waits for them at a barrier, a few microseconds
#   on an idle core and a scheduler tick (milliseconds) when another process holds a core. On a 2-core Xeon at load
#   ~2, decoding ran 14x faster on one thread than on two, and a MaskGIT image at batch 1 (8 steps) took 17 ms on one
#   thread against 1,990 ms on two; on an idle machine two threads were 5-14 % faster for decoding. Choosing by
#   timing the loop's first steps cost more than it saved where it mattered (each timed two-thread step took
#   milliseconds under load, and three noisy steps per count misled the choice), so the loop keeps one thread up to
#   16M multiply-adds per operation, where an operation's own time (~0.5 ms) reaches a scheduler tick's order.
# - no oneDNN: for operations this small its primitive set-up costs more than the arithmetic (an fp32 GELU of 512
#   values: 9-16 us through oneDNN, 2 us through ATen's own kernel).
# Measured: benchmarks/bench_decode.py ("Decoding at batch 1" in benchmarks/README.md).
SERIAL_BELOW_MACS = 1 << 24


def serial_steps(macs: int, device: torch.device) -> bool:
    """Whether ``step_threads`` runs a loop of operations of ``macs`` multiply-adds in the small-step setting."""
    return device.type == "cpu" and macs < SERIAL_BELOW_MACS


@contextmanager
def step_threads(macs: int, device: torch.device):
    """A context for a loop of small sequential operations, each about ``macs`` multiply-adds (e.g. batch x the
    largest weight matrix): below ``SERIAL_BELOW_MACS`` on a CPU, one thread and oneDNN off; a no-op on a GPU or
    for large work. Both settings are restored on exit, even on an error."""
    if not serial_steps(macs, device):
        yield
        return
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    try:
        with threads_held():
            yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn


class _ModuleCallCheck:
    """``following_load``'s check on every module call: a global forward pre-hook, attached only while no
    ``threads_held`` context is open (a hook puts every module call on torch's slower path: ~1.5 us each)."""

    def __init__(self, check):
        self.check, self.handle = check, None

    def attach(self) -> None:
        if self.handle is None:
            self.handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: self.check())

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


_held = 0  # threads_held contexts open in this process
_following: _ModuleCallCheck | None = None  # following_load's, while one is open


@contextmanager
def threads_held():
    """Code that sets the CPU thread count itself (``step_threads``' loops, a run trained inside another command, which
    follows the load its own way): ``following_load`` leaves the count alone meanwhile, and its hook is detached."""
    global _held
    _held += 1
    if _following is not None:
        _following.detach()
    try:
        yield
    finally:
        _held -= 1
        if _following is not None and not _held:
            _following.attach()


def largest_layer(model: torch.nn.Module) -> int:
    """Multiply-adds per position of the model's largest layer: its largest weight (numel of a matrix or kernel)."""
    return max((p.numel() for p in model.parameters() if p.dim() >= 2), default=0)


@dataclass(frozen=True)
class Precision:
    """A precision request resolved for one device: ``resolved`` is what runs, ``reason`` says why."""

    requested: str
    resolved: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32 (no autocast)."""
        return _DTYPES[self.resolved]

    @property
    def needs_scaler(self) -> bool:
        return self.resolved == "fp16"

    def autocast(self, device: torch.device):
        return nullcontext() if self.dtype is None else torch.autocast(device.type, dtype=self.dtype)

    def describe(self) -> str:
        """One phrase: 'fp32 (CPU without native bf16)' or 'bf16 (as requested)'."""
        return f"{self.resolved} ({self.reason})"


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``auto``: bf16 where the device runs it natively, fp16 (+ grad scaler) on CUDA without bf16, else fp32.

    An explicit request is honoured, except fp16 off CUDA (a one-line error: there is no grad scaler path).
    """
    if requested not in PRECISIONS:
        raise GenaiError(f"unknown precision '{requested}'; valid: {', '.join(PRECISIONS)}")
    kind = device.type.upper() if device.type != "mps" else "MPS"
    if requested == "auto":
        if native_bf16(device):
            what = cpu_bf16_name() if device.type == "cpu" else "native bf16"
            return Precision("auto", "bf16", f"{kind} with {what}")
        if device.type == "cuda":
            return Precision("auto", "fp16", "CUDA GPU without bf16")
        return Precision("auto", "fp32", f"{kind} without native bf16" if device.type == "cpu" else kind)
    if requested == "fp16" and device.type != "cuda":
        raise GenaiError("precision fp16 needs a CUDA GPU; use precision auto (or fp32) on this device")
    return Precision(requested, requested, "as requested")


# Set to 0 to make ``auto`` trust the CPU's report without timing the run's model (probe_training_precision): for
# the test suite, whose results must not depend on a measurement, and for comparing runs on one machine.
PROBE_ENV = "GENAI_PRECISION_PROBE"


def training_probe_wanted(precision: Precision, device: torch.device) -> bool:
    """Whether a run's ``auto`` should time its model in fp32 and bf16 before training: only where auto chose bf16
    because the CPU has bf16 units. There bf16 is fast for large matrix products but can be slower for tiny ones
    (width 128, batch 12: each autocast cast costs more than the bf16 product saves). An explicit request, a GPU,
    ``GENAI_CPU_NATIVE_BF16`` (which says what auto must assume) or ``GENAI_PRECISION_PROBE=0`` skip it."""
    return (precision.requested == "auto" and precision.resolved == "bf16" and device.type == "cpu"
            and probes_allowed() and os.environ.get(NATIVE_BF16_ENV, "").strip() not in ("0", "1"))


def probes_allowed() -> bool:
    """False where ``GENAI_PRECISION_PROBE=0`` turns every start-up probe off (precision and threads); a value other
    than 1 or 0 is a one-line error."""
    forced = os.environ.get(PROBE_ENV, "").strip()
    if forced not in ("", "0", "1"):
        raise GenaiError(f"{PROBE_ENV} must be 1 or 0 (time the model's step before training: precision auto, CPU "
                         f"threads), got '{forced}'; unset it to probe where it matters")
    return forced != "0"


def time_alternating(runs: dict, rounds: int = 3, clock=time.perf_counter) -> dict:
    """Median milliseconds per call of each of ``runs`` (key -> a call): each once untimed (first-call allocations),
    then all timed in alternation ``rounds`` times, so that a neighbour's load hits all alike. A run more than twice
    as slow as the fastest in the first round is not timed again: it has lost, and a stalled run costs seconds."""
    times: dict = {key: [] for key in runs}
    for run in runs.values():
        run()
    for i in range(rounds):
        for key, run in runs.items():
            if i and times[key][0] > 2 * min(t[0] for t in times.values()):
                continue
            t0 = clock()
            run()
            times[key].append(clock() - t0)
    return {key: 1000 * sorted(t)[len(t) // 2] for key, t in times.items()}


def probe_training_precision(auto: Precision, run_step, *, rounds: int = 3,
                             clock=time.perf_counter) -> tuple[Precision, dict[str, float]]:
    """``auto`` (bf16 on a CPU with bf16 units) or fp32, whichever runs ``run_step`` faster (``time_alternating``;
    the lower median wins, ties to ``auto``), and the record of why.

    ``run_step(precision)`` runs one training step (forward, backward, optimizer) of the run's model under that
    precision. The record gives both medians in ms per step and the probe's cost in seconds (``clock`` is injectable
    for tests)."""
    start = clock()
    candidates = {auto.resolved: auto, "fp32": Precision("auto", "fp32", "")}
    ms = time_alternating({name: (lambda p=p: run_step(p)) for name, p in candidates.items()}, rounds, clock)
    other = auto.resolved
    measured = f"{other} {ms[other]:.1f} against fp32 {ms['fp32']:.1f} ms/step"
    if ms["fp32"] < ms[other]:
        chosen = Precision("auto", "fp32", f"measured faster on this CPU than {other}: {measured}")
    else:
        chosen = Precision("auto", other, f"{auto.reason}, measured: {measured}")
    record = {f"{name}_ms_per_step": round(v, 3) for name, v in ms.items()}
    record["probe_seconds"] = round(clock() - start, 3)
    return chosen, record


def thread_probe_wanted(device: torch.device) -> bool:
    """Whether a new run should time its step on fewer CPU threads too (``probe_threads``): on a CPU where torch runs
    several, unless ``OMP_NUM_THREADS`` says how many (the user's count, and the test suite's) or
    ``GENAI_PRECISION_PROBE=0`` turns the start-up probes off."""
    return (device.type == "cpu" and torch.get_num_threads() > 1 and not os.environ.get("OMP_NUM_THREADS", "").strip()
            and probes_allowed())


def probe_threads(run_step, *, rounds: int = 3, clock=time.perf_counter) -> tuple[int, dict[str, float]]:
    """The CPU thread count that runs ``run_step()`` faster, torch's own (one per core) or half of it; set with
    ``torch.set_num_threads``; and the record of why.

    Every parallel operation ends at a barrier where its threads wait for each other, so while another process
    holds a core, torch's threads wait for a descheduled one at each of a step's hundreds of operations: on a 2-core
    CPU with one core busy, a character transformer trained at 6 sequences/s on two threads and 369 on one
    (benchmarks/README.md, "Threads"). On an idle machine all threads win and are kept. Timed by
    ``time_alternating``; the lower median wins, ties to more threads."""
    start = clock()
    most = torch.get_num_threads()
    counts = [most, max(1, most // 2)]

    def on(count: int):
        def run() -> None:
            torch.set_num_threads(count)
            run_step()
        return run
    try:
        ms = time_alternating({c: on(c) for c in counts}, rounds, clock)
    except BaseException:
        torch.set_num_threads(most)
        raise
    chosen = min(counts, key=lambda c: (ms[c], -c))
    torch.set_num_threads(chosen)
    record: dict[str, float] = {f"threads_{c}_ms_per_step": round(v, 3) for c, v in ms.items()}
    record.update(threads=chosen, of_threads=most, probe_seconds=round(clock() - start, 3))
    return chosen, record


def describe_threads(record: dict[str, Any]) -> str:
    """'threads 1 of 2 (faster here: 28.1 ms/step on 1 thread, 1960.0 on 2)' where the probe chose fewer than torch's
    count ('ms per test product' where ``probe_cores`` timed it); '' otherwise (threads are named only when they were
    cut)."""
    chosen, most = int(record["threads"]), int(record["of_threads"])
    if chosen == most:
        return ""
    unit = "ms per test product" if record.get("timed") == "product" else "ms/step"
    return (f"threads {chosen} of {most} (faster here: {record[f'threads_{chosen}_ms_per_step']:.1f} {unit} on "
            f"{chosen} thread{'s' if chosen > 1 else ''}, {record[f'threads_{most}_ms_per_step']:.1f} on {most})")


CORE_PROBE_SIZE = 512  # probe_cores' test product, (512 x 512) @ (512 x 512): ~2 ms on one core, parallel on more


def probe_cores(*, rounds: int = 3, clock=time.perf_counter) -> tuple[int, dict[str, float]]:
    """``probe_threads`` timing a fixed parallel product instead of a step: whether a core is busy, for a command
    with no step to spare (``genai sample``, ``genai evaluate``), a run's start and its checks (``LoadFollower``).
    A core held by another process
    stalls the product's barrier as it stalls every parallel operation of the workload: on a 2-core CPU with one
    core busy, 10.3 against 1.8 ms per product, and the demo's ``genai sample`` took 51 s on two threads against
    6.7 s on one (benchmarks/README.md, "Threads"). On idle cores more threads win and are kept. 15-40 ms."""
    a = torch.full((CORE_PROBE_SIZE, CORE_PROBE_SIZE), 0.5)  # not torch.randn: a run's random stream stays untouched
    count, record = probe_threads(lambda: torch.mm(a, a), rounds=rounds, clock=clock)
    return count, {**record, "timed": "product"}


FOLLOW_SECONDS = 20.0  # how often a run whose thread count follows the load checks the cores again
SPIKE = 3.0  # ... and sooner, after a step this many times its typical time
SPIKE_GAP_SECONDS = 2.0  # but not sooner than this after the last check
CONFIRM_SECONDS = 2.0  # a check that finds the cores free again is repeated this long after, before threads are added


class LoadFollower:
    """Keeps a run's CPU thread count following the load, between torch's count ``most`` and half of it:
    ``check`` runs ``probe_cores`` again (~25 ms) every ``every`` seconds, and after a step ``SPIKE`` times slower
    than its recent typical time, so a run that started on idle cores drops to half as soon as another process holds
    a core, and goes back within ``every`` seconds of its leaving. Without it, a demo run that chose 2 threads on idle
    cores trained at 8-16 images/s instead of ~500 for minutes while another job ran, and its time budget ended it at
    404 of 910 steps (benchmarks/README.md, "Threads").

    Threads are cut at once but added back only when a second check, ``CONFIRM_SECONDS`` later, finds the cores
    free too: a busy neighbour's pause of a few milliseconds looks free to one probe, and the two steps a demo run
    then took on two threads beside it cost it ~20 s (benchmarks/README.md, "Threads")."""

    def __init__(self, most: int, every: float | None = None, clock=time.perf_counter):
        self.most, self.every, self.clock = most, FOLLOW_SECONDS if every is None else every, clock
        self.last = clock()
        self.typical: float | None = None  # a moving average of the step's seconds since the last check
        self.free_once = False  # the last check found the cores free while the run had fewer threads

    def check(self, step_seconds: float | None = None) -> dict[str, float] | None:
        """After a step that took ``step_seconds`` (None: a caller with no steps, the timer alone): the probe's record
        where the count changed, else None."""
        now = self.clock()
        spike = (step_seconds is not None and self.typical is not None and step_seconds > SPIKE * self.typical
                 and now - self.last >= SPIKE_GAP_SECONDS)
        if not spike:
            if step_seconds is not None:
                self.typical = step_seconds if self.typical is None else 0.9 * self.typical + 0.1 * step_seconds
            if now - self.last < self.every:
                return None
        before = torch.get_num_threads()
        torch.set_num_threads(self.most)
        count, record = probe_cores()
        if count > before and not self.free_once:  # free at the first look: the count stays, checked again soon
            self.free_once = True
            torch.set_num_threads(before)
            self.last = self.clock() - self.every + min(self.every, CONFIRM_SECONDS)
            return None
        self.free_once = False
        self.last, self.typical = self.clock(), None  # the steps' time is learnt again at the count now set
        return record if count != before else None


def describe_change(record: dict[str, Any]) -> str:
    """What a ``LoadFollower`` check that changed the count says: ``describe_threads``'s line for a cut, else that
    the full count is back."""
    return describe_threads(record) or (
        f"threads {record['threads']:.0f} of {record['of_threads']:.0f} again (the cores are free)")


SAMPLE_FOLLOW_SECONDS = 5.0  # how often a command without training steps (genai sample, evaluate) checks the cores


@contextmanager
def following_load(device: torch.device, say=lambda line: None, clock=time.perf_counter):
    """A context for a command that runs one workload and ends (``genai sample``, ``genai evaluate``): where
    ``thread_probe_wanted``, ``probe_cores`` picks the thread count at its start, then a ``LoadFollower`` checks the
    cores again every ``SAMPLE_FOLLOW_SECONDS`` through it, looking at the clock at every module's forward call (a
    global pre-hook, removed on exit): such a command has no steps of its own to time, and a draw of many images
    that met a busy core on two threads would run ~8x slower to its end (benchmarks/README.md, "Threads"). ``say``
    gets the line of each change (``describe_change``); code in ``threads_held`` is left alone."""
    global _following
    if not thread_probe_wanted(device) or _following is not None:
        yield
        return
    record = probe_cores()[1]
    if line := describe_threads(record):
        say(line)
    follower = LoadFollower(int(record["of_threads"]), every=SAMPLE_FOLLOW_SECONDS, clock=clock)

    def check() -> None:
        if (changed := follower.check()) is not None:
            say(describe_change(changed))

    _following = _ModuleCallCheck(check)
    if not _held:
        _following.attach()
    try:
        yield
    finally:
        _following.detach()
        _following = None


_measured: dict[object, Precision] = {}  # measured_precision's answers, by workload key, for this process


def measured_precision(auto: Precision, device: torch.device, probe, key: object, rounds: int = 3,
                       macs: int | None = None) -> Precision:
    """``auto`` (what ``resolve_precision("auto", ...)`` chose), or fp32 where a short piece of the workload,
    ``probe()``, runs faster in it: ``probe_training_precision``'s rule for any workload, e.g. decoding a text one
    token at a time, whose tiny matrix products (batch 1, width 128) lose more to autocast's casts than bf16 saves.
    Only where ``training_probe_wanted`` says a probe is due; the answer is kept per ``key`` (family, batch, ...).

    A workload of small steps (``macs`` per operation, ``serial_steps``) is fp32 without a probe: it runs with oneDNN
    off, where a bf16 product takes ATen's reference kernel on every CPU (a 16 x 128 by 128 x 512 product: 268 us
    against fp32's 27; one row: 21 against 9), so there is nothing for bf16 to win and the probe's bf16 draws
    would cost a long text ~5 % (benchmarks/README.md, decoding)."""
    if not training_probe_wanted(auto, device):
        return auto
    if macs is not None and serial_steps(macs, device):
        return Precision("auto", "fp32", "small steps: without oneDNN bf16 products have no native kernel")
    if key not in _measured:
        def run(p: Precision) -> None:
            with torch.no_grad(), p.autocast(device):
                probe()

        _measured[key] = probe_training_precision(auto, run, rounds=rounds)[0]
    return _measured[key]


def cpu_bf16_name() -> str:
    """What gives this CPU native bf16, for messages: AMX, AVX512-BF16, or the override that says so."""
    if os.environ.get(NATIVE_BF16_ENV, "").strip() in ("0", "1"):
        return f"native bf16 as {NATIVE_BF16_ENV} says"
    return "AMX" if cpu_bf16_units()["amx"] else "AVX512-BF16"


def warn_if_emulated(precision: Precision, device: torch.device, warn) -> None:
    """One warning per process when an explicit bf16 will be emulated (slow) on this device."""
    if precision.resolved != "bf16" or precision.requested != "bf16" or native_bf16(device):
        return
    key = f"bf16:{device.type}"
    if key in _warned:
        return
    _warned.add(key)
    warn(f"warning: precision bf16 is emulated on this {device.type.upper()} (no AMX/AVX512-BF16): "
         f"expect it to run many times slower than fp32; use precision auto or fp32 (--set train.precision=auto)")


def recurrent_in_fp32(device: torch.device) -> bool:
    """Whether a recurrent kernel (nn.LSTM) must leave bf16 autocast: oneDNN has no bf16 LSTM without
    AVX512-BF16/AMX ("could not create a primitive descriptor"), so on such CPUs it runs in fp32. Asked of the
    kernel itself, not of ``GENAI_CPU_NATIVE_BF16``: that override says what ``auto`` assumes, while a kernel the CPU
    lacks stays missing whatever is assumed (an AVX2 CPU told it has bf16 would otherwise fail in the LSTM)."""
    return device.type == "cpu" and not _cpu_bf16_lstm()


@functools.cache
def _cpu_bf16_lstm() -> bool:
    """Whether this CPU runs an nn.LSTM under bf16 autocast: one step of a 1-unit LSTM as training runs it (with
    gradients) and as sampling does (without), tried once per process."""
    lstm, x = torch.nn.LSTM(1, 1, batch_first=True), torch.zeros(1, 1, 1)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(x)[0].sum().backward()
            with torch.no_grad():
                lstm(x)
    return runs_here(step)


def runs_here(step) -> bool:
    """Whether ``step()`` runs without a RuntimeError (a kernel this machine lacks), recording gradients whatever
    mode its caller is in: a probe first asked inside sampling (inference mode) must not fail for that."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            step()
    except RuntimeError:
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **options)``, in fp32 when it would run in bf16 on a CPU (bf16
    tensors, or bf16 autocast), the result cast back to q's dtype. The CPU's bf16 attention kernels are slow where
    its bf16 products are fast: forward + backward over 12 x 64 tokens of 4 heads took 36-60 ms in bf16 (flash),
    12-17 ms in bf16 (math, which materialises L x L) and 7.5-8.5 ms in fp32 (flash) with the casts, from 49 to 784
    positions fp32 was fastest (benchmarks/README.md, issue 18 section 4). Half of a character transformer's bf16
    training step was spent in the bf16 flash backward, which made bf16 training measure slower than fp32."""
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or autocast_bf16):
        mask = options.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            options["attn_mask"] = mask.float()
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **options)


# glibc's malloc, set for a training loop through mallopt. By default it hands the free top of its heap back to the
# kernel once that passes its trim threshold (128 KiB to start, raised as large blocks come and go), and maps large
# blocks afresh each time, so a step's activations, freed at its end, are faulted in again page by page at the next
# (each fault a kernel entry and a zeroed 4 KiB page). A training step allocates the same tensors every step: a heap
# that keeps what it freed serves them with no fault. A DiT-B step of the latent scaling study on the Xeon made
# ~16,000 page faults and spent 21 ms of its 218 ms in the kernel by default, none with these settings (1.13x the
# steps per CPU-second; 1.0x to 1.24x over seven families: benchmarks/README.md, "The heap of a training step").
# The process keeps up to 512 MiB of freed heap; blocks above 32 MiB are still mapped and unmapped one by one.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
HEAP_SETTINGS = {M_TRIM_THRESHOLD: 512 << 20, M_TOP_PAD: 64 << 20, M_MMAP_THRESHOLD: 32 << 20}
HEAP_ENV = "GENAI_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees for the next step (``HEAP_SETTINGS`` says why), for
    this whole process. Nothing happens (False) off glibc (macOS, Windows, musl), where a person set these
    parameters through the environment (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_THRESHOLD_``
    or ``GLIBC_TUNABLES``), or where ``GENAI_KEEP_FREED_MEMORY=0``. True once set."""
    own = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get(HEAP_ENV, "").strip() == "0" or any(k in os.environ for k in own) or any(
            f"glibc.malloc.{name}" in tunables for name in ("trim_threshold", "top_pad", "mmap_threshold")):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):  # no confstr name, no libc symbols (not glibc)
        return False
    return all(mallopt(param, value) == 1 for param, value in HEAP_SETTINGS.items())


def cpu_name() -> str:
    """The processor's model name, as lscpu would print it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> dict[str, object]:
    """What a reported figure ran on: CPU model, instruction set, native bf16, threads, torch, GPU if any."""
    units = cpu_bf16_units()
    info: dict[str, object] = {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": units["amx"],
        "avx512_bf16": units["avx512_bf16"],
        "native_bf16": cpu_native_bf16(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line() -> str:
    """``machine_summary`` as one line for the top of a benchmark table."""
    m = machine_summary()
    line = (f"CPU: {m['cpu']} | instruction set {m['cpu_capability']} | native bf16 "
            f"{'yes' if m['native_bf16'] else 'no'} (AMX {'yes' if m['amx'] else 'no'}, AVX512-BF16 "
            f"{'yes' if m['avx512_bf16'] else 'no'}) | {m['threads']} threads of {m['cores']} cores "
            f"| torch {m['torch']}")
    if "gpu" in m:
        line += f" | GPU: {m['gpu']}"
    return line
