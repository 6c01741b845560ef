"""The anatomical motion prior and the cVAE that sees it: where it moves, that it follows the anatomy, and that
training, export and the engine give the network the same prior."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from stream_fixtures import tiny_ldm

from breathcast.canonical import to_canonical
from breathcast.engine.export import export_cvae
from breathcast.engine.package import TraceSpec
from breathcast.engine.predictor import Plan, PredictorConfig, load_predictor
from breathcast.errors import BreathcastError
from breathcast.geometry import HU_MIN, Volume, hu_to_unit, unit_to_hu
from breathcast.io.dicom_io import read_ct_series
from breathcast.model_box import model_box_volume
from breathcast.motion_prior import PRIOR_CHANNELS, PRIOR_VERSION, motion_prior, uncut_lungs
from breathcast.segmentation import segment_thorax
from breathcast.sim.simulator import SimulationConfig
from breathcast.training.cvae import CVAE, CVAEConfig, load_cvae, save_cvae
from breathcast.training.data import check_training_prior_version, motion_priors, prior_pool, sample_pairs, simulate_patients
from breathcast.training.inference import predict_displacement

from tests.conftest import shared_data_file

D = 32
BOX = {"anchor": "lungs", "extent_mm": [400.0, 400.0, 320.0]}


def _half(mask: np.ndarray) -> np.ndarray:
    """A full-grid mask -> the half grid's voxels that lie wholly inside it."""
    z, y, x = mask.shape
    return mask.reshape(z // 2, 2, y // 2, 2, x // 2, 2).all(axis=(1, 3, 5))


def test_the_prior_moves_the_lung_base_and_keeps_the_spine_and_the_outside_still():
    """On the real POPI CT in its 64³ model box: the lung base moves superior-inferior by several mm, the
    vertebrae and the air around the body by (almost) nothing (in the slices the CT shows: beyond its field of
    view the prior continues the anatomy)."""
    ct = to_canonical(read_ct_series(shared_data_file("ct/popi-phase00")).volume)[0]
    box, _ = model_box_volume(ct, (64, 64, 64))
    prior = motion_prior(box)
    assert prior.shape == (PRIOR_CHANNELS, 32, 32, 32) and prior.dtype == np.float32
    seg = segment_thorax(box)
    magnitude_mm = np.linalg.norm(prior * np.asarray(box.grid.spacing_zyx, np.float32)[:, None, None, None], axis=0)
    lungs = seg.lungs
    z = np.argwhere(lungs)[:, 0]
    base = lungs & (np.arange(64)[:, None, None] <= np.percentile(z, 20))
    assert magnitude_mm[_half(base)].mean() > 6.0
    assert magnitude_mm[_half(seg.spine)].mean() < 1.0
    in_view = seg.body.any(axis=(1, 2))[:, None, None]
    assert magnitude_mm[_half(~seg.body & in_view)].mean() < 0.5


def test_the_prior_follows_the_anatomy_not_the_frame(small_patient):
    """Moving the anatomy 4 voxels down the same grid moves the prior 2 half-grid voxels down, nothing else."""
    hu = small_patient.reference_hu
    shifted = np.full_like(hu, HU_MIN)
    shifted[:-4] = hu[4:]
    grid = small_patient.grid
    original, moved = motion_prior(Volume(hu, grid)), motion_prior(Volume(shifted, grid))
    inner = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    difference = np.abs(moved[:, :-2][inner] - original[:, 2:][inner])
    assert difference.max() < 0.05 * np.abs(original).max()


def _crop_z(volume: Volume, below_mm: float, above_mm: float) -> Volume:
    g = volume.grid
    z = g.origin[2] + g.spacing[2] * np.arange(g.shape[0])
    keep = np.flatnonzero((z >= z[0] + below_mm) & (z <= z[-1] - above_mm))
    grid = type(g)((len(keep),) + g.shape[1:], g.spacing, (g.origin[0], g.origin[1], float(z[keep[0]])))
    return Volume(np.ascontiguousarray(volume.array[keep]), grid)


def test_lungs_the_field_of_view_cuts_get_a_base_and_apex_near_the_real_ones():
    """POPI cut 60 mm from below and from above: the completed lung base and apex stay within 10 mm of those of
    the whole CT, where the segmentation alone puts them at the cut (over 20 mm off)."""
    ct = to_canonical(read_ct_series(shared_data_file("ct/popi-phase00")).volume)[0]

    def base_and_apex(volume: Volume, complete: bool) -> tuple[float, float]:
        box, _ = model_box_volume(volume, (64, 64, 64))
        seg = segment_thorax(box)
        seg = uncut_lungs(seg) if complete else seg
        return float(np.mean(seg.dome_z_mm[seg.lungs.any(axis=0)])), seg.apex_z_mm

    base, apex = base_and_apex(ct, True)
    cut_base = base_and_apex(_crop_z(ct, 60.0, 0.0), True)[0], base_and_apex(_crop_z(ct, 60.0, 0.0), False)[0]
    cut_apex = base_and_apex(_crop_z(ct, 0.0, 60.0), True)[1], base_and_apex(_crop_z(ct, 0.0, 60.0), False)[1]
    assert abs(cut_base[0] - base) < 10.0 < 20.0 < abs(cut_base[1] - base)
    assert abs(cut_apex[0] - apex) < 10.0 < 20.0 < abs(cut_apex[1] - apex)


def test_lungs_in_view_are_left_as_they_are(small_patient):
    """The whole body in view: nothing is cut, nothing is changed."""
    seg = segment_thorax(Volume(small_patient.reference_hu, small_patient.grid))
    completed = uncut_lungs(seg)
    np.testing.assert_array_equal(completed.dome_z_mm, seg.dome_z_mm)
    assert completed.apex_z_mm == seg.apex_z_mm


def test_a_model_with_a_prior_refuses_to_run_without_it():
    """Missing or unwanted priors are one-line errors, not silent zeros."""
    model = CVAE(CVAEConfig(grid=16, latent_dim=4, trace_embedding_dim=4, channels=(4, 4, 4, 4), prior_channels=3))
    image, trace = torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 16)
    with pytest.raises(BreathcastError, match="needs its motion prior"):
        model.predict(image, trace, trace)
    plain = CVAE(CVAEConfig(grid=16, latent_dim=4, trace_embedding_dim=4, channels=(4, 4, 4, 4)))
    with pytest.raises(BreathcastError, match="takes no motion prior"):
        plain.predict(image, trace, trace, prior=torch.zeros(1, 3, 8, 8, 8))


@pytest.fixture(scope="module")
def patients():
    return simulate_patients(2, SimulationConfig(grid_size=D, n_scans=4, noise_hu=0.0, crop_probability=0.0), 5, D, with_priors=True)


def test_training_batches_carry_each_moving_scans_prior(patients):
    """The stored prior is each scan's own; the one made from the [0, 1] image is the same; batches carry it."""
    p = patients[0]
    assert p.priors.shape == (4, PRIOR_CHANNELS, D // 2, D // 2, D // 2)
    without = type(p)(p.patient_id, p.images, p.amplitude, p.grid)
    np.testing.assert_allclose(without.motion_prior(2), p.priors[2], atol=1e-6)
    assert not np.allclose(p.priors[0], p.priors[1])  # scans at other breathing states: other priors
    batch = sample_pairs(patients, 3, latent_dim=4, seed=0, step=1)
    for i, (pid, k, _) in enumerate(batch.pairs):
        np.testing.assert_array_equal(batch.prior[i].numpy(), next(q for q in patients if q.patient_id == pid).priors[k])
    volumes = [Volume(unit_to_hu(image), p.grid) for image in np.concatenate([p.images, patients[1].images])]
    with prior_pool() as pool:
        np.testing.assert_array_equal(motion_priors(volumes, pool), np.stack([motion_prior(v) for v in volumes]))


@pytest.fixture(scope="module")
def prior_model():
    torch.manual_seed(0)
    model = CVAE(CVAEConfig(grid=D, latent_dim=4, trace_embedding_dim=4, channels=(4, 4, 4, 4), prior_channels=PRIOR_CHANNELS))
    with torch.no_grad():
        model.velocity.weight.normal_(0.0, 0.05)
    return model.eval()


def _served(model: CVAE, small_patient, folder) -> tuple:
    """Export ``model`` and serve it (direct path, no sliding mask) on the cartoon plan at amplitude 0.2, asked for
    amplitude 0.9: (package, served displacement, the plan's model box, b_m, b_f)."""
    trace = TraceSpec(window_samples=448, sample_interval_s=2.3 / 447, slices=D)
    package = export_cvae(model, folder, trace=trace, training={"model_box": BOX})
    plan = Plan(Volume(small_patient.reference_hu, small_patient.grid), np.full(small_patient.grid.shape[0], 0.2))
    predictor = load_predictor(package, plan, PredictorConfig(path="direct", sliding_mask=False))
    b_f = np.full(D, 0.9, np.float32)
    served = predictor.network_displacements(b_f[None])[0]
    box, _ = model_box_volume(plan.volume, (D, D, D), tuple(BOX["extent_mm"]))
    return package, served, box, predictor.b_m, b_f


def test_the_engine_gives_the_network_the_plans_prior(prior_model, patients, small_patient, tmp_path):
    """Export (parity checked against torch), then the predictor on a plan: its field is the torch model's on the
    plan's model box with that box's prior; another prior would give another field."""
    package, served, box, b_m, b_f = _served(prior_model, small_patient, tmp_path / "prior")
    assert [s.name for s in package.manifest.graphs["plan"].inputs] == ["moving", "b_m", "prior"]
    prior = motion_prior(box)
    expected = predict_displacement(prior_model, hu_to_unit(box.array), b_m, b_f, prior=prior)
    np.testing.assert_allclose(served, expected, atol=1e-4)
    other = predict_displacement(prior_model, hu_to_unit(box.array), b_m, b_f, prior=np.zeros_like(prior))
    assert np.abs(other - expected).max() > 10 * np.abs(served - expected).max()


def test_prior_versions_differ_as_their_definitions_say(small_patient):
    """Version 2 adds the lungs' front-back shift to version 1: the same superior-inferior motion, another front-back
    one. Version 3 steepens the superior-inferior motion's front-back gain: the back of the lungs moves more than in
    version 2, the front less. Version 4 leaves motion at the apex: the top of the lungs moves more than in version 3.
    An unknown version is refused."""
    volume = Volume(small_patient.reference_hu, small_patient.grid)
    first, second, third, fourth = (motion_prior(volume, version=v) for v in (1, 2, 3, 4))
    assert np.abs(first[0] - second[0]).mean() < 0.01  # dz, model-grid voxels; smoothed where the shift would fold
    assert np.abs(first[1] - second[1]).max() > 0.2  # dy
    lungs = _half(segment_thorax(volume).lungs)
    y = np.argwhere(lungs)[:, 1]
    back, front = y > np.percentile(y, 75), y < np.percentile(y, 25)  # LPS: y grows towards the back
    gain = np.abs(third[0][lungs]) - np.abs(second[0][lungs])  # dz, half-grid voxels
    assert gain[back].mean() > 0.05 and gain[front].mean() < -0.05
    z = np.argwhere(lungs)[:, 0]
    top = z > np.percentile(z, 80)
    assert (np.abs(fourth[0][lungs]) - np.abs(third[0][lungs]))[top].mean() > 0.05
    np.testing.assert_array_equal(motion_prior(volume), fourth)
    with pytest.raises(BreathcastError, match="unknown motion prior version 5"):
        motion_prior(volume, version=5)


def test_a_model_saved_before_prior_versions_takes_version_1(prior_model, tmp_path):
    """A model file without ``prior_version`` (every model before 2026-12-06) loads as version 1; a new one is
    :data:`PRIOR_VERSION`, and training refuses to make any other."""
    assert prior_model.config.prior_version == PRIOR_VERSION
    save_cvae(prior_model, tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    del payload["config"]["prior_version"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_cvae(tmp_path / "old.pt").config.prior_version == 1
    assert load_cvae(tmp_path / "model.pt").config.prior_version == PRIOR_VERSION
    with pytest.raises(BreathcastError, match="version 1"):
        check_training_prior_version(PRIOR_CHANNELS, 1)
    check_training_prior_version(0, 1)  # no prior, nothing to check


def test_the_engine_serves_a_package_the_prior_of_its_version(prior_model, small_patient, tmp_path):
    """A package of a version-1 model is served the version-1 prior: its field is the torch model's with that prior,
    not with today's."""
    import dataclasses

    old = CVAE(dataclasses.replace(prior_model.config, prior_version=1))
    old.load_state_dict(prior_model.state_dict())
    package, served, box, b_m, b_f = _served(old.eval(), small_patient, tmp_path / "v1")
    assert package.prior_version == 1
    unit = hu_to_unit(box.array)
    expected = predict_displacement(old, unit, b_m, b_f, prior=motion_prior(box, version=1))
    today = predict_displacement(old, unit, b_m, b_f, prior=motion_prior(box, version=PRIOR_VERSION))
    np.testing.assert_allclose(served, expected, atol=1e-4)
    assert np.abs(today - expected).max() > 10 * np.abs(served - expected).max()


def test_train_cvae_with_the_motion_prior_records_it(tmp_path):
    """`breathcast train cvae --motion-prior` trains on the scans' priors and says so in the model's manifest."""
    import json

    from breathcast.cli import main

    out = tmp_path / "run"
    assert main(["train", "cvae", "--simulate", "3", "--grid", "32", "--channels", "4", "4", "4", "4", "--steps", "2",
                 "--val-patients", "1", "--val-every", "2", "--motion-prior", "--out", str(out), "-q"]) == 0
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert (model["prior_channels"], model["prior_version"]) == (PRIOR_CHANNELS, PRIOR_VERSION)
    assert load_cvae(out / "model.pt").config.prior_channels == PRIOR_CHANNELS


def test_the_image_loss_ignores_the_slices_next_to_a_cut_field_of_view(small_patient):
    """A scan whose field of view ends 40 mm above the box's floor: its slices up to 25 mm above the cut (and
    below it) get no image loss; a scan whose body fills the box keeps every slice."""
    from breathcast.training.data import field_of_view_weight

    image = hu_to_unit(small_patient.reference_hu)
    slice_mm = small_patient.grid.spacing[2]
    assert field_of_view_weight(image, slice_mm, 25.0).min() == 1.0
    cut = image.copy()
    cut_slices = int(round(40.0 / slice_mm))
    cut[:cut_slices] = 0.0
    weight = field_of_view_weight(cut, slice_mm, 25.0)
    z_mm = (np.arange(len(weight)) - cut_slices) * slice_mm  # mm above the first slice in view
    assert (weight[z_mm < 25.0] == 0.0).all() and (weight[z_mm >= 25.0 + slice_mm] == 1.0).all()
    assert field_of_view_weight(cut, slice_mm, 0.0).min() == 1.0


def test_a_uniform_image_weight_is_the_plain_image_loss_and_a_zero_slice_drops_out():
    from breathcast.training.losses import image_loss

    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 16, 16, 16, generator=generator), torch.rand(2, 1, 16, 16, 16, generator=generator)
    ones = torch.ones(2, 1, 16, 1, 1)
    assert torch.allclose(image_loss(a, b, weight=ones), image_loss(a, b), rtol=1e-5)
    weight = ones.clone()
    weight[:, :, :8] = 0.0
    changed = b.clone()
    changed[:, :, :4] = 1.0 - changed[:, :, :4]  # only where the weight is 0, and beyond the 4x pooling's reach
    assert torch.allclose(image_loss(a, changed, weight=weight), image_loss(a, b, weight=weight))


def test_adapting_a_prior_model_feeds_it_each_scans_prior(prior_model, patients):
    """Per-patient adaptation of a model with a prior trains on the scans' priors (it would refuse without)."""
    from breathcast.training.adapt import AdaptConfig, adapt_cvae

    result = adapt_cvae(prior_model, patients[0], AdaptConfig(steps=3, learning_rate=1e-3))
    assert result.steps == 3 and result.model.config.prior_channels == PRIOR_CHANNELS
    p = patients[0]
    before = predict_displacement(prior_model, p.images[0], p.amplitude[0], p.amplitude[1], prior=p.priors[0])
    after = predict_displacement(result.model, p.images[0], p.amplitude[0], p.amplitude[1], prior=p.priors[0])
    assert np.abs(after - before).max() > 0


# -- the LDM that sees it ------------------------------------------------------------------------------------


def _prior_ldm():
    """A 32³ LDM with a motion prior (latent 4 x 8³)."""
    return tiny_ldm(grid=D, prior_channels=PRIOR_CHANNELS)


def test_an_ldm_with_a_prior_refuses_to_run_without_it():
    model = _prior_ldm()
    image, trace = torch.zeros(1, 1, D, D, D), torch.zeros(1, D)
    with pytest.raises(BreathcastError, match="needs its motion prior"):
        model.predict(image, trace, trace, steps=1)
    plain = tiny_ldm(grid=D)
    with pytest.raises(BreathcastError, match="takes no motion prior"):
        plain.predict(image, trace, trace, steps=1, prior=torch.zeros(1, 3, D // 2, D // 2, D // 2))


def test_the_ldms_velocity_decoder_reads_the_prior_and_the_fixed_trace(patients):
    """From the same sampled latent, another prior or another b_f gives another velocity: the decoder sees both
    (the latent alone would give the same)."""
    model = _prior_ldm()
    p = patients[0]
    moving = torch.from_numpy(p.images[:1])[:, None]
    b_m, b_f = torch.from_numpy(p.amplitude[:1]), torch.from_numpy(p.amplitude[2:3])
    prior = torch.from_numpy(p.priors[:1])
    condition = model.encode(moving, b_m)
    x0 = model.sample_latent(condition, b_f, steps=2)
    with torch.no_grad():
        velocity = model.decode_velocity(x0, condition, moving, prior, b_m, b_f)
        assert (model.decode_velocity(x0, condition, moving, torch.zeros_like(prior), b_m, b_f) - velocity).abs().max() > 1e-4
        assert (model.decode_velocity(x0, condition, moving, prior, b_m, 1.0 - b_f) - velocity).abs().max() > 1e-4


def test_the_engine_gives_the_ldm_the_plans_prior(small_patient, tmp_path):
    """Export (parity checked against torch), then the predictor on a plan: its field is the torch LDM's on the
    plan's model box with that box's prior."""
    from breathcast.engine.export import export_ldm

    model = _prior_ldm()
    trace = TraceSpec(window_samples=448, sample_interval_s=2.3 / 447, slices=D)
    package = export_ldm(model, tmp_path / "prior-ldm", trace=trace, training={"model_box": BOX}, sampling_steps=2)
    assert [s.name for s in package.manifest.graphs["decode"].inputs] == ["x0", "condition", "moving", "prior", "b_m", "b_f"]
    plan = Plan(Volume(small_patient.reference_hu, small_patient.grid), np.full(small_patient.grid.shape[0], 0.2))
    predictor = load_predictor(package, plan, PredictorConfig(path="direct", sliding_mask=False))
    b_f = np.stack([np.full(D, 0.9, np.float32), np.linspace(0.1, 0.6, D, dtype=np.float32)])
    served = predictor.network_displacements(b_f)
    box, _ = model_box_volume(plan.volume, (D, D, D), tuple(BOX["extent_mm"]))
    moving = torch.from_numpy(hu_to_unit(box.array))[None, None]
    prior = torch.from_numpy(motion_prior(box))[None]
    for k in range(2):
        expected = model.predict(moving, torch.from_numpy(predictor.b_m)[None], torch.from_numpy(b_f[k : k + 1]), steps=2,
                                 prior=prior)[0].numpy()  # fmt: skip
        np.testing.assert_allclose(served[k], expected, atol=1e-3)  # numba vs torch scaling and squaring
    assert np.abs(served[0] - served[1]).max() > 0.01


def test_train_ldm_with_the_motion_prior_records_it(tmp_path):
    """`breathcast train ldm --motion-prior` trains on the scans' priors and says so in the model's manifest."""
    import json

    from breathcast.cli import main
    from breathcast.training.ldm import load_ldm

    common = ["--simulate", "3", "--val-patients", "1", "--grid", str(D), "--steps", "2", "--val-every", "2", "-q"]
    assert main(["train", "autoencoder", *common, "--micro-batch", "2", "--out", str(tmp_path / "ae")]) == 0
    assert main(["train", "ldm", *common, "--micro-batch", "2", "--accumulation", "1", "--val-steps", "1", "--motion-prior",
                 "--autoencoder", str(tmp_path / "ae"), "--out", str(tmp_path / "ldm")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "ldm" / "manifest.json").read_text())["model"]["prior_channels"] == PRIOR_CHANNELS
    assert load_ldm(tmp_path / "ldm" / "model.pt").config.prior_channels == PRIOR_CHANNELS
