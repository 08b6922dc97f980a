"""Pictures of a results directory: heat maps, distributions, map groups, and the HTML report.

Everything here reads a finished (or staged) results directory only, so ``mapsim plot`` can
redraw without running a model. Figures are drawn on :class:`matplotlib.figure.Figure`
objects with the Agg canvas (never through ``pyplot``), so no global state or GUI is touched.
The names below are imported on first use (matplotlib is not loaded by ``mapsim --help``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["draw_all", "draw_for_run", "redraw"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mapsim.plots import draw

        return getattr(draw, name)
    raise AttributeError(f"module 'mapsim.plots' has no attribute {name!r}")
