"""The latent diffusion model of the paper (§3): planning CT + its trace + a new trace -> a velocity field, by DDIM.

Shapes (N = batch, D = the model grid, L = D / 4 the latent grid, C = latent channels):

* ``moving``: (N, 1, D, D, D) planning CT in [0, 1]; ``b_m``, ``b_f``: (N, D) per-slice amplitude.
* latents: (N, C, L, L, L), axes (z, y, x), scaled to unit variance (the auto-encoder's ``latent_scale``).
* velocity: (N, 3, D/2, D/2, D/2) half-grid voxels; displacement: (N, 3, D, D, D) model-grid voxels,
  (dz, dy, dx), pull-back, as the cVAE (:mod:`breathcast.training.cvae`).
* ``prior``: (N, P, D/2, D/2, D/2) the moving scan's anatomical motion prior (:mod:`breathcast.motion_prior`),
  for a model with ``prior_channels`` P > 0 (as the cVAE's); absent (None) for P = 0.

Pieces:

* the frozen CT auto-encoder (:mod:`breathcast.training.autoencoder`) encodes (M, b_m) into the condition
  latent; during training it also encodes (F, b_f) into the target latent x0.
* the denoiser: MONAI's 2D :class:`~monai.networks.nets.DiffusionModelUNet` run on the latent's L slices as a
  batch, its input the noisy latent, the condition latent and the slice's z coordinate concatenated. Every one of
  its attention blocks (the 3 smallest levels and the middle) is followed by :class:`Pseudo3DAttention`, where the
  L slices of a volume attend to each other over all their (y, x) positions - the only place slices meet. The
  fixed trace b_f enters by cross-attention (MONAI's SpatialTransformer in those same blocks) as L tokens from
  :class:`TraceTokens`. It predicts x0 (the paper's μ) as the condition latent plus a learned change.
* the velocity decoder: a trainable copy of the CT decoder (to half resolution) decodes the denoised latent; new
  3D conv layers map its features, the moving image, the latent and its change from the condition latent to a
  velocity at half resolution. A model with a motion prior also gives these layers the prior and both per-slice
  traces (channels that vary along z only) at D/2 and D/4, as the cVAE's decoder sees them: the latent says what
  the image will look like, the prior where this anatomy's motion sits. Scaling and squaring
  then gives the diffeomorphic displacement, as the cVAE.
* sampling: MONAI's :class:`~monai.networks.schedulers.DDIMScheduler` (eta 0: deterministic given the initial
  noise, which comes from a seeded generator).
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import SpatialTransformer
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from breathcast.errors import BreathcastError
from breathcast.motion_prior import PRIOR_VERSION
from breathcast.training.autoencoder import AutoencoderConfig, CTAutoencoder
from breathcast.training.cvae import check_prior, pool_to, trace_channels
from breathcast.warp_torch import integrate_velocity, warp

__all__ = ["LDMConfig", "LDM", "LDMOutput", "Pseudo3DAttention", "TraceTokens", "make_scheduler", "save_ldm", "load_ldm"]


@dataclass(frozen=True)
class LDMConfig:
    """The diffusion model's shape (the auto-encoder's is stored beside it).

    Args:
        channels: U-Net channels per level (latent grid L, L/2, L/4, L/8 in-plane).
        attention_levels: where the U-Net has attention (self, cross and pseudo-3D); the paper's 3 smallest.
        norm_num_groups: group-norm groups of the U-Net; divides every channel count.
        head_channels: channels per attention head.
        context_dim: width of the trace tokens b_f is cross-attended as.
        velocity_channels: channels of the velocity decoder's new conv layers at D/2 and D/4.
        train_timesteps: diffusion steps of the noise schedule.
        beta_start, beta_end: the scaled-linear beta schedule's ends.
        integration_steps: scaling and squaring steps.
        prior_channels: channels of the anatomical motion prior the velocity decoder sees, with both traces
            (0: none, the paper's model; 3: :func:`breathcast.motion_prior.motion_prior`).
        prior_version: the prior's definition (:data:`breathcast.motion_prior.PRIOR_VERSION`; 1 for a model saved
            without one).
    """

    channels: tuple[int, ...] = (32, 64, 64, 64)
    attention_levels: tuple[bool, ...] = (False, True, True, True)
    norm_num_groups: int = 16
    head_channels: int = 16
    context_dim: int = 32
    velocity_channels: tuple[int, int] = (8, 32)
    train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    integration_steps: int = 7
    prior_channels: int = 0
    prior_version: int = PRIOR_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        object.__setattr__(self, "velocity_channels", tuple(int(c) for c in self.velocity_channels))
        if len(self.channels) != len(self.attention_levels):
            raise BreathcastError(f"channels {self.channels} and attention_levels {self.attention_levels} differ in length")
        if any(c % self.norm_num_groups or c % self.head_channels for c in self.channels):
            raise BreathcastError(f"every channel count must divide by {self.norm_num_groups} and {self.head_channels}: {self.channels}")

    def to_dict(self) -> dict:
        return asdict(self)


def make_scheduler(config: LDMConfig) -> DDIMScheduler:
    """DDIM over the model's noise schedule, the network predicting x0 ("sample"), no clipping (latents are not in [-1, 1])."""
    return DDIMScheduler(
        num_train_timesteps=config.train_timesteps, schedule="scaled_linear_beta", beta_start=config.beta_start,
        beta_end=config.beta_end, clip_sample=False, prediction_type="sample",
    )  # fmt: skip


class Pseudo3DAttention(nn.Module):
    """Slices attend to slices (paper §3.3): input (N * Z, C, H, W), the Z slices of each volume consecutive.

    Each slice is one token; its query, key and value per head are the head's channels at every (y, x) position,
    so the attention weight between two slices compares them over the whole slice. A learned embedding of the
    slice index is added before the projections; the output projection starts at zero (a no-op at start).
    """

    def __init__(self, channels: int, slices: int, head_channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.slices, self.heads = slices, channels // head_channels
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.position = nn.Parameter(torch.zeros(1, slices, channels, 1, 1))
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = rearrange(self.norm(x), "(n z) c h w -> n z c h w", z=self.slices) + self.position
        qkv = self.qkv(rearrange(y, "n z c h w -> (n z) c h w"))
        q, k, v = rearrange(qkv, "(n z) (three g d) h w -> three n g z (d h w)", z=self.slices, three=3, g=self.heads)
        weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # (n, g, z, z)
        mixed = rearrange(weights @ v, "n g z (d h w) -> (n z) (g d) h w", h=h, w=w)
        return x + self.out(mixed)


class _AttentionThenPseudo3D(nn.Module):
    """A U-Net attention block (self- and cross-attention within each slice) followed by :class:`Pseudo3DAttention`."""

    def __init__(self, attention: SpatialTransformer, pseudo3d: Pseudo3DAttention) -> None:
        super().__init__()
        self.attention, self.pseudo3d = attention, pseudo3d

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.pseudo3d(self.attention(x, context=context))


def add_pseudo3d_attention(unet: nn.Module, slices: int, head_channels: int, norm_num_groups: int) -> int:
    """Follow every SpatialTransformer in ``unet`` by pseudo-3D attention over ``slices``; returns how many."""
    targets = [(parent, name, child) for parent in unet.modules() for name, child in parent.named_children()
               if isinstance(child, SpatialTransformer)]
    for parent, name, child in targets:
        pseudo = Pseudo3DAttention(child.in_channels, slices, head_channels, norm_num_groups)
        setattr(parent, name, _AttentionThenPseudo3D(child, pseudo))
    return len(targets)


class TraceTokens(nn.Module):
    """b_f (N, D) -> (N, L, context_dim) tokens for cross-attention, one per latent slice, with learned positions."""

    def __init__(self, grid: int, context_dim: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(1, context_dim, 4, stride=4), nn.SiLU(), nn.Conv1d(context_dim, context_dim, 3, padding=1),
        )  # fmt: skip
        self.position = nn.Parameter(torch.zeros(1, grid // 4, context_dim))

    def forward(self, b_f: torch.Tensor) -> torch.Tensor:
        return self.convs(b_f[:, None]).transpose(1, 2) + self.position


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class VelocityDecoder(nn.Module):
    """Denoised latent (+ the condition latent and the moving image) -> velocity (N, 3, D/2, D/2, D/2), half-grid voxels.

    The CT decoder (a trainable copy, initialised from the auto-encoder) up to half resolution - its last level
    only sharpens the image, and the velocity lives at D/2 - then new 3D conv layers: the decoded features meet
    the moving image at D/2, go down to D/4 where the latent and its change from the condition latent (the
    moving scan's: no change, no motion) join, and come back up to the velocity, which starts near zero so the
    first steps do not fold space. With ``prior_channels`` P > 0 the prior and the traces b_m, b_f join at D/2
    and D/4 (the ``side`` channels).
    """

    def __init__(self, autoencoder: CTAutoencoder, channels: tuple[int, int], prior_channels: int = 0) -> None:
        super().__init__()
        c1, c2 = channels
        side = prior_channels + 2 if prior_channels else 0
        latent = autoencoder.config.latent_channels
        blocks = list(autoencoder.image.decoder.blocks)
        last_upsample = max(i for i, b in enumerate(blocks) if "upsample" in type(b).__name__.lower())
        self.decoder = copy.deepcopy(nn.Sequential(autoencoder.image.post_quant_conv, *blocks[:last_upsample]))
        for p in self.decoder.parameters():
            p.requires_grad_(True)
        decoded = blocks[last_upsample - 1].out_channels
        self.moving = _block(1, c1, stride=2)
        self.merge = _block(decoded + c1 + side, c1)
        self.down = _block(c1, c2, stride=2)
        self.mid = nn.Sequential(_block(c2 + 2 * latent + side, c2), _block(c2, c2))
        self.up = _block(c2 + c1, c1)
        self.velocity = nn.Conv3d(c1, 3, 3, padding=1)
        nn.init.normal_(self.velocity.weight, std=1e-5)
        nn.init.zeros_(self.velocity.bias)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def forward(
        self, latent: torch.Tensor, condition: torch.Tensor, moving: torch.Tensor, latent_scale: float,
        side: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``side``: (prior (N, P, D/2, D/2, D/2), b_m (N, D), b_f (N, D)) for a model with a prior, else None."""

        def side_at(size: int) -> list[torch.Tensor]:
            if side is None:
                return []
            prior, b_m, b_f = side
            return [pool_to(prior, size), trace_channels(b_m, b_f, size)]

        half = moving.shape[-1] // 2
        x1 = self.merge(torch.cat([self.decoder(latent / latent_scale), self.moving(moving), *side_at(half)], 1))
        x = self.mid(torch.cat([self.down(x1), latent, latent - condition, *side_at(half // 2)], 1))
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        return self.velocity(self.up(torch.cat([x, x1], 1)))


@dataclass
class LDMOutput:
    """A training pass; tensors as in the module docstring."""

    x0: torch.Tensor  # (N, C, L, L, L) predicted clean latent
    velocity: torch.Tensor  # (N, 3, D/2, D/2, D/2)
    displacement: torch.Tensor  # (N, 3, D, D, D)
    warped: torch.Tensor  # (N, 1, D, D, D)


class LDM(nn.Module):
    """The paper's latent diffusion model; see the module docstring."""

    def __init__(self, autoencoder: CTAutoencoder, latent_scale: float, config: LDMConfig = LDMConfig()) -> None:
        super().__init__()
        self.config = config
        self.grid = autoencoder.config.grid
        self.latent_grid = autoencoder.config.latent_grid
        self.latent_channels = c = autoencoder.config.latent_channels
        self.latent_scale = float(latent_scale)
        self.autoencoder = autoencoder.eval()
        for p in self.autoencoder.parameters():
            p.requires_grad_(False)
        self.unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=2 * c + 1, out_channels=c, num_res_blocks=1, channels=config.channels,
            attention_levels=config.attention_levels, norm_num_groups=config.norm_num_groups,
            num_head_channels=config.head_channels, with_conditioning=True, cross_attention_dim=config.context_dim,
        )  # fmt: skip
        add_pseudo3d_attention(self.unet, self.latent_grid, config.head_channels, config.norm_num_groups)
        self.trace_tokens = TraceTokens(self.grid, config.context_dim)
        self.velocity_decoder = VelocityDecoder(autoencoder, config.velocity_channels, config.prior_channels)
        z = (torch.arange(self.latent_grid, dtype=torch.float32) + 0.5) / self.latent_grid * 2.0 - 1.0
        self.register_buffer("slice_coordinate", z.view(1, 1, -1, 1, 1), persistent=False)
        self.scheduler = make_scheduler(config)

    def train(self, mode: bool = True) -> LDM:
        super().train(mode)
        self.autoencoder.eval()  # frozen, always
        return self

    def check_inputs(self, moving: torch.Tensor, b_m: torch.Tensor, b_f: torch.Tensor, prior: torch.Tensor | None = None) -> None:
        d = self.grid
        if moving.ndim != 5 or tuple(moving.shape[1:]) != (1, d, d, d):
            raise BreathcastError(f"moving image must have shape (N, 1, {d}, {d}, {d}), got {tuple(moving.shape)}")
        for name, b in (("b_m", b_m), ("b_f", b_f)):
            if b.ndim != 2 or tuple(b.shape) != (moving.shape[0], d):
                raise BreathcastError(f"{name} must have shape ({moving.shape[0]}, {d}): one amplitude per slice, got {tuple(b.shape)}")
        check_prior(prior, self.config.prior_channels, moving.shape[0], d)

    @torch.no_grad()
    def encode(self, image: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
        """The scaled latent mean of (image (N, 1, D, D, D), trace (N, D)): (N, C, L, L, L)."""
        return self.autoencoder.encode(image, trace)[0] * self.latent_scale

    def denoise(self, x_t: torch.Tensor, condition: torch.Tensor, t: torch.Tensor, b_f: torch.Tensor) -> torch.Tensor:
        """One U-Net pass: noisy latent x_t at timesteps t (N,), condition latent, b_f (N, D) -> predicted x0."""
        n, l = x_t.shape[0], self.latent_grid
        inputs = torch.cat([x_t, condition, self.slice_coordinate.expand(n, 1, l, l, l)], 1)
        slices = rearrange(inputs, "n c z h w -> (n z) c h w")
        context = self.trace_tokens(b_f).repeat_interleave(l, dim=0)
        change = self.unet(slices, t.repeat_interleave(l), context)
        return condition + rearrange(change, "(n z) c h w -> n c z h w", n=n)

    def decode_velocity(
        self, x0: torch.Tensor, condition: torch.Tensor, moving: torch.Tensor, prior: torch.Tensor | None = None,
        b_m: torch.Tensor | None = None, b_f: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoised latent x0 and the condition latent (N, C, L, L, L), moving (N, 1, D, D, D) -> velocity (N, 3, D/2, D/2, D/2);
        a model with a motion prior also needs ``prior`` (N, P, D/2, D/2, D/2) and the traces ``b_m``, ``b_f`` (N, D)."""
        side = None
        if self.config.prior_channels:
            if prior is None or b_m is None or b_f is None:
                raise BreathcastError("this model's velocity decoder needs the motion prior and both traces")
            side = (prior, b_m, b_f)
        return self.velocity_decoder(x0, condition, moving, self.latent_scale, side)

    def integrate(self, velocity: torch.Tensor) -> torch.Tensor:
        """Scaling and squaring at half resolution, then the displacement (N, 3, D, D, D) in model-grid voxels."""
        half = integrate_velocity(velocity, steps=self.config.integration_steps)
        return 2.0 * F.interpolate(half, scale_factor=2, mode="trilinear", align_corners=False)

    def forward(
        self, moving: torch.Tensor, condition: torch.Tensor, target: torch.Tensor, b_f: torch.Tensor,
        t: torch.Tensor, noise: torch.Tensor, b_m: torch.Tensor | None = None, prior: torch.Tensor | None = None,
    ) -> LDMOutput:
        """Training pass: noise the target latent to step t, denoise, decode the velocity, integrate, warp M.

        Args:
            moving: (N, 1, D, D, D). condition, target: scaled latents of (M, b_m) and (F, b_f).
            b_f: (N, D). t: (N,) int64 timesteps. noise: like ``target``, standard normal.
            b_m, prior: (N, D) and (N, P, D/2, D/2, D/2), for a model with a motion prior.
        """
        x_t = self.scheduler.add_noise(original_samples=target, noise=noise, timesteps=t)
        x0 = self.denoise(x_t, condition, t, b_f)
        velocity = self.decode_velocity(x0, condition, moving, prior, b_m, b_f)
        displacement = self.integrate(velocity)
        return LDMOutput(x0, velocity, displacement, warp(moving, displacement))

    @torch.no_grad()
    def sample_latent(
        self, condition: torch.Tensor, b_f: torch.Tensor, steps: int = 50, seed: int = 0, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """DDIM (eta 0) from noise (seeded, or given) to x0 in ``steps`` steps: (N, C, L, L, L)."""
        if not 1 <= steps <= self.config.train_timesteps:
            raise BreathcastError(f"sampling steps must be 1..{self.config.train_timesteps}, got {steps}")
        scheduler = make_scheduler(self.config)
        scheduler.set_timesteps(steps)
        if noise is None:
            noise = torch.randn(condition.shape, generator=torch.Generator().manual_seed(seed)).to(condition)
        x = noise
        for t in scheduler.timesteps:
            x0 = self.denoise(x, condition, t.expand(x.shape[0]).to(x.device), b_f)
            x, _ = scheduler.step(x0, int(t), x)
        return x

    @torch.no_grad()
    def predict(
        self, moving: torch.Tensor, b_m: torch.Tensor, b_f: torch.Tensor, steps: int = 50, seed: int = 0,
        prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inference: displacement (N, 3, D, D, D) voxels from M, b_m and b_f (and the prior, for a model that
        takes one); the same seed gives the same field."""
        self.check_inputs(moving, b_m, b_f, prior)
        condition = self.encode(moving, b_m)
        x0 = self.sample_latent(condition, b_f, steps, seed)
        return self.integrate(self.decode_velocity(x0, condition, moving, prior, b_m, b_f))


def save_ldm(model: LDM, path: Path) -> None:
    """Write both configurations, the latent scale and all weights (auto-encoder included) to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = {"kind": "ldm", "config": model.config.to_dict(), "autoencoder": model.autoencoder.config.to_dict(),
               "latent_scale": model.latent_scale, "state_dict": model.state_dict()}
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_ldm(path: Path) -> LDM:
    """Read a model written by :func:`save_ldm`; a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise BreathcastError(f"{path}: model file is missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise BreathcastError(f"{path}: not a readable breathcast model ({exc})") from None
    if not isinstance(payload, dict) or payload.get("kind") != "ldm":
        raise BreathcastError(f"{path}: not a breathcast LDM model file")
    ae = payload["autoencoder"]
    model = LDM(CTAutoencoder(AutoencoderConfig(**{**ae, "channels": tuple(ae["channels"])})), payload["latent_scale"],
                LDMConfig(**{"prior_version": 1, **payload["config"]}))
    model.load_state_dict(payload["state_dict"])
    return model.eval()
