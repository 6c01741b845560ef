"""breathcast.calibration: surrogate calibration, helical slice-time alignment, the per-patient 5D model.

May import breathcast (core) only. Nothing here yet: see the calibration issue.
"""
