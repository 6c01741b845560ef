"""The engine with a lung-centred package: the box on the plan's lungs, the plan check, the sliding mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from breathcast.engine.export import export_cvae
from breathcast.engine.package import TraceSpec
from breathcast.engine import predictor as predictor_module
from breathcast.engine.predictor import Plan, PredictorConfig, load_predictor
from breathcast.errors import PlanRejected
from breathcast.geometry import Grid, Volume, field_to_lps_mm
from breathcast.model_box import check_plan
from breathcast.training.cvae import CVAE, CVAEConfig
from breathcast.warp import count_folds

D = 16
BOX = {"anchor": "lungs", "extent_mm": [400.0, 400.0, 320.0]}
TRACE = TraceSpec(window_samples=448, sample_interval_s=2.3 / 447, slices=D)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = CVAE(CVAEConfig(grid=D, latent_dim=4, trace_embedding_dim=4, channels=(4, 4, 4, 4)))
    with torch.no_grad():
        model.velocity.weight.normal_(0.0, 0.05)
    return export_cvae(model.eval(), tmp_path_factory.mktemp("pkg") / "boxed", trace=TRACE, training={"model_box": BOX})


@pytest.fixture(scope="module")
def plan(small_patient) -> Plan:
    return Plan(Volume(small_patient.reference_hu, small_patient.grid), np.linspace(0.0, 0.3, small_patient.grid.shape[0]))


def test_the_package_records_its_box(package):
    """An export from a lung-centred training run carries the box in its manifest."""
    assert package.manifest.model_box == BOX


def test_the_model_grid_is_the_box_on_the_plans_lungs(package, plan):
    """The predictor's grid is the 400 x 400 x 320 mm box centred on the lungs; the plan's trace follows z."""
    predictor = load_predictor(package, plan, PredictorConfig(path="direct"))
    centre = predictor.grid.index_to_lps(np.full(3, (D - 1) / 2.0))
    np.testing.assert_allclose(centre, check_plan(plan.volume).lung_centre_lps_mm, atol=1e-6)
    assert predictor.grid.extent_mm == pytest.approx((400.0, 400.0, 320.0))
    box_z = predictor.grid.origin[2] + predictor.grid.spacing[2] * np.arange(D)
    plan_z = plan.volume.grid.origin[2] + plan.volume.grid.spacing[2] * np.arange(plan.volume.shape[0])
    np.testing.assert_allclose(predictor.b_m, np.interp(box_z, plan_z, plan.amplitude), atol=1e-6)


def test_the_sliding_mask_keeps_the_spine_and_the_outside_still(package, plan):
    """With the mask, the network's motion vanishes on the vertebrae and outside the body; without, it does not."""
    b_f = np.ones((1, D), np.float32)
    masked = load_predictor(package, plan, PredictorConfig(path="direct"))
    alone = load_predictor(package, plan, PredictorConfig(path="direct", sliding_mask=False))
    u_masked = np.linalg.norm(field_to_lps_mm(masked.network_displacements(b_f)[0], masked.grid), axis=0)
    u_alone = np.linalg.norm(field_to_lps_mm(alone.network_displacements(b_f)[0], alone.grid), axis=0)
    weight = masked._motion_weight[0]
    still, moving = weight < 1e-3, weight > 0.999
    assert still.any() and moving.any()
    assert u_masked[still].max() <= 1e-3 * u_alone[still].max() and u_alone[still].mean() > 0.1 * u_alone.mean()
    np.testing.assert_allclose(u_masked[moving], u_alone[moving], rtol=1e-3, atol=1e-4)


def test_the_sliding_mask_continues_past_the_plans_slices(package, small_patient):
    """A plan whose CT ends inside the box: below its first slice the mask is its bottom face's, not 0, so the motion
    the network carries across a field-of-view cut (as the prior does) is not stopped there, where it would fold."""
    g, drop = small_patient.grid, small_patient.grid.shape[0] // 4
    grid = Grid((g.shape[0] - drop,) + g.shape[1:], g.spacing, (g.origin[0], g.origin[1], g.origin[2] + drop * g.spacing[2]))
    cut = Plan(Volume(np.ascontiguousarray(small_patient.reference_hu[drop:]), grid), np.zeros(grid.shape[0]))
    predictor = load_predictor(package, cut, PredictorConfig(path="direct"))
    box_z = predictor.grid.origin[2] + predictor.grid.spacing[2] * np.arange(D)
    below = np.flatnonzero(box_z < grid.origin[2])
    weight = predictor._motion_weight[0]
    assert len(below) >= 1 and weight[below].max() > 0.5
    np.testing.assert_array_equal(weight[below], np.broadcast_to(weight[below[-1]], weight[below].shape))


def test_the_sliding_mask_does_not_fold_a_superior_inferior_motion(tmp_path, small_patient, monkeypatch):
    """On a 64³ box, the mask times a uniform 15 mm inferior-superior pull-back: the mask's fall along z (the apex,
    the edge behind the spine) compresses that motion; smoothed along z it does not fold, the plain tanh step does
    (1779 voxels; at 20 mm the smoothed one folds too: the smoothing moves the limit, it does not remove it)."""
    model = CVAE(CVAEConfig(grid=64, latent_dim=2, trace_embedding_dim=2, channels=(2, 2, 2, 2)))
    trace = TraceSpec(window_samples=448, sample_interval_s=2.3 / 447, slices=64)
    package = export_cvae(model.eval(), tmp_path / "box64", trace=trace, training={"model_box": BOX})
    plan = Plan(Volume(small_patient.reference_hu, small_patient.grid), np.zeros(small_patient.grid.shape[0]))

    def folds() -> int:
        predictor = load_predictor(package, plan, PredictorConfig(path="direct"))
        u = np.zeros((3,) + predictor._motion_weight.shape[1:], np.float32)
        u[0] = 15.0 / predictor.grid.spacing[2] * predictor._motion_weight[0]
        return count_folds(u)

    assert folds() == 0
    monkeypatch.setattr(predictor_module, "SLIDING_Z_SIGMA_MM", 0.0)
    assert folds() > 0


def test_a_plan_without_lungs_is_rejected_by_a_lung_centred_package(package):
    """A plan whose lungs cannot be found is refused with the reason, never served on a guessed box."""
    grid = Grid((24, 32, 32), (10.0, 10.0, 10.0), origin=(-155.0, -155.0, -115.0))
    with pytest.raises(PlanRejected, match="no lungs found"):
        load_predictor(package, Plan(Volume(np.full(grid.shape, 30.0, np.float32), grid), np.zeros(24)))
