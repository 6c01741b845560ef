"""The latent diffusion model split into the three graphs the engine runs; the DDIM loop runs outside them.

The number of sampling steps is a setting of the predictor, so the sampler is not in a graph: the engine runs
``encode`` once per plan, then per query ``denoise`` once per DDIM step (batched over the queries) with the
update of :func:`breathcast.engine.ddim.ddim_step` in numpy between the runs, then ``decode`` once.

Shapes (D = model grid, L = D / 4 the latent grid, C = latent channels, N = queries in a batch; the plan
tensors have batch 1 and are broadcast over N inside the graphs):

* ``encode``: ``moving`` (1, 1, D, D, D) CT in [0, 1], ``b_m`` (1, D) -> ``condition`` (1, C, L, L, L), the
  scaled latent of the planning CT and its trace.
* ``denoise``: ``x_t`` (N, C, L, L, L) noisy latent, ``condition`` (1, C, L, L, L), ``t`` (N,) int64 timestep,
  ``b_f`` (N, D) -> ``x0`` (N, C, L, L, L), the predicted clean latent: one U-Net pass.
* ``decode``: ``x0`` (N, C, L, L, L), ``condition`` (1, C, L, L, L), ``moving`` (1, 1, D, D, D) -> ``velocity``
  (N, 3, D/2, D/2, D/2), voxels of the half-resolution grid (dz, dy, dx). A model with a motion prior
  (``prior_channels`` P > 0) also takes ``prior`` (1, P, D/2, D/2, D/2), ``b_m`` (1, D) and ``b_f`` (N, D).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from breathcast.training.ldm import LDM

__all__ = ["EncodeGraph", "DenoiseGraph", "DecodeGraph", "ENCODE_INPUTS", "DENOISE_INPUTS", "decode_inputs"]

ENCODE_INPUTS = ("moving", "b_m")
DENOISE_INPUTS = ("x_t", "condition", "t", "b_f")


def decode_inputs(model: LDM) -> tuple[str, ...]:
    """The ``decode`` graph's inputs, in order: the prior and the traces only for a model that takes a prior."""
    return ("x0", "condition", "moving", *(("prior", "b_m", "b_f") if model.config.prior_channels else ()))


class EncodeGraph(nn.Module):
    """(M, b_m) -> the condition latent (the frozen auto-encoder's scaled mean), once per plan."""

    def __init__(self, model: LDM) -> None:
        super().__init__()
        self.autoencoder, self.latent_scale = model.autoencoder, model.latent_scale

    def forward(self, moving: torch.Tensor, b_m: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(moving, b_m)[0] * self.latent_scale


class DenoiseGraph(nn.Module):
    """One U-Net pass, the condition latent (batch 1) broadcast over the batch of noisy latents."""

    def __init__(self, model: LDM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, condition: torch.Tensor, t: torch.Tensor, b_f: torch.Tensor) -> torch.Tensor:
        return self.model.denoise(x_t, condition.expand_as(x_t), t, b_f)


class NearestUpsample2x(nn.Module):
    """(N, C, D, H, W) -> (N, C, 2D, 2H, 2W), each voxel repeated: ``nn.Upsample(scale_factor=2, mode="nearest")``
    as an expand and a reshape, which onnxruntime runs in a quarter of the time of its ``Resize`` on the CPU
    (64³ ldm decode graph: 5.6 of its 21 ms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, d, h, w = x.shape
        return x[:, :, :, None, :, None, :, None].expand(n, c, d, 2, h, 2, w, 2).reshape(n, c, 2 * d, 2 * h, 2 * w)


def with_reshape_upsampling(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose x2 nearest ``nn.Upsample`` layers are :class:`NearestUpsample2x` (same values)."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Upsample) and child.mode == "nearest" and child.size is None and child.scale_factor in (2, 2.0, (2.0,) * 3):
            parent_name, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attribute, NearestUpsample2x())
    return module


class DecodeGraph(nn.Module):
    """Denoised latents -> velocities at half resolution, the plan tensors (batch 1: the condition latent, moving
    image, prior and b_m) broadcast; the model is a copy with :func:`with_reshape_upsampling`."""

    def __init__(self, model: LDM) -> None:
        super().__init__()
        self.model = with_reshape_upsampling(model)

    def forward(
        self, x0: torch.Tensor, condition: torch.Tensor, moving: torch.Tensor, prior: torch.Tensor | None = None,
        b_m: torch.Tensor | None = None, b_f: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n = x0.shape[0]

        def batch(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.expand(n, *t.shape[1:])

        return self.model.decode_velocity(x0, batch(condition), batch(moving), batch(prior), batch(b_m), b_f)
