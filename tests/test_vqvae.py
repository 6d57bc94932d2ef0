"""The VQ-VAE family and its quantisers (genai_cli/nn/quantize.py): what the codebook and FSQ promise."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from helpers import SPEC, tiny_model

from genai_cli.api import load_checkpoint
from genai_cli.errors import GenaiError
from genai_cli.models.base import Stepper
from genai_cli.nn.quantize import FSQ, CodebookQuantizer, code_stats
from genai_cli.runs import save_checkpoint


def grid(b=2, d=3, h=4, w=4, seed=0, scale=1.0):
    return torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed)) * scale


# -- the codebook -------------------------------------------------------------------------------
@pytest.mark.parametrize("ema", [True, False], ids=["ema", "loss"])
def test_quantised_vectors_are_codebook_entries(ema):
    torch.manual_seed(0)
    q = CodebookQuantizer(8, 3, ema=ema, kmeans_init=False)
    z = grid()
    z_q, idx, losses = q.eval()(z)
    assert idx.shape == (2, 4, 4) and idx.dtype == torch.long
    rows = z_q.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(rows, q.embed.detach()[idx.flatten()], atol=1e-6)
    # Each vector went to its nearest code.
    dist = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3), q.embed.detach())
    assert torch.equal(idx.flatten(), dist.argmin(1))
    assert set(losses) == ({"commitment"} if ema else {"codebook", "commitment"})
    # The pure path and codes() give exactly the same vectors.
    z_pure, idx_pure = q.quantize(z)
    assert torch.equal(idx_pure, idx) and torch.equal(q.codes(idx), z_pure)


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    q = CodebookQuantizer(8, 3, beta=0.0, ema=True, kmeans_init=False)
    z = grid().requires_grad_(True)
    z_q, _, _ = q.eval()(z)
    weight = torch.randn_like(z_q)
    (z_q * weight).sum().backward()
    # With beta 0 the only path is the straight-through copy: dL/dz_e = dL/dz_q exactly.
    assert torch.allclose(z.grad, weight)


def test_codebook_loss_trains_the_codes_and_commitment_the_encoder():
    torch.manual_seed(0)
    q = CodebookQuantizer(8, 3, beta=0.25, ema=False, kmeans_init=False, restart_dead=False)
    z = grid().requires_grad_(True)
    _, _, losses = q.eval()(z)
    losses["codebook"].backward(retain_graph=True)
    assert z.grad is None and q.embed.grad.abs().sum() > 0  # sg[z_e]: the codebook term moves codes only
    q.embed.grad = None
    losses["commitment"].backward()
    assert q.embed.grad is None and z.grad.abs().sum() > 0  # sg[e]: the commitment term moves the encoder only


def test_ema_update_moves_a_code_toward_the_mean_of_its_vectors():
    q = CodebookQuantizer(2, 2, ema=True, decay=0.9, kmeans_init=False, restart_dead=False)
    with torch.no_grad():
        q.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        q.embed_sum.copy_(q.embed * q.cluster_size[:, None])
    # Every vector is nearest to code 0; their mean is (1, 2).
    vectors = torch.tensor([[0.5, 1.5], [1.5, 2.5], [1.0, 2.0], [1.0, 2.0]])
    z = vectors.view(1, 2, 2, 2).permute(0, 3, 1, 2)  # (1, D=2, 2, 2)
    mean = vectors.mean(0)
    before = float((q.embed[0] - mean).norm())
    q.train()(z)
    after = float((q.embed[0] - mean).norm())
    assert after < before
    # Exactly appendix A.1: N = 0.9 * 1 + 0.1 * 4, m = 0.9 * e + 0.1 * sum, e = m / N (up to Laplace smoothing).
    assert torch.allclose(q.embed[0], (0.1 * vectors.sum(0)) / 1.3, atol=1e-3)
    assert torch.allclose(q.embed[1], torch.tensor([10.0, 10.0]), atol=1e-3)  # an unused code stays put
    for _ in range(200):
        q(z)
    assert torch.allclose(q.embed[0], mean, atol=1e-3)


def test_dead_code_is_restarted_at_an_encoder_output():
    q = CodebookQuantizer(4, 2, ema=True, decay=0.5, kmeans_init=False, restart_dead=True, dead_code_threshold=0.5)
    far = torch.tensor([100.0, -100.0])
    with torch.no_grad():
        q.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0], [100.0, -100.0]]))
        q.embed_sum.copy_(q.embed * q.cluster_size[:, None])
    z = grid(1, 2, 3, 3, seed=1, scale=0.5)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 2)
    q.train()(z)  # code 3 gets nothing: its usage 1 -> 0.5, not below the threshold yet
    assert torch.allclose(q.embed[3], far, rtol=1e-3)  # (Laplace smoothing moves it by ~1e-5)
    q(z)  # 0.5 -> 0.25: dead, restarted at one of this batch's encoder outputs
    assert (q.embed[3] - far).abs().max() > 50
    assert (rows - q.embed[3]).abs().sum(1).min() < 1e-6
    assert float(q.cluster_size[3]) == 1.0


def test_kmeans_initialisation_spreads_the_codes_over_the_data():
    torch.manual_seed(0)
    centres = torch.tensor([[-5.0, -5.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    g = torch.Generator().manual_seed(0)
    rows = centres.repeat(16, 1) + 0.1 * torch.randn(64, 2, generator=g)
    z = rows.view(1, 8, 8, 2).permute(0, 3, 1, 2)
    q = CodebookQuantizer(4, 2, ema=True, kmeans_init=True, restart_dead=False)
    q.eval()(z)
    assert not bool(q.initialised)  # eval mode changes nothing
    _, idx, _ = q.train()(z)
    assert bool(q.initialised)
    assert float(code_stats(idx, 4)["usage"]) == 1.0
    assert torch.cdist(centres, q.embed).min(1).values.max() < 0.5


# -- FSQ ----------------------------------------------------------------------------------------
def test_fsq_codes_round_trip_through_indices():
    q = FSQ([8, 6, 5])
    assert q.num_codes == 240
    every = torch.arange(240).view(1, 240, 1)
    codes = q.codes(every)  # (1, 3, 240, 1)
    assert torch.equal(q.indices(codes), every)
    assert codes.unique(dim=2).shape[2] == 240  # 240 distinct codes
    z = grid(4, 3, 5, 5, scale=3.0)
    z_q, idx = q.quantize(z)
    assert torch.equal(q.codes(idx), z_q) and torch.equal(q.indices(z_q), idx)
    assert idx.min() >= 0 and idx.max() < 240
    for c, levels in enumerate([8, 6, 5]):  # channel c takes exactly its levels' values
        assert z_q[:, c].unique().numel() <= levels and codes[:, c].unique().numel() == levels


def test_fsq_rounds_with_a_straight_through_gradient():
    q = FSQ([5, 4])
    z = grid(2, 2, 3, 3).requires_grad_(True)
    z_q, idx, losses = q(z)
    assert losses == {} and torch.allclose(z_q, q.codes(idx), atol=1e-6)
    z_q.sum().backward()
    assert (z.grad > 0).all()  # the gradient of the tanh bound, passed through the rounding


# -- the model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("quantizer", ["codebook", "fsq"])
def test_decode_latent_tokenize_and_detokenize_agree_with_reconstruct(quantizer, shapes_batch):
    torch.manual_seed(0)
    model = tiny_model("vqvae", quantizer=quantizer)
    model.loss(shapes_batch)  # one training forward: k-means and EMA have run
    model.eval()
    x = shapes_batch[0][:5]
    recon = model.reconstruct(x)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    c, h, w = model.latent_shape
    assert model.encode_latent(x).shape == (5, c, h, w) and model.token_grid == (h, w) == (2, 2)
    assert torch.equal(model.decode_latent(model.encode_latent(x)), recon)
    tokens = model.tokenize(x)
    assert tokens.shape == (5, h * w) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < model.num_codes
    assert torch.equal(model.detokenize(tokens), recon)
    with pytest.raises(GenaiError, match="tokens"):
        model.detokenize(tokens[:, :1])


@pytest.mark.parametrize("quantizer", ["codebook", "fsq"])
def test_validation_reports_usage_and_perplexity_of_the_whole_split(quantizer, shapes_batch):
    torch.manual_seed(0)
    model = tiny_model("vqvae", quantizer=quantizer).eval()
    x, y = shapes_batch
    metrics = model.validation_metrics([(x[:8], y[:8]), (x[8:], y[8:])])
    counts = torch.bincount(model.tokenize(x).flatten(), minlength=model.num_codes)
    assert metrics["usage"] == pytest.approx(float((counts > 0).float().mean()))
    p = counts / counts.sum()
    assert metrics["perplexity"] == pytest.approx(float(torch.exp(-torch.special.xlogy(p, p).sum())), rel=1e-5)
    assert 1 <= metrics["perplexity"] <= model.num_codes
    assert metrics["mse"] == pytest.approx(float(((model.reconstruct(x) - x) ** 2).mean()), rel=1e-4)
    assert "bits_per_dim" not in metrics


def test_fsq_model_trains_and_round_trips_a_checkpoint(shapes_batch, tmp_path):
    """The registry-wide tests build the default (codebook) quantiser: the same checks for FSQ."""
    torch.manual_seed(0)
    model = tiny_model("vqvae", quantizer="fsq")

    class T:
        lr, betas, weight_decay = 3e-3, [0.9, 0.999], 0.0

    opts, stepper = model.configure_optimizers(T), Stepper(grad_clip=1.0)
    losses = [model.train_step(shapes_batch, opts, stepper)["loss"] for _ in range(30)]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert model.token_counts.sum() == 30 * 16 * 4  # every training token counted once
    model.eval()
    cfg = model.config
    state = {"family": "vqvae", "config": {"model": {"family": "vqvae", **asdict(cfg)}}, "spec": asdict(SPEC),
             "model": model.state_dict(), "ema": None, "parents": {}}
    save_checkpoint(state, tmp_path / "last.pt")
    clone = load_checkpoint(tmp_path / "last.pt")
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.sample(4, generator=g()), clone.sample(4, generator=g()))


def test_sample_draws_each_position_from_the_training_histogram():
    torch.manual_seed(0)
    model = tiny_model("vqvae").eval()
    with torch.no_grad():
        model.token_counts.zero_()
        model.token_counts[torch.arange(4), torch.tensor([3, 1, 4, 1])] = 1e6  # one dominant code per position
    images = model.sample(3, greedy=True)
    assert torch.equal(images, model.detokenize(torch.tensor([[3, 1, 4, 1]] * 3)))
    drawn = model.sample(2, generator=torch.Generator().manual_seed(0), top_k=1)
    assert torch.equal(drawn, images[:2])
    with pytest.raises(GenaiError, match="top-p"):
        model.sample(2, top_p=1.5)


def test_config_errors_name_the_fix():
    with pytest.raises(GenaiError, match="fsq_levels"):
        tiny_model("vqvae", quantizer="fsq", latent_channels=4)
    with pytest.raises(GenaiError, match="fsq_levels"):
        tiny_model("vqvae", quantizer="fsq", fsq_levels=[1, 5])
    with pytest.raises(GenaiError, match="dead_code_threshold"):
        tiny_model("vqvae", dead_code_threshold=2.0)
