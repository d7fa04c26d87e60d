"""Spark DDL strings derived from Arrow schemas, so a ``mapInArrow`` output is described once.

``mapInArrow`` and a data source's ``schema()`` want a DDL string while the batches they carry are
built with an Arrow schema; ``ddl`` writes the first from the second.

>>> ddl(pa.schema([("kind", pa.string()), ("features", pa.list_(pa.float32())), ("n", pa.int64())]))
'kind string, features array<float>, n long'
"""

import pyarrow as pa

_SIMPLE = {
    pa.string(): "string",
    pa.binary(): "binary",
    pa.int64(): "long",
    pa.int32(): "int",
    pa.float64(): "double",
    pa.float32(): "float",
    pa.bool_(): "boolean",
}


def ddl_type(kind: pa.DataType) -> str:
    """The Spark SQL type of an Arrow type (those the pipeline's Arrow batches use)."""
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    if pa.types.is_list(kind):
        return f"array<{ddl_type(kind.value_type)}>"
    if pa.types.is_timestamp(kind) and kind.tz is not None:
        return "timestamp"
    raise TypeError(f"no Spark DDL type for Arrow type {kind}")


def ddl(schema: pa.Schema) -> str:
    """The DDL string (``name type, ...``) of an Arrow schema, fields in order."""
    return ", ".join(f"{field.name} {ddl_type(field.type)}" for field in schema)
