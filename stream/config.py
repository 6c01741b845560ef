"""The daemon's configuration: frozen dataclasses, read from a TOML file, overridden by flags, validated once.

A TOML file mirrors the dataclasses (top-level keys of :class:`ServeConfig`, one table per nested one)::

    package = ""                      # "" = the shipped engine package
    path = "distilled"                # direct | distilled | linear5d
    mode = "snapshot"                 # snapshot | window
    forecast_horizon_s = 0.0
    session_log = "session.bclog"

    [plan]
    source = "simulated"              # simulated | nifti | dicom
    seed = 0

    [endpoints]
    input = "tcp://127.0.0.1:5560"

    [gating]
    kind = "amplitude"
    amplitude_range = [-0.2, 0.3]

Example:
    >>> cfg = config_from_dict({"path": "distilled", "gating": {"amplitude_range": [0.0, 0.4]}})
    >>> cfg.path, cfg.gating.amplitude_range, cfg.endpoints.control
    ('distilled', (0.0, 0.4), 'tcp://127.0.0.1:5563')
    >>> try:
    ...     config_from_dict({"gating": {"colour": 1}})
    ... except BreathcastError as exc:
    ...     print(exc)
    config: unknown key gating.colour (known: amplitude_range, hysteresis, hysteresis_mm, kind, target_index, target_limits_mm)
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any

from breathcast.errors import BreathcastError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DEFAULT_ENDPOINTS",
    "Endpoints",
    "PlanSpec",
    "GatingConfig",
    "SafetyConfig",
    "PlausibilityConfig",
    "FieldConfig",
    "SecurityConfig",
    "ForecastConfig",
    "ServeConfig",
    "config_from_dict",
    "load_config",
    "is_loopback",
]


@dataclass(frozen=True)
class Endpoints:
    """ZeroMQ endpoints the daemon binds (docs/protocol.md "Sockets").

    Args:
        input: PULL, breathing samples in.
        publish: PUB, topics ``target``, ``gate``, ``status``.
        field: PUB, topic ``field`` (large messages: their own socket, queue and ZeroMQ I/O thread).
        control: REP, commands.
    """

    input: str = "tcp://127.0.0.1:5560"
    publish: str = "tcp://127.0.0.1:5561"
    field: str = "tcp://127.0.0.1:5562"
    control: str = "tcp://127.0.0.1:5563"


DEFAULT_ENDPOINTS = Endpoints()


@dataclass(frozen=True)
class PlanSpec:
    """Where the planning CT, its trace and the target come from.

    Args:
        source: ``simulated`` (the default patient of ``breathcast demo``: seed 0, 64³), ``nifti`` (a volume in HU)
            or ``dicom`` (a CT series folder).
        seed: simulated patient seed.
        grid: simulated grid edge, voxels.
        path: NIfTI file or DICOM folder.
        amplitude: the planning CT's per-slice trace: a number (every slice, e.g. 0 for an end-exhale CT), or a
            file (.npy, .json list, or text with one number per slice). For a NIfTI file of a breathcast dataset the
            sidecar JSON next to it is used when this is empty.
        target_lps_mm: target points, mm LPS (list of [x, y, z]).
        rtstruct: DICOM RTSTRUCT file; the centroid of ``roi`` becomes the target.
        roi: ROI name in the RTSTRUCT.
        name: shown in status messages.
    """

    source: str = "simulated"
    seed: int = 0
    grid: int = 64
    path: str = ""
    amplitude: float | str = ""
    target_lps_mm: tuple[tuple[float, float, float], ...] = ()
    rtstruct: str = ""
    roi: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if self.source not in ("simulated", "nifti", "dicom"):
            raise BreathcastError(f"plan source must be simulated, nifti or dicom, got {self.source!r}")
        if self.source != "simulated" and not self.path:
            raise BreathcastError(f"a {self.source} plan needs a path")
        object.__setattr__(self, "target_lps_mm", tuple(tuple(float(v) for v in p) for p in self.target_lps_mm))
        if any(len(p) != 3 for p in self.target_lps_mm):
            raise BreathcastError("plan target_lps_mm must be a list of [x, y, z] points")


@dataclass(frozen=True)
class GatingConfig:
    """The gating window: BEAM_ON only while inside it (and everything is healthy).

    Args:
        kind: ``amplitude`` (the forecast amplitude in ``amplitude_range``) or ``target`` (the displacement of
            target point ``target_index`` from the plan inside ``target_limits_mm``).
        amplitude_range: [low, high], dimensionless.
        target_limits_mm: [[x_lo, x_hi], [y_lo, y_hi], [z_lo, z_hi]] displacement from the planned position, mm LPS.
        target_index: which target point.
        hysteresis: amplitude gating: BEAM_ON starts only once the amplitude is this far inside ``amplitude_range``
            and stops when it leaves the range itself (dimensionless; 0 = off, the default), so irregular breathing
            near a threshold does not chatter.
        hysteresis_mm: the same for target gating, mm on every axis (0 = off).
    """

    kind: str = "amplitude"
    amplitude_range: tuple[float, float] = (-0.2, 0.3)
    target_limits_mm: tuple[tuple[float, float], ...] = ((-3.0, 3.0), (-3.0, 3.0), (-3.0, 3.0))
    target_index: int = 0
    hysteresis: float = 0.0
    hysteresis_mm: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("amplitude", "target"):
            raise BreathcastError(f"gating kind must be amplitude or target, got {self.kind!r}")
        lo, hi = (float(v) for v in self.amplitude_range)
        if not lo < hi:
            raise BreathcastError(f"gating amplitude_range must be [low, high] with low < high, got {list(self.amplitude_range)}")
        limits = tuple((float(a), float(b)) for a, b in self.target_limits_mm)
        if len(limits) != 3 or any(not a < b for a, b in limits):
            raise BreathcastError("gating target_limits_mm must be three [low, high] pairs (x, y, z) with low < high")
        if self.target_index < 0:
            raise BreathcastError("gating target_index must be >= 0")
        if not 0 <= 2 * self.hysteresis < hi - lo:
            raise BreathcastError(f"gating hysteresis must be >= 0 and less than half the amplitude range, got {self.hysteresis}")
        if not all(0 <= 2 * self.hysteresis_mm < b - a for a, b in limits):
            raise BreathcastError(f"gating hysteresis_mm must be >= 0 and less than half of every target limit, got {self.hysteresis_mm}")
        object.__setattr__(self, "amplitude_range", (lo, hi))
        object.__setattr__(self, "target_limits_mm", limits)


@dataclass(frozen=True)
class SafetyConfig:
    """Fail-safe thresholds (docs/protocol.md "Gate").

    Args:
        stale_after_s: HOLD when no sample arrived for this long (daemon clock), s.
        max_gap_s: source-time step between two samples above which the window holds a gap, s; HOLD until the
            gap has left the window.
        reorder_hold_s: HOLD this long after an out-of-order or duplicate sample, s.
        restart_after: this many consecutive backward-seq (or time-jumped) samples, themselves in order, are taken
            as a restarted source: the window is cleared.
        time_jump_factor: a source-time step larger than this many times what the source's own cadence (its
            recent seconds per seq step, times the seq step) or the daemon's clock (time since the last accepted
            sample) explains, plus ``time_jump_slack_s``, is an absurd timestamp: rejected (``time_jump``).
        time_jump_slack_s: the step always allowed on top, s (covers the first samples and a batch sent at once).
        stuck_after_s: HOLD ``stuck_sensor`` once the amplitude has not changed by more than ``stuck_tolerance``
            for this long (source time), s; 0 = off. A live sensor is never exactly constant: a flat line is a
            sensor or cable fault, or a frozen source.
        stuck_tolerance: the largest amplitude spread still counted as constant (dimensionless).
    """

    stale_after_s: float = 0.25
    max_gap_s: float = 0.25
    reorder_hold_s: float = 0.5
    restart_after: int = 10
    time_jump_factor: float = 4.0
    time_jump_slack_s: float = 1.0
    stuck_after_s: float = 2.0
    stuck_tolerance: float = 0.0

    def __post_init__(self) -> None:
        for name in ("stale_after_s", "max_gap_s", "reorder_hold_s", "time_jump_slack_s"):
            if not getattr(self, name) > 0:
                raise BreathcastError(f"safety {name} must be > 0")
        if self.restart_after < 1:
            raise BreathcastError("safety restart_after must be >= 1")
        if self.time_jump_factor < 1:
            raise BreathcastError("safety time_jump_factor must be >= 1")
        if self.stuck_after_s < 0 or self.stuck_tolerance < 0:
            raise BreathcastError("safety stuck_after_s and stuck_tolerance must be >= 0 (stuck_after_s 0 = off)")


@dataclass(frozen=True)
class PlausibilityConfig:
    """Physiological limits: a sample or a target beyond them is a sensor or model fault, never a breath.

    A violating sample is rejected (``implausible_sample``) and a violating frame held (``implausible_target``);
    either HOLDs until its time has left the window. The defaults are several times what any breath does (a deep
    breath reaches amplitude 2-3; the diaphragm moves 5-25 mm at amplitude 1).

    Args:
        amplitude_range: [low, high] amplitudes a breath can reach (dimensionless).
        max_step: largest amplitude change between two consecutive samples (dimensionless).
        max_rate_per_s: largest |d amplitude / dt| between two consecutive samples, 1/s (a breath: about 1-3).
        noise: amplitude change allowed on top of ``max_rate_per_s`` times the time between two samples
            (sensor noise at a high sample rate; dimensionless).
        max_target_displacement_mm: largest displacement of a target point from the plan, mm (vector length).

    Example:
        >>> PlausibilityConfig().max_rate_per_s
        10.0
    """

    amplitude_range: tuple[float, float] = (-3.0, 4.0)
    max_step: float = 1.5
    max_rate_per_s: float = 10.0
    noise: float = 0.05
    max_target_displacement_mm: float = 60.0

    def __post_init__(self) -> None:
        lo, hi = (float(v) for v in self.amplitude_range)
        if not lo < hi:
            raise BreathcastError("plausibility amplitude_range must be [low, high] with low < high")
        object.__setattr__(self, "amplitude_range", (lo, hi))
        for name in ("max_step", "max_rate_per_s", "max_target_displacement_mm"):
            if not getattr(self, name) > 0:
                raise BreathcastError(f"plausibility {name} must be > 0")
        if self.noise < 0:
            raise BreathcastError("plausibility noise must be >= 0")


@dataclass(frozen=True)
class FieldConfig:
    """The published displacement field.

    Args:
        enabled: publish fields at all (``false``: target and gate only, the fastest).
        shape: (Z, Y, X) output grid over the plan's field of view; empty = the model grid.
        dtype: ``float32`` or ``float16``.
        sndhwm: field messages queued per subscriber before new ones are dropped (counted).
        every: publish the field of every N-th frame (target and gate go out every frame).
        tcp: send the field's bytes on the field socket (topic ``field``); ``false`` with ``ring`` leaves the
            field socket to the tiny ``ring`` announcements.
        ring: also write every field into a same-host memory-mapped ring file and announce it (topic ``ring``,
            docs/protocol.md 4.6): no copy through sockets, no encryption, access by file permissions.
        ring_path: the ring file; empty = ``/dev/shm/breathcast-<uid>-<field port>.ring`` (the temp folder when
            there is no /dev/shm).
        ring_slots: slots of the ring (a reader has ``ring_slots - 1`` field periods to read a field).
        ring_mode: the ring file's mode, 0o600 (the daemon's user) or 0o640 (and its group).
        coefficients_dtype: ``float16`` or ``float32``: how the distilled / 5D polynomial is held (mm LPS) to make
            the fields and shipped by the ``coefficients`` command (docs/protocol.md 4.5). float16 halves what each
            field reads (a 128x128x112 field in 1.9 instead of 2.6 ms at best, issue 17) and costs the largest error
            ``status.field.coefficients.quantization_error_mm`` (measured at load; 0.01-0.04 mm on the shipped model).
        threads: numba threads that make a field (0 = numba's default, one per core).
    """

    enabled: bool = True
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    sndhwm: int = 2
    every: int = 1
    tcp: bool = True
    ring: bool = False
    ring_path: str = ""
    ring_slots: int = 4
    ring_mode: int = 0o600
    coefficients_dtype: str = "float16"
    threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        if self.shape and (len(self.shape) != 3 or min(self.shape) < 1):
            raise BreathcastError(f"field shape must be [Z, Y, X], got {list(self.shape)}")
        if self.dtype not in ("float32", "float16"):
            raise BreathcastError(f"field dtype must be float32 or float16, got {self.dtype!r}")
        if self.sndhwm < 1 or self.every < 1:
            raise BreathcastError("field sndhwm and every must be >= 1")
        if self.ring_slots < 2:
            raise BreathcastError(f"field ring_slots must be >= 2, got {self.ring_slots}")
        if self.ring_mode not in (0o600, 0o640):
            raise BreathcastError(f"field ring_mode must be 0o600 or 0o640 (decimal 384 or 416), got {self.ring_mode:o}")
        if self.coefficients_dtype not in ("float32", "float16"):
            raise BreathcastError(f"field coefficients_dtype must be float32 or float16, got {self.coefficients_dtype!r}")
        if self.threads < 0:
            raise BreathcastError("field threads must be >= 0 (0 = one per core)")
        if not (self.tcp or self.ring):
            raise BreathcastError("field needs tcp or ring (or enabled = false)")


@dataclass(frozen=True)
class SecurityConfig:
    """CurveZMQ ("ironhouse"): the daemon's secret key and a folder of allowed clients' public keys.

    Args:
        server_secret_key: a ``.key_secret`` file written by ``breathcast keys``; empty = no encryption.
        client_keys_dir: folder of allowed clients' ``.key`` files (required with a server key).
        allow_insecure_remote: bind non-loopback endpoints without CURVE (refused otherwise).
    """

    server_secret_key: str = ""
    client_keys_dir: str = ""
    allow_insecure_remote: bool = False

    def __post_init__(self) -> None:
        if bool(self.server_secret_key) != bool(self.client_keys_dir):
            raise BreathcastError("security needs both server_secret_key and client_keys_dir, or neither")

    @property
    def curve(self) -> bool:
        return bool(self.server_secret_key)


@dataclass(frozen=True)
class ForecastConfig:
    """The latency-compensation predictor (:mod:`breathcast.stream.forecast`).

    Args:
        sample_interval_s: its uniform time base, s.
        history_s: regression inputs span this much recent signal, s.
        features: number of regression inputs (changes over lags spread evenly over ``history_s``).
        forgetting: RLS forgetting factor (0.9-1).
        max_rate_per_s: largest amplitude change per second a forecast may assume, 1/s.
    """

    sample_interval_s: float = 0.04
    history_s: float = 0.8
    features: int = 8
    forgetting: float = 0.995
    max_rate_per_s: float = 4.0

    def __post_init__(self) -> None:
        if not (self.sample_interval_s > 0 and self.history_s >= self.sample_interval_s and 0.9 <= self.forgetting <= 1.0
                and self.features >= 1 and self.max_rate_per_s > 0):  # fmt: skip
            raise BreathcastError("forecast needs sample_interval_s > 0, history_s >= sample_interval_s, features >= 1, "
                                  "0.9 <= forgetting <= 1, max_rate_per_s > 0")  # fmt: skip


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``breathcast serve`` needs.

    Args:
        package: engine package folder; empty = the shipped one.
        path: predictor path ``direct``, ``distilled`` or ``linear5d``.
        mode: ``snapshot`` (every slice at the newest state: the anatomy now; the default for gating) or
            ``window`` (slice z at window sample z, the paper's per-slice trace).
        threads: runtime threads for the model.
        forecast_horizon_s: how far ahead ``target`` and ``gate`` look (latency compensation), s; 0 = off.
        calibration: a surrogate calibration file (``breathcast calibrate surrogate``) for ``raw`` samples.
        session_log: the session log file (append-only); empty = no recording.
        fsync_interval_s: how often the session log is fsync-ed (records are written at once; fsync guards power loss).
        status_interval_s: heartbeat period, s.
        nice: the daemon's niceness (-20 to 19; below 0 needs CAP_SYS_NICE, refused otherwise and said in status):
            e.g. -5 weighs its threads about 3x a neighbour process's on a shared CPU.
        realtime_priority: 0 (off) or 1-99: the daemon's threads run SCHED_RR at this priority, ahead of every normal
            process (needs CAP_SYS_NICE; the kernel's real-time throttling still leaves 5% of each core to the others).
    """

    package: str = ""
    path: str = "distilled"
    mode: str = "snapshot"
    threads: int = 2
    forecast_horizon_s: float = 0.0
    calibration: str = ""
    session_log: str = ""
    fsync_interval_s: float = 0.5
    status_interval_s: float = 0.5
    nice: int = 0
    realtime_priority: int = 0
    plan: PlanSpec = _field(default_factory=PlanSpec)
    endpoints: Endpoints = _field(default_factory=Endpoints)
    gating: GatingConfig = _field(default_factory=GatingConfig)
    safety: SafetyConfig = _field(default_factory=SafetyConfig)
    plausibility: PlausibilityConfig = _field(default_factory=PlausibilityConfig)
    field: FieldConfig = _field(default_factory=FieldConfig)
    security: SecurityConfig = _field(default_factory=SecurityConfig)
    forecast: ForecastConfig = _field(default_factory=ForecastConfig)

    def __post_init__(self) -> None:
        if self.path not in ("direct", "distilled", "linear5d"):
            raise BreathcastError(f"path must be direct, distilled or linear5d, got {self.path!r}")
        if self.mode not in ("snapshot", "window"):
            raise BreathcastError(f"mode must be snapshot or window, got {self.mode!r}")
        if self.threads < 1:
            raise BreathcastError("threads must be >= 1")
        if not -20 <= self.nice <= 19:
            raise BreathcastError(f"nice must be in [-20, 19], got {self.nice}")
        if not 0 <= self.realtime_priority <= 99:
            raise BreathcastError(f"realtime_priority must be 0 (off) to 99, got {self.realtime_priority}")
        if not (0.0 <= self.forecast_horizon_s <= 1.0):
            raise BreathcastError(f"forecast_horizon_s must be in [0, 1] s, got {self.forecast_horizon_s}")
        if not (self.fsync_interval_s > 0 and self.status_interval_s > 0):
            raise BreathcastError("fsync_interval_s and status_interval_s must be > 0")
        names = [v for v in dataclasses.asdict(self.endpoints).values()]
        if len(set(names)) != len(names):
            raise BreathcastError(f"endpoints must differ, got {names}")
        if not self.security.curve and not self.security.allow_insecure_remote:
            for endpoint in names:
                if not is_loopback(endpoint):
                    raise BreathcastError(f"endpoint {endpoint} is not loopback: configure [security] CURVE keys, or set "
                                          "allow_insecure_remote = true")  # fmt: skip


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.x, ::1 or localhost."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _convert(tp: Any, value: Any, where: str) -> Any:
    """A TOML value -> the dataclass field's type (nested dataclasses, tuples, numbers)."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BreathcastError(f"config: {where} must be a table")
        return _build(tp, value, where + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, where)
            except BreathcastError:
                continue
        raise BreathcastError(f"config: {where} has the wrong type ({type(value).__name__})")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise BreathcastError(f"config: {where} must be a list")
        args = typing.get_args(tp)
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if inner is None and len(args) != len(value):
            raise BreathcastError(f"config: {where} must have {len(args)} values")
        return tuple(_convert(inner if inner is not None else a, v, where) for a, v in zip(args if inner is None else [inner] * len(value), value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BreathcastError(f"config: {where} must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BreathcastError(f"config: {where} must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise BreathcastError(f"config: {where} must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise BreathcastError(f"config: {where} must be a string")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise BreathcastError(f"config: {prefix.rstrip('.') or 'the configuration'} must be a table")
    if not all(isinstance(k, str) for k in data):
        raise BreathcastError(f"config: keys of {prefix.rstrip('.') or 'the configuration'} must be strings")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BreathcastError(f"config: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    return cls(**{k: _convert(hints[k], v, prefix + k) for k, v in data.items()})


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict[str, Any]) -> ServeConfig:
    """A :class:`ServeConfig` from a nested dict (a parsed TOML file); unknown keys are refused."""
    return _build(ServeConfig, data)


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Read a TOML file (optional) and apply ``overrides`` (nested dict, e.g. from flags) on top."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise BreathcastError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise BreathcastError(f"{path}: not valid TOML ({exc})") from None
    return config_from_dict(_merge(data, overrides or {}))
