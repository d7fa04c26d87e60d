"""Hostile input never stops a stream: the validator, the value rule, the DLQ record and the file
producer each turn anything at all into a named rejection (or a bounded dead letter), never an
exception, and everything they accept is finite in float32."""

from __future__ import annotations

import hashlib
import json
import math
import random

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pipeline.dlq import MAX_RAW_BYTES, MAX_RAW_BYTES_LIMIT, RECORD_LIMIT, dead_letter, original_bytes
from pipeline.events import (
    Event,
    FeatureSchema,
    Rejection,
    feature_value_problem,
    probability_problems,
    standardisation_problems,
    validate,
    validate_document,
)
from producers.files import file_rows
from producers.sender import file_events
from tests.hostile_corpus import event, hostile_corpus

SCHEMA = FeatureSchema(("a", "b", "c"), n_classes=2, max_bytes=64 * 1024)
F32_MAX = float(np.finfo(np.float32).max)


def _event(features: str = "[1, 2, 3]", **fields: str) -> bytes:
    """An event's JSON text with any field spelled out verbatim (so literals json cannot write get in)."""
    return event(SCHEMA.names, features, **fields)


def _accepted_are_finite(verdict) -> None:
    assert isinstance(verdict, (Event, Rejection))
    if isinstance(verdict, Event):
        with np.errstate(over="ignore"):
            assert np.isfinite(np.asarray(verdict.features, np.float32)).all(), verdict.features


ACCEPTED = [  # (features as JSON text, the float32 values the model sees)
    ("[3.4028235e38, -3.4028235e38, 0]", [F32_MAX, -F32_MAX, 0.0]),  # float32's largest value, as printed
    ("[3.40282356e38, 0, 0]", [F32_MAX, 0, 0]),  # past the max but rounds to it, not to inf
    ("[1e-50, -1e-50, 1e-40]", [0.0, -0.0, np.float32(1e-40)]),  # underflow to 0 and a float32 subnormal
    ("[1e-999999999, 5e-324, 0]", [0.0, 0.0, 0.0]),  # huge negative exponent, float64's smallest subnormal
    ("[340282346638528859811704183484516925440, 1, 2]", [F32_MAX, 1, 2]),  # the max as an integer
    ('{"c": 3, "b": 2, "a": 1}', [1, 2, 3]),
]


@pytest.mark.parametrize("features, seen", ACCEPTED, ids=[f for f, _ in ACCEPTED])
def test_values_at_the_float32_limits_are_accepted_and_finite(features, seen):
    verdict = validate(_event(features), SCHEMA)
    assert isinstance(verdict, Event), verdict
    _accepted_are_finite(verdict)
    assert np.asarray(verdict.features, np.float32).tolist() == np.asarray(seen, np.float32).tolist()


HOSTILE = hostile_corpus(SCHEMA.names, SCHEMA.n_classes, SCHEMA.max_bytes)  # (raw bytes, words the reason must contain)


@pytest.mark.parametrize("raw, words", HOSTILE, ids=[f"{i}:{w}" for i, (_, w) in enumerate(HOSTILE)])
def test_hostile_events_are_rejected_with_a_reason_never_an_exception(raw, words):
    verdict = validate(raw, SCHEMA)
    assert isinstance(verdict, Rejection), verdict
    assert words in verdict.reason, verdict.reason
    assert len(verdict.reason) < 400, "a reason quotes the bad value briefly, not whole"


RULE = [
    (3.4028235e38, None),
    (-3.4028235e38, None),
    (1e-50, None),
    (0, None),
    (-(2**127), None),
    (2**128 - 2**104, None),  # float32's largest value, exactly
    (2**128 - 2**103, "outside the float32 range"),  # the first magnitude that rounds to inf
    (2**128 - 2**103 - 1, "outside the float32 range"),  # under it, but float() rounds it onto it
    (3.5e38, "outside the float32 range"),
    (1.79e308, "outside the float32 range"),
    (-1e39, "outside"),
    (10**400, "a 401-digit integer"),
    (10**5000, "an integer of 16610 bits"),
    (math.inf, "not finite"),
    (math.nan, "not finite"),
    (True, "not a number: True"),
    ("1", "not a number: '1'"),
    (None, "not a number"),
    ([1.0], "a list of 1 items"),
    ({"v": 1}, "an object of 1 keys"),
    (b"1", "bytes"),
    ("x" * 10**6, "characters"),
]


@pytest.mark.parametrize("value, problem", RULE, ids=[f"{type(v).__name__}{i}" for i, (v, _) in enumerate(RULE)])
def test_the_feature_value_rule(value, problem):
    found = feature_value_problem(value)
    assert found is None if problem is None else problem in found, found


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**1100), 2**1100))
def test_the_rule_is_exactly_a_finite_float32(value):
    """What :func:`feature_value_problem` accepts is what converts to a finite float32, nothing else."""
    with np.errstate(over="ignore", invalid="ignore"):
        finite = math.isfinite(float(value)) if abs(value) < 2**1000 else False
        finite = finite and bool(np.isfinite(np.float32(float(value))))
    assert (feature_value_problem(value) is None) == finite


def test_standardisation_overflow_names_the_feature_and_leaves_other_rows_alone():
    x = np.array([[1.0, 2.0, 3.0], [1.0, 3e38, 3.0], [F32_MAX, 0.0, -F32_MAX], [0.0, 1e-30, 1e30]], np.float32)
    mean, std = np.array([-3e38, 0.0, 0.0], np.float32), np.array([1.0, 1.0, 1e-10], np.float32)
    problems = standardisation_problems(x, mean, std, SCHEMA.names)
    assert problems[0] is None and problems[1] is None
    assert problems[2].startswith("feature a = 3.40282e+38 is inf after the model's standardisation (x - -3e+38) / 1")
    assert problems[3].startswith("feature c = 1e+30 is inf") and "outside the float32 range" in problems[3]
    assert standardisation_problems(x[:2], mean, np.zeros(3, np.float32), SCHEMA.names)[0].startswith("feature a")
    assert standardisation_problems(np.empty((0, 3), np.float32), mean, std, SCHEMA.names) == []


def test_non_finite_probabilities_are_named_per_row():
    problems = probability_problems(np.array([[0.2, 0.8], [np.nan, np.nan], [0.0, np.inf]], np.float32))
    assert problems[0] is None and "not finite (nan, nan)" in problems[1] and "(0, inf)" in problems[2]


def _json_values(leaves):
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.dictionaries(
                st.text(max_size=5) | st.sampled_from(["id", "ts", "features", "label"]), inner, max_size=5
            )
        ),
        max_leaves=30,
    )


LEAVES = (
    st.none()
    | st.booleans()
    | st.floats()
    | st.integers()
    | st.integers(-(10**400), 10**400)
    | st.sampled_from([3.4028235e38, 3.5e38, -1e39, 1.8e308, 1e-50, 2**128])
    | st.text(max_size=10)
)
EVENTS = st.fixed_dictionaries(
    {
        "id": LEAVES | st.text(min_size=1, max_size=8),
        "ts": LEAVES | st.integers(0, 2**64),
        "features": st.lists(LEAVES | st.floats(-1e40, 1e40), min_size=3, max_size=3)
        | st.fixed_dictionaries({n: LEAVES | st.floats(-1e40, 1e40) for n in SCHEMA.names})
        | _json_values(LEAVES),
        "label": st.none() | st.integers(-1, 3) | LEAVES,
    },
    optional={"extra": _json_values(LEAVES)},
)
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@FAST
@given(st.binary(max_size=2000))
def test_validate_never_raises_on_arbitrary_bytes(raw):
    _accepted_are_finite(validate(raw, SCHEMA))


@FAST
@given(EVENTS | _json_values(LEAVES), st.booleans())
def test_validate_never_raises_on_arbitrary_json(doc, ascii_only):
    raw = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")  # NaN, huge ints, lone surrogates
    _accepted_are_finite(validate(raw, SCHEMA))
    _accepted_are_finite(validate_document(doc, SCHEMA))


# ------------------------------------------------------------------------------------------------ dead letters


def _record(raw: bytes | None, **kwargs) -> tuple[bytes, dict]:
    value = dead_letter("predict", kwargs.pop("error", "bad"), raw, "events", 1, 2, **kwargs)
    return value, orjson.loads(value)


@pytest.mark.parametrize(
    "raw",
    [
        bytes(range(1, 32)) * (200_000 // 31),  # 200 KB of control characters
        random.Random(7).randbytes(10 * 1024 * 1024),  # 10 MB of random bytes
        '"\\'.encode() * 300_000,
        "é€😀".encode() * 50_000,
    ],
    ids=["control characters", "random bytes", "quotes and backslashes", "multibyte text"],
)
def test_a_dead_letter_is_bounded_and_describes_the_whole_message(raw):
    value, record = _record(raw)
    assert len(value) < RECORD_LIMIT
    kept = original_bytes(record)
    assert raw.startswith(kept) and MAX_RAW_BYTES - 3 <= len(kept) <= MAX_RAW_BYTES
    assert record["raw_size"] == len(raw) and record["raw_truncated"] is True
    assert record["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    assert (record["stage"], record["topic"], record["partition"], record["offset"]) == ("predict", "events", 1, 2)


def test_the_bound_holds_in_the_worst_case():
    """Largest prefix, raw that escapes to twice its size, error and topic of 7-byte escapes (lone surrogates)."""
    hostile = "\udcff" * 100_000
    value = dead_letter("produce", hostile, b'"' * 10**6, hostile, 2**63 - 1, 2**63 - 1, MAX_RAW_BYTES_LIMIT)
    record = orjson.loads(value)
    assert len(value) < RECORD_LIMIT and record["raw_encoding"] == "utf8" and len(record["raw"]) == MAX_RAW_BYTES_LIMIT
    assert record["error"].startswith("\\udcff") and "(100000 characters in all)" in record["error"]
    with pytest.raises(ValueError, match="max_raw_bytes"):
        dead_letter("produce", "bad", b"x", max_raw_bytes=MAX_RAW_BYTES_LIMIT + 1)


def test_a_short_message_is_kept_whole_as_text_or_base64():
    for raw, encoding in (
        (b'{"id": 1}', "utf8"),
        (b"\xff\xfe\x00binary", "base64"),
        (b"\x01" * 10, "base64"),
        (b"", "utf8"),
        (None, "utf8"),
    ):
        _, record = _record(raw)
        assert original_bytes(record) == (raw or b"") and record["raw_encoding"] == encoding
        assert record["raw_truncated"] is False and record["raw_size"] == len(raw or b"")


@FAST
@given(st.binary(max_size=3000), st.text(max_size=700), st.integers(0, 2048))
def test_any_dead_letter_is_bounded_and_a_true_prefix(raw, error, limit):
    value, record = _record(raw, error=error, max_raw_bytes=limit)
    assert len(value) < RECORD_LIMIT
    kept = original_bytes(record)
    assert raw.startswith(kept) and len(raw[:limit]) - 3 <= len(kept) <= limit
    assert record["raw_truncated"] == (len(raw) > limit) and record["raw_sha256"] == hashlib.sha256(raw).hexdigest()


# ------------------------------------------------------------------------------------------------ the producer


def _produce(path) -> list:
    return list(file_events(file_rows(path), lambda document: FeatureSchema(("a", "b"), 2, 4096), str(path)))


def test_csv_cells_past_float32_or_unreadable_are_dead_lettered_and_the_replay_goes_on(tmp_path):
    path = tmp_path / "hostile.csv"
    lines = [
        b"id,a,b,label",
        b"ok1,1,2,0",
        b"big,1," + b"9" * 400 + b",0",
        b"huger,1," + b"9" * 5000 + b",0",
        b"f32,1e39,1,1",
        b"nan,nan,1,1",
        b"utf8,\xff\xfe,1,0",
        b"\xff\xfeid,1,2,0",
        b"nul,\x00,1,0",
        b"ok2,3.4028235e38,-1e-50,1",
        b'quote,"1,2,0',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = _produce(path)
    sent = [orjson.loads(m.value) for m in out if not m.dead]
    dead = {orjson.loads(m.value)["offset"]: orjson.loads(m.value) for m in out if m.dead}
    assert [e["id"] for e in sent] == ["ok1", "ok2"] and sent[1]["features"] == [3.4028235e38, -1e-50]
    assert "feature b is a 400-digit integer, outside the float32 range" in dead[2]["error"]
    assert "feature b is not finite: inf" in dead[3]["error"]
    assert "feature a is 1e+39, outside the float32 range" in dead[4]["error"]
    assert "feature a is not finite: nan" in dead[5]["error"]
    assert "feature a is not a number: '\\udcff\\udcfe'" in dead[6]["error"]
    assert original_bytes(dead[6]).startswith(b"utf8,\xff\xfe,1,0")
    assert "'id' is not valid UTF-8 text" in dead[7]["error"]
    assert "feature a is not a number: '\\x00'" in dead[8]["error"]
    assert "row has 2 cells, the header has 4" in dead[10]["error"]
    assert all(d["stage"] == "produce" and d["topic"] == str(path) for d in dead.values())
    assert len(out) == len(lines) - 1


def test_a_csv_cell_past_the_csv_size_limit_is_one_dead_letter(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("id,a,b,label\nok1,1,2,0\nwide,1," + "9" * 200_000 + ",0\nok2,1,2,1\n")
    out = _produce(path)
    assert [orjson.loads(m.value)["id"] for m in out if not m.dead] == ["ok1", "ok2"]
    assert ["field larger than field limit" in orjson.loads(m.value)["error"] for m in out if m.dead] == [True]


def test_json_lines_with_hostile_rows_are_dead_lettered_and_the_replay_goes_on(tmp_path):
    path = tmp_path / "hostile.jsonl"
    good = {"id": "ok", "ts": 1, "features": [1, 2], "label": 0}
    lines = [
        orjson.dumps(good),
        b'{"id": "dup", "ts": 1, "features": [1, 2], "features": [1e39, 2], "label": 0}',
        b'{"id": "f32", "ts": 1, "features": [1e39, 2], "label": 0}',
        b'{"id": "int", "ts": 1, "features": [' + b"9" * 400 + b', 2], "label": 0}',
        b'{"id": "deep", "ts": 1, "features": ' + b"[" * 10_000 + b"]" * 10_000 + b', "label": 0}',
        b'{"id": "t", "ts": 1, "features": 7, "label": 0}',
        b"\xff\x00" * 100_000,
        b'{"id": "long", "ts": 1, "features": [1, 2], "label": 0, "pad": "' + b"x" * 5000 + b'"}',
        b'{"id": "' + b"x" * 5000 + b'", "ts": 1, "features": [1, 2], "label": 0}',
        orjson.dumps(good),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = _produce(path)
    assert [orjson.loads(m.value)["id"] for m in out if not m.dead] == ["ok", "long", "ok"]
    reasons = [orjson.loads(m.value)["error"] for m in out if m.dead]
    assert reasons[0] == "key 'features' appears more than once in one object"
    assert "feature a is 1e+39, outside the float32 range" in reasons[1]
    assert "number is infinity" in reasons[2] and "not valid JSON" in reasons[3]
    assert "'features' must be a list" in reasons[4] and "not valid JSON" in reasons[5]
    assert "over the 4096-byte limit" in reasons[6]
    assert all(len(m.value) < RECORD_LIMIT for m in out)
