"""Write the small demo images used by examples/quickstart.yaml (already committed).

Three 128 x 128 grayscale images of bright, wavy, vessel-like curves on a noisy background,
with their binary labels. Deterministic: ``python examples/make_demo_images.py`` rewrites the
same files. (The realistic synthetic vessel data set is a separate, larger plugin.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.filters import gaussian
from skimage.io import imsave

SIZE = 128
HERE = Path(__file__).resolve().parent / "data"


def vessel_image(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    label = np.zeros((SIZE, SIZE), bool)
    intensity = np.zeros((SIZE, SIZE))
    for _ in range(4):
        x0, slope = rng.uniform(0, SIZE), rng.uniform(-0.6, 0.6)
        amp, freq, phase = rng.uniform(4, 12), rng.uniform(0.02, 0.08), rng.uniform(0, 6.3)
        radius = rng.uniform(1.5, 4.0)
        centre = x0 + slope * yy + amp * np.sin(freq * yy + phase)
        dist = np.abs(xx - centre)
        label |= dist <= radius
        intensity = np.maximum(intensity, np.clip(1 - (dist / radius) ** 2, 0, 1))
    illumination = 0.7 + 0.3 * np.sin(xx / SIZE * 3.1 + seed) * np.cos(yy / SIZE * 2.3)
    image = gaussian(intensity, 1.0) * illumination + 0.1 * rng.rand(SIZE, SIZE)
    image = np.clip(image / image.max(), 0, 1)
    return (image * 255).astype(np.uint8), label


def main() -> None:
    HERE.mkdir(exist_ok=True)
    (HERE / "labels").mkdir(exist_ok=True)
    for index in range(1, 4):
        image, label = vessel_image(index)
        imsave(HERE / f"vessels-{index}.png", image, check_contrast=False)
        imsave(HERE / "labels" / f"vessels-{index}.png", (label * 255).astype(np.uint8),
               check_contrast=False)


if __name__ == "__main__":
    main()
