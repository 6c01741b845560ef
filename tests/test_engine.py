"""Engine: packages (hashes, versions), export parity, runtimes, the predictor's three paths and window modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume, field_to_lps_mm
from breathcast.state_model import LINEAR_5D_TERMS, design_matrix, evaluate_terms
from breathcast.training.cvae import CVAE, CVAEConfig
from breathcast.engine.export import PARITY_TOLERANCE, export_cvae, export_linear5d
from breathcast.engine.graphs import PLAN_OUTPUTS, FrameGraph, PlanGraph
from breathcast.engine.package import PackageError, TraceSpec, read_package
from breathcast.engine.predictor import (
    DistillationConfig,
    Plan,
    Predictor,
    PredictorConfig,
    design_states,
    load_predictor,
    window_states,
)
from breathcast.engine.runtimes import RuntimeConfig, RuntimeUnavailable, open_graph, runtime_available

D = 16
TRACE = TraceSpec(window_samples=448, sample_interval_s=2.3 / 447, slices=D)


def _tiny_model(seed: int = 0) -> CVAE:
    torch.manual_seed(seed)
    model = CVAE(CVAEConfig(grid=D, latent_dim=4, trace_embedding_dim=4, channels=(4, 4, 4, 4)))
    with torch.no_grad():  # weights large enough that the velocity is not ~0 (the last layer starts near 0)
        model.velocity.weight.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory):
    return export_cvae(_tiny_model(), tmp_path_factory.mktemp("pkg") / "tiny", trace=TRACE)


@pytest.fixture(scope="module")
def plan() -> Plan:
    grid = Grid.centered((D, D, D), (200.0, 200.0, 160.0))
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 400, size=grid.shape).astype(np.float32)
    return Plan(Volume(hu, grid), np.linspace(0.1, 0.4, D), target_lps_mm=np.array([[0.0, 0.0, 0.0], [20.0, -10.0, 30.0]]))


def _copy(package, tmp_path: Path) -> Path:
    return Path(shutil.copytree(package.path, tmp_path / "copy"))


def _window(seed: int = 1) -> np.ndarray:
    t = np.arange(TRACE.window_samples) * TRACE.sample_interval_s
    return 0.5 - 0.45 * np.cos(2 * np.pi * t / 4.0 + seed)


# -- packages -----------------------------------------------------------------------------------------------


def test_package_manifest_lists_every_file_with_its_hash(package):
    manifest = package.manifest
    assert set(manifest.files) == {"plan.onnx", "frame.onnx", "model.pt"}
    assert manifest.kind == "cvae" and manifest.grid == (D, D, D) and manifest.trace == TRACE
    assert manifest.model_id.startswith("cvae-v1-")
    assert [s.name for s in manifest.graphs["frame"].outputs] == ["velocity"]
    assert manifest.metrics["export_parity"]["max_abs_velocity_difference_voxels"] <= PARITY_TOLERANCE


def test_tampered_graph_is_refused(package, tmp_path):
    path = _copy(package, tmp_path)
    data = bytearray((path / "frame.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "frame.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="frame.onnx: sha256 does not match"):
        read_package(path)


def test_truncated_or_missing_file_is_refused(package, tmp_path):
    path = _copy(package, tmp_path)
    (path / "plan.onnx").write_bytes((path / "plan.onnx").read_bytes()[:100])
    with pytest.raises(PackageError, match="plan.onnx: sha256"):
        read_package(path)
    (path / "plan.onnx").unlink()
    with pytest.raises(PackageError, match="listed in the manifest but missing"):
        read_package(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.update(format="something-else"), "not a breathcast-model-package manifest"),
        (lambda m: m.update(kind="gan"), "unknown model kind"),
        (lambda m: m["files"].pop("frame.onnx"), "frame.onnx is used but has no sha256"),
        (lambda m: m.update(model_id="cvae-v1-000000000000"), "model_id"),
        (lambda m: m.pop("trace"), "malformed manifest"),
    ],
)
def test_mismatched_manifest_is_refused(package, tmp_path, change, message):
    path = _copy(package, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=message):
        read_package(path)


def test_not_a_package(tmp_path):
    with pytest.raises(PackageError, match="not found"):
        read_package(tmp_path / "nothing")
    with pytest.raises(PackageError, match="no manifest.json"):
        read_package(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="unreadable manifest"):
        read_package(tmp_path)


def test_wrong_kind_is_refused(package):
    with pytest.raises(PackageError, match="expected 'linear5d'"):
        read_package(package.path, kind="linear5d")


def test_export_does_not_overwrite_unless_asked(package):
    with pytest.raises(PackageError, match="already exists"):
        export_cvae(_tiny_model(), package.path, trace=TRACE)


# -- graphs and runtimes ------------------------------------------------------------------------------------


def test_split_graphs_equal_the_cvae_decoder():
    model = _tiny_model(3)
    moving = torch.rand(1, 1, D, D, D)
    b_m, b_f, z = torch.rand(1, D), torch.rand(3, D), torch.randn(3, 4)
    with torch.no_grad():
        reference = model.decode_velocity(moving.expand(3, -1, -1, -1, -1), b_m.expand(3, -1), b_f, z)
        split = FrameGraph(model)(*PlanGraph(model)(moving, b_m), b_m, b_f, z)
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(split, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_runtimes_agree_with_torch_model_on_the_velocity(package, runtime):
    model = _tiny_model()
    rng = np.random.default_rng(2)
    moving = rng.random((1, 1, D, D, D), dtype=np.float32)
    b_m = rng.random((1, D), dtype=np.float32)
    b_f = rng.random((5, D), dtype=np.float32)
    z = np.zeros((5, 4), np.float32)
    config = RuntimeConfig(kind=runtime, intra_op_threads=1)
    plan_out = open_graph(package, "plan", config).run({"moving": moving, "b_m": b_m})
    (velocity,) = open_graph(package, "frame", config).run(dict(zip(PLAN_OUTPUTS, plan_out)) | {"b_m": b_m, "b_f": b_f, "z": z})
    with torch.no_grad():
        reference = model.decode_velocity(torch.from_numpy(moving).expand(5, -1, -1, -1, -1), torch.from_numpy(b_m).expand(5, -1), torch.from_numpy(b_f), torch.from_numpy(z))
    assert velocity.shape == (5, 3, D // 2, D // 2, D // 2)
    assert np.abs(velocity - reference.numpy()).max() <= PARITY_TOLERANCE


def test_tensorrt_is_skipped_cleanly_without_a_gpu(package):
    available, reason = runtime_available("tensorrt")
    if available:
        pytest.skip("TensorRT is available here: the GPU test below runs instead")
    assert reason and "\n" not in reason
    with pytest.raises(RuntimeUnavailable, match="TensorRT"):
        open_graph(package, "frame", RuntimeConfig(kind="tensorrt"))


@pytest.mark.tensorrt
def test_tensorrt_matches_onnxruntime(package):
    available, reason = runtime_available("tensorrt")
    if not available:
        pytest.skip(reason)
    rng = np.random.default_rng(4)
    feed = {"moving": rng.random((1, 1, D, D, D), dtype=np.float32), "b_m": rng.random((1, D), dtype=np.float32)}
    reference = open_graph(package, "plan", RuntimeConfig())
    engine = open_graph(package, "plan", RuntimeConfig(kind="tensorrt"))
    for a, b in zip(reference.run(feed), engine.run(feed)):
        assert np.abs(a - b).max() < 1e-3


def test_bad_runtime_settings():
    with pytest.raises(BreathcastError, match="runtime must be one of"):
        RuntimeConfig(kind="tvm")
    with pytest.raises(BreathcastError, match="precision"):
        RuntimeConfig(precision="int4")


# -- windows ------------------------------------------------------------------------------------------------


def test_window_mode_maps_oldest_sample_to_slice_0_and_snapshot_takes_the_newest():
    ramp = np.linspace(0.0, 1.0, TRACE.window_samples)  # rate = 1 / window duration
    a, r = window_states(ramp, TRACE, D, "window")
    np.testing.assert_allclose(a, np.linspace(0.0, 1.0, D), atol=1e-12)
    np.testing.assert_allclose(r, 1.0 / TRACE.window_duration_s, rtol=1e-6)
    a, r = window_states(ramp, TRACE, D, "snapshot")
    np.testing.assert_allclose(a, 1.0)
    np.testing.assert_allclose(r, 1.0 / TRACE.window_duration_s, rtol=1e-6)


@pytest.mark.parametrize("window, message", [(np.zeros(10), "448 samples"), (np.full(448, np.nan), "NaN")])
def test_bad_windows_are_refused(window, message):
    with pytest.raises(BreathcastError, match=message):
        window_states(window, TRACE, D)


def test_design_states_stay_in_range_and_span_the_terms():
    config = DistillationConfig()
    a, r = design_states(TRACE, D, config)
    low, high = config.amplitude_range
    assert a.min() >= low - config.margin - 1e-12 and a.max() <= high + config.margin + 1e-12
    for z in range(D):
        assert np.linalg.matrix_rank(design_matrix(a[:, z], r[:, z], config.terms)) == len(config.terms)


# -- the predictor ------------------------------------------------------------------------------------------


def test_direct_path_equals_the_torch_model_end_to_end(package, plan):
    predictor = load_predictor(package, plan, PredictorConfig(path="direct"))
    prediction = predictor.predict(_window())
    model = _tiny_model()
    from breathcast.geometry import hu_to_unit

    moving = torch.from_numpy(hu_to_unit(plan.volume.array))[None, None]
    with torch.no_grad():
        expected = model.predict(moving, torch.from_numpy(predictor.b_m)[None], torch.from_numpy(prediction.amplitude.astype(np.float32))[None])
    assert np.abs(prediction.displacement - expected[0].numpy()).max() < 1e-3  # numba vs torch scaling and squaring
    assert prediction.displacement.shape == (3, D, D, D) and prediction.displacement.dtype == np.float32


class _PolynomialNetwork(Predictor):
    """A predictor whose 'network' is exactly a polynomial in each slice's (amplitude, rate): distillation must
    recover it. The rate reaches the polynomial through the slope of b_f, as the real network sees it."""

    truth: np.ndarray

    def network_displacements(self, b_f, z=None):
        b_f = np.asarray(b_f, dtype=np.float64).reshape(-1, self.slices)
        rate = np.gradient(b_f, self.trace.window_duration_s / (self.slices - 1), axis=1)
        return np.stack([evaluate_terms(self.truth, self.config.distillation.terms, a, r) for a, r in zip(b_f, rate)])


def test_distilled_reproduces_a_field_that_truly_is_polynomial(package, plan):
    config = DistillationConfig(validation_windows=0, breathing_windows=0)  # the fake network sees b_f only
    rng = np.random.default_rng(5)
    _PolynomialNetwork.truth = rng.normal(0, 0.5, size=(len(config.terms), 3, D, D, D)).astype(np.float32)
    predictor = _PolynomialNetwork(package, plan, PredictorConfig(path="distilled", distillation=config))
    for seed in range(3):
        prediction = predictor.predict(_window(seed))
        expected = evaluate_terms(_PolynomialNetwork.truth, config.terms, prediction.amplitude, prediction.rate)
        np.testing.assert_allclose(prediction.displacement, expected, atol=2e-4)


def test_distilled_is_close_to_direct_and_reports_its_error(package, plan):
    distilled = load_predictor(package, plan, PredictorConfig(path="distilled", distillation=DistillationConfig(validation_windows=2)))
    assert set(distilled.distillation_error_mm) == {"mean", "p99", "max", "windows"}
    direct = load_predictor(package, plan, PredictorConfig(path="direct"))
    window = _window(2)
    difference = distilled.predict(window).displacement - direct.predict(window).displacement
    scale = np.abs(direct.predict(window).displacement).max()
    assert scale > 0.05 and np.abs(difference).max() < 0.2 * scale


def test_snapshot_puts_every_slice_at_the_newest_state(package, plan):
    predictor = load_predictor(package, plan, PredictorConfig(path="direct", mode="snapshot"))
    prediction = predictor.predict(_window())
    np.testing.assert_allclose(prediction.amplitude, _window()[-1])


def test_target_moves_against_a_uniform_pull_back(package, plan):
    predictor = load_predictor(package, plan, PredictorConfig(path="direct"))
    u = np.zeros((3, D, D, D), np.float32)
    u[0] = 1.5  # sample 1.5 slices up: the anatomy moved 1.5 slices down
    now, moved = predictor.target_positions(u)
    expected = field_to_lps_mm(-u, predictor.grid)[:, 0, 0, 0]
    np.testing.assert_allclose(moved, np.tile(expected, (2, 1)), atol=1e-6)
    np.testing.assert_allclose(now, plan.target_lps_mm + expected, atol=1e-6)


def test_field_resizer_writes_mm_lps(package, plan):
    predictor = load_predictor(package, plan, PredictorConfig(path="direct"))
    u = predictor.predict(_window()).displacement
    resizer, grid = predictor.field_resizer()
    np.testing.assert_allclose(resizer(u), field_to_lps_mm(u, predictor.grid), atol=1e-5)
    resizer16, grid16 = predictor.field_resizer((2 * D, D, D), np.float16)
    out = resizer16(u)
    assert out.dtype == np.float16 and out.shape == (3, 2 * D, D, D) and grid16.shape == (2 * D, D, D)


def test_linear5d_package_drives_the_predictor(tmp_path, plan):
    rng = np.random.default_rng(6)
    coefficients = rng.normal(size=(3, 3, D, D, D)).astype(np.float32)
    package = export_linear5d(coefficients, LINEAR_5D_TERMS, plan.volume.grid, tmp_path / "five-d", TRACE, {"patient": "test"})
    predictor = load_predictor(package.path, plan, PredictorConfig(path="linear5d"))
    prediction = predictor.predict(_window())
    expected = evaluate_terms(coefficients, LINEAR_5D_TERMS, prediction.amplitude, prediction.rate)
    np.testing.assert_allclose(prediction.displacement, expected, atol=1e-5)
    with pytest.raises(PackageError, match="needs a cvae package"):
        load_predictor(package.path, plan, PredictorConfig(path="direct"))
    other = Plan(Volume(np.zeros((D, D, 2 * D), np.float32), Grid((D, D, 2 * D), spacing=(1.0, 1.0, 1.0))), np.zeros(D))
    with pytest.raises(PackageError, match="cannot serve a plan"):
        load_predictor(package.path, other, PredictorConfig(path="linear5d"))


def test_bad_plans_and_settings_are_refused(plan):
    with pytest.raises(BreathcastError, match="one per CT slice"):
        Plan(plan.volume, np.zeros(3))
    with pytest.raises(BreathcastError, match="predictor path must be one of"):
        PredictorConfig(path="fast")


# -- INT8 ---------------------------------------------------------------------------------------------------


def test_quantization_data_round_trip_and_bad_files(tmp_path):
    from breathcast.calibration.quantization_data import QuantizationData, load_quantization_data, representative_windows, save_quantization_data

    windows = representative_windows(3, TRACE.window_samples, TRACE.sample_interval_s, seed=1)
    assert windows.shape == (3, TRACE.window_samples) and np.all(np.isfinite(windows))
    data = QuantizationData({"windows": windows}, {"seed": 1})
    loaded = load_quantization_data(save_quantization_data(data, tmp_path / "q.npz"))
    np.testing.assert_array_equal(loaded.arrays["windows"], windows)
    assert loaded.source == {"seed": 1}
    with pytest.raises(BreathcastError, match="not readable"):
        load_quantization_data(tmp_path / "missing.npz")
    with pytest.raises(BreathcastError, match="non-empty"):
        QuantizationData({"windows": np.zeros((0, 4))})


def test_int8_frame_graph_is_calibrated_packaged_and_close_to_float(package, plan, tmp_path):
    from breathcast.calibration.quantization_data import QuantizationData, representative_windows
    from breathcast.engine.quantize import frame_feeds, quantize_frame

    from breathcast.geometry import hu_to_unit

    data = QuantizationData({
        "moving": hu_to_unit(plan.volume.array)[None],
        "b_m": np.linspace(0.1, 0.4, D, dtype=np.float32)[None],
        "windows": representative_windows(4, TRACE.window_samples, TRACE.sample_interval_s),
    })  # fmt: skip
    int8 = quantize_frame(package, data, tmp_path / "int8")
    assert "frame_int8" in int8.manifest.graphs and int8.model_id != package.model_id
    assert read_package(int8.path).manifest.files["frame_int8.onnx"]
    feed = frame_feeds(package, data)[0]
    (reference,) = open_graph(package, "frame").run(feed)
    (quantized,) = open_graph(int8, "frame", RuntimeConfig(precision="int8")).run(feed)
    assert not np.array_equal(quantized, reference)  # it really is another graph
    # A 4-channel random net is hard on 8 bits; the shipped model's error is in its manifest (README).
    assert np.corrcoef(quantized.ravel(), reference.ravel())[0, 1] > 0.9
    assert np.abs(quantized - reference).mean() < 0.5 * np.abs(reference).mean()
    assert int8.manifest.metrics["int8"]["calibration_samples"] == 4
    with pytest.raises(PackageError, match="no INT8 frame graph"):
        open_graph(package, "frame", RuntimeConfig(precision="int8"))


# -- command line -------------------------------------------------------------------------------------------


def test_export_command_writes_a_verified_package_and_refuses_to_overwrite(tmp_path, capsys):
    from breathcast.cli import main
    from breathcast.training.cvae import save_cvae

    save_cvae(_tiny_model(), tmp_path / "model.pt")
    assert main(["export", "--model", str(tmp_path / "model.pt"), "--out", str(tmp_path / "pkg")]) == 0
    assert read_package(tmp_path / "pkg").manifest.trace.window_samples == 448
    assert main(["export", "--model", str(tmp_path / "model.pt"), "--out", str(tmp_path / "pkg")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "other").exists()


def test_export_command_packages_a_five_d_model(tmp_path, plan):
    from breathcast.calibration.motion_model import FiveDModel
    from breathcast.cli import main

    coefficients = np.random.default_rng(7).normal(size=(3, 3, D, D, D)).astype(np.float32)
    FiveDModel(coefficients, LINEAR_5D_TERMS, plan.volume.grid, "p1", "ground-truth").save(tmp_path / "five_d")
    assert main(["export", "--five-d", str(tmp_path / "five_d"), "--out", str(tmp_path / "pkg")]) == 0
    predictor = load_predictor(tmp_path / "pkg", plan, PredictorConfig(path="linear5d"))
    prediction = predictor.predict(_window())
    np.testing.assert_allclose(prediction.displacement, evaluate_terms(coefficients, LINEAR_5D_TERMS, prediction.amplitude, prediction.rate), atol=1e-5)


def test_window_states_equal_the_filter_applied_directly():
    from scipy.signal import savgol_filter

    window = _window(3) + 0.01 * np.random.default_rng(8).normal(size=TRACE.window_samples)
    length = int(round(0.2 / TRACE.sample_interval_s)) | 1
    rate = savgol_filter(window, length, 2, deriv=1, delta=TRACE.sample_interval_s)
    positions = np.linspace(0.0, TRACE.window_samples - 1, D)
    a, r = window_states(window, TRACE, D, "window")
    np.testing.assert_allclose(a, np.interp(positions, np.arange(TRACE.window_samples), window), atol=1e-12)
    np.testing.assert_allclose(r, np.interp(positions, np.arange(TRACE.window_samples), rate), atol=1e-9)
    a, r = window_states(window, TRACE, D, "snapshot")
    np.testing.assert_allclose(r, rate[-1], atol=1e-9)
