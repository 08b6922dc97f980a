"""Which maps feed what: the structure ``mapsim prune`` removes channels through.

Two implementations of one small interface (:class:`PruneGraph`, :class:`ChainGraph`):

- :class:`PruneGraph` uses **Torch-Pruning**'s dependency graph (``pip install
  'mapsim[prune]'``), traced once from an example input, so that any model it can trace -- the
  ``fcn`` chains, the ``unet`` with its skip concatenations, a user's ``python:`` model -- loses
  a channel everywhere at once: the convolution's filter, its batch norm's entry, and the input
  channel of every layer that reads the map, at the right offset inside a concatenation;
- :class:`ChainGraph` does the same for ``fcn`` chains without Torch-Pruning
  (:mod:`mapsim.pruning.surgery`).

A **prunable layer** is named by a module path: a convolution (``nn.Conv2d`` or
``nn.ConvTranspose2d``, ``groups=1``) or a module holding one (``blocks.2`` of an fcn,
``encoder.0.1`` or ``decoder.1`` of a unet), whose output maps are those of its last
convolution (after the batch norm and ReLU inside the module). The default layers are the
convolutions whose maps some other layer reads (so not the head), each named by its parent
module when that holds no other convolution.

Both keep the **original numbering** of every convolution, transposed convolution, linear
layer and batch norm: ``channels[path] = {"out": [...], "in": [...]}`` lists, for each channel
the module has now, its index in the unpruned model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mapsim.errors import ModelError, SpecError
from mapsim.pruning import surgery

CONVS = (nn.Conv2d, nn.ConvTranspose2d)
TRACKED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d)


def torch_pruning() -> Any:
    """The ``torch_pruning`` module, or a :class:`ModelError` saying how to install it."""
    try:
        import torch_pruning
    except ImportError as exc:
        raise ModelError("pruning this model needs Torch-Pruning, which is not installed: "
                         "pip install 'mapsim[prune]' (torch-pruning>=1.6,<2). Without it "
                         "only fcn chains are pruned.") from exc
    return torch_pruning


def channel_attributes(module: nn.Module) -> dict[str, Any]:
    """The attributes that size ``module``'s tensors (what a pruned model's card records)."""
    if isinstance(module, CONVS):
        return {"type": type(module).__name__, "in_channels": int(module.in_channels),
                "out_channels": int(module.out_channels), "groups": int(module.groups)}
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": int(module.in_features),
                "out_features": int(module.out_features)}
    if isinstance(module, nn.BatchNorm2d):
        return {"type": "BatchNorm2d", "num_features": int(module.num_features)}
    raise TypeError(f"no channel attributes for a {type(module).__name__}")


def _counts(module: nn.Module) -> tuple[int, int]:
    a = channel_attributes(module)
    if "out_channels" in a:
        return a["out_channels"], a["in_channels"]
    if "out_features" in a:
        return a["out_features"], a["in_features"]
    return a["num_features"], a["num_features"]


@dataclass
class Layer:
    """A prunable layer: ``module`` (hooked for the maps), its last ``conv``, the batch norm
    that directly follows the conv (or None)."""

    path: str
    module: nn.Module
    conv_path: str
    conv: nn.Module
    bn: nn.BatchNorm2d | None


@dataclass
class Consumer:
    """A layer reading the maps of a prunable layer: ``index`` maps each map (current
    numbering) to the consumer's input channel; ``direct`` when the consumer reads the maps
    themselves (through concatenation at most), which compensation needs."""

    path: str
    module: nn.Module
    index: dict[int, int]
    direct: bool = False


@dataclass
class _Base:
    model: nn.Module
    channels: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def _track(self) -> None:
        self.original = {}
        for path, m in self.model.named_modules():
            if isinstance(m, TRACKED):
                out, inp = _counts(m)
                self.original[path] = (out, inp)
                self.channels[path] = {"out": list(range(out)), "in": list(range(inp))}

    def _unknown(self, path: str) -> SpecError:
        names = self.candidates()
        close = difflib.get_close_matches(path, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return SpecError(f"layers: {path!r} is not a prunable layer of the model{hint}; the "
                         f"prunable layers are {', '.join(names)}")

    def widths(self) -> dict[str, dict[str, Any]]:
        """Channel attributes of every tracked module whose channels were removed."""
        out = {}
        for path, m in self.model.named_modules():
            if path in self.channels:
                c = self.channels[path]
                if _counts(m) != (len(c["out"]), len(c["in"])):  # pragma: no cover - sanity
                    raise RuntimeError(f"channel bookkeeping of {path} is off")
                if _counts(m) != self.original[path]:
                    out[path] = channel_attributes(m)
        return out

    def direct_check(self, layer: Layer, consumers: list[Consumer],
                     example: torch.Tensor) -> None:
        """Mark the consumers whose input channels equal the layer's maps (one forward)."""
        seen: dict[str, torch.Tensor] = {}
        handles = [layer.module.register_forward_hook(
            lambda _m, _i, o: seen.setdefault("maps", o.detach()))]
        for c in consumers:
            handles.append(c.module.register_forward_pre_hook(
                lambda _m, i, name=c.path: seen.setdefault(name, i[0].detach())))
        try:
            with torch.no_grad():
                self.model.eval()(example)
        finally:
            for h in handles:
                h.remove()
        maps = seen["maps"]
        for c in consumers:
            x = seen.get(c.path)
            c.direct = (isinstance(c.module, nn.Conv2d) and c.module.groups == 1
                        and x is not None and x.shape[-2:] == maps.shape[-2:]
                        and all(torch.equal(x[:, k], maps[:, j]) for j, k in c.index.items()))


class PruneGraph(_Base):
    """Torch-Pruning's dependency graph of ``model``, traced on ``example`` (see module docs).

    :raises ModelError: Torch-Pruning is missing or cannot trace the model.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        super().__init__(model)
        self.tp = torch_pruning()
        if isinstance(model, torch.jit.ScriptModule):
            raise ModelError("Torch-Pruning cannot trace a TorchScript model: prune the "
                             "python model (architecture or python factory) instead")
        try:
            self.dg = self.tp.DependencyGraph().build_dependency(model, example_inputs=example)
        except Exception as exc:
            raise ModelError(f"Torch-Pruning cannot trace the model ({type(model).__name__}): "
                             f"{type(exc).__name__}: {exc}. The forward pass must run on one "
                             "calibration image and return a tensor (or tensors)") from exc
        self.paths = {m: p for p, m in model.named_modules()}
        self._track()

    def _out_fn(self, conv: nn.Module) -> Any:
        return self.dg.get_pruner_of_module(conv).prune_out_channels

    def _group(self, conv: nn.Module, idxs: list[int]) -> Any:
        return self.dg.get_pruning_group(conv, self._out_fn(conv), idxs)

    def _reads(self, conv: nn.Module) -> list[Consumer]:
        group = self._group(conv, list(range(_counts(conv)[0])))
        out = []
        for item in group.items:
            m = item.dep.target.module
            if isinstance(m, (*CONVS, nn.Linear)) and m is not conv and \
                    self.dg.is_in_channel_pruning_fn(item.dep.handler):
                index = dict(zip((int(r) for r in item.root_idxs), (int(i) for i in item.idxs)))
                out.append(Consumer(self.paths[m], m, index))
        return out

    def candidates(self) -> list[str]:
        """Default prunable layers, in module order."""
        names = []
        for path, m in self.model.named_modules():
            if isinstance(m, CONVS) and m.groups == 1 and m in self.dg.module2node \
                    and self._reads(m):
                names.append(self._name_of(path))
        return names

    def _name_of(self, conv_path: str) -> str:
        parent = conv_path.rpartition(".")[0]
        if parent:
            inside = [m for m in self.model.get_submodule(parent).modules()
                      if isinstance(m, CONVS)]
            if len(inside) == 1:
                return parent
        return conv_path

    def layer(self, path: str) -> Layer:
        """The prunable layer at module ``path``.

        :raises SpecError: no such module, no convolution in it, or its maps are the output.
        """
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise self._unknown(path) from None
        convs = [(p, m) for p, m in module.named_modules() if isinstance(m, CONVS)]
        if not convs:
            raise self._unknown(path)
        sub, conv = convs[-1]
        conv_path = f"{path}.{sub}" if sub else path
        if conv.groups != 1:
            raise SpecError(f"layers: {path!r}: its convolution {conv_path} is grouped "
                            f"(groups={conv.groups}); choose a layer with groups=1")
        if conv not in self.dg.module2node:
            raise SpecError(f"layers: {path!r}: {conv_path} is not used by the model's forward "
                            "pass (Torch-Pruning did not see it run)")
        if not self._reads(conv):
            raise SpecError(f"layers: {path!r}: no layer reads its maps -- they are the "
                            "network's output, whose channels pruning must not change")
        bns = [n.module for n in self.dg.module2node[conv].outputs
               if isinstance(n.module, nn.BatchNorm2d)]
        return Layer(path, module, conv_path, conv, bns[0] if len(bns) == 1 else None)

    def consumers(self, layer: Layer) -> list[Consumer]:
        """The layers that read ``layer``'s maps, with their input channels."""
        return self._reads(layer.conv)

    def remove(self, layer: Layer, remove: list[int]) -> None:
        """Remove maps ``remove`` (current numbering) of ``layer`` everywhere, in place.

        :raises SpecError: a module would be left without channels (disconnecting the network).
        """
        group = self._group(layer.conv, sorted(remove))
        if not self.dg.check_pruning_group(group):
            raise SpecError(f"removing {len(remove)} maps of {layer.path} would leave a layer "
                            "with no channels, which disconnects the network; keep at least "
                            "one map")
        for item in group.items:
            path = self.paths.get(item.dep.target.module)
            if path not in self.channels:
                continue
            side = "out" if self.dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            drop = set(int(i) for i in item.idxs)
            kept = [c for k, c in enumerate(self.channels[path][side]) if k not in drop]
            self.channels[path][side] = kept
            if isinstance(item.dep.target.module, nn.BatchNorm2d):
                self.channels[path] = {"out": kept, "in": list(kept)}
        group.prune()


class ChainGraph(_Base):
    """The same interface for ``fcn`` chains, without Torch-Pruning."""

    def __init__(self, model: nn.Module, example: torch.Tensor | None = None) -> None:
        super().__init__(model)
        self.links = surgery.chain(model)
        self._track()

    def candidates(self) -> list[str]:
        """``blocks.0`` ... ``blocks.{depth-1}``."""
        return [p for p, _, _ in self.links]

    def layer(self, path: str) -> Layer:
        """The conv module ``path`` (``blocks.N``)."""
        names = self.candidates()
        if path not in names:
            raise self._unknown(path)
        index = names.index(path)
        _, conv, bn = self.links[index]
        return Layer(path, self.model.blocks[index], f"{path}.conv", conv,
                     bn if isinstance(bn, nn.BatchNorm2d) else None)

    def consumers(self, layer: Layer) -> list[Consumer]:
        """The next convolution, reading map k as its input channel k."""
        index = self.candidates().index(layer.path)
        nxt = surgery.next_conv(self.model, index)
        path = f"blocks.{index + 1}.conv" if index + 1 < len(self.links) else "head"
        return [Consumer(path, nxt, {k: k for k in range(nxt.in_channels)})]

    def remove(self, layer: Layer, remove: list[int]) -> None:
        """:func:`surgery.remove_maps` with the bookkeeping of the original numbering."""
        index = self.candidates().index(layer.path)
        n = layer.conv.out_channels
        keep = [k for k in range(n) if k not in set(remove)]
        consumer = self.consumers(layer)[0].path
        surgery.remove_maps(self.model, index, keep)
        for path, side in ((layer.conv_path, "out"), (f"{layer.path}.bn", "out"),
                           (consumer, "in")):
            if path in self.channels:
                self.channels[path][side] = [self.channels[path][side][k] for k in keep]
                if path.endswith(".bn"):
                    self.channels[path]["in"] = list(self.channels[path]["out"])


def make_graph(model: nn.Module, example: torch.Tensor, backend: str = "auto") -> _Base:
    """A :class:`PruneGraph` (``torch-pruning``), or a :class:`ChainGraph` (``chain``);
    ``auto``: Torch-Pruning when installed, else the chain (fcn models only)."""
    if backend == "chain":
        return ChainGraph(model)
    if backend == "auto":
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            return ChainGraph(model)
    return PruneGraph(model, example)


__all__ = ["ChainGraph", "Consumer", "Layer", "PruneGraph", "channel_attributes",
           "make_graph", "torch_pruning"]
