"""Engine with a latent diffusion model package: export (via the CLI), graph parity, the numpy DDIM loop against
MONAI's scheduler and LDM.predict, determinism, the distilled path, and a real daemon on loopback."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
from stream_fixtures import (  # noqa: F401  (fixtures)
    D,
    LDM_SAMPLING_STEPS,
    make_config,
    running_daemon,
    send_trace,
    tiny_ldm,
    tiny_ldm_package,
    tiny_plan,
    wait_for,
)

from breathcast.errors import BreathcastError
from breathcast.geometry import Volume, hu_to_unit
from breathcast.engine.ddim import ddim_sample, ddim_step, ddim_timesteps
from breathcast.engine.export import LDM_PARITY_TOLERANCE
from breathcast.engine.ldm_graphs import NearestUpsample2x, with_reshape_upsampling
from breathcast.engine.package import PackageError, read_package
from breathcast.engine.predictor import DistillationConfig, LDMNetwork, PredictorConfig, load_predictor
from breathcast.engine.runtimes import RuntimeConfig, open_graph
from breathcast.training.ldm import load_ldm, make_scheduler

ONE_THREAD = RuntimeConfig(intra_op_threads=1)


@pytest.fixture(scope="module")
def model(tiny_ldm_package):  # noqa: F811
    return load_ldm(tiny_ldm_package.file("model.pt"))


def _b_f(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    slopes = rng.uniform(-0.5, 0.5, (n, 1))
    return (rng.uniform(0.1, 0.9, (n, 1)) + slopes * np.linspace(-0.5, 0.5, D)).astype(np.float32)


# -- the sampler --------------------------------------------------------------------------------------------


def test_ddim_timesteps_are_monais_for_every_step_count():
    scheduler = make_scheduler(tiny_ldm().config)
    for steps in range(1, scheduler.num_train_timesteps + 1):
        scheduler.set_timesteps(steps)
        assert np.array_equal(scheduler.timesteps.numpy(), ddim_timesteps(scheduler.num_train_timesteps, steps)), steps


@pytest.mark.parametrize("steps", [1, 3, 10, 50])
def test_ddim_step_is_monais(steps):
    scheduler = make_scheduler(tiny_ldm().config)
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod.numpy()
    rng = np.random.default_rng(steps)
    for t in scheduler.timesteps:
        x_t, x0 = rng.normal(size=(2, 4, 4, 4, 4)).astype(np.float32), rng.normal(size=(2, 4, 4, 4, 4)).astype(np.float32)
        expected, _ = scheduler.step(torch.from_numpy(x0), int(t), torch.from_numpy(x_t))
        np.testing.assert_allclose(ddim_step(x0, int(t), x_t, alphas, steps), expected.numpy(), rtol=0, atol=2e-6)


# -- the package --------------------------------------------------------------------------------------------


def test_export_round_trip(tiny_ldm_package, model):  # noqa: F811
    package = read_package(tiny_ldm_package.path, kind="ldm")
    manifest = package.manifest
    assert set(manifest.files) == {"encode.onnx", "denoise.onnx", "decode.onnx", "noise.npy", "model.pt"}
    assert manifest.model_id.startswith("ldm-v1-") and manifest.grid == (D, D, D) and manifest.trace.window_samples == 448
    assert [s.name for s in manifest.graphs["denoise"].inputs] == ["x_t", "condition", "t", "b_f"]
    assert manifest.model["sampling_steps"] == LDM_SAMPLING_STEPS and manifest.model["latent_shape"] == [4, 4, 4, 4]
    np.testing.assert_array_equal(np.asarray(manifest.model["ddim"]["alphas_cumprod"], np.float32), model.scheduler.alphas_cumprod.numpy())
    parity = manifest.metrics["export_parity"]
    assert max(v for k, v in parity.items() if k.startswith("max_abs")) <= LDM_PARITY_TOLERANCE
    noise = torch.randn((1, 4, 4, 4, 4), generator=torch.Generator().manual_seed(manifest.model["seed"]))
    np.testing.assert_array_equal(np.load(package.file("noise.npy")), noise.numpy())  # as LDM.predict draws it


def test_tampered_noise_is_refused(tiny_ldm_package, tmp_path):  # noqa: F811
    path = shutil.copytree(tiny_ldm_package.path, tmp_path / "copy")
    noise = np.load(path / "noise.npy")
    np.save(path / "noise.npy", noise + 1)
    with pytest.raises(PackageError, match="noise.npy: sha256 does not match"):
        read_package(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["arrays"]["noise.npy"]["shape"] == [1, 4, 4, 4, 4]


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_denoise_graph_matches_torch_at_any_batch(tiny_ldm_package, model, runtime):  # noqa: F811
    session = open_graph(tiny_ldm_package, "denoise", RuntimeConfig(kind=runtime, intra_op_threads=1))
    rng = np.random.default_rng(1)
    x_t = rng.normal(size=(3, 4, 4, 4, 4)).astype(np.float32)
    condition = rng.normal(size=(1, 4, 4, 4, 4)).astype(np.float32)
    t, b_f = np.array([999, 400, 0], np.int64), _b_f(3)
    (x0,) = session.run({"x_t": x_t, "condition": condition, "t": t, "b_f": b_f})
    with torch.no_grad():
        expected = model.denoise(torch.from_numpy(x_t), torch.from_numpy(condition).expand(3, -1, -1, -1, -1), torch.from_numpy(t), torch.from_numpy(b_f))
    assert (expected - torch.from_numpy(condition)).abs().max() > 0.1  # the U-Net's change is not ~0
    np.testing.assert_allclose(x0, expected.numpy(), rtol=0, atol=1e-4)


def test_reshape_upsampling_repeats_voxels_as_nn_upsample(model):
    upsample = torch.nn.Upsample(scale_factor=2, mode="nearest")
    x = torch.randn(2, 3, 4, 5, 6)
    assert torch.equal(NearestUpsample2x()(x), upsample(x))
    decoder = with_reshape_upsampling(model.velocity_decoder)
    assert not any(isinstance(m, torch.nn.Upsample) for m in decoder.modules())
    assert any(isinstance(m, torch.nn.Upsample) for m in model.velocity_decoder.modules())  # the model is untouched


# -- the predictor ------------------------------------------------------------------------------------------


def test_direct_prediction_is_ldm_predict(tiny_ldm_package, tiny_plan, model):  # noqa: F811
    predictor = load_predictor(tiny_ldm_package, tiny_plan, PredictorConfig(path="direct", runtime=ONE_THREAD, sampling_steps=3))
    assert isinstance(predictor.network, LDMNetwork) and predictor.network.steps == 3
    b_f = _b_f(2, seed=3)
    fields = predictor.network_displacements(b_f)
    moving = torch.from_numpy(hu_to_unit(tiny_plan.volume.array))[None, None]
    b_m = torch.from_numpy(predictor.b_m)[None]
    for k in range(2):
        with torch.no_grad():
            expected = model.predict(moving, b_m, torch.from_numpy(b_f[k : k + 1]), steps=3, seed=0)[0].numpy()
        assert np.abs(expected).max() > 0.05
        np.testing.assert_allclose(fields[k], expected, rtol=0, atol=1e-3)  # numba vs torch scaling and squaring
    # the numpy loop starts from the package's noise: the same latent as the torch sampler from that noise
    condition = model.encode(moving, b_m)
    with torch.no_grad():
        sampled = model.sample_latent(condition, torch.from_numpy(b_f[:1]), 3, seed=0)
    np.testing.assert_allclose(predictor.network.latents(b_f[:1]), sampled.numpy(), rtol=0, atol=1e-4)


def test_prediction_is_deterministic_and_batch_independent(tiny_ldm_package, tiny_plan):  # noqa: F811
    config = PredictorConfig(path="direct", runtime=ONE_THREAD)
    first, second = load_predictor(tiny_ldm_package, tiny_plan, config), load_predictor(tiny_ldm_package, tiny_plan, config)
    assert first.network.steps == LDM_SAMPLING_STEPS  # the manifest's default
    b_f = _b_f(3, seed=4)
    batch = first.network_displacements(b_f)
    np.testing.assert_array_equal(batch, second.network_displacements(b_f))
    np.testing.assert_array_equal(batch, first.network_displacements(b_f))
    np.testing.assert_allclose(batch[1], first.network_displacements(b_f[1:2])[0], rtol=0, atol=1e-5)
    window = 0.5 + 0.3 * np.sin(np.linspace(0, 3, 448))
    np.testing.assert_array_equal(first.predict(window).displacement, second.predict(window).displacement)


def test_sampling_steps_are_checked(tiny_ldm_package, tiny_plan):  # noqa: F811
    with pytest.raises(BreathcastError, match="sampling_steps"):
        PredictorConfig(sampling_steps=0)
    with pytest.raises(BreathcastError, match="sampling steps must be 1..1000"):
        load_predictor(tiny_ldm_package, tiny_plan, PredictorConfig(sampling_steps=1001))
    with pytest.raises(PackageError, match="linear5d path needs a linear5d package"):
        load_predictor(tiny_ldm_package, tiny_plan, PredictorConfig(path="linear5d"))


def test_ddim_sample_runs_the_given_denoiser():
    calls = []

    def denoise(x, t):
        calls.append(int(t[0]))
        return np.zeros_like(x)

    out = ddim_sample(denoise, np.ones((2, 3), np.float32), np.linspace(0.99, 0.01, 1000).astype(np.float32), 4)
    assert calls == list(ddim_timesteps(1000, 4)) and np.all(out == 0)  # the last step returns x0


def test_distilled_path_with_an_ldm_package(tiny_ldm_package, tiny_plan):  # noqa: F811
    distillation = DistillationConfig(amplitudes=4, rates=3, breathing_windows=4, validation_windows=1)
    predictor = load_predictor(tiny_ldm_package, tiny_plan, PredictorConfig(path="distilled", runtime=ONE_THREAD, distillation=distillation))
    assert set(predictor.distillation_error_mm) == {"mean", "p99", "max", "windows"}
    prediction = predictor.predict(0.5 + 0.3 * np.sin(np.linspace(0, 3, 448)))
    assert prediction.displacement.shape == (3, D, D, D) and np.all(np.isfinite(prediction.displacement))
    assert np.abs(prediction.displacement).max() > 0.01


def test_an_ldm_trained_on_the_box_is_served_on_the_plans_lungs(tmp_path, small_patient):
    """The model box that `train ldm` writes beside model.pt reaches the package, and the engine then serves the plan
    in the box centred on its lungs, the sliding mask holding the spine and the outside still."""
    from breathcast.cli import main
    from breathcast.engine.predictor import Plan
    from breathcast.training.ldm import save_ldm

    save_ldm(tiny_ldm(), tmp_path / "model.pt")
    box = {"anchor": "lungs", "extent_mm": [400.0, 400.0, 320.0]}
    (tmp_path / "manifest.json").write_text(json.dumps({"model_kind": "ldm", "model_box": box}))
    assert main(["export", "--ldm", str(tmp_path / "model.pt"), "--out", str(tmp_path / "pkg"), "--sampling-steps", "2"]) == 0
    package = read_package(tmp_path / "pkg", kind="ldm")
    assert package.manifest.model_box == box
    plan = Plan(Volume(small_patient.reference_hu, small_patient.grid), np.zeros(small_patient.grid.shape[0]))
    predictor = load_predictor(package, plan, PredictorConfig(path="direct", runtime=ONE_THREAD))
    assert predictor.plan_check is not None and predictor.grid.shape == (D, D, D)
    u = predictor.network_displacements(np.ones((1, D), np.float32))[0]
    still = predictor._motion_weight[0] < 1e-4
    assert still.any() and np.abs(u[:, still]).max() <= 1e-3 * np.abs(u).max() and np.abs(u).max() > 0.01


# -- the daemon ---------------------------------------------------------------------------------------------


def test_daemon_serves_an_ldm_package(tiny_ldm_package, tiny_plan, tmp_path):  # noqa: F811
    from breathcast.stream.client import SampleSender, Subscriber

    config = make_config(tmp_path, path="distilled", gating={"kind": "amplitude", "amplitude_range": [-10.0, 10.0]})
    with running_daemon(config, tiny_plan, tiny_ldm_package) as daemon:
        ep = daemon.config.endpoints
        with SampleSender(ep.input) as tx, Subscriber([ep.publish, ep.field], topics=("gate", "target", "field")) as rx:
            time.sleep(0.2)  # subscription up
            send_trace(tx, 0, 0.0, 150)
            seen = {}

            def all_seen(message) -> bool:
                seen[message.topic] = message  # the newest of each topic
                return {"target", "field"} <= set(seen) and seen.get("gate") is not None and seen["gate"].header["reason"] == "ok"

            wait_for(rx, all_seen, 15.0)
    gate, target, field = seen.get("gate"), seen.get("target"), seen.get("field")
    assert gate is not None and gate.header["reason"] == "ok", "no BEAM_ON after a full clean window"
    assert target is not None and target.header["model_id"] == tiny_ldm_package.model_id
    assert np.all(np.isfinite(target.header["target_lps_mm"]))
    assert field is not None and field.header["model_id"].strip() == tiny_ldm_package.model_id
