"""Pictures of a results directory: heat maps, distributions, map groups, and the HTML report.

Everything here reads a finished (or staged) results directory only, so ``mapsim plot`` can
redraw without running a model. Figures are drawn on :class:`matplotlib.figure.Figure`
objects with the Agg canvas (never through ``pyplot``), so no global state or GUI is touched.
"""

from mapsim.plots.draw import draw_all, draw_for_run, redraw

__all__ = ["draw_all", "draw_for_run", "redraw"]
