"""One writer per results directory: an OS file lock beside it, held for the whole run.

The lock is ``.<results name>.lock`` beside the results, locked with ``flock`` (exclusive,
non-blocking). The kernel releases it when the process ends, however it ends, so a killed
run never leaves a stale lock; the file itself is removed on a clean release. It records the
holder's PID, host, start time and command line, which a second run into the same directory
reports when it refuses to start. ``--resume`` and ``--overwrite`` take the same lock.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from mapsim.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no lock (documented)
    fcntl = None  # type: ignore[assignment]


def results_target(path: str | Path) -> Path:
    """The absolute results directory for ``path``; refuses paths that cannot be one (the
    root folder, whose name is empty)."""
    target = Path(path).expanduser().resolve()
    if not target.name:
        raise OutputError(f"cannot write results into {target}: the results need a folder of "
                          "their own; name one with --out (e.g. --out results/run1)")
    return target


def lock_path(target: Path) -> Path:
    """The lock file of the results directory ``target``."""
    return target.with_name(f".{target.name}.lock")


class RunLock:
    """Exclusive lock of a results directory (use as a context manager)."""

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.path = lock_path(self.target)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise an :class:`OutputError` naming the run that holds it."""
        if fcntl is None:  # pragma: no cover
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the folder {self.path.parent} for the results "
                              f"{self.target}: {exc.strerror or exc}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create the lock file {self.path}: "
                                  f"{exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputError(
                    f"another mapsim run is writing {self.target}{holder}. Wait for it to "
                    "finish or stop it, or write to another folder with --out."
                ) from None
            # the holder before us may have removed the file after we opened it: then this
            # lock is on a file nobody else sees; take the lock of the file at the path
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }).encode())
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        return ""
    if not info.get("pid"):
        return ""
    return (f" (PID {info['pid']} on {info.get('host', '?')}, started "
            f"{info.get('started', '?')}: {info.get('command', '')})")
