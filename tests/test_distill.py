"""The distill family: a few-step student trained on a teacher run's probability-flow ODE (reflow on its pairs)."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from helpers import invoke, tiny_config, train_tiny_parents, untrained_parent
from torch import nn

from genai_cli.api import build_model
from genai_cli.errors import GenaiError
from genai_cli.lineage import check_frozen
from genai_cli.models.base import ImageSpec, Stepper
from genai_cli.models.distill import Config

UNLABELLED = ImageSpec(channels=1, size=8, num_classes=0)
LABELLED = ImageSpec(channels=1, size=8, num_classes=4)
MEAN, STD = 0.3, 0.5  # the Gaussian data of the closed-form teacher, in model space


class GaussianVelocity(nn.Module):
    """The exact v-prediction network of data N(MEAN, STD^2 I) under a DDPM schedule: E[x_0 | x_t] is linear in x_t
    (x_t = a x_0 + b eps), so its probability-flow ODE carries noise eps to MEAN + STD eps."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # a device for the model to report

    def forward(self, x, t, y=None):
        abar = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        x0 = MEAN + a * STD**2 / (a**2 * STD**2 + b**2) * (x - a * MEAN)
        eps = (x - a * x0) / b
        return a * eps - b * x0


def student(spec=UNLABELLED, teacher_cfg=None, teacher_family="ddpm", **overrides):
    torch.manual_seed(0)
    teacher = untrained_parent(teacher_family, spec, **(teacher_cfg or {}))
    cfg = Config(**{"teacher": "untrained", "pairs": 64, "held_out": 16, "teacher_steps": 4, **overrides})
    return build_model("distill", cfg, spec, parents={"teacher": teacher})


def train(model, steps: int, lr: float = 3e-3, batch: int = 64):
    class T:
        betas, weight_decay = [0.9, 0.999], 0.0

    T.lr = lr
    opts = model.configure_optimizers(T)
    x = (torch.zeros(batch, *model.spec.shape), torch.zeros(batch, dtype=torch.long))
    for step in range(steps):
        model.current_step = step
        model.train_step(x, opts, Stepper(grad_clip=1.0))
    return opts


def test_a_student_reproduces_a_closed_form_teachers_endpoint_in_one_step(cpu_bf16):
    cpu_bf16(False)  # the teacher's pairs in fp32: the closed form below is exact to the solver's error
    model = student(teacher_cfg={"prediction": "v", "timesteps": 100, "clip_x0": False}, init="scratch",
                    pairs=1024, held_out=128, teacher_sampler="heun", teacher_steps=20, grid_share=1.0,
                    grid_steps=[1])
    model.teacher.unet = GaussianVelocity(model.teacher.schedule.alphas_cumprod)
    noise, ends, _ = model.pairs
    # The teacher's ODE is the closed-form map (up to Heun's and the discrete schedule's error).
    assert float(((ends - (MEAN + STD * noise)) ** 2).mean()) < 0.02 * STD**2
    before = model.validation_metrics([])["endpoint_mse_1"]
    train(model, 150)
    after = model.validation_metrics([])["endpoint_mse_1"]  # on the held-out pairs
    assert after < 0.05 * float(ends.var()) < before, (before, after)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_a_student_starts_as_its_teacher_one_euler_step_is_one_ddim_step(prediction):
    """Before training, the student's velocity is the teacher's network read on the straight path: one Euler step
    from s = 1 is the teacher's one-step DDIM (its x_0 estimate at t = T - 1), up to the signal the schedule leaves
    at T - 1 (sqrt(alphā) ~ 6e-3 at T = 1000; an eps network divides by it, so it is left out here)."""
    model = student(teacher_cfg={"prediction": prediction, "clip_x0": False, "timesteps": 1000})
    noise = torch.randn(4, *UNLABELLED.shape, generator=torch.Generator().manual_seed(0))
    ddim = model.teacher.ode_solve(noise, sampler="ddim", steps=1)
    torch.testing.assert_close(model.solve(noise, None, 1), ddim, atol=0.05, rtol=0.02)
    assert not torch.allclose(model.solve(noise, None, 1), model.solve(noise, None, 2), atol=0.05)


def test_a_flow_teachers_student_starts_as_the_flow_its_euler_steps_are_the_teachers():
    """A flow network already predicts the straight path's velocity: before training the student's Euler steps are
    the teacher's own Euler solve, exactly; after a few steps on the pairs it has moved towards their endpoints."""
    model = student(LABELLED, teacher_family="flow", teacher_cfg={"class_conditional": True}, guidance=2.0)
    noise = torch.randn(4, *LABELLED.shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)
    for k in (1, 2):
        ode = model.teacher.ode_solve(noise, labels=labels, guidance=1.0, sampler="euler", steps=k)
        torch.testing.assert_close(model.solve(noise, labels, k), ode, atol=1e-5, rtol=1e-5)
    before = model.validation_metrics([])["endpoint_mse_1"]
    train(model, 20)
    assert model.validation_metrics([])["endpoint_mse_1"] < before


def test_the_teacher_is_frozen_no_gradients_not_in_the_optimizer(shapes_batch):
    model = student()
    teacher = model.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opts = train(model, 3)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for o in opts.values() for g in o.param_groups for p in g["params"])
    check_frozen(model, opts)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(k.startswith("teacher") or "parents" in k for k in model.state_dict()), "not the student's weights"
    student_unet = dict(model.unet.named_parameters())
    assert any(not torch.equal(p, teacher.unet.get_parameter(k)) for k, p in student_unet.items()), "student trained"


def test_a_guided_teacher_is_distilled_labels_choose_the_class_guidance_is_refused():
    model = student(LABELLED, teacher_cfg={"class_conditional": True}, guidance=3.0)
    noise, _, labels = model.pairs
    assert torch.equal(labels, torch.arange(noise.shape[0]) % 4)  # every class, in turn
    g = torch.Generator().manual_seed(0)
    assert model.sample(3, generator=g, steps=2, labels=1).shape == (3, *LABELLED.shape)
    assert "guidance" not in model.sample_options and "labels" in model.sample_options
    with pytest.raises(GenaiError, match="not class-conditional"):
        student(teacher_cfg={}, guidance=2.0)
    with pytest.raises(GenaiError, match="stochastic"):
        student(teacher_sampler="ddpm").pairs  # noqa: B018 (drawing the pairs asks the teacher's ODE)


def test_the_student_samples_after_its_teacher_run_is_deleted(tmp_path):
    runs = tmp_path / "runs"
    train_tiny_parents("distill", runs)  # a tiny ddpm run: tiny-ddpm
    cfg = tiny_config("distill")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(cfg))
    invoke("train", tmp_path / "d.yaml", "--runs-dir", runs, "--name", "student", "-q")
    shutil.rmtree(runs / "tiny-ddpm")
    for steps in ("1", "4"):
        invoke("sample", runs / "student", "--steps", steps, "-n", "4", "--out", tmp_path / f"s{steps}.png")
        assert (tmp_path / f"s{steps}.png").exists()
    for bad, word in ((["--guidance", "2"], "guidance"), (["--steps", "0"], "steps")):
        result = invoke("sample", runs / "student", *bad, "--out", tmp_path / "x.png", ok=False)
        assert result.exit_code != 0 and word in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_run_without_an_ode_is_refused_as_teacher_in_one_line(tmp_path):
    runs = tmp_path / "runs"
    (tmp_path / "vae.yaml").write_text(yaml.safe_dump(tiny_config("vae", max_steps=1)))
    invoke("train", tmp_path / "vae.yaml", "--runs-dir", runs, "--name", "v", "-q")
    cfg = tiny_config("distill")
    cfg["model"]["teacher"] = "v"
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("train", tmp_path / "d.yaml", "--runs-dir", runs, "--name", "student", "-q", ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "model.teacher: 'v' is a vae run; expected a run of family ddpm" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (runs / "student" / "checkpoints").exists()
