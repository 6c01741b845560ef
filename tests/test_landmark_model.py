"""The population motion model fitted to landmark pairs (breathcast/sim/landmark_model.py)."""

import numpy as np
import pytest

from breathcast.errors import BreathcastError
from breathcast.io.landmarks import LandmarkPairs, read_dirlab_cases
from breathcast.sim.landmark_model import fit_landmark_model, leave_one_out_tre
from tests.conftest import shared_data_file


def toy_case(seed: int, right_gain: float = 1.0, depth_mm: float = 10.0) -> LandmarkPairs:
    """Points in a 300 x 150 x 200 mm box; exhale -> inhale motion inferior, largest at the base and the back, the
    right lung (x < 150) moving ``right_gain`` times the left."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.0, 1.0, (400, 3)) * np.array([300.0, 150.0, 200.0])
    h, a = q[:, 2] / 200.0, q[:, 1] / 150.0
    d = np.zeros_like(q)
    d[:, 2] = -depth_mm * (1.0 - 0.7 * h) * (0.6 + 0.8 * a) * np.where(q[:, 0] < 150.0, right_gain, 1.0)
    d[:, 1] = -0.1 * d[:, 2] * a
    return LandmarkPairs(f"toy{seed}", q, q + d)


def test_the_model_recovers_a_pattern_shared_by_its_cases():
    cases = [toy_case(seed, depth_mm=depth) for seed, depth in ((0, 6.0), (1, 12.0), (2, 9.0))]
    model = fit_landmark_model(cases, "exhale->inhale")
    new = toy_case(7, depth_mm=4.0)
    d = new.displacement_mm
    predicted = model.predict(new.exhale_mm, float(np.abs(d[:, 2]).mean()))
    assert np.linalg.norm(predicted - d, axis=1).mean() < 0.05 * np.linalg.norm(d, axis=1).mean()
    assert max(leave_one_out_tre(cases, "exhale->inhale")) < 0.05 * 6.0


def test_the_direction_picks_the_starting_state_and_the_sign():
    case = toy_case(0)
    forward = fit_landmark_model([case], "exhale->inhale").predict(case.exhale_mm, 5.0)
    backward = fit_landmark_model([case], "inhale->exhale").predict(case.inhale_mm, 5.0)
    assert forward[:, 2].mean() < -4.0 and backward[:, 2].mean() > 4.0


def test_a_right_lung_that_moves_more_is_learnt_and_differing_patients_leave_an_error():
    right = fit_landmark_model([toy_case(0, right_gain=1.5)], "exhale->inhale").predict(toy_case(1).exhale_mm, 5.0)
    is_right = toy_case(1).exhale_mm[:, 0] < 150.0
    assert np.abs(right[is_right, 2]).mean() / np.abs(right[~is_right, 2]).mean() == pytest.approx(1.5, rel=0.1)
    differing = [toy_case(0, right_gain=0.7), toy_case(1, right_gain=1.4)]
    assert min(leave_one_out_tre(differing, "exhale->inhale")) > 0.5


def test_the_lungs_extent_places_the_points_instead_of_their_own_spread():
    case = toy_case(0)
    model = fit_landmark_model([case], "exhale->inhale")
    upper = case.exhale_mm[case.exhale_mm[:, 2] > 100.0]  # the upper half of the lungs only
    own = model.predict(upper, 5.0)  # their own spread reads them as base to apex
    placed = model.predict(upper, 5.0, (np.zeros(3), np.array([300.0, 150.0, 200.0])))
    assert np.abs(placed[:, 2]).mean() < np.abs(own[:, 2]).mean()


def test_bad_input_is_refused_with_a_reason():
    case = toy_case(0)
    still = LandmarkPairs("still", case.exhale_mm, case.exhale_mm.copy())
    with pytest.raises(BreathcastError, match="do not move"):
        fit_landmark_model([still])
    with pytest.raises(BreathcastError, match="at least one case"):
        fit_landmark_model([])
    with pytest.raises(BreathcastError, match="direction"):
        fit_landmark_model([case], "inhale")
    with pytest.raises(BreathcastError, match="two cases"):
        leave_one_out_tre([case])


def test_on_dirlab_the_population_model_beats_no_motion_on_every_unseen_case():
    cases = read_dirlab_cases(shared_data_file("landmarks/dirlab"))
    errors = leave_one_out_tre(cases)
    for case, error in zip(cases, errors):
        assert error < 0.7 * np.linalg.norm(case.displacement_mm, axis=1).mean(), case.name
