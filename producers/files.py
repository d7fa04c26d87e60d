"""Replay a file (CSV, JSON lines or Parquet) as events.

Each row becomes an event document: ``id`` from ``id_column`` (else ``<file>-<row>``),
``ts`` from ``ts_column`` (else now), ``label`` from ``label_column`` (empty means
unlabelled) and ``features`` from ``feature_columns`` (default: every other column but
``event_ts``). ``file_format`` (the suffixes) and ``Columns.features_of`` (the feature columns) are
also what ``streamfit fit`` reads a file with (:mod:`pipeline.fit`).
A JSON line that already has a ``features`` field is taken as an event as it is.
Rows are not validated here: the producer validates every document with the same
validator the consumers use, and sends the rejects to the dead-letter topic. Nothing a
row holds stops the replay: an unreadable row (bad CSV quoting, a cell past the csv
module's size limit, bytes that are not UTF-8, a JSON line repeating a key) is handed on
with its error, to be dead-lettered like an invalid one.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from pipeline.events import duplicate_key

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json"}
"""A file's format by its suffix (any case), for the producer's replay and ``streamfit fit`` alike."""
RESERVED = ("event_ts",)
"""Columns never taken as features besides the id, label and ts columns: the prediction records' timestamp."""


def file_format(path: str | Path) -> str:
    """``csv``, ``json`` (JSON lines) or ``parquet``, decided by the suffix; ``ValueError`` for others.

    >>> file_format("rows.PQ"), file_format("events.ndjson")
    ('parquet', 'json')
    """
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(sorted(FORMATS))}")
    return kind


@dataclass(frozen=True)
class Columns:
    id_column: str | None = "id"
    label_column: str | None = "label"
    ts_column: str | None = "ts"
    feature_columns: tuple[str, ...] | None = None

    def features_of(self, header: Sequence[str], names: Sequence[str] | None = None) -> tuple[str, ...]:
        """The feature columns of a file with columns ``header``: ``feature_columns`` if given (each must
        be there); else ``names`` (a model's feature names) if the file has them all; else every column
        but the id, label and ts columns and ``RESERVED``.

        >>> Columns().features_of(["id", "a", "b", "label", "ts", "event_ts"])
        ('a', 'b')
        >>> Columns().features_of(["id", "b", "a", "extra", "label"], names=["a", "b"])
        ('a', 'b')
        """
        if self.feature_columns:
            missing = [c for c in self.feature_columns if c not in header]
            if missing:
                raise ValueError(f"feature column(s) not in the file: {', '.join(missing)}")
            return self.feature_columns
        if names is not None and all(name in header for name in names):
            return tuple(names)
        other = (self.id_column, self.label_column, self.ts_column, *RESERVED)
        return tuple(c for c in header if c not in other)


@dataclass(frozen=True)
class FileRow:
    """One row: the event document to validate, its original bytes, and its 1-based row number."""

    document: dict | None
    raw: bytes
    row: int
    error: str | None = None


def _number(value):
    """CSV cells are text: numbers become numbers, anything else stays text for the validator to reject."""
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return value


def _document(record: dict, features: tuple[str, ...], columns: Columns, fallback_id: str, now_ms: int) -> dict:
    ident = record.get(columns.id_column) if columns.id_column else None
    ts = _number(record.get(columns.ts_column)) if columns.ts_column else None
    return {
        "id": str(ident) if ident not in (None, "") else fallback_id,
        "ts": now_ms if ts is None else ts,
        "features": {name: _number(record.get(name)) for name in features},
        "label": _number(record.get(columns.label_column)) if columns.label_column else None,
    }


def _csv_rows(path: Path, columns: Columns) -> Iterator[tuple[dict | None, bytes, str | None]]:
    """Rows as text cells; bytes that are not UTF-8 survive as lone surrogates (so ``raw`` is exact,
    and the validator refuses them where they matter), and a row the csv module refuses is an error row."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise ValueError(f"{path}: the header repeats column(s) {', '.join(map(repr, repeated))}")
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield None, b"", f"unreadable CSV row (line {reader.line_num}): {exc}"
                continue
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="").writerow(cells)
            raw = buffer.getvalue().encode("utf-8", "surrogateescape")
            if len(cells) != len(header):
                yield None, raw, f"row has {len(cells)} cells, the header has {len(header)}"
            else:
                yield dict(zip(header, cells)), raw, None


def _jsonl_rows(path: Path) -> Iterator[tuple[dict | None, bytes, str | None]]:
    with open(path, "rb") as handle:
        for line in handle:
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield None, raw, f"not valid JSON: {exc}"
                continue
            if not isinstance(record, dict):
                yield None, raw, f"line must be a JSON object, got {type(record).__name__}"
            else:
                yield record, raw, duplicate_key(raw, record)


def _parquet_rows(path: Path) -> Iterator[tuple[dict | None, bytes, str | None]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
        for record in batch.to_pylist():
            yield record, orjson.dumps(record, default=str), None


READERS = {
    "csv": lambda p, c: _csv_rows(p, c),
    "json": lambda p, c: _jsonl_rows(p),
    "parquet": lambda p, c: _parquet_rows(p),
}


def file_rows(path: str | Path, columns: Columns = Columns()) -> Iterator[FileRow]:
    """Stream the rows of a file as event documents (or unreadable rows with their error)."""
    path = Path(path)
    reader = READERS[file_format(path)]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    features: tuple[str, ...] | None = None
    for number, (record, raw, error) in enumerate(reader(path, columns), start=1):
        if error is not None:
            yield FileRow(None, raw, number, error)
            continue
        if "features" in record and columns.feature_columns is None:
            yield FileRow(record, raw, number)
            continue
        if features is None:
            features = columns.features_of(list(record))
        yield FileRow(
            _document(record, features, columns, f"{path.stem}-{number}", int(time.time() * 1000)), raw, number
        )
