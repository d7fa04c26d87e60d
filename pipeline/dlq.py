"""Dead-letter records: every rejected message, with why and where it came from, bounded in size.

Value shape on ``events.dlq``: ``{"stage", "error", "topic", "partition", "offset", "raw",
"raw_encoding", "raw_size", "raw_sha256", "raw_truncated", "failed_at"}``. ``raw`` holds the
original bytes -- their first ``max_raw_bytes`` when the message is longer (``raw_truncated``)
-- as UTF-8 text when they decode and JSON escaping at most doubles them, base64 otherwise
(``raw_encoding`` says which); ``raw_size`` and ``raw_sha256`` describe the whole message. The
bound matters: a record Kafka refuses (1 MB by default) would fail its micro-batch forever, and
escaping alone turns 200 KB of control characters into 1.2 MB. With ``max_raw_bytes`` at most
:data:`MAX_RAW_BYTES_LIMIT` and ``error``/``topic`` cut to :data:`MAX_TEXT_CHARS`, every record is
under :data:`RECORD_LIMIT` bytes, whatever the input.

>>> import orjson
>>> record = orjson.loads(dead_letter("predict", "not valid JSON", b"\\x01" * 100_000, "events", 0, 7, 1024))
>>> record["raw_encoding"], record["raw_size"], record["raw_truncated"], len(original_bytes(record))
('base64', 100000, True, 1024)
"""

from __future__ import annotations

import base64
import hashlib
import time

import orjson

MAX_RAW_BYTES = 16 * 1024
"""Default bytes of the original message a record keeps (setting ``dlq_max_raw_bytes``)."""

MAX_RAW_BYTES_LIMIT = 24 * 1024
"""The largest ``max_raw_bytes`` that keeps a record under :data:`RECORD_LIMIT`."""

MAX_TEXT_CHARS = 512
"""``error`` and ``topic`` are cut to this many characters (6 bytes each at worst, escaped)."""

RECORD_LIMIT = 64 * 1024
"""Every record's encoded size is below this: raw <= 2 * 24 KiB, error and topic <= 3 KiB each, the rest < 1 KiB."""


def dead_letter(
    stage: str,
    error: str,
    raw: bytes | None,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    max_raw_bytes: int = MAX_RAW_BYTES,
) -> bytes:
    """The JSON value of one DLQ record (under :data:`RECORD_LIMIT` bytes)."""
    if not 0 <= max_raw_bytes <= MAX_RAW_BYTES_LIMIT:
        raise ValueError(f"max_raw_bytes must be in [0, {MAX_RAW_BYTES_LIMIT}], got {max_raw_bytes}")
    raw = bytes(raw or b"")
    kept = raw[:max_raw_bytes]
    text = _utf8_prefix(kept, truncated=len(kept) < len(raw))
    if text is not None and len(orjson.dumps(text)) <= 2 * len(kept) + 2:
        shown, encoding = text, "utf8"
    else:
        shown, encoding = base64.b64encode(kept).decode("ascii"), "base64"
    return orjson.dumps(
        {
            "stage": stage,
            "error": _bounded(error),
            "topic": None if topic is None else _bounded(topic),
            "partition": partition,
            "offset": offset,
            "raw": shown,
            "raw_encoding": encoding,
            "raw_size": len(raw),
            "raw_sha256": hashlib.sha256(raw).hexdigest(),
            "raw_truncated": len(kept) < len(raw),
            "failed_at": int(time.time() * 1000),
        }
    )


def original_bytes(record: dict) -> bytes:
    """The original message bytes kept in a parsed DLQ record: all of them unless ``raw_truncated``
    (then a prefix; ``raw_size`` and ``raw_sha256`` describe the whole)."""
    if record.get("raw_encoding") == "base64":
        return base64.b64decode(record["raw"])
    return record["raw"].encode("utf-8")


def _utf8_prefix(kept: bytes, truncated: bool) -> str | None:
    """``kept`` as text, if it is UTF-8; a cut prefix may lose the last character's first 1-3 bytes."""
    for cut in range(4 if truncated and kept else 1):
        try:
            return kept[: len(kept) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def _bounded(text: str) -> str:
    """At most :data:`MAX_TEXT_CHARS` characters, lone surrogates (undecodable file bytes) spelled out."""
    text = str(text)
    if len(text) > MAX_TEXT_CHARS:
        text = text[: MAX_TEXT_CHARS - 30] + f"... ({len(text)} characters in all)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
