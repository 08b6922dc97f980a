"""Pictures and report: the numbers drawn equal the tables; files, names and redraws."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mapsim.cli import main
from mapsim.errors import MapsimError, OutputError
from mapsim.plots.observer import observers_for
from mapsim.runner.run import run as run_spec
from mapsim.spec.run_spec import validate_spec
from mapsim.plots import heatmaps
from mapsim.plots.capture import KEY_SEP, downsample, matrix_key, thumb_key
from mapsim.plots.groups import well_groups
from mapsim.plots.io import MetricView, Results, slug


def run(spec, **kwargs):
    """A run with the pictures its spec asks for (as the CLI and mapsim.run attach them)."""
    return run_spec(spec, observers=observers_for(spec.output), **kwargs)


DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def spec_data(**output):
    return {
        "name": "p",
        "models": {
            "a": {"architecture": {"name": "fcn", "depth": 2, "width": 5}, "seed": 1},
            "b": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 2},
        },
        "layers": {"a": ["blocks.0", "blocks.1"], "b": {"L1": "blocks.0", "L2": "blocks.1"}},
        "images": {"name": "files", "paths": [str(DATA / "vessels-1.png"),
                                              str(DATA / "vessels-2.png")]},
        "comparisons": [["a", "a"], ["a", "b"]],
        "aggregators": ["max", {"name": "threshold", "value": 0.6}, "pivot"],
        "engine": {"pooled": True},
        "output": output,
    }


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plots")
    spec = validate_spec(spec_data(report=True, pictures=["all"]))  # every kind of picture
    return run(spec, out_dir=tmp / "out", progress=False).out_dir


def expected_names() -> set[str]:
    names = set()
    for stat in ("best_mean", "pct_well"):
        stem = f"heatmap-pearson-{stat}"
        names |= {f"{stem}.png", f"{stem}-image-vessels-1.png", f"{stem}-image-vessels-2.png",
                  f"{stem}-pooled.png"}
    for a, b in (("a", "a"), ("a", "b"), ("b", "a")):
        names.add(f"hist-pearson-{a}-{b}.png")
    names |= {"matrix-pearson-a-a-image-vessels-1.png", "matrix-pearson-a-b-image-vessels-1.png"}
    names |= {f"groups-pearson-a-{layer}-image-vessels-1.png" for layer in ("blocks.0", "blocks.1")}
    names |= {f"groups-pearson-a-{la}-b-{lb}-image-vessels-1.png"
              for la in ("blocks.0", "blocks.1") for lb in ("L1", "L2")}
    return names | {"data.json"}


def test_plots_have_deterministic_names_and_are_valid_pngs(out):
    names = {p.name for p in (out / "plots").iterdir()}
    # groups figures appear only for layers with at least one well-correlated map
    assert expected_names() - {n for n in expected_names() if n.startswith("groups-")} <= names
    assert names <= expected_names()
    assert "groups-pearson-a-blocks.0-image-vessels-1.png" in names
    for path in (out / "plots").glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()


def test_mean_heat_map_equals_mean_and_std_of_pivot_over_images(out):
    pivot = pd.read_csv(out / "pivot.csv")
    results = Results.open(out)
    for stat in ("best_mean", "pct_well"):
        mean, std = heatmaps.summary_grid(results.summary, "pearson", "a", "b", stat,
                                          ["blocks.0", "blocks.1"], ["L1", "L2"])
        sel = pivot[(pivot.model_a == "a") & (pivot.model_b == "b")]
        for la in ("blocks.0", "blocks.1"):
            for lb in ("L1", "L2"):
                values = sel[(sel.layer_a == la) & (sel.layer_b == lb)][stat].to_numpy(float)
                assert len(values) == 2
                assert mean.loc[la, lb] == pytest.approx(values.mean(), abs=1e-9)
                assert std.loc[la, lb] == pytest.approx(values.std(ddof=1), abs=1e-9)


def test_per_image_pct_well_equals_a_count_from_the_max_table(out):
    best = pd.read_csv(out / "max.csv")
    data = json.loads((out / "plots" / "data.json").read_text())
    sets = {s["key"]: s for s in data["heatmaps"]}
    panel = next(p for p in sets["heatmap-pearson-pct_well-image-vessels-2"]["panels"]
                 if (p["model_a"], p["model_b"]) == ("b", "a"))
    assert panel["rows"] == ["L1", "L2"] and panel["cols"] == ["blocks.0", "blocks.1"]
    for i, lb in enumerate(panel["rows"]):
        for j, la in enumerate(panel["cols"]):
            rows = best[(best.image == "vessels-2") & (best.model_a == "b") & (best.layer_a == lb)
                        & (best.model_b == "a") & (best.layer_b == la)]
            expected = 100.0 * (rows.value >= 0.6).sum() / len(rows)
            assert panel["mean"][i][j] == pytest.approx(expected)


def test_saved_matrix_rows_give_the_max_table(out):
    results = Results.open(out)
    mats = results.matrices("vessels-1")
    values = mats[matrix_key("pearson", "a", "a")]
    meta = mats["__meta__"][matrix_key("pearson", "a", "a")]
    assert meta["blocks_a"] == [["blocks.0", 5], ["blocks.1", 5]]
    block = values[:5, :5].astype(float).copy()
    np.fill_diagonal(block, np.nan)
    best = pd.read_csv(out / "max.csv")
    rows = best[(best.image == "vessels-1") & (best.model_a == "a") & (best.model_b == "a")
                & (best.layer_a == "blocks.0") & (best.layer_b == "blocks.0")]
    np.testing.assert_allclose(np.nanmax(block, axis=1), rows.value.to_numpy(), atol=1e-6)


def test_thumbnails_are_small_float16_maps_of_the_first_image(out):
    with np.load(out / "thumbnails" / "vessels-1.npz") as data:
        keys = json.loads(str(data["__keys__"]))
        assert set(keys) == {"__input__", thumb_key("a", "blocks.0"), thumb_key("a", "blocks.1"),
                             thumb_key("b", "L1"), thumb_key("b", "L2")}
        for i, key in enumerate(keys):
            array = data[f"a{i}"]
            assert array.dtype == np.float16
            assert max(array.shape[-2:]) <= (192 if key == "__input__" else 96)
    assert json.loads((out / "thumbnails" / "index.json").read_text()) == {
        "vessels-1": "vessels-1.npz"}


def test_downsample_is_an_area_average():
    x = torch.arange(2 * 192 * 100, dtype=torch.float32).reshape(2, 192, 100)
    small = downsample(x, 96)
    expected = x.numpy().reshape(2, 96, 2, 50, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(small.astype(np.float32), expected, rtol=1e-3)


def test_mapsim_plot_reproduces_the_run_pictures(out, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "plots")
    (copy / "report.html").unlink()
    assert main(["plot", str(copy), "--report"]) == 0
    assert {p.name for p in (copy / "plots").iterdir()} == {
        p.name for p in (out / "plots").iterdir()}
    assert json.loads((copy / "plots" / "data.json").read_text()) == json.loads(
        (out / "plots" / "data.json").read_text())
    assert (copy / "report.html").is_file()
    assert not [p for p in copy.iterdir() if p.name.startswith(".")]  # no staging left


def default_names() -> set[str]:
    """The default pictures as docs/pictures-and-report.md lists them: the heat maps of the
    means and the pooled ones, histograms, matrices, groups of each layer with itself."""
    return {n for n in expected_names()
            if "-image-" not in n or not n.startswith("heatmap-")} - {
        n for n in expected_names() if n.startswith("groups-pearson-a-blocks.") and "-b-" in n}


def test_the_default_pictures_are_what_the_docs_list(out, tmp_path, capsys):
    from mapsim.spec.run_spec import DEFAULT_PICTURES, OutputSpec

    assert OutputSpec().pictures == list(DEFAULT_PICTURES) == [
        "heatmaps", "histograms", "matrices", "groups"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    info = json.loads((copy / "run.json").read_text())
    del info["spec"]["output"]["pictures"]  # a run that did not choose: the defaults
    (copy / "run.json").write_text(json.dumps(info))
    assert main(["plot", str(copy), "--report"]) == 0
    names = {p.name for p in (copy / "plots").iterdir()}
    assert names <= default_names()
    assert default_names() - {n for n in default_names() if n.startswith("groups-")} <= names
    assert not any(n.startswith("heatmap-") and "-image-" in n for n in names)
    assert len(names) == 1 + 4 + 3 + 2 + len([n for n in names if n.startswith("groups-")])
    # every kind stays available: by name from the command line, or all of them
    assert main(["plot", str(copy), "--pictures", "image-heatmaps,inter-groups"]) == 0
    names = {p.name for p in (copy / "plots").iterdir()} - {"data.json"}
    per_image = {n for n in expected_names() if n.startswith("heatmap-") and "-image-" in n}
    inter_groups = {n for n in expected_names() if n.startswith("groups-") and "-b-" in n}
    assert per_image <= names <= per_image | inter_groups
    assert names & inter_groups
    assert main(["plot", str(copy), "--pictures", "all"]) == 0
    assert {p.name for p in (copy / "plots").iterdir()} == {p.name for p in (out / "plots").iterdir()}
    assert main(["plot", str(copy), "--pictures", "heatmap"]) == 2
    assert "unknown picture kind(s) 'heatmap'" in capsys.readouterr().err


def test_mapsim_plot_refuses_a_folder_without_run_json(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err
    with pytest.raises(OutputError):
        Results.open(tmp_path)


def test_report_is_self_contained(out):
    text = (out / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"https?://", text)
    markup = re.sub(r"<script.*?</script>", "", text, flags=re.S)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", markup)
    assert "<link" not in markup
    assert len(text.encode()) < 5_000_000
    payload = re.search(r'<script type="application/json" id="mapsim-data">(.*?)</script>',
                        text, re.S).group(1)
    data = json.loads(payload)
    pair = next(p for p in data["pairs"] if (p["model_a"], p["layer_a"], p["model_b"],
                                             p["layer_b"]) == ("a", "blocks.1", "b", "L2"))
    pivot = pd.read_csv(out / "pivot.csv")
    rows = pivot[(pivot.model_a == "a") & (pivot.layer_a == "blocks.1") & (pivot.model_b == "b")
                 & (pivot.layer_b == "L2")]
    assert [r["best_mean"] for r in pair["images"]] == pytest.approx(rows.best_mean.tolist())
    values = [t["value"] for t in pair["top"]]
    assert values == sorted(values, reverse=True) and len(values) == 5


def test_plain_runs_write_no_pictures(tmp_path):
    result = run(validate_spec(spec_data()), out_dir=tmp_path / "o", progress=False)
    assert not (result.out_dir / "plots").exists()
    assert not (result.out_dir / "thumbnails").exists()


def write_layer_results(root: Path, symmetric: bool = True) -> pd.DataFrame:
    """A results folder holding only a synthetic layer_similarity.csv and run.json."""
    root.mkdir()
    rows = [
        ("i1", "a", "x", "a", "x", 1.0, ""), ("i1", "a", "x", "a", "y", 0.4, ""),
        ("i1", "a", "y", "a", "y", 1.0, ""),
        ("i2", "a", "x", "a", "x", 1.0, ""), ("i2", "a", "x", "a", "y", 0.6, ""),
        ("i2", "a", "y", "a", "y", None, "a layer with zero variance"),
        ("i1", "a", "x", "b", "z", 0.2, ""), ("i2", "a", "x", "b", "z", 0.5, ""),
        ("i1", "a", "y", "b", "z", 0.9, ""),
    ]
    frame = pd.DataFrame(rows, columns=["image", "model_a", "layer_a", "model_b", "layer_b",
                                        "value", "reason"])
    frame.insert(1, "metric", "cka")
    frame.to_csv(root / "layer_similarity.csv", index=False)
    info = {"spec": {"name": "syn"}, "comparisons": [["a", "a"], ["a", "b"]],
            "models": {"a": {"layers": {"x": "x", "y": "y"}}, "b": {"layers": {"z": "z"}}},
            "metrics": [{"name": "cka", "label": "cka", "granularity": "layer",
                         "higher_is_more_similar": True, "symmetric": symmetric,
                         "value_range": [0.0, 1.0]}]}
    (root / "run.json").write_text(json.dumps(info))
    return frame


def test_layer_metric_heat_maps_read_layer_similarity(tmp_path):
    write_layer_results(tmp_path / "r")
    sets = {s.key: s for s in heatmaps.heatmap_sets(Results.open(tmp_path / "r"))}
    assert set(sets) == {"heatmap-cka-value", "heatmap-cka-value-image-i1",
                         "heatmap-cka-value-image-i2"}
    intra, inter = sets["heatmap-cka-value"].panels
    # (y, x) is missing: a symmetric metric reads it from (x, y)
    assert intra.mean.loc["y", "x"] == pytest.approx(0.5)
    assert intra.std.loc["x", "y"] == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert intra.mean.loc["y", "y"] == pytest.approx(1.0)  # undefined in i2: skipped
    assert np.isnan(intra.std.loc["y", "y"])  # one value: no std
    assert inter.mean.loc["y", "z"] == pytest.approx(0.9)
    assert inter.mean.loc["x", "z"] == pytest.approx(0.35)
    assert np.isnan(sets["heatmap-cka-value-image-i2"].panels[0].mean.loc["y", "y"])
    assert (sets["heatmap-cka-value"].vmin, sets["heatmap-cka-value"].vmax) == (0.0, 1.0)
    # and it draws, report included (undefined values shown, not hidden)
    assert main(["plot", str(tmp_path / "r"), "--report"]) == 0
    assert (tmp_path / "r" / "plots" / "heatmap-cka-value.png").is_file()
    text = (tmp_path / "r" / "report.html").read_text()
    assert "a layer with zero variance" in text and "n/a" in text


def test_a_distance_metric_is_labelled_by_its_minimum():
    view = MetricView("euclid", "euclidean", higher_is_more_similar=False,
                      value_range=(0.0, float("inf")))
    title, cbar = heatmaps._labels(view, "best_mean", 2.0)
    assert "lower is more similar" in title and cbar == "mean of min euclid"
    _, cbar = heatmaps._labels(view, "pct_well", 2.0)
    assert "≤ 2" in cbar
    assert heatmaps._cmap(view, "best_mean") == "viridis_r"
    grid = pd.DataFrame([[1.0, 3.0]])
    assert heatmaps._range(view, "best_mean", [grid]) == (1.0, 3.0)


def test_well_correlated_groups_link_maps_to_their_partners():
    rows = [(0, 1, 0.9, True), (1, 0, 0.9, True), (2, 3, 0.7, True), (3, 2, 0.5, False),
            (4, 0, 0.2, False)]
    best = pd.DataFrame([{"image": "i", "metric": "m", "model_a": "a", "layer_a": "l",
                          "map_a": a, "model_b": "a", "layer_b": "l", "map_b": b, "value": v,
                          "well_correlated": w} for a, b, v, w in rows])
    groups = well_groups(best, "i", "m", "a", "l", "a", "l")
    assert [[m.map_id for m in g] for g in groups] == [[0, 1], [2, 3]]
    assert groups[1][1].value is None  # 3 is only a partner: its own best fails


def test_slug_keeps_safe_names_and_separates_changed_ones():
    assert slug("vessels-1") == "vessels-1"
    assert slug("train/img1") != slug("train-img1")
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", slug("a b/c"))
    assert KEY_SEP not in slug(f"a{KEY_SEP}b")


def test_show_maps_and_kernels_write_pngs(tmp_path, capsys):
    model = "{architecture: {name: fcn, depth: 2, width: 6}}"
    maps = tmp_path / "maps.png"
    assert main(["show", "maps", model, str(DATA / "vessels-1.png"), "--layer", "blocks.1",
                 "--maps", "0,2,5", "--scale", "shared", "--out", str(maps)]) == 0
    assert "3 maps" in capsys.readouterr().out
    kernels = tmp_path / "k.png"
    assert main(["show", "kernels", model, "--layer", "blocks.1", "--by", "input",
                 "--out", str(kernels)]) == 0
    for path in (maps, kernels):
        with Image.open(path) as image:
            image.verify()
    assert main(["show", "maps", model, str(DATA / "vessels-1.png"), "--layer", "blocks.1",
                 "--maps", "9", "--out", str(maps)]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["show", "kernels", model, "--layer", "blocks.1.relu"]) == 2
    assert "no Conv2d" in capsys.readouterr().err


def test_choose_maps_rejects_bad_ids():
    from mapsim.plots.maps import choose_maps

    assert choose_maps(10, first=3) == [0, 1, 2]
    assert choose_maps(10, maps=[4, 4, 1]) == [4, 1]
    with pytest.raises(MapsimError, match="ids 0 to 9"):
        choose_maps(10, maps=[10])


def test_inter_groups_pair_each_layer_with_its_most_correlated_partner_layer(out):
    from mapsim.plots.draw import group_pairs

    pivot = pd.read_csv(out / "pivot.csv")
    inter = pivot[(pivot.model_a == "a") & (pivot.model_b == "b")]
    expected = []
    for la in ("blocks.0", "blocks.1"):
        pct = inter[inter.layer_a == la].groupby("layer_b", sort=False).pct_well.mean()
        if pct.max() > 0:
            expected.append(("a", la, "b", pct.idxmax()))
    pairs = group_pairs(Results.open(out), "pearson")
    assert pairs[:2] == [("a", "blocks.0", "a", "blocks.0"), ("a", "blocks.1", "a", "blocks.1")]
    assert pairs[2:] == expected


def test_show_maps_of_a_well_correlated_group(out, tmp_path, capsys):
    from mapsim.plots.groups import group_members

    best = pd.read_csv(out / "max.csv")
    rows = best[(best.image == "vessels-1") & (best.model_a == "a") & (best.layer_a == "blocks.0")
                & (best.model_b == "a") & (best.layer_b == "blocks.0")]
    passing = rows[rows.value >= 0.6]
    if passing.empty:
        pytest.skip("no well-correlated map in this layer for the seeded model")
    ids, _ = group_members(str(out), 1, "a", "blocks.0")
    # every member is a passing map or the partner of one, and the group is closed
    linked = set(passing.map_a) | set(passing.map_b.astype(int))
    assert set(ids) <= linked and len(ids) >= 2
    for rec in passing.itertuples():
        assert (rec.map_a in ids) == (int(rec.map_b) in ids)
    spec = "{architecture: {name: fcn, depth: 2, width: 5}, seed: 1}"
    assert main(["show", "maps", spec, str(DATA / "vessels-1.png"), "--layer", "blocks.0",
                 "--model", "a", "--group", f"{out}:1", "--out", str(tmp_path / "g.png")]) == 0
    assert f"({len(ids)} maps" in capsys.readouterr().out
    assert main(["show", "maps", spec, str(DATA / "vessels-1.png"), "--layer", "blocks.0",
                 "--model", "a", "--group", f"{out}:99"]) == 2
    assert "choose a group from 1" in capsys.readouterr().err
    assert main(["show", "maps", spec, str(DATA / "vessels-1.png"), "--layer", "blocks.0",
                 "--group", f"{out}:1"]) == 2
    assert "no model 'model' (its models: a, b)" in capsys.readouterr().err


def test_the_arrays_drawn_are_the_tables(out):
    results = Results.open(out)
    sets = {s.key: s for s in heatmaps.heatmap_sets(results)}
    hs = sets["heatmap-pearson-best_mean"]
    fig = heatmaps.draw_set(hs)
    for ax, panel in zip([a for a in fig.axes if a.get_title()], hs.panels):
        mean, _ = heatmaps.summary_grid(results.summary, "pearson", panel.model_a,
                                        panel.model_b, "best_mean", results.layers(panel.model_a),
                                        results.layers(panel.model_b))
        drawn = np.asarray(ax.collections[0].get_array()).reshape(mean.shape)
        np.testing.assert_allclose(drawn, mean.to_numpy())
        assert [t.get_text() for t in ax.get_yticklabels()] == list(mean.index)
    assert fig.axes[0].get_ylabel() == "mean of max pearson"  # the colour bar


def test_many_layers_put_std_in_its_own_row():
    rng = np.random.default_rng(0)
    names = [f"l{i}" for i in range(heatmaps.ANNOTATE_MAX + 2)]
    mean = pd.DataFrame(rng.random((len(names),) * 2), index=names, columns=names)
    std = mean / 10
    hs = heatmaps.HeatmapSet("k", "m", "best_mean", None, "t", "mean of max m", 0, 1,
                             "viridis", ".2f", [heatmaps.Panel("a", "a", mean, std)])
    fig = heatmaps.draw_set(hs)
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["a × a (intra)", "a × a (intra): std"]
    np.testing.assert_allclose(np.asarray(panels[1].collections[0].get_array()).reshape(std.shape),
                               std.to_numpy())
    assert not panels[0].texts  # too many cells to annotate


def test_a_drawing_failure_keeps_the_run(tmp_path, monkeypatch):
    def broken(results):
        raise ValueError("boom")

    monkeypatch.setattr(heatmaps, "heatmap_sets", broken)
    with pytest.warns(RuntimeWarning, match="boom.*mapsim plot RESULTS_DIR --report"):
        result = run(validate_spec(spec_data(report=True)), out_dir=tmp_path / "o",
                     progress=False)
    assert (result.out_dir / "pivot.csv").is_file()
    assert (result.out_dir / "thumbnails" / "vessels-1.npz").is_file()
    assert not (result.out_dir / "plots").exists()
    assert not (result.out_dir / "report.html").exists()


def test_forked_drawing_gives_the_same_files_as_one_process(out, tmp_path, monkeypatch):
    """The pictures (and the report, whose heat-map part is made while they are drawn) are
    the same bytes whether drawn by forked processes or in this one."""
    import os

    from mapsim.plots.draw import redraw

    copies = {}
    for name, cores in (("forked", {0, 1}), ("alone", {0})):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: cores,
                            raising=False)
        redraw(copy, report=True)
        copies[name] = copy
    files = sorted(p.name for p in (copies["forked"] / "plots").iterdir())
    assert files == sorted(p.name for p in (copies["alone"] / "plots").iterdir())
    assert len(files) > 4  # enough pictures for the drawing processes
    for name in files:
        assert (copies["forked"] / "plots" / name).read_bytes() == (
            copies["alone"] / "plots" / name).read_bytes(), name
    assert (copies["forked"] / "report.html").read_bytes() == (
        copies["alone"] / "report.html").read_bytes()


def test_pictures_keep_the_maps_of_their_images_only_and_the_rest_stream(tmp_path,
                                                                         monkeypatch):
    """With output.plot_images: 1 the first image takes the path that keeps the maps (its
    thumbnails); the others stream, with the tables the plain path gives."""
    from mapsim.engine.step import ImageStep

    calls: list[tuple[str, int]] = []
    launch, compute = ImageStep.launch, ImageStep.compute

    def spy_launch(self, item, index=None):
        calls.append(("stream", index))
        return launch(self, item, index)

    def spy_compute(self, item, keep_maps=False, index=None):
        calls.append(("keep maps" if keep_maps else "plain", index))
        return compute(self, item, keep_maps, index)

    monkeypatch.setattr(ImageStep, "launch", spy_launch)
    monkeypatch.setattr(ImageStep, "compute", spy_compute)
    data = {**spec_data(plots=True), "engine": {}}
    data["images"] = {"name": "files", "paths": [str(DATA / "vessels-1.png"),
                                                 str(DATA / "vessels-2.png"),
                                                 str(DATA / "vessels-3.png")]}
    out = run(validate_spec(data), out_dir=tmp_path / "pictures", progress=False).out_dir
    assert calls == [("keep maps", 0), ("stream", 1), ("stream", 2)], calls
    calls.clear()
    monkeypatch.setattr(ImageStep, "streamable", property(lambda self: False))
    plain = run(validate_spec(data), out_dir=tmp_path / "plain", progress=False).out_dir
    assert [c[0] for c in calls] == ["keep maps", "plain", "plain"], calls
    got, want = pd.read_csv(out / "max.csv"), pd.read_csv(plain / "max.csv")
    pd.testing.assert_frame_equal(got.drop(columns="value"), want.drop(columns="value"))
    np.testing.assert_allclose(got.value, want.value, atol=2e-5)  # the two paths: float32
