"""The shared-start warning (mapsim.models.start): two compared models whose layers started
from, or are, the same weights are named, checked against direct tensor comparisons."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from mapsim.cli import main
from mapsim.errors import MapsimWarning
from mapsim.models.build import build_model
from mapsim.registry import load_registry
from mapsim.runner.run import run
from mapsim.runner.setup import RunSetup
from mapsim.spec.run_spec import validate_spec

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
REGISTRY = load_registry()


def _fcn(depth, seed, width=4):
    return {"architecture": {"name": "fcn", "depth": depth, "width": width}, "seed": seed}


def _spec(models, layers, comparisons):
    return validate_spec({
        "name": "ss", "models": models, "layers": layers, "comparisons": comparisons,
        "images": {"name": "files", "paths": str(DATA / "vessels-1.png")},
    })


def _setup(spec):
    setup = RunSetup(spec, Path("."), device="cpu", registry=REGISTRY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup.prepare_models()
    return setup, [w for w in caught if issubclass(w.category, MapsimWarning)]


def _initial(depth, seed, width=4):
    architecture = REGISTRY.create("architecture", "fcn", {"depth": depth, "width": width})
    return build_model("x", architecture=architecture, seed=seed).module.state_dict()


def _trained(tmp_path, name, depth, seed):
    """A 'trained' network: its seeded start, moved by noise, saved with a card beside it."""
    from safetensors.torch import save_file

    state = _initial(depth, seed)
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    moved = {k: (v + 0.01 * torch.randn(v.shape, generator=generator)
                 if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(moved, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / f"{name}.json").write_text(json.dumps({
        "model": {"architecture": {"name": "fcn", "depth": depth, "width": 4}}, "seed": seed}))
    return {"architecture": {"name": "fcn", "depth": depth, "width": 4},
            "weights": str(tmp_path / f"{name}.safetensors")}


def test_a_shared_seed_names_exactly_the_layers_that_started_equal(tmp_path):
    spec = _spec({"a": _trained(tmp_path, "a", 2, 7), "b": _trained(tmp_path, "b", 3, 7)},
                 {"a": ["blocks.0", "blocks.1"], "b": ["blocks.0", "blocks.1", "blocks.2"]},
                 [["a", "a"], ["a", "b"]])
    setup, caught = _setup(spec)
    # the reference: the initial tensors compared directly
    sa, sb = _initial(2, 7), _initial(3, 7)
    equal = [p for p in ("blocks.0", "blocks.1")
             if all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(p + "."))]
    assert equal == ["blocks.0", "blocks.1"]
    [finding] = setup.shared_start
    assert (finding.model_a, finding.model_b) == ("a", "b")
    assert [a for a, _ in finding.layers] == equal
    assert finding.why == "started from the same weights"
    assert len(caught) == 1 and "'a' and 'b' started from the same weights" in str(
        caught[0].message)


def test_untrained_networks_of_one_seed_have_identical_weights():
    spec = _spec({"a": _fcn(2, 7), "b": _fcn(3, 7)},
                 {"a": ["blocks.0", "blocks.1"], "b": ["blocks.0", "blocks.1", "blocks.2"]},
                 [["a", "b"]])
    setup, _ = _setup(spec)
    [finding] = setup.shared_start
    assert finding.why == "have identical weights"
    assert [a for a, _ in finding.layers] == ["blocks.0", "blocks.1"]


def test_trained_networks_of_different_seeds_share_nothing(tmp_path):
    spec = _spec({"a": _trained(tmp_path, "a", 2, 7), "b": _trained(tmp_path, "b", 2, 8)},
                 {"a": "blocks.*", "b": "blocks.*"}, [["a", "b"]])
    setup, caught = _setup(spec)
    assert setup.shared_start == [] and caught == []


def test_different_seeds_share_nothing():
    spec = _spec({"a": _fcn(2, 7), "b": _fcn(2, 8)}, {"a": "blocks.*", "b": "blocks.*"},
                 [["a", "b"]])
    setup, caught = _setup(spec)
    assert setup.shared_start == [] and caught == []


def test_a_model_compared_with_a_copy_of_itself_has_identical_weights(tmp_path, capsys):
    spec = _spec({"cnn6": {"architecture": {"name": "fcn", "depth": 6, "width": 64,
                                            "kernel_size": 7}, "weights": "pretrained:cnn6"},
                  "copy": {"architecture": {"name": "fcn", "depth": 6, "width": 64,
                                            "kernel_size": 7}, "weights": "pretrained:cnn6"}},
                 {"cnn6": {"L1": "blocks.0", "L6": "blocks.5"},
                  "copy": {"first": "blocks.0", "last": "blocks.5"}},
                 [["cnn6", "copy"]])
    with pytest.warns(MapsimWarning, match="have identical weights in layer\\(s\\) L1/first"):
        out = run(spec, out_dir=tmp_path / "out", progress=False).out_dir
    info = json.loads((out / "run.json").read_text())
    assert info["shared_start"] == [{"models": ["cnn6", "copy"],
                                     "layers": [["L1", "first"], ["L6", "last"]],
                                     "why": "have identical weights"}]


def test_bundled_networks_are_read_from_their_cards():
    """The cards record architecture and training seed; CNN6 and CNN10 of mapsim 0.1 were both
    trained from seed 0, so their shared layers started equal: the warning must say so."""
    from mapsim.models.build import pretrained_card

    arch = {"name": "fcn", "width": 64, "kernel_size": 7}
    spec = _spec({"cnn6": {"architecture": {**arch, "depth": 6}, "weights": "pretrained:cnn6"},
                  "cnn10": {"architecture": {**arch, "depth": 10},
                            "weights": "pretrained:cnn10"}},
                 {"cnn6": {"L1": "blocks.0", "L6": "blocks.5"},
                  "cnn10": {"L1": "blocks.0", "L6": "blocks.5", "L10": "blocks.9"}},
                 [["cnn6", "cnn10"]])
    setup, _ = _setup(spec)
    same_seed = pretrained_card("cnn6")["seed"] == pretrained_card("cnn10")["seed"]
    if same_seed:
        [finding] = setup.shared_start
        assert [a for a, _ in finding.layers] == ["L1", "L6"]
    else:
        assert setup.shared_start == []


def test_the_command_line_prints_one_line_per_finding(tmp_path, capsys):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({
        "name": "ss", "models": {"a": _fcn(2, 3), "b": _fcn(2, 3)},
        "layers": {"a": "blocks.*", "b": "blocks.*"}, "comparisons": [["a", "b"]],
        "images": {"name": "files", "paths": str(DATA / "vessels-1.png")},
    }))
    assert main(["run", str(spec_path), "--quiet", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.count("mapsim: warning: ") == 1 and "Traceback" not in err
    assert "'a' and 'b' have identical weights in layer(s) blocks.0, blocks.1" in err
