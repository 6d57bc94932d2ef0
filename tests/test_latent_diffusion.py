"""Latent diffusion (latent_ddpm on a frozen spatial_ae), the spatial autoencoder, and the UNet size presets."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from helpers import SPEC, invoke, metric_rows, tiny_config, untrained_parent

from genai_cli.api import build_model, load_checkpoint
from genai_cli.config import DataConfig, from_dict, load_config
from genai_cli.data import load_data, to_float
from genai_cli.errors import GenaiError
from genai_cli.models.base import ImageSpec
from genai_cli.models.diffusion import UNET_PRESETS
from genai_cli.models.diffusion import Config as DDPMConfig
from genai_cli.models.latent_diffusion import LATENT_PRESETS
from genai_cli.models.latent_diffusion import Config as LatentConfig
from genai_cli.models.spatial_ae import Config as AEConfig
from genai_cli.models.spatial_ae import SpatialAutoencoder
from genai_cli.runs import load_checkpoint_file
from genai_cli.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
LABELLED = ImageSpec(channels=1, size=8, num_classes=4)


def shapes(n: int = 600, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data(DataConfig(name="shapes", image_size=size, limit=n))
    return to_float(data.train_x[:n]), data.train_y[:n]


def latent_model(spec: ImageSpec = SPEC, ae: dict | None = None, **overrides):
    """A tiny latent_ddpm on an untrained tiny spatial_ae (a 2 x 4 x 4 grid for 8x8 images)."""
    torch.manual_seed(0)
    parent = untrained_parent("spatial_ae", spec, **(ae or {}))
    cfg = LatentConfig(**{"base_channels": 8, "channel_mults": [1], "timesteps": 20, "autoencoder": "untrained",
                          **overrides})
    return build_model("latent_ddpm", cfg, spec, parents={"autoencoder": parent})


# -- the latent scale ------------------------------------------------------------------------------
def test_scale_factor_makes_the_training_latents_variance_one():
    x, _ = shapes(1200)
    model = latent_model()
    info = model.prepare(x[:600])  # what the trainer does before the first step
    ae = model.parents["autoencoder"]
    raw = ae.encode_latent(x[:600])
    assert info["latent_var"] == pytest.approx(float(raw.var()), rel=1e-5)
    assert info["latent_var"] != pytest.approx(1.0, abs=0.05), "the raw latents must need rescaling for this test"
    assert float(model.latent_scale) == pytest.approx(float(raw.var()) ** -0.5, rel=1e-5) == info["latent_scale"]
    assert info["latent_var_scaled"] == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        held_out = model.to_model_space(x[600:])  # images the factor was not measured on
    assert float(held_out.var()) == pytest.approx(1.0, abs=0.1)  # within sampling error
    assert "latent_scale" in model.state_dict(), "the factor is a persistent buffer: the checkpoint keeps it"


def test_an_autoencoder_with_no_spread_is_refused():
    model = latent_model()
    with torch.no_grad():
        for p in model.parents["autoencoder"].encoder.parameters():
            p.zero_()
    with pytest.raises(GenaiError, match="train the autoencoder run first"):
        model.prepare(torch.rand(8, *SPEC.shape))


def test_the_latent_path_equals_the_autoencoders_own_reconstruction():
    x, _ = shapes(200)
    model = latent_model()
    model.prepare(x)
    ae = model.parents["autoencoder"]
    val = x[-16:]
    with torch.no_grad():
        through = model.from_model_space(model.to_model_space(val))
        assert torch.allclose(through, ae.reconstruct(val), atol=1e-6)
        assert torch.allclose(model.reconstruct(val), ae.reconstruct(val), atol=1e-6)
        assert torch.allclose(ae.reconstruct(val), ae.decode_latent(ae.encode_latent(val)))


# -- sampling --------------------------------------------------------------------------------------
def test_sampling_with_a_seed_is_reproducible():
    model = latent_model(LABELLED, class_conditional=True).eval()
    model.prepare(shapes(64)[0])

    def draw(seed: int, **options):
        return model.sample(6, generator=torch.Generator().manual_seed(seed), **options)

    for options in ({}, {"sampler": "ddim", "steps": 5, "eta": 1.0}, {"sampler": "dpm++2m", "guidance": 2.0},
                    {"sampler": "heun", "steps": 3, "labels": 2}):
        a = draw(3, **options)
        assert a.shape == (6, *LABELLED.shape) and 0 <= a.min() and a.max() <= 1
        assert torch.equal(a, draw(3, **options)), options
        assert not torch.equal(a, draw(4, **options)), options


def test_the_unet_denoises_the_latent_grid_and_samples_decode_through_the_autoencoder():
    model = latent_model(ae={"latent_channels": 3})
    assert model.model_shape == (3, 4, 4) == model.parents["autoencoder"].latent_shape
    assert model.unet.conv_in.in_channels == 3
    decoded = []
    ae = model.parents["autoencoder"]
    original = ae.decode_latent
    ae.decode_latent = lambda z: decoded.append(z.shape) or original(z)
    try:
        out = model.sample(2, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=3)
    finally:
        del ae.decode_latent
    assert decoded == [(2, 3, 4, 4)] and out.shape == (2, *SPEC.shape)
    assert model.variational_bound is None, "a bound over latents is no likelihood of the pixels"


def test_clipping_and_a_grid_the_unet_cannot_halve_are_refused():
    with pytest.raises(GenaiError, match="clip_x0 clamps x_0 to the pixel range .* set model.clip_x0=false"):
        latent_model(clip_x0=True)
    with pytest.raises(GenaiError, match=r"latent grid is 7x7, .* use model.channel_mults with one entry"):
        latent_model(ImageSpec(1, 28, 0), ae={"downsamples": 2}, channel_mults=[1, 2])


# -- training: the frozen autoencoder, the measured factor in the log and the checkpoint --------------
def test_training_leaves_the_autoencoder_unchanged_and_logs_the_measured_variance(tmp_path):
    (tmp_path / "ae.yaml").write_text(yaml.safe_dump(tiny_config("spatial_ae", max_steps=4)))
    invoke("train", tmp_path / "ae.yaml", "--runs-dir", tmp_path, "--name", "ae", "-q")
    ae_state = load_checkpoint_file(tmp_path / "ae" / "checkpoints" / "last.pt")
    ae_weights = ae_state["ema"] if ae_state.get("ema") is not None else ae_state["model"]  # what a child builds on
    assert (tmp_path / "ae" / "samples" / "recon_step_000004.png").exists(), "reconstruction grids are written"
    assert "val_mse" in metric_rows(tmp_path / "ae")[-1]

    raw = tiny_config("latent_ddpm", max_steps=4)
    raw["model"]["autoencoder"] = "ae"
    run = tmp_path / "ldm"
    (run / "checkpoints").mkdir(parents=True)
    trainer = Trainer(from_dict(raw), run, quiet=True)
    ae = trainer.model.parents["autoencoder"]
    assert all(torch.equal(v, ae_weights[k]) for k, v in ae.state_dict().items())
    own_before = {k: v.clone() for k, v in trainer.model.unet.state_dict().items()}
    trainer.fit()
    after = ae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in ae_weights.items()), "the frozen autoencoder changed"
    assert any(not torch.equal(own_before[k], v) for k, v in trainer.model.unet.state_dict().items())

    first = metric_rows(run)[0]
    assert first["step"] == 0 and first["split"] == "prepare" and first["latent_var"] > 0
    assert first["latent_var_scaled"] == pytest.approx(1.0, abs=1e-4)
    state = load_checkpoint_file(run / "checkpoints" / "last.pt")
    assert float(state["model"]["latent_scale"]) == pytest.approx(first["latent_scale"])
    assert state["parents"]["autoencoder"]["name"] == "ae"
    assert all(torch.equal(state["parents"]["autoencoder"]["model"][k], v) for k, v in ae_weights.items())
    assert (run / "samples" / "recon_step_000004.png").exists(), "the latent path's reconstructions are drawn"
    model = load_checkpoint(run / "checkpoints" / "last.pt")
    assert float(model.latent_scale) == pytest.approx(first["latent_scale"]), "loading keeps the measured factor"


# -- the spatial autoencoder ----------------------------------------------------------------------
@pytest.mark.parametrize("regularization", ["kl", "none"])
def test_spatial_autoencoder_latent_interface(regularization, shapes_batch):
    torch.manual_seed(0)
    ae = SpatialAutoencoder(AEConfig(latent_channels=3, downsamples=2, width=8, regularization=regularization), SPEC)
    x, _ = shapes_batch
    z = ae.encode_latent(x)
    assert ae.latent_shape == (3, 2, 2) and z.shape == (x.shape[0], 3, 2, 2)
    assert torch.equal(z, ae.encode_latent(x)), "encode_latent is deterministic (the posterior mean)"
    assert ae.decode_latent(z).shape == x.shape and torch.equal(ae.reconstruct(x), ae.decode_latent(z))
    with torch.no_grad():
        out = ae.train().loss((x, None))
    assert (float(out["kl"]) > 0) == (regularization == "kl")
    assert float(out["loss"]) == pytest.approx(float(out["recon"]) + ae.kl_weight * float(out["kl"]) / SPEC.dims)


def test_spatial_autoencoder_options_are_checked():
    with pytest.raises(GenaiError, match="kl_weight applies to regularization kl only"):
        SpatialAutoencoder(AEConfig(regularization="none", kl_weight=1e-3), SPEC)
    with pytest.raises(GenaiError, match="kl_weight must be >= 0"):
        SpatialAutoencoder(AEConfig(kl_weight=-1.0), SPEC)
    with pytest.raises(GenaiError, match="downsamples = 3 does not fit 8x8 images"):
        SpatialAutoencoder(AEConfig(downsamples=3), SPEC)


# -- size presets ----------------------------------------------------------------------------------
UNET_FIELDS = ("base_channels", "channel_mults", "num_res_blocks", "attention_levels")


@pytest.mark.parametrize("size", ["S", "M", "L"])
def test_a_size_preset_sets_the_unet_and_explicit_fields_win(size):
    cfg = from_dict({"model": {"family": "ddpm", "size": size}}).model
    assert {k: getattr(cfg, k) for k in UNET_FIELDS} == UNET_PRESETS[size]
    cfg = from_dict({"model": {"family": "ddpm", "size": size, "base_channels": 24, "attention_levels": []}}).model
    assert cfg.base_channels == 24 and cfg.attention_levels == []
    assert cfg.num_res_blocks == UNET_PRESETS[size]["num_res_blocks"]
    latent = LatentConfig(size=size, autoencoder="ae")
    assert {k: getattr(latent, k) for k in UNET_FIELDS} == LATENT_PRESETS[size]


def test_no_size_is_the_historical_default_and_checkpoints_store_the_resolved_config(tmp_path):
    assert {k: getattr(DDPMConfig(), k) for k in UNET_FIELDS} == \
        {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attention_levels": []}
    cfg = load_config(ROOT / "configs" / "ddpm_mnist.yaml", ["model.size=L", "model.base_channels=null"])
    assert cfg.to_dict()["model"]["base_channels"] == 128, "config.yaml and the checkpoint keep the resolved widths"
    assert yaml.safe_load(cfg.to_yaml())["model"]["num_res_blocks"] == 2
    # A checkpoint written before presets: every UNet field set, no size key.
    old = {"family": "ddpm", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": [],
           "timesteps": 20}
    assert from_dict({"model": old}).model.base_channels == 8
    model = build_model("ddpm", from_dict({"model": old}).model, SPEC)
    state = {"family": "ddpm", "config": {"model": old}, "spec": asdict(SPEC), "model": model.state_dict(),
             "ema": None}
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").config.size is None
    with pytest.raises(GenaiError, match="'model.size' must be one of 'S', 'M', 'B', 'L'"):
        from_dict({"model": {"family": "ddpm", "size": "XL"}})
    with pytest.raises(GenaiError, match="unknown model.size 'XL'; valid: S, M, L"):
        DDPMConfig(size="XL")


# -- the CIFAR-10 recipe ---------------------------------------------------------------------------
def test_the_cifar10_recipe_builds_and_trains_on_synthetic_data_of_its_shape(tmp_path, monkeypatch):
    """The GPU recipe as shipped (its network and optimiser), a few steps on CPU on 3x32x32 shapes. Only the data,
    the batch and the schedules are shrunk; checkpoints are not written (hundreds of MB at this size)."""
    cfg = load_config(ROOT / "configs" / "ddpm_cifar10.yaml", [
        "data.name=shapes", "data.channels=3", "data.limit=32", "train.max_steps=2", "train.batch_size=4",
        "train.eval_max_images=4", "train.sample_n=1", "sample.sampler=ddim", "sample.steps=2", "train.log_every=1"])
    assert cfg.model.size == "L" and cfg.model.channel_mults == [1, 2, 2, 2], "explicit fields win over the preset"
    monkeypatch.setattr(Trainer, "save", lambda self, *a, **k: None)
    monkeypatch.setattr(Trainer, "save_best", lambda self, *a, **k: None)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    assert trainer.data.spec.shape == (3, 32, 32)
    result = trainer.fit()
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    assert sum(p.numel() for p in trainer.model.parameters()) > 30_000_000  # DDPM's CIFAR-10 size (35.7M)


def test_the_cifar10_recipe_without_a_network_fails_in_one_line(tmp_path):
    cfg = load_config(ROOT / "configs" / "ddpm_cifar10.yaml", [f"data.root={tmp_path}", "data.download=false"])
    with pytest.raises(GenaiError) as info:
        load_data(cfg.data)
    assert "\n" not in str(info.value) and "mnist5k" in str(info.value)


def test_a_latent_dit_saved_before_its_long_skips_loads_as_it_was_trained(tmp_path):
    """A record lacks a field that was added later; the DiT's long_skip and local_conv are on in today's latent
    presets, so a run saved before them must read them as off, or its weights no longer fit (config.SAVED_BEFORE)."""
    assert LatentConfig(backbone="dit", autoencoder="ae").long_skip, "the preset turns them on"
    torch.manual_seed(0)
    parent = untrained_parent("spatial_ae", SPEC)
    cfg = LatentConfig(backbone="dit", hidden_size=16, depth=2, num_heads=2, long_skip=False, local_conv=False,
                       timesteps=20, autoencoder="untrained")
    model = build_model("latent_ddpm", cfg, SPEC, parents={"autoencoder": parent}).eval()
    record = {"family": "latent_ddpm", **{k: v for k, v in asdict(cfg).items() if k not in ("long_skip", "local_conv")}}
    torch.save({"family": "latent_ddpm", "config": {"model": record}, "spec": asdict(SPEC),
                "model": model.state_dict(), "ema": None, "parents": model.parents.records()}, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert (loaded.config.long_skip, loaded.config.local_conv) == (False, False)
    x, t = torch.randn(2, *model.model_shape), torch.tensor([3, 11])
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x, t, None), model.network(x, t, None), rtol=0, atol=0)
    # A UNet record from before the fields existed is left as it was (the DiT-only fields stay unset).
    unet = {"family": "ddpm", "base_channels": 8, "channel_mults": [1], "timesteps": 20}
    torch.save({"family": "ddpm", "config": {"model": unet}, "spec": asdict(SPEC),
                "model": build_model("ddpm", from_dict({"model": unet}).model, SPEC).state_dict(), "ema": None},
               tmp_path / "unet.pt")
    assert load_checkpoint(tmp_path / "unet.pt").config.long_skip is None


def test_a_latent_dit_saved_before_its_label_init_std_loads_as_it_was_trained(tmp_path):
    """The latent S preset's label table starts at N(0, 0.2) now; a DiT record saved before model.label_init_std
    existed was initialised at N(0, 1) and must read so (runs.SAVED_BEFORE), a record that has the field keeps it."""
    assert LatentConfig(backbone="dit", size="S", autoencoder="ae").label_init_std == 0.2, "the preset's value"
    parent = untrained_parent("spatial_ae", SPEC)
    cfg = LatentConfig(backbone="dit", size="S", hidden_size=16, depth=2, timesteps=20, autoencoder="untrained")
    model = build_model("latent_ddpm", cfg, SPEC, parents={"autoencoder": parent})
    for name, drop in (("old", {"label_init_std"}), ("new", set())):
        record = {"family": "latent_ddpm", **{k: v for k, v in asdict(cfg).items() if k not in drop}}
        torch.save({"family": "latent_ddpm", "config": {"model": record}, "spec": asdict(SPEC),
                    "model": model.state_dict(), "ema": None, "parents": model.parents.records()},
                   tmp_path / f"{name}.pt")
    assert load_checkpoint(tmp_path / "old.pt").config.label_init_std == 1.0
    assert load_checkpoint(tmp_path / "new.pt").config.label_init_std == 0.2
