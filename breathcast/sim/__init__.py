"""The synthetic 5DCT simulator: cartoon anatomy, breathing motion, fast helical scans and their ground truth.

May import the rest of the core (``breathcast.*``), never training/engine/calibration/stream.
"""
