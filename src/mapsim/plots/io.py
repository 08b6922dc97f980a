"""Drawing helpers: file-name-safe names, figures as PNG bytes, pictures written atomically.

The results directory is read through :class:`mapsim.io.results.ResultsDir`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

# the reader's names, for code that imported them from here before they moved
from mapsim.io.results import MetricView  # noqa: F401
from mapsim.io.results import ResultsDir as Results  # noqa: F401

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(text: str) -> str:
    """A file-name-safe form of ``text``; a short hash keeps changed names distinct."""
    safe = _SAFE.sub("-", str(text)).strip("-.") or "x"
    if safe != text:
        safe += "-" + hashlib.sha1(str(text).encode()).hexdigest()[:6]
    return safe


# pictures are written like every other file (mapsim.io.atomic: one permission policy)
from mapsim.io.atomic import atomic_write_bytes  # noqa: E402


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (fixed metadata, so equal figures give equal files)."""
    buffer = io.BytesIO()
    # one layout pass: the figures use the constrained layout, so no bbox_inches="tight"
    # zlib level 1: a third faster than the default 6 and, for these pictures, no larger
    fig.savefig(buffer, format="png", dpi=fig.dpi, metadata={"Software": None},
                pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


def save_figure(fig: Any, path: Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically.

    Figures here are plain :class:`~matplotlib.figure.Figure` objects that pyplot never
    tracks, so there is nothing to close: the figure is freed with its last reference.
    """
    atomic_write_bytes(path, figure_png(fig))
    return path
