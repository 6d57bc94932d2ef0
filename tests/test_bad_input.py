"""Bad input, table-driven: exit code non-zero, one line on stderr naming the problem, no traceback,
and nothing already on disk changed (a checksum of the runs directory)."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import checksum, tiny_config
from typer.testing import CliRunner

from genai_cli.cli import app

runner = CliRunner()


class Payload:
    """Unpickling this would run code (os.system); a weights_only load must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/genai_pwned",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    runs = root / "runs"
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(max_steps=2, eval_every=2, sample_every=2, checkpoint_every=2)))
    r = runner.invoke(app, ["train", str(cfg), "--runs-dir", str(runs), "--name", "good", "--quiet"])
    assert r.exit_code == 0, r.stderr
    for family, run in (("pixelcnn", "pcnn"), ("autoencoder", "ae")):  # runs of other families, for their options
        other = root / f"{family}.yaml"
        other.write_text(yaml.safe_dump(tiny_config(family, max_steps=1, eval_every=1, sample_every=1)))
        r = runner.invoke(app, ["train", str(other), "--runs-dir", str(runs), "--name", run, "--quiet"])
        assert r.exit_code == 0, r.stderr
    shutil.copytree(runs / "good", runs / "locked")
    (runs / "locked").chmod(0o555)  # no permission to write (ignored by root: those cases are skipped as root)
    (root / "locked-runs").mkdir(mode=0o555)

    def write(name, text):
        (root / name).write_text(text)

    write("syntax.yaml", "model:\n  family: ddpm\n train: [\n")
    bad = tiny_config()
    write("family.yaml", yaml.safe_dump({**bad, "model": {"family": "gann"}}))
    write("key.yaml", yaml.safe_dump({**bad, "train": {**bad["train"], "epochz": 3}}))
    write("type.yaml", yaml.safe_dump({**bad, "train": {**bad["train"], "batch_size": "big"}}))
    write("size.yaml", yaml.safe_dump({**bad, "data": {**bad["data"], "image_size": 7}}))
    write("batch.yaml", yaml.safe_dump({**bad, "train": {**bad["train"], "batch_size": 1000}}))
    write("offline.yaml", yaml.safe_dump({**bad, "data": {"name": "mnist", "download": False,
                                                           "root": str(root / "nodata")}}))
    write("ok.yaml", yaml.safe_dump(bad))
    write("transformer.yaml", yaml.safe_dump(tiny_config("pixel_transformer")))
    write("empty.yaml", "")
    write("list.yaml", "- 1\n- 2\n")
    good = runs / "good" / "checkpoints" / "last.pt"
    data = good.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with open(root / "evil.pt", "wb") as f:
        pickle.dump({"family": "ddpm", "model": Payload()}, f, protocol=2)
    with open(root / "evil4.pt", "wb") as f:
        pickle.dump({"family": "ddpm", "model": Payload()}, f, protocol=4)
    state = torch.load(good, weights_only=True)
    state["family"] = "from_the_future"
    torch.save(state, root / "future.pt")
    torch.save({"weights": torch.zeros(2)}, root / "foreign.pt")
    (runs / "empty-run").mkdir()
    return root, runs


CASES = [
    # (name, argv with {root}/{runs} placeholders, expected fragment of the message)
    ("yaml syntax", ["train", "{root}/syntax.yaml"], "YAML syntax error at line"),
    ("unknown family", ["train", "{root}/family.yaml"], "unknown model family 'gann'"),
    ("unknown key", ["train", "{root}/key.yaml"], "did you mean 'epochs'"),
    ("wrong type", ["train", "{root}/type.yaml"], "'train.batch_size' must be int"),
    ("empty config", ["train", "{root}/empty.yaml"], "config is empty"),
    ("config not a mapping", ["train", "{root}/list.yaml"], "a config is a mapping"),
    ("missing config", ["train", "{root}/missing.yaml"], "not found"),
    ("bad --set", ["train", "{root}/key.yaml", "--set", "train"], "--set expects"),
    ("set unknown key", ["train", "{root}/size.yaml", "--set", "model.chanels=3"], "unknown config key"),
    ("image size unet cannot halve", ["train", "{root}/size.yaml"], "image size"),
    ("batch larger than dataset", ["train", "{root}/batch.yaml"], "larger than the training set"),
    ("dataset offline", ["train", "{root}/offline.yaml"], "use an offline dataset"),
    ("run exists", ["train", "{root}/size.yaml", "--set", "data.image_size=8", "--name", "good"], "already exists"),
    ("no config no resume", ["train"], "give a config"),
    ("resume missing run", ["train", "--resume", "nope"], "neither a run folder nor a checkpoint"),
    ("resume run without checkpoint", ["train", "--resume", "{runs}/empty-run"], "has no checkpoint"),
    ("resume finished run", ["train", "--resume", "{runs}/good"], "already trained"),
    ("sample missing run", ["sample", "{runs}/nope"], "neither a run folder nor a checkpoint"),
    ("sample truncated", ["sample", "{root}/truncated.pt"], "corrupt or truncated"),
    ("sample garbage", ["sample", "{root}/garbage.pt"], "corrupt, truncated"),
    ("sample code pickle", ["sample", "{root}/evil.pt"], "could run code"),
    ("sample code pickle protocol 4", ["sample", "{root}/evil4.pt"], "refused"),
    ("sample unknown family", ["sample", "{root}/future.pt"], "unknown to this version"),
    ("sample foreign file", ["sample", "{root}/foreign.pt"], "not a genai checkpoint"),
    ("temperature on ddpm", ["sample", "{runs}/good", "--temperature", "1.5"], "--temperature is not an option"),
    ("top-k on ddpm", ["sample", "{runs}/good", "--top-k", "5"], "--top-k is not an option"),
    ("label on unconditional", ["sample", "{runs}/good", "--label", "3"], "label"),
    ("n zero", ["sample", "{runs}/good", "-n", "0"], "-n must be at least 1"),
    ("n negative", ["sample", "{runs}/good", "-n", "-3"], "-n must be at least 1"),
    ("steps zero", ["sample", "{runs}/good", "--steps", "0"], "--steps must be at least 1"),
    ("bad sampler", ["sample", "{runs}/good", "--sampler", "euler", "-n", "1"], "sampler"),
    ("bad out suffix", ["sample", "{runs}/good", "--out", "{root}/x.jpg"], "--out must end in .png"),
    ("bad sweep", ["sample", "{runs}/good", "--sweep", "steps"], "--sweep expects"),
    ("inspect missing", ["inspect", "{runs}/nope"], "neither a run folder nor a checkpoint"),
    ("inspect corrupt", ["inspect", "{root}/truncated.pt"], "corrupt or truncated"),
    ("inspect bad yaml", ["inspect", "{root}/syntax.yaml"], "YAML syntax error"),
    ("no runs at all", ["sample", "--runs-dir", "{root}/nowhere"], "no runs with a checkpoint"),
    # options a family cannot take, across families
    ("steps on pixelcnn", ["sample", "{runs}/pcnn", "--steps", "10"], "--steps is not an option of family 'pixelcnn'"),
    ("sampler on pixelcnn", ["sample", "{runs}/pcnn", "--sampler", "ddim"], "--sampler is not an option"),
    ("guidance on pixelcnn", ["sample", "{runs}/pcnn", "--guidance", "2"], "--guidance is not an option"),
    ("interpolate on pixelcnn", ["sample", "{runs}/pcnn", "--interpolate"], "--interpolate is not an option"),
    ("top-p on autoencoder", ["sample", "{runs}/ae", "--top-p", "0.9"], "--top-p is not an option of family"),
    ("greedy on autoencoder", ["sample", "{runs}/ae", "--greedy"], "--greedy is not an option"),
    ("prefix rows on ddpm", ["sample", "{runs}/good", "--prefix-rows", "3"], "--prefix-rows is not an option"),
    ("sample option in config", ["train", "{root}/ok.yaml", "--set", "sample.top_k=5"],
     "'sample.top_k' is not an option of family 'ddpm'"),
    # training settings this machine or family cannot honour
    ("fp16 on the cpu", ["train", "{root}/ok.yaml", "--set", "train.precision=fp16"], "fp16 needs a CUDA GPU"),
    ("cuda without a gpu", ["train", "{root}/ok.yaml", "--set", "train.device=cuda"], "no CUDA GPU is visible"),
    ("sample on cuda without a gpu", ["sample", "{runs}/good", "--device", "cuda"],
     "--device is 'cuda' but no CUDA GPU is visible; use --device auto"),
    ("channels_last without convolutions", ["train", "{root}/transformer.yaml", "--set", "train.channels_last=true"],
     "channels_last is for convolutional families"),
    ("grad_accum not dividing the batch", ["train", "{root}/ok.yaml", "--set", "train.grad_accum=3"],
     "does not split into train.grad_accum 3"),
    ("negative keep_checkpoints", ["train", "{root}/ok.yaml", "--set", "train.keep_checkpoints=-1"],
     "'train.keep_checkpoints' must be 0 or more"),
    ("unknown log sink", ["train", "{root}/ok.yaml", "--set", "train.log=[wandb]"], "'train.log[0]' must be one of"),
    ("nproc zero", ["train", "{root}/ok.yaml", "--nproc", "0"], "--nproc must be at least 1"),
    ("nproc not dividing the batch", ["train", "{root}/ok.yaml", "--nproc", "3"], "does not split into 3 process"),
    ("nproc onto an existing run", ["train", "{root}/ok.yaml", "--nproc", "2", "--name", "good"], "already exists"),
    # permissions (root writes anywhere: skipped when the tests run as root)
    ("resume a run without write permission", ["train", "--resume", "{runs}/locked"], "is not writable"),
    ("runs dir without write permission", ["train", "{root}/ok.yaml", "--runs-dir", "{root}/locked-runs"],
     "permission denied"),
]
NEEDS_NON_ROOT = {"resume a run without write permission", "runs dir without write permission"}
NEEDS_NO_GPU = {"cuda without a gpu", "sample on cuda without a gpu", "fp16 on the cpu"}


@pytest.mark.parametrize("name, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(world, name, argv, needle):
    if name in NEEDS_NON_ROOT and os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    if name in NEEDS_NO_GPU and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root, runs = world
    args = [a.format(root=root, runs=runs) for a in argv]
    if "--runs-dir" not in args:
        args += ["--runs-dir", str(runs)]
    before = checksum(runs)
    with warnings.catch_warnings(record=True) as caught:  # a warning would print lines before the error
        warnings.simplefilter("always")
        result = runner.invoke(app, args)
    assert not caught, [str(w.message)[:200] for w in caught]
    assert result.exit_code not in (0, None), result.stdout
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert checksum(runs) == before, "a failed command changed the runs directory"
    assert not Path("/tmp/genai_pwned").exists()
