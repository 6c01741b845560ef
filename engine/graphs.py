"""The cVAE split into the two graphs the engine runs: ``plan`` (once per plan) and ``frame`` (every frame).

Everything in :meth:`breathcast.training.cvae.CVAE.decode_velocity` that depends only on the planning CT M and
its trace b_m moves to ``plan``: the first U-Net level, the pooled M, the b_m channels, and - because a
convolution is linear in its input channels - the part of the two convolutions that read M-only features
(``down2`` and ``up1``) before their activation. ``frame`` adds the b_f part and runs the rest. The two
together give the same velocity as ``decode_velocity`` (tested to float32 precision).

Shapes (D = model grid, N = frames in a batch, the plan tensors have batch 1 and are broadcast):

* plan inputs: ``moving`` (1, 1, D, D, D) CT in [0, 1]; ``b_m`` (1, D) per-slice amplitude; for a model with a
  motion prior, ``prior`` (1, P, D/2, D/2, D/2) (:mod:`breathcast.motion_prior`).
* plan outputs: ``x1`` (1, c1, D/2, D/2, D/2); ``pre_down2`` (1, c2, D/4, ...); ``pre_up1`` (1, c1, D/2, ...);
  ``side4``, ``side8``, ``side16`` (1, 2 + P, D/s, D/s, D/s): pooled M, the pooled prior and the b_m channel at
  D/4, D/8, D/16.
* frame inputs: the plan outputs, ``b_m`` (1, D), ``b_f`` (N, D), ``z`` (N, latent_dim).
* frame output: ``velocity`` (N, 3, D/2, D/2, D/2), voxels of the half-resolution grid (dz, dy, dx).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from breathcast.training.cvae import CVAE, pool_to

__all__ = ["PlanGraph", "FrameGraph", "PLAN_OUTPUTS", "FRAME_INPUTS"]

PLAN_OUTPUTS = ("x1", "pre_down2", "pre_up1", "side4", "side8", "side16")
FRAME_INPUTS = (*PLAN_OUTPUTS, "b_m", "b_f", "z")

_SLOPE = 0.2  # LeakyReLU slope of the cVAE's blocks


def _conv(block: nn.Sequential) -> nn.Conv3d:
    return block[0]


def _trace_channel(b: torch.Tensor, size: int) -> torch.Tensor:
    """(N, D) per-slice trace -> (N, 1, size, size, size), constant in y and x, as the cVAE builds it."""
    b = F.interpolate(b[:, None, :], size=size, mode="linear", align_corners=False)
    return b[:, :, :, None, None].expand(-1, -1, -1, size, size)


class PlanGraph(nn.Module):
    """What depends only on (M, b_m); see the module docstring."""

    def __init__(self, model: CVAE) -> None:
        super().__init__()
        self.grid = model.config.grid
        c1 = model.config.channels[0]
        c2 = model.config.channels[1]
        plan = c1 + 1 + model.config.prior_channels + 1  # x1, pooled M, the prior, b_m
        self.down1 = model.down1
        down2, up1 = _conv(model.down2), _conv(model.up1)
        # down2 reads [x1 (c1), pooled M, prior, b_m, b_f]: keep all but the b_f column here.
        self.down2_plan = nn.Conv3d(plan, down2.out_channels, 3, stride=2, padding=1)
        self.down2_plan.weight = nn.Parameter(down2.weight[:, :plan].detach().clone())
        self.down2_plan.bias = nn.Parameter(down2.bias.detach().clone())
        # up1 reads [upsampled x (c2), x1 (c1), pooled M, prior, b_m, b_f]: the x1, M, prior and b_m columns here.
        self.up1_plan = nn.Conv3d(plan, up1.out_channels, 3, padding=1)
        self.up1_plan.weight = nn.Parameter(up1.weight[:, c2 : c2 + plan].detach().clone())
        self.up1_plan.bias = nn.Parameter(up1.bias.detach().clone())

    def forward(self, moving: torch.Tensor, b_m: torch.Tensor, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        d = self.grid
        x1 = self.down1(moving)

        def side(size: int) -> torch.Tensor:
            pooled = [pool_to(moving, size)] if prior is None else [pool_to(moving, size), pool_to(prior, size)]
            return torch.cat([*pooled, _trace_channel(b_m, size)], dim=1)

        pre_down2 = self.down2_plan(torch.cat([x1, side(d // 2)], dim=1))
        pre_up1 = self.up1_plan(torch.cat([x1, side(d // 2)], dim=1))
        return x1, pre_down2, pre_up1, side(d // 4), side(d // 8), side(d // 16)


class FrameGraph(nn.Module):
    """The rest of the decoder, from the plan tensors and a batch of wanted traces b_f to the velocity."""

    def __init__(self, model: CVAE) -> None:
        super().__init__()
        self.grid = model.config.grid
        c1, c2 = model.config.channels[:2]
        plan = c1 + 1 + model.config.prior_channels + 1  # the plan graph's columns; b_f comes after them
        self.trace_encoder = model.trace_encoder
        self.down3, self.down4, self.bottleneck = model.down3, model.down4, model.bottleneck
        self.up3, self.up2 = model.up3, model.up2
        self.velocity = model.velocity
        down2, up1 = _conv(model.down2), _conv(model.up1)
        self.down2_frame = nn.Conv3d(1, down2.out_channels, 3, stride=2, padding=1, bias=False)
        self.down2_frame.weight = nn.Parameter(down2.weight[:, plan : plan + 1].detach().clone())
        keep = list(range(c2)) + [c2 + plan]  # upsampled x and the b_f column
        self.up1_frame = nn.Conv3d(c2 + 1, up1.out_channels, 3, padding=1, bias=False)
        self.up1_frame.weight = nn.Parameter(up1.weight[:, keep].detach().clone())

    def forward(
        self,
        x1: torch.Tensor,
        pre_down2: torch.Tensor,
        pre_up1: torch.Tensor,
        side4: torch.Tensor,
        side8: torch.Tensor,
        side16: torch.Tensor,
        b_m: torch.Tensor,
        b_f: torch.Tensor,
        z: torch.Tensor,
    ) -> torch.Tensor:
        d = self.grid
        n = b_f.shape[0]

        def batch(t: torch.Tensor) -> torch.Tensor:
            return t.expand(n, *t.shape[1:])

        def side(plan_side: torch.Tensor, size: int) -> torch.Tensor:
            return torch.cat([batch(plan_side), _trace_channel(b_f, size)], dim=1)

        b_m = batch(b_m)
        latent = torch.cat([z, self.trace_encoder(b_m, b_f)], dim=1)
        x2 = F.leaky_relu(batch(pre_down2) + self.down2_frame(_trace_channel(b_f, d // 2)), _SLOPE)
        x3 = self.down3(torch.cat([x2, side(side4, d // 4)], 1))
        x4 = self.down4(torch.cat([x3, side(side8, d // 8)], 1))
        s16 = d // 16
        tiled = latent[:, :, None, None, None].expand(-1, -1, s16, s16, s16)
        x = self.bottleneck(torch.cat([x4, side(side16, s16), tiled], 1))
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        x = self.up3(torch.cat([x, x3, side(side8, d // 8)], 1))
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        x = self.up2(torch.cat([x, x2, side(side4, d // 4)], 1))
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        x = F.leaky_relu(batch(pre_up1) + self.up1_frame(torch.cat([x, _trace_channel(b_f, d // 2)], 1)), _SLOPE)
        return self.velocity(x)
