"""Config: typed overrides, unknown keys with a suggestion, saved config round trip; the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import invoke, tiny_config

from genai_cli.config import apply_overrides, from_dict, load_config
from genai_cli.errors import GenaiError
from genai_cli.registry import MODELS, Registry
from genai_cli.runs import load_checkpoint_file

ROOT = Path(__file__).resolve().parent.parent


def test_overrides_are_typed_by_the_dataclass(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    cfg = load_config(path, ["train.epochs=3", "train.lr=1e-3", "model.channel_mults=[1,2]", "train.grad_clip=null",
                             "data.binarize=true"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML reads 1e-3 as a string
    assert cfg.model.channel_mults == [1, 2]
    assert cfg.train.grad_clip is None
    assert cfg.data.binarize is True


@pytest.mark.parametrize("override, needle", [
    (["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'epochs'?)"),
    (["model.base_chanels=8"], "did you mean 'base_channels'?"),
    (["model.famly=ddpm"], "did you mean 'family'?); valid keys in 'model': family, "),
    (["trian.epochs=3"], "did you mean 'train'?"),
    (["train.epochs=three"], "'train.epochs' must be int"),
    (["train.batch_size=0"], "'train.batch_size' must be at least 1"),
    (["train.precision=fp8"], "'train.precision' must be one of"),
    (["train.epochs"], "--set expects section.key=value"),
    (["sample.temperature=1.5"], "not an option of family 'ddpm'"),
])
def test_bad_values_name_the_key(tmp_path, override, needle):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    with pytest.raises(GenaiError) as e:
        load_config(path, override)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_family_lists_the_valid_ones():
    raw = tiny_config()
    raw["model"] = {"family": "ddmp"}
    with pytest.raises(GenaiError, match="unknown model family 'ddmp' \\(did you mean 'ddpm'\\?\\); valid: .*ddpm"):
        from_dict(raw)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  family: ddpm\ntrain:\n  epochs: [1, 2\n")
    with pytest.raises(GenaiError, match=r"YAML syntax error at line \d+"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(GenaiError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    cfg = load_config(path, ["train.epochs=5"])
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_override_creates_missing_section():
    raw = apply_overrides({"model": {"family": "ddpm"}}, ["sample.n=9"])
    assert from_dict(raw).sample.n == 9


def test_registry_duplicate_and_unknown_names():
    reg = Registry("thing")
    reg.register("a", "first")(object)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(object)
    with pytest.raises(GenaiError, match="unknown thing 'b'; valid: a"):
        reg.get("b")
    assert "ddpm" in MODELS.names()


def test_mnist5k_is_shuffled_split_with_real_labels():
    from genai_cli.config import DataConfig
    from genai_cli.data import load_data

    data = load_data(DataConfig(name="mnist5k", image_size=12))
    assert data.train_x.shape[1:] == (1, 12, 12) and len(data) + data.val_x.shape[0] == 5000
    counts = data.train_y.bincount(minlength=10)
    assert (counts > 350).all(), f"every digit appears in the training split: {counts.tolist()}"
    assert data.val_y.unique().numel() == 10, "the file is sorted by label: the split must be shuffled"
    # a "1" has far less ink than an "8": the labels belong to the images
    ink = [data.train_x[data.train_y == d].float().mean() for d in (1, 8)]
    assert ink[0] < 0.7 * ink[1]


def test_train_tbptt_reaches_recurrent_families_and_is_refused_elsewhere():
    raw = tiny_config("pixel_lstm")
    raw["train"]["tbptt"] = 16
    assert from_dict(raw).model.tbptt == 16
    raw = tiny_config("ddpm")
    raw["train"]["tbptt"] = 16
    with pytest.raises(GenaiError, match="train.tbptt applies to recurrent families \\(lstm, row_lstm\\)"):
        from_dict(raw)


# -- data.binarize ------------------------------------------------------------------------------
def test_binarize_takes_threshold_stochastic_and_booleans():
    raw = tiny_config()
    for value, expected in [(True, True), (False, False), ("threshold", "threshold"), ("stochastic", "stochastic")]:
        raw["data"]["binarize"] = value
        assert from_dict(raw).data.binarize == expected
    raw["data"]["binarize"] = "stochastik"
    with pytest.raises(GenaiError, match="'data.binarize' must be one of .*did you mean 'stochastic'"):
        from_dict(raw)


def test_threshold_and_true_binarise_alike_and_grey_stays_grey():
    from genai_cli.config import DataConfig
    from genai_cli.data import load_data

    grey, true, threshold = (load_data(DataConfig(name="shapes", image_size=8, binarize=b))
                             for b in (False, True, "threshold"))
    assert not grey.spec.binary and len(grey.train_x.unique()) > 2
    assert true.spec.binary and torch.equal(true.train_x, threshold.train_x)
    assert torch.equal(true.val_x, threshold.val_x)
    assert torch.equal(true.train_x, (grey.train_x >= 128).to(torch.uint8) * 255)


def test_stochastic_binarisation_fixes_validation_and_keeps_the_grey_levels():
    from genai_cli.config import DataConfig
    from genai_cli.data import load_data

    cfg = DataConfig(name="shapes", image_size=8, binarize="stochastic")
    a, b = load_data(cfg), load_data(cfg)
    grey = load_data(DataConfig(name="shapes", image_size=8))
    assert a.spec.binary and torch.equal(a.val_x, b.val_x), "validation is binarised once, with a fixed seed"
    assert set(a.val_x.unique().tolist()) <= {0, 255} and set(a.train_x.unique().tolist()) <= {0, 255}
    assert torch.equal(a.train_levels, grey.train_x)
    assert not torch.equal(a.val_x, (grey.val_x >= 128).to(torch.uint8) * 255), "drawn, not thresholded"
    assert not (a.val_x[grey.val_x == 0]).any() and (a.val_x[grey.val_x == 255] == 255).all()
    # A draw is white with probability level / 255: over many draws of one image the mean approaches its levels.
    idx = torch.zeros(400, dtype=torch.long)
    draws = a.train_images(idx, seed=0).float()
    assert (draws.mean(0) - grey.train_x[0].float()).abs().max() < 255 * 0.1
    assert torch.equal(a.train_images(idx[:3], seed=5), b.train_images(idx[:3], seed=5))
    assert torch.equal(a.train_images(idx[:3]), a.train_x[idx[:3]])  # no seed: the fixed draw


def test_the_loop_binarises_each_visit_afresh(tmp_path):
    """Two epochs see different binarisations of the same training image; the run is still a function of the
    seed (a second run draws the same pixels)."""
    from rich.console import Console

    from genai_cli.train import Trainer

    def seen(name: str) -> dict[bytes, list[torch.Tensor]]:
        raw = tiny_config("vae", max_steps=4, batch_size=8, eval_every=100, sample_every=100, checkpoint_every=100)
        raw["data"].update(limit=16, binarize="stochastic")  # 2 steps per epoch: 2 epochs
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "samples").mkdir()
        trainer = Trainer(from_dict(raw), run, quiet=True, console=Console(quiet=True))
        images: dict[bytes, list[torch.Tensor]] = {}  # a training image's grey levels -> what each visit drew
        draw = trainer.draw_batch

        def record(levels, y):
            x, y = draw(levels, y)
            for level, image in zip(levels, x):
                images.setdefault(level.numpy().tobytes(), []).append(image)
            return x, y

        trainer.draw_batch = record
        trainer.fit()
        return images

    first, again = seen("a"), seen("b")
    assert len(first) == 16 and all(len(v) == 2 for v in first.values())
    assert sum(not torch.equal(*v) for v in first.values()) >= 12, "each visit draws the pixels afresh"
    assert all(torch.equal(p, q) for i in first for p, q in zip(first[i], again[i])), "seeded: the same every run"


# -- every bundled config -----------------------------------------------------------------------
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_bundled_configs_include_the_quickstart():
    assert "quickstart" in [p.stem for p in CONFIGS]


def train_parents(cfg, runs) -> None:
    """A config that builds on other runs names them after their bundled configs (model.tokenizer: vqvae_mnist):
    train each for one tiny step under ``runs``, as the user trains them first."""
    from genai_cli.config import parent_refs
    from genai_cli.registry import MODELS

    for key in parent_refs(MODELS.get(cfg.family).Config):
        name = getattr(cfg.model, key)
        parent = ROOT / "configs" / f"{name}.yaml"
        assert parent.is_file(), f"model.{key}: {name} should name a bundled config"
        train_parents(load_config(parent), runs)
        invoke("train", parent, "--runs-dir", runs, "--name", name, "-q", "--set", "train.max_steps=1",
               "--set", "train.batch_size=4", "--set", "data.limit=8", "--set", "train.eval_max_images=8",
               "--set", "train.sample_n=1", "--set", "train.precision=fp32")


# Text sets downloaded on first use, and the offline one a test builds their configs on instead (no network in CI).
DOWNLOADED_TEXT = {"tiny_shakespeare": "python_docs"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_bundled_config_loads_and_builds(path, tmp_path):
    import yaml

    cfg = load_config(path)
    train_parents(cfg, tmp_path)
    if cfg.data.name in DOWNLOADED_TEXT:  # the same model on an offline text: only the vocabulary differs
        raw = yaml.safe_load(path.read_text())
        raw["data"]["name"] = DOWNLOADED_TEXT[cfg.data.name]
        path = tmp_path / path.name
        path.write_text(yaml.safe_dump(raw))
    r = invoke("inspect", path, "--runs-dir", tmp_path)  # builds the model from the config alone, as a user's first
    assert cfg.family in r.stdout and "parameters" in r.stdout.lower()  # look does


# A grey-level DDPM (the quickstart), a VAE and a binarised autoregressive model: two steps each, end to end.
@pytest.mark.parametrize("name", ["quickstart", "vae_mnist", "pixel_lstm_mnist12"])
def test_cheap_bundled_configs_train_two_steps(tmp_path, name):
    runs = tmp_path / "runs"
    invoke("train", ROOT / "configs" / f"{name}.yaml", "--runs-dir", runs, "--name", name, "-q",
           "--set", "train.max_steps=2", "--set", "train.batch_size=8", "--set", "data.limit=16",
           "--set", "train.eval_max_images=16", "--set", "train.sample_n=1", "--set", "train.sample_every=2",
           "--set", "train.checkpoint_every=2", "--set", "train.eval_every=2", "--set", "train.precision=fp32")
    assert load_checkpoint_file(runs / name / "checkpoints" / "last.pt")["step"] == 2
