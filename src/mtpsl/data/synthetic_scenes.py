"""Scene construction for the procedural ``synthetic`` dataset.

A scene is a camera, a list of analytic primitives (planes, yaw-rotated boxes, spheres,
vertical capped cylinders), an instance table (class id + flags) and lights. Only the
geometry random stream is consumed here, so a seed fixes the scene independently of the
output resolution and of the appearance style.

World coordinates: X right, Y forward, Z up, metres (right-handed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEG = np.pi / 180.0


@dataclass(frozen=True)
class Prim:
    """One analytic primitive belonging to instance ``inst``.

    plane: ``center`` is a point, ``size`` the unit normal. box: centre, half extents, yaw about Z.
    sphere: centre, ``size[0]`` radius. cyl: ``center`` = base centre, ``size`` = (radius, height).
    """

    kind: str
    inst: int
    center: np.ndarray
    size: np.ndarray
    yaw: float = 0.0

    def bound(self) -> tuple[np.ndarray, float] | None:
        """Bounding sphere (used for screen-space culling); None for unbounded planes."""
        if self.kind == "plane":
            return None
        if self.kind == "box":
            return self.center, float(np.linalg.norm(self.size))
        if self.kind == "sphere":
            return self.center, float(self.size[0])
        r, h = self.size
        return self.center + np.array([0.0, 0.0, h / 2]), float(np.hypot(r, h / 2))


@dataclass(frozen=True)
class Instance:
    """An object instance: class id (-1 = unlabelled) and rendering flags."""

    cls: int
    glass: bool = False  # depth and normals invalid (windows)
    structural: bool = False  # room surfaces / ground: never get an ignore band


@dataclass(frozen=True)
class Camera:
    """Pinhole camera at ``pos`` with yaw (about Z, 0 = looking along +Y) and downward pitch."""

    pos: np.ndarray
    yaw: float
    pitch: float
    hfov: float = 60.0 * DEG

    def rotation(self) -> np.ndarray:
        """World-from-camera rotation; columns are the camera x (right), y (down), z (forward)."""
        cy, sy, cp, sp = np.cos(self.yaw), np.sin(self.yaw), np.cos(self.pitch), np.sin(self.pitch)
        fwd = np.array([sy * cp, cy * cp, -sp])
        right = np.array([cy, -sy, 0.0])
        down = np.cross(fwd, right)
        return np.stack([right, down, fwd], axis=1)


@dataclass
class Scene:
    """Everything the renderer needs. ``lights`` rows: (x, y, z, intensity, is_directional)."""

    family: str
    camera: Camera | None = None
    prims: list[Prim] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    lights: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    far: float = 1e9
    part_of: dict[int, int] = field(default_factory=dict)
    """Primitive index -> body-part class (1..6) for people with parts; empty elsewhere."""

    def inst(self, cls: int, **flags: bool) -> int:
        """Register an instance and return its id."""
        self.instances.append(Instance(cls, **flags))
        return len(self.instances) - 1

    def plane(self, inst: int, point: tuple, normal: tuple) -> None:
        """Add an infinite plane."""
        self.prims.append(Prim("plane", inst, np.asarray(point, float), np.asarray(normal, float)))

    def box(self, inst: int, center: tuple, half: tuple, yaw: float = 0.0) -> None:
        """Add a box given its centre, half extents and yaw about Z."""
        c, h = np.asarray(center, float), np.asarray(half, float)
        self.prims.append(Prim("box", inst, c, h, yaw))

    def part(self, inst: int, base: tuple, local: tuple, half: tuple) -> None:
        """Add a box given in the local frame of ``base`` = (x, y, yaw): for composite objects."""
        x, y, yaw = base
        c, s = np.cos(yaw), np.sin(yaw)
        lx, ly, lz = local
        self.box(inst, (x + c * lx - s * ly, y + s * lx + c * ly, lz), half, yaw)

    def sphere(self, inst: int, center: tuple, r: float) -> None:
        """Add a sphere."""
        self.prims.append(Prim("sphere", inst, np.asarray(center, float), np.array([r])))

    def cyl(self, inst: int, base: tuple, r: float, h: float) -> None:
        """Add a vertical capped cylinder standing on ``base``."""
        self.prims.append(Prim("cyl", inst, np.asarray(base, float), np.array([r, h])))


# ----------------------------------------------------------------------------- indoor


class _Floor:
    """Axis-aligned footprint bookkeeping so floor objects do not interpenetrate."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float) -> None:
        self.bounds = (x0, x1, y0, y1)
        self.used: list[tuple[float, float, float, float]] = []

    def free(self, r: tuple[float, float, float, float]) -> bool:
        x0, x1, y0, y1 = self.bounds
        if r[0] < x0 or r[1] > x1 or r[2] < y0 or r[3] > y1:
            return False
        return all(r[1] <= u[0] or r[0] >= u[1] or r[3] <= u[2] or r[2] >= u[3] for u in self.used)

    def place(self, rng: np.random.Generator, w: float, d: float, wall: bool) -> tuple | None:
        """Find (x, y, yaw) for a w x d footprint; ``wall`` puts its back (+local y) on a wall."""
        x0, x1, y0, y1 = self.bounds
        for _ in range(25):
            if wall:
                side = int(rng.integers(3))  # 0 far, 1 left, 2 right
                yaw = (0.0, np.pi / 2, -np.pi / 2)[side]
                fw, fd = (w, d) if side == 0 else (d, w)
                if side == 0:
                    x, y = rng.uniform(x0 + fw / 2, max(x0 + fw / 2, x1 - fw / 2)), y1 - fd / 2
                else:
                    x = x0 + fw / 2 if side == 1 else x1 - fw / 2
                    y = rng.uniform(y0 + fd / 2, max(y0 + fd / 2, y1 - fd / 2))
            else:
                yaw = rng.uniform(-0.5, 0.5)
                c, s = abs(np.cos(yaw)), abs(np.sin(yaw))
                fw, fd = c * w + s * d, s * w + c * d
                x = rng.uniform(x0 + fw / 2, max(x0 + fw / 2, x1 - fw / 2))
                y = rng.uniform(y0 + fd / 2, max(y0 + fd / 2, y1 - fd / 2))
            r = (x - fw / 2, x + fw / 2, y - fd / 2, y + fd / 2)
            if self.free(r):
                self.used.append(r)
                return x, y, yaw
        return None


def _table(s: Scene, rng: np.random.Generator, fl: _Floor, tops: list) -> tuple | None:
    w, d, h = rng.uniform(0.8, 1.6), rng.uniform(0.6, 1.0), rng.uniform(0.70, 0.78)
    base = fl.place(rng, w + 0.9, d + 0.9, wall=False)  # margin leaves room for chairs
    if base is None:
        return None
    t = s.inst(9)
    s.part(t, base, (0, 0, h - 0.02), (w / 2, d / 2, 0.02))
    for sx in (-1, 1):
        for sy in (-1, 1):
            s.part(t, base, (sx * (w / 2 - 0.05), sy * (d / 2 - 0.05), (h - 0.04) / 2),
                   (0.025, 0.025, (h - 0.04) / 2))
    tops.append((base, w, d, h))
    return (*base, w, d)


def _chair(s: Scene, base: tuple) -> None:
    c = s.inst(3)
    s.part(c, base, (0, 0, 0.45), (0.22, 0.22, 0.025))
    s.part(c, base, (0, 0.2, 0.72), (0.22, 0.025, 0.25))
    for sx in (-1, 1):
        for sy in (-1, 1):
            s.part(c, base, (sx * 0.19, sy * 0.19, 0.215), (0.02, 0.02, 0.215))


def _chairs_around(s: Scene, rng: np.random.Generator, table: tuple) -> None:
    x, y, yaw, w, d = table
    for k in range(int(rng.integers(1, 4))):
        side = (k + int(rng.integers(2))) % 4
        ly = (-1, 1, 0, 0)[side] * (d / 2 + 0.3)
        lx = (0, 0, -1, 1)[side] * (w / 2 + 0.3)
        c, sn = np.cos(yaw), np.sin(yaw)
        cyaw = yaw + (np.pi, 0.0, np.pi / 2, -np.pi / 2)[side] + rng.uniform(-0.3, 0.3)
        _chair(s, (x + c * lx - sn * ly, y + sn * lx + c * ly, cyaw))


def _on_top(s: Scene, rng: np.random.Generator, top: tuple) -> None:
    """Books and small objects on a table / cabinet top."""
    (x, y, yaw), w, d, h = top
    c, sn = np.cos(yaw), np.sin(yaw)
    for _ in range(int(rng.integers(1, 4))):
        lx, ly = rng.uniform(-w / 2 + 0.15, w / 2 - 0.15), rng.uniform(-d / 2 + 0.15, d / 2 - 0.15)
        px, py = x + c * lx - sn * ly, y + sn * lx + c * ly
        if rng.random() < 0.6:
            z = h
            for _ in range(int(rng.integers(1, 4))):
                bh = rng.uniform(0.02, 0.05)
                s.box(s.inst(1), (px, py, z + bh / 2),
                      (rng.uniform(0.08, 0.13), rng.uniform(0.1, 0.15), bh / 2),
                      yaw + rng.uniform(-0.4, 0.4))
                z += bh
        elif rng.random() < 0.5:
            r = rng.uniform(0.05, 0.12)
            s.sphere(s.inst(6), (px, py, h + r), r)
        else:
            s.cyl(s.inst(6), (px, py, h), rng.uniform(0.03, 0.08), rng.uniform(0.1, 0.3))


def _wall_item(s: Scene, rng: np.random.Generator, cls: int, room: tuple) -> None:
    """Painting / tv / window: a thin box protruding slightly from a visible wall."""
    rw, rd, rh = room
    w = rng.uniform(0.6, 1.4) if cls != 12 else rng.uniform(0.8, 1.6)
    h = rng.uniform(0.4, 0.9) if cls != 12 else rng.uniform(0.9, 1.4)
    zc = rng.uniform(1.0 + h / 2 - 0.2, min(rh - h / 2 - 0.1, 1.9))
    t = 0.03 if cls == 12 else (0.02 if cls == 7 else 0.06)
    side = int(rng.integers(3))
    span = rw if side == 0 else rd
    u = rng.uniform(w / 2 + 0.1, max(w / 2 + 0.1, span - w / 2 - 0.1))
    if side == 0:
        s.box(s.inst(cls, glass=cls == 12), (u, rd - t / 2, zc), (w / 2, t / 2, h / 2))
    else:
        x = t / 2 if side == 1 else rw - t / 2
        s.box(s.inst(cls, glass=cls == 12), (x, max(u, 1.5), zc), (t / 2, w / 2, h / 2))


def _room(s: Scene, rw: float, rd: float, rh: float) -> None:
    s.plane(s.inst(4, structural=True), (0, 0, 0), (0, 0, 1))
    s.plane(s.inst(2, structural=True), (0, 0, rh), (0, 0, -1))
    for point, normal in (((0, 0, 0), (1, 0, 0)), ((rw, 0, 0), (-1, 0, 0)),
                          ((0, 0, 0), (0, 1, 0)), ((0, rd, 0), (0, -1, 0))):
        s.plane(s.inst(11, structural=True), point, normal)


def _furniture_piece(s: Scene, rng: np.random.Generator, fl: _Floor, tops: list) -> None:
    kind = rng.choice(["bed", "sofa", "cabinet", "cabinet"], p=[0.3, 0.3, 0.2, 0.2])
    if kind == "bed":
        w, d = rng.uniform(1.0, 1.8), rng.uniform(1.9, 2.1)
        base = fl.place(rng, w, d, wall=True)
        if base is not None:
            b = s.inst(0)
            s.part(b, base, (0, -0.05, 0.25), (w / 2, d / 2 - 0.05, 0.25))
            s.part(b, base, (0, d / 2 - 0.04, 0.5), (w / 2, 0.04, 0.5))
    elif kind == "sofa":
        w, d = rng.uniform(1.5, 2.4), rng.uniform(0.8, 1.0)
        base = fl.place(rng, w, d, wall=True)
        if base is not None:
            f = s.inst(8)
            s.part(f, base, (0, -0.1, 0.22), (w / 2, d / 2 - 0.1, 0.22))
            s.part(f, base, (0, d / 2 - 0.1, 0.42), (w / 2, 0.1, 0.42))
            for sx in (-1, 1):
                s.part(f, base, (sx * (w / 2 - 0.1), -0.1, 0.32), (0.1, d / 2 - 0.1, 0.32))
    else:
        w, d, h = rng.uniform(0.5, 1.6), rng.uniform(0.35, 0.6), rng.uniform(0.6, 2.0)
        base = fl.place(rng, w, d, wall=True)
        if base is not None:
            s.part(s.inst(5), base, (0, 0, h / 2), (w / 2, d / 2, h / 2))
            if h < 1.5:
                tops.append((base, w, d, h))


def build_indoor(rng: np.random.Generator) -> Scene:
    """A NYUv2-like box room with furniture, small objects and wall-mounted rectangles."""
    s = Scene("indoor", far=30.0)
    rw, rd, rh = rng.uniform(3.2, 6.0), rng.uniform(4.0, 8.0), rng.uniform(2.4, 3.0)
    _room(s, rw, rd, rh)
    cam_y = rng.uniform(0.2, 0.8)
    s.camera = Camera(np.array([rng.uniform(0.35, 0.65) * rw, cam_y, rng.uniform(1.0, 1.7)]),
                      rng.uniform(-25, 25) * DEG, rng.uniform(0, 22) * DEG)
    fl = _Floor(0.02, rw - 0.02, cam_y + 1.0, rd - 0.02)
    tops: list = []
    for _ in range(int(rng.integers(1, 4))):
        _furniture_piece(s, rng, fl, tops)
    for _ in range(int(rng.integers(0, 2)) + int(rng.random() < 0.7)):
        table = _table(s, rng, fl, tops)
        if table is not None:
            _chairs_around(s, rng, table)
    for _ in range(int(rng.integers(0, 2))):
        base = fl.place(rng, 0.5, 0.5, wall=False)
        if base is not None:
            _chair(s, base)
    for top in tops:
        _on_top(s, rng, top)
    for _ in range(int(rng.integers(0, 3))):  # floor objects: bins, lamps, balls
        base = fl.place(rng, 0.5, 0.5, wall=False)
        if base is not None:
            if rng.random() < 0.5:
                r, h = rng.uniform(0.1, 0.22), rng.uniform(0.2, 1.2)
                s.cyl(s.inst(6), (base[0], base[1], 0), r, h)
            else:
                r = rng.uniform(0.1, 0.25)
                s.sphere(s.inst(6), (base[0], base[1], r), r)
    if rng.random() < 0.4:  # unlabelled clutter
        base = fl.place(rng, 0.6, 0.6, wall=False)
        if base is not None:
            h = rng.uniform(0.2, 0.8)
            s.box(s.inst(-1), (base[0], base[1], h / 2), (0.25, 0.25, h / 2), base[2])
    for cls, n in ((7, int(rng.integers(0, 3))), (10, int(rng.random() < 0.5)),
                   (12, int(rng.integers(0, 3)))):
        for _ in range(n):
            _wall_item(s, rng, cls, (rw, rd, rh))
    for _ in range(int(rng.integers(1, 3))):
        s.lights.append((rng.uniform(0.2, 0.8) * rw, rng.uniform(0.3, 0.9) * rd, rh - 0.1,
                         rng.uniform(1.5, 3.0), 0.0))
    return s


# ----------------------------------------------------------------------------- street


def _buildings(s: Scene, rng: np.random.Generator, x_in: float, sign: float) -> None:
    y = rng.uniform(-10, 0)
    while y < 110:
        w = rng.uniform(6, 25)
        depth, h = rng.uniform(8, 20), rng.uniform(5, 25)
        s.box(s.inst(2), (sign * (x_in + depth / 2), y + w / 2, h / 2), (depth / 2, w / 2, h / 2))
        y += w
        if rng.random() < 0.35:  # gap with a wall/fence or vegetation
            gap = rng.uniform(3, 8)
            kind = rng.integers(3)
            if kind == 0:
                s.box(s.inst(3), (sign * (x_in + 0.2), y + gap / 2, 0.8), (0.2, gap / 2, 0.8))
            elif kind == 1:
                s.box(s.inst(4), (sign * (x_in + 0.05), y + gap / 2, 0.9), (0.03, gap / 2, 0.9))
            else:
                s.sphere(s.inst(8), (sign * (x_in + 2), y + gap / 2, 1.5), min(gap / 2, 2.5))
            y += gap


def _vehicle(s: Scene, rng: np.random.Generator, x: float, y: float) -> None:
    kind = rng.choice(["car", "truck", "bus", "moto"], p=[0.7, 0.12, 0.1, 0.08])
    yaw = rng.uniform(-0.08, 0.08)
    if kind == "car":
        v, w, ln = s.inst(13), rng.uniform(1.6, 1.9), rng.uniform(3.8, 4.8)
        s.part(v, (x, y, yaw), (0, 0, 0.6), (w / 2, ln / 2, 0.45))
        s.part(v, (x, y, yaw), (0, -0.2, 1.3), (w / 2 - 0.1, ln / 4, 0.25))
    elif kind in ("truck", "bus"):
        v, ln = s.inst(14 if kind == "truck" else 15), rng.uniform(7, 12)
        s.part(v, (x, y, yaw), (0, 0, 1.7), (1.25, ln / 2, 1.4))
    else:
        s.part(s.inst(17), (x, y, yaw), (0, 0, 0.55), (0.25, 1.0, 0.45))
        _person(s, rng, x, y, 12, z0=0.9)


def _person(s: Scene, rng: np.random.Generator, x: float, y: float, cls: int,
            z0: float = 0.0) -> None:
    p, h = s.inst(cls), rng.uniform(1.35, 1.6) - (0.7 if z0 > 0 else 0.0)
    s.cyl(p, (x, y, z0), rng.uniform(0.17, 0.25), h)
    s.sphere(p, (x, y, z0 + h + 0.13), 0.12)


def _street_furniture(s: Scene, rng: np.random.Generator, xc: float, sign: float) -> None:
    y = rng.uniform(2, 12)
    while y < 90:
        k = rng.random()
        x = sign * (xc + rng.uniform(0.3, 0.8))
        if k < 0.35:  # pole with sign or light
            h = rng.uniform(3, 7)
            s.cyl(s.inst(5), (x, y, 0.12), 0.07, h)
            if rng.random() < 0.5:
                s.box(s.inst(7), (x - sign * 0.1, y, h - 0.3), (0.05, 0.35, 0.3))
            else:
                s.box(s.inst(6), (x - sign * 0.5, y, h - 0.4), (0.15, 0.15, 0.45))
        elif k < 0.65:  # tree
            t, h = s.inst(8), rng.uniform(2, 4)
            s.cyl(t, (x, y, 0.12), 0.15, h)
            s.sphere(t, (x, y, h + 1.0), rng.uniform(1.2, 2.5))
        elif k < 0.8:  # terrain patch (grass strip)
            ln = rng.uniform(2, 8)
            s.box(s.inst(9), (x, y + ln / 2, 0.14), (0.6, ln / 2, 0.03))
        elif k < 0.93:
            _person(s, rng, x + sign * rng.uniform(0.5, 2), y, 11)
        else:
            s.box(s.inst(18), (x + sign * 1.5, y, 0.55), (0.05, 0.85, 0.45), rng.uniform(-0.2, 0.2))
            _person(s, rng, x + sign * 1.5, y, 12, z0=0.9)
        y += rng.uniform(4, 15)


def build_street(rng: np.random.Generator) -> Scene:
    """A Cityscapes-like street: road, raised sidewalks, buildings, vehicles, people, poles."""
    s = Scene("street", far=200.0)
    road_w, side_w = rng.uniform(7, 14), rng.uniform(2.5, 5)
    s.plane(s.inst(0, structural=True), (0, 0, 0), (0, 0, 1))
    for sign in (-1.0, 1.0):
        xc = road_w / 2 + 15
        s.box(s.inst(1, structural=True), (sign * xc, 50, 0.06), (15, 70, 0.06))
        _buildings(s, rng, road_w / 2 + side_w, sign)
        _street_furniture(s, rng, road_w / 2, sign)
    hb = rng.uniform(3, 8)
    s.box(s.inst(2), (0, 125, hb), (80, 5, hb))  # backdrop
    for _ in range(int(rng.integers(2, 9))):
        lane = rng.uniform(-road_w / 2 + 1.2, road_w / 2 - 1.2)
        _vehicle(s, rng, lane, rng.uniform(6, 70))
    s.camera = Camera(np.array([rng.uniform(-0.25, 0.25) * road_w, 0.0, rng.uniform(1.2, 1.6)]),
                      rng.uniform(-8, 8) * DEG, rng.uniform(-4, 3) * DEG)
    az, el = rng.uniform(-np.pi, np.pi), rng.uniform(25, 65) * DEG
    s.lights.append((np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el), 1.2, 1.0))
    return s


# ----------------------------------------------------------------------------- people (PASCAL)

PERSON_LOOK = 13  # appearance row of a person (after the 13 indoor looks)
# (part class, local centre at 1.7 m height, half extents) of a standing person facing -y
_BODY = [
    (2, (0.0, 0.0, 1.18), (0.18, 0.10, 0.27)),  # torso
    (3, (-0.25, 0.0, 1.28), (0.05, 0.05, 0.15)),  # upper arms
    (3, (0.25, 0.0, 1.28), (0.05, 0.05, 0.15)),
    (4, (-0.25, 0.0, 0.99), (0.045, 0.045, 0.14)),  # lower arms
    (4, (0.25, 0.0, 0.99), (0.045, 0.045, 0.14)),
    (5, (-0.09, 0.0, 0.68), (0.075, 0.075, 0.23)),  # upper legs
    (5, (0.09, 0.0, 0.68), (0.075, 0.075, 0.23)),
    (6, (-0.09, 0.0, 0.225), (0.06, 0.06, 0.225)),  # lower legs
    (6, (0.09, 0.0, 0.225), (0.06, 0.06, 0.225)),
]


def person_with_parts(s: Scene, base: tuple, height: float) -> int:
    """A box-and-sphere person standing at ``base`` = (x, y, yaw); records each primitive's
    body part (1 head, 2 torso, 3 upper arm, 4 lower arm, 5 upper leg, 6 lower leg)."""
    inst, k = s.inst(PERSON_LOOK), height / 1.7
    for part, (lx, ly, lz), half in _BODY:
        s.part_of[len(s.prims)] = part
        s.part(inst, base, (k * lx, k * ly, k * lz), tuple(k * h for h in half))
    x, y, _ = base
    s.part_of[len(s.prims)] = 1
    s.sphere(inst, (x, y, k * 1.57), k * 0.12)
    return inst


def build_pascal(rng: np.random.Generator) -> Scene:
    """An indoor room (as :func:`build_indoor`) with 0-2 people in front of the camera."""
    s = build_indoor(rng)
    s.family = "pascal"
    rw, rd = s.prims[3].center[0], s.prims[5].center[1]  # the x = rw and y = rd walls
    cam = s.camera
    assert cam is not None  # build_indoor places it
    n_people = int(rng.choice([0, 1, 1, 1, 2, 2]))
    for _ in range(n_people):
        dist, side = rng.uniform(1.6, 3.5), rng.uniform(-0.45, 0.45)
        fwd = np.array([np.sin(cam.yaw), np.cos(cam.yaw)])
        right = np.array([fwd[1], -fwd[0]])
        x, y = cam.pos[:2] + dist * fwd + side * dist * right
        x, y = float(np.clip(x, 0.35, rw - 0.35)), float(np.clip(y, 0.35, rd - 0.35))
        facing = cam.yaw + np.pi + rng.uniform(-0.8, 0.8)
        person_with_parts(s, (x, y, facing), rng.uniform(1.55, 1.9))
    return s
