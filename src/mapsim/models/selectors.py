"""Output selectors in layer paths: one call of a reused module, one part of a structured output.

A layer path is a module path, optionally followed by

- ``#N``: the N-th call (from 1) of a module that runs several times in one forward pass
  (``shared#2``); without it such a module is refused, since its output is ambiguous;
- selectors of one element of the output: ``[0]`` (a tuple or list item; negative indices
  count from the end), ``['logits']`` or ``["logits"]`` (a dict key, or an attribute of a
  dataclass or named tuple), and, after a bracket, ``.name`` (an attribute or key).

For example ``block[0]``, ``head['logits']``, ``encoder.3#2``, ``head[1]['aux'].maps``. The
module path ends at the first ``[`` or ``#``. Selecting from an output that does not have the
element raises :class:`~mapsim.errors.LayerOutputError` naming the output's structure.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mapsim.errors import LayerOutputError

_TOKEN = re.compile(r"""\[(-?\d+)\]|\[(['"])(.*?)\2\]|\.([A-Za-z_]\w*)""")


@dataclass(frozen=True)
class LayerPath:
    """A parsed layer path: module path, call number (None: the only call) and selectors."""

    module: str
    call: int | None
    steps: tuple[tuple[str, int | str], ...]  # ("index", 0) | ("key", "logits")

    @property
    def plain(self) -> bool:
        """True for a bare module path (no call number, no selectors)."""
        return self.call is None and not self.steps


_SUFFIX = re.compile(r"""(?:#\d+)?(?:\[(?:-?(?:0|[1-9]\d*)|'[^']*'|"[^"]*")\]|\.[A-Za-z_]\w*)*""")


def split_path(layer: str) -> tuple[str, str]:
    """``(module path, suffix)``; the suffix ('' if none) is the first ``#`` or ``[`` that
    follows a name (not a dot) from which the rest reads as ``#N`` and selectors. So the
    wildcard set of ``blocks.[0246]`` stays in the path, while ``blocks.0[1]`` selects item 1
    (a one-character set right after a name would be pointless) and ``blocks.1[02]`` is a
    set (an index has no leading zero)."""
    for i, char in enumerate(layer):
        if char in "[#" and i > 0 and layer[i - 1] != "." and _SUFFIX.fullmatch(layer, i):
            return layer[:i], layer[i:]
    return layer, ""


def module_path(layer: str) -> str:
    """The module part of a layer path (``head`` for ``head['logits']``)."""
    return split_path(layer)[0]


def parse_layer(layer: str) -> LayerPath:
    """Parse a layer path (see the module docstring).

    :raises LayerOutputError: the suffix is not ``#N`` followed by selectors.
    """
    module, rest = split_path(layer)
    call = None
    if rest.startswith("#"):
        match = re.match(r"#(\d+)", rest)
        if match is None or int(match.group(1)) < 1:
            raise LayerOutputError(layer, _syntax(layer, "'#' must be followed by a call "
                                                  "number from 1, e.g. 'block#2'"))
        call = int(match.group(1))
        rest = rest[match.end():]
    steps: list[tuple[str, int | str]] = []
    pos = 0
    while pos < len(rest):
        match = _TOKEN.match(rest, pos)
        if match is None or (match.group(4) is not None and pos == 0 and call is None):
            raise LayerOutputError(layer, _syntax(layer, f"cannot read {rest[pos:]!r}"))
        if match.group(1) is not None:
            steps.append(("index", int(match.group(1))))
        else:
            steps.append(("key", match.group(3) if match.group(3) is not None
                          else match.group(4)))
        pos = match.end()
    if not module:
        raise LayerOutputError(layer, _syntax(layer, "the module path is empty"))
    return LayerPath(module, call, tuple(steps))


def _syntax(layer: str, problem: str) -> str:
    return (f"layer {layer!r}: {problem}. A layer path is a module path, then optionally "
            "'#N' (the N-th call of a reused module) and selectors such as [0], ['key'] "
            "or .attribute.")


def describe_output(value: Any, depth: int = 2) -> str:
    """A short description of an output's structure, e.g.
    ``tuple of 2: [0] Tensor 1x8x16x16, [1] dict with keys 'logits' (Tensor 1x2)``."""
    if isinstance(value, torch.Tensor):
        return "Tensor " + "x".join(str(s) for s in value.shape)
    if depth == 0:
        return type(value).__name__
    if isinstance(value, Mapping):
        items = ", ".join(f"{k!r} ({describe_output(v, depth - 1)})"
                          for k, v in list(value.items())[:6])
        more = ", ..." if len(value) > 6 else ""
        return f"{type(value).__name__} with keys {items}{more}"
    if isinstance(value, (tuple, list)):
        fields = getattr(value, "_fields", None)  # a named tuple
        if fields:
            inner = ", ".join(f"{f!r} ({describe_output(v, depth - 1)})"
                              for f, v in zip(fields, value))
            return f"{type(value).__name__} with fields {inner}"
        inner = ", ".join(f"[{i}] {describe_output(v, depth - 1)}"
                          for i, v in enumerate(value[:6]))
        more = ", ..." if len(value) > 6 else ""
        return f"{type(value).__name__} of {len(value)}: {inner}{more}"
    if dataclasses.is_dataclass(value):
        inner = ", ".join(f"{f.name!r} ({describe_output(getattr(value, f.name), depth - 1)})"
                          for f in dataclasses.fields(value))
        return f"{type(value).__name__} (dataclass) with fields {inner}"
    return type(value).__name__


def select_output(layer: str, output: Any) -> torch.Tensor:
    """The tensor that ``layer``'s selectors pick out of a module's ``output``.

    :raises LayerOutputError: an index out of range, a missing key or attribute, or a
        result that is not a tensor; the message names the output's structure.
    """
    parsed = parse_layer(layer)
    value = output
    for kind, step in parsed.steps:
        value = _step(layer, output, value, kind, step)
    if not isinstance(value, torch.Tensor):
        hint = (" Select one tensor inside it with [index], ['key'] or .attribute, e.g. "
                f"{parsed.module}[0]." if isinstance(value, (tuple, list, Mapping))
                or dataclasses.is_dataclass(value) else
                " Choose a module inside it or after it instead.")
        raise LayerOutputError(
            layer, f"layer {layer!r} gives a {describe_output(value)}, not a tensor; mapsim "
            f"compares layers whose output is one tensor of maps.{hint}")
    return value


def _step(layer: str, output: Any, value: Any, kind: str, step: int | str) -> Any:
    where = f"the output of {module_path(layer)!r} is a {describe_output(output)}"
    if kind == "index":
        if isinstance(value, (tuple, list)):
            if -len(value) <= int(step) < len(value):
                return value[int(step)]
            raise LayerOutputError(layer, f"layer {layer!r}: index {step} is out of range "
                                   f"for a {type(value).__name__} of {len(value)}; {where}.")
        if isinstance(value, Mapping) and step in value:
            return value[step]
        raise LayerOutputError(layer, f"layer {layer!r}: [{step}] selects an item of a tuple "
                               f"or list, but the value there is a {describe_output(value)}; "
                               f"{where}.")
    if isinstance(value, Mapping):
        if step in value:
            return value[step]
        if not hasattr(value, str(step)):
            raise LayerOutputError(layer, f"layer {layer!r}: no key {step!r}; {where}.")
    fields = getattr(value, "_fields", None)
    if dataclasses.is_dataclass(value) or fields or isinstance(value, Mapping):
        if hasattr(value, str(step)):
            return getattr(value, str(step))
    raise LayerOutputError(layer, f"layer {layer!r}: no key or attribute {step!r}; {where}.")
