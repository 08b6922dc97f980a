"""The map-pairs table as Parquet (``output.pairs: parquet``): columnar, compressed, and each
unordered pair of maps once within a network.

``pairs.csv`` (``output.pairs: true`` or ``csv``) has a row for every ordered pair (i, j) of
every similarity matrix, self pairs included. With ``parquet``, within one network (model A is
model B) a symmetric matrix gives each unordered pair once (i < j in the stacked order of the
maps) and no self pairs; a matrix that is not symmetric keeps both orders, still without self
pairs; between two networks every pair is kept. The rows travel from the table workers to the
results as Arrow IPC chunks (no CSV formatting), appended to the table's file in the partial
directory (a CSV header line, then length-prefixed chunks, so that blocks, ``--resume`` and
torchrun append and truncate it as they do CSV tables), and are written to ``pairs.parquet``
(zstd) when the results are published, in row groups of about a million rows.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mapsim.errors import SpecError
from mapsim.runner.writer import TablePart
from mapsim.types import SimilarityMatrix

#: the formats of ``output.pairs`` that write Parquet
PARQUET = "parquet"
_LENGTH = struct.Struct("<Q")
#: rows per Parquet row group (chunks are gathered up to this; memory: one row group)
ROW_GROUP = 1 << 20


def require_pyarrow(pairs: Any) -> None:
    """Refuse ``output.pairs: parquet`` before the first image when pyarrow is missing."""
    if pairs != PARQUET:
        return
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SpecError(
            "output.pairs: parquet needs pyarrow, which is not installed; install it with "
            "pip install 'mapsim[parquet]', or set output.pairs: csv"
        ) from None


def is_pairs_table(table: str) -> bool:
    """``pairs`` and its prefixed forms (``pooled/pairs``)."""
    return table == "pairs" or table.endswith("/pairs")


def unordered_rows(sim: SimilarityMatrix) -> np.ndarray | None:
    """Which rows of :func:`mapsim.tables.aggregation.pairs_table` (blocks of A, then blocks
    of B, then maps in row-major order) the Parquet table keeps; None: all of them."""
    if not sim.same_model:
        return None
    values = sim.values
    symmetric = (values.shape[0] == values.shape[1]
                 and np.allclose(values, values.T, rtol=1e-5, atol=1e-6, equal_nan=True))
    keep = []
    for ba in sim.blocks_a:
        for bb in sim.blocks_b:
            ia, ib = np.meshgrid(np.arange(ba.start, ba.stop), np.arange(bb.start, bb.stop),
                                 indexing="ij")
            keep.append(((ia < ib) if symmetric else (ia != ib)).ravel())
    return np.concatenate(keep) if keep else None


def arrow_part(table: str, frame: pd.DataFrame) -> TablePart:
    """``frame`` as a length-prefixed Arrow IPC chunk of ``table`` (strings as plain strings,
    so that every chunk has one schema)."""
    import pyarrow as pa

    frame = frame.copy(deep=False)
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.CategoricalDtype):
            frame[column] = frame[column].astype(str)
    batch = pa.Table.from_pandas(frame, preserve_index=False)
    sink = BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as stream:
        stream.write_table(batch)
    data = sink.getvalue()
    return TablePart(table, tuple(frame.columns), _LENGTH.pack(len(data)) + data)


def write_parquet(staged: Path, target: Path) -> int:
    """Turn a staged pairs file (header line, then :func:`arrow_part` chunks) into a Parquet
    file (zstd), holding one row group at a time; returns the number of rows. The staged file
    is left."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    writer = None
    pending: list[Any] = []  # chunks gathered into row groups of about ROW_GROUP rows
    tmp = target.with_name(f".{target.name}.tmp")

    def flush() -> None:
        nonlocal writer
        if not pending:
            return
        table = pa.concat_tables(pending)
        pending.clear()
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=max(table.num_rows, 1))

    try:
        with open(staged, "rb") as source:
            header = source.readline().decode("utf-8").strip()
            schema = None
            while head := source.read(_LENGTH.size):
                (length,) = _LENGTH.unpack(head)
                table = pa.ipc.open_stream(source.read(length)).read_all()
                table = table.replace_schema_metadata(None)  # no pandas metadata per chunk
                schema = schema or table.schema
                pending.append(table.cast(schema))
                rows += table.num_rows
                if sum(t.num_rows for t in pending) >= ROW_GROUP:
                    flush()
            flush()
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    if writer is None:  # no rows: the columns alone
        columns = header.split(",") if header else []
        writer = pq.ParquetWriter(tmp, pa.schema([(c, pa.string()) for c in columns]),
                                  compression="zstd")
    writer.close()
    tmp.replace(target)
    return rows
