"""The event validator: every kind of bad input is named, good input is typed."""

from __future__ import annotations

import orjson
import pytest

from pipeline.dlq import dead_letter, original_bytes
from pipeline.events import Event, FeatureSchema, Rejection, validate

SCHEMA = FeatureSchema(("a", "b", "c"), n_classes=2, max_bytes=300)


def _event(**fields) -> bytes:
    doc = {"id": "x1", "ts": 1700000000000, "features": [1.0, 2, -3.5], "label": 1}
    doc.update(fields)
    return orjson.dumps(doc)


def test_valid_list_and_named_features():
    assert validate(_event(), SCHEMA) == Event("x1", 1700000000000, [1.0, 2.0, -3.5], 1)
    named = validate(_event(features={"c": 3, "a": 1, "b": 2}, label=None), SCHEMA)
    assert named == Event("x1", 1700000000000, [1.0, 2.0, 3.0], None)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "not valid JSON"),
        (b"[1,2]", "must be a JSON object"),
        (None, "null value"),
        (_event(id=""), "'id'"),
        (_event(ts="yesterday"), "'ts'"),
        (_event(features=[1, 2]), "expected 3 features, got 2"),
        (_event(features={"a": 1, "b": 2}), "missing feature(s): c"),
        (_event(features={"a": 1, "b": 2, "c": 3, "z": 4}), "unknown feature(s): z"),
        (_event(features=[1, "2", 3]), "feature b is not a number"),
        (_event(features=[1, True, 3]), "feature b is not a number"),
        (b'{"id": "x1", "ts": 1, "features": [1, 2, Infinity], "label": 1}', "not valid JSON"),
        (_event(features=[1, 2, None]), "feature c is not a number: None"),
        (_event(label=2), "'label'"),
        (_event(label=0.5), "'label'"),
        (_event(features=[1.0] * 3, pad="x" * 400), "over the 300-byte limit"),
    ],
)
def test_rejections_name_the_problem(raw, reason):
    verdict = validate(raw, SCHEMA)
    assert isinstance(verdict, Rejection) and reason in verdict.reason


CATEGORICAL = FeatureSchema(("price", "zip"), cardinalities=(None, 3))


@pytest.mark.parametrize("code", [0, 2, 2.0, {"zip": 1, "price": -4.5}])
def test_a_categorical_feature_takes_its_codes(code):
    features = code if isinstance(code, dict) else [-4.5, code]
    verdict = validate(_event(features=features), CATEGORICAL)
    assert isinstance(verdict, Event) and verdict.features[0] == -4.5 and verdict.features[1] in (0, 1, 2)


@pytest.mark.parametrize("code", [3, -1, 1.5, 1e30])
def test_a_categorical_feature_refuses_anything_but_its_codes_naming_it(code):
    verdict = validate(_event(features=[0.5, code]), CATEGORICAL)
    assert verdict == Rejection(f"feature zip is {code!r}, not one of its 3 category codes (an integer 0..2)")


def test_dead_letter_keeps_the_original_bytes_text_or_binary():
    for raw in (b'{"id": 1}', b"\xff\xfe\x00binary"):
        record = orjson.loads(dead_letter("parse", "bad", raw, topic="events", partition=2, offset=41))
        assert (record["stage"], record["topic"], record["partition"], record["offset"]) == ("parse", "events", 2, 41)
        assert original_bytes(record) == raw
