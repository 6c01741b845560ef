"""breathcast.training: models (cVAE, CT autoencoder, latent diffusion), losses, datasets, training loops.

May import breathcast (core) only. Nothing here yet: see the cVAE issue.
"""
