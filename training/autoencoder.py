"""The CT auto-encoder of the latent diffusion model (paper §3.2): a 3D VAE with a second, breathing-trace branch.

Shapes (N = batch, D = the model grid, L = D / 4 the latent grid, C = ``latent_channels``):

* ``image``: (N, 1, D, D, D) CT scaled to [0, 1]; ``trace``: (N, D) per-slice breathing amplitude of that scan.
* latent: (N, C, L, L, L), axes (z, y, x) as the image. 64³ -> 16³ as the paper.

The image branch is MONAI's :class:`~monai.networks.nets.AutoencoderKL` (two 2x downsamplings). The trace
branch encodes the per-slice trace with 1D convolutions to (N, C, L) - one vector per latent slice - and adds it
to the image latent's mean, broadcast over (y, x); it decodes the trace from the latent's (y, x) mean with 1D
transposed convolutions. One latent therefore holds the scan and its trace, and both decode from it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL
from torch import nn

from breathcast.errors import BreathcastError

__all__ = ["AutoencoderConfig", "CTAutoencoder", "AutoencoderOutput", "autoencoder_loss", "save_autoencoder", "load_autoencoder"]


@dataclass(frozen=True)
class AutoencoderConfig:
    """The auto-encoder's shape.

    Args:
        grid: model grid edge D (voxels); a multiple of 4 (the latent is D / 4 on every axis).
        channels: feature channels of AutoencoderKL's three levels (full, 1/2, 1/4 resolution).
        latent_channels: C, channels of the latent.
        norm_num_groups: group-norm groups; divides every entry of ``channels``.
    """

    grid: int = 64
    channels: tuple[int, int, int] = (8, 16, 32)
    latent_channels: int = 4
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.grid < 16 or self.grid % 4:
            raise BreathcastError(f"auto-encoder grid must be a multiple of 4 and at least 16, got {self.grid}")
        if len(self.channels) != 3 or any(c % self.norm_num_groups for c in self.channels):
            raise BreathcastError(f"channels must list 3 levels divisible by {self.norm_num_groups}, got {self.channels}")

    @property
    def latent_grid(self) -> int:
        return self.grid // 4

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AutoencoderOutput:
    reconstruction: torch.Tensor  # (N, 1, D, D, D)
    trace: torch.Tensor  # (N, D)
    mu: torch.Tensor  # (N, C, L, L, L)
    sigma: torch.Tensor  # (N, C, L, L, L)


class TraceBranch(nn.Module):
    """Per-slice trace (N, D) <-> per-latent-slice vectors (N, C, D / 4)."""

    def __init__(self, latent_channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv1d(1, hidden, 5, stride=2, padding=2), nn.SiLU(),
            nn.Conv1d(hidden, hidden, 5, stride=2, padding=2), nn.SiLU(),
            nn.Conv1d(hidden, latent_channels, 3, padding=1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Conv1d(latent_channels, hidden, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose1d(hidden, hidden, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose1d(hidden, hidden, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv1d(hidden, 1, 3, padding=1),
        )  # fmt: skip

    def encode(self, trace: torch.Tensor) -> torch.Tensor:
        return self.encoder(trace[:, None])

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent.mean(dim=(3, 4)))[:, 0]


class CTAutoencoder(nn.Module):
    """Scan and trace -> one latent -> scan and trace; see the module docstring."""

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig()) -> None:
        super().__init__()
        self.config = config
        self.image = AutoencoderKL(
            spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=config.channels,
            attention_levels=(False, False, False), latent_channels=config.latent_channels,
            norm_num_groups=config.norm_num_groups, with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
        )  # fmt: skip
        self.trace = TraceBranch(config.latent_channels)

    def check_inputs(self, image: torch.Tensor, trace: torch.Tensor) -> None:
        d = self.config.grid
        if image.ndim != 5 or tuple(image.shape[1:]) != (1, d, d, d):
            raise BreathcastError(f"image must have shape (N, 1, {d}, {d}, {d}), got {tuple(image.shape)}")
        if trace.ndim != 2 or tuple(trace.shape) != (image.shape[0], d):
            raise BreathcastError(f"trace must have shape ({image.shape[0]}, {d}): one amplitude per slice, got {tuple(trace.shape)}")

    def encode(self, image: torch.Tensor, trace: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of the latent, (N, C, L, L, L) each."""
        self.check_inputs(image, trace)
        mu, sigma = self.image.encode(image)
        return mu + self.trace.encode(trace)[:, :, :, None, None], sigma

    def decode(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (N, C, L, L, L) -> (image (N, 1, D, D, D), trace (N, D))."""
        return self.image.decode(latent), self.trace.decode(latent)

    def forward(self, image: torch.Tensor, trace: torch.Tensor, eps: torch.Tensor | None = None) -> AutoencoderOutput:
        """Training pass: encode, sample the latent (``eps`` standard normal, drawn when None), decode."""
        mu, sigma = self.encode(image, trace)
        if eps is None:
            eps = torch.randn_like(mu)
        reconstruction, trace_out = self.decode(mu + sigma * eps)
        return AutoencoderOutput(reconstruction, trace_out, mu, sigma)


def autoencoder_loss(
    output: AutoencoderOutput, image: torch.Tensor, trace: torch.Tensor, kl_weight: float = 1e-9, trace_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """Reconstruction (mean squared, image and trace) + ``kl_weight`` x KL(q || N(0, I)) summed over the latent.

    Returns the terms by name; ``total`` is the one to minimise.
    """
    image_term = F.mse_loss(output.reconstruction, image)
    trace_term = F.mse_loss(output.trace, trace)
    var = output.sigma.pow(2)
    kl = 0.5 * (output.mu.pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1.0).flatten(1).sum(1).mean()
    total = image_term + trace_weight * trace_term + kl_weight * kl
    return {"total": total, "image": image_term, "trace": trace_term, "kl": kl}


def save_autoencoder(model: CTAutoencoder, path: Path, latent_scale: float) -> None:
    """Write configuration, weights and the latent scale (1 / std of training latents) to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = {"kind": "ct-autoencoder", "config": model.config.to_dict(), "latent_scale": float(latent_scale),
               "state_dict": model.state_dict()}
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_autoencoder(path: Path) -> tuple[CTAutoencoder, float]:
    """Read a file written by :func:`save_autoencoder` -> (model in eval mode, latent scale)."""
    path = Path(path)
    if not path.is_file():
        raise BreathcastError(f"{path}: auto-encoder file is missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise BreathcastError(f"{path}: not a readable breathcast model ({exc})") from None
    if not isinstance(payload, dict) or payload.get("kind") != "ct-autoencoder":
        raise BreathcastError(f"{path}: not a breathcast CT auto-encoder file")
    config = AutoencoderConfig(**{**payload["config"], "channels": tuple(payload["config"]["channels"])})
    model = CTAutoencoder(config)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), float(payload["latent_scale"])
