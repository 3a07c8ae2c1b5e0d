"""Built-in procedural dataset ``synthetic``: ray-cast indoor (NYUv2-like) and street
(Cityscapes-like) scenes with exact semantic, depth and surface-normal labels.

Why: tests, examples and cross-domain experiments need dense multi-task data that is
free, small, deterministic and whose RGB actually carries the label information.

Conventions
-----------
* Camera (OpenCV): x right, y down, z forward. Intrinsics for an (H, W) image:
  ``fx = fy = (W / 2) / tan(hfov / 2)`` with hfov = 60 deg, ``cx = W / 2``, ``cy = H / 2``,
  pixel (u, v) has its centre at (u + 0.5, v + 0.5). The scene only depends on the seed,
  so renders of one seed at two resolutions with the same aspect ratio show the same scene.
* ``depth`` is z-depth (along the optical axis) in metres; 0 = invalid.
* ``normal`` is the unit surface normal in camera coordinates, facing the camera (so the
  floor's normal has a negative y component); all-zero = invalid.
* Invalid depth: windows and sky (no hit) get depth 0 AND zero normals. Sensor dropout
  blobs (5-15 % of the valid pixels) only zero the depth: normals stay valid there,
  like NYUv2 normals computed from inpainted depth.
* Ignore (-1) pixels: an occasional unlabelled clutter object, and in some images a 1-px
  void band on the object side of object boundaries.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import numpy as np

from mtpsl.data.synthetic_scenes import (
    PERSON_LOOK,
    Camera,
    Prim,
    Scene,
    build_indoor,
    build_pascal,
    build_street,
)

NYU13 = ["bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "painting",
         "sofa", "table", "tv", "wall", "window"]
CITY19 = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
          "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
          "bus", "train", "motorcycle", "bicycle"]
CITY7 = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
_MAP19TO7 = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6], np.int64)
DISPARITY_K = 0.98  # street disparity = K / z: z = 2 m -> 0.49 (MTAN Cityscapes scale)

# Per-class appearance: (rgb1, rgb2, pattern, spatial frequency in 1/m).
# Patterns: 0 plain, 1 stripes, 2 checker, 3 wood rings, 4 noise.
_INDOOR_LOOK = [
    ((0.85, 0.80, 0.70), (0.60, 0.35, 0.35), 1, 6.0),  # bed
    ((0.70, 0.15, 0.15), (0.15, 0.25, 0.60), 1, 40.0),  # books
    ((0.95, 0.95, 0.92), (0.85, 0.85, 0.82), 0, 2.0),  # ceiling
    ((0.45, 0.25, 0.10), (0.30, 0.15, 0.05), 3, 25.0),  # chair
    ((0.55, 0.40, 0.25), (0.35, 0.22, 0.12), 3, 6.0),  # floor
    ((0.60, 0.50, 0.35), (0.40, 0.30, 0.20), 3, 12.0),  # furniture
    ((0.20, 0.60, 0.30), (0.85, 0.75, 0.20), 4, 15.0),  # objects
    ((0.80, 0.30, 0.10), (0.10, 0.40, 0.80), 4, 8.0),  # painting
    ((0.25, 0.30, 0.55), (0.15, 0.20, 0.40), 2, 10.0),  # sofa
    ((0.50, 0.32, 0.18), (0.40, 0.25, 0.12), 3, 18.0),  # table
    ((0.05, 0.05, 0.07), (0.15, 0.20, 0.30), 4, 5.0),  # tv
    ((0.78, 0.74, 0.66), (0.70, 0.68, 0.62), 4, 3.0),  # wall
    ((0.75, 0.88, 1.00), (0.95, 0.97, 1.00), 1, 4.0),  # window
]
_STREET_LOOK = [
    ((0.30, 0.30, 0.32), (0.40, 0.40, 0.42), 4, 3.0),  # road
    ((0.62, 0.58, 0.55), (0.50, 0.48, 0.46), 2, 2.0),  # sidewalk
    ((0.55, 0.45, 0.38), (0.25, 0.30, 0.40), 2, 0.7),  # building
    ((0.65, 0.62, 0.50), (0.50, 0.48, 0.40), 4, 4.0),  # wall
    ((0.35, 0.35, 0.30), (0.60, 0.55, 0.45), 1, 8.0),  # fence
    ((0.45, 0.45, 0.48), (0.35, 0.35, 0.38), 0, 2.0),  # pole
    ((0.15, 0.15, 0.10), (0.90, 0.70, 0.10), 1, 6.0),  # traffic light
    ((0.85, 0.75, 0.10), (0.90, 0.90, 0.90), 2, 6.0),  # traffic sign
    ((0.20, 0.50, 0.15), (0.10, 0.30, 0.08), 4, 6.0),  # vegetation
    ((0.45, 0.60, 0.25), (0.55, 0.50, 0.25), 4, 4.0),  # terrain
    ((0.55, 0.70, 0.95), (0.85, 0.90, 1.00), 0, 1.0),  # sky
    ((0.70, 0.20, 0.20), (0.20, 0.20, 0.50), 1, 5.0),  # person
    ((0.80, 0.50, 0.10), (0.20, 0.20, 0.20), 1, 5.0),  # rider
    ((0.15, 0.25, 0.60), (0.70, 0.70, 0.75), 0, 1.0),  # car
    ((0.75, 0.75, 0.75), (0.60, 0.20, 0.15), 1, 1.0),  # truck
    ((0.85, 0.65, 0.10), (0.30, 0.30, 0.35), 1, 1.2),  # bus
    ((0.50, 0.50, 0.55), (0.70, 0.10, 0.10), 1, 1.0),  # train
    ((0.60, 0.05, 0.05), (0.10, 0.10, 0.10), 2, 6.0),  # motorcycle
    ((0.10, 0.50, 0.60), (0.10, 0.10, 0.10), 2, 8.0),  # bicycle
]
_PASCAL_LOOK = [*_INDOOR_LOOK, ((0.85, 0.65, 0.50), (0.20, 0.30, 0.65), 1, 9.0)]  # + person
VOC21 = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
         "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
         "sheep", "sofa", "train", "tvmonitor"]
# indoor look (NYUv2-13 order, then person) -> PASCAL-Context 21-class id (0 = background)
_LOOK_TO_VOC = np.array([0, 0, 0, 9, 0, 0, 5, 0, 18, 11, 20, 0, 0, 15], np.int64)
assert len(_PASCAL_LOOK) == len(_LOOK_TO_VOC) == PERSON_LOOK + 1
# Appearance domains. "b" only changes colours/lighting/noise; geometry is untouched.
_STYLES = {
    "a": dict(light=(1.0, 0.97, 0.90), gain=1.0, ambient=0.35, cast=(1.0, 1.0, 1.0),
              noise=0.01, gamma=1.1, mix=np.eye(3), pattern_shift=0, freq=1.0),
    "b": dict(light=(0.80, 0.90, 1.10), gain=0.75, ambient=0.25, cast=(0.92, 1.0, 1.08),
              noise=0.03, gamma=0.9, mix=0.55 * np.eye(3) + 0.45 * np.roll(np.eye(3), 1, 0),
              pattern_shift=1, freq=1.5,
              # b only: distance haze (extinction per metre, haze colour) and lens vignetting
              haze=(0.025, (0.62, 0.66, 0.75)), vignette=0.4),
}


def class_names(family: str) -> list[str]:
    """Class names: ``indoor``/``nyuv2`` (13), ``street``/``cityscapes7`` (7), ``cityscapes19``."""
    table = {"indoor": NYU13, "nyuv2": NYU13, "street": CITY7, "cityscapes7": CITY7,
             "cityscapes": CITY7, "cityscapes19": CITY19, "street19": CITY19}
    if family not in table:
        raise ValueError(f"unknown synthetic family {family!r}; expected one of {sorted(table)}")
    return list(table[family])


def map_19_to_7(label19: np.ndarray) -> np.ndarray:
    """Map Cityscapes 19-class train ids to the 7 MTAN categories; -1 (and anything <0) stays -1."""
    lab = np.asarray(label19).astype(np.int64)
    return np.where(lab >= 0, _MAP19TO7[np.clip(lab, 0, 18)], -1)


def intrinsics(height: int, width: int, hfov_deg: float = 60.0) -> np.ndarray:
    """3x3 pinhole matrix used by the renderer (square pixels, centred principal point)."""
    f = (width / 2) / np.tan(np.deg2rad(hfov_deg) / 2)
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], np.float64)


# ----------------------------------------------------------------------------- ray casting


def _rays(cam: Camera, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """World ray directions (h, w, 3) whose camera-z component is 1, so hit t = z-depth."""
    k = intrinsics(h, w, np.rad2deg(cam.hfov))
    u = (np.arange(w) + 0.5 - k[0, 2]) / k[0, 0]
    v = (np.arange(h) + 0.5 - k[1, 2]) / k[1, 1]
    d = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((1, 1))), axis=-1)
    return d @ cam.rotation().T, k


def _rot_z(d: np.ndarray, yaw: float) -> np.ndarray:
    """Rotate vectors (..., 3) by ``yaw`` about Z."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * d[..., 0] - s * d[..., 1], s * d[..., 0] + c * d[..., 1], d[..., 2]], -1)


def _hit(p: Prim, o: np.ndarray, d: np.ndarray, near: float) -> np.ndarray:
    """Ray parameter of the first hit of ``p`` (inf where missed) for origin o, dirs d."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if p.kind == "plane":
            t = ((p.center - o) @ p.size) / (d @ p.size)
        elif p.kind == "sphere":
            oc = o - p.center
            a, b = np.einsum("...i,...i", d, d), d @ oc
            disc = b * b - a * (oc @ oc - p.size[0] ** 2)
            t = (-b - np.sqrt(disc)) / a
        elif p.kind == "box":
            lo, ld = _rot_z(o - p.center, -p.yaw), _rot_z(d, -p.yaw)
            ld = np.where(np.abs(ld) < 1e-12, 1e-12, ld)
            t1, t2 = (-p.size - lo) / ld, (p.size - lo) / ld
            tn, tf = np.minimum(t1, t2).max(-1), np.maximum(t1, t2).min(-1)
            t = np.where(tn <= tf, tn, np.inf)
        else:
            t = _hit_cyl(p, o, d, near)
    return np.where(t > near, t, np.inf)


def _hit_cyl(p: Prim, o: np.ndarray, d: np.ndarray, near: float) -> np.ndarray:
    r, h = p.size
    ox, oy, oz = o - p.center
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    a, b, c = dx * dx + dy * dy, ox * dx + oy * dy, ox * ox + oy * oy - r * r
    ts = (-b - np.sqrt(b * b - a * c)) / a
    zs = oz + ts * dz
    ts = np.where((zs >= 0) & (zs <= h) & (ts > near), ts, np.inf)
    for zc in (0.0, h):
        tc = (zc - oz) / dz
        inside = (ox + tc * dx) ** 2 + (oy + tc * dy) ** 2 <= r * r
        ts = np.minimum(ts, np.where(inside & (tc > near), tc, np.inf))
    return ts


def _screen_rect(p: Prim, cam: Camera, k: np.ndarray, h: int, w: int) -> tuple | None:
    """Conservative pixel rectangle (v0, v1, u0, u1) containing ``p``; None if off screen."""
    bound = p.bound()
    if bound is None:
        return 0, h, 0, w
    c, r = bound
    x, y, z = (c - cam.pos) @ cam.rotation()
    if z + r <= 0:
        return None
    if z - r <= 0.05:
        return 0, h, 0, w
    rect = []
    for a, f, cc, n in ((y, k[1, 1], k[1, 2], h), (x, k[0, 0], k[0, 2], w)):
        ratios = [(a - r) / (z - r), (a - r) / (z + r), (a + r) / (z - r), (a + r) / (z + r)]
        lo, hi = int(np.floor(f * min(ratios) + cc)), int(np.ceil(f * max(ratios) + cc)) + 1
        rect += [max(lo, 0), min(hi, n)]
    return None if rect[0] >= rect[1] or rect[2] >= rect[3] else tuple(rect)


def _cast(scene: Scene, d: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit per pixel: t-buffer (inf = no hit) and primitive index (-1 = none)."""
    h, w, _ = d.shape
    cam = scene.camera
    assert cam is not None, "a scene is rendered from its camera"
    tbuf = np.full((h, w), np.inf)
    pid = np.full((h, w), -1, np.int64)
    for i, p in enumerate(scene.prims):
        rect = _screen_rect(p, cam, k, h, w)
        if rect is None:
            continue
        sl = (slice(rect[0], rect[1]), slice(rect[2], rect[3]))
        t = _hit(p, cam.pos, d[sl], 0.05)
        better = t < tbuf[sl]
        tbuf[sl] = np.where(better, t, tbuf[sl])
        pid[sl] = np.where(better, i, pid[sl])
    far = tbuf > scene.far
    tbuf[far], pid[far] = np.inf, -1
    return tbuf, pid


def _normals(scene: Scene, pts: np.ndarray, d: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """World-space unit normals of the winning primitives, oriented towards the camera."""
    n = np.zeros_like(pts)
    for i in np.unique(pid[pid >= 0]):
        p, m = scene.prims[i], pid == i
        q = pts[m] - p.center
        if p.kind == "plane":
            nn = np.broadcast_to(p.size, q.shape).copy()
        elif p.kind == "sphere":
            nn = q
        elif p.kind == "box":
            lq = _rot_z(q, -p.yaw) / p.size
            axis = np.abs(lq).argmax(-1)
            nn = np.zeros_like(q)
            nn[np.arange(len(q)), axis] = np.sign(lq[np.arange(len(q)), axis])
            nn = _rot_z(nn, p.yaw)
        else:
            r, hh = p.size
            cap = (np.abs(q[:, 2]) < 1e-6 * hh + 1e-7) | (np.abs(q[:, 2] - hh) < 1e-6 * hh + 1e-7)
            side = (q[:, 0] ** 2 + q[:, 1] ** 2 < (r * (1 - 1e-6)) ** 2) & ~cap
            nn = np.where((cap | side)[:, None], [0.0, 0.0, 1.0], q * [1, 1, 0])
        nn = nn / np.linalg.norm(nn, axis=-1, keepdims=True)
        n[m] = nn * -np.sign(np.einsum("ij,ij->i", nn, d[m]))[:, None]
    return n


# ----------------------------------------------------------------------------- appearance


def _texture_params(scene: Scene, rng: np.random.Generator, style: dict) -> dict:
    """Per-instance texture parameters; the same rng draws for every style (same scene)."""
    look = {"indoor": _INDOOR_LOOK, "pascal": _PASCAL_LOOK}.get(scene.family, _STREET_LOOK)
    n = len(scene.instances) + 1  # last row: no-hit (sky)
    sky = 10 if scene.family == "street" else 2
    cls = np.array([i.cls for i in scene.instances] + [sky])
    jitter = rng.uniform(0.8, 1.2, (n, 3)) * rng.uniform(0.85, 1.15, (n, 1))
    dirs = rng.normal(size=(n, 3, 3))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, (n, 3))
    grey = rng.uniform(0.2, 0.8, (n, 3))  # colours of unlabelled clutter
    c1 = np.array([look[c][0] if c >= 0 else grey[i] for i, c in enumerate(cls)])
    c2 = np.array([look[c][1] if c >= 0 else 1 - grey[i] for i, c in enumerate(cls)])
    pat = np.array([look[c][2] if c >= 0 else 2 for c in cls])
    freq = np.array([look[c][3] if c >= 0 else 10.0 for c in cls]) * style["freq"]
    mix = style["mix"]
    return dict(c1=np.clip(c1 * jitter @ mix.T, 0, 1), c2=np.clip(c2 * jitter @ mix.T, 0, 1),
                pat=(pat + style["pattern_shift"]) % 5, freq=freq, dirs=dirs, phase=phase)


def _pattern(pts: np.ndarray, ids: np.ndarray, tp: dict) -> np.ndarray:
    """Blend weight in [0, 1] of each pixel's procedural 3-D (solid) texture."""
    f, ph, dr = tp["freq"][ids][:, None], tp["phase"][ids], tp["dirs"][ids]
    proj = np.einsum("nj,nkj->nk", pts, dr)  # coordinates along 3 random directions
    s0 = 0.5 + 0.08 * np.sin(2.3 * proj[:, 0] + ph[:, 0])
    s1 = 0.5 + 0.5 * np.tanh(3 * np.sin(f[:, 0] * proj[:, 0] + ph[:, 0]))
    chk = np.prod(np.sin(f * pts + ph), axis=-1)
    s2 = 0.5 + 0.5 * np.tanh(30 * chk)
    radial = np.linalg.norm(pts - proj[:, :1] * dr[:, 0], axis=-1)
    s3 = 0.5 + 0.5 * np.sin(f[:, 0] * radial + 1.5 * np.sin(3 * proj[:, 0]) + ph[:, 1])
    s4 = 0.5 + (np.sin(f[:, 0] * proj[:, 0]) + np.sin(1.7 * f[:, 0] * proj[:, 1] + ph[:, 1])
                + np.sin(2.9 * f[:, 0] * proj[:, 2] + ph[:, 2])) / 6
    return np.choose(tp["pat"][ids], [s0, s1, s2, s3, s4])


def _shade(scene: Scene, pts: np.ndarray, n: np.ndarray, style: dict) -> np.ndarray:
    """Lambertian irradiance (n_pix, 3) from the scene lights plus hemispherical ambient."""
    light = np.asarray(style["light"]) * style["gain"]
    irr = style["ambient"] * (0.75 + 0.25 * n[:, 2:3]) * np.ones((1, 3))
    for lx, ly, lz, power, directional in scene.lights:
        vec = np.array([lx, ly, lz])
        if directional:
            irr = irr + power * np.clip(n @ vec, 0, None)[:, None] * light
        else:
            to = vec - pts
            dist = np.linalg.norm(to, axis=-1)
            cos = np.clip(np.einsum("ij,ij->i", n, to) / dist, 0, None)
            irr = irr + (power * cos / (1 + (dist / 2.5) ** 2))[:, None] * light
    return irr


def _colour(scene: Scene, pts: np.ndarray, nw: np.ndarray, d: np.ndarray, inst: np.ndarray,
            glass: np.ndarray, rng: np.random.Generator, style: dict) -> np.ndarray:
    """Linear RGB image: textured albedo x shading; windows are emissive; sky is a gradient."""
    h, w = inst.shape
    tp = _texture_params(scene, rng, style)
    ids = np.where(inst >= 0, inst, len(scene.instances)).ravel()
    hit = (inst >= 0).ravel()
    p = np.where(hit[:, None], pts.reshape(-1, 3), 0.0)
    s = _pattern(p, ids, tp)[:, None]
    albedo = tp["c1"][ids] * (1 - s) + tp["c2"][ids] * s
    shading = _shade(scene, p, nw.reshape(-1, 3), style)
    rgb = albedo * np.where(hit[:, None], shading, 1.0)
    emissive = glass.ravel() | ~hit
    if emissive.any():  # windows / sky: brightness depends on elevation of the view ray
        dz = d.reshape(-1, 3)[:, 2] / np.linalg.norm(d.reshape(-1, 3), axis=-1)
        rgb[emissive] = albedo[emissive] * (0.9 + 0.3 * dz[emissive, None]) * style["gain"]
    return rgb.reshape(h, w, 3)


def _finish(rgb: np.ndarray, rng: np.random.Generator, style: dict) -> np.ndarray:
    """Colour cast, gamma, gaussian sensor noise; clip to [0, 1] float32."""
    img = np.clip(rgb * np.asarray(style["cast"]), 0, 1) ** (1 / style["gamma"])
    img = img + rng.normal(0, style["noise"], img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- labels


def _edges(cls: np.ndarray, inst: np.ndarray) -> np.ndarray:
    """1 where a 4-neighbour has a different class or instance."""
    e = np.zeros(cls.shape, bool)
    for a in (cls, inst):
        dv, du = a[1:] != a[:-1], a[:, 1:] != a[:, :-1]
        e[1:] |= dv
        e[:-1] |= dv
        e[:, 1:] |= du
        e[:, :-1] |= du
    return e.astype(np.uint8)


def _dropout(depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero 5-15 % of valid depth in smooth blobs defined in resolution-free coordinates."""
    h, w = depth.shape
    valid = depth > 0
    frac, k = rng.uniform(0.05, 0.15), 10
    centres = rng.uniform([0, 0], [1, h / w], (k, 2))
    scales, weights = rng.uniform(0.03, 0.12, k), rng.uniform(0.5, 1.0, k)
    if not valid.any():
        return depth
    x = (np.arange(w) + 0.5) / w
    y = (np.arange(h) + 0.5) / w
    field = np.zeros((h, w))
    for (cx, cy), sc, wt in zip(centres, scales, weights, strict=True):
        field += wt * np.exp(-((x[None] - cx) ** 2 + (y[:, None] - cy) ** 2) / (2 * sc**2))
    thr = np.quantile(field[valid], 1 - frac)
    return np.where(valid & (field > thr), 0.0, depth)


def _haze_vignette(rgb: np.ndarray, dist: np.ndarray, style: dict) -> np.ndarray:
    """Blend towards a haze colour with ``1 - exp(-k z)`` (no hit: full haze) and darken the
    corners by ``vignette`` (radial, 0 at the centre): an appearance gap, not a label change."""
    k, colour = style["haze"]
    keep = np.exp(-k * dist)[..., None]
    rgb = rgb * keep + np.asarray(colour) * style["gain"] * (1 - keep)
    h, w = dist.shape
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    r2 = (x[None, :] ** 2 + y[:, None] ** 2) / 0.5
    return rgb * (1 - style["vignette"] * r2)[..., None]


def _render(scene: Scene, seed: int, height: int, width: int, style: str) -> dict:
    """Shared rendering pipeline for both families."""
    if style not in _STYLES:
        raise ValueError(f"unknown synthetic style {style!r}; expected 'a' or 'b'")
    st = _STYLES[style]
    _, r_app, r_noise, r_drop, r_lab = np.random.SeedSequence(seed).spawn(5)
    cam = scene.camera
    assert cam is not None, "a scene is rendered from its camera"
    d, k = _rays(cam, height, width)
    tbuf, pid = _cast(scene, d, k)
    hit = pid >= 0
    prim_inst = np.array([p.inst for p in scene.prims])
    inst = np.where(hit, prim_inst[np.maximum(pid, 0)], -1)
    info = scene.instances
    cls_of = np.array([i.cls for i in info] + [10 if scene.family == "street" else -1])
    cls = cls_of[inst]  # inst -1 picks the last entry (no hit)
    glass = np.array([i.glass for i in info] + [False])[inst] & hit
    pts = cam.pos + np.where(hit, tbuf, 0.0)[..., None] * d
    nw = _normals(scene, pts, d, pid)
    rgb = _colour(scene, pts, nw, d, inst, glass, np.random.default_rng(r_app), st)
    if "haze" in st:  # style b: another atmosphere and lens (style a stays unchanged)
        rgb = _haze_vignette(rgb, np.where(hit, tbuf, np.inf), st)
    image = _finish(rgb, np.random.default_rng(r_noise), st)
    valid = hit & ~glass
    depth = _dropout(np.where(valid, tbuf, 0.0), np.random.default_rng(r_drop))
    normal = np.where(valid[..., None], nw @ cam.rotation(), 0.0)
    edge = _edges(cls, inst)
    sem = cls.copy()
    structural = np.array([i.structural for i in info] + [True])[inst]
    if np.random.default_rng(r_lab).random() < 0.35:  # annotators' void band at object borders
        sem[(edge == 1) & ~structural & hit] = -1
    out = dict(image=image, semantic=sem.astype(np.int64), depth=depth.astype(np.float32),
               normal=normal.astype(np.float32), edge=edge, instance=inst.astype(np.int64),
               intrinsics=k.astype(np.float32))
    if scene.part_of:  # body parts of people (PASCAL family only)
        part_of = np.array([scene.part_of.get(i, 0) for i in range(len(scene.prims))])
        out["parts"] = np.where(hit, part_of[np.maximum(pid, 0)], 0).astype(np.int64)
    return out


def _geometry_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(5)[0])


def render_indoor(seed: int, height: int, width: int, *, style: str = "a") -> dict:
    """Render one NYUv2-like indoor image.

    Returns numpy arrays: ``image`` (H,W,3) float32 in [0,1]; ``semantic`` (H,W) int64 in
    -1..12 (NYUv2-13 order); ``depth`` (H,W) float32 z-depth in m, 0 invalid; ``normal``
    (H,W,3) float32 camera-frame unit normals, 0 invalid; ``edge`` (H,W) uint8; plus
    ``instance`` (H,W) int64 (-1 no hit) and ``intrinsics`` (3,3) float32.
    """
    return _render(build_indoor(_geometry_rng(seed)), seed, height, width, style)


def render_street(seed: int, height: int, width: int, *, style: str = "a") -> dict:
    """Render one Cityscapes-like street image (see :func:`render_indoor` for the keys).

    Adds ``semantic19`` (Cityscapes train ids, -1 ignore) and ``semantic7`` (MTAN 7-class);
    ``semantic`` is ``semantic7``. Sky has depth 0 and zero normals.
    """
    out = _render(build_street(_geometry_rng(seed)), seed, height, width, style)
    out["semantic19"] = out["semantic"]
    out["semantic7"] = map_19_to_7(out["semantic19"])
    out["semantic"] = out["semantic7"]
    return out


# ----------------------------------------------------------------------------- writers


def item_seed(seed: int, split: str, index: int) -> int:
    """Seed of image ``index`` of ``split``: distinct per (seed, split, index)."""
    split_id = {"train": 0, "val": 1, "test": 2}[split]
    return int(np.random.SeedSequence([seed, split_id, index]).generate_state(1, np.uint64)[0])


def _check_sizes(splits: dict[str, int], height: int, width: int, seed: int) -> None:
    """Refuse what would render nothing (a size or count below 1 is not a default)."""
    for what, value, least in [*((f"n_{k}", n, 1) for k, n in splits.items()),
                               ("height", height, 1), ("width", width, 1), ("seed", seed, 0)]:
        if not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{what} must be an integer >= {least}, got {value!r}")


def _write_layout(root: str | Path, family: str, splits: dict[str, int], height: int, width: int,
                  seed: int, style: str, with_edges: bool, progress: bool) -> Path:
    _check_sizes(splits, height, width, seed)
    root = Path(root)
    render = render_indoor if family == "indoor" else render_street
    folders = ["image", "label", "depth", "normal"] if family == "indoor" else [
        "image", "label_7", "label_19", "depth"]
    folders += ["edge"] if with_edges else []
    for split, n in splits.items():
        for f in folders:
            (root / split / f).mkdir(parents=True, exist_ok=True)
        items = range(n)
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc=f"synthetic {family} {split}", unit="img")
        for i in items:
            out = render(item_seed(seed, split, i), height, width, style=style)
            for name, arr in _layout_arrays(family, out, with_edges).items():
                np.save(root / split / name / f"{i}.npy", arr)
    meta = dict(family=family, height=height, width=width, seed=seed, style=style,
                splits=splits, with_edges=with_edges, class_names=class_names(family),
                camera=dict(hfov_deg=60.0, convention="x right, y down, z forward"))
    if family == "street":
        meta.update(class_names_19=CITY19, depth="disparity = 0.98 / z_m, clipped to 0.49")
    (root / "synthetic.json").write_text(json.dumps(meta, indent=2))
    return root


def _layout_arrays(family: str, out: dict, with_edges: bool) -> dict[str, np.ndarray]:
    """Arrays in the on-disk formats of the NYUv2 / MTAN-Cityscapes loaders."""
    arrays = {"image": out["image"].astype(np.float32)}
    if family == "indoor":
        arrays["label"] = out["semantic"].astype(np.float32)
        arrays["depth"] = out["depth"][..., None].astype(np.float32)
        arrays["normal"] = out["normal"].astype(np.float32)
    else:
        arrays["label_7"] = out["semantic7"].astype(np.float32)
        arrays["label_19"] = out["semantic19"].astype(np.float32)
        z = out["depth"]
        with np.errstate(divide="ignore"):
            disp = np.where(z > 0, np.minimum(DISPARITY_K / z, 0.49), 0.0)
        arrays["depth"] = disp[..., None].astype(np.float32)
    if with_edges:
        arrays["edge"] = out["edge"].astype(np.uint8)
    return arrays


def write_nyuv2_layout(root: str | Path, *, n_train: int, n_val: int, height: int = 288,
                       width: int = 384, seed: int = 0, style: str = "a",
                       with_edges: bool = True, progress: bool = True) -> Path:
    """Write indoor scenes as ``root/{train,val}/{image,label,depth,normal[,edge]}/{i}.npy``."""
    return _write_layout(root, "indoor", {"train": n_train, "val": n_val}, height, width, seed,
                         style, with_edges, progress)


def write_cityscapes_layout(root: str | Path, *, n_train: int, n_val: int, height: int = 128,
                            width: int = 256, seed: int = 0, style: str = "a",
                            with_edges: bool = True, progress: bool = True) -> Path:
    """Write street scenes as ``root/{train,val}/{image,label_7,label_19,depth[,edge]}/{i}.npy``.

    ``depth`` is MTAN-style disparity ``0.98 / z`` (z = 2 m -> 0.49, clipped at 0.49), 0 invalid.
    """
    return _write_layout(root, "street", {"train": n_train, "val": n_val}, height, width, seed,
                         style, with_edges, progress)


# ----------------------------------------------------------------------------- PASCAL-Context


def render_pascal(seed: int, height: int, width: int, *, style: str = "a") -> dict:
    """Render one five-task PASCAL-Context-like image: a room with 0-2 people.

    Returns ``image``; ``semantic`` (H,W) int64 in the 21 PASCAL-Context classes, -1 void;
    ``label_map`` (H,W) the void-free class map + 1 (0 = unlabelled clutter or no hit) from
    which the loader derives semantic edges; ``parts`` (H,W) 0..6 body parts (0 off people);
    ``people`` (H,W) bool masks stacked per visible person ``(P,H,W)``; ``normal`` (H,W,3);
    ``saliency`` (H,W) uint8 0/1 = any labelled object (people and furniture). Images are
    randomly cropped to 80-100 % of each side, so sizes differ as in the real data.
    """
    scene = build_pascal(_geometry_rng(seed))
    out = _render(scene, seed, height, width, style)
    look = np.array([i.cls for i in scene.instances] + [-1])
    inst = out["instance"]
    voc = np.where(look[inst] >= 0, _LOOK_TO_VOC[np.maximum(look[inst], 0)], -1)
    sem = np.where(out["semantic"] >= 0, _LOOK_TO_VOC[np.maximum(out["semantic"], 0)], -1)
    persons = [i for i, info in enumerate(scene.instances) if info.cls == PERSON_LOOK]
    people = np.stack([inst == i for i in persons] + [np.zeros(inst.shape, bool)])
    parts = out.get("parts", np.zeros(inst.shape, np.int64))
    res = dict(image=out["image"], semantic=sem, label_map=voc + 1, parts=parts, people=people,
               normal=out["normal"], saliency=(voc > 0).astype(np.uint8))
    crop_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(6)[5])
    h = round(height * crop_rng.uniform(0.8, 1.0))
    w = round(width * crop_rng.uniform(0.8, 1.0))
    top, left = crop_rng.integers(0, height - h + 1), crop_rng.integers(0, width - w + 1)
    win = (slice(top, top + h), slice(left, left + w))
    res = {k: (v[:, win[0], win[1]] if k == "people" else v[win]) for k, v in res.items()}
    res["people"] = res["people"][res["people"].any(axis=(1, 2))]  # visible people only
    return res


_PART_NAMES = {1: "head", 2: "torso", 3: "luarm", 4: "llarm", 5: "luleg", 6: "llleg"}


def _parts_annotation(out: dict) -> dict | None:
    """A Pascal-Part style ``anno`` struct for the visible people; None if there is none."""
    objects = []
    for mask in out["people"]:
        parts = [{"part_name": _PART_NAMES[k], "mask": (mask & (out["parts"] == k)).astype(
            np.uint8)} for k in range(1, 7) if (mask & (out["parts"] == k)).any()]
        if parts:
            objects.append({"class": "person", "class_ind": 15, "mask": mask.astype(np.uint8),
                            "parts": np.array(parts, dtype=object)})
    if not objects:
        return None
    chair = (out["semantic"] == 9)
    if chair.any():  # a non-person object without parts, as real annotations have
        objects.append({"class": "chair", "class_ind": 9, "mask": chair.astype(np.uint8),
                        "parts": np.zeros((0, 0))})
    return {"imname": "synthetic", "objects": np.array(objects, dtype=object)}


def write_pascal_layout(root: str | Path, *, n_train: int, n_val: int, height: int = 96,
                        width: int = 128, seed: int = 0, style: str = "a",
                        progress: bool = True) -> Path:
    """Write PASCAL-like scenes in the benchmark's PASCAL-Context layout (see
    :mod:`mtpsl.data.pascal`): JPEG images, PNG semantics/normals/saliency, ``.mat`` parts
    (only for images with people) and context label maps, ``ImageSets/Context`` lists."""
    from PIL import Image
    from scipy.io import savemat

    _check_sizes({"train": n_train, "val": n_val}, height, width, seed)
    root = Path(root)
    folders = {"image": "JPEGImages", "semantic": "semseg/pascal-context",
               "parts": "human_parts", "normal": "normals_distill", "saliency": "sal_distill",
               "edges": "pascal-context/trainval"}
    for folder in [*folders.values(), "ImageSets/Context"]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, n in {"train": n_train, "val": n_val}.items():
        ids = [f"synth_{split}_{i:06d}" for i in range(n)]
        items = range(n)
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc=f"synthetic pascal {split}", unit="img")
        for i in items:
            out = render_pascal(item_seed(seed, split, i), height, width, style=style)
            name = ids[i]
            rgb = np.round(out["image"] * 255).astype(np.uint8)
            Image.fromarray(rgb).save(root / folders["image"] / f"{name}.jpg", quality=95)
            sem = np.where(out["semantic"] >= 0, out["semantic"], 255).astype(np.uint8)
            Image.fromarray(sem).save(root / folders["semantic"] / f"{name}.png")
            # a unit vector never encodes to (0, 0, 0), which marks "no label"
            valid = (out["normal"] != 0).any(-1, keepdims=True)
            png = np.where(valid, np.clip(np.round((out["normal"] + 1) / 2 * 255), 0, 255), 0)
            Image.fromarray(png.astype(np.uint8)).save(root / folders["normal"] / f"{name}.png")
            Image.fromarray(out["saliency"] * 255).save(root / folders["saliency"] / f"{name}.png")
            savemat(root / folders["edges"] / f"{name}.mat",
                    {"LabelMap": out["label_map"].astype(np.uint16)})
            anno = _parts_annotation(out)
            if anno is not None:
                savemat(root / folders["parts"] / f"{name}.mat", {"anno": anno})
        (root / "ImageSets/Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    meta = dict(family="pascal", height=height, width=width, seed=seed, style=style,
                splits={"train": n_train, "val": n_val}, class_names=VOC21,
                part_names=["background", "head", "torso", "upper arm", "lower arm",
                            "upper leg", "lower leg"],
                note="images are random 80-100 % crops of height x width")
    (root / "synthetic.json").write_text(json.dumps(meta, indent=2))
    return root
