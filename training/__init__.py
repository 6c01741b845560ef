"""breathcast.training: the motion models and how they are trained and evaluated.

``cvae`` (the paper's conditional VAE), ``losses``, ``data`` (patients at the model grid, deterministic pair
batches), ``train`` (single process or torchrun/DDP), ``evaluate`` (Table 1, Fig. 5), ``inference`` (the shipped
model). May import breathcast (core) only.
"""
