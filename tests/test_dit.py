"""The DiT backbone (nn/dit.py, model.backbone: dit): its pieces, its presets, the swap in the diffusion families."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import SPEC, invoke, tiny_config, train_tiny_parents, untrained_parent

from genai_cli.api import build_model
from genai_cli.config import build_dataclass
from genai_cli.errors import GenaiError
from genai_cli.models.base import ImageSpec
from genai_cli.models.diffusion import DIT_PRESETS, UNET_FIELDS
from genai_cli.models.latent_diffusion import LATENT_DIT_PRESETS
from genai_cli.nn.dit import FREQUENCY_DIM, DiT, DiTBlock, patchify, unpatchify
from genai_cli.nn.unet import timestep_embedding
from genai_cli.registry import MODELS

TINY_DIT = {"backbone": "dit", "patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2}


def dit_families() -> list[str]:
    """Every family whose config takes model.backbone (ddpm, latent_ddpm, and the flows where they exist)."""
    return [name for name in ("ddpm", "latent_ddpm", "flow", "latent_flow")
            if name in MODELS.names() and hasattr(MODELS.get(name).Config, "DIT_PRESETS")]


def tiny_dit_fields(family: str, **overrides) -> dict:
    """The family's tiny config with the UNet's fields replaced by a tiny DiT (1x1 patches on latent grids)."""
    fields = {k: v for k, v in MODELS.get(family).tiny.items() if k not in UNET_FIELDS}
    patch = 1 if "autoencoder" in MODELS.get(family).Config.__dataclass_fields__ else 2
    return {**fields, **TINY_DIT, "patch_size": patch, **overrides}


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with every parameter redrawn, so the zero-initialised gates and output layer no longer hide it."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


@pytest.mark.parametrize("p, shape", [(1, (2, 4, 7, 7)), (2, (2, 3, 8, 12)), (4, (1, 1, 28, 28))])
def test_unpatchify_inverts_patchify_and_a_token_is_one_patch(p, shape):
    x = torch.randn(shape)
    b, c, h, w = shape
    tokens = patchify(x, p)
    assert tokens.shape == (b, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(tokens, p, c, h, w), x)
    # Row-major patches: the second token is the patch right of the first, flattened (row, column, channel).
    assert torch.equal(tokens[:, 1], x[:, :, :p, p:2 * p].permute(0, 2, 3, 1).reshape(b, -1))


def test_a_fresh_adaln_zero_block_is_the_identity_and_learns_its_gates():
    block = DiTBlock(32, heads=2, mlp_ratio=4, dropout=0.0)
    x, c = torch.randn(3, 5, 32), torch.randn(3, 32)
    out = block(x, c)
    assert torch.equal(out, x)
    out.pow(2).sum().backward()
    assert block.ada[1].weight.grad.abs().sum() > 0  # the gates get a gradient at the first step
    # A fresh DiT predicts 0 (its output layer is zero too), whatever the input, time and label.
    net = DiT(4, 7, 7, patch_size=1, hidden=32, depth=2, heads=2, num_classes=10)
    assert torch.equal(net(torch.randn(2, 4, 7, 7), torch.tensor([3, 900]), torch.tensor([1, 10])),
                       torch.zeros(2, 4, 7, 7))


def test_a_fresh_dits_condition_carries_the_label():
    """The label must move c, the input of every adaLN regression, from the first step: DiT's N(0, 0.02) label
    table left c's label part near 0 and the label barely conditioned a network trained for hundreds of steps."""
    net = DiT(4, 7, 7, patch_size=1, hidden=64, depth=2, heads=2, num_classes=10)
    t = torch.full((11,), 500)
    cond = net.time_mlp(timestep_embedding(t, FREQUENCY_DIM)) + net.class_emb(torch.arange(11))
    gap = (cond[:, None] - cond[None]).pow(2).mean(-1).sqrt()  # RMS distance of every pair of labels
    assert gap[~torch.eye(11, dtype=torch.bool)].min() > 0.5


@pytest.mark.parametrize("size, fields, std", [("S", {}, 0.2), ("B", {}, 1.0), ("S", {"label_init_std": 0.5}, 0.5)])
def test_the_label_init_std_reaches_the_label_table(size, fields, std):
    """model.label_init_std, from the latent preset (S: 0.2, B: 1) or set explicitly, is the fresh label table's std."""
    cfg = build_dataclass(MODELS.get("latent_ddpm").Config, {"backbone": "dit", "size": size, "autoencoder": "ae",
                                                              "class_conditional": True, **fields}, "model")
    assert cfg.label_init_std == std
    torch.manual_seed(0)
    parents = {"autoencoder": untrained_parent("spatial_ae", ImageSpec(1, 28, 10))}
    table = build_model("latent_ddpm", cfg, ImageSpec(1, 28, 10), parents).unet.class_emb.weight
    assert table.shape[0] == 11 and abs(table.std().item() - std) < 0.1 * std  # 704 or more draws: within 4 %
    with pytest.raises(GenaiError, match="label_init_std"):
        DiT(4, 7, 7, patch_size=1, hidden=32, depth=1, heads=2, num_classes=10, label_std=0.0)
    with pytest.raises(GenaiError, match="dit backbone"):  # a DiT field on a UNet is refused, like the others
        build_dataclass(MODELS.get("ddpm").Config, {"label_init_std": 0.2}, "model")


def test_long_skips_join_mirror_blocks():
    net = randomised(DiT(4, 7, 7, patch_size=1, hidden=32, depth=5, heads=2, num_classes=10, long_skip=True))
    assert [blk.skip is not None for blk in net.blocks] == [False, False, False, True, True]
    outputs, skips = {}, {}
    for i, blk in enumerate(net.blocks):
        blk.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out))
        blk.register_forward_pre_hook(lambda m, args, i=i: skips.__setitem__(i, args[3]))
    with torch.no_grad():
        net(torch.randn(2, 4, 7, 7), torch.tensor([3, 900]), torch.tensor([1, 10]))
    assert torch.equal(skips[4], outputs[0]) and torch.equal(skips[3], outputs[1])  # block depth-1-i gets block i


def test_the_local_convolution_mixes_grid_neighbours_only():
    """A fresh block with ``local`` is x + a depthwise 3x3 conv of the token grid (its gates are 0): perturbing
    one token moves the tokens beside it on the grid, not those two rows away."""
    block = DiTBlock(8, heads=2, mlp_ratio=4, dropout=0.0, local=True)
    x, c = torch.randn(1, 49, 8), torch.randn(1, 8)
    moved = x.clone()
    moved[0, 0] += 1.0  # grid position (0, 0)
    with torch.no_grad():
        change = (block(moved, c, (7, 7)) - block(x, c, (7, 7))).abs().sum(-1)[0].reshape(7, 7)
    assert change[0, 1] > 0 and change[1, 1] > 0 and change[1, 0] > 0
    assert change[2:].sum() == 0 and change[:, 2:].sum() == 0


PRESET_CASES = [(size, (1, 28, 28), DIT_PRESETS) for size in DIT_PRESETS] + \
               [(size, (3, 32, 32), DIT_PRESETS) for size in DIT_PRESETS] + \
               [(size, (4, 7, 7), LATENT_DIT_PRESETS) for size in LATENT_DIT_PRESETS]


@pytest.mark.parametrize("size, shape, presets", PRESET_CASES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_preset_gives_an_input_shaped_output_in_the_precision_asked(size, shape, presets, precision):
    preset = presets[size]
    net = DiT(*shape, patch_size=preset["patch_size"], hidden=preset["hidden_size"], depth=preset["depth"],
              heads=preset["num_heads"], num_classes=10)
    x = torch.randn(2, *shape)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        out = randomised(net)(x, torch.tensor([0, 999]), torch.tensor([3, 10]))
    assert out.shape == x.shape
    assert out.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert torch.isfinite(out.float()).all()


def test_the_presets_grow_and_a_preset_is_what_size_picks():
    params = [sum(p.numel() for p in DiT(4, 7, 7, patch_size=v["patch_size"], hidden=v["hidden_size"],
                                          depth=v["depth"], heads=v["num_heads"]).parameters())
              for v in LATENT_DIT_PRESETS.values()]
    assert params == sorted(params) and len(set(params)) == 3
    cfg = MODELS.get("ddpm").Config(backbone="dit", size="B", depth=3)  # an explicit field wins over the preset
    assert (cfg.patch_size, cfg.hidden_size, cfg.depth, cfg.num_heads) == (4, 128, 3, 4)
    assert cfg.base_channels is None  # the UNet's fields stay unset: config.yaml stores only what was trained


@pytest.mark.parametrize("family", dit_families())
def test_a_conditional_dit_at_guidance_1_is_the_conditional_prediction(family):
    spec = ImageSpec(1, 8, 4)
    fields = tiny_dit_fields(family, class_conditional=True)
    parents = {"autoencoder": untrained_parent("spatial_ae", spec)} if family.startswith("latent") else None
    if parents:
        fields["autoencoder"] = "ae"
    model = build_model(family, build_dataclass(MODELS.get(family).Config, fields, "model"), spec, parents).eval()
    randomised(model.unet)
    x = torch.randn(3, *model.model_shape)
    t = torch.tensor([1, 7, 15])
    labels = torch.tensor([0, 2, 3])
    with torch.no_grad():
        conditional = model.unet(x, t, labels)
        unconditional = model.unet(x, t, torch.full_like(labels, spec.num_classes))
        guided = model.network(x, t, labels, 1.0)
        assert not torch.allclose(conditional, unconditional)  # the label matters to this network
        torch.testing.assert_close(guided, conditional)
        w = 3.0  # and guidance mixes the two: out_uncond + w (out_cond - out_uncond)
        torch.testing.assert_close(model.network(x, t, labels, w), unconditional + w * (conditional - unconditional),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", dit_families())
def test_the_backbone_swaps_without_touching_the_family(family, tmp_path):
    """A tiny run of each diffusion family with backbone: dit trains, checkpoints, resumes and samples through the
    CLI; its weights sit under the same "unet." keys as a UNet's, so the checkpoint format is unchanged."""
    runs = tmp_path / "runs"
    train_tiny_parents(family, runs)
    raw = tiny_config(family, max_steps=3)
    raw["model"] = {"family": family, **{k: v for k, v in raw["model"].items() if k not in UNET_FIELDS},
                    **tiny_dit_fields(family)}
    path = tmp_path / "dit.yaml"
    path.write_text(yaml.safe_dump(raw))
    invoke("train", path, "--runs-dir", runs, "--name", "dit", "-q")
    state = torch.load(runs / "dit" / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["model"]["backbone"] == "dit"
    assert any(k.startswith("unet.blocks.") for k in state["model"])
    invoke("sample", runs / "dit", "-n", "4", "--out", tmp_path / "grid.png", "--runs-dir", runs)
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_wrong_dit_settings_fail_in_one_line():
    config = MODELS.get("ddpm").Config
    cases = [({"backbone": "dit", "base_channels": 8}, "belongs to the unet backbone"),
             ({"patch_size": 2}, "belongs to the dit backbone"),
             ({"backbone": "dit", "size": "M"}, "valid: S, B, L for the dit backbone"),
             ({"size": "B"}, "valid: S, M, L for the unet backbone"),
             ({"backbone": "transformer"}, "valid: unet, dit")]
    for fields, message in cases:
        with pytest.raises(GenaiError, match=message):
            config(**fields)
    with pytest.raises(GenaiError, match="patch size 3 does not divide the 8x8 grid.*one of 1, 2, 4, 8"):
        build_model("ddpm", config(**{**TINY_DIT, "patch_size": 3}), SPEC, None)
    with pytest.raises(GenaiError, match="not divisible by its 3 heads"):
        build_model("ddpm", config(**{**TINY_DIT, "num_heads": 3}), SPEC, None)
