"""breathcast.engine: model packages (ONNX graphs + manifest), export, runtimes and the per-plan predictor.

May import breathcast (core), and breathcast.training only for export.
"""

import os

# numba's OpenMP worker threads must sleep, not spin, between kernels: the engine alternates them with
# onnxruntime's own pool on the same cores. Measured on 2 busy cores: 7-step scaling and squaring at 32³
# took 244 ms with the default wait policy and 2.5 ms with PASSIVE. Read once, when OpenMP first loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
