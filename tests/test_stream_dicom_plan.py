"""The real POPI thorax CT (DICOM) served as a plan by a running daemon (skipped when ../shared/data is absent)."""

from __future__ import annotations

import time

import msgpack
import zmq
from conftest import shared_data_file
from stream_fixtures import make_config, running_daemon, send_trace, tiny_package  # noqa: F401 - fixtures

from breathcast.io.dicom_io import read_ct_series
from breathcast.stream.client import ControlClient, SampleSender
from breathcast.stream.config import PlanSpec
from breathcast.stream.plans import build_plan


def test_daemon_serves_the_popi_dicom_series(tiny_package, tmp_path):  # noqa: F811
    folder = shared_data_file("ct/popi-phase00")
    plan = build_plan(PlanSpec(source="dicom", path=str(folder), amplitude=0.0, target_lps_mm=((0.0, 0.0, 0.0),)))
    uid = read_ct_series(folder).identity.frame_of_reference_uid
    assert plan.frame_of_reference_uid == uid and plan.volume.shape == (141, 512, 512)
    config = make_config(tmp_path)
    with running_daemon(config, plan, tiny_package) as daemon:
        ep = daemon.config.endpoints
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.connect(ep.field)
        sub.setsockopt(zmq.SUBSCRIBE, b"field")
        try:
            with SampleSender(ep.input) as tx, ControlClient(ep.control) as ctl:
                time.sleep(0.2)
                send_trace(tx, 0, 0.0, 150)
                header = None
                end = time.monotonic() + 20
                while header is None and time.monotonic() < end:
                    if sub.poll(200):
                        header = msgpack.unpackb(sub.recv_multipart()[1])
                status = ctl.status()
        finally:
            sub.close(linger=0)
            ctx.term()
    assert header is not None, "no field arrived"
    assert header["grid"]["frame_of_reference_uid"] == uid
    assert header["model_id"] == tiny_package.model_id
    assert status["plan"]["frame_of_reference_uid"] == uid
