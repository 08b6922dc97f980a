"""End to end: a spec in, the study's tables out, checked against an independent recomputation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from skimage.io import imread

from mapsim.errors import ShapeMismatchError
from mapsim.models.build import build_model
from mapsim.registry import load_registry
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def make_spec(tmp_path: Path, **overrides) -> object:
    data = {
        "name": "t",
        "models": {
            "a": {"architecture": {"name": "fcn", "depth": 3, "width": 6}, "seed": 1},
            "b": {"architecture": {"name": "fcn", "depth": 2, "width": 5}, "seed": 2},
        },
        "layers": {"a": ["blocks.0", "blocks.2"], "b": {"first": "blocks.0", "last": "blocks.1"}},
        "images": {"name": "files", "paths": [str(DATA / "vessels-1.png"),
                                              str(DATA / "vessels-2.png")],
                   "labels": str(DATA / "labels")},
        "comparisons": [["a", "a"], ["a", "b"]],
        "aggregators": ["max", "min", {"name": "threshold", "value": 0.5}, "pivot"],
    }
    data.update(overrides)
    return validate_spec(data)


def reference_maps(seed, depth, width, layers, image_path):
    """Activations through plain forward hooks, independent of mapsim's extractor."""
    arch = load_registry().create("architecture", "fcn", {"depth": depth, "width": width})
    module = build_model("ref", architecture=arch, seed=seed).module.eval()
    image = imread(image_path).astype(np.float64)
    image = (image - image.mean()) / image.std()
    captured = {}
    handles = [dict(module.named_modules())[p].register_forward_hook(
        lambda m, i, o, p=p: captured.__setitem__(p, o.detach().double().numpy()[0]))
        for p in layers]
    with torch.no_grad():
        module(torch.from_numpy(image).float()[None, None])
    for h in handles:
        h.remove()
    return [captured[p].reshape(captured[p].shape[0], -1) for p in layers]


def brute_best(za, zb, same_layer):
    """Best |r| partner per map of za in zb (float64 corrcoef), excluding dead maps/self."""
    out = []
    for i in range(za.shape[0]):
        best, best_j = -1.0, None
        for j in range(zb.shape[0]):
            if same_layer and i == j:
                continue
            if za[i].std() <= 1e-10 or zb[j].std() <= 1e-10:
                continue
            r = abs(np.corrcoef(za[i], zb[j])[0, 1])
            if r > best:
                best, best_j = r, j
        out.append((best_j, best if best_j is not None else math.nan))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    spec = make_spec(tmp)
    # on the CPU, like the reference maps (a GPU's TF32 convolutions give other maps)
    result = run(spec, out_dir=tmp / "out", progress=False, device="cpu")
    return result


def test_max_table_matches_an_independent_float64_recomputation(results):
    best = pd.read_csv(results.out_dir / "max.csv")
    a_maps = reference_maps(1, 3, 6, ["blocks.0", "blocks.2"], DATA / "vessels-2.png")
    b_maps = reference_maps(2, 2, 5, ["blocks.0", "blocks.1"], DATA / "vessels-2.png")
    layers_a = {"blocks.0": a_maps[0], "blocks.2": a_maps[1]}
    layers_b = {"first": b_maps[0], "last": b_maps[1]}
    checked = 0
    for (la, za) in layers_a.items():
        for model_b, layers in (("a", layers_a), ("b", layers_b)):
            for lb, zb in layers.items():
                rows = best[(best.image == "vessels-2") & (best.model_a == "a")
                            & (best.layer_a == la) & (best.model_b == model_b)
                            & (best.layer_b == lb)].sort_values("map_a")
                expected = brute_best(za, zb, model_b == "a" and la == lb)
                assert len(rows) == len(expected)
                for (_, row), (j, value) in zip(rows.iterrows(), expected):
                    if j is None:
                        assert pd.isna(row.map_b) and pd.isna(row.value)
                    else:
                        assert row.value == pytest.approx(value, abs=1e-5)
                        checked += 1
    assert checked > 20


def test_inter_comparison_has_both_directions(results):
    best = pd.read_csv(results.out_dir / "max.csv")
    pairs = set(zip(best.model_a, best.model_b))
    assert pairs == {("a", "a"), ("a", "b"), ("b", "a")}
    assert set(best[best.model_a == "b"].layer_a) == {"first", "last"}


def test_pivot_agrees_with_the_max_table(results):
    best = pd.read_csv(results.out_dir / "max.csv")
    piv = pd.read_csv(results.out_dir / "pivot.csv")
    assert set(piv.image) == {"vessels-1", "vessels-2"}
    for _, row in piv.iterrows():
        part = best[(best.image == row.image) & (best.model_a == row.model_a)
                    & (best.layer_a == row.layer_a) & (best.model_b == row.model_b)
                    & (best.layer_b == row.layer_b)]
        assert row.n_maps == len(part)
        assert row.n_well == int((part.value >= 0.5).sum())
        assert row.pct_well == pytest.approx(100 * row.n_well / row.n_maps)
        live = part.value.dropna()
        assert row.best_mean == pytest.approx(live.mean())


def test_summary_is_mean_and_std_of_pivot_across_images(results):
    piv = pd.read_csv(results.out_dir / "pivot.csv")
    summary = pd.read_csv(results.out_dir / "summary.csv")
    sel = summary[(summary.model_a == "a") & (summary.layer_a == "blocks.0")
                  & (summary.model_b == "b") & (summary.layer_b == "last")]
    stats = sel.set_index("statistic")
    part = piv[(piv.model_a == "a") & (piv.layer_a == "blocks.0") & (piv.model_b == "b")
               & (piv.layer_b == "last")]
    assert stats.loc["pct_well", "mean"] == pytest.approx(part.pct_well.mean())
    assert stats.loc["pct_well", "std"] == pytest.approx(part.pct_well.std(ddof=1))
    assert stats.loc["best_mean", "n_images"] == 2


def test_run_json_records_provenance_and_settings(results):
    info = json.loads((results.out_dir / "run.json").read_text())
    assert info["n_images"] == 2
    assert info["plugins_used"]["metrics"]["pearson"]["distribution"] == "mapsim"
    assert info["models"]["a"]["source"]["weights"] == {"source": "random", "seed": 1}
    assert info["models"]["b"]["layers"] == {"first": "blocks.0", "last": "blocks.1"}
    assert len(info["spec_sha256"]) == 64
    assert info["device"] == "cpu"  # the fixture runs on the CPU
    assert "TF32 disabled" in info["precision"]["products"]


def test_roi_restricts_pixels_to_the_dilated_label(tmp_path):
    spec = make_spec(tmp_path, comparisons=[["b", "b"]], engine={"roi": {"dilate": 2}})
    out = run(spec, out_dir=tmp_path / "roi", progress=False).out_dir
    best = pd.read_csv(out / "max.csv")
    from mapsim.io.images import roi_mask, read_label

    mask = roi_mask(read_label(DATA / "labels" / "vessels-1.png"), 2).ravel()
    za = reference_maps(2, 2, 5, ["blocks.1"], DATA / "vessels-1.png")[0][:, mask]
    rows = best[(best.image == "vessels-1") & (best.layer_a == "last")
                & (best.layer_b == "last")].sort_values("map_a")
    for (_, row), (j, value) in zip(rows.iterrows(), brute_best(za, za, True)):
        if j is not None:
            assert row.value == pytest.approx(value, abs=1e-5)


def test_pooled_moments_equal_a_product_over_all_pixels(tmp_path):
    spec = make_spec(tmp_path, comparisons=[["b", "b"]], engine={"pooled": True})
    out = run(spec, out_dir=tmp_path / "pooled", progress=False).out_dir
    pooled = pd.read_csv(out / "pooled" / "max.csv")
    assert set(pooled.image) == {"pooled"}
    z = np.concatenate([reference_maps(2, 2, 5, ["blocks.0"], DATA / f"vessels-{k}.png")[0]
                        for k in (1, 2)], axis=1)
    rows = pooled[(pooled.layer_a == "first") & (pooled.layer_b == "first")]
    for (_, row), (j, value) in zip(rows.sort_values("map_a").iterrows(),
                                    brute_best(z, z, True)):
        if j is not None:
            assert row.value == pytest.approx(value, abs=1e-5)


def test_dead_maps_are_flagged_and_excluded_or_filled(tmp_path):
    factory = tmp_path / "deadnet.py"
    factory.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)\n"
        "        with torch.no_grad():\n"
        "            self.conv.weight[2:] = 0\n"
        "            self.conv.bias[2:] = torch.tensor([0.0, 5.0])\n"
        "    def forward(self, x):\n"
        "        return self.conv(x)\n"
        "def make():\n"
        "    return Net()\n"
    )
    base = {"models": {"d": {"python": "deadnet:make"}}, "layers": {"d": ["conv"]},
            "images": {"name": "files", "paths": str(DATA / "vessels-1.png")}}
    spec = validate_spec(base)
    out = run(spec, base_dir=tmp_path, out_dir=tmp_path / "ex", progress=False).out_dir
    best = pd.read_csv(out / "max.csv")
    assert best.dead_a.tolist() == [False, False, True, True]
    assert best.value[2:].isna().all() and best.value[:2].notna().all()
    assert best.map_b[:2].tolist() == [1, 0]  # dead maps are never chosen as partners
    piv = pd.read_csv(out / "pivot.csv").iloc[0]
    assert piv.n_dead == 2 and piv.n_live == 2 and piv.n_maps == 4

    spec = validate_spec({**base, "engine": {"dead_maps": "original"}})
    out = run(spec, base_dir=tmp_path, out_dir=tmp_path / "orig", progress=False).out_dir
    best = pd.read_csv(out / "max.csv")
    # original rule: the two dead maps correlate 1.0 with each other
    assert best.value[2:].tolist() == [1.0, 1.0]
    assert best.map_b[2:].tolist() == [3, 2]


def test_inter_network_size_mismatch_names_both_shapes(tmp_path):
    (tmp_path / "halfnet.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, stride=2, padding=1))\n"
    )
    spec = validate_spec({
        "models": {"full": {"architecture": {"name": "fcn", "depth": 1, "width": 3}},
                   "half": {"python": "halfnet:make"}},
        "layers": {"full": ["blocks.0"], "half": ["0"]},
        "images": {"name": "files", "paths": str(DATA / "vessels-1.png")},
        "comparisons": [["full", "half"]],
    })
    with pytest.raises(ShapeMismatchError) as info:
        run(spec, base_dir=tmp_path, out_dir=tmp_path / "mismatch", progress=False)
    assert "128 x 128" in str(info.value) and "64 x 64" in str(info.value)
    assert not (tmp_path / "mismatch").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_failed_run_leaves_earlier_results_untouched(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "max.csv").write_text("old results\n")
    (out / "run.json").write_text('{"mapsim_version": "0.1.0", "spec_sha256": "0"}')
    spec = make_spec(tmp_path, layers={"a": ["blocks.9"], "b": ["blocks.0"]})
    from mapsim.errors import LayerNotFoundError

    with pytest.raises(LayerNotFoundError, match="blocks.0"):
        run(spec, out_dir=out, overwrite=True, progress=False)
    assert (out / "max.csv").read_text() == "old results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["res"]


def test_specs_in_yaml_run_from_their_own_folder(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes((DATA / "vessels-3.png").read_bytes())
    spec_file.write_text(yaml.safe_dump({
        "models": {"m": {"architecture": {"name": "fcn", "depth": 1, "width": 3}}},
        "layers": {"m": "blocks.*"}, "images": "imgs/*.png",
    }))
    from mapsim.spec.run_spec import load_spec

    out = run(load_spec(spec_file), base_dir=tmp_path, out_dir=tmp_path / "o",
              progress=False).out_dir
    assert pd.read_csv(out / "max.csv").image.unique().tolist() == ["x"]


def test_layer_label_mapping_needs_one_exact_path_per_label(tmp_path):
    from mapsim.errors import SpecError
    from mapsim.models.prepare import layer_labels

    available = ["blocks", "blocks.0", "blocks.0.conv", "blocks.1", "head"]
    assert layer_labels({"last": "blocks.1", "first": "blocks.0"}, available, "m") == {
        "first": "blocks.0", "last": "blocks.1"}
    with pytest.raises(SpecError, match=r"layers\.m\.all: .*'blocks\.\*' is a pattern matching 2"):
        layer_labels({"all": "blocks.*"}, available, "m")
    with pytest.raises(SpecError, match="given two labels"):
        layer_labels({"a": "head", "b": "head"}, available, "m")
    from mapsim.errors import LayerNotFoundError

    with pytest.raises(LayerNotFoundError, match="Closest matches: blocks.1"):
        layer_labels({"x": "block.1"}, available, "m")


def test_a_layer_granularity_metric_writes_layer_similarity(tmp_path):
    """Plumbing for metrics with one value per layer pair (CKA-like), via a test plugin."""
    import types

    import mapsim
    from mapsim.registry import Provider, build_registry, discover

    class MeanAbsR(mapsim.Metric):
        name = "mean-abs-r"
        info = mapsim.MetricInfo(granularity="layer")

        def from_moments(self, moments, rows, cols):
            g = moments.comoment
            d = torch.sqrt(torch.diagonal(g))
            return (g[rows, cols] / torch.outer(d[rows], d[cols])).abs().mean()

    plugin = types.SimpleNamespace(
        register_metrics=mapsim.hookimpl(lambda register: register(MeanAbsR)))
    registry = build_registry([*discover(), (plugin, Provider("test-plugin", "1.0", "t"))])
    spec = validate_spec({
        "models": {"b": {"architecture": {"name": "fcn", "depth": 2, "width": 5}, "seed": 2}},
        "layers": {"b": {"first": "blocks.0", "last": "blocks.1"}},
        "images": {"name": "files", "paths": str(DATA / "vessels-1.png")},
        "metrics": ["pearson", "mean-abs-r"],
    }, registry=registry)
    out = run(spec, out_dir=tmp_path / "layer", progress=False, registry=registry).out_dir
    table = pd.read_csv(out / "layer_similarity.csv")
    assert len(table) == 4 and set(table.metric) == {"mean-abs-r"}
    maps = reference_maps(2, 2, 5, ["blocks.0", "blocks.1"], DATA / "vessels-1.png")
    live = [m[m.std(axis=1) > 1e-10] for m in maps]
    expected = np.abs(np.corrcoef(live[0], live[1])[: len(live[0]), len(live[0]):]).mean()
    row = table[(table.layer_a == "first") & (table.layer_b == "last")].iloc[0]
    assert all(len(m) == 5 for m in live)  # no dead map, so the toy metric is defined
    assert row.value == pytest.approx(expected, abs=1e-5)
    info = json.loads((out / "run.json").read_text())
    assert info["plugins_used"]["metrics"]["mean-abs-r"]["distribution"] == "test-plugin"
    assert "mean-abs-r" not in set(pd.read_csv(out / "max.csv").metric)


def test_an_unavailable_device_is_a_clear_error():
    from mapsim.errors import MapsimError
    from mapsim.devices import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MapsimError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_folded_batch_norms_give_the_same_tables(tmp_path):
    # the bundled CNN6 has trained batch-norm statistics, so folding really changes weights
    def spec(fuse):
        return validate_spec({
            "name": "fold",
            "models": {"cnn6": {"architecture": {"name": "fcn", "depth": 6, "width": 64,
                                                 "kernel_size": 7},
                                "weights": "pretrained:cnn6"}},
            "layers": {"cnn6": ["blocks.0", "blocks.1", "blocks.3.conv", "blocks.5"]},
            "images": {"name": "synthetic-vessels", "count": 1, "size": [48, 64], "seed": 3},
            "comparisons": [["cnn6", "cnn6"]],
            "aggregators": ["max", "pivot"],
            "engine": {} if fuse is None else {"fuse_batchnorm": fuse},
            "device": "cpu",
        })

    plain = run(spec(False), out_dir=tmp_path / "plain", progress=False)
    folded = run(spec(None), out_dir=tmp_path / "folded", progress=False)  # the default
    assert plain.info["models"]["cnn6"]["batchnorm_folded"] == []
    # blocks.3 keeps its batch norm: its conv output is captured
    assert folded.info["models"]["cnn6"]["batchnorm_folded"] == [
        "blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.5"]
    # the parameters as built: 1,007,808 in the blocks and 130 in the head
    assert folded.info["models"]["cnn6"]["parameters"] == 1_007_938
    a = pd.read_csv(plain.out_dir / "max.csv")
    b = pd.read_csv(folded.out_dir / "max.csv")
    assert len(a) == len(b) == 4 * 4 * 64
    np.testing.assert_allclose(b["value"], a["value"], atol=1e-5)
    assert (a["map_b"] == b["map_b"]).mean() > 0.99  # only near-ties may pick another partner
