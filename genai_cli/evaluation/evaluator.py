"""The evaluator network: the run whose features ``genai evaluate`` measures samples in.

An evaluator is a run of a family declared as one (``evaluator = True`` on the family class: the classifier):
it gives ``features(x)`` (N, D) and ``head(features)`` (N, K) logits. ``resolve_evaluator`` finds it, one way
for every case: ``--evaluator RUN`` names it; without it, the newest evaluator run under the runs folder trained
on the same dataset at the same image shape is taken (``find_evaluator``); with ``--train-evaluator`` a missing
one is trained (the family's ``evaluator_recipe``, a quick budget) through the same ``start_run`` as
``genai train``. Whichever way it was found, the run goes through the resolver of every run reference
(``lineage.resolve_parent``: it exists, is of an evaluator family, reads the same image shape) and is used as a
frozen parent.

The training loop uses the same network to score every sample grid it draws (``grid_evaluator``, found once when
training starts; it and the other pieces the loop needs live in ``network``, which leads back to no loop): the
grid's class histogram, classes present and mean confidence go to ``metrics.jsonl``, and
``genai inspect`` draws their history (mode collapse and mode hopping, watched during training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GenaiError
from .network import (  # noqa: F401  (the evaluator network, re-exported where callers have always found it)
    FEATURE_CHUNK,
    evaluator_families,
    evaluator_outputs,
    find_evaluator,
    grid_evaluator,
    load_evaluator,
)

if TYPE_CHECKING:
    from ..lineage import Parent

# The bundled evaluator config of each dataset (the command `genai evaluate` tells a user to run).
EVALUATOR_CONFIGS = {"mnist5k": "configs/classifier_mnist.yaml", "mnist": "configs/classifier_mnist_full.yaml",
                     "fashion_mnist": "configs/classifier_fashion_mnist.yaml",
                     "cifar10": "configs/classifier_cifar10.yaml"}
# `--train-evaluator` trains the family's evaluator_recipe for its epochs or this many steps, whichever is fewer.
EVALUATOR_MAX_STEPS = 3000


def resolve_evaluator(ref: str | None, data_cfg, spec, root: Path, *, train_missing: bool = False,
                      target: str = "RUN", log: Callable[[str], None] = lambda s: None, console=None) -> Parent:
    """The evaluator run (a checked ``lineage.Parent``; ``build.build_parent`` gives the frozen network) for samples of
    ``spec`` drawn by a run trained on ``data_cfg``.

    ``ref`` (``--evaluator``) names a run; None looks one up by dataset (``find_evaluator``) and, when there is
    none, trains one with ``train_missing`` or fails with the command that makes it (``target``: the evaluated run,
    for that command). Either way the run goes through ``lineage.resolve_parent``: a missing run, a run of a family
    that is no evaluator or one trained on another image shape is refused with one line.
    """
    from ..lineage import resolve_parent

    role = "--evaluator"
    if ref is None:
        role = "evaluator"
        found = find_evaluator(data_cfg, spec, root)
        if found is None:
            if spec.num_classes < 2:
                raise GenaiError(f"dataset '{data_cfg.name}' has no class labels, so there is no evaluator network "
                                 f"for its samples; sample-quality metrics need a labelled dataset")
            if not train_missing:
                command = evaluator_command(data_cfg, spec, root, target)
                also = "" if "--train-evaluator" in command else " (or add --train-evaluator)"
                raise GenaiError(f"no evaluator network for '{data_cfg.name}' "
                                 f"({spec.channels}x{spec.size}x{spec.size}) under '{root}'; make one with: "
                                 f"{command}{also}")
            found = train_evaluator(data_cfg, root, log, console)
        ref = str(found)
    return resolve_parent(ref, accepts=evaluator_families(), root=root, spec=spec, role=role)


def evaluator_command(data_cfg, spec, root: Path, target: str) -> str:
    """The one command that makes the missing evaluator."""
    from ..data import NATIVE
    from ..runs import runs_dir

    config = EVALUATOR_CONFIGS.get(data_cfg.name)
    if config is None:
        return f"genai evaluate {target} --train-evaluator"
    parts = [f"genai train {config}"]
    channels, size, _ = NATIVE[data_cfg.name]
    if spec.size != size:
        parts.append(f"--set data.image_size={spec.size}")
    if spec.channels != channels:
        parts.append(f"--set data.channels={spec.channels}")
    if root != runs_dir(None):
        parts.append(f"--runs-dir {root}")
    return " ".join(parts)


def evaluator_config(data_cfg) -> dict[str, Any]:
    """The raw config ``--train-evaluator`` trains: the evaluator family's recipe on the evaluated run's dataset and
    shape (the first evaluator family by name, when there are several)."""
    from ..registry import MODELS

    families = evaluator_families()
    if not families:
        raise GenaiError("no registered model family is an evaluator network; --train-evaluator has nothing to train")
    recipe = MODELS.get(families[0]).evaluator_recipe
    data = {k: v for k, v in asdict(data_cfg).items() if k not in ("binarize", "limit")}  # one per dataset
    return {"model": {"family": families[0], **recipe["model"]}, "data": data, "train": dict(recipe["train"])}


def train_evaluator(data_cfg, root: Path, log: Callable[[str], None] = lambda s: None, console=None) -> Path:
    """Train the evaluator for this dataset (a quick budget) as ``genai train`` would; return its checkpoint.

    The run is named ``evaluator-<dataset>-<C>x<H>-<time>``, like any run started without ``--name``.
    """
    from ..config import from_dict
    from ..data import load_data
    from ..hardware import threads_held
    from ..session import start_run

    raw = evaluator_config(data_cfg)
    cfg = from_dict(raw, source="the evaluator recipe")
    data = load_data(cfg.data)
    if data.spec.num_classes < 2:
        raise GenaiError(f"dataset '{data_cfg.name}' has no class labels, so no evaluator network can be trained; "
                         f"sample-quality metrics need a labelled dataset")
    steps_per_epoch = max(1, len(data) // cfg.train.batch_size)
    if cfg.train.epochs * steps_per_epoch > EVALUATOR_MAX_STEPS:
        raw["train"]["max_steps"] = EVALUATOR_MAX_STEPS
        cfg = from_dict(raw, source="the evaluator recipe")
    stem = f"evaluator-{data_cfg.name}-{data.spec.channels}x{data.spec.size}"
    with threads_held():  # the run picks its threads and follows the load itself (genai evaluate follows it too)
        trainer = start_run(cfg, root, stem=stem, data=data, quiet=True, console=console)
        log(f"training the evaluator network for '{data_cfg.name}' into {trainer.run_dir} "
            f"({trainer.total_steps} steps)")
        result = trainer.fit()
    log(f"evaluator trained: validation accuracy {result.get('val_accuracy', float('nan')):.4f}")
    return trainer.run_dir / "checkpoints" / "last.pt"


