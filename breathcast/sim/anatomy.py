"""The simulator's thorax: an analytic phantom in patient LPS millimetres, rendered onto a grid.

Coordinates are patient LPS: x grows to the patient's left, y to posterior, z to superior; the phantom is
centred on (0, 0, 0). :func:`sample_anatomy` draws one patient's parameters (all randomness lives there);
:func:`render_phantom` is a deterministic function of those parameters and a grid.

The label map carries the paper's ten Dice buckets (Fig. 5) plus body, liver, lung vessels and tumours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from scipy import ndimage

from breathcast.geometry import Grid

__all__ = [
    "Label",
    "DICE_BUCKETS",
    "LUNG_LABELS",
    "AnatomyParams",
    "Tumour",
    "sample_anatomy",
    "render_phantom",
]


class Label:
    """Label ids of the simulator's label maps (uint8)."""

    BACKGROUND = 0
    BODY = 1
    BONE = 2
    SPINAL_CORD = 3
    LUNG_LEFT = 4
    LUNG_RIGHT = 5
    TRACHEA_BRONCHI = 6
    HEART_CHAMBERS = 7
    MYOCARDIUM = 8
    AORTA = 9
    IVC = 10
    PULMONARY_ARTERY = 11
    ESOPHAGUS = 12
    LIVER = 13
    TUMOUR = 14
    LUNG_VESSELS = 15

    NAMES = {
        0: "background", 1: "body", 2: "bone", 3: "spinal cord", 4: "left lung", 5: "right lung",
        6: "trachea and bronchi", 7: "heart chambers", 8: "myocardium", 9: "aorta",
        10: "inferior vena cava", 11: "pulmonary artery", 12: "esophagus", 13: "liver", 14: "tumour",
        15: "lung vessels",
    }


DICE_BUCKETS: dict[str, tuple[int, ...]] = {
    # The paper's ten buckets (§4.1, Fig. 5); buckets do not overlap.
    "Bones": (Label.BONE,),
    "Heart Lobes": (Label.HEART_CHAMBERS,),
    "Lung Lobes": (Label.LUNG_LEFT, Label.LUNG_RIGHT, Label.LUNG_VESSELS, Label.TUMOUR),
    "Esophagus": (Label.ESOPHAGUS,),
    "Spinal Cord": (Label.SPINAL_CORD,),
    "Aorta": (Label.AORTA,),
    "Inferior Vena Cava": (Label.IVC,),
    "Pulmonary Artery": (Label.PULMONARY_ARTERY,),
    "Myocardium": (Label.MYOCARDIUM,),
    "Trachea Bronchia": (Label.TRACHEA_BRONCHI,),
}

DOME_RIM_DROP_MM = 45.0
"""How much lower the diaphragm sits at a lung's rim (its costophrenic recess) than at its dome centre, mm."""

LUNG_LABELS: tuple[int, ...] = (Label.LUNG_LEFT, Label.LUNG_RIGHT, Label.LUNG_VESSELS, Label.TUMOUR)
"""The labels that make the lung mask of the paper's masked MSE (before its 10 mm dilation)."""


@dataclass(frozen=True)
class Tumour:
    """A lung tumour: centre (x, y, z) LPS mm, semi-axes (x, y, z) mm."""

    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]


@dataclass(frozen=True)
class AnatomyParams:
    """One patient's anatomy; every length in mm, every intensity in HU.

    Args:
        body_half_width: body ellipse semi-axis along x.
        body_half_depth: body ellipse semi-axis along y.
        fat_thickness: subcutaneous fat layer.
        lung_half_width: each lung's semi-axis along x.
        lung_half_depth: each lung's semi-axis along y.
        dome_z: (right, left) diaphragm dome heights, z of the lung base centre.
        apex_z: z of the lung apices.
        heart_center: (x, y, z) of the heart ellipsoid.
        heart_radii: (x, y, z) semi-axes of the heart ellipsoid.
        tumours: the lung tumours.
        vessel_seed: seed of the lung vessel tree and tissue texture (they are part of the anatomy).
    """

    body_half_width: float
    body_half_depth: float
    fat_thickness: float
    lung_half_width: float
    lung_half_depth: float
    dome_z: tuple[float, float]
    apex_z: float
    heart_center: tuple[float, float, float]
    heart_radii: tuple[float, float, float]
    tumours: tuple[Tumour, ...]
    vessel_seed: int

    @property
    def spine_y(self) -> float:
        """y of the vertebral body centres."""
        return 0.55 * self.body_half_depth

    @property
    def carina_z(self) -> float:
        return self.heart_center[2] + self.heart_radii[2] + 15.0

    @property
    def cavity_half_axes(self) -> tuple[float, float]:
        """(x, y) semi-axes of the inner surface of the rib cage: lungs slide along it when breathing."""
        return (
            self.body_half_width - self.fat_thickness - 18.0,
            self.body_half_depth - self.fat_thickness - 14.0,
        )

    @property
    def lung_base_z(self) -> float:
        """z of the lungs' lowest point: the lower dome's rim."""
        return min(self.dome_z) - DOME_RIM_DROP_MM

    def lung_center_x(self, side: int) -> float:
        """x of the lung centre; side -1 is the patient's right (x < 0), +1 the left."""
        return side * (0.13 * self.body_half_width + self.lung_half_width)


def sample_anatomy(rng: np.random.Generator, n_tumours: int = 1) -> AnatomyParams:
    """Draw one patient's anatomy (size, lung volume, heart, diaphragm, tumour place and size)."""
    size = rng.uniform(0.85, 1.08)
    half_width = 160.0 * size
    half_depth = rng.uniform(0.66, 0.76) * half_width
    lung_scale = rng.uniform(0.88, 1.08)
    dome_left = rng.uniform(-75.0, -45.0)
    dome_right = dome_left + rng.uniform(8.0, 22.0)  # the liver lifts the right dome
    apex = rng.uniform(118.0, 140.0)
    heart_radii = tuple(float(r) * size for r in (rng.uniform(52, 62), rng.uniform(42, 50), rng.uniform(45, 55)))
    heart_center = (18.0 * size, -0.35 * half_depth, dome_left + heart_radii[2] - 5.0)
    params = AnatomyParams(
        body_half_width=half_width,
        body_half_depth=half_depth,
        fat_thickness=rng.uniform(8.0, 22.0),
        lung_half_width=0.37 * half_width * lung_scale,
        lung_half_depth=0.74 * half_depth * lung_scale,
        dome_z=(dome_right, dome_left),
        apex_z=apex,
        heart_center=heart_center,
        heart_radii=heart_radii,
        tumours=(),
        vessel_seed=int(rng.integers(2**31)),
    )
    tumours = tuple(_sample_tumour(rng, params) for _ in range(n_tumours))
    return AnatomyParams(**{**params.__dict__, "tumours": tumours})


def _sample_tumour(rng: np.random.Generator, params: AnatomyParams) -> Tumour:
    """A tumour inside one lung, at least its radius + 8 mm from the lung's boundary; lower lobes favoured."""
    radius = rng.uniform(7.0, 16.0)
    for _ in range(1000):
        side = int(rng.choice([-1, 1]))
        x = params.lung_center_x(side) + rng.uniform(-0.6, 0.6) * params.lung_half_width
        y = rng.uniform(-0.6, 0.6) * params.lung_half_depth
        dome = params.dome_z[0] if side < 0 else params.dome_z[1]
        z = rng.uniform(dome, dome + 0.75 * (params.apex_z - dome))
        point = np.array([[x, y, z]])
        if _lung_depth_mm(params, point, side)[0] > radius + 8.0 and not _in_heart(params, point, 15.0)[0]:
            radii = tuple(float(radius * f) for f in rng.uniform(0.8, 1.2, size=3))
            return Tumour(center_mm=(float(x), float(y), float(z)), radii_mm=radii)
    raise RuntimeError("could not place a tumour inside the lungs")  # pragma: no cover - geometry guarantees room


def _dome_surface(params: AnatomyParams, x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    """z of the diaphragm under each (x, y): a paraboloid dome, :data:`DOME_RIM_DROP_MM` lower at the lung's rim."""
    dome = params.dome_z[0] if side < 0 else params.dome_z[1]
    rx = (x - params.lung_center_x(side)) / params.lung_half_width
    ry = y / params.lung_half_depth
    return dome - DOME_RIM_DROP_MM * (rx**2 + ry**2)


def diaphragm_z(params: AnatomyParams, x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    """z (mm) of one side's diaphragm under each (x, y) inside that lung's outline; beyond its rim, the rim's height."""
    dome = params.dome_z[0] if side < 0 else params.dome_z[1]
    return np.maximum(_dome_surface(params, x, y, side), dome - DOME_RIM_DROP_MM)


def _lung_depth_mm(params: AnatomyParams, points: np.ndarray, side: int) -> np.ndarray:
    """Approximate distance (mm) inside one lung for points (N, 3); negative outside."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    inside_dome = z - _dome_surface(params, x, y, side)
    to_apex = params.apex_z - z
    height = np.clip((z - params.dome_z[0 if side < 0 else 1]) / (params.apex_z - params.dome_z[1]), 0, 1)
    scale = np.sqrt(np.clip(1.0 - height**2.5, 0.05, 1.0))
    rx = (x - params.lung_center_x(side)) / (params.lung_half_width * scale)
    ry = y / (params.lung_half_depth * scale)
    radial = (1.0 - np.sqrt(rx**2 + ry**2)) * min(params.lung_half_width, params.lung_half_depth) * scale
    return np.minimum(np.minimum(inside_dome, to_apex), radial)


def _in_heart(params: AnatomyParams, points: np.ndarray, margin: float = 0.0) -> np.ndarray:
    c = np.asarray(params.heart_center)
    r = np.asarray(params.heart_radii) + margin
    return np.sum(((points - c) / r) ** 2, axis=-1) <= 1.0


@numba.njit(cache=True)
def _paint_segments(hu, labels, origin, spacing, segments, seg_hu, seg_label, allowed):  # pragma: no cover - numba
    """Paint capsules (segments with a radius) into hu/labels where the current label is allowed.

    hu, labels: (Z, Y, X); origin, spacing: (x, y, z) mm of an axis-aligned grid; segments: (N, 7) rows
    x0, y0, z0, x1, y1, z1, radius (mm); allowed: (256,) bool over current labels.
    """
    nz, ny, nx = hu.shape
    for s in range(segments.shape[0]):
        x0, y0, z0, x1, y1, z1, r = segments[s]
        dx, dy, dz = x1 - x0, y1 - y0, z1 - z0
        length2 = dx * dx + dy * dy + dz * dz
        lo = np.array([min(x0, x1) - r, min(y0, y1) - r, min(z0, z1) - r])
        hi = np.array([max(x0, x1) + r, max(y0, y1) + r, max(z0, z1) + r])
        i0 = max(0, int(np.floor((lo[0] - origin[0]) / spacing[0])))
        i1 = min(nx - 1, int(np.ceil((hi[0] - origin[0]) / spacing[0])))
        j0 = max(0, int(np.floor((lo[1] - origin[1]) / spacing[1])))
        j1 = min(ny - 1, int(np.ceil((hi[1] - origin[1]) / spacing[1])))
        k0 = max(0, int(np.floor((lo[2] - origin[2]) / spacing[2])))
        k1 = min(nz - 1, int(np.ceil((hi[2] - origin[2]) / spacing[2])))
        for k in range(k0, k1 + 1):
            pz = origin[2] + k * spacing[2]
            for j in range(j0, j1 + 1):
                py = origin[1] + j * spacing[1]
                for i in range(i0, i1 + 1):
                    if not allowed[labels[k, j, i]]:
                        continue
                    px = origin[0] + i * spacing[0]
                    t = 0.0
                    if length2 > 0:
                        t = ((px - x0) * dx + (py - y0) * dy + (pz - z0) * dz) / length2
                        t = min(1.0, max(0.0, t))
                    ex, ey, ez = px - x0 - t * dx, py - y0 - t * dy, pz - z0 - t * dz
                    if ex * ex + ey * ey + ez * ez <= r * r:
                        hu[k, j, i] = seg_hu[s]
                        labels[k, j, i] = seg_label[s]


class _Painter:
    """Paints shapes onto (hu, labels) of an axis-aligned grid; later paint covers earlier paint."""

    def __init__(self, grid: Grid) -> None:
        if not np.allclose(grid.direction_matrix, np.eye(3)):
            raise ValueError("the phantom renders on axis-aligned grids only")
        self.grid = grid
        nz, ny, nx = grid.shape
        ox, oy, oz = grid.origin
        sx, sy, sz = grid.spacing
        self.x = (ox + sx * np.arange(nx, dtype=np.float32))[None, None, :]
        self.y = (oy + sy * np.arange(ny, dtype=np.float32))[None, :, None]
        self.z = (oz + sz * np.arange(nz, dtype=np.float32))[:, None, None]
        self.hu = np.full(grid.shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)

    def fill(self, mask: np.ndarray, hu: float | np.ndarray, label: int) -> None:
        mask = np.broadcast_to(mask, self.grid.shape)
        self.hu[mask] = hu if np.isscalar(hu) else np.broadcast_to(hu, self.grid.shape)[mask]
        self.labels[mask] = label

    def ellipsoid(self, center, radii) -> np.ndarray:
        return (
            ((self.x - center[0]) / radii[0]) ** 2
            + ((self.y - center[1]) / radii[1]) ** 2
            + ((self.z - center[2]) / radii[2]) ** 2
        ) <= 1.0

    def tubes(self, segments, hu, label, allowed_labels=None) -> None:
        """Capsules along ``segments`` (N, 7) [x0, y0, z0, x1, y1, z1, radius mm]."""
        segments = np.asarray(segments, dtype=np.float64).reshape(-1, 7)
        allowed = np.ones(256, dtype=np.bool_)
        if allowed_labels is not None:
            allowed[:] = False
            allowed[list(allowed_labels)] = True
        hu_arr = np.broadcast_to(np.asarray(hu, dtype=np.float32), (len(segments),)).copy()
        label_arr = np.broadcast_to(np.asarray(label, dtype=np.uint8), (len(segments),)).copy()
        _paint_segments(
            self.hu, self.labels, np.asarray(self.grid.origin), np.asarray(self.grid.spacing),
            segments, hu_arr, label_arr, allowed,
        )


def _polyline(points, radius) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return np.array([[*points[i], *points[i + 1], radius] for i in range(len(points) - 1)])


def _with_radius(segments: np.ndarray, radius: float) -> np.ndarray:
    out = np.array(segments, dtype=np.float64)
    out[:, 6] = radius
    return out


def _vessel_tree(rng: np.random.Generator, root, direction, length, radius, depth) -> list[list[float]]:
    """Recursive bifurcating tree of capsules; children turn 20-45 degrees and shrink by 0.72-0.8."""
    direction = np.asarray(direction, dtype=float)
    direction /= np.linalg.norm(direction)
    end = np.asarray(root) + length * direction
    segments = [[*root, *end, radius]]
    if depth == 0 or radius < 1.0:
        return segments
    normal = np.cross(direction, rng.normal(size=3))
    normal /= np.linalg.norm(normal)
    for sign in (-1.0, 1.0):
        angle = np.deg2rad(rng.uniform(20.0, 45.0))
        child = np.cos(angle) * direction + sign * np.sin(angle) * normal
        shrink = rng.uniform(0.72, 0.8)
        segments += _vessel_tree(rng, end, child, length * shrink, radius * shrink, depth - 1)
    return segments


def _smooth_noise(rng: np.random.Generator, grid: Grid, sigma_mm: float) -> np.ndarray:
    """Unit-variance Gaussian-smoothed noise on ``grid`` (Z, Y, X) float32: tissue texture."""
    noise = rng.standard_normal(grid.shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(noise, sigma=[sigma_mm / s for s in grid.spacing_zyx], mode="wrap")
    return smooth / max(float(smooth.std()), 1e-6)


def render_phantom(params: AnatomyParams, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Render the patient's anatomy at rest (amplitude 0, end-exhale) on an axis-aligned ``grid``.

    Returns:
        (hu, labels): (Z, Y, X) float32 Hounsfield units and (Z, Y, X) uint8 :class:`Label` ids.
    """
    rng = np.random.default_rng(params.vessel_seed)
    p = _Painter(grid)
    x, y, z = p.x, p.y, p.z
    ax, ay = params.body_half_width, params.body_half_depth
    body_r = (x / ax) ** 2 + (y / ay) ** 2
    inner_ax, inner_ay = ax - params.fat_thickness, ay - params.fat_thickness
    p.fill(body_r <= 1.0, -100.0, Label.BODY)  # subcutaneous fat
    p.fill((x / inner_ax) ** 2 + (y / inner_ay) ** 2 <= 1.0, 40.0 + 8.0 * _smooth_noise(rng, grid, 6.0), Label.BODY)

    # Abdomen under the diaphragm: liver on the right, stomach with a gas bubble on the left.
    cavity_ax, cavity_ay = params.cavity_half_axes
    cavity = (x / cavity_ax) ** 2 + (y / cavity_ay) ** 2 <= 1.0
    dome_right = _dome_surface(params, x, y, -1)
    p.fill(cavity & (z < dome_right + 5.0) & (x < 35.0), 60.0, Label.LIVER)
    stomach_z = params.dome_z[1] - 35.0
    p.fill(p.ellipsoid((0.45 * ax, -0.1 * ay, stomach_z), (30.0, 25.0, 18.0)), -850.0, Label.BODY)

    # Lungs with parenchymal texture; the heart and mediastinum are carved out afterwards.
    lung_hu = -860.0 + 25.0 * _smooth_noise(rng, grid, 4.0)
    for side, label in ((-1, Label.LUNG_RIGHT), (1, Label.LUNG_LEFT)):
        dome = params.dome_z[0] if side < 0 else params.dome_z[1]
        height = np.clip((z - dome) / (params.apex_z - dome), 0.0, 1.0)
        scale = np.sqrt(np.clip(1.0 - height**2.5, 0.0, 1.0))
        rx = (x - params.lung_center_x(side)) / (params.lung_half_width * scale + 1e-3)
        ry = y / (params.lung_half_depth * scale + 1e-3)
        lung = (rx**2 + ry**2 <= 1.0) & (z >= _dome_surface(params, x, y, side)) & (z <= params.apex_z) & cavity
        p.fill(lung, lung_hu, label)

    # Heart: myocardium shell around the chambers.
    hc, hr = params.heart_center, params.heart_radii
    p.fill(p.ellipsoid(hc, hr), 60.0, Label.MYOCARDIUM)
    p.fill(p.ellipsoid(hc, tuple(r - 10.0 for r in hr)), 40.0, Label.HEART_CHAMBERS)

    top_z = float(grid.index_to_lps(np.array([grid.shape[0] - 1, 0, 0]))[2]) + 20.0
    bottom_z = float(grid.index_to_lps(np.array([0, 0, 0]))[2]) - 20.0
    heart_top = hc[2] + hr[2]
    spine_y = params.spine_y
    carina_z = params.carina_z

    # Great vessels and the esophagus.
    aorta = _polyline(
        [(hc[0] - 10, hc[1] + 10, heart_top - 25), (hc[0] - 12, hc[1], heart_top + 30),
         (5.0, 0.0, heart_top + 55), (22.0, spine_y - 25, heart_top + 45), (25.0, spine_y - 28, bottom_z)], 13.0)
    p.tubes(aorta, 45.0, Label.AORTA)
    pa_split = (hc[0] + 15, hc[1] + 25, heart_top + 18)
    p.tubes(_polyline([(hc[0] + 20, hc[1] - 5, heart_top - 15), pa_split], 11.0), 45.0, Label.PULMONARY_ARTERY)
    for side in (-1, 1):
        hilum = (side * 0.5 * params.lung_center_x(1), 5.0, heart_top + 12)
        p.tubes(_polyline([pa_split, hilum], 8.0), 45.0, Label.PULMONARY_ARTERY)
    ivc = _polyline([(-25.0, 15.0, bottom_z), (-22.0, 10.0, hc[2] - 0.6 * hr[2]), (-10.0, hc[1] + 10, hc[2] - 20)], 11.0)
    p.tubes(ivc, 40.0, Label.IVC)
    esophagus = _polyline([(8.0, spine_y - 32, top_z), (12.0, spine_y - 32, params.dome_z[1] - 10), (0.4 * ax, -0.1 * ay, stomach_z)], 8.0)
    p.tubes(esophagus, 35.0, Label.ESOPHAGUS)

    # Airways: trachea, main bronchi; then the lung vessel tree, painted only inside the lungs.
    trachea = _polyline([(0.0, spine_y - 55, top_z), (0.0, spine_y - 55, carina_z)], 10.0)
    p.tubes(trachea, 30.0, Label.TRACHEA_BRONCHI)
    p.tubes(_with_radius(trachea, 7.5), -1000.0, Label.TRACHEA_BRONCHI)  # air lumen
    lungs = (Label.LUNG_LEFT, Label.LUNG_RIGHT)
    for side in (-1, 1):
        hilum = (side * 0.8 * params.lung_center_x(1), spine_y - 50, carina_z - 25)
        bronchus = _polyline([(0.0, spine_y - 55, carina_z), hilum], 7.0)
        p.tubes(bronchus, 30.0, Label.TRACHEA_BRONCHI)
        p.tubes(_with_radius(bronchus, 4.5), -1000.0, Label.TRACHEA_BRONCHI)
        segments: list[list[float]] = []
        for direction in ((0.2 * side, 0.1, 1.0), (side, 0.0, 0.1), (0.3 * side, 0.3, -1.0), (0.5 * side, -0.8, -0.3)):
            segments += _vessel_tree(rng, hilum, direction, 34.0, 6.0, depth=6)
        segs = np.asarray(segments)
        segs[:, 6] = np.maximum(segs[:, 6], 0.6 * min(grid.spacing))  # keep the finest vessels visible
        p.tubes(segs, 40.0, Label.LUNG_VESSELS, allowed_labels=lungs)

    for tumour in params.tumours:
        inside = p.ellipsoid(tumour.center_mm, tumour.radii_mm)
        p.fill(inside, 25.0 + 10.0 * _smooth_noise(rng, grid, 3.0), Label.TUMOUR)

    # Bones last: vertebrae with discs, the spinal canal and cord, ribs, sternum.
    vertebra = ((x / 20.0) ** 2 + ((y - spine_y) / 17.0) ** 2 <= 1.0)
    disc = np.mod(z - bottom_z, 30.0) < 5.0
    p.fill(vertebra & ~disc, 300.0, Label.BONE)
    p.fill(vertebra & disc, 80.0, Label.BODY)
    canal_y = spine_y + 27.0
    arch = (x / 16.0) ** 2 + ((y - canal_y) / 13.0) ** 2 <= 1.0
    p.fill(arch | ((np.abs(x) < 5.0) & (y > canal_y) & (y < canal_y + 30.0)), 400.0, Label.BONE)
    p.fill((x / 9.0) ** 2 + ((y - canal_y) / 8.0) ** 2 <= 1.0, 15.0, Label.BODY)
    p.fill((x / 5.0) ** 2 + ((y - canal_y) / 4.5) ** 2 <= 1.0, 35.0, Label.SPINAL_CORD)
    rib_ax, rib_ay = ax - params.fat_thickness - 9.0, ay - params.fat_thickness - 7.0
    for i in range(12):
        z_back = params.apex_z + 5.0 - 24.0 * i
        sweep = np.pi * (0.82 if i < 7 else 0.82 - 0.06 * (i - 6))
        for side in (-1, 1):
            theta = np.linspace(0.22, sweep, 14)  # 0 = posterior midline, pi = anterior midline
            pts = np.c_[side * rib_ax * np.sin(theta), rib_ay * np.cos(theta), z_back - 45.0 * (theta / np.pi) ** 1.5]
            p.tubes(_polyline(pts, 5.0), 500.0, Label.BONE)
    sternum = (np.abs(x) < 16.0) & (y > -ay + params.fat_thickness + 2) & (y < -ay + params.fat_thickness + 14)
    p.fill(sternum & (z < params.apex_z - 10.0) & (z > params.dome_z[1] + 10.0), 350.0, Label.BONE)
    return p.hu, p.labels
