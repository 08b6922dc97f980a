"""The results directory: staged in a temporary folder and moved into place when complete.

Nothing a run writes is visible under the final name until the run has finished: tables are
appended in a hidden staging folder beside the target, which replaces the target in one rename
at the end (the old results, with ``overwrite``, are removed only after that). A failed run
removes its staging folder and leaves any earlier results untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from mapsim.core.errors import OutputError


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a non-empty existing directory (unless ``overwrite``) or a file in the way."""
    if target.exists() and not target.is_dir():
        raise OutputError(f"the output path {target} exists and is not a directory.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(
            f"the output directory {target} is not empty. Choose another with --out, or pass "
            "--overwrite to replace its results."
        )


class ResultsWriter:
    """Writes the tables and files of one run into a staging folder, then publishes it."""

    def __init__(self, target: str | Path, overwrite: bool = False) -> None:
        self.target = Path(target).resolve()
        self.overwrite = overwrite
        check_target(self.target, overwrite)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(
                tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent)
            )
        except OSError as exc:
            raise OutputError(f"cannot create the output directory {self.target}: {exc}") from exc
        self._headers: dict[str, list[str]] = {}

    def append(self, table: str, frame: pd.DataFrame) -> None:
        """Append rows to ``<table>.csv`` (header written once; columns must not change)."""
        job = self.append_job(table, frame)
        if job is not None:
            write_csv_part(*job)

    def append_job(self, table: str, frame: pd.DataFrame) -> tuple[Path, pd.DataFrame, bool] | None:
        """What :meth:`append` writes, for writing elsewhere (in order, per table) with
        :func:`write_csv_part`: (path, frame with the table's columns, write the header?)."""
        if frame.empty:
            return None
        path = self.staging / f"{table}.csv"
        columns = list(frame.columns)
        first = table not in self._headers
        if first:
            path.parent.mkdir(parents=True, exist_ok=True)
        known = self._headers.setdefault(table, columns)
        if known != columns:
            frame = frame.reindex(columns=known)
        return path, frame, first

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
        return sorted(self._headers)

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
        """Remove the staging folder (after a failure)."""
        shutil.rmtree(self.staging, ignore_errors=True)


def write_csv_part(path: Path, frame: pd.DataFrame, header: bool) -> None:
    """Append ``frame`` to the CSV file ``path`` (with the header when ``header``)."""
    append_bytes(*format_csv_part(path, frame, header))


def format_csv_part(path: Path, frame: pd.DataFrame, header: bool) -> tuple[Path, bytes]:
    """What :func:`write_csv_part` appends to ``path``, as bytes (formatting and appending
    can then run in different processes)."""
    return path, frame.to_csv(header=header, index=False).encode("utf-8")


def append_bytes(path: Path, data: bytes) -> None:
    """Append ``data`` to the file ``path``."""
    with open(path, "ab") as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
