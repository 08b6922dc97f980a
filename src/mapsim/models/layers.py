"""Layer names: resolving a spec's layer patterns and listing a model's layers.

A layer is named by its module path, as ``model.named_modules()`` gives it (``blocks.0``,
``blocks.0.conv``, ``head``). A spec names layers with exact paths or shell-style wildcards
matched against the whole path, with the dot as the separator (like ``/`` in file paths):

- ``*`` matches within one path component, so ``blocks.*`` matches ``blocks.0`` ...
  ``blocks.9`` but not ``blocks.0.conv``;
- ``**`` matches across components, so ``blocks.**`` also matches ``blocks.0.conv`` and
  ``**.conv`` every module called ``conv``;
- ``?`` matches one character other than a dot; ``[...]`` one character of a set
  (``blocks.[0246]``).

A path may end in a call number and output selectors (:mod:`mapsim.models.selectors`):
``encoder.1#2``, ``head['logits']``, ``blocks.*[0]`` (the pattern part is matched as above and
the suffix kept for every match).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from mapsim.errors import LayerNotFoundError, LayerNotRunError, LayerOutputError
from mapsim.models.selectors import parse_layer, split_path
from mapsim.api import Extractor


def layer_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a layer wildcard: ``**`` any characters, ``*`` and ``?`` no dot, ``[..]`` a set."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif pattern[i] == "[":
            j = i + 1
            j += pattern[j:j + 1] == "!"
            j += pattern[j:j + 1] == "]"
            close = pattern.find("]", j)
            if close == -1:  # no closing bracket: a literal "["
                out.append(re.escape("["))
                i += 1
                continue
            body = pattern[i + 1:close]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = close + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def resolve_layers(available: list[str], patterns: str | list[str], model_name: str) -> list[str]:
    """The layer paths of ``available`` that match ``patterns``, in model order.

    :param available: every layer path of the model, in model order.
    :param patterns: one pattern or a list; each is an exact path or a wildcard (see the
        module docstring: ``*`` stays within a path component, ``**`` crosses dots).
    :param model_name: the model's name in the spec, used in error messages.
    :raises LayerNotFoundError: a pattern matches no layer (the message lists the closest paths).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    selected: set[str] = set()
    with_selectors: list[str] = []  # paths with '#N' or selectors, kept after their module
    for pattern in patterns:
        if pattern in available:
            selected.add(pattern)
            continue
        base, suffix = split_path(pattern)
        if suffix:
            parse_layer(pattern)  # a clear error for a bad suffix
            with_selectors += [p + suffix for p in resolve_layers(available, base, model_name)]
            continue
        regex = layer_pattern(pattern)
        matches = [path for path in available if regex.fullmatch(path)]
        if not matches:
            raise LayerNotFoundError(
                "layer",
                pattern,
                available,
                hint=(
                    f"No layer of model {model_name!r} matches {pattern!r}. Use exact module "
                    "paths or wildcards (* within a name, ** across dots, ? [..]); `mapsim layers` lists a model's layers."
                ),
            )
        selected.update(matches)
    order = {path: i for i, path in enumerate(available)}
    out = [(order[path], 0, path) for path in available if path in selected]
    out += [(order[split_path(p)[0]], 1 + i, p) for i, p in enumerate(dict.fromkeys(
        with_selectors))]
    return [path for *_, path in sorted(out)]


@dataclass
class LayerInfo:
    """One layer of a model: its path, module type and output for a given input shape.

    ``output_shape`` is None when the output is not a single tensor; ``n_maps`` is the number
    of maps (``output_shape[1]``) for 4-D outputs, else None.
    """

    path: str
    type: str
    output_shape: tuple[int, ...] | None
    n_maps: int | None


def describe_layers(
    model: nn.Module, extractor: Extractor, input_shape: tuple[int, int, int]
) -> list[LayerInfo]:
    """Every layer of ``model`` with its output shape for one input of ``input_shape``.

    Runs a forward pass of zeros of shape ``(1, C, H, W)`` through ``extractor``. A layer
    whose output is not one tensor is listed with ``output_shape=None``.

    :param input_shape: ``(channels, height, width)`` of one image.
    """
    channels, height, width = input_shape
    names = extractor.layer_names(model)
    modules = dict(model.named_modules())
    inputs = torch.zeros(1, channels, height, width)
    pending = list(names)
    outputs: dict[str, torch.Tensor] = {}
    # A layer that cannot be captured as one tensor is dropped and the pass repeated; CNNs
    # rarely have any, so this is normally a single forward pass.
    while pending:
        try:
            outputs = extractor.extract(model, pending, inputs)
            break
        except LayerOutputError as exc:
            if exc.layer not in pending:
                raise
            pending.remove(exc.layer)
        except LayerNotRunError as exc:  # containers (nn.ModuleList) are never called
            if not set(exc.layers) & set(pending):
                raise
            pending = [p for p in pending if p not in exc.layers]
    infos = []
    for name in names:
        output = outputs.get(name)
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        n_maps = shape[1] if shape is not None and len(shape) == 4 else None
        module = modules.get(name)
        type_name = _type_name(module) if module is not None else "?"
        infos.append(LayerInfo(name, type_name, shape, n_maps))
    return infos


def _type_name(module: nn.Module) -> str:
    """The module's class name; for TorchScript modules the original class name."""
    if isinstance(module, torch.jit.ScriptModule):
        qualified = getattr(module, "original_name", None)
        if isinstance(qualified, str) and qualified:
            return qualified
    return type(module).__name__


def format_layers(infos: list[LayerInfo]) -> str:
    """An aligned text table of layers (path, type, output shape, maps) for the terminal."""
    header = ("layer", "type", "output shape", "maps")
    rows = [
        (
            info.path,
            info.type,
            "x".join(str(d) for d in info.output_shape) if info.output_shape else "-",
            str(info.n_maps) if info.n_maps is not None else "-",
        )
        for info in infos
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        left = [cell.ljust(w) for cell, w in zip(row[:3], widths[:3])]
        return "  ".join([*left, row[3].rjust(widths[3])]).rstrip()

    separator = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), separator, *(line(row) for row in rows)])
