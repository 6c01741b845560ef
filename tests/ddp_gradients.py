"""Run under torchrun (or alone): the gradients of one cVAE training step, saved by rank 0.

Used by tests/test_training.py to compare 2 data-parallel processes with 1 process on the same global batch.
Usage: python tests/ddp_gradients.py OUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main(out: str) -> None:
    from breathcast.sim.simulator import SimulationConfig
    from breathcast.training.cvae import CVAE, CVAEConfig
    from breathcast.training.data import sample_pairs, simulate_patients
    from breathcast.training.losses import LossWeights
    from breathcast.training.train import _init_distributed, training_step

    env = _init_distributed()
    torch.set_num_threads(1)
    config = CVAEConfig(grid=32, channels=(8, 8, 16, 16))
    patients = simulate_patients(2, SimulationConfig(grid_size=32, n_scans=3), seed=5, grid_size=32)
    torch.manual_seed(0)
    model = CVAE(config)
    network = torch.nn.parallel.DistributedDataParallel(model) if env.world_size > 1 else model
    batch = sample_pairs(patients, 4, config.latent_dim, seed=1, step=3, rank=env.rank, world_size=env.world_size)
    training_step(network, batch, LossWeights())
    if env.main:
        torch.save({name: p.grad for name, p in model.named_parameters()}, out)
    if env.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
