"""Vessel trees: tortuous branching centrelines with radii that follow Murray's law.

A tree starts as a trunk entering the image from its border. Each segment is a smooth random
walk (its heading meanders around a mean direction) of constant radius. A segment that ends
inside the image splits in two; the children's radii satisfy Murray's law
r0^3 = r1^3 + r2^3 (the split of r0^3 is random, so most branchings are asymmetric: a thick
continuation and a thinner side branch) and their angles to the parent follow Murray's
optimal branching angles. Branching stops at the capillary radius ``min_radius`` (no child may
be thinner), when a segment leaves the image, or when the trees cover the target vessel
fraction; new trunks are started until that target is reached.

Only the legacy ``numpy.random.RandomState`` is used (its streams do not change between numpy
versions), together with deterministic scipy filters.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d


@dataclass(frozen=True)
class GeometryParams:
    """Shape of the vessel trees (lengths in pixels).

    trunk_radius: range of the trunks' radii.
    min_radius: capillary radius: the thinnest vessel; a segment branches only while both
        children can be at least this thick.
    vessel_fraction: range of the target fraction of vessel pixels (one target per image).
    segment_length: a segment's length is ``segment_length * (2 + radius)`` times a random
        factor in [0.6, 1.4].
    tortuosity: standard deviation (radians) of the meandering of a segment's heading.
    wiggle: correlation length (pixels) of that meandering.
    trunks: range of the number of trunks of a 256 x 256 image (times the square root of
        the side length in units of 256 pixels for other sizes).
    crowding: a thin segment (radius < 2 min_radius) does not branch where the vessel
        fraction around its end (96 x 96 pixels) already exceeds this.
    max_trunks: at most this many trees per image.
    """

    trunk_radius: tuple[float, float] = (4.0, 7.0)
    min_radius: float = 1.5
    vessel_fraction: tuple[float, float] = (0.10, 0.20)
    segment_length: float = 12.0
    tortuosity: float = 0.35
    wiggle: float = 12.0
    trunks: tuple[int, int] = (3, 5)
    crowding: float = 0.2
    max_trunks: int = 60


@dataclass
class Segment:
    """One vessel segment: a centreline of constant radius.

    ``points`` is (n, 2) float64 (row, column) in pixel coordinates (pixel centres at whole
    numbers); consecutive points are at most ``step`` apart, so the union of discs of
    ``radius`` centred on them is a continuous tube. ``parent`` is the index of the segment
    this one branches from (-1 for a trunk) and ``children`` the indices of its branches: the
    first point of a child is the last point of its parent.
    """

    index: int
    parent: int
    radius: float
    points: np.ndarray
    tree: int
    children: list[int] = field(default_factory=list)

    @property
    def length(self) -> float:
        """Length of the centreline in pixels."""
        if len(self.points) < 2:
            return 0.0
        return float(np.sum(np.hypot(*np.diff(self.points, axis=0).T)))


@dataclass
class VesselGeometry:
    """Every segment of the trees of one image, and the image size (height, width)."""

    size: tuple[int, int]
    segments: list[Segment]
    target_fraction: float

    def disc_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """All disc centres (m, 2) and their radii (m,): the label is the union of these discs."""
        if not self.segments:
            return np.zeros((0, 2)), np.zeros(0)
        centres = np.concatenate([s.points for s in self.segments])
        radii = np.concatenate([np.full(len(s.points), s.radius) for s in self.segments])
        return centres, radii

    def murray_residuals(self) -> np.ndarray:
        """For each branching: (r0^3 - sum of children's r^3) / r0^3 (zero by construction)."""
        out = [
            (s.radius**3 - sum(self.segments[c].radius**3 for c in s.children)) / s.radius**3
            for s in self.segments if s.children
        ]
        return np.asarray(out, dtype=np.float64)


_CELL = 32  # pixels per side of the cells that measure crowding


def step_for(radius: float) -> float:
    """Distance between consecutive disc centres: half the radius, at most one pixel."""
    return min(1.0, 0.5 * radius)


def murray_angles(r0: float, r1: float, r2: float) -> tuple[float, float]:
    """Murray's optimal angles (radians) between the parent's direction and each child's.

    cos(a1) = (r0^4 + r1^4 - r2^4) / (2 r0^2 r1^2), and symmetrically for a2.
    """
    c1 = (r0**4 + r1**4 - r2**4) / (2 * r0**2 * r1**2)
    c2 = (r0**4 + r2**4 - r1**4) / (2 * r0**2 * r2**2)
    return math.acos(min(1.0, max(-1.0, c1))), math.acos(min(1.0, max(-1.0, c2)))


class _Grower:
    """Grows the trees of one image from one RandomState."""

    def __init__(self, size: tuple[int, int], p: GeometryParams, rs: np.random.RandomState):
        self.h, self.w = size
        self.p = p
        self.rs = rs
        self.segments: list[Segment] = []
        self.area = 0.0  # estimated vessel area (overlaps ignored)
        # estimated vessel area per cell of a coarse grid, to spread the vessels out
        self.cells = np.zeros((-(-self.h // _CELL), -(-self.w // _CELL)))
        self.first_side = 0  # the border the first trunk enters from

    def walk(self, start: np.ndarray, heading: float, radius: float, length: float) -> np.ndarray:
        """A meandering centreline from ``start``; cut where it leaves the image."""
        p, rs = self.p, self.rs
        step = step_for(radius)
        n = max(2, int(math.ceil(length / step)) + 1)
        sigma = max(1.0, p.wiggle / step)
        # smooth noise with unit standard deviation: white noise through a Gaussian filter
        # (whose output std is 1 / sqrt(2 sqrt(pi) sigma) for a long signal)
        pad = int(4 * sigma)
        noise = gaussian_filter1d(rs.standard_normal(n + 2 * pad), sigma, mode="constant")
        noise = noise[pad:pad + n] * math.sqrt(2.0 * math.sqrt(math.pi) * sigma)
        theta = heading + p.tortuosity * (noise - noise[0])
        steps = step * np.stack([np.sin(theta[1:]), np.cos(theta[1:])], axis=1)
        points = np.concatenate([start[None], start[None] + np.cumsum(steps, axis=0)])
        margin = radius + 1.0
        outside = ((points[:, 0] < -margin) | (points[:, 0] > self.h - 1 + margin)
                   | (points[:, 1] < -margin) | (points[:, 1] > self.w - 1 + margin))
        if outside[1:].any():
            points = points[: int(np.argmax(outside[1:])) + 2]
        return points

    def add(self, parent: int, radius: float, points: np.ndarray, tree: int) -> Segment:
        seg = Segment(len(self.segments), parent, float(radius), points, tree)
        self.segments.append(seg)
        if parent >= 0:
            self.segments[parent].children.append(seg.index)
        self.area += 2.0 * radius * seg.length + math.pi * radius**2
        cy = np.clip((points[1:, 0] / _CELL).astype(np.int64), 0, self.cells.shape[0] - 1)
        cx = np.clip((points[1:, 1] / _CELL).astype(np.int64), 0, self.cells.shape[1] - 1)
        np.add.at(self.cells, (cy, cx), 2.0 * radius * step_for(radius))
        return seg

    def crowding(self, point: np.ndarray) -> float:
        """Estimated vessel fraction in the 3 x 3 cells around ``point``."""
        gy = min(max(int(point[0] // _CELL), 0), self.cells.shape[0] - 1)
        gx = min(max(int(point[1] // _CELL), 0), self.cells.shape[1] - 1)
        block = self.cells[max(gy - 1, 0):gy + 2, max(gx - 1, 0):gx + 2]
        return float(block.sum()) / (block.size * _CELL * _CELL)

    def segment_length(self, radius: float) -> float:
        return self.p.segment_length * (2.0 + radius) * self.rs.uniform(0.6, 1.4)

    def inside(self, point: np.ndarray) -> bool:
        return 0 <= point[0] <= self.h - 1 and 0 <= point[1] <= self.w - 1

    def trunk(self, tree: int) -> Segment:
        """A trunk entering from a random point of the border, heading inwards."""
        rs, h, w = self.rs, self.h, self.w
        # trunks take the four sides in turn (from a random first side) to spread out
        if tree == 0:
            self.first_side = int(rs.randint(4))
        side = (self.first_side + tree) % 4
        along = rs.uniform(0.1, 0.9)
        start = {
            0: np.array([0.0, along * (w - 1)]),  # top
            1: np.array([h - 1.0, along * (w - 1)]),  # bottom
            2: np.array([along * (h - 1), 0.0]),  # left
            3: np.array([along * (h - 1), w - 1.0]),  # right
        }[int(side)]
        # aim at a random point of the image's central part
        aim = np.array([rs.uniform(0.2, 0.8) * (h - 1), rs.uniform(0.2, 0.8) * (w - 1)])
        heading = math.atan2(aim[0] - start[0], aim[1] - start[1]) + rs.uniform(-0.3, 0.3)
        radius = rs.uniform(*self.p.trunk_radius)
        points = self.walk(start, heading, radius, self.segment_length(radius))
        return self.add(-1, radius, points, tree)

    def branch(self, seg: Segment) -> list[Segment]:
        """Split ``seg`` at its end into two children following Murray's law."""
        rs, r0, rmin = self.rs, seg.radius, self.p.min_radius
        end = seg.points[-1]
        if len(seg.points) < 2 or not self.inside(end) or r0**3 < 2.0 * rmin**3:
            return []
        if r0 < 2.0 * rmin and self.crowding(end) > self.p.crowding:
            return []  # only thin vessels stop in crowds: a thick one ending would look cut
        # share of r0^3 going to the thicker child; the thinner one keeps at least rmin
        top = 1.0 - rmin**3 / r0**3
        share = min(rs.uniform(0.5, 0.97), top)
        r1 = (share * r0**3) ** (1.0 / 3.0)
        r2 = ((1.0 - share) * r0**3) ** (1.0 / 3.0)
        a1, a2 = murray_angles(r0, r1, r2)
        d = seg.points[-1] - seg.points[-2]
        heading = math.atan2(d[0], d[1])
        side = 1.0 if rs.uniform() < 0.5 else -1.0
        out = []
        for radius, angle, sign in ((r1, a1, side), (r2, a2, -side)):
            direction = heading + sign * (angle + rs.uniform(-0.15, 0.15))
            points = self.walk(end, direction, radius, self.segment_length(radius))
            out.append(self.add(seg.index, radius, points, seg.tree))
        return out

    def grow(self, target_area: float, trunks: int) -> None:
        """Grow all trees until the estimated area reaches the target.

        ``trunks`` trees start together. The next segment to branch is always the one whose
        end lies in the least crowded region, so the vessels spread over the image. When
        every branch has ended (left the image, reached the capillary radius or a crowded
        region) before the target, another trunk is started.
        """
        heap: list[tuple[float, int]] = []

        def push(seg: Segment) -> None:
            heapq.heappush(heap, (self.crowding(seg.points[-1]), seg.index))

        for t in range(trunks):
            push(self.trunk(t))
        n_trees = trunks
        while self.area < target_area:
            if not heap:
                if n_trees >= self.p.max_trunks:
                    break
                push(self.trunk(n_trees))
                n_trees += 1
            _, index = heapq.heappop(heap)
            for child in self.branch(self.segments[index]):
                push(child)


def generate_geometry(
    size: tuple[int, int], params: GeometryParams, rs: np.random.RandomState
) -> VesselGeometry:
    """The vessel trees of one image of ``size`` (height, width), drawn from ``rs``."""
    h, w = int(size[0]), int(size[1])
    target = rs.uniform(*params.vessel_fraction)
    grower = _Grower((h, w), params, rs)
    scale = math.sqrt(h * w) / 256.0
    lo, hi = params.trunks
    trunks = max(1, int(round(rs.randint(lo, hi + 1) * math.sqrt(scale))))
    # overlaps at branchings and crossings make the drawn area smaller than the estimate
    grower.grow(target * h * w * 1.12, min(trunks, params.max_trunks))
    return VesselGeometry((h, w), grower.segments, float(target))
