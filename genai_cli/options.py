"""Every sampling option, declared once.

One row per option: its name in the API (``SampleRequest.options``, a family's ``sample()`` keyword, a config's
``sample:`` key), its type, its help, who takes it, and what it may do. Everything else is derived from this table:

- the ``genai sample`` flags (``cli.sampling_flags`` builds the Typer options from the rows);
- the ``sample:`` section of a config (``config.SampleConfig``: the rows with ``config=True``);
- the sweep keys (``SWEEPABLE``), the text-only keys, the keys that choose a way of drawing (``MODE_KEYS``);
- the generic checks of ``generate.plan`` (a count below ``at_least``) and every message's spelling of an option.

Which families take an option is said by the families themselves (``sample_options`` on their class), so that a new
option for one family touches two files: this table and the family. ``takers`` here is only the help's wording.

This module imports nothing but the standard library: the CLI reads it to build its flags before torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    name: str  # the API's name (snake_case)
    type: type  # int, float, str or bool (a bool is a flag: given or not)
    help: str
    takers: str  # who takes it, for the help text
    flag: str = ""  # the CLI's spelling; default: --name with dashes
    sweepable: bool = False  # --sweep may vary it
    mode: bool = False  # it chooses a way of drawing (a generate mode), it is not an option of sample()
    text: bool = False  # text runs only
    config: bool = False  # also a key of a config's sample: section (the run's default)
    at_least: int | None = None  # counts: the smallest value that means something
    cli_type: type | None = None  # what the CLI parses, where it differs (temperature also takes 'calibrated')

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("temperature", float, "Divide logits / scale latent noise; 'calibrated': the T fitted by genai evaluate "
           "--calibrate.", "discrete and latent families", sweepable=True, config=True, cli_type=str),
    Option("top_k", int, "Keep the k most likely values.", "discrete families", sweepable=True, config=True,
           at_least=1),
    Option("top_p", float, "Keep the smallest set with probability >= p.", "discrete families", sweepable=True,
           config=True),
    Option("greedy", bool, "Take the most likely value (argmax).", "discrete families", sweepable=True),
    Option("noise_std", float, "Gaussian noise added before each draw.", "discrete families", sweepable=True),
    Option("noise_on", str, "Where --noise-std goes: logits or hidden.", "autoregressive families",
           sweepable=True),
    Option("steps", int, "Diffusion and flow: sampling steps; masked models: filling steps.",
           "diffusion, flow and masked families",
           sweepable=True, config=True, at_least=1),
    Option("fill", str, "Masked models: iterative (--steps passes, the most confident kept each time) or one-shot "
           "(one pass).", "masked families", sweepable=True, config=True),
    Option("choice_temperature", float, "Masked models: Gumbel noise on the confidences, annealed to 0 (MaskGIT: "
           "4.5).", "masked families", sweepable=True, config=True),
    Option("sampler", str, "Diffusion: ddpm, ddim, dpm++2m or heun; flow: euler, midpoint, heun or dopri5 "
           "(adaptive).", "diffusion and flow families", sweepable=True,
           config=True),
    Option("eta", float, "DDIM: 0 deterministic, 1 DDPM-like.", "diffusion families", sweepable=True, config=True),
    Option("atol", float, "Flow, dopri5 sampler: absolute error tolerance per step.", "flow families",
           sweepable=True, config=True),
    Option("rtol", float, "Flow, dopri5 sampler: relative error tolerance per step.", "flow families",
           sweepable=True, config=True),
    Option("truncation", float, "VAE: redraw latent coordinates beyond +-c standard deviations (the truncation "
           "trick).", "vae", sweepable=True),
    Option("guidance", float, "Classifier-free guidance scale.", "class-conditional families", sweepable=True,
           config=True),
    Option("labels", int, "Class to draw (conditional families).", "class-conditional families", flag="--label"),
    Option("prompt", str, "Text runs: the text to continue (masked model: the text whose --blank characters to "
           "fill).", "text runs", text=True, config=True),
    Option("max_new_tokens", int, "Text runs: characters to write after the prompt (default 256).", "text runs",
           text=True, config=True),
    Option("blank", str, "Masked text runs: the placeholder of a character to fill in --prompt (default _).",
           "masked text runs", text=True),
    # Ways of drawing (generate's modes): a family offers one by listing its key in sample_options.
    Option("prefix_rows", int, "Mode: complete real validation images from their top R rows (autoregressive "
           "families).", "autoregressive families", mode=True),
    Option("inpaint", str, "Mode: redraw a region of real validation images, keeping the rest: top, bottom, left, "
           "right, center or random[:P] (masked families).", "masked families", flag="--mask", mode=True),
    Option("interpolate", bool, "Mode: each row a straight line between two random latents (latent families).",
           "latent families", mode=True),
    Option("traverse", bool, "Mode: each row a straight line between two real validation images' latents "
           "(autoencoder, vae).", "families with an encoder", mode=True),
    Option("traverse_dim", int, "Mode: each row varies latent dimension D (+-3 std) around a random latent, or with "
           "--traverse around a real image's latent.", "latent families", mode=True),
)

BY_NAME = {o.name: o for o in OPTIONS}
SWEEPABLE = tuple(o.name for o in OPTIONS if o.sweepable)
TEXT_KEYS = frozenset(o.name for o in OPTIONS if o.text)
MODE_KEYS = frozenset(o.name for o in OPTIONS if o.mode)
CONFIG_OPTIONS = tuple(o for o in OPTIONS if o.config)


def flag_of(key: str) -> str:
    """An option's CLI spelling, for messages (an unknown key as it is)."""
    option = BY_NAME.get(key)
    return option.cli_flag if option else key
