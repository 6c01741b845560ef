"""breathcast.calibration: surrogate calibration, helical slice-time alignment, the per-patient 5D model.

* ``readers``: raw surrogate recordings (generic CSV, the optical-marker files, Varian RPM .vxp).
* ``surrogate``: raw signal -> normalised amplitude (the calibration file, and the same function live).
* ``report``: the per-recording report, printed and drawn.
* ``alignment``: per-slice acquisition times of a helical scan, the scan placed on the trace, per-slice traces.
* ``motion_model``: the 5D motion model of Low et al. from SimpleITK registrations or ground truth, its files,
  and its evaluation predictor.

May import breathcast (core) only; SimpleITK is imported where registration runs.
"""
