"""output.pairs: parquet: the rows of pairs.csv, each unordered pair once within a network (no
self pairs), every pair between networks; pooled too; blocks concatenated in order; a clear
refusal without pyarrow."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from mapsim.errors import SpecError
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec

pytest.importorskip("pyarrow")

LAYERS = {"a": ["blocks.0", "blocks.2"], "b": ["blocks.1"]}


def _spec(pairs):
    return validate_spec({
        "name": "pairs",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 3, "width": 4}, "seed": 1},
                   "b": {"architecture": {"name": "fcn", "depth": 2, "width": 3}, "seed": 2}},
        "layers": LAYERS,
        "images": {"name": "synthetic-vessels", "count": 5, "size": [32, 32], "seed": 2},
        "comparisons": [["a", "a"], ["a", "b"]],
        "metrics": ["pearson", {"name": "euclidean", "rms": True}],
        "aggregators": ["max", {"name": "threshold", "per_metric": {"euclidean": 1.0}}],
        "engine": {"block_images": 2, "pooled": True},
        "output": {"pairs": pairs},
        "device": "cpu",
    })


def _expected(csv: pd.DataFrame) -> pd.DataFrame:
    """The unordered pairs within a network, worked out from the layer order of the spec."""
    sizes = csv.groupby(["model_a", "layer_a"]).map_a.max() + 1
    offset = {}
    for model, layers in LAYERS.items():
        start = 0
        for layer in layers:
            offset[(model, layer)] = start
            start += int(sizes[(model, layer)])
    ia = np.array([offset[k] for k in zip(csv.model_a, csv.layer_a)]) + csv.map_a.to_numpy()
    ib = np.array([offset[k] for k in zip(csv.model_b, csv.layer_b)]) + csv.map_b.to_numpy()
    keep = (csv.model_a != csv.model_b).to_numpy() | (ia < ib)
    return csv[keep].reset_index(drop=True)


def test_parquet_has_the_csv_rows_each_unordered_pair_once(tmp_path):
    as_csv = run(_spec(True), out_dir=tmp_path / "csv", progress=False).out_dir
    as_parquet = run(_spec("parquet"), out_dir=tmp_path / "parquet", progress=False).out_dir
    for table in ("pairs", "pooled/pairs"):
        assert not (as_parquet / f"{table}.csv").exists()
        csv = pd.read_csv(as_csv / f"{table}.csv", keep_default_na=False, na_values=[""])
        got = pd.read_parquet(as_parquet / f"{table}.parquet")
        expected = _expected(csv)
        assert list(got.columns) == list(csv.columns)
        assert len(got) == len(expected) < len(csv)
        for column in csv.columns:
            if column == "value":
                np.testing.assert_allclose(got[column], expected[column], rtol=1e-12)
            else:
                assert got[column].astype(str).tolist() == expected[column].astype(str).tolist()
        assert (as_parquet / f"{table}.parquet").stat().st_size < (
            as_csv / f"{table}.csv").stat().st_size / 2
    # both images and blocks are all there, in order
    ids = pd.read_parquet(as_parquet / "pairs.parquet").image.unique().tolist()
    assert ids == pd.read_csv(as_csv / "max.csv").image.unique().tolist()


def test_parquet_without_pyarrow_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(SpecError, match=r"pip install 'mapsim\[parquet\]'"):
        run(_spec("parquet"), out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
