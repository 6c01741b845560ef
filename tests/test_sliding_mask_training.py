"""A cVAE trained through the sliding mask it is served with (``CVAEConfig.sliding_mask``): the mask made in
training is the engine's, batches carry each moving scan's, and the displacement that warps the scan is masked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from breathcast.canonical import to_canonical
from breathcast.engine.package import DEFAULT_PACKAGE, read_package
from breathcast.engine.predictor import Plan, PredictorConfig, load_predictor
from breathcast.geometry import Volume, unit_to_hu
from breathcast.io.dicom_io import read_ct_series
from breathcast.model_box import model_box_volume
from breathcast.motion_prior import prior_and_sliding_mask, sliding_mask
from breathcast.segmentation import segment_thorax
from breathcast.sim.simulator import SimulationConfig
from breathcast.training.cvae import CVAE, CVAEConfig
from breathcast.training.data import sample_pairs, simulate_patients
from breathcast.training.evaluate import CVAEPredictor

from tests.conftest import shared_data_file

D = 32


@pytest.fixture(scope="module")
def patients():
    config = SimulationConfig(grid_size=D, n_scans=3, noise_hu=0.0, crop_probability=0.0)
    return simulate_patients(2, config, 5, D, with_priors=True, with_sliding_masks=True)


def test_the_training_mask_is_the_one_the_engine_serves_with():
    """On the real POPI CT and the shipped package's 64³ model box: the mask training makes on the box equals the
    engine's (made on the plan's own grid, then resampled) up to resampling, ~1 in the lungs, ~0 in the spine."""
    ct = read_ct_series(shared_data_file("ct/popi-phase00")).volume
    package = read_package(DEFAULT_PACKAGE)
    served = load_predictor(package, Plan(ct, np.ones(ct.shape[0])), PredictorConfig(path="direct"))._motion_weight[0]
    box, _ = model_box_volume(to_canonical(ct)[0], served.shape, tuple(package.manifest.model_box["extent_mm"]))
    seg = segment_thorax(box)
    prior, trained = prior_and_sliding_mask(box)
    np.testing.assert_array_equal(trained, sliding_mask(box, seg))
    assert trained[seg.lungs].mean() > 0.9 and trained[seg.spine].mean() < 0.01
    assert np.abs(trained - served).mean() < 0.04


def test_a_mask_trained_model_served_without_its_mask_says_so(tmp_path, small_patient):
    """The engine serves a mask-trained package with the mask silently, and without it with a warning."""
    from breathcast.engine.export import export_cvae
    from breathcast.engine.package import TraceSpec

    model = CVAE(CVAEConfig(grid=D, latent_dim=4, trace_embedding_dim=4, channels=(4, 4, 4, 4), sliding_mask=True)).eval()
    trace = TraceSpec(window_samples=448, sample_interval_s=2.3 / 447, slices=D)
    package = export_cvae(model, tmp_path / "masked", trace=trace, training={"model_box": {"anchor": "lungs", "extent_mm": [400.0, 400.0, 320.0]}})
    plan = Plan(Volume(small_patient.reference_hu, small_patient.grid), np.full(small_patient.grid.shape[0], 0.2))
    assert not any("sliding mask" in w for w in load_predictor(package, plan, PredictorConfig(path="direct")).plan_warnings)
    unmasked = load_predictor(package, plan, PredictorConfig(path="direct", sliding_mask=False))
    assert any("without the sliding mask the model was trained through" in w for w in unmasked.plan_warnings)


def test_batches_carry_each_moving_scans_mask_and_it_masks_the_warp(patients):
    """The stored mask is each scan's own (the one made from the [0, 1] image is the same); the batch's is the moving
    scan's; a zero mask leaves the moving image as it is, a mask of ones changes nothing."""
    p = patients[0]
    assert p.sliding_masks.shape == (3, D, D, D) and p.sliding_masks.dtype == np.float16
    np.testing.assert_allclose(sliding_mask(Volume(unit_to_hu(p.images[1]), p.grid)), p.sliding_mask(1), atol=1e-3)
    batch = sample_pairs(patients, 3, latent_dim=4, seed=0, step=1)
    for i, (pid, k, _) in enumerate(batch.pairs):
        stored = next(q for q in patients if q.patient_id == pid).sliding_masks[k]
        np.testing.assert_array_equal(batch.motion_weight[i, 0].numpy(), stored.astype(np.float32))
    torch.manual_seed(0)
    model = CVAE(CVAEConfig(grid=D, latent_dim=4, trace_embedding_dim=4, channels=(4, 4, 4, 4), prior_channels=3, sliding_mask=True))
    with torch.no_grad():
        model.velocity.weight.normal_(0.0, 0.05)
    args = (batch.moving, batch.fixed, batch.b_m, batch.b_f, batch.eps, batch.prior)
    plain = model(*args)
    assert plain.displacement.abs().max() > 0.1
    still = model(*args, torch.zeros_like(batch.motion_weight))
    assert still.displacement.abs().max() == 0
    torch.testing.assert_close(still.warped, batch.moving, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(*args, torch.ones_like(batch.motion_weight)).displacement, plain.displacement)
    masked = model(*args, batch.motion_weight)
    torch.testing.assert_close(masked.displacement, plain.displacement * batch.motion_weight)


def test_evaluation_serves_a_mask_trained_model_through_its_mask(patients):
    """The evaluation predictor multiplies a mask-trained model's field by the moving scan's mask, as the engine does."""
    config = dict(grid=D, latent_dim=4, trace_embedding_dim=4, channels=(4, 4, 4, 4), prior_channels=3)
    torch.manual_seed(0)
    plain = CVAE(CVAEConfig(**config))
    with torch.no_grad():
        plain.velocity.weight.normal_(0.0, 0.05)
    masked = CVAE(CVAEConfig(**config, sliding_mask=True))
    masked.load_state_dict(plain.state_dict())
    p = patients[1]
    u = CVAEPredictor(plain).predict(p, 0, p.amplitude[2])
    np.testing.assert_allclose(CVAEPredictor(masked).predict(p, 0, p.amplitude[2]), u * p.sliding_mask(0), atol=1e-6)


def test_train_cvae_through_the_sliding_mask_records_it(tmp_path):
    """`breathcast train cvae --sliding-mask` trains through the scans' masks and says so in the model's manifest."""
    from breathcast.cli import main
    from breathcast.training.cvae import load_cvae

    out = tmp_path / "run"
    assert main(["train", "cvae", "--simulate", "3", "--grid", "32", "--channels", "4", "4", "4", "4", "--steps", "2",
                 "--val-patients", "1", "--val-every", "2", "--motion-prior", "--sliding-mask", "--out", str(out), "-q"]) == 0
    assert json.loads((out / "manifest.json").read_text())["model"]["sliding_mask"] is True
    assert load_cvae(out / "model.pt").config.sliding_mask
