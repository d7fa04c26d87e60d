"""One file reader: the producer's replay (producers.files) and ``streamfit fit`` (pipeline.fit) accept
the same suffixes and take the same columns as features."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.fit import FitError, training_frame
from pipeline.spec import BUILTIN_SPECS
from producers.files import FORMATS, file_rows

SPEC = BUILTIN_SPECS["small"]
ROWS = 4


def _table(names: list[str]) -> pa.Table:
    """``id``, ``ts``, ``event_ts`` and ``label`` around one float column per name (column j of row i is i + j / 10)."""
    columns = {"id": [f"r{i}" for i in range(ROWS)], "ts": [1] * ROWS}
    columns |= {name: [i + j / 10 for i in range(ROWS)] for j, name in enumerate(names)}
    columns |= {"event_ts": [2] * ROWS, "label": [i % 2 for i in range(ROWS)]}
    return pa.table(columns)


def _write(table: pa.Table, path) -> None:
    kind = FORMATS[path.suffix.lower()]
    if kind == "csv":
        pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="none"))
    elif kind == "parquet":
        pq.write_table(table, path)
    else:
        import orjson

        path.write_bytes(b"\n".join(orjson.dumps(row) for row in table.to_pylist()) + b"\n")


@pytest.mark.parametrize("suffix", [*sorted(FORMATS), ".CSV", ".Parquet"])
def test_the_producer_reads_every_suffix_fit_accepts(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    _write(_table([f"c{j}" for j in range(SPEC.n_features)]), path)
    rows = list(file_rows(path))
    assert len(rows) == ROWS and all(row.error is None for row in rows)


@pytest.mark.parametrize("suffix", [".txt", ".tsv", ".csv.gz", ""])
def test_both_refuse_the_same_suffixes(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    path.write_text("id,label\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(file_rows(path))
    with pytest.raises(FitError, match="unsupported file type"):
        training_frame(None, path, SPEC)  # refused before Spark is asked to read anything


@pytest.mark.parametrize("suffix", sorted(FORMATS))
@pytest.mark.parametrize("named", [False, True], ids=["other-columns", "spec-names"])
def test_both_take_the_same_feature_columns(spark, tmp_path, suffix, named):
    """Without the model's names: every column but id, ts, event_ts and label, in the file's order;
    with them (here in reverse order in the file): the model's, in the model's order."""
    names = list(reversed(SPEC.feature_names)) if named else [f"c{j}" for j in range(SPEC.n_features)]
    path = tmp_path / f"rows{suffix}"
    _write(_table(names), path)
    expected = SPEC.feature_names if named else names

    documents = [row.document for row in file_rows(path)]
    assert all(list(document["features"]) in (names, expected) for document in documents)
    assert set(documents[0]["features"]) == set(expected)
    produced = sorted((d["id"], [d["features"][name] for name in expected]) for d in documents)

    frame, invalid = training_frame(spark, path, SPEC)
    assert invalid == 0
    fitted = sorted(row["features"] for row in frame.collect())
    np.testing.assert_allclose(fitted, [features for _, features in produced], rtol=1e-6)
