"""Layer resolution, layer listing and the ``hooks`` extractor."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mapsim.errors import ExtractionError, LayerNotFoundError
from mapsim.models.layers import (
    LayerInfo,
    LayerOutputError,
    describe_layers,
    format_layers,
    resolve_layers,
)
from mapsim.registry import load_registry
from mapsim.plugins.fcn import FCN
from mapsim.plugins.hooks import HooksExtractor

# torch 2.9+ marks torch.jit as deprecated; mapsim still supports TorchScript files.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

FCN3 = [
    "blocks",
    *[f"blocks.{i}{part}" for i in range(3) for part in ("", ".conv", ".bn", ".relu")],
    "head",
]


def _fcn(depth: int = 3, width: int = 4, in_channels: int = 1) -> FCN:
    torch.manual_seed(0)
    model = FCN(depth=depth, width=width, in_channels=in_channels)
    # non-trivial batch-norm statistics, so eval-mode outputs differ from the conv's
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _script_roundtrip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location="cpu")


def _hooks_registered(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# --------------------------------------------------------------------------- resolve_layers
def test_resolve_exact_paths_in_model_order_without_duplicates() -> None:
    got = resolve_layers(FCN3, ["head", "blocks.0", "blocks.0", "blocks.?"], "cnn3")
    assert got == ["blocks.0", "blocks.1", "blocks.2", "head"]


def test_resolve_single_string() -> None:
    assert resolve_layers(FCN3, "blocks.1.bn", "m") == ["blocks.1.bn"]


def test_star_stays_within_one_path_component() -> None:
    assert resolve_layers(FCN3, "blocks.*", "m") == ["blocks.0", "blocks.1", "blocks.2"]


def test_double_star_crosses_dots() -> None:
    got = resolve_layers(FCN3, "blocks.**", "m")
    assert got == [name for name in FCN3 if name.startswith("blocks.")]
    assert "blocks.0.conv" in got
    assert resolve_layers(FCN3, "**.conv", "m") == ["blocks.0.conv", "blocks.1.conv",
                                                     "blocks.2.conv"]


def test_question_mark_and_sets_select_direct_children() -> None:
    assert resolve_layers(FCN3, "blocks.?", "m") == ["blocks.0", "blocks.1", "blocks.2"]
    assert resolve_layers(FCN3, "blocks.[02]", "m") == ["blocks.0", "blocks.2"]
    relus = ["blocks.0.relu", "blocks.1.relu", "blocks.2.relu"]
    assert resolve_layers(FCN3, "blocks.*.relu", "m") == relus
    assert resolve_layers(FCN3, "blocks.[!0]", "m") == ["blocks.1", "blocks.2"]


def test_wildcards_are_case_sensitive() -> None:
    with pytest.raises(LayerNotFoundError):
        resolve_layers(FCN3, "HEAD", "m")


def test_unknown_layer_lists_the_closest_paths() -> None:
    with pytest.raises(LayerNotFoundError) as info:
        resolve_layers(FCN3, ["blocks.0", "block.1"], "cnn3")
    message = str(info.value)
    assert "'block.1'" in message
    assert "blocks.1" in message.split("Known")[0]  # among the closest matches
    assert "cnn3" in message
    assert isinstance(info.value, KeyError)


def test_wildcard_matching_nothing_is_an_error() -> None:
    with pytest.raises(LayerNotFoundError, match="modules"):
        resolve_layers(FCN3, "modules.*", "m")


# --------------------------------------------------------------------------- hooks extractor
def test_hooks_is_registered() -> None:
    entry = load_registry().get("extractor", "hooks")
    assert entry.cls is HooksExtractor
    assert entry.provider.distribution == "mapsim"


def test_layer_names_are_every_non_root_module_in_order() -> None:
    assert HooksExtractor().layer_names(_fcn()) == FCN3


def test_extract_captures_the_right_outputs() -> None:
    model = _fcn()
    x = torch.randn(2, 1, 9, 8)
    out = HooksExtractor().extract(model, ["head", "blocks.0", "blocks.1.bn"], x)
    assert list(out) == ["head", "blocks.0", "blocks.1.bn"]
    with torch.no_grad():
        b0 = model.blocks[0](x)
        bn1 = model.blocks[1].bn(model.blocks[1].conv(b0))
        head = model(x)
    torch.testing.assert_close(out["blocks.0"], b0)
    torch.testing.assert_close(out["blocks.1.bn"], bn1)
    torch.testing.assert_close(out["head"], head)
    assert out["blocks.0"].shape == (2, 4, 9, 8)
    assert all(not t.requires_grad for t in out.values())
    assert _hooks_registered(model) == 0


def test_output_is_not_changed_by_a_later_inplace_op() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True)).eval()
    x = torch.randn(1, 1, 6, 6)
    out = HooksExtractor().extract(model, ["0"], x)
    with torch.no_grad():
        expected = model[0](x)
    assert (expected < 0).any()
    torch.testing.assert_close(out["0"], expected)


def test_unknown_layer_in_extract() -> None:
    with pytest.raises(LayerNotFoundError, match="blocks.0"):
        HooksExtractor().extract(_fcn(), ["block.0"], torch.zeros(1, 1, 4, 4))


def test_wrong_input_channels_give_a_clear_error_and_remove_hooks() -> None:
    model = _fcn(in_channels=1)
    with pytest.raises(ExtractionError) as info:
        HooksExtractor().extract(model, ["blocks.0", "head"], torch.zeros(1, 3, 5, 5))
    message = str(info.value)
    assert "(1, 3, 5, 5)" in message
    assert "channels" in message
    assert "Traceback" not in message
    assert info.value.__cause__ is None
    assert _hooks_registered(model) == 0


class _Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.conv(x)
        raise KeyError("boom")


def test_hooks_are_removed_when_forward_raises_anything() -> None:
    model = _Broken().eval()
    with pytest.raises(KeyError, match="boom"):
        HooksExtractor().extract(model, ["conv"], torch.zeros(1, 1, 2, 2))
    assert _hooks_registered(model) == 0


class _TupleLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class _TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.pair = _TupleLayer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(self.conv(x))[0]


def test_non_tensor_output_is_an_error_naming_layer_and_type() -> None:
    model = _TupleModel().eval()
    with pytest.raises(LayerOutputError) as info:
        HooksExtractor().extract(model, ["conv", "pair"], torch.zeros(1, 1, 3, 3))
    assert info.value.layer == "pair"
    assert "'pair'" in str(info.value) and "tuple" in str(info.value)
    assert isinstance(info.value, ExtractionError)
    assert _hooks_registered(model) == 0


class _Reuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.unused = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x))


def test_reused_and_unused_layers_are_errors() -> None:
    model = _Reuse().eval()
    with pytest.raises(LayerOutputError, match="more than once"):
        HooksExtractor().extract(model, ["conv"], torch.zeros(1, 1, 2, 2))
    with pytest.raises(ExtractionError, match="'unused' did not run"):
        HooksExtractor().extract(model, ["unused"], torch.zeros(1, 1, 2, 2))
    assert _hooks_registered(model) == 0


# --------------------------------------------------------------------------- TorchScript
def test_scripted_fcn_matches_eager_hooks() -> None:
    model = _fcn()
    x = torch.randn(1, 1, 7, 6)
    layers = ["blocks.0", "blocks.0.conv", "blocks.1.bn", "blocks.2.relu", "blocks", "head"]
    eager = HooksExtractor().extract(model, layers, x)
    for scripted in (torch.jit.script(model), _script_roundtrip(torch.jit.script(model))):
        got = HooksExtractor().extract(scripted, layers, x)
        assert list(got) == layers
        for layer in layers:
            torch.testing.assert_close(got[layer], eager[layer])


def test_saved_traced_fcn_matches_eager_hooks() -> None:
    model = _fcn()
    x = torch.randn(1, 1, 6, 6)
    loaded = _script_roundtrip(torch.jit.trace(model, x))
    layers = ["blocks.0", "blocks.2.bn", "head"]
    eager = HooksExtractor().extract(model, layers, x)
    got = HooksExtractor().extract(loaded, layers, x)
    for layer in layers:
        torch.testing.assert_close(got[layer], eager[layer])


def test_in_memory_traced_fcn_fails_clearly() -> None:
    model = _fcn()
    x = torch.randn(1, 1, 6, 6)
    traced = torch.jit.trace(model, x)
    with pytest.raises(ExtractionError, match="TorchScript modules cannot be hooked"):
        HooksExtractor().extract(traced, ["blocks.0"], x)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class _ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 1)
        self.res = _Residual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.stem(x))


def test_scripted_residual_model_fails_clearly() -> None:
    scripted = torch.jit.script(_ResNetLike().eval())
    x = torch.randn(1, 1, 5, 5)
    # the top level is a chain (stem -> res), so its outputs can be replayed ...
    got = HooksExtractor().extract(scripted, ["stem", "res"], x)
    torch.testing.assert_close(got["res"], scripted(x))
    # ... but the residual block is not
    with pytest.raises(ExtractionError) as info:
        HooksExtractor().extract(scripted, ["res.conv1"], x)
    message = str(info.value)
    assert "TorchScript modules cannot be hooked" in message
    assert "'res'" in message and "not a plain chain" in message
    assert "python factory" in message


def test_scripted_model_wrong_input_is_an_extraction_error() -> None:
    scripted = torch.jit.script(_fcn(in_channels=1))
    with pytest.raises(ExtractionError, match=r"\(1, 2, 4, 4\)"):
        HooksExtractor().extract(scripted, ["blocks.0"], torch.zeros(1, 2, 4, 4))


# --------------------------------------------------------------------------- describe / format
def test_describe_layers_of_fcn() -> None:
    infos = describe_layers(_fcn(), HooksExtractor(), (1, 5, 7))
    assert [i.path for i in infos] == FCN3
    by_path = {i.path: i for i in infos}
    assert by_path["blocks.0"] == LayerInfo("blocks.0", "ConvModule", (1, 4, 5, 7), 4)
    assert by_path["blocks.1.conv"].type == "Conv2d"
    assert by_path["head"].output_shape == (1, 2, 5, 7)
    assert by_path["head"].n_maps == 2


def test_describe_layers_of_scripted_fcn() -> None:
    infos = describe_layers(torch.jit.script(_fcn()), HooksExtractor(), (1, 4, 4))
    by_path = {i.path: i for i in infos}
    assert by_path["blocks.0"].type == "ConvModule"
    assert by_path["blocks.2.relu"].output_shape == (1, 4, 4, 4)


def test_describe_layers_lists_non_tensor_outputs_without_shape() -> None:
    infos = describe_layers(_TupleModel().eval(), HooksExtractor(), (1, 3, 3))
    assert infos == [
        LayerInfo("conv", "Conv2d", (1, 2, 3, 3), 2),
        LayerInfo("pair", "_TupleLayer", None, None),
    ]


def test_describe_layers_with_a_bad_input_shape_raises() -> None:
    with pytest.raises(ExtractionError, match="channels"):
        describe_layers(_fcn(in_channels=1), HooksExtractor(), (3, 4, 4))


def test_format_layers_is_an_aligned_table() -> None:
    infos = [
        LayerInfo("blocks.0", "ConvModule", (1, 64, 32, 32), 64),
        LayerInfo("blocks.0.conv", "Conv2d", (1, 64, 32, 32), 64),
        LayerInfo("pair", "_TupleLayer", None, None),
        LayerInfo("flat", "Flatten", (1, 10), None),
    ]
    text = format_layers(infos)
    lines = text.splitlines()
    assert len(lines) == 2 + len(infos)
    assert lines[0].split() == ["layer", "type", "output", "shape", "maps"]
    assert "1x64x32x32" in lines[2]
    assert lines[2].endswith("64")
    assert lines[4].split() == ["pair", "_TupleLayer", "-", "-"]
    assert lines[5].split() == ["flat", "Flatten", "1x10", "-"]
    # the type column starts at the same offset on every line
    types = ["ConvModule", "Conv2d", "_Tuple", "Flatten"]
    offsets = {line.index(t) for line, t in zip(lines[2:], types)}
    assert len(offsets) == 1
