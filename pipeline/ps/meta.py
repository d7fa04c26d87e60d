"""What a commit's metadata may say, and the record the server keeps of it per streaming query.

Commit metadata arrives as JSON from the network and is then kept in the server's state, saved in
checkpoints, sent in STATS replies and written into the registry's version metadata. One commit with
a NaN offset once broke all of those (a reply that cannot be encoded, a checkpoint that brings it
back), so metadata is held to a closed schema -- typed, finite, bounded -- before it is kept, and
again when a checkpoint is loaded.

>>> CommitMeta.parse({"offsets": {"events": {"0": 42}}, "rows": 64}).rows
64
>>> CommitMeta.parse({"offsets": {"events": {"0": float("nan")}}})
Traceback (most recent call last):
...
pipeline.ps.algorithms.CommitRejected: commit metadata offsets.events.0: Input should be a valid integer
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from pipeline.ps.algorithms import CommitRejected

MAX_TOPICS = 64
MAX_PARTITIONS = 10_000  # per topic
_INT64 = 2**63 - 1

Count = Annotated[int, Field(strict=True, ge=0, le=_INT64)]
Topic = Annotated[str, StringConstraints(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")]  # Kafka's rule
Partition = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")]  # JSON object keys are strings
Offsets = Annotated[
    dict[Topic, Annotated[dict[Partition, Count], Field(max_length=MAX_PARTITIONS)]], Field(max_length=MAX_TOPICS)
]


class CommitMeta(BaseModel):
    """A commit's metadata: the Kafka offsets its rows were read through (``{topic: {partition:
    offset}}``) and how many rows it trained (optional, default 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    offsets: Offsets = {}
    rows: Count = 0

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> CommitMeta:
        """The validated metadata; :class:`CommitRejected` naming the first problem otherwise."""
        try:
            return cls.model_validate(dict(raw or {}))
        except ValidationError as exc:
            raise CommitRejected(f"commit metadata {_first_problem(exc)}") from None
        except TypeError:  # not a mapping
            raise CommitRejected("commit metadata must be a JSON object") from None


class QueryRecord(BaseModel):
    """What the server keeps per streaming query (STATS' ``queries``, each checkpoint): the latest
    offsets committed, the rows of every accepted commit summed, and the highest batch id seen
    (-1 for untagged commits)."""

    model_config = ConfigDict(extra="forbid")

    offsets: Offsets = {}
    rows: Count = 0
    batch: Annotated[int, Field(strict=True, ge=-_INT64 - 1, le=_INT64)] = -1

    def add(self, meta: CommitMeta) -> None:
        if meta.offsets:
            self.offsets = meta.offsets
        self.rows += meta.rows


def least_advanced(records: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One ``queries`` mapping for several shards: per query, the record of the shard that is furthest
    behind (lowest batch, then fewest rows; a shard without the query counts as empty) -- what every
    shard holds."""
    records = list(records)
    empty = QueryRecord().model_dump()
    return {
        query: dict(min((shard.get(query, empty) for shard in records), key=lambda r: (r["batch"], r["rows"])))
        for query in sorted({q for shard in records for q in shard})
    }


def _first_problem(exc: ValidationError) -> str:
    """The first error, bounded: the offending input is never echoed (it may be huge)."""
    error = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])[:200]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {error['msg']}{more}"
