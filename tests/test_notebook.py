"""examples/notebook.py: a Jupytext percent script on the public API, run as a plain script."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook.py"
PNG = b"\x89PNG\r\n\x1a\n"


def test_notebook_runs_as_a_script(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, str(NOTEBOOK), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    text = done.stdout
    assert f"writing into {out}" in text
    assert "<Results 'quickstart': 3 image(s)" in text
    # the pivot's head and the groupby over max
    assert re.search(r"vessels-1\s+cnn4\s+blocks\.0\s+cnn4\s+blocks\.0", text)
    for name in ("pct_well-cnn4-cnn6.png", "hist-cnn6.png", "cka.png"):
        assert f"wrote {out / name}" in text
        assert (out / name).read_bytes().startswith(PNG), name
    assert f"reopened {out / 'quickstart'}: 3 image(s)" in text
    # what it printed of the groupby is what max.csv says
    best = pd.read_csv(out / "quickstart" / "max.csv")
    own = best[(best.model_a == "cnn4") & (best.model_b == "cnn4")
               & (best.layer_a == best.layer_b)]
    for layer, share in (own.groupby("layer_a")["well_correlated"].mean() * 100).items():
        assert re.search(rf"{re.escape(layer)}\s+cnn4\s+{share:.1f}", text), layer
    for folder in ("quickstart", "cka"):
        assert (out / folder / "run.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing beside it
    assert "Traceback" not in done.stderr


def test_notebook_is_a_percent_script_on_the_public_api() -> None:
    source = NOTEBOOK.read_text(encoding="utf-8")
    cells = re.split(r"^# %%.*$", source, flags=re.M)
    markers = re.findall(r"^# %%( \[markdown\])?$", source, flags=re.M)
    assert len(markers) == len(cells) - 1 >= 6
    assert markers.count(" [markdown]") >= 3
    for marker, cell in zip(markers, cells[1:]):
        if marker:  # a markdown cell: comment lines only
            assert all(not line or line.startswith("#") for line in cell.strip().splitlines())
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert {m for m in imported if m.startswith("mapsim")} == {"mapsim"}
    used = set(re.findall(r"\bmapsim\.(\w+)", source))
    assert {"load_spec", "run", "open_results"} <= used
