"""Config: typed overrides, unknown keys with a suggestion, saved config round trip; the registry."""

from __future__ import annotations

import pytest
import yaml
from helpers import tiny_config

from genai_cli.config import apply_overrides, from_dict, load_config
from genai_cli.errors import GenaiError
from genai_cli.registry import MODELS, Registry


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
    with pytest.raises(GenaiError, match="train.tbptt applies to recurrent families \\(pixel_lstm, row_lstm\\)"):
        from_dict(raw)
