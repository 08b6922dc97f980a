"""The Python API: ``load_spec`` and ``run`` (mapsim.session), ``Results`` and
``open_results`` (mapsim.results), on real small runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

import mapsim
from mapsim.errors import MapsimError, SpecError, UnknownNameError
from mapsim.io.results import KEY_COLUMNS
from mapsim.results import Results, open_results
from mapsim.session import load_spec, run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: one image, a layer-level metric, no min aggregator, no pooled tables; paths relative
SMALL = {
    "name": "small",
    "models": {"a": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 1}},
    "layers": {"a": "blocks.*"},
    "images": {"name": "files", "paths": "data/vessels-1.png"},
    "metrics": ["pearson", {"name": "cka", "kernel": "linear"}],
    "aggregators": ["max", "pivot"],
    "device": "cpu",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """examples/quickstart.yaml: 3 images, two models, pooled tables, no pictures."""
    out = tmp_path_factory.mktemp("api") / "quick"
    return run(EXAMPLES / "quickstart.yaml", out, device="cpu", progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Results:
    out = tmp_path_factory.mktemp("api") / "small"
    return run(SMALL, out, progress=False, base_dir=EXAMPLES)


def read(path: Path) -> pd.DataFrame:
    """A table as a reader of the results directory would read it."""
    header = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(path, dtype={c: str for c in KEY_COLUMNS if c in header})


# --------------------------------------------------------------------------- tables
def test_run_returns_the_results_opened(quick: Results) -> None:
    assert isinstance(quick, Results)
    assert quick.dir.name == "quick" and (quick.dir / "run.json").is_file()
    assert quick.info == json.loads((quick.dir / "run.json").read_text(encoding="utf-8"))
    assert quick.n_images == 3 and quick.name == "quickstart"
    assert quick.tables == ["max", "min", "pivot", "summary", "dead_maps", "baselines",
                            "map_pvalues", "pooled/max", "pooled/min", "pooled/pivot"]
    assert set(quick.baselines.statistic) == {"best_mean", "pct_well"}
    assert len(quick.map_pvalues) == quick.max.groupby(
        ["metric", "model_a", "layer_a", "map_a", "model_b", "layer_b"]).ngroups
    text = repr(quick)
    assert "quickstart" in text and "3 image(s)" in text and len(text) < 300
    assert not (quick.dir / "plots").exists()  # the spec asks for no pictures


@pytest.mark.parametrize("table", ["max", "min", "pivot", "summary", "dead_maps"])
def test_tables_equal_the_files(quick: Results, table: str) -> None:
    frame = getattr(quick, table)
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    pd.testing.assert_frame_equal(frame, read(quick.dir / f"{table}.csv"))
    # the key columns hold text, as plain pandas reads these names
    pd.testing.assert_frame_equal(frame, pd.read_csv(quick.dir / f"{table}.csv"))


def test_pooled_tables(quick: Results, small: Results) -> None:
    pd.testing.assert_frame_equal(quick.pooled("pivot"), read(quick.dir / "pooled/pivot.csv"))
    assert set(quick.pooled("pivot").image) == {"pooled"}
    pd.testing.assert_frame_equal(quick.pooled("pooled/max.csv"), quick.pooled("max"))
    with pytest.raises(UnknownNameError, match="Closest matches: pivot"):
        quick.pooled("pivto")
    assert small.pooled("max").empty  # engine.pooled is off: no pooled tables, none empty


def test_missing_tables_are_empty(quick: Results, small: Results) -> None:
    for frame in (quick.layer_similarity, quick.layer_similarity_summary, small.min):
        assert isinstance(frame, pd.DataFrame) and frame.empty
    assert not small.has("min") and small.has("max")
    assert "min" not in small.tables and "layer_similarity" in small.tables
    pd.testing.assert_frame_equal(small.layer_similarity,
                                  read(small.dir / "layer_similarity.csv"))
    assert set(small.layer_similarity.metric) == {"cka"}


# --------------------------------------------------------------------------- figures
def panel_axes(fig: Figure) -> list:
    """The heat-map panels (the colour bar's axes have no title)."""
    return [ax for ax in fig.axes if ax.get_title()]


def test_heatmap_of_the_summary(quick: Results) -> None:
    fig = quick.heatmap()
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # one panel, one colour bar
    (panel,) = panel_axes(fig)
    assert panel.get_title() == "cnn4 × cnn4 (intra)"  # the first comparison
    title = fig.get_suptitle()
    assert "mean over maps of the best partner's value" in title
    assert "mean over 3 image(s)" in title
    # cells: the mean of summary.csv (3 x 3 layers of cnn4), below it its interval
    from mapsim.plots.heatmaps import VALUE_PT

    s = quick.summary
    rows = s[(s.model_a == "cnn4") & (s.model_b == "cnn4") & (s.statistic == "best_mean")]
    assert sorted(t.get_text() for t in panel.texts if t.get_fontsize() == VALUE_PT) == sorted(
        format(v, ".2f") for v in rows["mean"])


def test_heatmap_of_an_inter_comparison(quick: Results) -> None:
    fig = quick.heatmap("pearson", "pct_well", model_a="cnn6", model_b="cnn4")
    (panel,) = panel_axes(fig)
    assert panel.get_title() == "cnn6 → cnn4 (inter)"
    from mapsim.plots.heatmaps import VALUE_PT

    values = [t for t in panel.texts if t.get_fontsize() == VALUE_PT]
    assert len(values) == 4 * 3  # one value per cell (below it, its interval)
    assert "% of maps well correlated" in fig.get_suptitle()
    assert panel_axes(quick.heatmap(model_a="cnn6"))[0].get_title() == "cnn6 × cnn6 (intra)"


def test_heatmap_of_one_image_and_of_a_layer_metric(small: Results) -> None:
    fig = small.heatmap("pearson")
    assert "image vessels-1" in fig.get_suptitle()  # one image: its pivot, no std
    assert all("±" not in t.get_text() for t in panel_axes(fig)[0].texts)
    fig = small.heatmap("cka")
    assert "layer-level value" in fig.get_suptitle()
    assert "image vessels-1" in fig.get_suptitle()
    assert [ax.get_title() for ax in panel_axes(fig)] == ["a × a (intra)"]


def test_histogram(quick: Results) -> None:
    fig = quick.histogram("pearson", model_a="cnn6")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes  # every layer pair's panel drawn in one axes
    texts = [t.get_text() for t in ax.texts]
    layers = ("L1", "L2", "L4", "L6")
    assert [t for t in texts if t.startswith("cnn6: ") and "\n" not in t] == [
        f"cnn6: {x}" for x in layers]  # the columns
    assert [t for t in texts if t.endswith("\nmaps")] == [f"cnn6: {x}\nmaps" for x in layers]
    assert sum(t.startswith("n=") or t == "no values" for t in texts) == 4 * 4
    fig = quick.histogram(model_a="cnn4", model_b="cnn6")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sum(t.startswith("n=") or t == "no values" for t in texts) == 3 * 4
    assert "threshold 0.8" in fig.get_suptitle()


def test_figure_errors_say_what_to_do(quick: Results, small: Results) -> None:
    with pytest.raises(UnknownNameError, match="Known metrics: pearson"):
        quick.heatmap("cosine")
    with pytest.raises(MapsimError, match=r"did not compare cnn9.*\(cnn4, cnn6\)"):
        quick.heatmap(model_a="cnn9")
    with pytest.raises(MapsimError, match="best_mean, pct_well"):
        quick.heatmap(statistic="median")
    with pytest.raises(MapsimError, match="layer-level"):
        small.histogram("cka")
    with pytest.raises(MapsimError, match="statistic='value'"):
        small.heatmap("cka", "pct_well")


# --------------------------------------------------------------------------- open_results
def test_open_results_reads_what_run_wrote(quick: Results) -> None:
    again = open_results(quick.dir)
    assert isinstance(again, Results) and again.dir == quick.dir
    pd.testing.assert_frame_equal(again.pivot, quick.pivot)


def test_open_results_refuses_a_folder_that_is_not_results(tmp_path: Path) -> None:
    with pytest.raises(MapsimError, match="no run.json"):
        open_results(tmp_path)
    with pytest.raises(MapsimError, match="run.json"):
        open_results(tmp_path / "missing")


# --------------------------------------------------------------------------- load_spec
def test_load_spec_of_a_dict_names_the_bad_field() -> None:
    bad = dict(SMALL, aggregators=["max", {"name": "threshold", "valeu": 0.8}])
    with pytest.raises(SpecError) as caught:
        load_spec(bad)
    message = str(caught.value)
    assert message.startswith("<dict>: the spec is not valid")
    assert "aggregators.1.valeu: unknown field" in message
    with pytest.raises(SpecError, match="modles: unknown field; did you mean 'models'"):
        load_spec(dict(SMALL, modles={}))


def test_load_spec_of_a_path_a_dict_and_a_spec(tmp_path: Path) -> None:
    spec = load_spec(EXAMPLES / "quickstart.yaml")
    assert spec.name == "quickstart"
    assert load_spec(spec) is spec
    assert load_spec(str(EXAMPLES / "quickstart.yaml")) == spec
    assert load_spec(SMALL).name == "small"
    with pytest.raises(SpecError, match="spec file's path, a dict"):
        load_spec(42)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "missing.yaml")


def test_relative_paths_resolve_against_the_spec_folder(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A dict's images resolve against base_dir, remembered by load_spec; a file's against
    its folder, whatever the current directory."""
    monkeypatch.chdir(tmp_path)
    spec = load_spec(dict(SMALL, metrics=["pearson"]), base_dir=EXAMPLES)
    res = run(spec, "out", progress=False)
    assert res.n_images == 1 and (tmp_path / "out" / "run.json").is_file()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "spec.json").write_text(json.dumps(dict(
        SMALL, metrics=["pearson"], images=str(EXAMPLES / "data" / "vessels-2.png"),
        output={"dir": "here"})))
    res = run(tmp_path / "s" / "spec.json", progress=False)
    assert res.dir == tmp_path / "s" / "here"  # output.dir: relative to the spec's folder
    with pytest.raises(MapsimError, match="vessels-1"):  # cwd has no data/
        run(dict(SMALL, metrics=["pearson"]), "nothing", progress=False)


def test_plots_follow_the_spec_unless_forced(tmp_path: Path) -> None:
    with_plots = dict(SMALL, metrics=["pearson"], output={"plots": True})
    res = run(with_plots, tmp_path / "off", progress=False, plots=False, base_dir=EXAMPLES)
    assert not (res.dir / "plots").exists()
    res = run(dict(SMALL, metrics=["pearson"]), tmp_path / "on", progress=False, plots=True,
              base_dir=EXAMPLES)
    assert any((res.dir / "plots").glob("heatmap-*.png"))
    assert not (res.dir / "report.html").exists()


# --------------------------------------------------------------------------- the package
def test_the_top_level_names_are_these() -> None:
    assert mapsim.run is run and mapsim.load_spec is load_spec
    assert mapsim.open_results is open_results and mapsim.Results is Results


def test_reading_results_needs_no_matplotlib(quick: Results) -> None:
    code = ("import sys; from mapsim.results import open_results; "
            f"r = open_results({str(quick.dir)!r}); r.max; r.summary; r.pooled('pivot'); "
            "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', "
            "'seaborn', 'mapsim.plots'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
