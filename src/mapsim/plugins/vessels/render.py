"""Drawing vessel trees: the exact label and a fluorescence-like image.

The label is the union of the discs along the centrelines: pixel (i, j) is vessel when
((i - y) / r)^2 + ((j - x) / r)^2 < 1 for some disc centre (y, x) of radius r (the test of
``skimage.draw.disk``). The image's vessel signal at a pixel is the chord of the vessel's
circular cross-section through it, 2 r sqrt(1 - (d / r)^2) (the path length through the
fluorescent lumen: bright at the centre, dim at the wall), raised to a power ``gamma`` < 1 so
capillaries stay visible. It is then blurred (the microscope's point spread), laid over a
textured tissue background, multiplied by a smooth uneven illumination, and given
Poisson-Gaussian noise (shot noise of ``photons`` photons at full signal plus read noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from mapsim.plugins.vessels.geometry import VesselGeometry


@dataclass(frozen=True)
class AppearanceParams:
    """How the vessels look (intensities are relative to the vessel signal, ~1 on thick vessels).

    gamma: exponent of the chord length (1 = proportional to the chord).
    blur: standard deviation (pixels) of the Gaussian point spread.
    background: mean tissue intensity.
    texture: standard deviation of the tissue texture.
    illumination: relative amplitude of the smooth uneven illumination (0 = even).
    photons: expected photon count of the full vessel signal (lower = noisier).
    read_noise: standard deviation of the Gaussian read noise.
    """

    gamma: float = 0.6
    blur: float = 1.5
    background: float = 0.18
    texture: float = 0.15
    illumination: float = 0.6
    photons: float = 10.0
    read_noise: float = 0.02


def _disc_offsets(rmax: int) -> tuple[np.ndarray, np.ndarray]:
    dy, dx = np.mgrid[-rmax:rmax + 1, -rmax:rmax + 1]
    return dy.ravel(), dx.ravel()


def rasterise(geometry: VesselGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The label (bool (H, W)) and the chord length (float32 (H, W), pixels) of the vessels.

    Discs of one integer bounding radius are drawn together, vectorised, with the test of
    ``skimage.draw.disk`` (the tests check the two agree exactly): a 1104 x 1376 image has some
    50,000 discs, which one ``disk`` call each would take seconds to draw. The chord at a
    pixel covered by several discs is the largest of them.
    """
    h, w = geometry.size
    centres, radii = geometry.disc_centres()
    chord = np.zeros(h * w, dtype=np.float64)
    label = np.zeros(h * w, dtype=bool)
    if len(radii) == 0:
        return label.reshape(h, w), chord.reshape(h, w).astype(np.float32)
    bounds = np.ceil(radii).astype(np.int64)
    for rmax in np.unique(bounds):
        pick = bounds == rmax
        cy, cx, r = centres[pick, 0], centres[pick, 1], radii[pick]
        oy, ox = _disc_offsets(int(rmax))
        # candidate pixels: offsets around the pixel nearest to each centre
        py = np.rint(cy).astype(np.int64)[:, None] + oy[None]
        px = np.rint(cx).astype(np.int64)[:, None] + ox[None]
        q = ((py - cy[:, None]) / r[:, None]) ** 2 + ((px - cx[:, None]) / r[:, None]) ** 2
        keep = (q < 1.0) & (py >= 0) & (py < h) & (px >= 0) & (px < w)
        flat = (py * w + px)[keep]
        label[flat] = True
        np.maximum.at(chord, flat, (2.0 * r[:, None] * np.sqrt(np.clip(1.0 - q, 0.0, 1.0)))[keep])
    return label.reshape(h, w), chord.reshape(h, w).astype(np.float32)


def _bumps(n: int, cells: int) -> np.ndarray:
    """(n, cells) Gaussian bumps spaced evenly over n pixels (one cell apart, width one cell)."""
    centres = (np.arange(cells) + 0.5) * (n / cells)
    width = n / cells
    return np.exp(-0.5 * ((np.arange(n)[:, None] - centres[None]) / width) ** 2)


def _smooth_field(shape: tuple[int, int], cells: int, rs: np.random.RandomState) -> np.ndarray:
    """A smooth random field, about unit variance: random weights on a grid of Gaussian bumps.

    ``cells`` bumps span the longer side; the field is a separable product, so it costs two
    small matrix products.
    """
    h, w = shape
    gh = max(2, int(round(cells * h / max(h, w))))
    gw = max(2, int(round(cells * w / max(h, w))))
    weights = rs.standard_normal((gh, gw))
    # a sum of unit Gaussians one width apart has variance about sum(exp(-d^2)) ~ pi in 2-D
    return (_bumps(h, gh) @ weights @ _bumps(w, gw).T) / np.sqrt(np.pi)


def render(
    chord: np.ndarray, params: AppearanceParams, rs: np.random.RandomState,
    reference_radius: float = 5.0,
) -> np.ndarray:
    """A fluorescence-like image (float32 (H, W), roughly in [0, 1.5]) from the chord map.

    ``reference_radius``: the radius whose centre chord gives the vessel signal 1.
    """
    p = params
    h, w = chord.shape
    signal = (chord.astype(np.float64) / (2.0 * reference_radius)) ** p.gamma
    if p.blur > 0:
        signal = gaussian_filter(signal, p.blur, mode="nearest")
    # tissue: fine grain plus a coarser mottling
    grain = gaussian_filter(rs.standard_normal((h, w)), 1.5, mode="reflect") * 3.0
    mottle = _smooth_field((h, w), max(4, int(max(h, w) / 32)), rs)
    tissue = p.background + p.texture * (0.6 * grain + 0.8 * mottle)
    illumination = 1.0 + p.illumination * np.tanh(_smooth_field((h, w), 3, rs))
    clean = np.clip(illumination * (tissue + signal), 0.0, None)
    photons = rs.poisson(clean * p.photons) / p.photons
    noisy = photons + p.read_noise * rs.standard_normal((h, w))
    return noisy.astype(np.float32)
