"""Structural pruning through Torch-Pruning's graph: fcn, a U-Net with skip concatenations, a
python model with a residual sum; the kept channels are the original ones, parameter counts
and MACs are worked out by hand, errors are clear."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

from mapsim.errors import ModelError, SpecError  # noqa: E402
from mapsim.plugins.fcn import FCN  # noqa: E402
from mapsim.plugins.prune_criteria import CorrelationCompensated, L1, Random  # noqa: E402
from mapsim.plugins.unet import UNet  # noqa: E402
from mapsim.pruning.costs import count_macs, parameter_count  # noqa: E402
from mapsim.pruning.graph import ChainGraph, PruneGraph  # noqa: E402
from mapsim.pruning.prune import prune_model  # noqa: E402


def randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)


def hand_parameters(model: nn.Module, channels: dict) -> int:
    """Parameters from the kept channel lists alone (conv: out*in/groups*k*k + out)."""
    total = 0
    for path, m in model.named_modules():
        if path not in channels:
            continue
        out, inp = len(channels[path]["out"]), len(channels[path]["in"])
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            total += out * inp // m.groups * int(np.prod(m.kernel_size))
            total += out if m.bias is not None else 0
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * out
    return total


def check_kept_are_original(pruned: nn.Module, original: nn.Module, channels: dict) -> None:
    """Every tensor of the pruned model is the original's at the recorded channels."""
    old = dict(original.named_modules())
    for path, m in pruned.named_modules():
        if path not in channels:
            continue
        out = torch.tensor(channels[path]["out"])
        inp = torch.tensor(channels[path]["in"])
        ref = old[path]
        if isinstance(m, nn.ConvTranspose2d):
            assert torch.equal(m.weight, ref.weight[inp][:, out])
        elif isinstance(m, nn.Conv2d):
            assert torch.equal(m.weight, ref.weight[out][:, inp])
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_var, ref.running_var[out])
            assert torch.equal(m.weight, ref.weight[out])
        if getattr(m, "bias", None) is not None:
            assert torch.equal(m.bias, ref.bias[out])


def zeroed_reference(original: nn.Module, channels: dict) -> nn.Module:
    """The original with every removed input channel's weights zeroed: the same function
    as removing the maps (ReLU maps that nobody reads)."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for path, m in ref.named_modules():
            if path in channels and isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                n_in = m.in_channels
                drop = sorted(set(range(n_in)) - set(channels[path]["in"]))
                if isinstance(m, nn.ConvTranspose2d):
                    m.weight[drop] = 0
                else:
                    m.weight[:, drop] = 0
    return ref


@pytest.mark.parametrize("upsampling", ["bilinear", "transposed"])
def test_unet_with_skips_is_pruned_consistently(upsampling):
    torch.manual_seed(0)
    model = UNet(depth=2, width=4, upsampling=upsampling).eval()
    randomise_bn(model)
    images = torch.randn(3, 1, 16, 16)
    out = prune_model(model, Random(Random.Params()), images, sparsity=0.5, seed=3)
    assert set(out.kept) == {"encoder.0.0", "encoder.0.1", "encoder.1.0", "encoder.1.1",
                             "bottleneck.0", "bottleneck.1", "up.0", "up.1", "decoder.0.0",
                             "decoder.0.1", "decoder.1.0", "decoder.1.1"}
    for path, kept in out.kept.items():
        n = model.get_submodule(path).conv.out_channels if hasattr(
            model.get_submodule(path), "conv") else model.get_submodule(path).out_channels
        assert len(kept) == n - round(0.5 * n)
        assert sorted(kept + out.removed[path]) == list(range(n))
    # the skip: decoder.0.0 reads [up.0 maps, encoder.0.1 maps] -> kept input channels
    width = 4
    expect = out.kept["up.0"] + [width + k for k in out.kept["encoder.0.1"]]
    assert out.channels["decoder.0.0.conv"]["in"] == expect
    check_kept_are_original(out.model, model, out.channels)
    assert parameter_count(out.model) == hand_parameters(out.model, out.channels)
    assert parameter_count(out.model) < parameter_count(model)
    with torch.no_grad():
        x = torch.randn(2, 1, 16, 16)
        ref = zeroed_reference(model, out.channels)(x)
        torch.testing.assert_close(out.model(x), ref, atol=1e-5, rtol=1e-5)


def test_fcn_through_torch_pruning_equals_the_chain():
    torch.manual_seed(1)
    model = FCN(depth=3, width=8, kernel_size=3, conv="direct").eval()
    randomise_bn(model)
    images = torch.randn(3, 1, 12, 12)
    crit = CorrelationCompensated(CorrelationCompensated.Params())
    a = prune_model(model, crit, images, sparsity=0.5, backend="torch-pruning")
    b = prune_model(model, crit, images, sparsity=0.5, backend="chain")
    assert a.kept == b.kept and a.channels == b.channels and a.widths == b.widths
    with torch.no_grad():
        torch.testing.assert_close(a.model(images), b.model(images))
    assert parameter_count(a.model) == hand_parameters(a.model, a.channels)
    plain = prune_model(model, L1(L1.Params()), images, sparsity=0.5)  # nothing folded
    check_kept_are_original(plain.model, model, plain.channels)


def test_compensation_through_a_concatenation_is_exact_for_copies():
    # decoder.0.0 of a unet reads encoder.0.1's maps directly (through the concatenation);
    # make map 1 of encoder.0.1 an exact copy (x 2) of map 0 and prune it with compensation
    torch.manual_seed(2)
    model = UNet(depth=1, width=4).eval()
    randomise_bn(model)
    with torch.no_grad():
        block = model.encoder[0][1]
        block.conv.weight[1] = block.conv.weight[0]
        block.conv.bias[1] = block.conv.bias[0]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(block.bn, name)[1] = getattr(block.bn, name)[0]
        block.bn.weight[1] *= 2
        block.bn.bias[1] *= 2
    images = torch.randn(3, 1, 16, 16)
    crit = CorrelationCompensated(CorrelationCompensated.Params(threshold=0.9999))
    out = prune_model(model, crit, images, layers=["encoder.0.1"])
    assert out.removed == {"encoder.0.1": [0]}  # of the pair, the larger variance stays
    record = out.compensation["encoder.0.1"][0]
    assert record["partner"] == 1 and record["a"] == pytest.approx(0.5, rel=1e-5)
    assert record["into"] == ["decoder.0.0.conv"]
    assert out.uncompensated == {"encoder.0.1": ["bottleneck.0.conv"]}  # through max pooling

    def decoder_input_conv(m, x):
        seen = []
        h = m.decoder[0][0].conv.register_forward_hook(lambda _m, _i, o: seen.append(o))
        with torch.no_grad():
            m(x)
        h.remove()
        return seen[0].double()

    # the decoder conv's output only differs through the pooled path (bottleneck) and the
    # border: compare with a model whose bottleneck sees the same pruned input
    x = torch.randn(2, 1, 16, 16)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        ref_model.bottleneck[0].conv.weight[:, 0] = 0  # what pruning does on that path
    got = decoder_input_conv(out.model, x)
    ref = decoder_input_conv(ref_model, x)
    np.testing.assert_allclose(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=2e-5)


class Residual(nn.Module):
    """conv a -> bn -> relu -> conv b, plus a residual sum with conv c: b's and c's maps
    are coupled (pruning one prunes the other)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 4, 3, padding=1)
        self.c = nn.Conv2d(1, 4, 1)
        self.mid = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        z = torch.relu(self.b(y) + self.c(x))
        return self.head(torch.relu(self.mid(z)))


def test_python_model_with_a_residual_sum():
    torch.manual_seed(4)
    model = Residual().eval()
    images = torch.randn(2, 1, 10, 10)
    graph = PruneGraph(copy.deepcopy(model), images[:1])
    assert graph.candidates() == ["a", "b", "c", "mid"]
    out = prune_model(model, L1(L1.Params()), images, layers=["b"], sparsity=0.5)
    # c's maps are summed with b's: the same channels go from both, and from mid's input
    assert out.channels["c"]["out"] == out.kept["b"] == out.channels["mid"]["in"]
    assert len(out.kept["b"]) == 2
    check_kept_are_original(out.model, model, out.channels)
    assert out.widths["b"]["out_channels"] == 2 and out.widths["mid"]["in_channels"] == 2
    with torch.no_grad():
        assert out.model(images).shape == (2, 2, 10, 10)


def test_macs_by_hand():
    model = FCN(depth=2, width=4, kernel_size=3, conv="direct")
    # two 3x3 convs (1->4, 4->4) and the 1x1 head (4->2) on a 10 x 12 image
    assert count_macs(model, torch.randn(1, 1, 10, 12)) == 120 * (4 * 1 * 9 + 4 * 4 * 9 + 2 * 4)
    t = nn.Sequential(nn.ConvTranspose2d(3, 5, 2, stride=2), nn.Flatten(), nn.Linear(5 * 64, 7))
    # each of the 3*4*4 inputs goes into a 2x2 window of 5 maps; then 7 sums of 320 products
    assert count_macs(t, torch.randn(1, 3, 4, 4)) == 48 * 5 * 4 + 7 * 320
    with pytest.raises(ValueError, match="one example image"):
        count_macs(model, torch.randn(2, 1, 8, 8))


def test_unknown_layer_names_the_closest_and_the_prunable_ones():
    model = UNet(depth=1, width=2).eval()
    with pytest.raises(SpecError, match=r"'encoder\.0\.2'.*did you mean 'encoder\.0\.1'.*"
                       r"the prunable layers are encoder\.0\.0, encoder\.0\.1"):
        prune_model(model, L1(L1.Params()), torch.randn(1, 1, 8, 8), layers=["encoder.0.2"],
                    sparsity=0.5)


def test_output_layer_and_bad_sparsity_are_refused():
    model = FCN(depth=2, width=4, conv="direct").eval()
    images = torch.randn(1, 1, 8, 8)
    with pytest.raises(SpecError, match="network's output"):
        prune_model(model, L1(L1.Params()), images, layers=["head"], sparsity=0.5)
    with pytest.raises(SpecError, match=r"outside \[0, 1\)"):
        prune_model(model, L1(L1.Params()), images, sparsity=1.0)


def test_removing_every_map_disconnects():
    model = FCN(depth=2, width=4, conv="direct").eval()
    graph = PruneGraph(model, torch.randn(1, 1, 8, 8))
    layer = graph.layer("blocks.0")
    with pytest.raises(SpecError, match="disconnects the network"):
        graph.remove(layer, [0, 1, 2, 3])
    assert model.blocks[0].conv.out_channels == 4  # nothing was removed


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x, y):  # needs two inputs
        return self.conv(x) + y


def test_untraceable_models_are_refused():
    with pytest.raises(ModelError, match="Torch-Pruning cannot trace"):
        PruneGraph(Untraceable(), torch.randn(1, 1, 8, 8))
    scripted = torch.jit.script(FCN(depth=1, width=2, conv="direct"))
    with pytest.raises(ModelError, match="TorchScript"):
        PruneGraph(scripted, torch.randn(1, 1, 8, 8))
    with pytest.raises(ModelError, match="fcn-shaped"):
        ChainGraph(UNet(depth=1, width=2))
