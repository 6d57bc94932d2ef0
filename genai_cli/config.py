"""YAML -> typed dataclasses. Unknown keys fail at load time with a "did you mean" hint.

A config has four sections: ``model`` (``family`` plus that family's own ``Config`` dataclass),
``data``, ``train`` and ``sample``. ``--set a.b=v`` overrides are parsed as YAML scalars and typed
by the dataclass field they land on, exactly like values read from the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal, NewType, Optional

import yaml

from .errors import GenaiError
from .options import CONFIG_OPTIONS
from .registry import MODELS, did_you_mean

# -- references to other runs -------------------------------------------------------------------
# A family that builds on another run names it in a field of its Config:
#     autoencoder: RunRef = run_ref(accepts=("autoencoder", "vae"))
# and the YAML gives a run name, a run folder or a checkpoint path (``autoencoder: ae-mnist``).
# genai_cli/lineage.py resolves it before the model is built and embeds the parent in the checkpoint.
RunRef = NewType("RunRef", str)


@dataclass(frozen=True)
class ParentRef:
    """What a RunRef field accepts: the parent's families (and whether the field may stay empty)."""

    accepts: tuple[str, ...]
    required: bool = True

    def expected(self) -> str:
        return f"a run of family {' or '.join(self.accepts)}"


def run_ref(*, accepts: tuple[str, ...] | str, required: bool = True) -> Any:
    """The dataclass field of a RunRef (default None: the config must set it unless ``required=False``)."""
    accepts = (accepts,) if isinstance(accepts, str) else tuple(accepts)
    if not accepts:
        raise ValueError("run_ref(accepts=...) needs at least one family name")
    return field(default=None, metadata={"genai_parent": ParentRef(accepts, required)})


def parent_refs(config_cls) -> dict[str, ParentRef]:
    """The RunRef fields of a family's Config (a class or an instance), in declaration order."""
    refs = {}
    for f in dataclasses.fields(config_cls):
        ref = f.metadata.get("genai_parent")
        if ref is not None:
            refs[f.name] = ref
        elif f.type in (RunRef, "RunRef", "RunRef | None"):
            raise TypeError(f"{config_cls.__name__}.{f.name} is a RunRef: declare it with "
                            f"run_ref(accepts=(family, ...)) so the families it accepts are known")
    return refs


@dataclass
class DataConfig:
    name: str = "mnist5k"
    image_size: int | None = None  # None: the dataset's native size
    channels: int | None = None  # None: native; 1 or 3 converts (image_folder, shapes)
    # Pixels exactly 0 or 1. true (or "threshold"): threshold at 0.5, once. "stochastic": each pixel white with
    # probability its grey level, drawn afresh every time the loop draws a training image (the validation split
    # is drawn once, with a fixed seed): the binarised-MNIST protocol of the likelihood literature.
    binarize: Literal["threshold", "stochastic"] | bool = False
    val_fraction: float = 0.1  # of datasets without an official test split
    split_seed: int = 0  # the train/validation split is the same for every training seed
    limit: int | None = None  # use only this many training images (quick experiments, tests)
    root: str = "data"  # where torchvision datasets are downloaded / found
    path: str | None = None  # image_folder: the folder of images (sub-folders = classes)
    download: bool = True  # torchvision datasets: try to download when missing
    block_size: int = 64  # text datasets: characters per training sequence (the context of the models)
    # Data larger than memory (genai_cli/streaming.py). auto: an image_folder whose decoded images, or a text_file
    # whose in-memory tokenisation, would pass memory_budget_mb is streamed (images decoded in DataLoader workers as
    # the loop draws them; text read as token ids from a memory map beside the file); true/false force it.
    stream: Literal["auto"] | bool = "auto"
    memory_budget_mb: int = 2048
    workers: int | None = None  # DataLoader processes decoding streamed images (None: one per spare CPU core, 1-8)


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None  # when set, overrides epochs
    tbptt: int | None = None  # recurrent families: truncate backprop through time to k steps (sets model.tbptt)
    max_seconds: float | None = None  # a time budget: stop after this many seconds of training steps
    batch_size: int = 64
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.999  # None or 0: no EMA of the weights
    # the decay ramps up as min(ema_decay, (1 + step) / (10 + step)), so a short run's average is not mostly its
    # initialisation (0.995 is reached at step 1,790); false: ema_decay from the first step
    ema_warmup: bool = True
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # auto: bf16 autocast where the device runs bf16 natively (AMX/AVX512-BF16 CPUs, bf16 GPUs), fp16 on other
    # CUDA GPUs, fp32 elsewhere (genai_cli/hardware.py). An explicit bf16 on a CPU without it is emulated: slow.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_accum: int = 1  # micro-batches per optimizer step; batch_size stays the batch of one step
    compile: bool = False  # torch.compile the loss (or, for families with their own train_step, the sub-networks)
    channels_last: bool = False  # NHWC memory layout for convolutional families (faster on GPUs and oneDNN)
    keep_checkpoints: int = 2  # step_N.pt snapshots kept besides last.pt and best.pt (0: none)
    log: list[Literal["jsonl", "tensorboard"]] = field(default_factory=lambda: ["jsonl"])  # tensorboard: extra
    log_every: int = 50
    eval_every: int = 500  # validation metrics every N steps (and at the end)
    eval_max_images: int = 2000
    checkpoint_every: int = 500
    sample_every: int = 500
    sample_n: int = 64  # images in the grids written during training
    sample_seed: int = 0  # fixed, so grids across steps are comparable


def _sample_options(self) -> dict[str, Any]:
    """The family options this section sets (n and seed apart)."""
    return {k: v for k, v in asdict(self).items() if k not in ("n", "seed") and v is not None}


# Defaults for ``genai sample``: n, seed, and the sampling options that genai_cli/options.py marks ``config``; family
# options left at None use the family's defaults.
SampleConfig = make_dataclass(
    "SampleConfig",
    [("n", int, 64), ("seed", int, 0)] + [(o.name, Optional[o.type], None) for o in CONFIG_OPTIONS],
    namespace={"options": _sample_options, "__doc__": "A config's sample: section (see genai_cli/options.py)."},
)


@dataclass
class Config:
    family: str
    model: Any  # the family's Config dataclass
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"family": self.family, **asdict(self.model)},
            "data": asdict(self.data),
            "train": asdict(self.train),
            "sample": asdict(self.sample),
        }

    def to_yaml(self, resolved_precision: str | None = None) -> str:
        """The config as YAML; ``resolved_precision`` (e.g. 'fp32 (CPU without native bf16)') is written as a
        comment beside ``train.precision``, so config.yaml says what ran without changing what was asked."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if resolved_precision:
            line = f"  precision: {self.train.precision}\n"
            text = text.replace(line, f"  precision: {self.train.precision}  # resolved: {resolved_precision}\n", 1)
        return text


SECTIONS = ("model", "data", "train", "sample")


# -- typing of values ---------------------------------------------------------------------------
def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(value: Any, tp, key: str) -> Any:
    """Check/convert one value to the field's type; raise GenaiError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return coerce(value, arm, key)
            except GenaiError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise GenaiError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}"
                         f"{did_you_mean(value, typing.get_args(tp))}")
    if origin is list:
        (elem,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        raise GenaiError(f"config key '{key}' must be a list of {_type_name(elem)}, got {value!r}")
    if tp is Any:
        return value
    if tp is RunRef:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a run named 42
        if isinstance(value, str) and value.strip():
            return value
        raise GenaiError(f"config key '{key}' must name a run (a run name, run folder or checkpoint path), "
                         f"got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    raise GenaiError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def build_dataclass(cls, raw: dict[str, Any], section: str, read_before: tuple[str, ...] = ()):
    """``cls`` from the section's keys; ``read_before``: keys the section also holds that were taken out before
    (model.family), named among the valid keys of a typo's error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise GenaiError(f"config section '{section}' must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            valid = [*read_before, *names]
            raise GenaiError(f"unknown config key '{section}.{key}'{did_you_mean(key, valid)}; "
                             f"valid keys in '{section}': {', '.join(valid)}")
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


# -- loading ------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise GenaiError(f"--set expects section.key=value, got '{text}' (example: --set train.epochs=3)")
    key, _, raw = text.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise GenaiError(f"--set key must be section.key (one of {', '.join(SECTIONS)}), got '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides or []:
        (section, key), value = parse_override(text)
        if section not in SECTIONS:
            raise GenaiError(f"unknown config section '{section}' in --set {text}{did_you_mean(section, SECTIONS)}")
        sec = raw.setdefault(section, {}) or {}
        if not isinstance(sec, dict):
            raise GenaiError(f"config section '{section}' must be a mapping")
        sec[key] = value
        raw[section] = sec
    return raw


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    if not isinstance(raw, dict):
        raise GenaiError(f"{source}: a config is a mapping with sections {', '.join(SECTIONS)}")
    for key in raw:
        if key not in SECTIONS:
            raise GenaiError(f"{source}: unknown config section '{key}'{did_you_mean(key, SECTIONS)}; "
                             f"valid sections: {', '.join(SECTIONS)}")
    model_raw = dict(raw.get("model") or {})
    family = model_raw.pop("family", None)
    if family is None:
        raise GenaiError(f"{source}: 'model.family' is missing; valid families: {', '.join(MODELS.names())}")
    cls = MODELS.get(str(family))
    cfg = Config(
        family=str(family),
        model=build_dataclass(cls.Config, model_raw, "model", read_before=("family",)),
        data=build_dataclass(DataConfig, raw.get("data"), "data"),
        train=build_dataclass(TrainConfig, raw.get("train"), "train"),
        sample=build_dataclass(SampleConfig, raw.get("sample"), "sample"),
    )
    validate(cfg, cls)
    return cfg


def validate(cfg: Config, cls) -> None:
    t = cfg.train
    positive = {"train.batch_size": t.batch_size, "train.log_every": t.log_every, "train.eval_every": t.eval_every,
                "train.checkpoint_every": t.checkpoint_every, "train.sample_every": t.sample_every,
                "train.sample_n": t.sample_n, "train.grad_accum": t.grad_accum, "sample.n": cfg.sample.n}
    if t.max_steps is None:
        positive["train.epochs"] = t.epochs
    else:
        positive["train.max_steps"] = t.max_steps
    for key, value in positive.items():
        if value < 1:
            raise GenaiError(f"config key '{key}' must be at least 1, got {value}")
    if t.tbptt is not None:
        if "tbptt" not in {f.name for f in dataclasses.fields(cls.Config)}:
            takers = [n for n in MODELS.names()
                      if "tbptt" in {f.name for f in dataclasses.fields(MODELS.get(n).Config)}]
            raise GenaiError(f"train.tbptt applies to recurrent families ({', '.join(takers)}); "
                             f"family '{cfg.family}' has no recurrence: remove it")
        if t.tbptt < 0:
            raise GenaiError(f"config key 'train.tbptt' must be >= 0 (0: full backprop), got {t.tbptt}")
        if cfg.model.tbptt not in (0, t.tbptt):  # 0 is the family's default: nothing was asked of it
            raise GenaiError(f"train.tbptt = {t.tbptt} and model.tbptt = {cfg.model.tbptt} disagree; set one of them "
                             f"(train.tbptt is a shorthand for model.tbptt)")
        # resolved into the family's own field, which the written config.yaml shows: the loop stays family-agnostic
        cfg.model.tbptt = t.tbptt
    for key, ref in parent_refs(cls.Config).items():
        if ref.required and getattr(cfg.model, key) is None:
            raise GenaiError(f"config key 'model.{key}' is not set: family '{cfg.family}' builds on {ref.expected()}; "
                             f"set it to a run name, run folder or checkpoint (--set model.{key}=RUN)")
    if t.max_seconds is not None and t.max_seconds <= 0:
        raise GenaiError(f"config key 'train.max_seconds' must be positive, got {t.max_seconds}")
    if t.lr <= 0:
        raise GenaiError(f"config key 'train.lr' must be positive, got {t.lr}")
    if t.keep_checkpoints < 0:
        raise GenaiError(f"config key 'train.keep_checkpoints' must be 0 or more, got {t.keep_checkpoints}")
    if t.batch_size % t.grad_accum:
        raise GenaiError(f"train.batch_size {t.batch_size} does not split into train.grad_accum {t.grad_accum} "
                         f"micro-batches; use a multiple of {t.grad_accum}")
    if len(t.betas) != 2:
        raise GenaiError(f"config key 'train.betas' must be two numbers, got {t.betas}")
    if not 0 <= (t.ema_decay or 0) < 1:
        raise GenaiError(f"config key 'train.ema_decay' must be in [0, 1), got {t.ema_decay}")
    if cfg.data.image_size is not None and cfg.data.image_size < 2:
        raise GenaiError(f"config key 'data.image_size' must be at least 2, got {cfg.data.image_size}")
    if cfg.data.memory_budget_mb < 1:
        raise GenaiError(f"config key 'data.memory_budget_mb' must be at least 1, got {cfg.data.memory_budget_mb}")
    if cfg.data.workers is not None and cfg.data.workers < 0:
        raise GenaiError(f"config key 'data.workers' must be 0 (decode in the training process) or more, got "
                         f"{cfg.data.workers}")
    if not 0 < cfg.data.val_fraction < 1:
        raise GenaiError(f"config key 'data.val_fraction' must be in (0, 1), got {cfg.data.val_fraction}")
    for key in cfg.sample.options():
        if key not in cls.sample_options:
            raise GenaiError(f"config key 'sample.{key}' is not an option of family '{cfg.family}'; "
                             f"it takes: {', '.join(sorted(cls.sample_options)) or 'none'}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GenaiError(f"config file '{path}' not found; bundled configs are listed by 'genai list'")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GenaiError(f"{path}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise GenaiError(f"{path}: not a text (YAML) file") from None
    if raw is None:
        raise GenaiError(f"{path}: the config is empty; it needs at least model.family")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    raw = apply_overrides(load_yaml(path), overrides or [])
    return from_dict(raw, source=str(path))
