"""Files in and out: the dataset format (NIfTI + JSON), DICOM CT series, RTSTRUCT, DICOM deformable registration.

May import the rest of the core (``breathcast.*``), never training/engine/calibration/stream.
"""
