"""Atomic file writes, with one permission policy for every file mapsim writes.

A file is written to a temporary name in the folder of its target (``.<name>.<random>.tmp``,
so the rename never crosses file systems), flushed and fsync'ed, then renamed over the target
with :func:`os.replace`; the folder is fsync'ed after the rename where the system allows it.
A reader, or a kill at any moment, sees either the old file or the complete new one, never
half of one. When the write fails (an exception, a full disk, Ctrl-C) the temporary file is
removed and the target is left as it was. Missing parent folders are created.

Permission policy: a written file gets the mode of a normally created file, ``0o666`` less
the process's umask (``0o644`` under the usual umask 022, ``0o664`` under 002), whatever the
mode of the file it replaces. The temporary file is created with ``os.open(..., 0o666)`` so
the kernel applies the umask (and a folder's default ACL) itself: no private ``0o600`` file
as :func:`tempfile.mkstemp` makes, no umask read-and-restore (which is not thread-safe).
Results, pictures, data sets and checkpoints are all meant to be shared like the files any
other tool writes; a user who wants them private sets a stricter umask.

:func:`atomic_path` is the same machinery for writers that need a file name rather than bytes
(``safetensors.torch.save_file``, an image library): they write to the temporary path it
yields, and it is published when the ``with`` block ends without an exception.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["FILE_MODE", "atomic_path", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text"]

#: the mode a new file is created with, before the umask (as ``open()`` does)
FILE_MODE = 0o666


def _create_temporary(path: Path, suffix: str) -> tuple[int, Path]:
    """A new, empty file beside ``path`` (exclusive create, mode FILE_MODE less the umask):
    its open descriptor and path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(tmp, flags, FILE_MODE), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable, where folders can be opened and synced."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows, or a folder we may not open
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_folder(path.parent)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the file to; on a normal exit it is
    fsync'ed and renamed to ``path``, on an exception removed (``path`` untouched).

    The temporary file already exists (empty, with the policy's mode) when the block starts.
    A writer may rewrite it or replace it with a file of its own; whatever mode that file has
    (``safetensors`` makes 0o600), it gets the policy's mode back before it is published.
    ``suffix`` ends its name, for writers that pick a format by extension (e.g. ``".png"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path, suffix)
    try:
        policy = stat.S_IMODE(os.fstat(fd).st_mode)  # FILE_MODE as the kernel applied the umask
    finally:
        os.close(fd)
    try:
        yield tmp
        if stat.S_IMODE(os.stat(tmp).st_mode) != policy:
            # the writer made its own file (safetensors writes 0o600): back to the policy
            os.chmod(tmp, policy)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write(path: str | Path, fill: Callable[[Any], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    _write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, encoded (UTF-8 by default) with no newline
    translation: the bytes are the same on every system."""
    _write(path, lambda handle: handle.write(text.encode(encoding)))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as JSON (indented by ``indent``, a final newline) to ``path`` atomically.
    ``default``: as :func:`json.dumps`' (e.g. ``str`` for paths and dates). The document is
    encoded before anything is written, so an object JSON cannot hold leaves no file."""
    text = json.dumps(obj, indent=indent, default=default) + "\n"
    atomic_write_text(path, text)
