"""The event schema and its validator.

An event is ``{"id": str, "ts": epoch ms, "features": [float...] or {name: float},
"label": int or null}``. ``validate`` checks raw bytes against a feature schema and
returns either a typed :class:`Event` (features as a list in schema order) or a
:class:`Rejection` whose reason names the problem, so the caller can route it to the
dead-letter topic instead of dropping it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class FeatureSchema:
    """What a model accepts: feature names (their count follows), number of classes, size bound."""

    names: tuple[str, ...]
    n_classes: int = 2
    max_bytes: int = 64 * 1024

    @classmethod
    def anonymous(cls, n_features: int, n_classes: int = 2, max_bytes: int = 64 * 1024) -> FeatureSchema:
        return cls(tuple(f"f{i}" for i in range(n_features)), n_classes, max_bytes)

    @property
    def n_features(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Event:
    id: str
    ts: int
    features: list[float]
    label: int | None

    def to_json(self) -> bytes:
        return orjson.dumps({"id": self.id, "ts": self.ts, "features": self.features, "label": self.label})


@dataclass(frozen=True)
class Rejection:
    reason: str


def validate(raw: bytes | None, schema: FeatureSchema) -> Event | Rejection:
    """Parse and check one message; never raises for bad input."""
    if raw is None:
        return Rejection("empty message (null value)")
    if len(raw) > schema.max_bytes:
        return Rejection(f"event is {len(raw)} bytes, over the {schema.max_bytes}-byte limit")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejection(f"not valid JSON: {exc}")
    if not isinstance(doc, dict):
        return Rejection(f"event must be a JSON object, got {type(doc).__name__}")
    return validate_document(doc, schema)


def validate_document(doc: dict, schema: FeatureSchema) -> Event | Rejection:
    """Check an already-parsed event object against the schema."""
    event_id = doc.get("id")
    if not isinstance(event_id, str) or not event_id:
        return Rejection("missing or empty 'id' (a non-empty string)")
    ts = doc.get("ts")
    if type(ts) is not int or ts < 0:
        return Rejection(f"'ts' must be a non-negative integer (epoch ms), got {ts!r}")
    features = _features(doc.get("features"), schema)
    if isinstance(features, Rejection):
        return features
    label = doc.get("label")
    if label is not None and (type(label) is not int or not 0 <= label < schema.n_classes):
        return Rejection(f"'label' must be null or an integer in [0, {schema.n_classes - 1}], got {label!r}")
    return Event(event_id, ts, features, label)


def _features(value, schema: FeatureSchema) -> list[float] | Rejection:
    if isinstance(value, list):
        if len(value) != schema.n_features:
            return Rejection(f"expected {schema.n_features} features, got {len(value)}")
        values = value
    elif isinstance(value, dict):
        missing = [n for n in schema.names if n not in value]
        if missing:
            return Rejection(f"missing feature(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        unknown = [n for n in value if n not in schema.names]
        if unknown:
            return Rejection(f"unknown feature(s): {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        values = [value[n] for n in schema.names]
    else:
        return Rejection("'features' must be a list of numbers or an object of name: number")
    for position, x in enumerate(values):
        if type(x) not in (int, float):
            return Rejection(f"feature {schema.names[position]} is not a number: {x!r}")
        if not math.isfinite(x):
            return Rejection(f"feature {schema.names[position]} is not finite: {x!r}")
    return [float(x) for x in values]
