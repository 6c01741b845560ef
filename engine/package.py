"""Model packages: a folder of files (ONNX graphs, arrays) and a ``manifest.json`` that says what they are.

Layout::

    package/
      manifest.json    what the package is (Manifest below), with the sha256 of every other file
      plan.onnx        kind "cvae": (M, b_m) -> plan tensors, run once per plan
      frame.onnx       kind "cvae": plan tensors + b_f (+ z) -> velocity, run per frame
      model.pt         kinds "cvae", "ldm": the torch weights, for the torch reference runtime
      encode.onnx      kind "ldm": (M, b_m) -> the condition latent, run once per plan
      denoise.onnx     kind "ldm": x_t, condition, t, b_f -> x0, one U-Net pass, run per DDIM step (the loop is
                       numpy, outside the graphs: :mod:`breathcast.engine.ddim`)
      decode.onnx      kind "ldm": x0, M -> velocity at half resolution, run once per query
      noise.npy        kind "ldm": (1, C, L, L, L) the DDIM start (standard normal from the manifest's seed)
      coefficients.npy kind "linear5d": (K, 3, Z, Y, X) per-voxel coefficients, model-grid voxels

:func:`read_package` checks the format version, that every listed file is there with its sha256, and that no
graph file is unlisted; a tampered, truncated or mismatched package is refused with a one-line error.
:func:`write_package` writes into a temporary folder and renames it, so a package is whole or absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import breathcast
from breathcast import __version__
from breathcast.checksums import sha256_file
from breathcast.errors import BreathcastError

__all__ = [
    "DEFAULT_PACKAGE",
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "NETWORK_KINDS",
    "TensorSpec",
    "GraphSpec",
    "TraceSpec",
    "Manifest",
    "ModelPackage",
    "PackageError",
    "sha256_file",
    "read_package",
    "write_package",
]

FORMAT = "breathcast-model-package"
FORMAT_VERSION = 1
KINDS = ("cvae", "ldm", "linear5d")
NETWORK_KINDS = ("cvae", "ldm")  # kinds with a network: the direct and distilled paths
MANIFEST = "manifest.json"


class PackageError(BreathcastError):
    """A model package is missing, malformed, tampered with, or does not fit what it is used for."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, shape (``"n"`` marks the batch axis that may vary), dtype, units."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    units: str = ""


@dataclass(frozen=True)
class GraphSpec:
    """An ONNX graph in the package."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int


@dataclass(frozen=True)
class TraceSpec:
    """How a breathing window reaches the model.

    Args:
        window_samples: samples in the rolling window (448, the paper's slice count).
        sample_interval_s: time between two window samples, s: the model's time base. The window spans the
            duration of one helical scan of the training data.
        slices: per-slice trace length the network reads (the model grid's Z); window sample 0 (oldest) maps
            to slice 0 and the newest to slice Z-1, linearly in between.
        units: amplitude units.
    """

    window_samples: int
    sample_interval_s: float
    slices: int
    units: str = "dimensionless (0 end-exhale, 1 end-inhale)"

    @property
    def window_duration_s(self) -> float:
        return (self.window_samples - 1) * self.sample_interval_s


@dataclass(frozen=True)
class Manifest:
    """What a package is. Written as ``manifest.json``; every field is also documented there by name.

    ``grid`` is the model grid (Z, Y, X). ``model_box`` says where it lies in a plan: ``{"anchor": "lungs",
    "extent_mm": [x, y, z]}`` is a box of that size centred on the plan's lungs (:mod:`breathcast.model_box`);
    empty (packages made before it) is the planning CT's own field of view.
    ``files`` maps each file name to its sha256. ``model_id`` names the package on the wire (kind, version and
    the first 12 hex digits of a hash over the file hashes).
    """

    kind: str
    grid: tuple[int, int, int]
    trace: TraceSpec
    graphs: dict[str, GraphSpec] = field(default_factory=dict)
    arrays: dict[str, TensorSpec] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    intensity: dict[str, Any] = field(default_factory=lambda: {"clip_hu": [-1000.0, 400.0], "scaled_to": [0.0, 1.0]})
    units: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    model_box: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    model_id: str = ""
    breathcast_version: str = __version__
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> Manifest:
        try:
            trace = TraceSpec(**data["trace"])
            graphs = {
                name: GraphSpec(
                    file=g["file"],
                    inputs=tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in g["inputs"]),
                    outputs=tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in g["outputs"]),
                    opset=int(g["opset"]),
                )
                for name, g in data.get("graphs", {}).items()
            }
            arrays = {name: TensorSpec(**{**t, "shape": tuple(t["shape"])}) for name, t in data.get("arrays", {}).items()}
            known = {f.name for f in dataclasses.fields(cls)}
            rest = {k: v for k, v in data.items() if k in known and k not in ("trace", "graphs", "arrays", "grid")}
            return cls(grid=tuple(int(n) for n in data["grid"]), trace=trace, graphs=graphs, arrays=arrays, **rest)
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class ModelPackage:
    """A verified package on disk."""

    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        """Path of a listed file; a clear error for one the manifest does not list."""
        if name not in self.manifest.files:
            raise PackageError(f"{self.path}: the package has no file {name!r}")
        return self.path / name

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def prior_version(self) -> int:
        """The motion prior's version the model takes (:data:`breathcast.motion_prior.PRIOR_VERSION`): its config's
        ``prior_version``, 1 for a package made before versions existed."""
        model = self.manifest.model
        return int(model.get("ldm", model).get("prior_version", 1))


def _model_id(kind: str, files: dict[str, str]) -> str:
    combined = hashlib.sha256("".join(f"{name}:{files[name]};" for name in sorted(files)).encode()).hexdigest()
    return f"{kind}-v{FORMAT_VERSION}-{combined[:12]}"


def read_package(path: Path, kind: str | None = None) -> ModelPackage:
    """Open and verify a package folder.

    Args:
        path: the package folder.
        kind: refuse a package of another kind when given.

    Raises:
        PackageError: missing folder or manifest, unreadable JSON, another format or a newer version, a listed
            file missing or with another sha256, a graph or array not listed in ``files``, a model id that does
            not match the files, or another kind than asked.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise PackageError(f"{path}: model package folder not found")
    if not manifest_path.is_file():
        raise PackageError(f"{path}: not a model package (no {MANIFEST})")
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PackageError(f"{manifest_path}: not a {FORMAT} manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise PackageError(f"{manifest_path}: package format version {version!r}; this breathcast reads 1 to {FORMAT_VERSION}")
    manifest = Manifest.from_json(data, manifest_path)
    if manifest.kind not in KINDS:
        raise PackageError(f"{manifest_path}: unknown model kind {manifest.kind!r} (known: {', '.join(KINDS)})")
    if kind is not None and manifest.kind != kind:
        raise PackageError(f"{path}: a {manifest.kind!r} package, expected {kind!r}")
    needed = [g.file for g in manifest.graphs.values()] + list(manifest.arrays)
    for name in needed:
        if name not in manifest.files:
            raise PackageError(f"{manifest_path}: {name} is used but has no sha256 in 'files'")
    for name, expected in manifest.files.items():
        file = path / name
        if Path(name).name != name:
            raise PackageError(f"{manifest_path}: file names must be plain names inside the package, got {name!r}")
        if not file.is_file():
            raise PackageError(f"{file}: listed in the manifest but missing")
        if sha256_file(file) != expected:
            raise PackageError(f"{file}: sha256 does not match the manifest (truncated or modified)")
    if manifest.model_id != _model_id(manifest.kind, manifest.files):
        raise PackageError(f"{manifest_path}: model_id {manifest.model_id!r} does not match the package's files")
    return ModelPackage(path, manifest)


def write_package(out: Path, manifest: Manifest, write_files: Callable[[Path], None], overwrite: bool = False) -> ModelPackage:
    """Write a package atomically: ``write_files(folder)`` writes the data files, then the manifest is
    completed with their sha256 and the model id, and the folder is renamed into place.

    Args:
        out: the package folder to create.
        manifest: everything but ``files``, ``model_id`` and ``created``.
        write_files: writes the package's data files into the folder it is given.
        overwrite: replace an existing package at ``out``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise PackageError(f"{out}: already exists (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_files(staging)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        manifest = dataclasses.replace(
            manifest,
            files=files,
            model_id=_model_id(manifest.kind, files),
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
        os.chmod(staging, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read_package(out)


DEFAULT_PACKAGE = Path(breathcast.__file__).parent / "models" / "cvae64-engine"
"""The shipped engine package: the shipped cVAE exported by `breathcast export` (README, "The engine")."""
