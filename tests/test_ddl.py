"""pipeline.events.ddl: the Spark DDL of an Arrow schema, so each mapInArrow output is described once."""

import pyarrow as pa
import pytest

from pipeline.events import ddl, ddl_type


@pytest.mark.parametrize(
    ("arrow", "spark"),
    [
        (pa.string(), "string"),
        (pa.binary(), "binary"),
        (pa.int64(), "long"),
        (pa.int32(), "int"),
        (pa.float64(), "double"),
        (pa.float32(), "float"),
        (pa.bool_(), "boolean"),
        (pa.timestamp("us", tz="UTC"), "timestamp"),
        (pa.list_(pa.float32()), "array<float>"),
        (pa.list_(pa.list_(pa.int64())), "array<array<long>>"),
    ],
)
def test_type_mapping(arrow, spark):
    assert ddl_type(arrow) == spark


def test_unmapped_type_is_refused():
    with pytest.raises(TypeError, match="no Spark DDL type"):
        ddl_type(pa.timestamp("us"))  # no zone: Spark's timestamp is an instant
    with pytest.raises(TypeError):
        ddl_type(pa.int8())


def test_schema_fields_in_order():
    schema = pa.schema([("key", pa.binary()), ("partition", pa.int32()), ("features", pa.list_(pa.float32()))])
    assert ddl(schema) == "key binary, partition int, features array<float>"


def test_pipeline_ddls_match_their_arrow_schemas():
    """The strings mapInArrow and the data source get are the ones the hand-written pairs used to hold."""
    from consumers.inference import OUTPUT_DDL, SENT_DDL
    from consumers.training import CHECK_DDL, STEP_DDL
    from pipeline.training import REPORT_DDL

    assert OUTPUT_DDL == "topic string, key binary, value binary, partition int"
    assert SENT_DDL == "records long"
    check = "kind string, features array<float>, label long, partition int, offset long, arrival_us long, dead binary"
    assert CHECK_DDL == check
    assert STEP_DDL == check + ", correct boolean, label_probability float, report string"
    assert REPORT_DDL == (
        "worker_id long, rows long, steps long, commits long, skipped long, max_staleness long, "
        "total_staleness long, counter long"
    )


def test_source_schema():
    pytest.importorskip("pyspark")
    from pipeline.spark.source import SCHEMA

    assert SCHEMA == (
        "key binary, value binary, topic string, partition int, offset long, timestamp timestamp, timestampType int"
    )
