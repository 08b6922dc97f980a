"""Draw every picture of a results directory (``plots/``) and, on request, ``report.html``.

File names are deterministic (``<kind>-<metric>-<models/layers>[-image-<id>].png``; an id
that is not file-name safe is rewritten with a short hash). ``plots/data.json`` holds the
numbers every heat map shows, so a redraw can be checked against the run's own pictures.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mapsim.errors import OutputError
from mapsim.io.results import POOLED_IMAGE, ResultsDir
from mapsim.plots import distributions, groups, heatmaps
from mapsim.plots.capture import matrix_key
from mapsim.plots.io import atomic_write_bytes, figure_png, slug
from mapsim.spec.run_spec import DEFAULT_PICTURES, PICTURE_KINDS

#: per-image heat maps are drawn for at most this many images (the means use every image)
MAX_IMAGE_FIGURES = 24


def _json_grid(frame: Any) -> list[list[float | None]]:
    return [[None if v != v else round(float(v), 6) for v in row] for row in frame.to_numpy()]


def heatmap_data(sets: list[heatmaps.HeatmapSet]) -> list[dict[str, Any]]:
    """The numbers of every heat-map set, JSON-ready (also embedded in the report)."""
    out = []
    for hs in sets:
        out.append({
            "key": hs.key, "metric": hs.metric, "statistic": hs.statistic, "image": hs.image,
            "title": hs.title, "cbar_label": hs.cbar_label, "vmin": hs.vmin, "vmax": hs.vmax,
            "cmap": hs.cmap, "fmt": hs.fmt,
            "panels": [{
                "model_a": p.model_a, "model_b": p.model_b, "title": p.title,
                "rows": [str(r) for r in p.mean.index], "cols": [str(c) for c in p.mean.columns],
                "mean": _json_grid(p.mean),
                "std": _json_grid(p.std) if p.std is not None else None,
                **{name: _json_grid(grid) for name, grid in (
                    ("ci_low", p.low), ("ci_high", p.high), ("above_chance", p.above),
                    ("chance_p95", p.chance)) if grid is not None},
            } for p in hs.panels],
        })
    return out


def group_pairs(results: ResultsDir, metric: str) -> list[tuple[str, str, str, str]]:
    """Layer pairs drawn as well-correlated groups: within a model, each layer with itself;
    between models, each layer of model a with the layer of b where most of its maps are well
    correlated (mean % over images; the first such layer on a tie)."""
    out = []
    summary = results.summary if results.has("summary") else None
    for a, b in (tuple(p) for p in results.info.get("comparisons", [])):
        if a == b:
            out.extend((a, layer, a, layer) for layer in results.layers(a))
            continue
        if summary is None:
            continue
        cols = results.layers(b)
        for la in results.layers(a):
            pct = heatmaps.summary_grid(summary, metric, a, b, "pct_well", [la], cols)[0]
            values = pct.to_numpy()[0]
            if np.isfinite(values).any() and np.nanmax(values) > 0:
                out.append((a, la, b, cols[int(np.nanargmax(values))]))
    return out


def chosen_pictures(results: ResultsDir, pictures: Iterable[str] | None = None) -> set[str]:
    """The kinds of pictures to draw: ``pictures``, else the run spec's ``output.pictures``
    (in run.json), else :data:`DEFAULT_PICTURES`; ``"all"`` stands for every kind."""
    if pictures is None:
        pictures = ((results.info.get("spec") or {}).get("output") or {}).get("pictures")
    if pictures is None:
        return set(DEFAULT_PICTURES)
    chosen = set(pictures)
    if "all" in chosen:
        return set(PICTURE_KINDS)
    unknown = sorted(chosen - set(PICTURE_KINDS))
    if unknown:
        raise OutputError(f"unknown picture kind(s) {', '.join(map(repr, unknown))}: choose "
                          f"from {', '.join(PICTURE_KINDS)} (or all)")
    return chosen


def draw_all(root: str | Path, report: bool = False, plots_dir: str | Path | None = None,
             progress: bool = False, pictures: Iterable[str] | None = None) -> list[Path]:
    """Draw the pictures of the results in ``root`` into ``plots_dir`` (default root/plots).

    ``pictures``: the kinds to draw (see :func:`chosen_pictures`; default: the run spec's
    ``output.pictures``). With ``report``, also write ``root/report.html``; with
    ``progress``, show a progress bar on stderr. Returns the written files.
    """
    root = Path(root)
    results = ResultsDir.open(root)
    kinds = chosen_pictures(results, pictures)
    folder = Path(plots_dir) if plots_dir is not None else root / "plots"
    written: list[Path] = []
    figures: list[dict[str, str]] = []  # for the report: file, kind, caption
    pages: dict[str, str] = {}  # for the report: file -> its page-sized copy (data URI)
    sets = heatmaps.heatmap_sets(results)
    jobs = _jobs(results, sets, kinds)
    from tqdm.auto import tqdm

    wanted = _page_jobs(jobs) if report else set()
    prepared = None
    with _drawing(jobs, folder, wanted) as drawing:
        if report:  # while the drawing processes draw, the parts that need no picture
            from mapsim.plots.report import prepare_report

            prepared = prepare_report(results, sets)
        drawn = tqdm(drawing, total=len(jobs), desc="pictures", unit="fig",
                     disable=not progress, leave=False)
        for (_, _, kind, caption), (path, page) in zip(jobs, drawn):
            if path is None:
                continue
            written.append(path)
            figures.append({"file": path.name, "kind": kind, "caption": caption})
            if page is not None:
                pages[path.name] = page
    data = {"heatmaps": heatmap_data(sets), "figures": figures}
    atomic_write_bytes(folder / "data.json",
                       (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    written.append(folder / "data.json")
    if report:
        from mapsim.plots.report import write_report

        written.append(write_report(results, sets, folder, figures, pages, prepared))
    return written


Job = tuple[Callable[[], Any], str, str, str]  # figure maker, file stem, kind, caption

#: the jobs being drawn, inherited by the forked drawing processes (never pickled): the
#: jobs, the folder, and the indices of the jobs whose page-sized copy the report embeds
_WORK: tuple[list[Job], Path, set[int]] | None = None


def _page_jobs(jobs: list[Job]) -> set[int]:
    """The jobs whose pictures the report embeds: the first MAX_PAGE_IMAGES of each kind."""
    from mapsim.plots.report import MAX_PAGE_IMAGES, PAGE_KINDS

    seen: dict[str, int] = {}
    out = set()
    for index, (_, _, kind, _) in enumerate(jobs):
        if kind in PAGE_KINDS and seen.get(kind, 0) < MAX_PAGE_IMAGES:
            seen[kind] = seen.get(kind, 0) + 1
            out.add(index)
    return out


def _draw_one(index: int) -> tuple[Path | None, str | None]:
    """Draw and save job ``index`` of :data:`_WORK` (in a drawing process, or here); with
    its page-sized copy for the report when that job is one it embeds."""
    jobs, folder, pages = _WORK
    make, stem, _, _ = jobs[index]
    fig = make()
    if fig is None:
        return None, None
    png = figure_png(fig)
    path = folder / f"{slug(stem)}.png"
    atomic_write_bytes(path, png)
    if index not in pages:
        return path, None
    from mapsim.plots.report import page_image

    return path, page_image(png)


@contextmanager
def _drawing(jobs: list[Job], folder: Path, pages: set[int] = frozenset()
             ) -> Iterator[Iterator[tuple[Path | None, str | None]]]:
    """Each job's picture (or None) and page copy (or None), in job order. Drawn in forked
    processes, one per core (at most 4), when there is more than one core and enough jobs:
    they start drawing on entry, so the caller can work meanwhile, and end with the block
    (or with this process), however it ends. Otherwise drawn here, as the caller iterates."""
    global _WORK
    _WORK = (jobs, folder, set(pages))
    workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else (os.cpu_count() or 1))
    try:
        context = multiprocessing.get_context("fork")
    except ValueError:  # no fork on this platform: draw here
        context = None
    if context is None or workers < 2 or len(jobs) < 4:
        yield (_draw_one(index) for index in range(len(jobs)))
        return
    from mapsim.runner.lifetime import die_with_parent

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork beside torch's threads
        pool = context.Pool(workers, initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        yield pool.imap(_draw_one, range(len(jobs)))
    finally:
        pool.terminate()
        pool.join()


def _jobs(results: ResultsDir, sets: list[heatmaps.HeatmapSet],
          kinds: set[str] = frozenset(PICTURE_KINDS)) -> list[Job]:
    """The pictures of ``kinds`` (see :data:`PICTURE_KINDS`), not drawn yet."""
    jobs: list[Job] = []
    arrays: dict[tuple[str, str], Any] = {}  # (kind, image) -> loaded once for all pictures

    def load(kind: str, image: str) -> Any:
        if (kind, image) not in arrays:
            arrays[(kind, image)] = getattr(results, kind)(image)
        return arrays[(kind, image)]

    drawn_images = set(results.images()[:MAX_IMAGE_FIGURES])
    for hs in sets:
        wanted = ("heatmaps" if hs.image is None or hs.image == POOLED_IMAGE
                  else "image-heatmaps" if hs.image in drawn_images else None)
        if wanted in kinds:
            jobs.append((partial(heatmaps.draw_set, hs), hs.key, "heatmap",
                         hs.title.replace("\n", " — ")))
    for view in results.metrics().values():
        if view.granularity != "map":
            continue
        threshold = heatmaps._threshold(results, view.label)
        for a, b in results.comparisons() if "histograms" in kinds else ():
            jobs.append((partial(distributions.histogram_figure, results, view, a, b, threshold),
                         f"hist-{view.label}-{a}-{b}", "histogram",
                         f"{view.label}: best-partner values, {a} → {b}"))
        for image in results.saved_images("matrices") if "matrices" in kinds else ():
            for a, b in results.comparisons():
                jobs.append((partial(_matrix, load, image, view, a, b),
                             f"matrix-{view.label}-{a}-{b}-image-{image}", "matrix",
                             f"{view.label}: every map pair, {a} × {b}, image {image}"))
        if not results.has("max") or threshold is None:
            continue
        for image in results.saved_images("thumbnails"):
            for a, la, b, lb in group_pairs(results, view.label):
                if ("groups" if a == b else "inter-groups") not in kinds:
                    continue
                pair = f"{a} {la} with itself" if (a, la) == (b, lb) else f"{a} {la} and {b} {lb}"
                stem = (f"groups-{view.label}-{a}-{la}" if (a, la) == (b, lb)
                        else f"groups-{view.label}-{a}-{la}-{b}-{lb}")
                jobs.append((partial(_groups, results, load, image, view, threshold, (a, la, b, lb),
                                     pair), f"{stem}-image-{image}", "groups",
                             f"{view.label}: well-correlated groups, {pair}, image {image}"))
    return jobs


def _matrix(load: Callable[[str, str], Any], image: str, view: Any, a: str, b: str) -> Any:
    return distributions.matrix_figure(load("matrices", image), matrix_key(view.label, a, b),
                                       image, view)


def _groups(results: ResultsDir, load: Callable[[str, str], Any], image: str, view: Any, threshold: float,
            layers: tuple[str, str, str, str], pair: str) -> Any:
    a, la, b, lb = layers
    rows = [results.by_pair("max").get((view.label, a, la, b, lb))]
    if (a, la) != (b, lb):
        rows.append(results.by_pair("max").get((view.label, b, lb, a, la)))
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    found = groups.well_groups(pd.concat(rows), image, view.label, a, la, b, lb)
    return groups.groups_figure(found, load("thumbnails", image), view, threshold, image, pair)


def draw_for_run(root: str | Path, report: bool = False, progress: bool = False,
                 pictures: Iterable[str] | None = None) -> list[Path]:
    """Draw a run's pictures into its staging folder; a drawing failure never costs the tables.

    On an error the partial ``plots/`` and ``report.html`` are removed and a warning says how
    to draw them later (``mapsim plot``); the run itself still succeeds.
    """
    root = Path(root)
    try:
        return draw_all(root, report=report, progress=progress, pictures=pictures)
    except Exception as exc:  # noqa: BLE001 - the tables are worth more than the pictures
        shutil.rmtree(root / "plots", ignore_errors=True)
        (root / "report.html").unlink(missing_ok=True)
        warnings.warn(f"mapsim: the pictures could not be drawn ({type(exc).__name__}: {exc}); "
                      "the tables are complete. Draw them later with `mapsim plot RESULTS_DIR"
                      f"{' --report' if report else ''}`.", RuntimeWarning, stacklevel=2)
        return []


def redraw(root: str | Path, report: bool = False, progress: bool = False,
           pictures: Iterable[str] | None = None) -> list[Path]:
    """Redraw ``root/plots`` (and ``report.html``) from the tables, replacing them atomically
    (``pictures``: the kinds, as for :func:`draw_all`)."""
    root = Path(root)
    ResultsDir.open(root)  # a clear error for a folder that is not a results directory
    try:
        staging = Path(tempfile.mkdtemp(prefix=".plots.partial-", dir=root))
    except OSError as exc:
        raise OutputError(f"cannot write into {root}: {exc}") from exc
    try:
        written = draw_all(root, report=report, plots_dir=staging, progress=progress,
                           pictures=pictures)
        target = root / "plots"
        old = None
        if target.exists():
            old = root / f".plots.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [target / p.name if p.parent == staging else p for p in written]
