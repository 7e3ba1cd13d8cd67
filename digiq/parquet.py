"""Reading Parquet inputs: a damaged file becomes one DigiqError naming it (and the damaged column), never a traceback.

    table = read_table(path, columns)   # the columns, fully decoded
    schema = read_schema(path)          # the footer only

A truncated file has lost its footer (which holds the schema): the error names the file. When the footer
is intact but pages are damaged, the columns are read one by one to name the damaged one.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from digiq.errors import DigiqError, first_line

_ERRORS = (pa.ArrowException, OSError)


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except _ERRORS as exc:
        raise diagnose(Path(path), columns, exc) from None


def read_schema(path: str | Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except _ERRORS as exc:
        raise diagnose(Path(path), None, exc) from None


def diagnose(path: Path, columns: list[str] | None, exc: BaseException) -> DigiqError:
    """Why ``path`` cannot be read: missing, truncated / not Parquet, a missing column, or a damaged column."""
    if not path.is_file():
        return DigiqError("no such file", file=path)
    try:
        file = pq.ParquetFile(path)
    except _ERRORS as footer:
        return DigiqError(f"truncated or not a Parquet file ({first_line(footer)})", file=path)
    names = file.schema_arrow.names
    for name in columns or names:
        if name not in names:
            return DigiqError("missing column", file=path, field=name)
        try:
            file.read(columns=[name])
        except _ERRORS as damaged:
            return DigiqError(f"damaged column data ({first_line(damaged)})", file=path, field=name)
    return DigiqError(f"unreadable Parquet file ({first_line(exc)})", file=path)
