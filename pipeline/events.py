"""The event schema, its validator, and the one rule for what a feature value may be.

An event is ``{"id": str, "ts": epoch ms, "features": [float...] or {name: float},
"label": int or null}``. ``validate`` checks raw bytes against a feature schema and
returns either a typed :class:`Event` (features as a list in schema order) or a
:class:`Rejection` whose reason names the problem, so the caller can route it to the
dead-letter topic instead of dropping it. It never raises, whatever the bytes.

What a model can compute with is decided here, once, for the producer, both Spark
consumers and serving: :func:`feature_value_problem` (a number that is a finite
float32), :func:`category_code_problem` (a categorical feature's value is one of its codes),
:func:`standardisation_problems` (still finite after the model's
``(x - mean) / std``) and :func:`probability_problems` (the model's answer is finite).

>>> feature_value_problem(3.4028235e38) is None   # float32's largest value
True
>>> feature_value_problem(1e39)
'is 1e+39, outside the float32 range the model computes in (|x| <= 3.4028235e38)'
>>> feature_value_problem(10 ** 400)
'is a 401-digit integer, outside the float32 range the model computes in (|x| <= 3.4028235e38)'
>>> category_code_problem(1.5, 3)
'is 1.5, not one of its 3 category codes (an integer 0..2)'
>>> standardisation_problems(np.array([[1.0, 1e30]]), mean=[0, 0], std=[1, 1e-10], names=["a", "b"])
["feature b = 1e+30 is inf after the model's standardisation (x - 0) / 1e-10, outside the float32 range"]
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import orjson

if TYPE_CHECKING:
    import pyarrow as pa  # type: ignore[import-untyped]

    from pipeline.spec import ModelSpec

FLOAT32_ROUNDS_TO_INF = 2**128 - 2**103
"""The smallest magnitude float32 rounds to infinity: half an ulp past its largest value, 2**128 - 2**104."""

MAX_TS = 2**63 - 1
"""Epoch ms fit Kafka's and Arrow's signed 64-bit timestamps."""

_OUT_OF_RANGE = "outside the float32 range the model computes in (|x| <= 3.4028235e38)"


@dataclass(frozen=True)
class FeatureSchema:
    """What a model accepts: feature names (their count follows), number of classes, size bound, and
    per feature its cardinality if it is categorical (``None``, or no entries at all: numeric)."""

    names: tuple[str, ...]
    n_classes: int = 2
    max_bytes: int = 64 * 1024
    cardinalities: tuple[int | None, ...] = ()

    @classmethod
    def of(cls, spec: ModelSpec, max_bytes: int) -> FeatureSchema:
        """The schema of the events ``spec``'s model takes."""
        return cls(tuple(spec.feature_names), spec.n_classes, max_bytes, spec.cardinalities)

    @property
    def n_features(self) -> int:
        return len(self.names)

    @functools.cached_property
    def name_set(self) -> frozenset[str]:
        return frozenset(self.names)


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


def feature_value_problem(x: object) -> str | None:
    """Why ``x`` cannot be a feature value (``None`` if it can): the one rule for every component.

    A feature value is a number (not a bool, string, null or container) that is a finite
    float32: a value past float32's range would be infinite to the model (and its training
    delta NaN). Magnitudes below float32's smallest subnormal round to 0, which is close to
    what was sent, so they are accepted. The test is on ``float(x)``, the value the pipeline
    computes with (an integer just under the bound rounds onto it); a huge integer is refused
    before that conversion, which would overflow.
    """
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return f"is not a number: {shown(x)}"
    if isinstance(x, int) and not -FLOAT32_ROUNDS_TO_INF < x < FLOAT32_ROUNDS_TO_INF:
        return f"is {shown(x)}, {_OUT_OF_RANGE}"
    value = float(x)
    if not math.isfinite(value):
        return f"is not finite: {value!r}"
    if not -FLOAT32_ROUNDS_TO_INF < value < FLOAT32_ROUNDS_TO_INF:
        return f"is {shown(x)}, {_OUT_OF_RANGE}"
    return None


def category_code_problem(x: float, cardinality: int) -> str | None:
    """Why the valid feature value ``x`` is not a code of a categorical feature with ``cardinality``
    categories (an integer ``0..cardinality-1``, as an int or an integral float), else ``None``: the model
    one-hot encodes it, and any other value would silently encode as no category at all."""
    if float(x).is_integer() and 0 <= x < cardinality:
        return None
    return f"is {shown(x)}, not one of its {cardinality} category codes (an integer 0..{cardinality - 1})"


def category_problems(x: np.ndarray, cardinalities: Sequence[int | None], names: Sequence[str]) -> list[str | None]:
    """Per row of ``x`` (rows of valid feature values), why a categorical feature's value is not one of
    its codes (:func:`category_code_problem`), naming the first such feature; ``None`` for good rows."""
    problems: list[str | None] = [None] * len(x)
    for j, cardinality in enumerate(cardinalities):
        if cardinality is not None:
            for i, value in enumerate(np.asarray(x)[:, j].tolist()):
                if problems[i] is None and (problem := category_code_problem(value, cardinality)) is not None:
                    problems[i] = f"feature {names[j]} {problem}"
    return problems


def standardisation_problems(
    x: np.ndarray, mean: Sequence[float] | np.ndarray, std: Sequence[float] | np.ndarray, names: Sequence[str]
) -> list[str | None]:
    """Per row of ``x`` (rows of valid feature values), why the model's standardisation layer
    ``(x - mean) / std`` makes it non-finite in float32, naming the first such feature; ``None`` for
    rows it keeps finite. Computed in float32 exactly as the layer does, so a row that passes here
    reaches the model's first dense layer finite.
    """
    x = np.asarray(x, np.float32)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    with np.errstate(all="ignore"):
        standardised = (x - mean) / std
    bad = ~np.isfinite(standardised)
    problems: list[str | None] = [None] * len(x)
    for i in np.flatnonzero(bad.any(axis=1)):
        j = int(np.argmax(bad[i]))
        problems[i] = (
            f"feature {names[j]} = {float(x[i, j]):g} is {float(standardised[i, j]):g} after the model's "
            f"standardisation (x - {float(mean[j]):g}) / {float(std[j]):g}, outside the float32 range"
        )
    return problems


def probability_problems(probabilities: np.ndarray) -> list[str | None]:
    """Per row of a model's output, why it cannot be an answer (non-finite), else ``None``.

    Standardised features inside float32 can still overflow in the layers after it
    (``3e38`` times a weight); such a row has no prediction to give.
    """
    finite = np.isfinite(probabilities).all(axis=1)
    return [
        None
        if ok
        else f"the model's probabilities are not finite ({_row(p)}): the features are too extreme for this model"
        for ok, p in zip(finite.tolist(), probabilities)
    ]


def validate(raw: bytes | None, schema: FeatureSchema) -> Event | Rejection:
    """Parse and check one message; never raises for bad input."""
    if raw is None:
        return Rejection("empty message (null value)")
    if len(raw) > schema.max_bytes:
        return Rejection(f"event is {len(raw)} bytes, over the {schema.max_bytes}-byte limit")
    raw = bytes(raw)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejection(f"not valid JSON: {exc}")
    if isinstance(doc, dict) and (key := duplicate_key(raw, doc)) is not None:
        return Rejection(key)
    return validate_document(doc, schema)


def duplicate_key(raw: bytes, doc: dict) -> str | None:
    """Why ``raw`` (whose parse is ``doc``) is refused for repeating a key in one object, if it does.

    JSON parsers disagree on which of two equal keys wins, so an event must not have any.
    Fast path: when ``raw`` has exactly as many colons as ``doc`` has members (its own and its
    ``features`` object's), every colon is a kept member and none repeats.
    """
    features = doc.get("features")
    if raw.count(b":") == len(doc) + (len(features) if isinstance(features, dict) else 0):
        return None
    repeated: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in items]
        if not repeated and len(set(keys)) != len(keys):
            repeated.append(next(key for i, key in enumerate(keys) if key in keys[:i]))
        return dict(items)

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:
        return f"cannot be checked for repeated keys: {shown(str(exc))}"
    return f"key {shown(repeated[0])} appears more than once in one object" if repeated else None


def validate_document(doc: object, schema: FeatureSchema) -> Event | Rejection:
    """Check an already-parsed event object against the schema; never raises."""
    if not isinstance(doc, dict):
        return Rejection(f"event must be a JSON object, got {_kind(doc)}")
    event_id = doc.get("id")
    if not isinstance(event_id, str) or not event_id:
        return Rejection(f"missing or empty 'id' (a non-empty string), got {shown(event_id)}")
    if not _utf8(event_id):
        return Rejection(f"'id' is not valid UTF-8 text: {shown(event_id)}")
    ts = doc.get("ts")
    if type(ts) is not int or not 0 <= ts <= MAX_TS:
        return Rejection(f"'ts' must be an integer in [0, 2**63 - 1] (epoch ms), got {shown(ts)}")
    features = _features(doc.get("features"), schema)
    if isinstance(features, Rejection):
        return features
    label = doc.get("label")
    if label is not None and (type(label) is not int or not 0 <= label < schema.n_classes):
        return Rejection(f"'label' must be null or an integer in [0, {schema.n_classes - 1}], got {shown(label)}")
    return Event(event_id, ts, features, label)


def _features(value: object, schema: FeatureSchema) -> list[float] | Rejection:
    if isinstance(value, list):
        if len(value) != schema.n_features:
            return Rejection(f"expected {schema.n_features} features, got {len(value)}")
        values = value
    elif isinstance(value, dict):
        missing = [n for n in schema.names if n not in value]
        if missing:
            return Rejection(f"missing feature(s): {_names(missing)}")
        unknown = [n for n in value if n not in schema.name_set]
        if unknown:
            return Rejection(f"unknown feature(s): {_names(unknown)}")
        values = [value[n] for n in schema.names]
    else:
        return Rejection(f"'features' must be a list of numbers or an object of name: number, got {_kind(value)}")
    for name, x in zip(schema.names, values):
        if (problem := feature_value_problem(x)) is not None:
            return Rejection(f"feature {name} {problem}")
    for name, x, cardinality in zip(schema.names, values, schema.cardinalities):
        if cardinality is not None and (problem := category_code_problem(x, cardinality)) is not None:
            return Rejection(f"feature {name} {problem}")
    return [float(x) for x in values]


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, without ever building a huge or deep repr
    (a 10,000-digit int or a 1,000-deep list would raise, a 1 MB string would bloat the reason)."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() <= 64:
            return repr(value)
        return (
            f"a {len(str(abs(value)))}-digit integer"
            if value.bit_length() < 14_000
            else f"an integer of {value.bit_length()} bits"
        )
    if isinstance(value, str):
        text = repr(value[:limit])
        return text if len(value) <= limit else text[:-1] + f"...' ({len(value)} characters)"
    return _kind(value)


def _kind(value: object) -> str:
    if isinstance(value, (list, dict)):
        return f"a list of {len(value)} items" if isinstance(value, list) else f"an object of {len(value)} keys"
    return type(value).__name__


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(n if len(n) <= 40 else n[:40] + "..." for n in names[:limit]) + (
        " ..." if len(names) > limit else ""
    )


def _row(values: np.ndarray) -> str:
    return ", ".join(f"{float(v):g}" for v in values[:4]) + (", ..." if len(values) > 4 else "")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The Arrow batches events travel in through Spark (``mapInArrow``, the Kafka data source) are built
# with an Arrow schema, while Spark wants the same columns as a DDL string: it is derived, not rewritten.


def ddl_type(kind: pa.DataType) -> str:
    """The Spark SQL type of an Arrow type (those the pipeline's Arrow batches use).

    >>> import pyarrow as pa
    >>> ddl_type(pa.list_(pa.float32())), ddl_type(pa.int64())
    ('array<float>', 'long')
    """
    import pyarrow as pa

    simple = {
        pa.string(): "string",
        pa.binary(): "binary",
        pa.int64(): "long",
        pa.int32(): "int",
        pa.float64(): "double",
        pa.float32(): "float",
        pa.bool_(): "boolean",
    }
    if kind in simple:
        return simple[kind]
    if pa.types.is_list(kind):
        return f"array<{ddl_type(kind.value_type)}>"
    if pa.types.is_struct(kind):
        return f"struct<{', '.join(f'{field.name}: {ddl_type(field.type)}' for field in kind)}>"
    if pa.types.is_timestamp(kind) and kind.tz is not None:
        return "timestamp"
    raise TypeError(f"no Spark DDL type for Arrow type {kind}")


def ddl(schema: pa.Schema) -> str:
    """The Spark DDL string (``name type, ...``) of an Arrow schema, fields in order.

    >>> import pyarrow as pa
    >>> ddl(pa.schema([("kind", pa.string()), ("features", pa.list_(pa.float32())), ("n", pa.int64())]))
    'kind string, features array<float>, n long'
    """
    return ", ".join(f"{field.name} {ddl_type(field.type)}" for field in schema)
