"""Reading spec documents (YAML, TOML, JSON) safely: bounded size, bounded YAML aliases,
duplicate keys refused, undecodable bytes reported; every failure is a :class:`SpecError`.

Limits (documented in docs/specs.md):

* a spec file may hold at most :data:`MAX_SPEC_BYTES` bytes (1 MiB); the environment variable
  ``MAPSIM_MAX_SPEC_BYTES`` raises or lowers it;
* a YAML document may use aliases (``*name``), but the document they expand to may hold at
  most :data:`MAX_YAML_NODES` nodes (scalars, lists and mappings counted as often as they
  appear after expansion), and an alias may not refer to a node that contains it. A "billion
  laughs" document is refused before anything is built;
* a key given twice in one mapping (YAML, TOML or JSON) is an error naming the key and its
  lines.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from mapsim.errors import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPEC_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
#: default largest spec file, in bytes (``MAPSIM_MAX_SPEC_BYTES`` overrides it)
MAX_SPEC_BYTES = 1 << 20
#: largest YAML document after alias expansion, in nodes
MAX_YAML_NODES = 100_000


def max_spec_bytes() -> int:
    """The size limit of spec files: ``MAPSIM_MAX_SPEC_BYTES`` or :data:`MAX_SPEC_BYTES`."""
    value = os.environ.get("MAPSIM_MAX_SPEC_BYTES")
    if value is None:
        return MAX_SPEC_BYTES
    try:
        limit = int(value)
    except ValueError:
        raise SpecError(f"MAPSIM_MAX_SPEC_BYTES must be a number of bytes, not {value!r}"
                        ) from None
    if limit <= 0:
        raise SpecError(f"MAPSIM_MAX_SPEC_BYTES must be positive, not {limit}")
    return limit


def read_document(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON file into a mapping (format by suffix)."""
    path = Path(path)
    kind = SPEC_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise SpecError(
            f"{path}: unknown spec format {path.suffix!r}; use one of {', '.join(SPEC_SUFFIXES)}"
        )
    limit = max_spec_bytes()
    try:
        with path.open("rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as exc:
        raise SpecError(f"cannot read the spec {path}: {exc.strerror or exc}") from exc
    if len(raw) > limit:
        raise SpecError(
            f"{path}: the spec is larger than {limit:,} bytes; a spec names models, layers "
            "and images and is a few kilobytes. If this file really is a spec, raise the "
            "limit with the environment variable MAPSIM_MAX_SPEC_BYTES."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}, "
            f"line {line}); a spec is a YAML, TOML or JSON text file"
        ) from None
    return parse_document(text, kind, str(path))


def parse_document(text: str, kind: str, source: str = "<spec>") -> dict[str, Any]:
    """Parse spec text of ``kind`` ('yaml', 'toml' or 'json') into a mapping."""
    if len(text) > max_spec_bytes():
        raise SpecError(f"{source}: the spec is longer than {max_spec_bytes():,} characters "
                        "(MAPSIM_MAX_SPEC_BYTES raises the limit)")
    try:
        if kind == "yaml":
            data = _load_yaml(text, source)
        elif kind == "toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(text, object_pairs_hook=_JsonPairs(text, source))
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{source}: not valid {kind.upper()}: {exc}") from None
    except RecursionError:
        raise SpecError(f"{source}: the document is nested too deeply") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a mapping of fields, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- YAML
class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the constructor is the safe one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:  # the mapping's own keys; merged (<<) ones may repeat
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node,
                                                                          yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeConstructor reports it
                continue
            if first is not None:
                where = f"line {line}" if first == line else f"lines {first} and {line}"
                raise SpecError(
                    f"{self.name}: the key {key!r} is given twice in one mapping ({where}); "
                    "YAML would keep only the last. Remove one of them."
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str) -> Any:
    loader = _SpecLoader(text)
    loader.name = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand beyond :data:`MAX_YAML_NODES` nodes, or that
    refers to itself. Sizes are memoised per node, so the check is linear in the text."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise SpecError(f"{source}: a YAML alias refers to a node that contains it "
                            f"(line {node.start_mark.line + 1}); a spec cannot be recursive")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > MAX_YAML_NODES:
            raise SpecError(
                f"{source}: YAML aliases expand this document beyond {MAX_YAML_NODES:,} "
                f"values (at line {node.start_mark.line + 1}); a spec does not need that "
                "many. Write the values out, or use fewer nested aliases."
            )
        sizes[key] = total
        return total

    size(root)


# --------------------------------------------------------------------------- JSON
class _JsonPairs:
    """``object_pairs_hook`` that refuses duplicate keys, naming the lines they are on."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                pattern = re.compile(re.escape(json.dumps(key)) + r"\s*:")
                lines = [self.text.count("\n", 0, m.start()) + 1
                         for m in pattern.finditer(self.text)]
                where = f" (lines {', '.join(map(str, lines))})" if lines else ""
                raise SpecError(f"{self.source}: the key {key!r} is given twice in one "
                                f"object{where}; JSON would keep only the last. Remove one.")
            out[key] = value
        return out


def run_spec_document(arg: str) -> dict[str, Any]:
    """The document of ``arg`` when it names a run spec file (one with ``models``), else an
    empty mapping: commands that take a MODEL_SPEC use it to read the spec's layer labels
    and images."""
    path = Path(arg)
    if path.suffix.lower() in SPEC_SUFFIXES and path.is_file():
        data = read_document(path)
        return data if "models" in data else {}
    return {}
