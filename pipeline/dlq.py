"""Dead-letter records: every rejected message, with why and where it came from.

Value shape on ``events.dlq``: ``{"stage", "error", "topic", "partition", "offset",
"raw", "raw_encoding", "failed_at"}``. ``raw`` is the original bytes as UTF-8 text when they decode,
base64 otherwise (``raw_encoding`` says which), so nothing about the bad event is lost.
"""

from __future__ import annotations

import base64
import time

import orjson


def dead_letter(stage: str, error: str, raw: bytes | None, topic: str | None = None,
                partition: int | None = None, offset: int | None = None) -> bytes:
    """The JSON value of one DLQ record."""
    try:
        text, encoding = (raw or b"").decode("utf-8"), "utf8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    return orjson.dumps({
        "stage": stage, "error": error, "topic": topic, "partition": partition, "offset": offset,
        "raw": text, "raw_encoding": encoding, "failed_at": int(time.time() * 1000),
    })


def original_bytes(record: dict) -> bytes:
    """Recover the original message bytes from a parsed DLQ record."""
    if record.get("raw_encoding") == "base64":
        return base64.b64decode(record["raw"])
    return record["raw"].encode("utf-8")
