"""Building models and loading weights."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mapsim.models import build as models
from mapsim.errors import ModelError, WeightsError
from mapsim.models.build import (
    LoadedModel,
    apply_weights,
    build_model,
    load_state_dict_file,
    pretrained_names,
)
from mapsim.plugins.fcn import FCN, FCNArchitecture

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def _arch(depth: int = 2, width: int = 4, **extra: int) -> FCNArchitecture:
    return FCNArchitecture(FCNArchitecture.Params(depth=depth, width=width, **extra))


def _trained_fcn(depth: int = 2, width: int = 4) -> FCN:
    """An FCN whose weights and batch-norm statistics differ from any fresh init."""
    torch.manual_seed(123)
    model = FCN(depth=depth, width=width)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5)
    return model.eval()


class _Pickled:
    pass


# --------------------------------------------------------------------------- random init
def test_architecture_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(42)
    before = torch.random.get_rng_state()
    a = build_model("a", architecture=_arch(), seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model("b", architecture=_arch(), seed=3)
    c = build_model("c", architecture=_arch(), seed=4)
    for key, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[key])
    assert not torch.equal(a.module.blocks[0].conv.weight, c.module.blocks[0].conv.weight)


def test_loaded_model_fields() -> None:
    loaded = build_model("cnn2", architecture=_arch(in_channels=3), seed=5)
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == "cnn2"
    assert not loaded.module.training
    assert all(p.device.type == "cpu" for p in loaded.module.parameters())
    assert loaded.in_channels == 3
    assert loaded.source == {
        "build": {
            "architecture": {
                "name": "fcn",
                "params": {
                    "depth": 2,
                    "width": 4,
                    "kernel_size": 3,
                    "in_channels": 3,
                    "classes": 2,
                },
            }
        },
        "weights": {"source": "random", "seed": 5},
    }
    json.dumps(loaded.source)


@pytest.mark.parametrize(
    "sources",
    [
        {},
        {"python": "x:y", "torchscript": "m.pt"},
        {"architecture": "ARCH", "python": "x:y"},
    ],
)
def test_exactly_one_source(sources: dict) -> None:
    if sources.get("architecture") == "ARCH":
        sources["architecture"] = _arch()
    with pytest.raises(ModelError, match="exactly one of architecture, python or torchscript"):
        build_model("m", **sources)


def test_kwargs_without_python_is_refused() -> None:
    with pytest.raises(ModelError, match="kwargs"):
        build_model("m", architecture=_arch(), kwargs={"depth": 3})


# --------------------------------------------------------------------------- weights files
@pytest.mark.parametrize("filename", ["w.safetensors", "w.pt", "w.pth"])
def test_weights_round_trip(tmp_path: Path, filename: str) -> None:
    trained = _trained_fcn()
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file(trained.state_dict(), str(path))
    else:
        torch.save(trained.state_dict(), path)
    loaded = build_model("m", architecture=_arch(), weights=filename, base_dir=tmp_path)
    x = torch.randn(1, 1, 7, 8)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), trained(x))
    info = loaded.source["weights"]
    assert info["source"] == "file"
    assert info["path"] == str(path)
    assert info["format"] == ("safetensors" if filename.endswith("safetensors") else "torch")
    assert info["sha256"] == models.file_sha256(path) and len(info["sha256"]) == 64
    json.dumps(loaded.source)


def test_checkpoint_wrappers_and_dataparallel_prefix(tmp_path: Path) -> None:
    state = _trained_fcn().state_dict()
    for key in ("state_dict", "model_state_dict", "model"):
        path = tmp_path / f"{key}.pt"
        wrapped = {f"module.{k}": v for k, v in state.items()}
        torch.save({key: wrapped, "epoch": 7, "optimizer": {"lr": 0.01}}, path)
        got = load_state_dict_file(path)
        assert list(got) == list(state)
        assert all(torch.equal(got[k], state[k]) for k in state)


def test_missing_num_batches_tracked_is_tolerated(tmp_path: Path) -> None:
    trained = _trained_fcn()
    state = {k: v for k, v in trained.state_dict().items() if "num_batches" not in k}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = build_model("m", architecture=_arch(), weights=tmp_path / "w.safetensors")
    got, expected = loaded.module.blocks[1].bn.running_var, trained.blocks[1].bn.running_var
    torch.testing.assert_close(got, expected)


def test_mismatched_depth_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = tmp_path / "cnn3.safetensors"
    save_file(_trained_fcn(depth=3).state_dict(), str(path))
    with pytest.raises(WeightsError) as info:
        build_model("m", architecture=_arch(depth=2), weights=path)
    message = str(info.value)
    assert "cnn3.safetensors" in message
    assert "unexpected key(s)" in message and "blocks.2.conv.weight" in message
    assert "depth" in message

    with pytest.raises(WeightsError) as info:
        build_model("m", architecture=_arch(depth=4), weights=path)
    assert "missing key(s)" in str(info.value) and "blocks.3.bn.running_mean" in str(info.value)


def test_shape_mismatch_is_listed(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(_trained_fcn(width=4).state_dict(), path)
    with pytest.raises(WeightsError) as info:
        build_model("m", architecture=_arch(width=5), weights=path)
    message = str(info.value)
    assert "shape mismatch" in message
    assert "blocks.0.conv.weight (file (4, 1, 3, 3), model (5, 1, 3, 3))" in message


def test_long_lists_are_cut_with_a_count() -> None:
    model = FCN(depth=1, width=2)
    state = {f"extra.{i}": torch.zeros(1) for i in range(25)}
    state.update(model.state_dict())
    with pytest.raises(WeightsError, match=r"25 unexpected key\(s\): .*\(25 in all\)"):
        apply_weights(model, state, "w.pt")


def test_pickle_of_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"x": _Pickled()}, path)
    with pytest.raises(WeightsError, match="state dict") as info:
        load_state_dict_file(path)
    assert "torch.save(model.state_dict(), path)" in str(info.value)

    whole = tmp_path / "whole.pt"
    torch.save(_Pickled(), whole)
    with pytest.raises(WeightsError, match="not a plain state dict of tensors"):
        load_state_dict_file(whole)


def test_dict_with_non_tensor_values_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"weight": torch.zeros(2), "epoch": 3}, path)
    with pytest.raises(WeightsError, match="'epoch'|epoch") as info:
        load_state_dict_file(path)
    assert "state dict" in str(info.value)

    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="holds a list"):
        load_state_dict_file(path)


@pytest.mark.parametrize("name", ["notes.txt", "notes.pt", "notes.safetensors"])
def test_text_file_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match=name):
        load_state_dict_file(path)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("m", architecture=_arch(), weights="nope.safetensors", base_dir=tmp_path)
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pt")


def test_pretrained_unknown_name_lists_available() -> None:
    with pytest.raises(WeightsError) as info:
        build_model("m", architecture=_arch(), weights="pretrained:cnn42")
    message = str(info.value)
    assert "'cnn42'" in message
    names = pretrained_names()
    if names:
        assert names[0] in message
    else:
        assert "none are bundled in this version" in message


def test_pretrained_names_reads_the_package_folder(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "pretrained"
    folder.mkdir()
    save_file(_trained_fcn().state_dict(), str(folder / "tiny.safetensors"))
    (folder / "README.txt").write_text("not weights")
    monkeypatch.setattr(models, "_pretrained_dir", lambda: folder)
    assert pretrained_names() == ["tiny"]
    loaded = build_model("m", architecture=_arch(), weights="pretrained:tiny")
    assert loaded.source["weights"]["source"] == "pretrained"
    assert loaded.source["weights"]["name"] == "tiny"
    with pytest.raises(WeightsError, match="available: tiny"):
        build_model("m", architecture=_arch(), weights="pretrained:other")


# --------------------------------------------------------------------------- python factories
FACTORY_MODULE = """
import torch
from torch import nn
from mapsim.plugins.fcn import FCN

def make(depth=1, width=3):
    return FCN(depth=depth, width=width, in_channels=2)

def broken(**kwargs):
    raise ValueError("bad config")

def not_a_model():
    return "hello"

class Holder:
    @staticmethod
    def build():
        return nn.Conv2d(3, 1, 1)

NOT_CALLABLE = 5
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch) -> str:
    name = "mapsim_test_factories"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_python_factory(factory_module: str) -> None:
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    loaded = build_model("f", python=f"{factory_module}:make", kwargs={"depth": 2}, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert isinstance(loaded.module, FCN) and len(loaded.module.blocks) == 2
    assert not loaded.module.training
    assert loaded.in_channels == 2  # from the first Conv2d
    assert loaded.source["build"] == {"python": f"{factory_module}:make", "kwargs": {"depth": 2}}
    again = build_model("f", python=f"{factory_module}:make", kwargs={"depth": 2}, seed=1)
    assert torch.equal(loaded.module.head.weight, again.module.head.weight)

    nested = build_model("g", python=f"{factory_module}:Holder.build")
    assert isinstance(nested.module, nn.Conv2d) and nested.in_channels == 3


def test_python_factory_module_next_to_the_spec(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mapsim_local_model.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Conv2d(1, 1, 1)\n"
    )
    monkeypatch.delitem(sys.modules, "mapsim_local_model", raising=False)
    loaded = build_model("m", python="mapsim_local_model:make", base_dir=tmp_path)
    assert isinstance(loaded.module, nn.Conv2d)
    assert str(tmp_path) not in sys.path


@pytest.mark.parametrize(
    ("spec", "kwargs", "fragments"),
    [
        ("no_colon_here", None, ["package.module:factory"]),
        ("mapsim_no_such_module:make", None, ["cannot import", "'mapsim_no_such_module'"]),
        ("{mod}:missing", None, ["has no attribute 'missing'"]),
        ("{mod}:NOT_CALLABLE", None, ["not a callable"]),
        ("{mod}:make", {"colour": "red"}, ["raised TypeError", "colour"]),
        ("{mod}:broken", None, ["raised ValueError", "bad config"]),
        ("{mod}:not_a_model", None, ["returned a str", "torch.nn.Module"]),
    ],
)
def test_python_factory_errors(
    factory_module: str, spec: str, kwargs: dict | None, fragments: list[str]
) -> None:
    with pytest.raises(ModelError) as info:
        build_model("fac", python=spec.format(mod=factory_module), kwargs=kwargs)
    message = str(info.value)
    assert "'fac'" in message
    for fragment in fragments:
        assert fragment in message


# --------------------------------------------------------------------------- TorchScript
def test_torchscript_load(tmp_path: Path) -> None:
    trained = _trained_fcn()
    path = tmp_path / "cnn.pt"
    torch.jit.save(torch.jit.script(trained), str(path))
    loaded = build_model("ts", torchscript="cnn.pt", base_dir=tmp_path)
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert not loaded.module.training
    assert loaded.in_channels == 1
    x = torch.randn(1, 1, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), trained(x))
    assert loaded.source["build"]["torchscript"] == str(path)
    assert loaded.source["weights"] == {"source": "torchscript"}
    json.dumps(loaded.source)


def test_torchscript_with_weights_file(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(FCN(depth=2, width=4)), str(tmp_path / "cnn.pt"))
    trained = _trained_fcn()
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = build_model(
        "ts", torchscript=tmp_path / "cnn.pt", weights=tmp_path / "w.safetensors"
    )
    x = torch.randn(1, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), trained(x))
    assert loaded.source["weights"]["source"] == "file"


def test_torchscript_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        build_model("ts", torchscript="missing.pt", base_dir=tmp_path)
    (tmp_path / "junk.pt").write_text("not torchscript")
    with pytest.raises(ModelError, match="not a readable TorchScript file"):
        build_model("ts", torchscript=tmp_path / "junk.pt")
