"""cVAE training: the model learns, inference is deterministic, DDP equals one process, resume is exact."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from breathcast.errors import BreathcastError, DatasetError
from breathcast.sim.simulator import SimulationConfig, simulate_dataset
from breathcast.training.cvae import CVAE, CVAEConfig, load_cvae, save_cvae
from breathcast.training.data import sample_pairs, simulate_patients, with_pair_truth
from breathcast.training.losses import LossWeights, cvae_loss, field_loss
from breathcast.training.train import TrainConfig, learning_rate_at, train, training_step

TINY = CVAEConfig(grid=32, channels=(8, 8, 16, 16))


@pytest.fixture(scope="module")
def patients():
    return simulate_patients(3, SimulationConfig(grid_size=32, n_scans=3, noise_hu=0.0), seed=11, grid_size=32)


def _loss(model, batch):
    with torch.no_grad():
        return float(cvae_loss(model(batch.moving, batch.fixed, batch.b_m, batch.b_f, batch.eps), batch.fixed, LossWeights()).total)


def test_one_training_step_lowers_the_loss(patients):
    """One Adam step on a fixed batch lowers the loss on that batch."""
    torch.manual_seed(0)
    model = CVAE(TINY)
    batch = sample_pairs(patients, 2, TINY.latent_dim, seed=0, step=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # the paper's, as training uses
    before = _loss(model, batch)
    training_step(model, batch, LossWeights())
    optimizer.step()
    assert _loss(model, batch) < before


def test_the_model_overfits_a_single_pair(patients):
    """Trained on one pair, the warp error falls to a small fraction of no deformation, without folding."""
    torch.manual_seed(0)
    model = CVAE(TINY)
    # The pair of the most different breathing states, so there is motion to learn.
    p = patients[0]
    k, j = int(np.argmin(p.amplitude.mean(1))), int(np.argmax(p.amplitude.mean(1)))
    moving, fixed = torch.from_numpy(p.images[k])[None, None], torch.from_numpy(p.images[j])[None, None]
    b_m, b_f = torch.from_numpy(p.amplitude[k])[None], torch.from_numpy(p.amplitude[j])[None]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    no_deformation = float(((moving - fixed) ** 2).mean())
    for _ in range(120):
        optimizer.zero_grad()
        out = model(moving, fixed, b_m, b_f, torch.zeros(1, TINY.latent_dim))
        cvae_loss(out, fixed, LossWeights(kl=0.0)).total.backward()
        optimizer.step()
    from breathcast.warp import count_folds
    from breathcast.warp_torch import warp

    u = model.predict(moving, b_m, b_f, z=model.encoder(moving, fixed)[0])
    error = float(((warp(moving, u) - fixed) ** 2).mean())
    assert error < 0.15 * no_deformation
    assert count_folds(u[0].numpy()) == 0


def test_z0_inference_is_deterministic_and_z_samples_vary(patients):
    """predict() with z = 0 gives the same field twice; sampled z give a spread (the uncertainty map)."""
    torch.manual_seed(0)
    model = CVAE(TINY).eval()
    with torch.no_grad():  # make the latent matter for this check
        model.bottleneck[0].weight.normal_(0, 0.05)
        model.velocity.weight.normal_(0, 0.01)
    batch = sample_pairs(patients, 1, TINY.latent_dim, seed=0, step=0)
    a = model.predict(batch.moving, batch.b_m, batch.b_f)
    b = model.predict(batch.moving, batch.b_m, batch.b_f)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = model.predict(batch.moving, batch.b_m, batch.b_f, z=torch.randn(1, TINY.latent_dim))
    assert float((a - c).abs().max()) > 1e-4


def test_uncertainty_map_from_latent_samples(patients):
    """N samples of z give a reproducible per-voxel spread in mm; a model that ignores z gives none."""
    from breathcast.training.inference import predict_with_uncertainty

    torch.manual_seed(0)
    model = CVAE(TINY).eval()
    p = patients[0]
    args = (p.images[0], p.amplitude[0], p.amplitude[1], p.grid)
    with torch.no_grad():
        model.velocity.weight.zero_()  # z cannot matter: no spread
    _, flat = predict_with_uncertainty(model, *args, samples=3)
    assert float(flat.max()) == 0.0
    with torch.no_grad():
        model.bottleneck[0].weight.normal_(0, 0.05)
        model.velocity.weight.normal_(0, 0.01)
    u, std = predict_with_uncertainty(model, *args, samples=4, seed=3)
    _, again = predict_with_uncertainty(model, *args, samples=4, seed=3)
    assert std.shape == p.images.shape[1:] and float(std.max()) > 0.0
    np.testing.assert_array_equal(std, again)
    assert u.shape == (3, *p.images.shape[1:])


def test_model_file_round_trip(tmp_path):
    """A saved model loads with the same configuration and weights; a foreign file is refused."""
    torch.manual_seed(0)
    model = CVAE(TINY)
    save_cvae(model, tmp_path / "m.pt")
    loaded = load_cvae(tmp_path / "m.pt")
    assert loaded.config == TINY
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(BreathcastError, match="not a breathcast cVAE model file"):
        load_cvae(tmp_path / "other.pt")


def test_two_ddp_processes_give_the_gradients_of_one_process(tmp_path):
    """torchrun with 2 gloo processes (each half the batch) gives the same gradients as 1 process."""
    script = Path(__file__).with_name("ddp_gradients.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], check=True, env=env, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path / "two.pt")],
        check=True, env=env, timeout=300, capture_output=True,
    )
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-7, msg=name)


def _config(out, **kw):
    return TrainConfig(out=out, simulate_patients=3, model=TINY, val_patients=1, val_pairs=2, val_every=2,
                       checkpoint_every=2, steps=4, batch_size=2, progress=False, **kw)


def test_resume_continues_exactly(tmp_path):
    """4 steps straight equal 2 steps, a checkpoint, and 2 more steps after resuming."""
    straight = train(_config(tmp_path / "straight"))
    train(dataclasses.replace(_config(tmp_path / "resumed"), steps=2))
    resumed = train(_config(tmp_path / "resumed"))
    a, b = load_cvae(straight / "model.pt"), load_cvae(resumed / "model.pt")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-7, msg=name)
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 4 and len(manifest["files"]["model.pt"]) == 64
    rows = (resumed / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4"]


def test_cosine_schedule_anneals_to_a_hundredth(tmp_path):
    """lr(0) = lr, halfway the middle, lr / 100 at the end; the training run steps with it."""
    config = _config(tmp_path / "run", lr_schedule="cosine", learning_rate=1e-3)
    assert learning_rate_at(config, 0) == pytest.approx(1e-3)
    assert learning_rate_at(config, 2) == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert learning_rate_at(config, 4) == pytest.approx(1e-5)
    assert learning_rate_at(dataclasses.replace(config, lr_schedule="constant"), 3) == 1e-3
    out = train(config)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(learning_rate_at(config, 3))
    assert json.loads((out / "manifest.json").read_text())["training"]["lr_schedule"] == "cosine"


def test_an_unknown_schedule_is_refused(tmp_path):
    with pytest.raises(BreathcastError, match="lr_schedule must be one of constant, cosine"):
        _config(tmp_path / "run", lr_schedule="step")


@pytest.fixture()
def tiny_dataset(tmp_path):
    simulate_dataset(tmp_path / "ds", 3, SimulationConfig(grid_size=32, n_scans=2), seed=4)
    return tmp_path / "ds"


def test_missing_trace_is_named(tiny_dataset, tmp_path):
    """A scan sidecar without its trace stops training with the file's name, not a torch traceback."""
    sidecar = tiny_dataset / "patient_001" / "scan_01.json"
    data = json.loads(sidecar.read_text())
    del data["amplitude"]
    sidecar.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"patient_001/scan_01\.json: no 'amplitude' entry"):
        train(TrainConfig(out=tmp_path / "run", data=tiny_dataset, model=TINY, val_patients=0, steps=1, progress=False))


def test_mismatched_trace_length_is_named(tiny_dataset, tmp_path):
    """A per-slice trace of the wrong length stops training with the file's name and both lengths."""
    sidecar = tiny_dataset / "patient_002" / "scan_00.json"
    data = json.loads(sidecar.read_text())
    data["amplitude"] = data["amplitude"][:10]
    sidecar.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"patient_002/scan_00\.json: 'amplitude' has 10 values; the scan has 32 slices"):
        train(TrainConfig(out=tmp_path / "run", data=tiny_dataset, model=TINY, val_patients=0, steps=1, progress=False))


def test_empty_split_is_refused(tiny_dataset, tmp_path):
    """Asking for more held-out patients than there are leaves no training split: a clear error."""
    with pytest.raises(BreathcastError, match="the training split is empty: 3 patient"):
        train(TrainConfig(out=tmp_path / "run", data=tiny_dataset, model=TINY, val_patients=2, test_patients=1, steps=1, progress=False))


def test_cli_train_exits_2_on_bad_input(tmp_path, capsys):
    """The CLI turns a bad dataset path into a one-line error and exit code 2."""
    from breathcast.cli import main

    assert main(["train", "cvae", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), "-q"]) == 2
    assert "dataset folder does not exist" in capsys.readouterr().err


def test_pair_truth_from_cached_inverses_equals_the_pair_field(patients):
    """with_pair_truth stores each scan's true field and its inverse in float16; a pair's true field from them is
    the composition pair_field computes, to float16's precision."""
    p = patients[0]
    cached = with_pair_truth(p)
    assert cached.fields.dtype == np.float16 and cached.inverse_fields.shape == p.fields.shape
    exact, fast = p.true_pair_field(0, 2), cached.true_pair_field(0, 2)
    assert np.abs(exact).max() > 0.5
    np.testing.assert_allclose(fast, exact, atol=0.02)


def test_with_pair_truth_refuses_a_patient_without_true_fields(patients):
    with pytest.raises(DatasetError, match="patient .* has no ground-truth fields: the field loss needs simulated patients"):
        with_pair_truth(dataclasses.replace(patients[0], fields=None))


def test_the_field_loss_teaches_the_true_field(patients):
    """Trained on one pair with the field loss, the predicted field comes much closer to the true one than the
    image loss alone brings it in the same steps."""
    p = with_pair_truth(patients[0])
    k, j = int(np.argmin(p.amplitude.mean(1))), int(np.argmax(p.amplitude.mean(1)))
    moving, fixed = torch.from_numpy(p.images[k])[None, None], torch.from_numpy(p.images[j])[None, None]
    b_m, b_f = torch.from_numpy(p.amplitude[k])[None], torch.from_numpy(p.amplitude[j])[None]
    truth = torch.from_numpy(p.true_pair_field(k, j))[None]

    def field_error(weights: LossWeights) -> float:
        torch.manual_seed(0)
        model = CVAE(TINY)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(60):
            optimizer.zero_grad()
            out = model(moving, fixed, b_m, b_f, torch.zeros(1, TINY.latent_dim))
            cvae_loss(out, fixed, weights, true_field=truth).total.backward()
            optimizer.step()
        with torch.no_grad():
            u = model.predict(moving, b_m, b_f, z=model.encoder(moving, fixed)[0])
        return float(field_loss(u, truth))

    image_only, with_field = field_error(LossWeights(kl=0.0)), field_error(LossWeights(kl=0.0, field=0.1))
    assert with_field < 0.5 * image_only


def test_training_with_the_field_loss_records_it(tmp_path):
    """A run with a field weight loads the true fields, trains on them and logs the field term."""
    out = train(_config(tmp_path / "run", loss=LossWeights(field=0.1)))
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert all(float(r.split(",")[header.index("field")]) > 0 for r in rows[1:])
    assert json.loads((out / "manifest.json").read_text())["training"]["loss"]["field"] == 0.1


def test_the_field_loss_without_true_fields_is_refused(patients):
    model = CVAE(TINY)
    batch = sample_pairs(patients, 2, TINY.latent_dim, seed=0, step=0)
    out = model(batch.moving, batch.fixed, batch.b_m, batch.b_f, batch.eps)
    with pytest.raises(ValueError, match="the field loss needs the pairs' true fields"):
        cvae_loss(out, batch.fixed, LossWeights(field=0.1))
