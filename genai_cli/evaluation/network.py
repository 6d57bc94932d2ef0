"""The evaluator network as the training loop and ``genai evaluate`` both use it: found by dataset
(``find_evaluator``), loaded frozen (``load_evaluator``, ``grid_evaluator``) and applied (``evaluator_outputs``).

Below ``evaluator`` (which can also train a missing one through ``session.start_run``): the loop scores its grids
with these, and importing them must not lead back to the loop (issue 19, section 7).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import GenaiError

if TYPE_CHECKING:
    from ..lineage import Parent

FEATURE_CHUNK = 500  # images per evaluator forward


def evaluator_families() -> tuple[str, ...]:
    """The registered families declared as evaluators, sorted by name."""
    from ..registry import MODELS

    return tuple(n for n in MODELS.names() if MODELS.get(n).evaluator)


def _shape(data_cfg) -> tuple[int, int] | None:
    from ..data import peek_spec

    try:
        spec = peek_spec(data_cfg)
    except GenaiError:
        return None
    return spec.channels, spec.size


def find_evaluator(data_cfg, spec, root: Path) -> Path | None:
    """The default evaluator: the checkpoint of an evaluator-family run under ``root`` trained on the same dataset
    at the same image shape, or None.

    Among several, prefer the same binarisation, then the same train/validation split (so the evaluator never
    trained on the validation images it compares against), then one trained on the whole training split (not a
    ``data.limit`` experiment, such as the over-confident classifier of the lessons), then the newest.
    """
    import yaml

    from ..config import DataConfig, build_dataclass
    from ..data import binarize_mode

    families = evaluator_families()
    candidates = []
    for cfg_path in sorted(root.glob("*/config.yaml")) if root.is_dir() else []:
        run = cfg_path.parent
        ckpt = run / "checkpoints" / "last.pt"
        if ".old-" in run.name or not ckpt.is_file():
            continue  # a run moved aside by --force, or one that never saved
        try:
            raw = yaml.safe_load(cfg_path.read_text()) or {}
            if (raw.get("model") or {}).get("family") not in families:
                continue
            other = build_dataclass(DataConfig, raw.get("data") or {}, "data")
        except (yaml.YAMLError, GenaiError, AttributeError, UnicodeDecodeError):
            continue
        if other.name != data_cfg.name or _shape(other) != (spec.channels, spec.size):
            continue
        if other.name == "image_folder" and other.path != data_cfg.path:
            continue
        same_split = (other.split_seed, other.val_fraction) == (data_cfg.split_seed, data_cfg.val_fraction)
        same_pixels = binarize_mode(other.binarize) == binarize_mode(data_cfg.binarize)  # true == 'threshold'
        candidates.append(((same_pixels, same_split, other.limit is None, ckpt.stat().st_mtime), ckpt))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def grid_evaluator(data_cfg, spec, root: Path, device: torch.device) -> tuple[Any, str] | None:
    """(frozen evaluator network on ``device``, its checkpoint) that the training loop scores its grids with: the one
    ``genai evaluate`` would take by default (``find_evaluator`` under the runs folder ``root``), checked and loaded
    once. None for text or unlabelled data, and when there is none: training goes on unscored, and ``genai inspect``
    says how to get one."""
    from ..lineage import resolve_parent

    if not spec.scored_by_classes:
        return None
    found = find_evaluator(data_cfg, spec, root)
    if found is None:
        return None
    parent = resolve_parent(str(found), accepts=evaluator_families(), root=root, spec=spec, role="evaluator")
    return load_evaluator(parent, device)[0], parent.source


def load_evaluator(evaluator: Parent, device: torch.device):
    """(frozen network in eval mode on ``device``, its last validation accuracy or None) of a resolved evaluator."""
    from ..build import build_parent

    return build_parent(evaluator).to(device), evaluator.summary.get("last_val_accuracy")


@torch.no_grad()
def evaluator_outputs(evaluator, images: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """(features (N, D) float64, class probabilities (N, K)) of images (N, C, H, W) in [0, 1], on the CPU."""
    feats, probs = [], []
    for i in range(0, images.shape[0], FEATURE_CHUNK):
        x = images[i:i + FEATURE_CHUNK].to(device).float()
        f = evaluator.features(x)
        feats.append(f.double().cpu())
        probs.append(torch.softmax(evaluator.head(f).float(), -1).cpu())
    return torch.cat(feats), torch.cat(probs)
