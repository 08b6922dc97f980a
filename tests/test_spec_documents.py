"""Hostile or mistaken spec files: size, bytes, aliases, duplicate keys (mapsim.spec.documents).
Each is refused with a message naming the problem, before anything large is built."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import pytest

from mapsim.errors import SpecError
from mapsim.spec.documents import MAX_YAML_NODES, parse_document, read_document

LAUGHS = "\n".join(
    [f"l0: &l0 [{', '.join(['lol'] * 10)}]"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
) + "\n"


def test_billion_laughs_is_refused_before_it_is_built():
    tracemalloc.start()
    with pytest.raises(SpecError, match=f"beyond {MAX_YAML_NODES:,} values"):
        parse_document(LAUGHS, "yaml", "laughs.yaml")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20  # 10^9 strings would take gigabytes


def test_aliases_inside_free_form_kwargs_are_bounded_too():
    text = ("models:\n  m:\n    python: pkg:factory\n    kwargs:\n"
            + "".join(f"      {line}\n" for line in LAUGHS.splitlines()))
    with pytest.raises(SpecError, match="aliases expand"):
        parse_document(text, "yaml", "spec.yaml")


def test_small_aliases_and_merge_keys_still_work():
    data = parse_document("base: &b {depth: 2, width: 4}\nm:\n  <<: *b\n  width: 8\n"
                          "n: *b\n", "yaml")
    assert data == {"base": {"depth": 2, "width": 4}, "m": {"depth": 2, "width": 8},
                    "n": {"depth": 2, "width": 4}}


def test_a_recursive_alias_is_refused():
    with pytest.raises(SpecError, match="refers to a node that contains it"):
        parse_document("a: &a [1, *a]\n", "yaml")


@pytest.mark.parametrize("kind, text, lines", [
    ("yaml", "name: a\nmodels: {}\nlayers: {}\nmodels: {x: 1}\n", "lines 2 and 4"),
    ("yaml", "models:\n  a: {seed: 1, seed: 2}\n", "line 2"),
    ("json", '{"name": "a",\n "models": {},\n "models": {}}', "lines 2, 3"),
    ("toml", 'name = "a"\nname = "b"\n', "line 2"),
])
def test_a_repeated_key_is_an_error_with_its_lines(kind, text, lines):
    with pytest.raises(SpecError) as info:
        parse_document(text, kind, f"spec.{kind}")
    message = str(info.value)
    assert lines in message
    assert "twice" in message or "overwrite" in message.lower()


def test_random_bytes_are_not_utf8_text(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"name: x\n" + bytes(range(128, 256)))
    with pytest.raises(SpecError, match=r"not UTF-8 text \(byte 0x80 at offset 8, line 2\)"):
        read_document(path)


def test_the_size_limit_is_documented_and_can_be_raised(tmp_path, monkeypatch):
    path = tmp_path / "big.yaml"
    path.write_text("name: big\n# " + "x" * (2 << 20) + "\n")
    with pytest.raises(SpecError, match="larger than 1,048,576 bytes.*MAPSIM_MAX_SPEC_BYTES"):
        read_document(path)
    monkeypatch.setenv("MAPSIM_MAX_SPEC_BYTES", str(4 << 20))
    assert read_document(path) == {"name": "big"}
    monkeypatch.setenv("MAPSIM_MAX_SPEC_BYTES", "lots")
    with pytest.raises(SpecError, match="number of bytes"):
        read_document(path)


@pytest.mark.parametrize("name, content", [
    ("laughs.yaml", LAUGHS.encode()),
    ("random.yaml", os.urandom(4096)),
    ("dup.yaml", b"name: a\nname: b\n"),
    ("big.json", b'{"name": "' + b"x" * (1 << 21) + b'"}'),
])
def test_the_command_line_gives_a_message_not_a_traceback(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "mapsim", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    assert str(path) in done.stderr + done.stdout
