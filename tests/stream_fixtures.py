"""Fixtures of the stream tests: a tiny exported package, a tiny plan, and a real daemon on loopback.

Import the fixtures into a test module (``from stream_fixtures import tiny_package, ...``); the package is
exported once per session.
"""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from breathcast.geometry import Grid, Volume

D = 16
SAMPLE_INTERVAL_S = 2.3 / 447


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_endpoints() -> dict[str, str]:
    """Four free loopback TCP endpoints."""
    return {name: f"tcp://127.0.0.1:{free_port()}" for name in ("input", "publish", "field", "control")}


_PACKAGE: list = []  # imported into several test modules, the fixture is defined once per module: export once


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory):
    """A 16³ cVAE with a 448-sample window, exported with onnxruntime graphs (as tests/test_engine.py)."""
    if not _PACKAGE:
        _PACKAGE.append(_export(tmp_path_factory))
    return _PACKAGE[0]


def _export(tmp_path_factory: pytest.TempPathFactory):
    import torch

    from breathcast.engine.export import export_cvae
    from breathcast.engine.package import TraceSpec
    from breathcast.training.cvae import CVAE, CVAEConfig

    torch.manual_seed(0)
    model = CVAE(CVAEConfig(grid=D, latent_dim=4, trace_embedding_dim=4, channels=(4, 4, 4, 4)))
    with torch.no_grad():
        model.velocity.weight.normal_(0.0, 0.05)
    trace = TraceSpec(window_samples=448, sample_interval_s=SAMPLE_INTERVAL_S, slices=D)
    return export_cvae(model.eval(), tmp_path_factory.mktemp("stream-pkg") / "tiny", trace=trace)


@pytest.fixture(scope="session")
def tiny_plan():
    """A 16³ random CT with one target point at the centre."""
    from breathcast.engine.predictor import Plan

    grid = Grid.centered((D, D, D), (200.0, 200.0, 160.0))
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 400, size=grid.shape).astype(np.float32)
    return Plan(Volume(hu, grid), np.linspace(0.1, 0.4, D), target_lps_mm=np.array([[0.0, 0.0, 0.0]]),
                frame_of_reference_uid="1.2.3.4", name="tiny")  # fmt: skip


def make_config(tmp_path: Path, **overrides):
    """A :class:`ServeConfig` on free loopback ports with a session log in ``tmp_path``."""
    from breathcast.stream.config import config_from_dict

    data = {"path": "direct", "mode": "snapshot", "threads": 1, "session_log": str(tmp_path / "session.bclog"),
            "status_interval_s": 0.2, "endpoints": loopback_endpoints()}  # fmt: skip
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data)


@contextmanager
def running_daemon(config, plan, package, timeout_s: float = 60.0):
    """A started daemon whose predictor is loaded; stopped and joined on exit."""
    from breathcast.stream.client import ControlClient
    from breathcast.stream.daemon import Daemon

    daemon = Daemon(config, plan=plan, package=package).start()
    try:
        with ControlClient(config.endpoints.control) as ctl:
            ctl.wait_until_running(timeout_s)
        yield daemon
    finally:
        daemon.stop()
        assert daemon.wait(15.0), "daemon did not stop"


ALWAYS_INSIDE = {"kind": "amplitude", "amplitude_range": [-10.0, 10.0]}
"""A gating window every breath is inside: BEAM_ON whenever the daemon is healthy."""


@contextmanager
def daemon_clients(daemon):
    """A sender, a gate/target subscriber and a control client on a freshly reset daemon (gating always inside,
    no hysteresis, no forecast)."""
    from breathcast.stream.client import ControlClient, SampleSender, Subscriber

    ep = daemon.config.endpoints
    with SampleSender(ep.input) as tx, Subscriber(ep.publish, topics=("gate", "target")) as rx, ControlClient(ep.control) as ctl:
        ctl.request("reset")
        ctl.request("set_gating", **ALWAYS_INSIDE, hysteresis=0.0)
        ctl.request("set_forecast", horizon_s=0.0)
        time.sleep(0.2)  # subscription up
        rx.latest()
        yield tx, rx, ctl


@pytest.fixture(scope="module")
def daemon(tiny_package, tiny_plan, tmp_path_factory):
    """One daemon per test module that imports it (direct path, 16³, float32 field on the model grid, gating always
    inside)."""
    config = make_config(tmp_path_factory.mktemp("daemon"), gating=ALWAYS_INSIDE)
    with running_daemon(config, tiny_plan, tiny_package) as d:
        yield d


@pytest.fixture
def io(daemon):
    """A sender, a gate/target subscriber and a control client on a freshly reset daemon."""
    with daemon_clients(daemon) as clients:
        yield clients


def wait_gate(rx, reason: str, timeout_s: float = 5.0, first: bool = True):
    """The first ``gate`` message whose reason is ``reason`` (``first=False``: one of its reasons), or None."""
    if first:
        return wait_for(rx, lambda m: m.topic == "gate" and m.header["reason"] == reason, timeout_s)
    return wait_for(rx, lambda m: m.topic == "gate" and reason in [m.header["reason"], *m.header["reasons"]], timeout_s)


def healthy(tx, rx, start_seq: int = 0, t0: float = 0.0) -> tuple[int, float]:
    """Send 3 s of breathing at 50 Hz as one batch and wait for BEAM_ON; returns the next seq and source time."""
    seq = send_trace(tx, start_seq, t0, 150)
    assert wait_gate(rx, "ok") is not None, "no BEAM_ON after a full clean window"
    return seq, t0 + 150 / 50


def breathing(t: np.ndarray) -> np.ndarray:
    """A 4 s cosine breath, 0 (exhale) to 1 (inhale)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.asarray(t) / 4.0)


def send_trace(sender, start_seq: int, t0: float, n: int, rate_hz: float = 50.0, amplitude=None, pace: bool = False) -> int:
    """Send ``n`` samples from source time ``t0`` at ``rate_hz`` as one batch (or one by one when ``pace``)."""
    ts = t0 + np.arange(n) / rate_hz
    a = breathing(ts) if amplitude is None else np.broadcast_to(amplitude, ts.shape)
    if pace:
        for k, (t, v) in enumerate(zip(ts, a)):
            sender.send(start_seq + k, float(t), float(v))
            time.sleep(1.0 / rate_hz)
    else:
        for lo in range(0, n, 500):
            sender.send_batch([{"seq": start_seq + k, "t_source": float(ts[k]), "amplitude": float(a[k])}
                               for k in range(lo, min(n, lo + 500))])  # fmt: skip
    return start_seq + n


def wait_for(subscriber, predicate, timeout_s: float = 10.0):
    """The first message for which ``predicate(message)`` is true, or None."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        message = subscriber.recv(0.1)
        if message is not None and predicate(message):
            return message
    return None


# -- a tiny latent diffusion model package (tests/test_engine_ldm.py and the ldm daemon tests) -------------------

LDM_SAMPLING_STEPS = 2  # the tiny package's default DDIM steps: enough to exercise the loop, cheap to distil


def tiny_ldm(seed: int = 0, grid: int = D, prior_channels: int = 0):
    """A ``grid``³ LDM (default 16³: latent 4 x 4³, a 2-level U-Net), randomly initialised; the layers that start at
    zero or near it (the U-Net's output convolution, the pseudo-3D attention outputs, the velocity) get weights so
    that the result depends on every input. ``prior_channels``: as :class:`~breathcast.training.ldm.LDMConfig`."""
    import torch

    from breathcast.training.autoencoder import AutoencoderConfig, CTAutoencoder
    from breathcast.training.ldm import LDM, LDMConfig, Pseudo3DAttention

    torch.manual_seed(seed)
    autoencoder = CTAutoencoder(AutoencoderConfig(grid=grid, channels=(4, 4, 4), latent_channels=4, norm_num_groups=4))
    config = LDMConfig(channels=(8, 8), attention_levels=(False, True), norm_num_groups=8, head_channels=8, context_dim=8,
                       velocity_channels=(4, 8), integration_steps=4, prior_channels=prior_channels)  # fmt: skip
    model = LDM(autoencoder, 1.3, config)
    with torch.no_grad():
        model.unet.out[-1].conv.weight.normal_(0.0, 0.2)
        model.velocity_decoder.velocity.weight.normal_(0.0, 0.1)
        for module in model.unet.modules():
            if isinstance(module, Pseudo3DAttention):
                module.out.weight.normal_(0.0, 0.2)
    return model.eval()


_LDM_PACKAGE: list = []


@pytest.fixture(scope="session")
def tiny_ldm_package(tmp_path_factory: pytest.TempPathFactory):
    """:func:`tiny_ldm` saved and exported by ``breathcast export --ldm`` (448-sample window, 2 DDIM steps)."""
    if not _LDM_PACKAGE:
        from breathcast.cli import main
        from breathcast.engine.package import read_package
        from breathcast.training.ldm import save_ldm

        folder = tmp_path_factory.mktemp("ldm-pkg")
        save_ldm(tiny_ldm(), folder / "model.pt")
        out = folder / "tiny-ldm"
        code = main(["export", "--ldm", str(folder / "model.pt"), "--out", str(out), "--scan-duration", f"{SAMPLE_INTERVAL_S * 447}",
                     "--sampling-steps", str(LDM_SAMPLING_STEPS)])  # fmt: skip
        assert code == 0
        _LDM_PACKAGE.append(read_package(out, kind="ldm"))
    return _LDM_PACKAGE[0]
