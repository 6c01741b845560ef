"""breathcast: the core library every part of the project shares.

Geometry (:class:`~breathcast.geometry.Volume`), warp kernels (numba for inference, torch for training),
breathing traces, the synthetic 5DCT simulator, metrics, dataset I/O and the ``breathcast`` CLI.
The core imports none of ``breathcast.stream``, ``.engine``, ``.training`` or ``.calibration``.
"""

__version__ = "0.1.0"
