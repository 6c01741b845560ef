"""Planning CTs for the daemon: the simulated default patient, a NIfTI volume, or a DICOM series.

:func:`build_plan` turns a :class:`~breathcast.stream.config.PlanSpec` into an engine
:class:`~breathcast.engine.predictor.Plan` (CT in HU, per-slice planning trace, target points in mm LPS,
Frame of Reference UID); :func:`plan_hash` names it on the wire.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.engine.predictor import Plan
from breathcast.stream.config import PlanSpec

__all__ = ["DEFAULT_PATIENT_SEED", "simulated_default_patient", "planning_scan_index", "build_plan", "plan_from_patient", "plan_hash"]

DEFAULT_PATIENT_SEED = 0
"""``breathcast demo``'s default patient: ``simulate_patient(0, SimulationConfig(grid_size=64))``."""


def simulated_default_patient(seed: int = DEFAULT_PATIENT_SEED, grid: int = 64):
    """The patient ``breathcast demo`` simulates with its default flags (25 scans, 15 HU noise, one tumour)."""
    from breathcast.sim.simulator import SimulationConfig, simulate_patient

    return simulate_patient(seed, SimulationConfig(grid_size=grid, n_scans=25, noise_hu=15.0, n_tumours=1), patient_id="demo_patient")


def planning_scan_index(patient) -> int:
    """The simulated planning CT: the most exhaled scan (lowest mean amplitude), as ``breathcast demo``'s moving scan."""
    return int(np.argmin([scan.amplitude.mean() for scan in patient.scans]))


def _simulated_uid(seed: int) -> str:
    """A Frame of Reference UID fixed by the seed (2.25 = a UUID-derived UID, PS3.5 B.2)."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, f"breathcast:simulated-patient:{seed}").int)


def _amplitude(spec: PlanSpec, slices: int, sidecar: Path | None) -> np.ndarray:
    value = spec.amplitude
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return np.full(slices, float(value))
    if value == "" and sidecar is not None and sidecar.exists():
        data = json.loads(sidecar.read_text())
        if "amplitude" in data:
            return np.asarray(data["amplitude"], dtype=np.float64)
    if value == "":
        raise BreathcastError(f"plan {spec.path}: give its per-slice planning trace as plan.amplitude (a number or a file)")
    path = Path(value)
    try:
        if path.suffix == ".npy":
            a = np.load(path)
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            a = data["amplitude"] if isinstance(data, dict) else data
        else:
            a = np.loadtxt(path)
    except (OSError, ValueError, KeyError) as exc:
        raise BreathcastError(f"cannot read the planning trace {path}: {exc}") from None
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if a.shape != (slices,):
        raise BreathcastError(f"planning trace {path} has {a.size} values; the CT has {slices} slices")
    return a


def build_plan(spec: PlanSpec) -> Plan:
    """Load the planning CT, its per-slice trace and the target (see :class:`PlanSpec`)."""
    if spec.source == "simulated":
        patient = simulated_default_patient(spec.seed, spec.grid)
        return plan_from_patient(patient, spec.target_lps_mm, spec.name)
    path = Path(spec.path)
    if spec.source == "nifti":
        from breathcast.io.dataset import read_volume

        volume = read_volume(path, np.float32)
        sidecar = path.with_name(path.name.removesuffix(".gz").removesuffix(".nii") + ".json")
        uid = volume.grid.frame_of_reference_uid
    else:
        from breathcast.io.dicom_io import read_ct_series

        series = read_ct_series(path)
        volume, sidecar, uid = series.volume, None, series.identity.frame_of_reference_uid
    amplitude = _amplitude(spec, volume.shape[0], sidecar)
    target = np.asarray(spec.target_lps_mm, dtype=np.float64).reshape(-1, 3)
    if spec.rtstruct:
        from breathcast.metrics import centroid_mm
        from breathcast.io.rtstruct import read_rtstruct, roi_mask

        if not spec.roi:
            raise BreathcastError("plan.rtstruct needs plan.roi (the target ROI name)")
        mask = roi_mask(read_rtstruct(spec.rtstruct), spec.roi, volume.grid)
        target = np.vstack([target, centroid_mm(mask, volume.grid)[None]])
    return Plan(volume, amplitude, target, uid, spec.name or path.name)


def plan_from_patient(patient, target_lps_mm=(), name: str = "") -> Plan:
    """A simulated patient's planning CT (:func:`planning_scan_index`), its per-slice trace and its tumour centroid."""
    from dataclasses import replace

    from breathcast.sim.anatomy import Label
    from breathcast.geometry import Volume
    from breathcast.metrics import centroid_mm

    scan = patient.scans[planning_scan_index(patient)]
    uid = _simulated_uid(patient.seed)
    tumour = scan.labels == Label.TUMOUR
    target = np.asarray(target_lps_mm, dtype=np.float64).reshape(-1, 3)
    if not len(target) and tumour.any():
        target = centroid_mm(tumour, patient.grid)[None]
    volume = Volume(scan.image_hu, replace(patient.grid, frame_of_reference_uid=uid))
    return Plan(volume, scan.amplitude, target, uid, name or f"simulated patient {patient.seed}")


def plan_hash(plan: Plan) -> str:
    """First 16 hex digits of a sha256 over the CT, its grid, the trace and the targets: names the plan on the wire."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(plan.volume.array).tobytes())
    h.update(repr(plan.volume.grid).encode())
    h.update(np.ascontiguousarray(plan.amplitude).tobytes())
    h.update(np.ascontiguousarray(plan.target_lps_mm).tobytes())
    h.update(plan.frame_of_reference_uid.encode())
    return h.hexdigest()[:16]
