"""Grids that tests share."""

from breathcast.geometry import Grid

OBLIQUE = Grid(
    shape=(4, 5, 6),
    spacing=(0.8, 1.5, 2.5),
    origin=(-10.0, 20.0, 35.0),
    direction=((0.0, 0.0, 1.0), (-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
)
"""Axes permuted and flipped, anisotropic spacing, off-centre origin: catches most convention slips."""
