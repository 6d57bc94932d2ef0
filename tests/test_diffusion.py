"""Diffusion family: the noise schedule's maths, the samplers, option checking and the UNet."""

from __future__ import annotations

import pytest
import torch

from genai_cli.errors import GenaiError
from genai_cli.models.base import ImageSpec
from genai_cli.models.diffusion import DDPM, Config, NoiseSchedule
from genai_cli.nn.unet import UNet, norm_groups

SPEC = ImageSpec(channels=1, size=8, num_classes=0)
LABELLED = ImageSpec(channels=1, size=8, num_classes=3)


def tiny_model(spec: ImageSpec = SPEC, **overrides) -> DDPM:
    torch.manual_seed(0)
    return DDPM(Config(**{**DDPM.tiny, **overrides}), spec)


def fixed_batch(spec: ImageSpec = SPEC, b: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, *spec.shape, generator=g)
    y = torch.arange(b) % max(spec.num_classes, 1)
    return x, y


# -- noise schedule ----------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_add_noise_matches_iterated_one_step_process(schedule):
    """q(x_t | x_0) (eq. 4) equals t applications of q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""
    s = NoiseSchedule(50, schedule)
    # Analytically: iterate the mean coefficient and the variance of x_t given x_0.
    mean_coef, var = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for t in range(50):
        beta = s.betas[t].double()
        mean_coef, var = (1 - beta).sqrt() * mean_coef, (1 - beta) * var + beta
        assert torch.isclose(mean_coef.float(), s.alphas_cumprod[t].sqrt(), rtol=1e-4)
        assert torch.isclose(var.float(), 1 - s.alphas_cumprod[t], rtol=1e-4)

    # Monte Carlo: run the one-step chain on many copies of a fixed x_0 and compare with add_noise.
    g = torch.Generator().manual_seed(0)
    n, t_stop = 40000, 12
    x0 = torch.full((n, 1), 0.7)
    x = x0.clone()
    for t in range(t_stop + 1):
        x = (1 - s.betas[t]).sqrt() * x + s.betas[t].sqrt() * torch.randn(x.shape, generator=g)
    direct = s.add_noise(x0, torch.randn(x.shape, generator=g), torch.full((n,), t_stop))
    for a in (x, direct):
        assert abs(float(a.mean()) - 0.7 * float(s.alphas_cumprod[t_stop].sqrt())) < 0.02
        assert abs(float(a.var()) - float(1 - s.alphas_cumprod[t_stop])) < 0.02


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [1000, 100])
def test_alphas_cumprod_decreases_to_near_zero(schedule, timesteps):
    s = NoiseSchedule(timesteps, schedule)
    abar = s.alphas_cumprod
    assert abar.shape == (timesteps,)
    assert bool((abar[1:] < abar[:-1]).all())
    assert 0 <= float(abar[-1]) < 1e-3
    assert bool(((s.betas > 0) & (s.betas < 1)).all())
    assert torch.allclose(s.alphas, 1 - s.betas)


def test_linear_schedule_matches_ho_at_1000_steps():
    s = NoiseSchedule(1000, "linear")
    assert float(s.betas[0]) == pytest.approx(1e-4)
    assert float(s.betas[-1]) == pytest.approx(0.02)


def test_ddim_timesteps():
    s = NoiseSchedule(1000)
    ts = s.ddim_timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert s.ddim_timesteps(1) == [999]
    assert s.ddim_timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(GenaiError):
        s.ddim_timesteps(1001)


def test_ddim_step_with_eta_zero_is_deterministic():
    s = NoiseSchedule(100)
    x_t, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    x0 = s.predict_x0(x_t, eps, 60)
    a = s.ddim_step(eps, x0, 60, 40, x_t, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = s.ddim_step(eps, x0, 60, 40, x_t, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = s.ddim_step(eps, x0, 60, 40, x_t, eta=1.0, generator=torch.Generator().manual_seed(1))
    d = s.ddim_step(eps, x0, 60, 40, x_t, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, d)


class FixedOutput(torch.nn.Module):
    """Stands in for the UNet: the same output for every (x_t, t, labels)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.register_buffer("out", out)
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # the model's device comes from its parameters

    def forward(self, x, t, labels=None):
        return self.out.expand_as(x)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_clipped_ddim_step_stays_on_the_forward_process(prediction):
    """With clip, x_t and x_prev imply the same (clipped x_0, noise) pair, so the chain stays consistent."""
    m = tiny_model(timesteps=100, prediction=prediction)
    s = m.schedule
    x_t, out = torch.randn(4, 1, 8, 8), 3 * torch.randn(4, 1, 8, 8)  # a large output, as guidance makes
    m.unet = FixedOutput(out)
    t, t_prev = 60, 40
    eps_raw, x0_raw = m.denoise(x_t, t)
    assert float(x0_raw.abs().max()) > 1  # clipping is active
    eps, x0 = m.denoise(x_t, t, clip=True)
    assert torch.equal(x0, x0_raw.clamp(-1, 1))
    x_prev = s.ddim_step(eps, x0, t, t_prev, x_t, eta=0.0)
    implied_t = (x_t - s.alphas_cumprod[t].sqrt() * x0) / (1 - s.alphas_cumprod[t]).sqrt()
    implied_prev = (x_prev - s.alphas_cumprod[t_prev].sqrt() * x0) / (1 - s.alphas_cumprod[t_prev]).sqrt()
    assert torch.allclose(implied_t, implied_prev, atol=1e-4)


def test_ddim_with_eta_one_has_the_ddpm_posterior_variance():
    """eq. 16 with eta = 1 on consecutive steps gives sigma^2 = beta_tilde (Song et al. sec. 4.1)."""
    s = NoiseSchedule(100)
    x_t, eps = torch.zeros(20000, 1), torch.zeros(20000, 1)
    out = s.ddim_step(eps, s.predict_x0(x_t, eps, 50), 50, 49, x_t, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert float(out.var()) == pytest.approx(float(s.posterior_variance[50]), rel=0.05)


def test_true_noise_recovers_x0():
    """A 'model' that returns the true noise makes predict_x0 exact and a full DDIM chain land on x_0."""
    s = NoiseSchedule(1000, "linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g)
    t_last = s.timesteps - 1
    x = s.add_noise(x0, noise, torch.full((4,), t_last))  # a known x_T
    assert torch.allclose(s.predict_x0(x, noise, t_last), x0, atol=1e-3)
    assert torch.allclose(s.predict_x0(s.add_noise(x0, noise, 300), noise, 300), x0, atol=1e-5)

    ts = s.ddim_timesteps(10)
    for t, t_prev in zip(ts, ts[1:] + [-1], strict=True):
        abar = s.alphas_cumprod[t]
        true_eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        x = s.ddim_step(true_eps, s.predict_x0(x, true_eps, t), t, t_prev, x, eta=0.0)
    assert torch.allclose(x, x0, atol=1e-3)


def test_ddpm_step_is_algorithm_2():
    """Without clipping, the posterior-mean form equals Algorithm 2 line 4 with sigma_t^2 = beta_tilde_t."""
    s = NoiseSchedule(100)
    x_t, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = 37
    ours = s.ddpm_step(s.predict_x0(x_t, eps, t), t, x_t, torch.Generator().manual_seed(3))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
    alpha, beta, abar = s.alphas[t], s.betas[t], s.alphas_cumprod[t]
    algo2 = (x_t - beta / (1 - abar).sqrt() * eps) / alpha.sqrt() + s.posterior_variance[t].sqrt() * z
    assert torch.allclose(ours, algo2, atol=1e-5)
    # The last step adds no noise.
    x0 = s.predict_x0(x_t, eps, 0)
    assert torch.equal(s.ddpm_step(x0, 0, x_t, torch.Generator().manual_seed(1)),
                       s.ddpm_step(x0, 0, x_t, torch.Generator().manual_seed(2)))


# -- prediction targets and loss weights ---------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_prediction_targets_convert_into_each_other_exactly(schedule):
    """eps, v and x_0 determine each other at a given (x_t, t): target() and eps_and_x0() are inverses."""
    s = NoiseSchedule(1000, schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (14,), generator=g)])
    x_t = s.add_noise(x0, eps, t)
    abar = s.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    v = s.velocity(x0, eps, t)
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0, rtol=0, atol=1e-12)  # Salimans & Ho
    assert torch.allclose(s.predict_eps(x_t, x0, t), eps, rtol=0, atol=1e-9)
    assert torch.allclose(s.predict_x0(x_t, eps, t), x0, rtol=0, atol=1e-9)
    for prediction in ("eps", "v", "x0"):
        target = s.target(x0, eps, t, prediction)
        eps_back, x0_back = s.eps_and_x0(target, x_t, t, prediction)
        assert torch.allclose(eps_back, eps, rtol=0, atol=1e-9), prediction
        assert torch.allclose(x0_back, x0, rtol=0, atol=1e-9), prediction
    # The same for one int timestep, and the error for an unknown target.
    x_500 = s.add_noise(x0, eps, 500)
    assert torch.allclose(s.eps_and_x0(s.velocity(x0, eps, 500), x_500, 500, "v")[1], x0, rtol=0, atol=1e-12)
    with pytest.raises(GenaiError, match="prediction"):
        s.target(x0, eps, t, "noise")


def test_min_snr_weights_match_the_formula():
    """Hang et al.: min(SNR, gamma) on the x_0 error, expressed for each target's own squared error."""
    s = NoiseSchedule(1000, "cosine")
    t = torch.arange(1000)
    x = torch.zeros(1000, 1, 2, 2, dtype=torch.float64)
    abar = s.alphas_cumprod.double()
    snr = (abar / (1 - abar)).view(-1, 1, 1, 1)
    gamma = 5.0
    expected = {"eps": snr.clamp(max=gamma) / snr, "v": snr.clamp(max=gamma) / (snr + 1), "x0": snr.clamp(max=gamma)}
    for prediction, want in expected.items():
        got = s.loss_weight(t, x, prediction, "min_snr", gamma)
        assert got.shape == (1000, 1, 1, 1)
        assert torch.allclose(got, want, rtol=1e-9, atol=0), prediction
        assert torch.equal(s.loss_weight(t, x, prediction, "none"), torch.ones_like(want))
    assert float(s.loss_weight(t, x, "eps", "min_snr", gamma)[-1]) == 1.0  # noisy end: plain L_simple
    # Each weighted target error equals min(SNR, gamma) times the x_0 error of the same estimate.
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1000, 1, 2, 2, generator=g, dtype=torch.float64), torch.randn(1000, 1, 2, 2, generator=g,
                                                                                       dtype=torch.float64)
    x_t = s.add_noise(x0, eps, t)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps_hat = s.predict_eps(x_t, x0_hat, t)
    x0_error = snr.clamp(max=gamma) * (x0 - x0_hat) ** 2
    for prediction in ("eps", "v", "x0"):
        err = (s.target(x0, eps, t, prediction) - s.target(x0_hat, eps_hat, t, prediction)) ** 2
        weighted = s.loss_weight(t, x, prediction, "min_snr", gamma) * err
        assert torch.allclose(weighted, x0_error, rtol=1e-6, atol=1e-12), prediction


# -- the family --------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "heun"])
def test_sample_shape_range_and_seed(sampler):
    m = tiny_model()
    a = m.sample(5, generator=torch.Generator().manual_seed(0), sampler=sampler)
    b = m.sample(5, generator=torch.Generator().manual_seed(0), sampler=sampler)
    assert a.shape == (5, 1, 8, 8)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)


def test_sample_options_are_checked():
    m = tiny_model()
    for bad in [dict(sampler="euler"), dict(steps=0), dict(sampler="ddim", steps=21), dict(steps=5),
                dict(sampler="ddim", eta=-1.0), dict(eta=0.5), dict(sampler="heun", eta=0.0),
                dict(sampler="dpm++2m", steps=21), dict(sampler="heun", steps=0)]:
        with pytest.raises(GenaiError):
            m.sample(2, **bad)
    with pytest.raises(TypeError):
        m.sample(2, temperature=1.0)
    assert m.sample(2, sampler="ddim", steps=3, eta=1.0).shape == (2, 1, 8, 8)
    for sampler in ("dpm++2m", "heun"):  # every step count from 1 to T runs
        for steps in (1, 2, 19, 20):
            assert m.sample(1, sampler=sampler, steps=steps).shape == (1, 1, 8, 8)
    with pytest.raises(GenaiError, match="sampler"):
        DDPM(Config(**{**DDPM.tiny, "sampler": "euler"}), SPEC)


def test_default_steps_per_sampler():
    """ddim 50, dpm++2m and heun 20 (all capped at T), ddpm all T; the config's steps follow its own sampler."""
    m = tiny_model(timesteps=100)
    assert [m._resolve_options(s, None, 0.0, 1.0)[1] for s in ("ddpm", "ddim", "dpm++2m", "heun")] == [100, 50, 20, 20]
    assert tiny_model()._resolve_options("ddim", None, 0.0, 1.0)[1] == 20  # T = 20
    s = NoiseSchedule(1000)
    assert s.dpm_solver_timesteps(20)[:3] == [999, 949, 899] and s.dpm_solver_timesteps(20)[-1] == 50
    assert s.dpm_solver_timesteps(1) == [999]
    assert s.dpm_solver_timesteps(1000) == list(range(999, -1, -1))
    for steps in (7, 26, 500, 999):  # distinct and decreasing, where torch.linspace would round differently
        ts = s.dpm_solver_timesteps(steps)
        assert len(ts) == steps and all(a > b for a, b in zip(ts, ts[1:], strict=False)) and ts[-1] >= 1


def test_guidance_and_labels_refused_when_unconditional():
    m = tiny_model()
    with pytest.raises(GenaiError):
        m.sample(2, guidance=3.0)
    with pytest.raises(GenaiError):
        m.sample(2, labels=torch.tensor([0, 1]))
    with pytest.raises(GenaiError):
        DDPM(Config(**{**DDPM.tiny, "guidance": 2.0}), SPEC)


def test_class_conditional_needs_labels_in_the_data():
    with pytest.raises(GenaiError):
        DDPM(Config(**{**DDPM.tiny, "class_conditional": True}), SPEC)


def test_conditional_sampling_follows_labels():
    m = tiny_model(LABELLED, class_conditional=True)
    kw = dict(sampler="ddim", steps=5)
    a = m.sample(3, generator=torch.Generator().manual_seed(0), labels=torch.zeros(3, dtype=torch.long), **kw)
    b = m.sample(3, generator=torch.Generator().manual_seed(0), labels=torch.ones(3, dtype=torch.long), **kw)
    assert not torch.allclose(a, b)
    # One int for all, the default cycle and guidance all run; bad labels and guidance are refused.
    assert m.sample(3, labels=2, guidance=3.0, **kw).shape == (3, 1, 8, 8)
    assert m.sample(4, guidance=0.0, **kw).shape == (4, 1, 8, 8)
    for bad in [dict(labels=torch.tensor([0, 3, 1])), dict(labels=torch.tensor([0, 1])), dict(guidance=-1.0)]:
        with pytest.raises(GenaiError):
            m.sample(3, **kw, **bad)
    loss = m.loss(fixed_batch(LABELLED))["loss"]
    assert torch.isfinite(loss)


def test_loss_falls_and_grads_reach_every_parameter():
    m = tiny_model()
    batch = fixed_batch()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = m.loss(batch)["loss"]
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("prediction,weighting", [("eps", "min_snr"), ("v", "none"), ("v", "min_snr"),
                                                  ("x0", "none"), ("x0", "min_snr")])
def test_loss_falls_for_every_target_and_weighting(prediction, weighting):
    m = tiny_model(prediction=prediction, loss_weighting=weighting)
    batch = fixed_batch()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # the same t and noise every step: the loss of one fixed draw must fall
        opt.zero_grad()
        loss = m.loss(batch)["loss"]
        assert torch.isfinite(loss)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    assert losses[-1] < 0.8 * losses[0], losses


def test_loss_is_the_weighted_mse_against_the_target():
    m = tiny_model(timesteps=50, prediction="v", loss_weighting="min_snr", min_snr_gamma=2.0)
    batch = fixed_batch()
    torch.manual_seed(3)
    loss = m.loss(batch)["loss"]
    torch.manual_seed(3)  # replay the draws of loss(): t, then the noise
    x0 = batch[0] * 2 - 1
    t = torch.randint(0, 50, (x0.shape[0],))
    noise = torch.randn_like(x0)
    s = m.schedule
    x_t = s.add_noise(x0, noise, t)
    snr = (s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])).view(-1, 1, 1, 1)
    per_image = ((m.unet(x_t, t) - s.velocity(x0, noise, t)) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(loss, (snr.clamp(max=2.0) / (snr + 1) * per_image).mean(), rtol=1e-5)


def test_bad_training_options_are_one_line_errors():
    from genai_cli.config import from_dict

    for bad in [dict(prediction="noise"), dict(loss_weighting="snr"), dict(min_snr_gamma=0.0)]:
        with pytest.raises(GenaiError) as err:
            DDPM(Config(**{**DDPM.tiny, **bad}), SPEC)
        assert "\n" not in str(err.value)
        with pytest.raises(GenaiError) as err:  # the YAML path: the Literal types refuse at load time
            cfg = from_dict({"model": {"family": "ddpm", **DDPM.tiny, **bad}})
            DDPM(cfg.model, SPEC)
        assert "\n" not in str(err.value) and next(iter(bad)) in str(err.value)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_guidance_mixes_the_network_outputs_for_any_target(prediction):
    """Guidance is linear in the output, so the guided eps is eps_uncond + w (eps_cond - eps_uncond) for any target."""
    m = tiny_model(LABELLED, class_conditional=True, prediction=prediction).eval()
    x, labels, t, w = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]), 12, 3.0
    with torch.no_grad():
        eps, x0 = m.denoise(x, t, labels, guidance=w)
        eps_c, x0_c = m.denoise(x, t, labels)
        eps_u, x0_u = m.denoise(x, t, labels, guidance=0.0)
    assert torch.allclose(eps, eps_u + w * (eps_c - eps_u), atol=1e-4)
    assert torch.allclose(x0, x0_u + w * (x0_c - x0_u), atol=1e-4)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_variational_bound_reads_any_target(prediction):
    m = tiny_model(prediction=prediction)
    bound = m.variational_bound(fixed_batch(), timesteps_per_image=3, generator=torch.Generator().manual_seed(0))
    assert bound.shape == (8,) and bool(torch.isfinite(bound).all())


def test_bf16_autocast_and_channels_last():
    m = tiny_model().to(memory_format=torch.channels_last)
    x, y = fixed_batch()
    batch = (x.contiguous(memory_format=torch.channels_last), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.loss(batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # channels_last weights sample the same images as the default layout.
    ref = tiny_model()
    kw = dict(sampler="ddim", steps=4)
    assert torch.allclose(m.sample(2, generator=torch.Generator().manual_seed(0), **kw),
                          ref.sample(2, generator=torch.Generator().manual_seed(0), **kw), atol=1e-4)


# -- UNet --------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size,mults", [(1, 8, [1, 2]), (3, 12, [1, 2, 2]), (1, 28, [1, 2, 2])])
def test_unet_output_shape(channels, size, mults):
    net = UNet(channels, 8, mults, num_res_blocks=1, attention_levels=[1], num_classes=2)
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0, 5]), torch.tensor([0, 2])).shape == x.shape
    assert net(x, torch.tensor([0, 5])).shape == x.shape  # no labels: the null row


def test_unet_rejects_bad_image_size():
    net = UNet(1, 8, [1, 2, 2])
    with pytest.raises(GenaiError, match="28 or 32"):
        net(torch.randn(1, 1, 30, 30), torch.tensor([0]))
    with pytest.raises(GenaiError, match="image size 30"):
        DDPM(Config(), ImageSpec(channels=1, size=30))
    with pytest.raises(GenaiError):
        UNet(1, 8, [1, 2], attention_levels=[2])


def test_norm_groups_divide_channels():
    chans = (8, 32, 48, 64, 96, 128, 256, 3)
    assert [norm_groups(c) for c in chans] == [2, 8, 12, 16, 24, 32, 32, 1]
    assert all(c % norm_groups(c) == 0 for c in range(1, 300))


@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_upsample_equals_nearest_interpolation(channels_last):
    """The UNet's fast 2x upsampling is nearest-neighbour interpolation, and keeps the input's memory format."""
    import torch.nn.functional as F

    from genai_cli.nn.unet import Upsample

    up = Upsample(4)
    x = torch.randn(3, 4, 5, 7)
    if channels_last:
        up, x = up.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    out = up(x)
    torch.testing.assert_close(out, up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_bound_decoder_keeps_far_tails_in_log_space():
    """L0's discretised Gaussian (nn.discretized, shared with the VAE): equal to the CDF differences where those
    are accurate, and finite far below the 1e-12 floor a clamped probability would report instead."""
    from genai_cli.nn.discretized import discretized_log_prob

    x = torch.tensor([0.0, 100 / 255, 1.0], dtype=torch.float64)
    mean, std = torch.tensor([0.02, 0.4, 0.97], dtype=torch.float64), 0.05
    lo = torch.where(x < 1e-6, -torch.inf, x - 0.5 / 255)
    hi = torch.where(x > 1 - 1e-6, torch.inf, x + 0.5 / 255)
    direct = (torch.special.ndtr((hi - mean) / std) - torch.special.ndtr((lo - mean) / std)).log()
    torch.testing.assert_close(discretized_log_prob(x, mean, torch.tensor(std).log(), "gaussian"), direct)
    far = discretized_log_prob(torch.tensor([0.0]), torch.tensor([0.9]), torch.tensor(0.01).log(), "gaussian")
    assert torch.isfinite(far).all() and far.item() < -1000  # the old clamp would have said log(1e-12) = -27.6
