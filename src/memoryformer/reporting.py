"""Writing result files: atomic writes, markdown and CSV tables from rows of dicts.

Shared by every result-table writer (FLOPs, evaluation, sweeps). A row is a ``dict`` from column name to value;
``columns`` picks and orders the columns. Every write goes to a temporary file in the target directory and is
renamed over the target, so a crash never leaves a half-written result behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it.

    For writers that want a file name rather than a string (e.g. ``Figure.savefig``). The temporary name keeps
    ``path``'s suffix so such writers infer the same format. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name, not mkstemp: the writer creates the file, so it gets the usual umask permissions, not 0600.
    tmp_path = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _check_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    if not columns:
        raise ValueError("columns is empty: name at least one column to write")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise KeyError(f"row {i} has no column(s) {missing}; its columns are {list(row)}")


def _markdown_cell(value: Any, spec: str | None) -> str:
    if value is None:
        return ""
    text = format(value, spec) if spec else str(value)
    # A literal "|" would split the cell; newlines would end the row.
    return text.replace("|", r"\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    formats: Mapping[str, str] | None = None,
) -> str:
    """A GitHub-flavoured markdown table of ``rows`` with a header of ``columns``, ending in a newline.

    ``formats`` maps a column to a ``format()`` spec (e.g. ``{"params": ",d", "loss": ".3f"}``); other values
    are shown with ``str``. ``None`` shows as an empty cell.
    """
    _check_columns(rows, columns)
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(row[c], formats.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv_atomic(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` as CSV with a header of ``columns`` to ``path`` atomically; ``None`` is an empty field."""
    _check_columns(rows, columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


__all__ = ["atomic_path", "markdown_table", "write_csv_atomic", "write_text_atomic"]
