"""Every way of drawing images from a trained model: the library code behind ``genai sample``.

A ``SampleRequest`` says what to draw: exactly one *mode*, the number of images, the seed and the family's
sampling options (temperature, top-k, steps, guidance, labels, ...).

  Plain()                  n independent samples; a conditional family draws the classes in turn, or ``labels``
  Sweep(axes)              one labelled grid row of n samples per combination of option values, same seed each
  Prefix(rows)             autoregressive families: complete real images from their top ``rows`` rows
  Walk(latents, dim)       latent families: rows of decoded latent points, a straight line between two latents
                           (interpolation) or one latent coordinate varied (traversal); ``latents`` says whether
                           the points are random draws or real images' latents (families with an encoder)
  Inpaint(region)          masked families: redraw a region of real images (top, bottom, left, right, center,
                           random[:p]) keeping the rest exactly; the AR families' Prefix(rows) is Inpaint("bottom")
                           with the boundary at a given row

Text runs (a ``TokenSpec``) draw in Plain and Sweep modes; ``prompt``, ``max_new_tokens`` (and a masked model's
``blank``) are options, so a sweep continues the same prompt once per setting. ``Samples.texts`` then holds the
decoded texts, and ``Samples.save`` writes a .txt (one labelled block per sweep setting).

``plan(model, request)`` checks a request once, in one place, before any work: the mode and every option
against the family (``sample_options``) and against the mode (an option that cannot be honoured is a one-line
``GenaiError``, never dropped), every value, and how many real images the mode needs (``Plan.real_images``).
``draw(model, request, images=...)`` draws under the precision the hardware runs best (``precision="auto"``)
and returns ``Samples``: the images, the class labels they were drawn with (conditional families) and the grid
layout (images per row, row names for sweeps); ``Samples.save`` writes a PNG grid or an .npz of raw images.

The options themselves (names, flags, which are sweepable, text-only or choose a mode) are declared once, in
``genai_cli/options.py``.

``select_mode`` maps the CLI's flags (--sweep, --prefix-rows, --mask, --interpolate, --traverse, --traverse-dim) onto
one mode, refusing combinations; ``check_out_path`` refuses an output file that cannot be written, before the
(possibly long) drawing starts.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import torch
from torch import Tensor

from .errors import GenaiError
from .options import BY_NAME, MODE_KEYS, SWEEPABLE, TEXT_KEYS, flag_of

DEFAULT_N = 64  # images when neither the request nor the run's ``sample:`` section says
SWEEP_N = 8  # images per setting of a sweep when the request does not say
WALK_STEPS = 8  # points per row of a walk (one row of n points when n is smaller)
PROBE_TOKENS = 8  # tokens of the text a precision probe writes (draw, precision "auto")
PREFIX_ORIGINALS = 8  # at most this many real images are completed; the n completions are shared among them

REGIONS = ("top", "bottom", "left", "right", "center", "random")
SAMPLER_SETTINGS = frozenset({"steps", "eta", "atol", "rtol"})  # a run's defaults of these go with its sampler


# -- modes --------------------------------------------------------------------------------------
class _Mode:
    """What every mode says of itself: its flag (for messages), the ``sample_options`` entries a family must offer
    for it (``requires``), and why it cannot honour an option (``refusal``: None when it can)."""

    flag: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()

    def refusal(self, key: str) -> str | None:
        return None


@dataclass(frozen=True)
class Plain(_Mode):
    """``n`` independent samples."""

    flag = "plain sampling"


@dataclass(frozen=True)
class Sweep(_Mode):
    """One grid row of ``n`` samples per combination of the axes' values (their product, first axis slowest),
    each row drawn from the same seed, so rows differ only by the setting. ``Sweep.of(temperature=[0.5, 1])``."""

    axes: tuple[tuple[str, tuple[Any, ...]], ...]

    @classmethod
    def of(cls, **axes: Sequence[Any]) -> Sweep:
        return cls(tuple((key, tuple(values)) for key, values in axes.items()))

    @property
    def flag(self) -> str:
        return "--sweep"

    @property
    def requires(self) -> frozenset[str]:
        return frozenset(key for key, _ in self.axes)

    def refusal(self, key: str) -> str | None:
        if key in self.requires:
            return f"{flag_of(key)} is given and swept at once; drop {flag_of(key)} or its --sweep"
        return None

    def settings(self) -> list[dict[str, Any]]:
        return [dict(combo) for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in self.axes])]


@dataclass(frozen=True)
class Prefix(_Mode):
    """Complete real images from their top ``rows`` rows (the autoregressive families). Of n completions,
    ``originals`` real images get n // originals each; the grid row of one original shows it, then the rows
    the model was given (the rest grey), then its completions. ``rows=0`` is plain sampling."""

    rows: int
    flag = "--prefix-rows"
    requires = frozenset({"prefix_rows"})


@dataclass(frozen=True)
class Walk(_Mode):
    """Rows of ``steps`` decoded latent points (the latent families; see ``genai_cli.nn.latent``).

    latents: "random": latents drawn as ``sample`` draws them (``temperature`` scales them); "real": the latents
      of real images (families with an encoder; no temperature).
    dim: None: each row is a straight line between two latents (interpolation); an int: each row varies that
      latent coordinate over +-3 standard deviations around one latent (traversal).
    steps: points per row (default: 8, or n when n is smaller); n must be a multiple of it.
    """

    latents: Literal["random", "real"] = "random"
    dim: int | None = None
    steps: int | None = None

    @property
    def flag(self) -> str:
        if self.dim is None:
            return "--interpolate" if self.latents == "random" else "--traverse"
        return "--traverse-dim" if self.latents == "random" else "--traverse --traverse-dim"

    @property
    def requires(self) -> frozenset[str]:
        keys = {"traverse_dim"} if self.dim is not None else set()
        if self.latents == "real":
            keys.add("traverse")
        elif self.dim is None:
            keys.add("interpolate")
        return frozenset(keys)

    def refusal(self, key: str) -> str | None:
        if key == "temperature" and self.latents == "real":
            return (f"--temperature scales random latents; {self.flag} walks between real images' latents, which "
                    "have none: drop --temperature, or walk between random latents (--interpolate)")
        if key not in ("temperature", "labels"):
            return f"{flag_of(key)} cannot be used with {self.flag}: a walk decodes latents, it takes --temperature" \
                   " (and --label for conditional families) only"
        return None


@dataclass(frozen=True)
class Inpaint(_Mode):
    """Redraw a region of real images, keeping every other pixel exactly (families listing "inpaint": the masked
    models, which predict from both sides). region: "top", "bottom", "left", "right" (that half of the image),
    "center" (the middle square of half the side), or "random" / "random:p" (each pixel with probability p,
    default 0.5, drawn from the seed). Shared among the originals as for ``Prefix``; the grid row of one original
    shows it, then what the model was given (the region grey), then the completions."""

    region: str
    flag = "--mask"
    requires = frozenset({"inpaint"})

    def probability(self) -> float | None:
        """The p of "random[:p]" (None for the other regions); a malformed region is a one-line error."""
        name, _, p = self.region.partition(":")
        if name not in REGIONS or (p and name != "random"):
            raise GenaiError(f"--mask must be one of {', '.join(REGIONS)} or random:P, got '{self.region}'")
        if name != "random":
            return None
        try:
            prob = float(p) if p else 0.5
        except ValueError:
            prob = -1.0
        if not 0 < prob <= 1:
            raise GenaiError(f"--mask random:P needs P in (0, 1], got '{p}'; e.g. --mask random:0.5")
        return prob

    def pixels(self, m: int, size: int, generator: torch.Generator | None = None,
               device: torch.device | None = None) -> Tensor:
        """(m, 1, size, size) bool, True where pixels are redrawn."""
        prob = self.probability()
        if prob is not None:
            return torch.rand(m, 1, size, size, generator=generator, device=device) < prob
        mask = torch.zeros(m, 1, size, size, dtype=torch.bool, device=device)
        half, quarter = size // 2, size // 4
        where = {"top": (slice(0, half), slice(None)), "bottom": (slice(half, None), slice(None)),
                 "left": (slice(None), slice(0, half)), "right": (slice(None), slice(half, None)),
                 "center": (slice(quarter, size - quarter), slice(quarter, size - quarter))}[self.region]
        mask[:, :, where[0], where[1]] = True
        return mask


Mode = Union[Plain, Sweep, Prefix, Walk, Inpaint]
MODES = (Plain, Sweep, Prefix, Walk, Inpaint)


def parse_sweeps(texts: Iterable[str]) -> list[tuple[str, tuple[Any, ...]]]:
    """CLI ``--sweep`` texts ("temperature=0.5,1,1.5") -> [(key, values)], values parsed as YAML scalars."""
    import yaml

    parsed = []
    for text in texts:
        key, sep, values = text.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values.strip():
            raise GenaiError(f"--sweep expects option=v1,v2,..., got '{text}' (example: --sweep temperature=0.5,1,1.5)")
        parsed.append((key, tuple(yaml.safe_load(v) for v in values.split(","))))
    return parsed


def select_mode(*, sweeps: Sequence[tuple[str, Sequence[Any]]] = (), prefix_rows: int | None = None,
                inpaint: str | None = None, interpolate: bool = False, traverse: bool = False,
                traverse_dim: int | None = None) -> Mode:
    """The one mode the CLI's flags ask for; two modes at once is a one-line error.

    --traverse and --traverse-dim together are one walk (a traversal starting at real images' latents).
    """
    given = [f for f, on in (("--sweep", bool(sweeps)), ("--prefix-rows", prefix_rows is not None),
                             ("--mask", inpaint is not None),
                             ("--interpolate", interpolate), ("--traverse", traverse),
                             ("--traverse-dim", traverse_dim is not None)) if on]
    if len(given) > 1 and set(given) != {"--traverse", "--traverse-dim"}:
        listed = " and ".join([", ".join(given[:-1]), given[-1]])
        raise GenaiError(f"{listed} are different ways of drawing; use one at a time")
    if sweeps:
        return Sweep(tuple((key, tuple(values)) for key, values in sweeps))
    if prefix_rows is not None:
        return Prefix(prefix_rows)
    if inpaint is not None:
        return Inpaint(inpaint)
    if interpolate or traverse or traverse_dim is not None:
        return Walk("real" if traverse else "random", traverse_dim)
    return Plain()


# -- the request and its plan -------------------------------------------------------------------
@dataclass(frozen=True)
class SampleRequest:
    """What to draw. ``options`` are the family's sampling options given explicitly (an option the family or
    the mode cannot honour is refused); ``defaults`` (a run's ``sample:`` section: n, seed and options) apply
    only where the family and the mode take them. n: images (Plain, Prefix, Walk) or images per row (Sweep)."""

    mode: Mode = field(default_factory=Plain)
    n: int | None = None
    seed: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    chunk: int | None = None  # Plain: at most this many per sample() call (memory), all from one seeded generator


@dataclass(frozen=True)
class Plan:
    """A request checked against one model, with everything resolved: what ``draw`` does, nothing left to fail
    on but the family's own checks of option values (e.g. a diffusion step count above its timesteps)."""

    mode: Mode
    family: str
    n: int  # images per setting (Plain, Sweep), completions (Prefix), points (Walk)
    seed: int
    options: dict[str, Any]  # passed to sample() / walk(), labels apart
    labels: int | Tensor | None  # given classes; None: a conditional family draws the classes in turn
    conditional: bool
    real_images: int = 0  # real images the mode needs (Prefix, Inpaint: the originals; Walk "real": start points)
    rows: int = 1  # Walk: rows; Prefix, Inpaint: originals
    per_row: int = 0  # Walk: points per row; Prefix, Inpaint: completions per original
    settings: tuple[dict[str, Any], ...] = ()  # Sweep: one options dict per row
    chunk: int | None = None  # Plain: samples per sample() call (None: all at once)


def family_of(model) -> str:
    from .registry import MODELS

    for entry in MODELS.entries():
        if entry.obj is type(model):
            return entry.name
    return type(model).__name__.lower()


def refuse_unsupported(family: str, cls, keys: Iterable[str]) -> None:
    """One line naming the first option family ``family`` cannot honour, and the families that can."""
    from .registry import MODELS

    for key in keys:
        if key not in cls.sample_options:
            takers = [n for n in MODELS.names() if key in MODELS.get(n).sample_options]
            raise GenaiError(f"{flag_of(key)} is not an option of family '{family}'; "
                             f"families that take it: {', '.join(takers) or 'none'}")


def check_values(model, options: Mapping[str, Any]) -> None:
    """Option values that cannot work, checked before any drawing (the families check again in ``sample``)."""
    for key, value in options.items():
        least = BY_NAME[key].at_least if key in BY_NAME else None
        if least is not None and isinstance(value, int) and not isinstance(value, bool) and value < least:
            raise GenaiError(f"{flag_of(key)} must be at least {least}, got {value}")
    if model.discrete:
        from .sampling import check_sampling_options

        check_sampling_options(temperature=options.get("temperature"), top_k=options.get("top_k"),
                               top_p=options.get("top_p"), noise_std=options.get("noise_std"),
                               noise_on=options.get("noise_on"))
    elif "temperature" in options:
        t = options["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise GenaiError(f"--temperature must be a finite number >= 0, got {t!r}")


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GenaiError(f"{what} must be at least 1, got {value!r}")
    return value


def plan(model, request: SampleRequest) -> Plan:
    """Check ``request`` against ``model`` (see the module doc) and resolve it; every refusal is one line."""
    mode = request.mode
    if not isinstance(mode, MODES):
        raise GenaiError(f"unknown sampling mode {mode!r}; use Plain(), Sweep(...), Prefix(rows), Inpaint(region) "
                         f"or Walk(...)")
    if isinstance(mode, Inpaint):
        mode.probability()  # a malformed region fails here
    cls, family = type(model), family_of(model)
    options = dict(request.options)
    _check_modality(model, mode, options)
    for key in options:
        if key in MODE_KEYS:
            raise GenaiError(f"{flag_of(key)} chooses a way of drawing, not an option of it: "
                             f"pass it as the request's mode (Prefix, Inpaint, Walk), not in options")
    if isinstance(mode, Sweep):
        _check_axes(mode)
    refuse_unsupported(family, cls, [*options, *sorted(mode.requires)])
    for key in options:
        why = mode.refusal(key)
        if why:
            raise GenaiError(why)

    defaults = {k: v for k, v in request.defaults.items() if v is not None}
    merged = {k: v for k, v in defaults.items() if k in cls.sample_options and k not in MODE_KEYS
              and k not in mode.requires and mode.refusal(k) is None}
    if "sampler" in options and options["sampler"] != defaults.get("sampler"):
        # The run's steps, eta and tolerances were chosen for its own sampler: another sampler takes its own defaults
        # (the run's dpm++2m 20 steps do not make --sampler ddpm fail, nor its heun 10 steps --sampler dopri5).
        merged = {k: v for k, v in merged.items() if k not in SAMPLER_SETTINGS}
    merged.update(options)
    labels = merged.pop("labels", None)
    conditional = bool(model.conditional)
    if labels is not None:
        _check_labels(model, family, labels, conditional)
    check_values(model, merged)
    model.check_sample_options(merged)
    seed = request.seed if request.seed is not None else defaults.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GenaiError(f"--seed must be an integer, got {seed!r}")
    explicit_n = request.n is not None
    n = _count(request.n, "-n") if explicit_n else None

    common = dict(family=family, seed=seed, options=merged, labels=labels, conditional=conditional)
    if isinstance(mode, Prefix):
        from .sampling import check_sampling_options

        check_sampling_options(prefix_rows=mode.rows, height=model.spec.size)
        n = n or defaults.get("n", DEFAULT_N)
        if mode.rows == 0:  # nothing given: plain sampling
            return Plan(mode=Plain(), n=n, **common)
        return _plan_completion(mode, n, common)
    if isinstance(mode, Inpaint):
        return _plan_completion(mode, n or defaults.get("n", DEFAULT_N), common)
    if isinstance(mode, Walk):
        return _plan_walk(model, mode, n, defaults.get("n", DEFAULT_N), common)
    if isinstance(mode, Sweep):
        settings = tuple({**merged, **s} for s in mode.settings())
        for s in settings:
            check_values(model, s)
            model.check_sample_options(s)
        return Plan(mode=mode, n=n or SWEEP_N, settings=settings, rows=len(settings), **common)
    chunk = _count(request.chunk, "a request's chunk") if request.chunk is not None else None
    return Plan(mode=mode, n=n or defaults.get("n", DEFAULT_N), chunk=chunk, **common)


def _plan_completion(mode: Prefix | Inpaint, n: int, common: dict[str, Any]) -> Plan:
    """Prefix and Inpaint: n completions shared among as many real images as divide n (at most 8)."""
    originals = max(d for d in range(1, min(PREFIX_ORIGINALS, n) + 1) if n % d == 0)
    return Plan(mode=mode, n=n, real_images=originals, rows=originals, per_row=n // originals, **common)


def _check_modality(model, mode: Mode, options: Mapping[str, Any]) -> None:
    """What the data spec allows: text runs take prompts and draw plain or swept; image runs take no prompt. One line
    each way."""
    if not model.spec.real_data_modes:
        if not isinstance(mode, (Plain, Sweep)):
            raise GenaiError(f"{mode.flag} works on images; this run models {model.spec.describe()}: continue a "
                             f"text with --prompt (and --max-new-tokens)")
        if "labels" in options:
            raise GenaiError(f"--label needs a class-conditional image model; this run models {model.spec.describe()}")
    if not model.spec.takes_prompts:
        for key in options:
            if key in TEXT_KEYS:
                raise GenaiError(f"{flag_of(key)} is for text runs; this run models {model.spec.describe()} images: "
                                 f"complete images with --prefix-rows or --mask")


def _check_axes(mode: Sweep) -> None:
    seen = set()
    for key, values in mode.axes:
        if key not in SWEEPABLE:
            raise GenaiError(f"--sweep cannot vary '{key}'; sweepable: {', '.join(SWEEPABLE)}")
        if key in seen:
            raise GenaiError(f"--sweep varies '{key}' twice; give all its values in one --sweep {key}=v1,v2,...")
        if not values:
            raise GenaiError(f"--sweep {key} has no values; example: --sweep {key}=v1,v2")
        seen.add(key)


def _check_labels(model, family: str, labels: Any, conditional: bool) -> None:
    k = model.spec.num_classes
    if not conditional:
        raise GenaiError(f"--label needs a class-conditional model; this {family} model draws without classes "
                         f"(train one with labels, e.g. model.class_conditional=true for ddpm, or family cgan)")
    if isinstance(labels, bool) or not isinstance(labels, (int, Tensor)):
        raise GenaiError(f"labels must be a class index or a LongTensor of them, got {type(labels).__name__}")
    if isinstance(labels, int) and not 0 <= labels < k:
        raise GenaiError(f"--label {labels} is out of range; this model's classes are 0..{k - 1}")


def _plan_walk(model, mode: Walk, n: int | None, default_n: int, common: dict[str, Any]) -> Plan:
    latent_dim = model.config.latent_dim
    if mode.latents not in ("random", "real"):
        raise GenaiError(f"a walk's latents are 'random' or 'real', got {mode.latents!r}")
    if mode.dim is not None and (isinstance(mode.dim, bool) or not isinstance(mode.dim, int)
                                 or not 0 <= mode.dim < latent_dim):
        raise GenaiError(f"--traverse-dim {mode.dim} is out of range; latent dims are 0..{latent_dim - 1}")
    if n is not None:
        steps = _count(mode.steps, "a walk's steps") if mode.steps is not None else min(WALK_STEPS, n)
        if n % steps:
            raise GenaiError(f"{mode.flag} draws rows of {steps} points: -n must be a multiple of {steps} "
                             f"(or at most {steps}, for one row), got {n}")
    else:  # the run's default n, rounded down to whole rows
        steps = _count(mode.steps, "a walk's steps") if mode.steps is not None else min(WALK_STEPS, default_n)
        n = max(1, default_n // steps) * steps
    rows = n // steps
    from .nn.latent import walk_points

    real = walk_points(rows, mode.dim) if mode.latents == "real" else 0
    return Plan(mode=mode, n=n, real_images=real, rows=rows, per_row=steps, **common)


# -- drawing ------------------------------------------------------------------------------------
@dataclass
class Samples:
    """What ``draw`` returns. ``images`` (N, C, H, W) float32 in [0, 1] on the CPU, in grid order; ``labels``
    (N,) the class each image was drawn with (conditional families; None otherwise); ``nrow`` images per grid
    row; ``row_names`` one name per row (sweeps), written beside the rows of the PNG."""

    images: Tensor  # text runs: the token ids (N, L)
    labels: Tensor | None
    nrow: int
    row_names: list[str] | None = None
    seed: int = 0
    texts: list[str] | None = None  # text runs: the decoded texts, in grid order
    spec: Any = None  # the data spec of the model drawn from (what files it may be saved as)
    # Plain draws: the network passes one sample() call took (``network_evaluations``; an adaptive solver's measured)
    network_evaluations: int | None = None

    def describe(self) -> str:
        what = "texts" if self.texts is not None else "images"
        if self.row_names:
            return f"{len(self.row_names)} settings x {self.nrow} {what}"
        if self.texts is not None:
            return f"{len(self.texts)} texts of {self.images.shape[1]} characters"
        return f"{self.images.shape[0]} images {tuple(self.images.shape[1:])}"

    def text(self) -> str:
        """The texts as written to a .txt: separated by a rule; a sweep's under one header per setting."""
        from .runs import TEXT_SEPARATOR

        texts = self.texts or []
        blocks = [texts[i:i + self.nrow] for i in range(0, len(texts), self.nrow)] if self.row_names else [texts]
        out = []
        for i, block in enumerate(blocks):
            if self.row_names:
                out.append(f"=== {self.row_names[i]} ===")
            out.append(TEXT_SEPARATOR.join(block))
        return "\n\n".join(out) + "\n"

    def save(self, path: str | Path) -> Path:
        """A PNG grid (labelled rows for a sweep) or an .npz with ``images`` (and ``labels``); text runs: a .txt."""
        import numpy as np

        from .runs import labelled_grid, save_grid

        path = check_out_path(path, Sweep(()) if self.row_names else None, self.spec)
        try:
            if path.suffix == ".txt":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self.text(), encoding="utf-8")
            elif path.suffix == ".npz":
                arrays = {"images": self.images.numpy().astype(np.float32)}
                if self.labels is not None:
                    arrays["labels"] = self.labels.numpy()
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, **arrays)
            elif self.row_names:
                labelled_grid(list(self.images.split(self.nrow)), self.row_names, path)
            else:
                save_grid(self.images, path, nrow=self.nrow)
        except OSError as e:
            raise GenaiError(f"cannot write '{path}': {e.strerror or e}; choose another --out") from None
        return path


def check_out_path(path: str | Path, mode: Mode | None = None, spec=None) -> Path:
    """Refuse, before drawing, an output file that cannot be written: a suffix the data ``spec`` does not write
    (``spec.out_suffixes``; default: an image spec's .png or .npz), a folder, a parent that is a file, or a folder we
    may not write to (tried with a temporary file, so it holds for root too)."""
    from .spec import ImageSpec

    path = Path(path)
    spec = spec or ImageSpec()
    if path.suffix not in spec.out_suffixes:
        raise GenaiError(f"{spec.out_hint}, got '{path}'")
    if isinstance(mode, Sweep) and path.suffix not in (".png", ".txt"):
        raise GenaiError("--sweep draws a labelled PNG; use --out NAME.png")
    if path.is_dir():
        raise GenaiError(f"--out '{path}' is a folder; give a file name ending in .png or .npz")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the missing folders are made when saving
    if not folder.is_dir():
        raise GenaiError(f"cannot write '{path}': '{folder}' is a file, not a folder; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise GenaiError(f"cannot write '{path}': folder '{folder}' is not writable ({e.strerror or e}); "
                         f"choose another --out") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise GenaiError(f"cannot write '{path}': the file is read-only; choose another --out")
    return path


def validation_images(data_cfg, k: int) -> Tensor:
    """The first k validation images (k, C, H, W) in [0, 1] of the dataset ``data_cfg`` describes (a run's
    ``data:`` section): what ``genai sample`` completes (Prefix) and walks between (Walk "real")."""
    from .data import load_data, to_float

    data = load_data(data_cfg)
    if data.val_x.shape[0] < k:
        raise GenaiError(f"the validation split has only {data.val_x.shape[0]} images; ask for fewer (-n)")
    return to_float(data.val_x[:k])


def draw(model, request: SampleRequest | None = None, *, images: Tensor | None = None,
         device: str | torch.device | None = None, precision: str = "auto") -> Samples:
    """Draw what ``request`` asks for (see the module doc) from ``model`` and return ``Samples``.

    images: real images (N, C, H, W) in [0, 1], at least ``plan(model, request).real_images`` of them, for
      Prefix, Inpaint and Walk(latents="real"); ``validation_images`` gives a run's. device: where to draw (the model
      is moved there; default: where it is). precision: "auto" (what the hardware runs natively; see
      ``genai_cli.hardware``), "fp32" or "bf16". The same seed gives the same images on the same machine.
    """
    from .hardware import largest_layer, measured_precision, pick_device, resolve_precision

    request = request or SampleRequest()
    p = plan(model, request)
    dev = device if isinstance(device, torch.device) else pick_device(device) if device else model.device
    model.to(dev)
    if p.real_images:
        if images is None:
            raise GenaiError(f"{p.mode.flag} needs {p.real_images} real images: pass images=(N, C, H, W) in [0, 1] "
                             f"(validation_images(cfg.data, k) loads a run's)")
        if images.dim() != 4 or tuple(images.shape[1:]) != tuple(model.spec.shape) \
                or images.shape[0] < p.real_images:
            raise GenaiError(f"{p.mode.flag} needs {p.real_images} real images of shape {tuple(model.spec.shape)}, "
                             f"got a tensor of shape {tuple(images.shape)}")
        images = images[: p.real_images].to(dev, torch.float32)
    elif images is not None:
        raise GenaiError(f"{p.mode.flag} uses no real images; images= is for Prefix, Inpaint and "
                         f"Walk(latents='real')")
    was_training = model.training
    model.eval()
    try:
        prec = resolve_precision(precision, dev)
        probe = {**p.options, "max_new_tokens": PROBE_TOKENS}
        # The probe draws 8 times (fp32 and bf16, 1 untimed + 3 timed each): a draw that takes fewer network passes
        # than that (genai sample --max-new-tokens 1) would pay more for the measurement than either precision
        # could save it, so it takes auto's answer unmeasured.
        if (model.spec.takes_prompts and isinstance(p.mode, Plain)
                and model.network_evaluations(p.options) > 8 * model.network_evaluations(probe)):
            # Writing a text one token at a time multiplies tiny matrices, where native bf16 can lose to fp32: auto
            # times a few tokens of this very workload in both and keeps the faster (once per process and shape).
            prec = measured_precision(prec, dev, key=(p.family, p.n, dev.type), probe=lambda: model.sample(
                p.n, generator=torch.Generator(dev).manual_seed(0), **probe), macs=p.n * largest_layer(model))
        with torch.no_grad(), prec.autocast(dev):
            samples = DRAWERS[type(p.mode)](model, p, images, dev)
    finally:
        model.train(was_training)
    samples.seed, samples.spec = p.seed, model.spec
    if isinstance(p.mode, Plain):  # after drawing: an adaptive ODE solver's count is that of this draw
        samples.network_evaluations = int(model.network_evaluations(p.options))
    return samples


def _generator(p: Plan, dev: torch.device) -> torch.Generator:
    return torch.Generator(dev).manual_seed(p.seed)


def _labels(model, p: Plan, count: int, dev: torch.device) -> Tensor | None:
    """(count,) classes to draw with: the given ones, or the classes in turn; None for an unconditional model."""
    if not p.conditional:
        return None
    if p.labels is None:  # one class per grid column when the grid is num_classes wide
        return torch.arange(count, device=dev) % model.spec.num_classes
    if isinstance(p.labels, int):
        return torch.full((count,), p.labels, dtype=torch.long, device=dev)
    return p.labels.to(dev)


def _cpu(images: Tensor) -> Tensor:
    return images.float().cpu()


def _draw_plain(model, p: Plan, images, dev) -> Samples:
    from .runs import grid_rows

    labels = _labels(model, p, p.n, dev)
    g, size = _generator(p, dev), p.chunk or p.n
    parts = [model.sample(min(size, p.n - i), generator=g, **p.options,
                          **({} if labels is None else {"labels": labels[i:i + size]}))
             for i in range(0, p.n, size)]
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    nrow = model.spec.num_classes if labels is not None and p.labels is None else grid_rows(p.n)
    return Samples(_cpu(out), None if labels is None else labels.cpu(), nrow, texts=model.spec.decode_samples(out))


def _draw_sweep(model, p: Plan, images, dev) -> Samples:
    labels = _labels(model, p, p.n, dev)
    extra = {} if labels is None else {"labels": labels}
    rows = [model.sample(p.n, generator=_generator(p, dev), **s, **extra).cpu() for s in p.settings]
    axes = [key for key, _ in p.mode.axes]
    names = [" ".join(f"{k}={s[k]}" for k in axes) for s in p.settings]
    texts = [model.spec.decode_samples(row) for row in rows]
    if texts[0] is not None:  # texts of different lengths are fine in a .txt; the ids keep the first's
        texts = [t for row in texts for t in row]
        return Samples(rows[0], None, p.n, names, texts=texts)
    return Samples(torch.cat([_cpu(r) for r in rows]), None if labels is None else labels.cpu().repeat(len(rows)),
                   p.n, names)


def _beside_originals(model, p: Plan, images: Tensor, redrawn: Tensor, completions: Tensor) -> Samples:
    """One grid row per original: the image, what the model was given (the ``redrawn`` (m, 1, H, W) pixels grey),
    then its completions."""
    shown = images.masked_fill(redrawn, 0.5)
    grid = torch.cat([images[:, None], shown[:, None], completions.view(p.rows, p.per_row, *model.spec.shape)], 1)
    return Samples(_cpu(grid.flatten(0, 1)), None, p.per_row + 2)


def _draw_prefix(model, p: Plan, images: Tensor, dev) -> Samples:
    rows = p.mode.rows
    completions = model.sample(p.n, generator=_generator(p, dev), prefix=images, prefix_rows=rows, **p.options)
    redrawn = torch.zeros(images.shape[0], 1, *images.shape[2:], dtype=torch.bool, device=images.device)
    redrawn[:, :, rows:] = True
    return _beside_originals(model, p, images, redrawn, completions)


def _draw_walk(model, p: Plan, images: Tensor | None, dev) -> Samples:
    mode: Walk = p.mode
    kwargs: dict[str, Any] = dict(generator=_generator(p, dev), images=images, dim=mode.dim, **p.options)
    labels = _labels(model, p, p.rows, dev)  # one class per row
    if labels is not None:
        kwargs["labels"] = labels
    out = model.walk(p.rows, p.per_row, **kwargs)
    return Samples(_cpu(out), None if labels is None else labels.cpu().repeat_interleave(p.per_row), p.per_row)


def _draw_inpaint(model, p: Plan, images: Tensor, dev) -> Samples:
    g = _generator(p, dev)
    mask = p.mode.pixels(images.shape[0], model.spec.size, generator=g, device=dev)
    completions = model.sample(p.n, generator=g, known=images, mask=mask, **p.options)
    return _beside_originals(model, p, images, mask, completions)


DRAWERS: dict[type, Callable[..., Samples]] = {Plain: _draw_plain, Sweep: _draw_sweep, Prefix: _draw_prefix,
                                               Walk: _draw_walk, Inpaint: _draw_inpaint}
