"""DDIM sampling in numpy for the engine's latent diffusion packages (no torch at run time).

The numbers are those of MONAI 1.6's ``DDIMScheduler`` with eta 0, ``prediction_type="sample"`` (the network
predicts x0), no clipping and ``set_alpha_to_one`` (the last step returns the network's x0), which
:func:`breathcast.training.ldm.make_scheduler` builds and :meth:`breathcast.training.ldm.LDM.sample_latent`
runs; the tests check both against it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["ddim_timesteps", "ddim_step", "ddim_sample"]


def ddim_timesteps(train_timesteps: int, steps: int) -> np.ndarray:
    """The timesteps ``DDIMScheduler.set_timesteps(steps)`` visits, int64, highest first.

    MONAI computes ``torch.linspace(T - 1, 0, steps).round()``; torch's float32 linspace (the first half stepped
    from the start, the second half from the end) is reproduced exactly, so a rounding tie falls the same way.
    """
    if not 1 <= steps <= train_timesteps:
        raise ValueError(f"sampling steps must be 1..{train_timesteps}, got {steps}")
    if steps == 1:
        return np.array([train_timesteps - 1], np.int64)
    start, end = np.float32(train_timesteps - 1), np.float32(0.0)
    step = (end - start) / np.float32(steps - 1)
    i = np.arange(steps)
    values = np.where(i < steps // 2, start + i.astype(np.float32) * step, end - (steps - 1 - i).astype(np.float32) * step)
    return np.round(values.astype(np.float32)).astype(np.int64)


def ddim_step(x0: np.ndarray, t: int, x_t: np.ndarray, alphas_cumprod: np.ndarray, steps: int, final_alpha_cumprod: float = 1.0) -> np.ndarray:
    """One DDIM update (eta 0) from the network's x0: x_t -> x at the previous timestep, float32.

    As ``DDIMScheduler.step``: the previous timestep is ``t - T // steps`` (below 0: ``final_alpha_cumprod``),
    eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t), x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    """
    previous = t - len(alphas_cumprod) // steps
    alpha = np.float32(alphas_cumprod[t])
    alpha_prev = np.float32(alphas_cumprod[previous] if previous >= 0 else final_alpha_cumprod)
    one = np.float32(1.0)
    epsilon = (x_t - np.sqrt(alpha) * x0) / np.sqrt(one - alpha)
    return (np.sqrt(alpha_prev) * x0 + np.sqrt(one - alpha_prev) * epsilon).astype(np.float32, copy=False)


def ddim_sample(
    denoise: Callable[[np.ndarray, np.ndarray], np.ndarray],
    noise: np.ndarray,
    alphas_cumprod: np.ndarray,
    steps: int,
    final_alpha_cumprod: float = 1.0,
) -> np.ndarray:
    """DDIM from ``noise`` (N, ...) to x0 in ``steps`` steps; ``denoise(x_t, t (N,) int64) -> x0`` is one network pass."""
    x = np.ascontiguousarray(noise, dtype=np.float32)
    for t in ddim_timesteps(len(alphas_cumprod), steps):
        x0 = denoise(x, np.full(x.shape[0], t, np.int64))
        x = ddim_step(x0, int(t), x, alphas_cumprod, steps, final_alpha_cumprod)
    return x
