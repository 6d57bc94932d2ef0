"""Family-specific tests of the latent-variable families: autoencoder, vae, dcgan (+ minibatch layers), cgan.

The registry-wide tests cover the shared contract (loss falls, gradients, sample shape/range, seeds, save/load);
these check what is particular to each family, on 12x12 images and batches of 8.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from genai_cli import models  # noqa: F401  (registers the families)
from genai_cli.capabilities import has
from genai_cli.errors import GenaiError
from genai_cli.models.base import ImageSpec, Stepper
from genai_cli.models.cgan import CGAN
from genai_cli.models.dcgan import (
    DCGAN,
    MinibatchDiscrimination,
    MinibatchStdDev,
    discriminator_loss,
    generator_loss,
)
from genai_cli.models.vae import VAE, discretized_log_prob, free_bits_kl, gaussian_kl, kl_beta
from genai_cli.nn.conv import ConvDecoder, ConvEncoder, level_sizes
from genai_cli.registry import MODELS

torch.set_num_threads(1)
SIZE = 12
SPEC = ImageSpec(channels=1, size=SIZE, num_classes=10)
BINARY = ImageSpec(channels=1, size=SIZE, num_classes=10, binary=True)  # batch() draws binary pixels
# The latent families of this file, from their declarations: every family that walks its latent space, those that
# also encode real images (walks between them), and those that do not (the GANs).
WALKERS = [f for f in MODELS.names() if has(MODELS.get(f), "walk")]
ENCODING_WALKERS = [f for f in WALKERS if has(MODELS.get(f), "encode")]
DECODER_ONLY_WALKERS = [f for f in WALKERS if not has(MODELS.get(f), "encode")]
ROOT = Path(__file__).resolve().parent.parent


def make(name: str, spec: ImageSpec = SPEC, **overrides):
    cls = MODELS.get(name)
    torch.manual_seed(0)
    return cls(cls.Config(**{**cls.tiny, **overrides}), spec)


def batch(n: int = 8, spec: ImageSpec = SPEC, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, spec.channels, spec.size, spec.size, generator=g) > 0.6).float()
    return x, torch.randint(0, max(spec.num_classes, 1), (n,), generator=g)


def train_cfg(lr: float = 1e-3):
    return SimpleNamespace(lr=lr, betas=[0.9, 0.999], weight_decay=0.0)


# ---------------------------------------------------------------------------------------------
# Shared conv stacks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 12, 28, 7])
def test_conv_stacks_round_trip_any_size(size):
    assert level_sizes(28, 3) == [28, 14, 7, 4]
    enc = ConvEncoder(2, size, [4, 8])
    dec = ConvDecoder(5, 3, size, [4, 8])
    assert enc(torch.rand(3, 2, size, size)).shape == (3, enc.feature_dim)
    assert dec(torch.rand(3, 5)).shape == (3, 3, size, size)


def test_bad_widths_are_one_line_errors():
    with pytest.raises(GenaiError, match="model.widths"):
        make("vae", widths=[])
    with pytest.raises(GenaiError, match="latent_dim"):
        make("autoencoder", latent_dim=0)


# ---------------------------------------------------------------------------------------------
# VAE: reparameterisation, KL, free bits, annealing, active units, bounds
# ---------------------------------------------------------------------------------------------
def test_reparameterisation_gradients_reach_mean_and_variance_heads():
    model = make("vae")
    model.loss(batch())["loss"].backward()
    for head in (model.mean_head, model.logvar_head):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
        assert head.bias.grad.abs().sum() > 0


def test_closed_form_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(5, 7, generator=g) * 2, torch.randn(5, 7, generator=g)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p))


def test_free_bits_floors_each_dimension():
    kl = torch.tensor([[0.01, 2.0, 0.3], [0.03, 1.0, 0.1]], requires_grad=True)  # (B=2, D=3)
    floored = free_bits_kl(kl, 0.5)
    torch.testing.assert_close(floored, torch.tensor([0.5, 1.5, 0.5]))
    floored.sum().backward()
    # Below the floor a dimension gets no gradient (nothing pushes it further towards the prior).
    torch.testing.assert_close(kl.grad, torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.5, 0.0]]))
    torch.testing.assert_close(free_bits_kl(kl, 0.0), kl.mean(0))


def test_free_bits_in_the_loss():
    x = batch()
    plain, floored = make("vae", BINARY), make("vae", BINARY, free_bits=100.0)  # same weights (same seed)
    torch.manual_seed(3)
    a = plain.loss(x)
    torch.manual_seed(3)
    b = floored.loss(x)
    torch.testing.assert_close(b["loss"], b["recon"] + 100.0 * 4)  # every one of the 4 dims at the floor
    torch.testing.assert_close(a["nelbo"], b["nelbo"])  # the reported -ELBO ignores free bits


def test_kl_annealing_schedule():
    assert kl_beta(0, 2.0, 100) == 0.0
    assert kl_beta(50, 2.0, 100) == pytest.approx(1.0)
    assert kl_beta(100, 2.0, 100) == 2.0
    assert kl_beta(10_000, 2.0, 100) == 2.0
    assert kl_beta(0, 2.0, 0) == 2.0  # no warm-up: the target from the start
    model = make("vae", kl_warmup_steps=10, beta=1.0)
    model.current_step = 0
    out = model.loss(batch())
    assert float(out["beta"]) == 0.0
    torch.testing.assert_close(out["loss"], out["recon"])
    model.current_step = 10
    assert float(model.loss(batch())["beta"]) == 1.0


def test_active_units_zero_when_posterior_ignores_input():
    model = make("vae").eval()
    with torch.no_grad():
        model.mean_head.weight.zero_()  # mu(x) = bias for every x
    diag = model.latent_diagnostics([batch(seed=0), batch(seed=1)])
    assert diag["active_units"] == 0
    assert len(diag["kl_per_dim"]) == 4
    assert model.validation_metrics(iter([batch()]))["active_units"] == 0.0


def test_active_units_count_dimensions_that_vary():
    model = make("vae").eval()
    with torch.no_grad():
        model.mean_head.weight.mul_(1000)  # posterior means spread widely over the data
    assert model.latent_diagnostics([batch(16)])["active_units"] == 4


def test_elbo_iwae_and_validation_metrics():
    model = make("vae", BINARY).eval()
    x = batch()
    torch.manual_seed(0)
    with torch.no_grad():
        elbo = torch.stack([model.log_likelihood(x) for _ in range(20)]).mean(0)  # (B,)
    g = torch.Generator().manual_seed(0)
    iwae = model.iwae_bound(x, 50, generator=g)
    assert iwae.shape == elbo.shape == (8,)
    assert float(iwae.mean()) >= float(elbo.mean()) - 0.05  # the IWAE bound is the tighter one
    assert float(iwae.max()) <= 0.0  # a Bernoulli likelihood of binary data is a probability
    # k = 1 in expectation is the ELBO
    k1 = torch.stack([model.iwae_bound(x, 1, generator=g) for _ in range(200)]).mean(0)
    assert abs(float(k1.mean() - elbo.mean())) < 0.5
    metrics = model.validation_metrics(b for b in [x, batch(seed=1)])  # a one-shot generator, as the loop passes
    for key in ("loss", "nll_nats", "bits_per_dim", "kl_total", "active_units", "iwae_nats", "iwae_bits_per_dim"):
        assert math.isfinite(metrics[key]), key
    assert metrics["iwae_bits_per_dim"] == pytest.approx(metrics["iwae_nats"] / (SIZE * SIZE * math.log(2)))


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_discretised_decoders_put_mass_one_on_the_256_levels(kind):
    """The Gaussian/Laplace decoders are distributions over the 256 grey levels: their bin masses sum to 1, each
    equals F(hi) - F(lo) of the continuous distribution, and tails far from the mean stay finite, gradients too."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    for mean, scale in [(0.0, 1e-3), (0.3, 0.05), (0.5, 0.1), (0.97, 1.0), (1.0, 20.0), (-0.4, 0.2)]:
        m = torch.tensor(mean, dtype=torch.float64, requires_grad=True)
        log_s = torch.tensor(math.log(scale), dtype=torch.float64, requires_grad=True)
        lp = discretized_log_prob(levels, m, log_s, kind)  # (256,)
        assert float(lp.detach().exp().sum()) == pytest.approx(1.0, abs=1e-9), (mean, scale)
        lp.sum().backward()
        assert torch.isfinite(lp).all() and torch.isfinite(m.grad) and torch.isfinite(log_s.grad)
        dist = (torch.distributions.Normal if kind == "gaussian" else torch.distributions.Laplace)(mean, scale)
        inner = slice(1, 255)  # the end bins reach to -inf / +inf
        lo, hi = levels[inner] - 0.5 / 255, levels[inner] + 0.5 / 255
        mass = dist.cdf(hi) - dist.cdf(lo)
        ok = mass > 1e-6  # where the float64 difference of two CDFs is itself accurate
        torch.testing.assert_close(lp.detach()[inner][ok].exp(), mass[ok], rtol=1e-5, atol=0)


def test_continuous_decoders_bound_the_probability_of_8bit_images():
    """Discretised, a Gaussian/Laplace decoder's ELBO is a log-probability (<= 0) of the 8-bit images, so its
    bits/dim is reported; the IWAE bound sits above it."""
    grey = (torch.randint(0, 256, (8, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0)) / 255.0,
            torch.zeros(8, dtype=torch.long))
    for decoder in ("gaussian", "l1"):
        model = make("vae", decoder=decoder).eval()
        assert has(model, "log_likelihood")
        torch.manual_seed(0)
        with torch.no_grad():
            assert float(model.log_likelihood(grey).max()) <= 0.0
        metrics = model.validation_metrics([grey])
        assert 0 < metrics["bits_per_dim"] and metrics["iwae_nats"] <= metrics["nll_nats"] + 1.0


def test_bernoulli_decoder_on_grey_levels_reports_no_likelihood():
    """Binary cross-entropy on grey levels is no likelihood (the Bernoulli does not normalise over [0, 1]): the
    model trains on it and reports it as the reconstruction error, with no ELBO, IWAE bound or bits/dim."""
    grey_model, binary_model = make("vae"), make("vae", BINARY)
    assert not has(grey_model, "log_likelihood") and has(binary_model, "log_likelihood")
    assert grey_model.log_likelihood is None  # the method is withdrawn with the declaration
    x = (torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), torch.zeros(8, dtype=torch.long))
    out = grey_model.loss(x)
    assert "nelbo" not in out and math.isfinite(float(out["recon"]))
    metrics = grey_model.eval().validation_metrics([x])
    assert {"loss", "recon", "kl_total", "active_units"} <= set(metrics)
    assert not {"nll_nats", "bits_per_dim", "iwae_nats", "iwae_bits_per_dim", "nelbo"} & set(metrics)
    with pytest.raises(GenaiError, match="no likelihood"):
        grey_model.iwae_bound(x, 4)
    assert "bits_per_dim" in binary_model.eval().validation_metrics([batch()])


@pytest.mark.parametrize("decoder", ["gaussian", "l1"])
def test_continuous_decoders(decoder):
    model = make("vae", decoder=decoder)
    out = model.loss(batch())
    out["loss"].backward()
    assert model.log_scale.grad is not None  # the shared scale is learned
    fixed = make("vae", decoder=decoder, scale=0.5)
    assert "log_scale" not in dict(fixed.named_parameters())
    assert math.isfinite(float(fixed.loss(batch())["loss"].detach()))


def test_vae_temperature():
    model = make("vae").eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    zero = model.sample(3, generator=g(), temperature=0.0)
    torch.testing.assert_close(zero[0], zero[2])  # all at the prior mean
    assert not torch.equal(model.sample(3, generator=g()), zero)
    with pytest.raises(GenaiError, match="temperature"):
        model.sample(2, temperature=-1.0)
    with pytest.raises(TypeError):
        model.sample(2, top_k=3)


# ---------------------------------------------------------------------------------------------
# Walks and the latent plot (autoencoder, vae, gans)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENCODING_WALKERS)
def test_walk_between_real_images(name):
    model = make(name).eval()
    images, _ = batch(6)
    out = model.walk(3, 5, images=images)
    assert out.shape == (15, 1, SIZE, SIZE) and 0 <= float(out.min()) and float(out.max()) <= 1
    # The walk's ends decode the images' own latents.
    ends = torch.sigmoid(model.decode(model.encode(images)))
    torch.testing.assert_close(out[0], ends[0])
    torch.testing.assert_close(out[4], ends[1])
    torch.testing.assert_close(out[14], ends[5])
    traversal = model.walk(2, 4, images=images[:2], dim=1)  # a traversal starts at one image per row
    assert traversal.shape == (8, 1, SIZE, SIZE)
    assert model.walk(2, 3, generator=torch.Generator().manual_seed(0), dim=0).shape == (6, 1, SIZE, SIZE)
    with pytest.raises(GenaiError, match="latent dimension 9 out of range"):
        model.walk(2, 3, dim=9)
    with pytest.raises(GenaiError, match="needs 8 images"):
        model.walk(4, 3, images=images)
    with pytest.raises(GenaiError, match="temperature scales random latents"):
        model.walk(3, 5, images=images, temperature=0.5)


@pytest.mark.parametrize("name", WALKERS)
def test_random_walk_ends_are_samples_and_honour_temperature(name):
    """Row i of a random interpolation runs from sample(2 * rows)[2i] to [2i + 1] (same generator, same
    temperature): the walk interpolates between exactly the latents sample() draws."""
    model = make(name).eval()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    rows, steps = 3, 5
    walk = model.walk(rows, steps, generator=g(), temperature=0.5).view(rows, steps, 1, SIZE, SIZE)
    extra = {"labels": model.walk_labels(rows, 1).repeat_interleave(2)} if name == "cgan" else {}
    ends = model.sample(2 * rows, generator=g(), temperature=0.5, **extra)
    torch.testing.assert_close(walk[:, 0], ends[0::2])
    torch.testing.assert_close(walk[:, -1], ends[1::2])
    hot = model.walk(rows, steps, generator=g()).view(rows, steps, 1, SIZE, SIZE)
    assert not torch.allclose(hot[:, 0], walk[:, 0])  # temperature reaches the walk
    between = walk[:, 1:-1]
    assert not torch.allclose(between, walk[:, :1].expand_as(between))  # and it moves
    traversal = model.walk(rows, steps, generator=g(), dim=0, temperature=0.5).view(rows, steps, 1, SIZE, SIZE)
    assert not torch.allclose(traversal, walk)  # interpolation and traversal are different walks


def test_walk_latents_traverse_one_coordinate():
    from genai_cli.nn.latent import walk_latents

    start = torch.arange(6.0).view(2, 3)  # two rows of a 3-d latent
    z = walk_latents(2, 4, latent_dim=3, draw=lambda k, t: start[:k] * t, dim=1).view(2, 4, 3)
    torch.testing.assert_close(z[:, :, 1], torch.linspace(-3, 3, 4).expand(2, 4))
    torch.testing.assert_close(z[:, :, [0, 2]], start[:, None, [0, 2]].expand(2, 4, 2))
    mean, std = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.5, 1.0])
    z = walk_latents(1, 3, latent_dim=3, draw=lambda k, t: start[:k], dim=1, mean=mean, std=std)
    torch.testing.assert_close(z[:, 1], torch.tensor([-0.5, 1.0, 2.5]))  # mean +- 3 std of that coordinate
    line = walk_latents(1, 3, latent_dim=3, draw=lambda k, t: start[:k] * t, temperature=2.0)
    torch.testing.assert_close(line, torch.stack([start[0] * 2, (start[0] + start[1]), start[1] * 2]))


@pytest.mark.parametrize("name", DECODER_ONLY_WALKERS)
def test_gan_walks(name):
    model = make(name).eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = model.walk(2, 4, generator=g())
    assert a.shape == (8, 1, SIZE, SIZE)
    torch.testing.assert_close(a, model.walk(2, 4, generator=g()))
    assert model.walk(2, 4, generator=g(), dim=3).shape == (8, 1, SIZE, SIZE)
    with pytest.raises(GenaiError, match="no encoder"):
        model.walk(1, 4, images=batch()[0])
    assert {"interpolate", "traverse_dim", "temperature"} <= model.sample_options
    assert "traverse" not in model.sample_options  # walking between real images needs an encoder


def test_cgan_walk_labels_per_row():
    model = make("cgan").eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    sevens = model.walk(2, 3, generator=g(), labels=7)
    assert not torch.allclose(sevens, model.walk(2, 3, generator=g()))
    torch.testing.assert_close(sevens, model.walk(2, 3, generator=g(), labels=torch.tensor([7, 7])))
    with pytest.raises(GenaiError, match="out of range"):
        model.walk(2, 3, labels=10)


def test_autoencoder_tracks_latent_statistics():
    model = make("autoencoder")
    x = batch(16)
    model.loss(x)  # train mode: the first batch sets the statistics exactly
    z = model.encode(x[0]).detach()
    torch.testing.assert_close(model.latent_mean, z.mean(0))
    torch.testing.assert_close(model.latent_std, z.std(0))
    model.eval()
    model.loss(x)
    assert int(model.latent_batches) == 1  # validation does not move them


def test_plot_latents(tmp_path):
    from genai_cli.evaluation.latent_plot import plot_latents

    model = make("vae")
    x, y = batch(40)
    path = plot_latents(model, x, y, tmp_path / "sub" / "latents.png")
    assert path.is_file() and path.stat().st_size > 1000
    assert model.training  # the plot restores the mode it found
    with pytest.raises(GenaiError, match="no encoder"):
        plot_latents(make("dcgan"), x, y, tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------
# GANs: losses, minibatch layers, the two-optimizer step
# ---------------------------------------------------------------------------------------------
def test_gan_losses_match_their_definitions():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    torch.testing.assert_close(discriminator_loss(real, fake),
                               -(d_real.log().mean() + (1 - d_fake).log().mean()))
    torch.testing.assert_close(generator_loss(fake, "non_saturating"), -d_fake.log().mean())
    torch.testing.assert_close(generator_loss(fake, "minimax"), (1 - d_fake).log().mean())
    # The minimax loss's gradient vanishes when D rejects the fakes confidently; the non-saturating one does not.
    confident = torch.tensor([-8.0], requires_grad=True)
    grads = [torch.autograd.grad(generator_loss(confident, k), confident)[0].abs().item()
             for k in ("minimax", "non_saturating")]
    assert grads[0] < 1e-3 < 0.9 < grads[1]


def test_minibatch_layers_see_a_collapsed_batch():
    torch.manual_seed(0)
    layer = MinibatchDiscrimination(6, kernels=4, kernel_dim=3)
    same = torch.randn(1, 6).repeat(5, 1)
    diverse = torch.randn(5, 6) * 10
    with torch.no_grad():
        o_same, o_diverse = layer(same)[:, 6:], layer(diverse)[:, 6:]
    torch.testing.assert_close(o_same, torch.full((5, 4), 4.0))  # exp(0) from each of the 4 others
    assert float(o_diverse.max()) < 4.0
    std = MinibatchStdDev(6)
    assert std(same).shape == (5, 7)
    assert float(std(same)[0, 6]) < 1e-3 < float(std(diverse)[0, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(diverse.bfloat16()).shape == (5, 10)


class RecordingStepper(Stepper):
    """Records which parameters each optimizer step changed."""

    def __init__(self, model):
        super().__init__(grad_clip=1.0)
        self.model = model
        self.changed: list[set[str]] = []

    def step(self, optimizer, params):
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        norm = super().step(optimizer, params)
        self.changed.append({n for n, p in self.model.named_parameters() if not torch.equal(before[n], p)})
        return norm


@pytest.mark.parametrize("name,minibatch", [("dcgan", "features"), ("dcgan", "stddev"), ("cgan", "none")])
def test_gan_step_updates_one_player_at_a_time(name, minibatch):
    model = make(name, minibatch=minibatch)
    opts = model.configure_optimizers(train_cfg())
    assert set(opts) == {"generator", "discriminator"}
    stepper = RecordingStepper(model)
    logs = model.train_step(batch(), opts, stepper)
    d_step, g_step = stepper.changed
    assert d_step and all(n.startswith("discriminator.") for n in d_step)
    assert g_step and all(n.startswith("generator.") for n in g_step)
    assert len(d_step) == len(list(model.discriminator.parameters()))
    assert all(p.requires_grad for p in model.parameters())  # D is unfrozen after the G step
    for key in ("loss", "loss_d", "loss_g", "d_x", "d_g_z", "grad_norm"):
        assert math.isfinite(logs[key]), key


def test_gan_optimizer_states_save_and_resume():
    x = batch()
    model = make("dcgan")
    opts = model.configure_optimizers(train_cfg())
    stepper = Stepper()
    torch.manual_seed(1)
    model.train_step(x, opts, stepper)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizers": {k: o.state_dict() for k, o in opts.items()}}, buf)
    torch.manual_seed(2)
    model.train_step(x, opts, stepper)  # the uninterrupted run
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state["optimizers"]) == {"generator", "discriminator"}
    assert all(s["state"] for s in state["optimizers"].values())  # both Adams have moments to keep
    resumed = make("dcgan")
    resumed.load_state_dict(state["model"])
    ropts = resumed.configure_optimizers(train_cfg())
    for k, o in ropts.items():
        o.load_state_dict(state["optimizers"][k])
    torch.manual_seed(2)
    resumed.train_step(x, ropts, stepper)
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_gan_optimizers_use_the_config_betas():
    model = make("dcgan", beta1=0.3)
    opts = model.configure_optimizers(SimpleNamespace(lr=5e-4, betas=[0.9, 0.999], weight_decay=0.0))
    group = opts["generator"].param_groups[0]
    assert group["betas"] == (0.3, 0.999) and group["lr"] == 5e-4


def test_gan_temperature_zero_gives_one_image():
    model = make("dcgan").eval()
    out = model.sample(3, generator=torch.Generator().manual_seed(0), temperature=0)
    torch.testing.assert_close(out[0], out[1])


def test_discriminator_is_batch_statistics_only():
    model = make("dcgan", minibatch="none")
    assert not any("running" in n for n, _ in model.discriminator.named_buffers())
    x, y = batch()
    model.train()
    a = model.discriminate(x, y)
    model.eval()
    torch.testing.assert_close(model.discriminate(x, y), a)  # eval mode is training mode for D


# ---------------------------------------------------------------------------------------------
# cGAN labels
# ---------------------------------------------------------------------------------------------
def test_cgan_label_changes_the_sample():
    model = make("cgan").eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    threes = model.sample(4, generator=g(), labels=torch.full((4,), 3))
    sevens = model.sample(4, generator=g(), labels=7)  # an int means every sample
    assert not torch.allclose(threes, sevens)
    torch.testing.assert_close(model.sample(4, generator=g(), labels=3), threes)
    default = model.sample(12, generator=g())
    explicit = model.sample(12, generator=g(), labels=torch.arange(12) % 10)
    torch.testing.assert_close(default, explicit)  # the default: one of each class in turn


def test_cgan_label_errors():
    model = make("cgan").eval()
    with pytest.raises(GenaiError, match=r"label 10 out of range; valid labels are 0\.\.9"):
        model.sample(2, labels=10)
    with pytest.raises(GenaiError, match="label -1 out of range"):
        model.sample(2, labels=torch.tensor([0, -1]))
    with pytest.raises(GenaiError, match="3 labels for 2 samples"):
        model.sample(2, labels=torch.tensor([0, 1, 2]))
    for err in (GenaiError,):
        with pytest.raises(err, match="labelled dataset"):
            make("cgan", spec=ImageSpec(1, SIZE, 0))
    # --label on an unconditional family: the CLI refuses it (not an option), and sample() does too.
    assert "labels" in CGAN.sample_options and "labels" not in DCGAN.sample_options
    assert "labels" not in VAE.sample_options
    with pytest.raises(TypeError):
        make("dcgan").sample(2, labels=3)


def test_cgan_cli_label_errors_are_one_line(tmp_path):
    """Through the real CLI: an out-of-range --label, and --label on an unconditional family."""
    from typer.testing import CliRunner

    from genai_cli.cli import app

    runner = CliRunner()
    for family in ("cgan", "dcgan"):
        cfg = tmp_path / f"{family}.yaml"
        cfg.write_text(yaml.safe_dump({
            "model": {"family": family, **MODELS.get(family).tiny},
            "data": {"name": "digits", "image_size": 8, "limit": 64},
            "train": {"max_steps": 2, "batch_size": 8, "eval_every": 100, "checkpoint_every": 100,
                      "sample_every": 100, "sample_n": 4, "ema_decay": None},
        }))
        result = runner.invoke(app, ["train", str(cfg), "--name", family, "--runs-dir", str(tmp_path), "-q"])
        assert result.exit_code == 0, result.output
    for family, label, expected in (("cgan", "12", "out of range"), ("dcgan", "3", "--label")):
        result = runner.invoke(app, ["sample", str(tmp_path / family), "--label", label, "-n", "4",
                                     "--out", str(tmp_path / f"{family}.png")])
        assert result.exit_code != 0
        message = result.output.strip()
        assert expected in message and "\n" not in message and "Traceback" not in message, message
    result = runner.invoke(app, ["sample", str(tmp_path / "cgan"), "--label", "3", "-n", "4",
                                 "--out", str(tmp_path / "threes.png")])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# Mixed precision and the bundled configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WALKERS)
def test_loss_under_bf16_autocast(name):
    model = make(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(batch())
    assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item())
    out["loss"].backward()


@pytest.mark.parametrize("name", ["autoencoder_mnist", "vae_mnist", "dcgan_mnist", "dcgan_minibatch_mnist",
                                  "cgan_mnist"])
def test_bundled_configs_build(name):
    from genai_cli.config import load_config

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.data.name == "mnist5k"
    model = MODELS.get(cfg.family)(cfg.model, ImageSpec(1, 28, 10))
    assert model.sample(2).shape == (2, 1, 28, 28)
