"""The forward pass's precision policy (engine.precision) and its probe, checked against an
independent recomputation and against a float64 forward pass."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mapsim.errors import MapsimWarning
from mapsim.models.build import build_model
from mapsim.plugins.vessels import SyntheticVessels
from mapsim.registry import load_registry
from mapsim.runner.run import run
from mapsim.spec.run_spec import validate_spec

REGISTRY = load_registry()
LAYERS = ["blocks.0", "blocks.1", "blocks.2"]
#: documented bound (docs/performance.md): |r| of an exact (float32) forward pass against a
#: float64 one, end to end through the similarity step, on small random networks
EXACT_BOUND = 1e-5


def _spec(precision, **engine):
    return validate_spec({
        "name": "precision",
        "models": {"m": {"architecture": {"name": "fcn", "depth": 3, "width": 8}, "seed": 1}},
        "layers": {"m": LAYERS},
        "images": {"name": "synthetic-vessels", "count": 2, "size": [48, 56], "seed": 3},
        "engine": {"precision": precision, "fuse_batchnorm": False, **engine},
        "device": "cpu",  # the CPU's behaviour (and its float64 references), on any machine
    })


def _maps(dtype=torch.float32, autocast=None):
    """The first image's maps of the spec's network, computed here with plain hooks."""
    architecture = REGISTRY.create("architecture", "fcn", {"depth": 3, "width": 8})
    module = build_model("m", architecture=architecture, seed=1).module.eval().to(dtype)
    item = next(iter(SyntheticVessels(SyntheticVessels.Params(count=2, size=(48, 56), seed=3))))
    captured = {}
    hooks = [module.get_submodule(p).register_forward_hook(
        lambda mod, inp, out, p=p: captured.__setitem__(p, out.detach().double()))
        for p in LAYERS]
    with torch.no_grad():
        x = torch.from_numpy(item.image)[None].to(dtype)
        if autocast is None:
            module(x)
        else:
            with torch.autocast("cpu", dtype=autocast):
                module(x)
    for hook in hooks:
        hook.remove()
    return {p: captured[p][0].reshape(captured[p].shape[1], -1).numpy() for p in LAYERS}


def _r(maps: np.ndarray) -> np.ndarray:
    live = maps.std(axis=1) > 1e-10
    r = np.full((len(maps), len(maps)), np.nan)
    r[np.ix_(live, live)] = np.corrcoef(maps[live])
    return r


@pytest.mark.filterwarnings("ignore:engine.precision 'fp16' on the CPU")
@pytest.mark.parametrize("policy, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_probe_equals_an_independent_recomputation(tmp_path, policy, dtype):
    out = run(_spec(policy), out_dir=tmp_path / "o", progress=False).out_dir
    info = json.loads((out / "run.json").read_text())["precision"]
    assert info["forward"] == policy
    probe = info["forward_probe"]["max_abs_delta_r"]["m"]
    exact, low = _maps(), _maps(autocast=dtype)
    for layer in LAYERS:
        delta = np.abs(_r(low[layer]) - _r(exact[layer]))
        expected = np.nanmax(delta)
        assert probe[layer] == pytest.approx(expected, abs=2e-6), layer
        assert probe[layer] > 1e-5  # half precision does cost something here


def test_exact_equals_a_float64_forward_pass_to_the_documented_bound(tmp_path):
    out = run(_spec("exact"), out_dir=tmp_path / "o", progress=False).out_dir
    maps64 = _maps(torch.float64)
    pairs = pd.read_csv(out / "max.csv")
    first = pairs[pairs.image == pairs.image.iloc[0]]
    worst = 0.0
    for layer in LAYERS:
        r64 = np.abs(_r(maps64[layer]))
        np.fill_diagonal(r64, np.nan)
        rows = first[(first.layer_a == layer) & (first.layer_b == layer)]
        for row in rows.itertuples():
            if np.isnan(row.value):
                continue
            worst = max(worst, abs(row.value - r64[row.map_a, row.map_b]))
    assert worst < EXACT_BOUND, worst
    info = json.loads((out / "run.json").read_text())["precision"]
    assert info["forward_probe"] == {"skipped": "exact on cpu computes as exact does"}


def test_tf32_on_a_cpu_is_exact_and_says_so(tmp_path):
    a = run(_spec("tf32"), out_dir=tmp_path / "tf32", progress=False).out_dir
    b = run(_spec("exact"), out_dir=tmp_path / "exact", progress=False).out_dir
    assert (a / "max.csv").read_bytes() == (b / "max.csv").read_bytes()
    probe = json.loads((a / "run.json").read_text())["precision"]["forward_probe"]
    assert probe == {"skipped": "tf32 on cpu computes as exact does"}


def test_fp16_on_a_cpu_warns_that_it_is_slow(tmp_path):
    with pytest.warns(MapsimWarning, match="'fp16' on the CPU.*'bf16'"):
        run(_spec("fp16", precision_probe=False), out_dir=tmp_path / "o", progress=False)


def test_the_probe_can_be_switched_off(tmp_path):
    out = run(_spec("bf16", precision_probe=False), out_dir=tmp_path / "o",
              progress=False).out_dir
    probe = json.loads((out / "run.json").read_text())["precision"]["forward_probe"]
    assert probe == {"skipped": "engine.precision_probe is off"}


def test_the_precision_context_restores_torch_settings():
    from mapsim.engine.precision import _conv_tf32, forward_precision

    before = _conv_tf32()
    with forward_precision("exact", torch.device("cpu")):
        assert _conv_tf32() is False
    with forward_precision("tf32", torch.device("cpu")):
        assert _conv_tf32() is True
    assert _conv_tf32() == before


def test_the_probe_runs_after_the_images_and_holds_one_pass_at_a_time(tmp_path, monkeypatch):
    """The probe is queued when the image loop is over (so that a GPU computes it while the
    host publishes), and each pass's maps are reduced to correlations before the next pass."""
    import gc
    import weakref

    from mapsim.engine.step import ImageStep

    events: list[str] = []
    alive: list[weakref.ref] = []
    extract, launch, compute = ImageStep.extract, ImageStep.launch, ImageStep.compute

    def spy_extract(self, item, precision=None):
        gc.collect()
        events.append(f"extract {precision or 'policy'} "
                      f"(earlier maps alive: {sum(r() is not None for r in alive)})")
        maps = extract(self, item, precision)
        alive.extend(weakref.ref(t) for layers in maps.values() for t in layers.values())
        return maps

    def spy_launch(self, item, index=None):
        events.append("image")
        return launch(self, item, index)

    def spy_compute(self, item, keep_maps=False, index=None):
        events.append("image")
        return compute(self, item, keep_maps, index)

    monkeypatch.setattr(ImageStep, "extract", spy_extract)
    monkeypatch.setattr(ImageStep, "launch", spy_launch)
    monkeypatch.setattr(ImageStep, "compute", spy_compute)
    out = run(_spec("bf16"), out_dir=tmp_path / "o", progress=False).out_dir
    probe_calls = [e for e in events if e.startswith("extract exact")]
    assert len(probe_calls) == 1
    last_image = max(i for i, e in enumerate(events) if e == "image")
    first_probe = events.index(probe_calls[0]) - 1  # the policy pass comes just before
    assert events[first_probe].startswith("extract policy") and first_probe > last_image, events
    assert probe_calls[0].endswith("(earlier maps alive: 0)"), events
    info = json.loads((out / "run.json").read_text())
    probe = info["precision"]["forward_probe"]
    assert set(probe["max_abs_delta_r"]["m"]) == set(LAYERS)
    timings = info["timings_s"]
    # queued and read inside the merge and publish phases, so the phases still add up
    assert 0 < timings["precision_probe"] <= timings["merge"] + timings["publish"] + 1e-3


@pytest.mark.parametrize("error, words, record", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.9 GiB\nmore"),
     "ran out of memory", "OutOfMemoryError: CUDA out of memory. Tried to allocate 3.9 GiB"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), "failed",
     "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"),
])
@pytest.mark.parametrize("when", ["queued", "read"])
def test_a_probe_that_fails_keeps_the_run(tmp_path, monkeypatch, error, words, record, when):
    from mapsim.engine.precision import PendingProbe
    from mapsim.engine.step import ImageStep

    def fails(*args):
        raise error

    if when == "queued":
        monkeypatch.setattr(ImageStep, "probe_precision", fails)
    else:
        monkeypatch.setattr(PendingProbe, "read", fails)
    with pytest.warns(MapsimWarning, match=f"precision probe {words} on image"):
        out = run(_spec("bf16"), out_dir=tmp_path / "o", progress=False).out_dir
    probe = json.loads((out / "run.json").read_text())["precision"]["forward_probe"]
    assert probe["failed"] == record and probe["image"]
    assert (out / "max.csv").is_file()


def test_the_pending_probe_reads_the_largest_finite_difference():
    from mapsim.engine.precision import PendingProbe, largest_differences

    nan = float("nan")
    policy = {"m": {"a": torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64),
                    "dead": torch.full((2, 2), nan, dtype=torch.float64)}}
    exact = {"m": {"a": torch.tensor([[1.0, 0.25], [nan, 1.0]], dtype=torch.float64),
                   "dead": torch.full((2, 2), nan, dtype=torch.float64)}}
    record = PendingProbe("img-0", largest_differences(policy, exact)).read()
    assert record == {"image": "img-0", "max_abs_delta_r": {"m": {"a": 0.25, "dead": 0.0}}}
