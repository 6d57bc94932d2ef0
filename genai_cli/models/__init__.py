"""Importing this package registers every family (one module each; ``autoregressive`` and ``masked_tokens`` hold
the mixins that several families share)."""

from . import (
    autoencoder,  # noqa: F401
    cgan,  # noqa: F401
    classifier,  # noqa: F401
    dcgan,  # noqa: F401
    diffusion,  # noqa: F401
    distill,  # noqa: F401
    flow,  # noqa: F401
    latent_diffusion,  # noqa: F401
    lstm,  # noqa: F401
    masked,  # noqa: F401
    maskgit,  # noqa: F401
    pixelcnn,  # noqa: F401
    row_lstm,  # noqa: F401
    spatial_ae,  # noqa: F401
    transformer,  # noqa: F401
    vae,  # noqa: F401
    vqvae,  # noqa: F401
)
