"""Golden pin: the CSVs of examples/quickstart.yaml, metrics.yaml and study.yaml stay the same.

tests/golden/<name>/ holds every CSV (pooled/ included) that ``mapsim run examples/<name>.yaml
--out ... --overwrite --quiet`` wrote with the code before the "One house" refactor, gzipped.
This test reruns each spec through the Python runner on the CPU and compares: the same set of
files, the same header, the same rows in the same order; every non-float column exactly
(text, integers, booleans, empty cells), float columns with numpy's isclose (RTOL, ATOL below).

On the machine that made the references the files are byte-identical, and
``scripts/check-golden`` reruns the three examples through the command line and reports byte
identity file by file (``--update`` rewrites the references after an intended change of the
results). This test allows for another CPU (CI) rounding float32 forward passes differently.

The study's references were made with its pictures on (``output.report: true``), which keeps
every image's maps and so takes the runner's non-streaming path; streaming rounds differently
in the last float32 bits. The test draws no pictures (they change no CSV and cost ~25 s) but
attaches an observer that asks for the maps, so it runs the same path as the references.
The quickstart's references were rewritten on 2026-12-05 (``scripts/check-golden quickstart
--update``) when the spatial null moved onto the streaming path, which the quickstart then
took again: the same rows and partners, values moved by float32 rounding (up to 8.8e-7 in r).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest

from mapsim.observers import RunObserver
from mapsim.runner.run import run
from mapsim.spec.run_spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
EXAMPLES = ("quickstart", "metrics", "study")
#: float tolerance. The values are correlations, distances and percents, and statistics of
#: them (means, medians, sample stds). A last-bit float32 difference in the maps moves a value
#: by ~1e-7 absolute; a std of two nearly equal values keeps that absolute error but is itself
#: small (~0.01), so its relative error reaches 1e-5. Measured on the study (streaming vs
#: non-streaming path, a float32 rounding difference of this kind): max |difference| 2.8e-7
#: in max.csv values (relative 3.4e-7), 4.1e-8 in the stds of summary.csv, relative up to
#: 2.2e-4 there. So atol 1e-9 would fail on the stds; 1e-7 (below one float32 ulp of 1.0)
#: absorbs them and still catches any real change (a threshold, ddof, a swapped partner).
RTOL, ATOL = 1e-6, 1e-7

_INT = re.compile(r"^[+-]?\d+$")
_BOOL = {"True", "False", "true", "false"}


def golden_tables(name: str) -> dict[str, str]:
    """Relative path (e.g. ``pooled/max.csv``) -> text of every reference CSV of ``name``."""
    folder = GOLDEN / name
    return {path.relative_to(folder).as_posix()[: -len(".gz")]:
            gzip.decompress(path.read_bytes()).decode("utf-8")
            for path in sorted(folder.rglob("*.csv.gz"))}


def written_tables(folder: Path) -> dict[str, str]:
    """Relative path -> text of every CSV under a results directory."""
    return {path.relative_to(folder).as_posix(): path.read_text(encoding="utf-8")
            for path in sorted(folder.rglob("*.csv"))}


def _as_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def float_columns(header: list[str], rows: list[list[str]]) -> set[int]:
    """Columns of the reference whose every non-empty cell is a number and at least one is not
    an integer literal (pandas writes floats with a point or exponent, ``nan``, ``inf``)."""
    out = set()
    for k in range(len(header)):
        cells = [row[k] for row in rows if k < len(row) and row[k] != ""]
        if (cells and all(_as_float(c) is not None and c not in _BOOL for c in cells)
                and not all(_INT.match(c) for c in cells)):
            out.add(k)
    return out


def compare_csv(name: str, want_text: str, got_text: str) -> None:
    """Fail with the file, column and first differing row when the tables differ."""
    if want_text == got_text:
        return
    want = list(csv.reader(io.StringIO(want_text)))
    got = list(csv.reader(io.StringIO(got_text)))
    assert want and got, f"{name}: one of the files is empty"
    assert got[0] == want[0], f"{name}: header differs:\n  want {want[0]}\n  got  {got[0]}"
    header, want_rows, got_rows = want[0], want[1:], got[1:]
    assert len(got_rows) == len(want_rows), (
        f"{name}: {len(got_rows)} rows, the reference has {len(want_rows)}")
    floats = float_columns(header, want_rows)
    for k, column in enumerate(header):
        w = [row[k] if k < len(row) else None for row in want_rows]
        g = [row[k] if k < len(row) else None for row in got_rows]
        if w == g:
            continue
        if k in floats:
            ok = np.array([a == b for a, b in zip(w, g)])
            for i in np.flatnonzero(~ok):  # differing text: numbers that are close pass
                a, b = w[i], g[i]
                fa, fb = (_as_float(a) if a else None), (_as_float(b) if b else None)
                ok[i] = (fa is not None and fb is not None
                         and bool(np.isclose(fb, fa, rtol=RTOL, atol=ATOL, equal_nan=True)))
            bad = np.flatnonzero(~ok)
            if not len(bad):
                continue
            i = int(bad[0])
            fa, fb = _as_float(w[i] or "x"), _as_float(g[i] or "x")
            diff = (f" (difference {abs(fb - fa):.3g})" if fa is not None and fb is not None
                    and math.isfinite(fa) and math.isfinite(fb) else "")
            kind = f"float, rtol={RTOL:g} atol={ATOL:g}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(w, g)) if a != b)
            bad, diff, kind = [i], "", "exact"
        pytest.fail(
            f"{name}: column {column!r} ({kind}) differs first in data row {i + 1} "
            f"(line {i + 2}): reference {w[i]!r}, got {g[i]!r}{diff}; {len(bad)} row(s) "
            f"differ.\n  reference row: {want_rows[i]}\n  got row:       {got_rows[i]}",
            pytrace=False,
        )


class KeepsMaps(RunObserver):
    """Asks for the maps the pictures ask for (the first ``plot_images`` images) and does
    nothing with them: the run takes the paths that the pictures make it take, without
    drawing."""

    key = "golden"
    needs_maps = True

    def __init__(self, n_images: int) -> None:
        self.n_images = n_images

    def wants_maps(self, index: int) -> bool:
        return index < self.n_images


def run_example(name: str, out: Path) -> Path:
    spec_path = ROOT / "examples" / f"{name}.yaml"
    spec = load_spec(spec_path)
    pictures = spec.output.plots or spec.output.report
    # on the CPU, as the references were made; no pictures (they change no CSV, cost ~25 s)
    output = spec.output.model_copy(update={"plots": False, "report": False})
    spec = spec.model_copy(update={"output": output, "device": "cpu"})
    run(spec, base_dir=spec_path.parent, out_dir=out, progress=False,
        observers=[KeepsMaps(spec.output.plot_images)] if pictures else [])
    return out


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_csvs_match_the_golden_references(name: str, tmp_path: Path) -> None:
    want = golden_tables(name)
    assert want, f"no references in {GOLDEN / name}"
    got = written_tables(run_example(name, tmp_path / name))
    assert sorted(got) == sorted(want), (
        f"{name}: CSV files differ: missing {sorted(set(want) - set(got))}, "
        f"extra {sorted(set(got) - set(want))}")
    for path in sorted(want):
        compare_csv(f"{name}/{path}", want[path], got[path])
