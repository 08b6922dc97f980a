"""The results directory: staged in a temporary folder and moved into place when complete.

Nothing a run writes is visible under the final name until the run has finished: tables are
appended in a hidden staging folder beside the target, which replaces the target in one rename
at the end (the old results, with ``overwrite``, are removed only after that). A failed run
removes its staging folder and leaves any earlier results untouched.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mapsim.errors import OutputError
# one atomic writer for the whole package; still importable from here for older imports
from mapsim.io.atomic import atomic_write_text  # noqa: F401


def check_target(target: Path, overwrite: bool, protect: Sequence[Path] = ()) -> None:
    """Refuse a file in the way, a non-empty directory without ``overwrite``, and, with it,
    a directory that is not mapsim results (no mapsim ``run.json``) or that holds a path of
    ``protect`` (the run's own inputs, such as the spec's folder)."""
    if target.exists() and not target.is_dir():
        raise OutputError(f"the output path {target} exists and is not a directory.")
    if not target.is_dir():
        return
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    if not overwrite:
        raise OutputError(
            f"the output directory {target} is not empty. Choose another with --out, or pass "
            "--overwrite to replace its results."
        )
    for path in protect:
        path = Path(path).resolve()
        if path == target or target in path.parents:
            raise OutputError(
                f"--overwrite would delete {target}, which holds {path}, an input of this run. "
                "Write the results to another folder with --out."
            )
    if not is_results_dir(target):
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)"
                                          if len(entries) > 5 else "")
        raise OutputError(
            f"--overwrite only replaces mapsim results, but {target} has no mapsim run.json "
            f"or evaluation.json (it holds {shown}). Nothing was deleted; write the results to another folder "
            "with --out."
        )


#: the record a mapsim results directory holds: of a run, of an evaluation
RECORDS = ("run.json", "evaluation.json")


def is_results_dir(folder: Path) -> bool:
    """Whether ``folder`` holds mapsim results (a ``run.json`` or ``evaluation.json`` that
    mapsim wrote)."""
    for name in RECORDS:
        try:
            info = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and "mapsim_version" in info:
            return True
    return False


class TableFiles:
    """CSV tables in one folder, appended part by part (header written with the first part)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        #: table -> its columns, in the order the tables were first written
        self.headers: dict[str, list[str]] = {}

    def append(self, table: str, frame: pd.DataFrame) -> None:
        """Append rows to ``<table>.csv`` (a frame whose columns differ from the table's is
        reindexed to them)."""
        if frame.empty:
            return
        known = self.headers.get(table)
        if known is not None and known != list(frame.columns):
            frame = frame.reindex(columns=known)
        self.append_part(format_part(table, frame))

    def append_part(self, part: TablePart) -> None:
        """Append formatted rows to their table."""
        path = self.folder / f"{part.table}.csv"
        known = self.headers.get(part.table)
        data = part.rows
        if known is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.headers[part.table] = list(part.columns)
            data = header_line(part.columns) + data
        elif known != list(part.columns):
            raise OutputError(
                f"table {part.table!r}: rows with the columns {list(part.columns)} follow rows "
                f"with the columns {known}; every part of a table needs the same columns (an "
                "aggregator plugin must return the same columns for every image)"
            )
        append_bytes(path, data)

    def append_file(self, table: str, columns: list[str], path: Path) -> None:
        """Append the rows of another folder's ``<table>.csv`` (its header line skipped),
        copied by the kernel where it can (never held in memory whole)."""
        with open(path, "rb") as source:
            start = len(source.readline())
            size = os.fstat(source.fileno()).st_size - start
            if size <= 0:
                return
            self.append_part(TablePart(table, tuple(columns), b""))  # header, or column check
            with open(self.folder / f"{table}.csv", "r+b") as target:
                target.seek(0, os.SEEK_END)
                copy_range(source, start, size, target)


def copy_range(source: Any, offset: int, size: int, target: Any) -> None:
    """Copy ``size`` bytes of ``source`` from ``offset`` to ``target``'s position."""
    try:
        while size > 0:
            done = os.copy_file_range(source.fileno(), target.fileno(), size, offset)
            if done == 0:
                break
            offset, size = offset + done, size - done
    except (AttributeError, OSError):  # no copy_file_range here, or not between these files
        pass
    source.seek(offset)
    while size > 0:
        chunk = source.read(min(size, 1 << 20))
        if not chunk:
            break
        target.write(chunk)
        size -= len(chunk)


class ResultsWriter:
    """Writes the tables and files of one run into a staging folder, then publishes it.

    ``files``: tables already staged, to add to (default: a new hidden folder beside the
    target).
    """

    def __init__(self, target: str | Path, overwrite: bool = False,
                 files: TableFiles | None = None) -> None:
        self.target = Path(target).resolve()
        self.overwrite = overwrite
        check_target(self.target, overwrite)
        #: tables staged elsewhere (a run's partial folder), which this writer adds to; that
        #: folder's owner removes it after a failure
        self.adopted = files is not None
        if files is None:
            try:
                self.target.parent.mkdir(parents=True, exist_ok=True)
                files = TableFiles(Path(tempfile.mkdtemp(
                    prefix=f".{self.target.name}.partial-", dir=self.target.parent)))
            except OSError as exc:
                raise OutputError(f"cannot create the output directory {self.target}: {exc}") \
                    from exc
        self.files = files
        self.staging = files.folder

    def append(self, table: str, frame: pd.DataFrame) -> None:
        """Append rows to ``<table>.csv`` (header written once; a frame whose columns differ
        from the table's is reindexed to them)."""
        self.files.append(table, frame)

    def append_part(self, part: TablePart) -> None:
        """Append formatted rows to their table (header written with the first part)."""
        self.files.append_part(part)

    def write_table(self, table: str, frame: pd.DataFrame) -> None:
        """Write ``<table>.csv`` whole."""
        path = self.staging / f"{table}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)

    def write_json(self, name: str, data: Any) -> None:
        """Write ``name`` as indented JSON."""
        (self.staging / name).write_text(json.dumps(data, indent=2, default=str) + "\n")

    def tables(self) -> list[str]:
        """Names of the tables written so far."""
        return sorted(self.files.headers)

    def publish(self) -> Path:
        """Move the staged results to the target; returns the target."""
        old = None
        if self.target.exists():
            check_target(self.target, self.overwrite)
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.staging, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        """Remove the staging folder (after a failure), unless it was adopted."""
        if not self.adopted:
            shutil.rmtree(self.staging, ignore_errors=True)


@dataclass(frozen=True)
class TablePart:
    """Rows of one table formatted as CSV, without the header."""

    table: str
    columns: tuple[str, ...]
    rows: bytes


def format_part(table: str, frame: pd.DataFrame) -> TablePart:
    """``frame`` as a :class:`TablePart` of ``table`` (formatting and appending can then run
    in different processes)."""
    return TablePart(table, tuple(frame.columns),
                     frame.to_csv(header=False, index=False).encode("utf-8"))


def header_line(columns: tuple[str, ...] | list[str]) -> bytes:
    """The CSV header line of a table with ``columns``."""
    return pd.DataFrame(columns=list(columns)).to_csv(index=False).encode("utf-8")


def append_bytes(path: Path, data: bytes) -> None:
    """Append ``data`` to the file ``path``; a full disk is an :class:`OutputError` saying
    how much was needed and where."""
    try:
        with open(path, "ab") as handle:
            handle.write(data)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full(path, len(data)) from None
        raise


def disk_full(path: Path, needed: int) -> OutputError:
    """The error of a write of ``needed`` bytes to ``path`` that found the disk full."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    return OutputError(
        f"no space left on the device of {Path(path).parent} while writing {needed:,} bytes "
        f"to {Path(path).name} ({free}). Free some space or write elsewhere with --out; the "
        "finished blocks are kept for --resume."
    )
