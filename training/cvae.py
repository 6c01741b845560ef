"""The conditional VAE of the paper (§2): a planning CT, its per-slice trace and a new trace -> a velocity field.

Shapes (N = batch, D = the model grid, Z = D slices):

* ``moving``, ``fixed``: (N, 1, D, D, D) CT scaled to [0, 1] (``breathcast.geometry.hu_to_unit``).
* ``b_m``, ``b_f``: (N, Z) per-slice breathing amplitude of the moving scan and the wanted (fixed) state.
* ``prior``: (N, P, D/2, D/2, D/2) the moving scan's anatomical motion prior (:mod:`breathcast.motion_prior`),
  for a model with ``prior_channels`` P > 0; absent (None) for P = 0.
* velocity / displacement: (N, 3, D, D, D) voxels of the model grid, components (dz, dy, dx), pull-back.

Architecture (after Dalca et al. 2019, as the paper):

* encoder q(z | M, F): 3D convs on the concatenated pair -> mean and log-variance of ``z`` (training only).
* bellows encoder E_b(b_m, b_f): 1D convs over the two traces + fully connected -> an embedding.
* decoder p(v | M, z ⊕ E_b): a U-Net on M; the latent z ⊕ E_b is injected at the bottleneck, M (pooled) is
  concatenated at every level. Beyond the paper, the two per-slice traces are also concatenated at every
  level as channels that vary along z only, so a slice sees its own breathing state directly; and a model
  with a motion prior sees it (pooled) at every level from D/2 down, beside M.
* The U-Net works from half resolution down (the first conv has stride 2) and predicts the velocity at
  half resolution; scaling and squaring runs there and the displacement is upsampled to the model grid.
  That is where the CPU speed comes from (DESIGN.md, "Real time").

Inference skips the encoder: z = 0 (deterministic) or samples of z for an uncertainty map.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from breathcast.errors import BreathcastError
from breathcast.motion_prior import PRIOR_VERSION
from breathcast.warp_torch import integrate_velocity, warp

__all__ = ["CVAEConfig", "CVAE", "CVAEOutput", "GRID_PRESETS", "save_cvae", "load_cvae", "check_prior", "pool_to", "trace_channels"]

GRID_PRESETS = {"64": 64, "96": 96, "128": 128}


@dataclass(frozen=True)
class CVAEConfig:
    """The cVAE's shape.

    Args:
        grid: model grid edge D (voxels); the slice count Z equals D. Divisible by 16.
        latent_dim: size of z.
        trace_embedding_dim: size of E_b(b_m, b_f).
        channels: feature channels at 1/2, 1/4, 1/8 and 1/16 resolution.
        integration_steps: scaling and squaring steps (7 as the paper).
        prior_channels: channels of the anatomical motion prior the decoder sees (0: none, the paper's model;
            3: :func:`breathcast.motion_prior.motion_prior`).
        prior_version: the prior's definition the model is trained and served with
            (:data:`breathcast.motion_prior.PRIOR_VERSION`; 1 for a model saved without one).
        sliding_mask: trained through the sliding mask it is served with: the displacement that warps the moving
            scan in training is the network's times the scan's :func:`breathcast.motion_prior.sliding_mask`, so the
            network need not stop the lungs' motion at the chest wall itself (it damped the motion in the lungs'
            last 10-20 mm before the wall, where they move most).
    """

    grid: int = 64
    latent_dim: int = 16
    trace_embedding_dim: int = 32
    channels: tuple[int, int, int, int] = (16, 32, 32, 48)
    integration_steps: int = 7
    prior_channels: int = 0
    prior_version: int = PRIOR_VERSION
    sliding_mask: bool = False

    def __post_init__(self) -> None:
        if self.grid < 16 or self.grid % 16:
            raise BreathcastError(f"model grid must be a multiple of 16 and at least 16, got {self.grid}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) != 4:
            raise BreathcastError(f"channels must list 4 levels, got {self.channels}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CVAEOutput:
    """What a training forward pass returns; tensors as in the module docstring."""

    velocity: torch.Tensor  # (N, 3, D/2, D/2, D/2), voxels of the half-resolution grid
    displacement: torch.Tensor  # (N, 3, D, D, D), voxels of the model grid
    warped: torch.Tensor  # (N, 1, D, D, D), the moving image warped: the predicted fixed image
    mu: torch.Tensor  # (N, latent_dim)
    logvar: torch.Tensor  # (N, latent_dim)


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


def pool_to(t: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S, S) -> (N, C, size, size, size) by average pooling (S a multiple of size). avg_pool3d, not
    adaptive: the ONNX exporter has no adaptive 3D pooling."""
    factor = t.shape[-1] // size
    return F.avg_pool3d(t, factor) if factor > 1 else t


def check_prior(prior: torch.Tensor | None, prior_channels: int, batch: int, grid: int) -> None:
    """A model with ``prior_channels`` P > 0 needs a (batch, P, D/2, D/2, D/2) prior, one with P = 0 none."""
    p, h = prior_channels, grid // 2
    if p and (prior is None or tuple(prior.shape) != (batch, p, h, h, h)):
        got = "none" if prior is None else tuple(prior.shape)
        raise BreathcastError(f"this model needs its motion prior, shape ({batch}, {p}, {h}, {h}, {h}), got {got}")
    if not p and prior is not None:
        raise BreathcastError("this model takes no motion prior (prior_channels = 0)")


def trace_channels(b_m: torch.Tensor, b_f: torch.Tensor, size: int) -> torch.Tensor:
    """(N, Z) traces -> (N, 2, size, size, size) channels constant in y and x, resampled along z."""
    traces = torch.stack([b_m, b_f], dim=1)  # (N, 2, Z)
    traces = F.interpolate(traces, size=size, mode="linear", align_corners=False)
    return traces[:, :, :, None, None].expand(-1, -1, -1, size, size)


class TraceEncoder(nn.Module):
    """E_b(b_m, b_f): 1D convolutions over the two per-slice traces, then fully connected layers."""

    def __init__(self, length: int, embedding_dim: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(2, 16, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.Conv1d(32, 32, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Linear(32 * (length // 8), 64), nn.LeakyReLU(0.2), nn.Linear(64, embedding_dim))

    def forward(self, b_m: torch.Tensor, b_f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(torch.stack([b_m, b_f], dim=1)).flatten(1))


class PairEncoder(nn.Module):
    """q(z | M, F): strided 3D convs on the concatenated pair -> (mu, logvar)."""

    def __init__(self, channels: tuple[int, ...], latent_dim: int) -> None:
        super().__init__()
        layers, c_in = [], 2
        for c in channels:
            layers.append(_block(c_in, c, stride=2))
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.mu = nn.Linear(c_in, latent_dim)
        self.logvar = nn.Linear(c_in, latent_dim)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.convs(torch.cat([moving, fixed], dim=1)).mean(dim=(2, 3, 4))
        return self.mu(features), self.logvar(features)


class CVAE(nn.Module):
    """The paper's conditional VAE; see the module docstring for shapes and architecture."""

    def __init__(self, config: CVAEConfig = CVAEConfig()) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3, c4 = config.channels
        side = 1 + config.prior_channels + 2  # every level also sees M (pooled), the prior and the two traces
        self.encoder = PairEncoder(config.channels, config.latent_dim)
        self.trace_encoder = TraceEncoder(config.grid, config.trace_embedding_dim)
        latent = config.latent_dim + config.trace_embedding_dim
        self.down1 = _block(1, c1, stride=2)  # D/2
        self.down2 = _block(c1 + side, c2, stride=2)  # D/4
        self.down3 = _block(c2 + side, c3, stride=2)  # D/8
        self.down4 = _block(c3 + side, c4, stride=2)  # D/16
        self.bottleneck = _block(c4 + side + latent, c4)
        self.up3 = _block(c4 + c3 + side, c3)
        self.up2 = _block(c3 + c2 + side, c2)
        self.up1 = _block(c2 + c1 + side, c1)
        self.velocity = nn.Conv3d(c1, 3, 3, padding=1)
        # Start at the identity; small weights so the first steps do not fold space.
        nn.init.normal_(self.velocity.weight, std=1e-5)
        nn.init.zeros_(self.velocity.bias)

    def check_inputs(self, moving: torch.Tensor, b_m: torch.Tensor, b_f: torch.Tensor, prior: torch.Tensor | None = None) -> None:
        d = self.config.grid
        if moving.ndim != 5 or tuple(moving.shape[1:]) != (1, d, d, d):
            raise BreathcastError(f"moving image must have shape (N, 1, {d}, {d}, {d}), got {tuple(moving.shape)}")
        for name, b in (("b_m", b_m), ("b_f", b_f)):
            if b.ndim != 2 or b.shape[1] != d or b.shape[0] != moving.shape[0]:
                raise BreathcastError(f"{name} must have shape ({moving.shape[0]}, {d}): one amplitude per slice, got {tuple(b.shape)}")
        check_prior(prior, self.config.prior_channels, moving.shape[0], d)

    def _side(self, moving: torch.Tensor, prior: torch.Tensor | None, b_m: torch.Tensor, b_f: torch.Tensor, size: int) -> torch.Tensor:
        pooled = [pool_to(moving, size)] if prior is None else [pool_to(moving, size), pool_to(prior, size)]
        return torch.cat([*pooled, trace_channels(b_m, b_f, size)], dim=1)

    def decode_velocity(
        self, moving: torch.Tensor, b_m: torch.Tensor, b_f: torch.Tensor, z: torch.Tensor, prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """p(v | M, z ⊕ E_b(b_m, b_f)): the stationary velocity (N, 3, D/2, D/2, D/2) in half-grid voxels."""
        d = self.config.grid
        latent = torch.cat([z, self.trace_encoder(b_m, b_f)], dim=1)

        def side(size: int) -> torch.Tensor:
            return self._side(moving, prior, b_m, b_f, size)

        x1 = self.down1(moving)
        x2 = self.down2(torch.cat([x1, side(d // 2)], 1))
        x3 = self.down3(torch.cat([x2, side(d // 4)], 1))
        x4 = self.down4(torch.cat([x3, side(d // 8)], 1))
        s16 = d // 16
        tiled = latent[:, :, None, None, None].expand(-1, -1, s16, s16, s16)
        x = self.bottleneck(torch.cat([x4, side(s16), tiled], 1))
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        x = self.up3(torch.cat([x, x3, side(d // 8)], 1))
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        x = self.up2(torch.cat([x, x2, side(d // 4)], 1))
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        x = self.up1(torch.cat([x, x1, side(d // 2)], 1))
        return self.velocity(x)

    def integrate(self, velocity: torch.Tensor) -> torch.Tensor:
        """Scaling and squaring at half resolution, then the displacement (N, 3, D, D, D) in model-grid voxels."""
        half = integrate_velocity(velocity, steps=self.config.integration_steps)
        return 2.0 * F.interpolate(half, scale_factor=2, mode="trilinear", align_corners=False)

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        b_m: torch.Tensor,
        b_f: torch.Tensor,
        eps: torch.Tensor | None = None,
        prior: torch.Tensor | None = None,
        motion_weight: torch.Tensor | None = None,
    ) -> CVAEOutput:
        """Training pass: encode the pair, sample z = mu + sigma * eps, decode, integrate, warp M.

        Args:
            eps: (N, latent_dim) standard normal noise; None draws it from torch's global generator.
            prior: the moving scan's motion prior (see the module docstring), for a model that takes one.
            motion_weight: (N, 1, D, D, D) the moving scan's sliding mask, multiplied into the displacement
                (``CVAEConfig.sliding_mask``); None: the network's displacement as it is.
        """
        self.check_inputs(moving, b_m, b_f, prior)
        mu, logvar = self.encoder(moving, fixed)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        velocity = self.decode_velocity(moving, b_m, b_f, z, prior)
        displacement = self.integrate(velocity)
        if motion_weight is not None:
            displacement = displacement * motion_weight
        return CVAEOutput(velocity, displacement, warp(moving, displacement), mu, logvar)

    @torch.no_grad()
    def predict(
        self, moving: torch.Tensor, b_m: torch.Tensor, b_f: torch.Tensor, z: torch.Tensor | None = None,
        prior: torch.Tensor | None = None, motion_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inference without the fixed image: displacement (N, 3, D, D, D) voxels; z = 0 unless given;
        ``motion_weight`` as in :meth:`forward`."""
        self.check_inputs(moving, b_m, b_f, prior)
        if z is None:
            z = moving.new_zeros(moving.shape[0], self.config.latent_dim)
        displacement = self.integrate(self.decode_velocity(moving, b_m, b_f, z, prior))
        return displacement if motion_weight is None else displacement * motion_weight


def save_cvae(model: CVAE, path: Path) -> None:
    """Write the model's configuration and weights (float32) to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"kind": "cvae", "config": model.config.to_dict(), "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)


def load_cvae(path: Path) -> CVAE:
    """Read a model written by :func:`save_cvae`; a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise BreathcastError(f"{path}: model file is missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise BreathcastError(f"{path}: not a readable breathcast model ({exc})") from None
    if not isinstance(payload, dict) or payload.get("kind") != "cvae":
        raise BreathcastError(f"{path}: not a breathcast cVAE model file")
    config = CVAEConfig(**{"prior_version": 1, **payload["config"], "channels": tuple(payload["config"]["channels"])})
    model = CVAE(config)
    model.load_state_dict(payload["state_dict"])
    return model.eval()
