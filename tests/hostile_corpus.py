"""A corpus of hostile events for any feature schema, shared by the validator's tests
(tests/test_hostile_events.py) and the end-to-end corpus test (tests/faults/test_hostile_corpus.py).

Each entry is ``(raw value, words the validator's reason must contain)``; ``raw`` is ``None`` for a
Kafka record without a value. Every one of them must be refused by :func:`pipeline.events.validate`
(with a schema of ``names``, ``n_classes`` classes and ``max_bytes``), never raise.
"""

from __future__ import annotations

from collections.abc import Sequence

DEEP = 10_000


def event(names: Sequence[str], features: str | None = None, **fields: str) -> bytes:
    """An event's JSON text with any field spelled out verbatim (so literals json cannot write get in);
    by default features ``[1, 2, ..., n]``, id ``e1``, label 1."""
    features = features if features is not None else "[" + ", ".join(str(i + 1) for i in range(len(names))) + "]"
    parts = {"id": '"e1"', "ts": "1700000000000", "features": features, "label": "1"} | fields
    return ("{" + ", ".join(f'"{k}": {v}' for k, v in parts.items()) + "}").encode()


def hostile_corpus(
    names: Sequence[str], n_classes: int = 2, max_bytes: int = 64 * 1024
) -> list[tuple[bytes | None, str]]:
    """The hostile events for a schema of features ``names`` (at least 2): numbers at and past the float32
    and float64 limits, huge integers, NaN/Infinity literals, deep nesting, invalid UTF-8, control
    characters, repeated keys, oversized values, wrong types in every field, empty and null values."""
    n, first, last = len(names), names[0], names[-1]

    def _event(features: str | None = None, **fields: str) -> bytes:
        return event(names, features, **fields)

    def vec(value: str, at: int = 0) -> str:
        """Features all 0 but ``value`` at position ``at``."""
        values = ["0"] * n
        values[at] = value
        return "[" + ", ".join(values) + "]"

    def obj(values: Sequence[str], keys: Sequence[str] = names) -> str:
        return "{" + ", ".join(f'"{k}": {v}' for k, v in zip(keys, values)) + "}"

    ones = ", ".join(str(i + 1) for i in range(n - 1))  # the first n - 1 features: 1, 2, ...
    return [
        (_event(vec("3.5e38")), f"feature {first} is 3.5e+38, outside the float32 range"),
        (_event(vec("-1e39", 1)), f"feature {names[1]} is -1e+39, outside the float32 range"),
        (_event(vec("3.40282357e38", -1)), f"feature {last} is 3.40282357e+38, outside the float32 range"),
        (_event(vec("1.8e308")), "number is infinity"),  # past float64 too
        (_event(vec("1e999999999")), "number is infinity"),
        (_event(vec("9" * 400)), "number is infinity"),  # a 400-digit integer
        (_event(vec("9" * 300)), "outside the float32 range"),  # inside float64, past float32
        (_event(vec("340282356779733661637539395458142568448")), f"feature {first} is 3.4028235677973366e+38, outside"),
        (_event(obj(["1e39"] + ["0"] * (n - 1))), f"feature {first} is 1e+39"),
        (_event(vec("NaN")), "not valid JSON"),
        (_event(vec("Infinity")), "not valid JSON"),
        (_event(vec("-Infinity")), "not valid JSON"),
        (_event(vec("nan")), "not valid JSON"),
        (_event("[" * DEEP + "]" * DEEP), "not valid JSON"),  # 10k deep
        (_event(f'{{"{first}":' * 5000 + "1" + "}" * 5000), "not valid JSON"),
        (_event("[" * 1000 + "]" * 1000), f"expected {n} features, got 1"),  # deep but inside the parser's limit
        (_event(extra='{"x": ' * 1000 + "1" + "}" * 1000), "repeated keys"),  # too deep for the duplicate check
        (b"[" * DEEP + b"]" * DEEP, "not valid JSON"),
        (_event(id='"XX"').replace(b"XX", b"\xff\xfe"), "not valid JSON"),  # invalid UTF-8
        (_event(id='"\\ud800"'), "not valid JSON"),  # a lone surrogate escape
        (_event(id='"a\x01b"'), "not valid JSON"),  # a raw control character in a string
        (b"\x00" * 100, "not valid JSON"),
        (b"\x01\x02\x1f" * 1000, "not valid JSON"),
        (b"\xef\xbb\xbf" + _event(), "not valid JSON"),  # a byte-order mark
        (b"", "not valid JSON"),
        (None, "null value"),
        (_event(id='"a", "id": "b"'), "key 'id' appears more than once"),
        (
            _event(obj([str(i + 1) for i in range(n)] + ["1e39"], [*names, first])),
            f"key '{first}' appears more than once",
        ),
        (
            _event(obj([str(i + 1) for i in range(n)] + [str(n)], [*names, last])),
            f"key '{last}' appears more than once",
        ),
        (_event(extra='"x' + "y" * (max_bytes + 4464) + '"'), f"over the {max_bytes}-byte limit"),
        (_event("[" + ", ".join(["1"] * max(100_000, max_bytes)) + "]"), f"over the {max_bytes}-byte limit"),
        # wrong types in every field
        (_event(id="1"), "'id'"),
        (_event(id="null"), "'id'"),
        (_event(id="[]"), "'id'"),
        (_event(id="{}"), "'id'"),
        (_event(id="true"), "'id'"),
        (_event(id='""'), "'id'"),
        (_event(ts='"1"'), "'ts'"),
        (_event(ts="1.5"), "'ts'"),
        (_event(ts="-1"), "'ts'"),
        (_event(ts="true"), "'ts'"),
        (_event(ts="18446744073709551615"), "'ts' must be an integer in [0, 2**63 - 1]"),
        (_event(ts="null"), "'ts'"),
        (_event(ts="[1]"), "'ts'"),
        (_event(ts="1e3"), "'ts'"),
        (_event('"' + ", ".join(str(i + 1) for i in range(n)) + '"'), "'features' must be a list"),
        (_event("3"), "'features' must be a list"),
        (_event("null"), "'features' must be a list"),
        (_event("true"), "'features' must be a list"),
        (_event(f'[{ones}, "{n}"]'), f"feature {last} is not a number: '{n}'"),
        (_event(f"[{ones}, true]"), f"feature {last} is not a number"),
        (_event(f"[{ones}, null]"), f"feature {last} is not a number: None"),
        (_event(f"[{ones}, [{n}]]"), "a list of 1 items"),
        (_event(f'[{ones}, {{"v": {n}}}]'), "an object of 1 keys"),
        (_event(f"[{ones}]"), f"expected {n} features"),
        (_event("[]"), f"expected {n} features, got 0"),
        (_event(obj([str(i + 1) for i in range(n - 1)])), f"missing feature(s): {last}"),
        (_event(obj([str(i + 1) for i in range(n + 1)], [*names, "z" * 5000])), "unknown feature(s): zzzz"),
        (_event(label='"1"'), "'label'"),
        (_event(label="1.0"), "'label'"),
        (_event(label="true"), "'label'"),
        (_event(label="-1"), "'label'"),
        (_event(label=str(n_classes)), "'label'"),
        (_event(label="[0]"), "'label'"),
        (_event(label="99999999999999999999"), "'label'"),
        (b"null", "got NoneType"),
        (b"1", "got int"),
        (b'"event"', "got str"),
        (b"[]", "got a list of 0 items"),
        (b"true", "got bool"),
    ]
