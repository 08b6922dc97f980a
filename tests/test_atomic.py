"""mapsim.io.atomic: atomic writes with one permission policy (0o666 less the umask)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from mapsim.io import atomic
from mapsim.io.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes and umask")


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask  # umask(value) sets it
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_content_of_bytes_text_and_json(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01\xff")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01\xff"
    atomic_write_text(tmp_path / "b.txt", "é\nline two\n")
    assert (tmp_path / "b.txt").read_bytes() == "é\nline two\n".encode()  # no \r\n anywhere
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2.5], "y": None})
    assert (tmp_path / "c.json").read_text() == json.dumps({"x": [1, 2.5], "y": None},
                                                           indent=2) + "\n"
    atomic_write_json(tmp_path / "d.json", {"p": Path("x")}, default=str, indent=None)
    assert json.loads((tmp_path / "d.json").read_text()) == {"p": "x"}
    assert leftovers(tmp_path) == []


def test_replaces_an_existing_file_and_creates_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "f.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert leftovers(target.parent) == []


@posix_only
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600),
                                            (0o000, 0o666)])
def test_mode_is_that_of_a_normal_file_under_the_umask(tmp_path: Path, umask, mask: int,
                                                       expected: int) -> None:
    umask(mask)
    atomic_write_bytes(tmp_path / "a", b"x")
    atomic_write_text(tmp_path / "b", "x")
    atomic_write_json(tmp_path / "c", {})
    with atomic_path(tmp_path / "d.png", suffix=".png") as tmp:
        tmp.write_bytes(b"png")  # a writer that opens the path itself
    with open(tmp_path / "normal", "w") as handle:  # what open() gives, for comparison
        handle.write("x")
    assert mode(tmp_path / "normal") == expected
    for name in "abcd":
        assert mode(tmp_path / name if name != "d" else tmp_path / "d.png") == expected, name


@posix_only
def test_a_replaced_file_gets_the_policy_mode_not_the_old_one(tmp_path: Path, umask) -> None:
    umask(0o022)
    target = tmp_path / "f"
    target.write_text("old")
    target.chmod(0o600)
    atomic_write_text(target, "new")
    assert mode(target) == 0o644 and target.read_text() == "new"


def test_failed_data_write_leaves_the_target_untouched_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("before")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "\udcff")  # a lone surrogate cannot be encoded
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})  # not JSON: nothing is written
    assert target.read_text() == "before"
    assert leftovers(tmp_path) == []
    atomic_write_bytes(tmp_path / "new", b"x")
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "absent", 3)  # type: ignore[arg-type]
    assert not (tmp_path / "absent").exists()
    assert leftovers(tmp_path) == []


def test_failed_fsync_or_rename_leaves_the_target_untouched(tmp_path: Path,
                                                            monkeypatch) -> None:
    target = tmp_path / "f.txt"
    target.write_text("before")

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", broken)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "after")
    monkeypatch.undo()
    monkeypatch.setattr(atomic.os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "after")
    assert target.read_text() == "before"
    assert leftovers(tmp_path) == []


def test_atomic_path_publishes_on_success_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "w.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists() and tmp != target
        tmp.write_bytes(b"one")
    assert target.read_bytes() == b"one"

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise Boom
    assert target.read_bytes() == b"one"
    assert leftovers(tmp_path) == []


@posix_only
def test_atomic_path_gives_a_writers_own_file_the_policy_mode(tmp_path: Path, umask) -> None:
    """A writer that replaces the temporary file with one of its own (as safetensors does,
    mode 0o600) still publishes a file with the policy's mode."""
    import tempfile

    umask(0o022)
    with atomic_path(tmp_path / "w.bin") as tmp:
        fd, own = tempfile.mkstemp(dir=tmp_path)  # 0o600
        os.write(fd, b"data")
        os.close(fd)
        os.replace(own, tmp)
    assert mode(tmp_path / "w.bin") == 0o644
    assert (tmp_path / "w.bin").read_bytes() == b"data"
    assert leftovers(tmp_path) == []


@posix_only
def test_every_writer_follows_the_policy(tmp_path: Path, umask) -> None:
    """The former copies (runner results, pictures, data sets, checkpoints) all go through
    mapsim.io.atomic now: their files get 0o666 less the umask (checkpoints were 0o600)."""
    import numpy as np
    import torch

    from mapsim.data_cli import atomic_write_json as data_json
    from mapsim.data_cli import atomic_write_png
    from mapsim.plots.io import atomic_write_bytes as plots_bytes
    from mapsim.runner.writer import atomic_write_text as runner_text
    from mapsim.training import checkpoint

    umask(0o002)
    runner_text(tmp_path / "run.json", "{}")
    plots_bytes(tmp_path / "p.png", b"png")
    data_json(tmp_path / "synth.json", {"a": 1})
    atomic_write_png(tmp_path / "im.png", np.zeros((4, 4), np.uint8))
    model = torch.nn.Conv2d(1, 2, 3)
    checkpoint.save_best(tmp_path / "ck", model, {"epoch": 1})
    checkpoint.save_last(tmp_path / "ck", model, torch.optim.SGD(model.parameters(), lr=0.1),
                         {"epoch": 1})
    written = [tmp_path / n for n in ("run.json", "p.png", "synth.json", "im.png")]
    written += sorted((tmp_path / "ck").iterdir())
    assert len(written) == 8
    for path in written:
        assert mode(path) == 0o664, path
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "ck") == []
    assert checkpoint.read_document(tmp_path / "ck" / "best.safetensors") == {"epoch": 1}
    state = checkpoint.load_last(tmp_path / "ck")[0]
    assert torch.equal(state["weight"], model.weight.detach())
