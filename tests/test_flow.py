"""The flow family (issue 20 section 1): the path and its target, the ODE solvers against scipy on a closed-form
velocity field, the Hutchinson trace, guidance, the likelihood of a Gaussian, the OT coupling, and the options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.optimize import linear_sum_assignment
from scipy.stats import multivariate_normal

from genai_cli.api import create_model
from genai_cli.capabilities import has
from genai_cli.errors import GenaiError
from genai_cli.generate import Plain, SampleRequest, draw, plan
from genai_cli.models.flow import (
    hutchinson_divergence,
    ode_log_likelihood,
    ot_coupling,
    pairing_cost,
    sample_t,
    solve,
    straight_path,
)

# Gaussian data N(MU, SIGMA) in 2-D: the marginal velocity of the straight path is known in closed form.
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64)


def gaussian_velocity(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """E[eps - x_0 | x_t = x] for x_0 ~ N(MU, SIGMA), eps ~ N(0, I), x_t = (1 - t) x_0 + t eps: with a = 1 - t,
    x_t ~ N(a MU, V), V = a^2 SIGMA + t^2 I, and Cov(eps - x_0, x_t) = t I - a SIGMA, so
    v(x, t) = -MU + (t I - a SIGMA) V^-1 (x - a MU)."""
    t = float(t)
    a = 1 - t
    eye = torch.eye(2, dtype=torch.float64)
    gain = (t * eye - a * SIGMA) @ torch.linalg.inv(a * a * SIGMA + t * t * eye)
    return -MU + (x.to(torch.float64) - a * MU) @ gain.T


def sqrt_sigma() -> torch.Tensor:
    w, q = torch.linalg.eigh(SIGMA)
    return q @ torch.diag(w.sqrt()) @ q.T


def test_the_path_runs_from_data_to_noise_with_the_straight_velocity():
    x0, noise = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    t = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.9])
    x_t, v = straight_path(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.75 * x0[2] + 0.25 * noise[2])
    torch.testing.assert_close(v, noise - x0)  # the same for every t: a straight line
    h = 1e-3  # and it is the path's derivative
    torch.testing.assert_close((straight_path(x0, noise, t + h)[0] - x_t) / h, v, atol=1e-3, rtol=1e-3)


def test_logit_normal_times_lie_inside_and_gather_around_the_middle():
    g = torch.Generator().manual_seed(0)
    uniform = sample_t(20000, "uniform", generator=g)
    logit = sample_t(20000, "logit_normal", 0.0, 1.0, generator=g)
    assert 0 < float(logit.min()) and float(logit.max()) < 1
    assert abs(float(torch.logit(logit).mean())) < 0.03 and abs(float(torch.logit(logit).std()) - 1) < 0.03
    middle = lambda t: float(((t > 0.25) & (t < 0.75)).float().mean())  # noqa: E731
    assert middle(logit) > middle(uniform) + 0.1
    shifted = sample_t(20000, "logit_normal", 1.0, 1.0, generator=g)
    assert float(shifted.mean()) > float(logit.mean()) + 0.1
    with pytest.raises(GenaiError, match="t_sampling"):
        sample_t(3, "cosine")


def test_the_closed_form_field_carries_noise_onto_the_data():
    # The exact flow map of the Gaussian field is x_0 = MU + SIGMA^1/2 x_1: check it with scipy's tight RK45.
    x1 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for row in x1:
        ref = solve_ivp(lambda t, y: gaussian_velocity(t, torch.from_numpy(y)[None])[0].numpy(), (1.0, 0.0),
                        row.numpy(), rtol=1e-10, atol=1e-12).y[:, -1]
        np.testing.assert_allclose(ref, (MU + sqrt_sigma() @ row).numpy(), atol=1e-7)


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_fixed_step_solvers_converge_to_scipy_at_their_order(sampler, order):
    x1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = np.stack([solve_ivp(lambda t, y: gaussian_velocity(t, torch.from_numpy(y)[None])[0].numpy(), (1.0, 0.0),
                              row.numpy(), rtol=1e-10, atol=1e-12).y[:, -1] for row in x1])
    errors = [float(np.abs(solve(gaussian_velocity, x1, 1.0, 0.0, sampler, steps).numpy() - ref).max())
              for steps in (8, 16, 32, 64)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors  # converging as the steps grow
    rate = math.log2(errors[-2] / errors[-1])  # halving the step divides the error by at least 2^order
    assert rate > order - 0.3, (sampler, errors, rate)
    assert errors[-1] < (2e-2 if order == 1 else 1e-4)


@pytest.mark.parametrize("tol", [1e-4, 1e-7])
def test_the_adaptive_solver_meets_its_tolerance_against_scipy(tol):
    x1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = np.stack([solve_ivp(lambda t, y: gaussian_velocity(t, torch.from_numpy(y)[None])[0].numpy(), (1.0, 0.0),
                              row.numpy(), method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1] for row in x1])
    error = float(np.abs(solve(gaussian_velocity, x1, 1.0, 0.0, "dopri5", atol=tol, rtol=tol).numpy() - ref).max())
    assert error < 50 * tol, error
    if tol < 1e-6:
        assert error < 1e-5


def test_hutchinson_matches_the_exact_divergence_of_a_small_network():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    exact = float(torch.trace(torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x[0])))
    draws = 4000
    xs = x.expand(draws, 3).clone().requires_grad_(True)
    z = torch.randint(0, 2, (draws, 3), generator=torch.Generator().manual_seed(1)).double() * 2 - 1
    estimates = hutchinson_divergence(net(xs), xs, z)  # one Rademacher probe per row
    se = float(estimates.std()) / math.sqrt(draws)
    assert se > 0  # the estimator is noisy here (a full Jacobian), so the check below means something
    assert abs(float(estimates.mean()) - exact) < 4 * se, (float(estimates.mean()), exact, se)


def test_the_flows_likelihood_of_a_gaussian_is_its_closed_form_within_the_estimators_error():
    n = 400
    x = MU + torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) @ sqrt_sigma()
    z = torch.randint(0, 2, (n, 2), generator=torch.Generator().manual_seed(4)).double() * 2 - 1
    estimate = ode_log_likelihood(gaussian_velocity, x, z, tol=1e-7)
    exact = torch.from_numpy(multivariate_normal(MU.numpy(), SIGMA.numpy()).logpdf(x.numpy()))
    gap = estimate - exact  # the Hutchinson noise alone: the images' own spread cancels
    se = float(gap.std()) / math.sqrt(n)
    assert se > 1e-3  # SIGMA is not diagonal: one probe per point does not give the trace exactly
    assert abs(float(gap.mean())) < 4 * se, (float(gap.mean()), se)
    assert abs(float(estimate.mean() - exact.mean())) < 4 * se + 1e-6


def test_the_ot_coupling_lowers_the_mean_pairing_cost_and_is_the_exact_assignment():
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(64, 1, 6, 6, generator=g) * 2 - 1
    noise = torch.randn(64, 1, 6, 6, generator=g)
    paired = ot_coupling(x0, noise)
    assert sorted(map(tuple, paired.flatten(1).tolist())) == sorted(map(tuple, noise.flatten(1).tolist()))
    before = float(pairing_cost(x0, noise).diagonal().mean())
    after = float(pairing_cost(x0, paired).diagonal().mean())
    rows, cols = linear_sum_assignment(pairing_cost(x0, noise).numpy())
    optimum = float(pairing_cost(x0, noise).numpy()[rows, cols].mean())
    assert after < 0.97 * before and after == pytest.approx(optimum, rel=1e-5)


def tiny_flow(**overrides):
    torch.manual_seed(0)
    return create_model("flow", image_size=8, num_classes=10, base_channels=8, channel_mults=[1, 2], **overrides)


def test_guidance_one_is_the_conditional_velocity_and_zero_the_unconditional():
    model = tiny_flow(class_conditional=True).eval()
    for p in model.parameters():  # a trained-looking class embedding: labels must change the output
        p.data.add_(torch.randn_like(p) * 0.05)
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    null = torch.full_like(labels, model.null_label)
    cond, uncond = model.unet(x, torch.full((4,), 500.0), labels), model.unet(x, torch.full((4,), 500.0), null)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(model.velocity(x, 0.5, labels, 1.0), cond)
    torch.testing.assert_close(model.velocity(x, 0.5, labels, 0.0), uncond)
    torch.testing.assert_close(model.velocity(x, 0.5, labels, 3.0), uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-5)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.ode_solve(noise, labels=labels, guidance=1.0, sampler="euler", steps=4),
                               model.ode_solve(noise, labels=labels, sampler="euler", steps=4))


def test_samplers_take_and_count_their_network_evaluations():
    model = tiny_flow().eval()
    for sampler, steps, calls in [("euler", 6, 6), ("midpoint", 3, 6), ("heun", 4, 8)]:
        before = model.network_calls
        out = model.sample(2, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 1, 8, 8) and 0 <= float(out.min()) and float(out.max()) <= 1
        assert model.network_calls - before == calls == model.network_evaluations({"sampler": sampler, "steps": steps})
    samples = draw(model, SampleRequest(n=2, seed=0, options={"sampler": "dopri5", "atol": 1e-3, "rtol": 1e-3}))
    assert samples.network_evaluations == model._solve_record[1] > 6  # measured: dopri5 takes >= 6 per step


def test_bad_sampling_options_are_refused_in_one_line():
    model = tiny_flow()
    cases = [({"sampler": "ddim"}, "unknown sampler 'ddim'"), ({"sampler": "dopri5", "steps": 10}, "adaptive"),
             ({"sampler": "euler", "atol": 1e-4}, "dopri5"), ({"steps": 0}, "steps must be at least 1"),
             ({"sampler": "dopri5", "rtol": 0.0}, "rtol must be > 0"), ({"guidance": 2.0}, "class-conditional"),
             ({"eta": 0.5}, "eta")]
    for options, message in cases:
        with pytest.raises(GenaiError, match=message):
            plan(model, SampleRequest(mode=Plain(), n=2, options=options))
    with pytest.raises(GenaiError, match="logit_std"):
        tiny_flow(t_sampling="logit_normal", logit_std=0.0)
    with pytest.raises(GenaiError, match="adaptive"):
        tiny_flow(sampler="dopri5", steps=5)


def test_training_lowers_the_loss_with_each_lever():
    for overrides in ({}, {"t_sampling": "logit_normal"}, {"coupling": "ot", "class_conditional": True}):
        model = tiny_flow(**overrides)
        g = torch.Generator().manual_seed(0)
        x = torch.zeros(32, 1, 8, 8)  # black images: the velocity is learnable to the end
        y = torch.randint(0, 10, (32,), generator=g)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(40):
            loss = model.loss((x, y))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), (overrides, losses[:5], losses[-5:])


def test_the_pixel_flow_estimates_a_likelihood_and_the_latent_one_does_not():
    model = tiny_flow().eval()
    model.likelihood_tolerance = 1e-3
    x = torch.randint(0, 256, (2, 1, 8, 8)).float() / 255
    nats = model.likelihood_estimate((x, torch.zeros(2, dtype=torch.long)), generator=torch.Generator().manual_seed(0))
    assert nats.shape == (2,) and torch.isfinite(nats).all()
    bits = -float(nats.mean()) / (64 * math.log(2))
    assert 0 < bits < 30  # a density of 8-bit pixels under dequantisation: a positive number of bits per pixel
    assert has(model, "likelihood_estimate") and has(model, "ode_solve")
    from genai_cli.registry import MODELS

    assert not has(MODELS.get("latent_flow"), "likelihood_estimate") and has(MODELS.get("latent_flow"), "ode_solve")


def test_the_cli_trains_a_flow_and_reports_its_network_evaluations(tmp_path):
    import yaml
    from helpers import invoke, tiny_config

    runs = tmp_path / "runs"
    config = tmp_path / "flow.yaml"
    config.write_text(yaml.safe_dump(tiny_config("flow", max_steps=2)))
    invoke("train", config, "--runs-dir", runs, "--name", "f", "-q")
    out = invoke("sample", "f", "--runs-dir", runs, "-n", "2", "--sampler", "euler", "--steps", "3",
                 "--out", tmp_path / "a.png").stdout
    assert "3 network evaluations per sample" in out and (tmp_path / "a.png").is_file()
    out = invoke("sample", "f", "--runs-dir", runs, "-n", "2", "--sampler", "dopri5", "--atol", "1e-3", "--rtol",
                 "1e-3", "--out", tmp_path / "b.png").stdout
    assert "network evaluations per sample" in out
    bad = invoke("sample", "f", "--runs-dir", runs, "--sampler", "heun", "--atol", "1e-3", ok=False)
    assert bad.exit_code == 2 and "dopri5" in bad.output and "Traceback" not in bad.output


def test_evaluate_reports_the_estimate_with_its_standard_error():
    from types import SimpleNamespace

    from genai_cli.evaluation.run import estimated_bits_per_dim

    model = tiny_flow().eval()
    model.likelihood_tolerance = 1e-3
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(val_x=torch.randint(0, 256, (6, 1, 8, 8), generator=g, dtype=torch.uint8),
                           val_y=torch.zeros(6, dtype=torch.long))
    cfg = SimpleNamespace(train=SimpleNamespace(batch_size=4))
    bits, stderr = estimated_bits_per_dim(model, data, cfg, torch.device("cpu"), 6, seed=0)
    assert math.isfinite(bits) and 0 < stderr < bits
    assert (bits, stderr) == estimated_bits_per_dim(model, data, cfg, torch.device("cpu"), 6, seed=0)  # seeded


def test_another_sampler_leaves_the_runs_steps_behind():
    model = tiny_flow()
    defaults = {"sampler": "heun", "steps": 3}  # a run's sample: section, as configs/flow_mnist.yaml has one
    assert plan(model, SampleRequest(options={"sampler": "dopri5"}, defaults=defaults)).options == {"sampler": "dopri5"}
    assert plan(model, SampleRequest(options={}, defaults=defaults)).options == defaults
    assert plan(model, SampleRequest(options={"sampler": "euler", "steps": 5}, defaults=defaults)).options["steps"] == 5
