"""The anatomical motion prior: how a typical patient with this anatomy breathes, from the CT alone.

The real-anatomy simulator (:mod:`breathcast.sim.realct`) builds each training patient's motion on a
segmentation of its CT, with magnitudes drawn per patient. The prior is the same construction on the plan's
own segmentation with the middle of every drawn range (:func:`~breathcast.sim.realct.population_motion`): the
pull-back from end-exhale to end-inhale (amplitude 1, rate 0) that the anatomy suggests. It is what makes a
network see anatomy rather than the frame: the cVAE takes it as input channels (``CVAEConfig.prior_channels``)
and learns what the prior misses, instead of learning where lungs sit in the box. It is computed the same
way in training (each moving scan) and in the engine (the plan), on the model grid.
"""

from __future__ import annotations

import numpy as np

from breathcast.geometry import Volume
from breathcast.segmentation import segment_thorax
from breathcast.sim.realct import build_real_motion_field, population_motion

__all__ = ["PRIOR_CHANNELS", "motion_prior"]

PRIOR_CHANNELS = 3  # the prior's (dz, dy, dx)


def motion_prior(volume: Volume) -> np.ndarray:
    """The prior at half the model grid's resolution, where the cVAE predicts its velocity.

    Args:
        volume: the CT (HU) on the model grid, canonical frame, each edge even (64³: 6.25 mm voxels).

    Returns:
        (3, Z/2, Y/2, X/2) float32, components (dz, dy, dx) in voxels of the *model* grid: the mean of each
        2x2x2 block of the pull-back displacement at amplitude 1.

    Raises:
        BreathcastError: when the CT has no lungs to build the prior on (:func:`segment_thorax`).
    """
    grid = volume.grid
    u = build_real_motion_field(segment_thorax(volume), population_motion(), grid).displacement(1.0, 0.0)
    c, z, y, x = u.shape
    return u.reshape(c, z // 2, 2, y // 2, 2, x // 2, 2).mean(axis=(2, 4, 6)).astype(np.float32)
