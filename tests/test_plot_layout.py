"""Pictures a person can read: equal square heat-map cells, text of a set size, nothing
overlapping; the report's embedded pictures within their bound; the drawing time in run.json.

Geometry is measured on the rendered figures (Agg), not read back from the constants that
produced it: a cell is an axes' pixel extent divided by its number of rows and columns.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from PIL import Image

from mapsim.plots import heatmaps, report
from mapsim.plots.observer import observers_for
from mapsim.runner.run import run as run_spec
from mapsim.spec.run_spec import validate_spec

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
MIN_CELL_PX = 79  # at the PNGs' 100 dpi: 0.8 inch (value, interval and chance mark)
MIN_TEXT_PT = 9


def frame(rows: int, cols: int, seed: int) -> pd.DataFrame:
    values = np.random.default_rng(seed).random((rows, cols))
    return pd.DataFrame(values, index=[f"L{i + 1}" for i in range(rows)],
                        columns=[f"L{j + 1}" for j in range(cols)])


def study_like_set() -> heatmaps.HeatmapSet:
    """Models of 1, 4 and 6 layers, every direction (the study's nine panels)."""
    sizes = {"cnn1": 1, "cnn6": 4, "cnn10": 6}
    panels = [heatmaps.Panel(a, b, frame(sizes[a], sizes[b], k), frame(sizes[a], sizes[b], k) / 9)
              for k, (a, b) in enumerate((a, b) for a in sizes for b in sizes)]
    return heatmaps.HeatmapSet("heatmap-m-best_mean", "m", "best_mean", None,
                               "m: mean best value\nmean ± std over 3 image(s)", "mean of max m",
                               0.0, 1.0, "viridis", ".2f", panels)


def rendered(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def panel_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_title()]


def test_every_cell_is_the_same_square_and_large_enough() -> None:
    hs = study_like_set()
    fig = heatmaps.draw_set(hs)
    renderer = rendered(fig)
    axes = panel_axes(fig)
    assert [ax.get_title() for ax in axes] == [p.title for p in hs.panels]
    sizes = []
    for ax, panel in zip(axes, hs.panels):
        box = ax.get_window_extent(renderer)
        rows, cols = panel.mean.shape
        sizes.append((box.width / cols, box.height / rows))
    sizes = np.array(sizes)
    assert sizes.min() >= MIN_CELL_PX
    np.testing.assert_allclose(sizes, sizes[0, 0], atol=0.51)  # squares, all alike
    # the one-layer panel (cnn1 x cnn1) is a single square, not a stretched bar
    one = axes[0].get_window_extent(renderer)
    assert abs(one.width - one.height) <= 1


def test_text_is_legible_and_nothing_overlaps() -> None:
    hs = study_like_set()
    fig = heatmaps.draw_set(hs)
    renderer = rendered(fig)
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert texts
    assert min(t.get_fontsize() for t in texts) >= MIN_TEXT_PT
    # every cell shows its number (mean, then ± std: this set has no intervals), the value
    # larger than the line below it
    axes = panel_axes(fig)
    for ax, panel in zip(axes, hs.panels):
        values = sorted(t.get_text() for t in ax.texts if t.get_fontsize() == heatmaps.VALUE_PT)
        below = sorted(t.get_text() for t in ax.texts if t.get_fontsize() == MIN_TEXT_PT)
        assert values == sorted(f"{m:.2f}" for m in panel.mean.to_numpy().ravel())
        assert below == sorted(f"±{s:.2f}" for s in panel.std.to_numpy().ravel())
        assert heatmaps.VALUE_PT > MIN_TEXT_PT
    # a panel with its title, tick labels and axis labels never runs into another
    boxes = [ax.get_tightbbox(renderer) for ax in axes]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap_w = min(a.x1, b.x1) - max(a.x0, b.x0)
            overlap_h = min(a.y1, b.y1) - max(a.y0, b.y0)
            assert overlap_w <= 0 or overlap_h <= 0, (a, b)
    # and everything is inside the figure
    figure_box = fig.bbox
    for box in boxes:
        assert box.x0 >= -1 and box.y0 >= -1
        assert box.x1 <= figure_box.x1 + 1 and box.y1 <= figure_box.y1 + 1


def with_intervals_and_chance(hs: heatmaps.HeatmapSet) -> heatmaps.HeatmapSet:
    """Every cell with an interval (negative lows included: the widest text) and every
    other cell marked not above chance."""
    for k, p in enumerate(hs.panels):
        p.low, p.high = p.mean - 1.05, p.mean + 0.05
        above = np.indices(p.mean.shape).sum(axis=0) % 2
        p.above = pd.DataFrame(above.astype(float), index=p.mean.index, columns=p.mean.columns)
    return hs


def test_interval_and_chance_lines_fit_inside_their_cells() -> None:
    """Measured: each cell's texts (value, interval, chance mark) lie inside that cell,
    at least 2 px from its edges, at 9 pt or larger."""
    hs = with_intervals_and_chance(study_like_set())
    fig = heatmaps.draw_set(hs)
    renderer = rendered(fig)
    n_texts = 0
    for ax, panel in zip(panel_axes(fig), hs.panels):
        box = ax.get_window_extent(renderer)
        rows, cols = panel.mean.shape
        cw, ch = box.width / cols, box.height / rows
        assert min(cw, ch) >= MIN_CELL_PX
        for text in ax.texts:
            x, y = text.get_position()  # data coordinates: the cell's centre column, row
            c, r = int(x), int(y)
            cell_x0, cell_y1 = box.x0 + c * cw, box.y1 - r * ch  # rows go down
            t = text.get_window_extent(renderer)
            assert text.get_fontsize() >= MIN_TEXT_PT
            assert t.x0 >= cell_x0 + 2 and t.x1 <= cell_x0 + cw - 2, text.get_text()
            assert t.y1 <= cell_y1 - 2 and t.y0 >= cell_y1 - ch + 2, text.get_text()
            n_texts += 1
        marked = int((panel.above.to_numpy() == 0).sum())
        assert sum("≤ chance" in t.get_text() for t in ax.texts) == marked
    assert n_texts > 0


def test_a_slide_sized_figure_keeps_its_cells_readable() -> None:
    """At 1920 px wide (a full-HD slide) the study's figure is shown at least at full size:
    its cells stay at least MIN_CELL_PX wide."""
    fig = heatmaps.draw_set(study_like_set())
    width_px = fig.get_figwidth() * fig.dpi
    assert width_px <= 1920
    assert fig.get_figheight() * fig.dpi <= 1200


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    spec = validate_spec({
        "name": "layout",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 1, "width": 4}, "seed": 1},
                   "b": {"architecture": {"name": "fcn", "depth": 3, "width": 3}, "seed": 2}},
        "layers": {"a": {"L1": "blocks.0"},
                   "b": {"L1": "blocks.0", "L2": "blocks.1", "L3": "blocks.2"}},
        "images": {"name": "files", "paths": [str(DATA / "vessels-1.png")]},
        "comparisons": [["a", "b"]],  # between networks only
        "aggregators": ["max", {"name": "threshold", "value": 0.5}, "pivot"],
        "output": {"report": True},
    })
    return run_spec(spec, out_dir=tmp_path_factory.mktemp("layout") / "out", progress=False,
                    observers=observers_for(spec.output)).out_dir


def test_png_cells_of_a_run_are_equal_squares(out: Path) -> None:
    png = Image.open(out / "plots" / "heatmap-pearson-best_mean.png")
    from mapsim.io.results import ResultsDir

    sets = {s.key: s for s in heatmaps.heatmap_sets(ResultsDir.open(out))}
    fig = heatmaps.draw_set(sets["heatmap-pearson-best_mean"])
    assert png.size == (round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi))
    renderer = rendered(fig)
    cells = [(ax.get_window_extent(renderer).width / p.mean.shape[1],
              ax.get_window_extent(renderer).height / p.mean.shape[0])
             for ax, p in zip(panel_axes(fig), sets["heatmap-pearson-best_mean"].panels)]
    assert [p.title for p in sets["heatmap-pearson-best_mean"].panels] == [
        "a → b (inter)", "b → a (inter)"]
    np.testing.assert_allclose(cells, cells[0][0], atol=0.51)


def test_run_json_records_the_drawing_time_beside_the_analysis(out: Path) -> None:
    info = json.loads((out / "run.json").read_text())
    timings = info["timings_s"]
    assert timings["draw"] > 0
    # the analysis total is unchanged by the drawing: it is the sum the runner recorded
    assert timings["total"] >= timings["images"]
    figures = json.loads((out / "plots" / "data.json").read_text())["figures"]
    assert len(figures) >= 2


def test_report_pictures_are_sized_for_the_page(out: Path) -> None:
    text = (out / "report.html").read_text(encoding="utf-8")
    uris = re.findall(r"data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)", text)
    assert uris
    for uri in uris:
        with Image.open(io.BytesIO(base64.b64decode(uri))) as picture:
            assert picture.width <= report.PAGE_IMAGE_PX[0]
            assert picture.height <= report.PAGE_IMAGE_PX[1]
    # the bound of docs/pictures-and-report.md: embedded pictures per kind
    assert text.count("<figure>") <= 3 * report.MAX_PAGE_IMAGES
    # heat-map cells: squares of CELL_CSS_PX with text of CELL_FONT_CSS_PX
    assert f"width:{report.CELL_CSS_PX}px;height:{report.CELL_CSS_PX}px" in text


def test_every_picture_of_a_run_stays_inside_its_figure(out: Path) -> None:
    """Fixed layouts (no constrained or tight layout): every axes with its labels, ticks and
    colour bar, measured after rendering, lies inside the figure, for every kind."""
    from mapsim.io.results import ResultsDir
    from mapsim.plots.draw import _jobs
    from mapsim.spec.run_spec import PICTURE_KINDS

    results = ResultsDir.open(out)
    jobs = _jobs(results, heatmaps.heatmap_sets(results), set(PICTURE_KINDS))
    kinds = set()
    for make, stem, kind, _ in jobs:
        fig = make()
        if fig is None:
            continue
        renderer = rendered(fig)
        for ax in fig.axes:
            box = ax.get_tightbbox(renderer)
            assert box.x0 >= -1 and box.y0 >= -1, (stem, box)
            assert box.x1 <= fig.bbox.x1 + 1 and box.y1 <= fig.bbox.y1 + 1, (stem, box)
        kinds.add(kind)
    assert {"heatmap", "histogram", "matrix"} <= kinds
