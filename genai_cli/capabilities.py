"""What a family can do beyond ``loss`` and ``sample``, declared once (docs/ARCHITECTURE.md, "Capabilities").

A capability is a promise of methods (and attributes) with fixed signatures and meanings, written below as a
``typing.Protocol``: its docstrings say what each member means and which command reads it. A family declares the
capabilities it gives on its class, ``capabilities = frozenset({"encode", "walk"})`` (a mixin declares those of
the methods it brings, and the families listing it inherit them); callers ask ``has(model, "encode")`` of a model
or a family class, never whether a method happens to exist. ``genai list`` shows the same declarations.

An instance whose config cannot honour a capability withdraws it in ``__init__`` (a Bernoulli VAE on grey levels
has no likelihood): ``self.capabilities = self.capabilities - {"log_likelihood"}``. A subclass that inherits a
method it must not offer leaves the capability out and sets the method to None (latent_ddpm's bound).

``problems(model)`` checks a built model against its declaration: every declared member present, each method
callable the way its protocol calls it, and no method of an undeclared capability present (so a method nobody
declared is never silently skipped). tests/test_capabilities.py runs it on every registered family.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: importing this module stays free of torch
    import torch
    from torch import Tensor

    Batch = tuple[Tensor, Tensor]  # images (B, C, H, W) in [0, 1], labels (B,) long


# -- the protocols: signatures and meanings ----------------------------------------------------
class LogLikelihood(Protocol):
    def log_likelihood(self, batch: Batch) -> Tensor:
        """(B,) log p(x) in nats: exact (the autoregressive families) or a lower bound (the VAE's ELBO), of the
        pixels as stored (8-bit or binary). Validation reports it as nll_nats and bits/dim; genai evaluate too."""


class VariationalBound(Protocol):
    bound_strata: int  # stratified draws per image genai evaluate uses (each a full network pass)

    def variational_bound(self, batch: Batch, timesteps_per_image: int, *,
                          generator: torch.Generator | None = None) -> Tensor:
        """(B,) a lower bound on log p(x) in nats, estimated from ``timesteps_per_image`` stratified draws (diffusion
        timesteps, mask sizes): too slow for every validation, so only genai evaluate reports its bits/dim."""


class LikelihoodEstimate(Protocol):
    def likelihood_estimate(self, batch: Batch, *, generator: torch.Generator | None = None) -> Tensor:
        """(B,) an unbiased, noisy estimate of log p(x) in nats per image (flow: the ODE's change of variables with a
        Hutchinson trace, under uniform dequantisation), too slow for every validation: genai evaluate reports its
        bits/dim as an estimate, with its standard error over the images."""


class CalibrationLogits(Protocol):
    def calibration_logits(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(logits (N, K), targets (N,)): the categorical predictions genai evaluate --calibrate fits a temperature
        to (the predictions --temperature then rescales)."""


class SeqLogits(Protocol):
    def tokenize(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> (B, T) long tokens in the order they are predicted."""

    def seq_logits(self, tokens: Tensor) -> Tensor:
        """(B, T) tokens -> (B, T, K) logits, token t predicted from the tokens before it: every token is a
        categorical prediction that genai evaluate --calibrate can fit a temperature to."""


class Encode(Protocol):
    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> latents (B, D): genai inspect plots the validation latents
        (latents_pca.png); walks between real images start from them."""


class Reconstruct(Protocol):
    def reconstruct(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> their reconstructions, same shape, in [0, 1]: the training loop writes
        grids of validation images over their reconstructions beside the samples."""


class Walk(Protocol):
    def walk(self, rows: int, steps: int, *, generator: torch.Generator | None = None, images: Tensor | None = None,
             dim: int | None = None, temperature: float = 1.0) -> Tensor:
        """(rows * steps, C, H, W) in [0, 1]: ``rows`` lines of ``steps`` decoded latents, between random latents or
        real ``images``' (those need ``encode``), or along latent dimension ``dim`` (genai sample --interpolate,
        --traverse, --traverse-dim; see genai_cli.nn.latent)."""


class Tokenizer(Protocol):
    num_codes: int  # K: tokens are 0..K-1
    token_grid: tuple[int, int]  # (h, w): an image is h * w tokens

    def tokenize(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> (B, h * w) long codes in raster order (MaskGIT's tokens)."""

    def detokenize(self, tokens: Tensor) -> Tensor:
        """(B, h * w) long codes in raster order -> images (B, C, H, W) in [0, 1]."""


class LatentGrid(Protocol):
    latent_shape: tuple[int, int, int]  # (D, s, s): the latent grid of one image

    def encode_latent(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> latents (B, D, s, s) float32 (latent diffusion's data)."""

    def decode_latent(self, z: Tensor) -> Tensor:
        """Latents (B, D, s, s) -> images (B, C, H, W) in [0, 1]."""


class OdeSolve(Protocol):
    model_shape: tuple[int, ...]  # one point of the space the ODE runs in (pixels in [-1, 1], or a latent grid)
    conditional: bool  # whether labels (and guidance) mean something
    null_label: int  # the "no label" class index of its network

    def ode_solve(self, noise: Tensor, *, labels: Tensor | None = None, guidance: float | None = None,
                  sampler: str | None = None, steps: int | None = None) -> Tensor:
        """Deterministic: integrates the model's probability-flow ODE from ``noise`` (B, *model_shape) to x_0 in
        model space (not decoded), with its sampling defaults for the options not given (a stochastic sampler is
        refused). ``labels`` None on a conditional model: class i % K (``class_labels``), as ``sample`` draws. Read by
        the distill family: a teacher's (noise, endpoint) pairs."""

    def to_model_space(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> points (B, *model_shape) of the space the ODE runs in."""

    def from_model_space(self, x0: Tensor) -> Tensor:
        """Points (B, *model_shape) -> images (B, C, H, W) in [0, 1] (a latent model decodes here)."""


class Prepare(Protocol):
    def prepare(self, train_images: Tensor) -> dict[str, float]:
        """Measures the training data (N, C, H, W) once, before the first step of a new run (latent diffusion's
        latent scale); the loop draws those images only for families that declare it."""


class ManualStep(Protocol):
    def train_step(self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer], stepper: Any) -> dict[str, float]:
        """Steps its own optimizers (the GANs' alternating updates): the loop cannot route its loss through DDP or
        compile it as one graph, so it compiles the sub-networks and averages the gradients in the stepper."""


# -- the table ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capability:
    name: str
    protocol: type
    summary: str  # what it gives a user, one line (genai list)
    # True where GenerativeModel has a default (prepare, train_step): declaring it means overriding that default,
    # so it is about how the loop runs the family, not something to show a user.
    hook: bool = False

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(k for k, v in vars(self.protocol).items() if inspect.isfunction(v) and not k.startswith("_"))

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(vars(self.protocol).get("__annotations__", {}))

    @property
    def members(self) -> tuple[str, ...]:
        return self.methods + self.attributes


CAPABILITIES: dict[str, Capability] = {c.name: c for c in (
    Capability("log_likelihood", LogLikelihood, "log p(x) (exact or ELBO): bits/dim at every validation"),
    Capability("variational_bound", VariationalBound, "a sampled bound on log p(x): bits/dim in genai evaluate"),
    Capability("likelihood_estimate", LikelihoodEstimate, "an estimate of log p(x) with its standard error: bits/dim "
               "in genai evaluate"),
    Capability("seq_logits", SeqLogits, "a prediction per token: genai evaluate --calibrate"),
    Capability("calibration_logits", CalibrationLogits, "categorical predictions: genai evaluate --calibrate"),
    Capability("encode", Encode, "images to latents: latents_pca.png in genai inspect"),
    Capability("reconstruct", Reconstruct, "reconstructions: recon_*.png grids during training"),
    Capability("walk", Walk, "latent walks: genai sample --interpolate / --traverse / --traverse-dim"),
    Capability("tokenizer", Tokenizer, "images to tokens and back: a parent run for maskgit"),
    Capability("latent_grid", LatentGrid, "images to a latent grid and back: a parent run for latent_ddpm"),
    Capability("ode_solve", OdeSolve, "a deterministic probability-flow ODE: a teacher run for distill"),
    Capability("prepare", Prepare, "measures its training data before the first step", hook=True),
    Capability("manual_step", ManualStep, "steps its own optimizers", hook=True),
)}


# -- asking ------------------------------------------------------------------------------------
def capabilities(model_or_class: Any) -> frozenset[str]:
    """The capabilities a family class declares, or those a built model gives (its class's, less any it withdrew)."""
    declared = model_or_class.capabilities
    unknown = set(declared) - CAPABILITIES.keys()
    if unknown:
        raise KeyError(f"{_name(model_or_class)} declares unknown capabilities {sorted(unknown)}; "
                       f"known: {', '.join(CAPABILITIES)}")
    return frozenset(declared)


def has(model_or_class: Any, name: str) -> bool:
    """True when the model (or family class) declares capability ``name``. An unknown name is a KeyError, so a
    misspelt question fails instead of answering False forever."""
    if name not in CAPABILITIES:
        raise KeyError(f"unknown capability {name!r}; known: {', '.join(CAPABILITIES)}")
    return name in capabilities(model_or_class)


def shown(model_or_class: Any) -> list[str]:
    """The declared capabilities a user can ask for (hooks left out), in table order: genai list's "can" column."""
    declared = capabilities(model_or_class)
    return [name for name, c in CAPABILITIES.items() if name in declared and not c.hook]


# -- checking ----------------------------------------------------------------------------------
def _default_owner(cls: type, method: str) -> type:
    """The base-most class of ``cls``'s hierarchy that defines ``method`` (GenerativeModel, for a family's default),
    found without importing models (this module sits below them)."""
    return next(c for c in reversed(cls.__mro__) if method in vars(c))


def _default(cls: type, method: str) -> Any:
    return getattr(_default_owner(cls, method), method)


def problems(model: Any) -> list[str]:
    """What is wrong with a built model's declaration, one line each (empty: nothing)."""
    declared = capabilities(model)
    promised = {m for name in declared for m in CAPABILITIES[name].members}
    out = []
    for name, cap in CAPABILITIES.items():
        if name in declared:
            for attr in cap.attributes:
                if getattr(model, attr, None) is None:
                    out.append(f"declares {name} but has no {attr}")
            for method in cap.methods:
                fn = getattr(model, method, None)
                if not callable(fn):
                    out.append(f"declares {name} but has no method {method}")
                elif cap.hook and getattr(type(model), method) is _default(type(model), method):
                    out.append(f"declares {name} but keeps {_default_owner(type(model), method).__name__}'s {method}")
                else:
                    mismatch = _signature_mismatch(fn, getattr(cap.protocol, method))
                    if mismatch:
                        out.append(f"{method}{inspect.signature(fn)} cannot be called as {name} calls it: {mismatch}")
        else:
            # Methods only: an attribute of the same name may be the family's own (latent_ddpm's latent_shape).
            for method in cap.methods:
                if method in promised:
                    continue  # another declared capability promises it (tokenize: seq_logits and tokenizer)
                if cap.hook:
                    if getattr(type(model), method) is not _default(type(model), method):
                        out.append(f"overrides {method} but does not declare {name}")
                elif getattr(model, method, None) is not None:
                    out.append(f"has {method} but does not declare {name}")
    return out


def _signature_mismatch(fn, spec) -> str | None:
    """Why the bound method ``fn`` cannot take the calls the protocol method ``spec`` describes: all its arguments,
    and its required ones alone (positional ones by position, keyword-only ones by name). None when it can."""
    try:
        have = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: nothing to check
    params = list(inspect.signature(spec).parameters.values())[1:]  # less self
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = [p for p in params if p.kind is p.KEYWORD_ONLY]
    for subset in (lambda p: True, lambda p: p.default is p.empty):
        args = [p.name for p in positional if subset(p)]
        kwargs = {p.name: p.name for p in keywords if subset(p)}
        try:
            have.bind(*args, **kwargs)
        except TypeError as e:
            return str(e)
    return None


def _name(obj: Any) -> str:
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__
