"""One parameter-server shard: the center variable and the TCP server in front of it.

Locking discipline (dist-keras had none worth the name): all state lives in :class:`CenterState`
behind one condition variable, and the center variable is copy-on-write -- a commit builds new
arrays and swaps the dict, nothing is ever changed in place. A pull therefore takes the lock only to
grab a reference and sends 4 MB straight from those arrays with the lock released, while commits
keep applying. Checkpoints and publishing run in their own threads from snapshots, never on the
request path.

The transport does not know algorithms: the update rule object decides what a commit does.

A client is not trusted to be well-behaved: every commit's metadata is held to a schema
(:mod:`pipeline.ps.meta`), every failure of a request is answered with an ERROR frame on that
connection only, and a peer without the shared secret can cost the server at most one frame header
on one of ``max_connections`` connections.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.pruning import checked_masks, masked
from pipeline.ps.algorithms import CommitRejected, UpdateRule
from pipeline.ps.checkpoint import Checkpoint, CheckpointError, Snapshot
from pipeline.ps.encoding import ENCODINGS, pull_tensors
from pipeline.ps.meta import CommitMeta, QueryRecord
from pipeline.ps.metrics import ServerMetrics
from pipeline.ps.periodic import Periodic
from pipeline.ps.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    Ack,
    Checkpointed,
    CommitTag,
    Frame,
    FrameReader,
    MsgType,
    ProtocolError,
    SparseTensor,
    TruncatedFrame,
    UnknownEncoding,
    WireTensor,
    checked_secret,
    error_frame,
    send_frame,
    settings_secret,
)
from pipeline.ps.throttle import TokenBucket

log = logging.getLogger(__name__)

PublishCallback = Callable[[dict[str, np.ndarray], int, dict[str, Any]], None]


class PullTimeout(TimeoutError):
    """The center variable did not reach the requested update counter within the wait."""


class ReplayGuard:
    """Recognises replayed commits: per streaming query, the highest batch id seen and the
    ``(worker_id, seq)`` pairs applied within it. A Spark micro-batch replayed after a crash re-sends
    the same tags, so it is acknowledged as skipped instead of training twice. Also keeps each query's
    :class:`~pipeline.ps.meta.QueryRecord` (latest offsets, rows trained, highest batch), untagged
    commits under ``""``.
    """

    def __init__(self):
        self._applied: dict[str, set[tuple[int, int]]] = {}
        self.records: dict[str, QueryRecord] = {}

    @classmethod
    def from_json(cls, queries: Mapping[str, Any]) -> ReplayGuard:
        """The inverse of :meth:`to_json`. Stored metadata that fails the schema (written before it
        existed) is dropped with an error in the log: the replay guard itself is kept. Checkpoints
        from before ``rows`` was counted keep their offsets under ``meta`` and start at 0 rows."""
        guard = cls()
        try:
            for query, entry in queries.items():
                batch, applied = int(entry["batch"]), {(int(w), int(s)) for w, s in entry["applied"]}
                try:
                    source = entry["meta"] if "meta" in entry else entry
                    fields = {name: source[name] for name in ("offsets", "rows") if name in source}
                    record = QueryRecord.model_validate({**fields, "batch": batch})
                except (TypeError, ValueError) as exc:
                    log.error(
                        "checkpoint: query %r has invalid metadata, dropped (its replay guard is kept): %s",
                        query,
                        " ".join(str(exc).split())[:300],
                    )
                    record = QueryRecord(batch=batch)
                guard.records[str(query)], guard._applied[str(query)] = record, applied
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint's replay guard is malformed: {exc!r}") from None
        return guard

    def seen(self, tag: CommitTag) -> bool:
        if not tag.query_id or tag.query_id not in self.records:
            return False
        highest = self.records[tag.query_id].batch
        return tag.batch_id < highest or (
            tag.batch_id == highest and (tag.worker_id, tag.seq) in self._applied[tag.query_id]
        )

    def record(self, tag: CommitTag, meta: CommitMeta) -> None:
        record = self.records.setdefault(tag.query_id, QueryRecord())
        record.add(meta)
        if not tag.query_id:
            return
        if tag.query_id not in self._applied or tag.batch_id > record.batch:
            record.batch = tag.batch_id
            self._applied[tag.query_id] = set()
        self._applied[tag.query_id].add((tag.worker_id, tag.seq))

    def queries(self) -> dict[str, dict[str, Any]]:
        """STATS' ``queries``: ``{query: {"offsets": {topic: {partition: offset}}, "rows": n, "batch": id}}``."""
        return {query: record.model_dump() for query, record in sorted(self.records.items())}

    def to_json(self) -> dict[str, Any]:
        return {
            query: {**record, "applied": sorted(self._applied.get(query, ()))}
            for query, record in self.queries().items()
        }


@dataclass(frozen=True)
class WorkerStaleness:
    """One worker's accepted commits and how stale they were (updates landed since its pull)."""

    commits: int = 0
    total: int = 0
    max: int = 0
    last: int = 0

    def after(self, staleness: int) -> WorkerStaleness:
        """These counts with one more commit of ``staleness``.

        >>> WorkerStaleness().after(3).after(1)
        WorkerStaleness(commits=2, total=4, max=3, last=1)
        """
        return WorkerStaleness(self.commits + 1, self.total + staleness, max(self.max, staleness), staleness)

    def stats(self) -> dict[str, float]:
        """STATS' entry for this worker."""
        return {
            "commits": self.commits,
            "staleness_mean": self.total / self.commits,
            "staleness_max": self.max,
            "staleness_last": self.last,
        }


class CenterState:
    """The center variable (name -> read-only float32 array), the update counter and the bookkeeping
    a commit changes, all behind one lock. Usable in-process (:class:`~pipeline.ps.client.LocalClient`)
    or behind :class:`ParameterServer`.
    """

    def __init__(
        self,
        weights: Mapping[str, np.ndarray],
        rule: UpdateRule,
        *,
        counter: int = 0,
        guard: ReplayGuard | None = None,
        dtype: type = np.float32,
        masks: Mapping[str, np.ndarray] | None = None,
    ):
        """``dtype`` float64 only in process, to prove an algorithm's maths exact (tests/test_algorithms.py):
        the wire and checkpoints carry float32. ``masks`` (a pruned version's, :mod:`pipeline.pruning`)
        multiply every committed delta, so the pruned weights stay exactly zero whatever workers send."""
        if not weights:
            raise ValueError("the center variable needs at least one tensor")
        self.dtype = dtype
        self.masks = {name: _frozen(mask) for name, mask in checked_masks(weights, masks or {}).items()}
        self._center = {
            name: _frozen(np.array(value, dtype=dtype, order="C"))
            for name, value in masked(weights, self.masks).items()
        }
        self.shapes = {name: value.shape for name, value in self._center.items()}
        self.rule = rule
        self._counter = counter
        self.incarnation = uuid.uuid4().hex[:12]  # this in-memory state: a restart is a new one
        self._guard = guard or ReplayGuard()
        self._cond = threading.Condition()
        self._changes = 0
        self._tally = {"applied": 0, "pending": 0, "skipped": 0}
        self._workers: dict[int, WorkerStaleness] = {}

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, rule: UpdateRule) -> CenterState:
        rule.restore(snapshot.rule_tensors, snapshot.rule_state)
        return cls(
            snapshot.weights,
            rule,
            counter=snapshot.counter,
            guard=ReplayGuard.from_json(snapshot.guard),
            masks=snapshot.masks,
        )

    @classmethod
    def resume(
        cls,
        checkpoint: Checkpoint,
        rule: UpdateRule,
        initial: Callable[[], Mapping[str, np.ndarray]],
        initial_masks: Callable[[], Mapping[str, np.ndarray]] = dict,
    ) -> tuple[CenterState, bool]:
        """The state saved in ``checkpoint`` and True, or, when there is none, a fresh state from
        ``initial()`` and ``initial_masks()`` (only then called, e.g. loading the registry's champion) and False."""
        snapshot = checkpoint.load()
        if snapshot is None:
            return cls(initial(), rule, masks=initial_masks()), False
        return cls.from_snapshot(snapshot, rule), True

    @property
    def counter(self) -> int:
        return self._counter

    @property
    def changes(self) -> int:
        """Accepted commits so far (applied or pending): what a checkpoint would miss."""
        return self._changes

    def pull(
        self, worker_id: int = 0, min_counter: int = 0, wait_s: float = 0.0
    ) -> tuple[Mapping[str, np.ndarray], int]:
        """The weights this worker should train from (read-only arrays) and the counter, waiting up to
        ``wait_s`` for the counter to reach ``min_counter`` (a synchronous round to close)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._counter >= min_counter, timeout=wait_s):
                raise PullTimeout(f"update {min_counter} not reached within {wait_s:g}s (counter is {self._counter})")
            return self.rule.view(self._center, worker_id), self._counter

    def commit(
        self,
        delta: Mapping[str, WireTensor],
        *,
        pulled: int,
        tag: CommitTag = CommitTag(),
        meta: Mapping[str, Any] | None = None,
    ) -> Ack:
        """Apply a commit through the rule unless its tag was already applied.

        ``pulled`` is the counter the worker last pulled; staleness is how many updates landed since.
        ``delta`` arrays are only read during the call (they may be views of a receive buffer);
        sparse tensors (top-k commits) are made dense once their shape is checked, then multiplied by
        a pruned center's masks. A delta without tensors, or metadata outside
        :class:`~pipeline.ps.meta.CommitMeta`, is rejected (:class:`CommitRejected`) before anything changes.
        """
        checked = masked(self._checked(self._densified(delta)), self.masks)
        checked_meta = CommitMeta.parse(meta)
        with self._cond:
            if self._guard.seen(tag):
                self._tally["skipped"] += 1
                return Ack("skipped", self._counter, max(self._counter - pulled, 0))
            staleness = max(self._counter - pulled, 0)
            new = self.rule.apply(self._center, checked, worker_id=tag.worker_id, staleness=staleness)
            self._guard.record(tag, checked_meta)
            self._workers[tag.worker_id] = self._workers.get(tag.worker_id, WorkerStaleness()).after(staleness)
            self._changes += 1
            if new is None:
                status = "pending"
            else:
                self._center = {name: _frozen(value) for name, value in new.items()}
                self._counter += 1
                status = "applied"
            self._tally[status] += 1
            self._cond.notify_all()
            return Ack(status, self._counter, staleness)

    def snapshot(self) -> Snapshot:
        with self._cond:
            rule_tensors, rule_state = self.rule.state()
            return Snapshot(
                counter=self._counter,
                weights=self._center,
                rule_tensors=rule_tensors,
                rule_state=rule_state,
                guard=self._guard.to_json(),
                masks=self.masks,
            )

    def publication(self) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
        """What ``on_publish`` receives: the rule's published weights, the counter, and metadata with
        each query's record (latest Kafka offsets, rows, batch) under ``commits``."""
        with self._cond:
            meta = {"counter": self._counter, "rule": self.rule.name, "commits": self._guard.queries()}
            return dict(self.rule.published(self._center)), self._counter, meta

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "counter": self._counter,
                "incarnation": self.incarnation,
                "rule": self.rule.name,
                "commits": dict(self._tally),
                "queries": self._guard.queries(),
                "tensors": {name: list(shape) for name, shape in self.shapes.items()},
                "parameters": sum(int(np.prod(shape)) for shape in self.shapes.values()),
                "workers": {str(w): staleness.stats() for w, staleness in sorted(self._workers.items())},
            }

    def wait(self, predicate: Callable[[CenterState], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (re-checked after every change and :meth:`wake`)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _densified(self, delta: Mapping[str, WireTensor]) -> dict[str, np.ndarray]:
        """``delta`` with its sparse tensors made dense, each once its shape is known to be the center's."""
        dense = {}
        for name, wire in delta.items():
            if isinstance(wire, SparseTensor):
                if wire.shape != self.shapes.get(name):
                    raise CommitRejected(f"sparse tensor {name!r}: shape {wire.shape} is not a center tensor's")
                wire = wire.dense()
            dense[name] = np.asarray(wire)
        return dense

    def _checked(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not delta:
            raise CommitRejected("the commit has no tensors")
        checked = {}
        for name, value in delta.items():
            if name not in self.shapes:
                raise CommitRejected(f"unknown tensor {name!r}")
            value = np.asarray(value, dtype=self.dtype)
            if value.shape != self.shapes[name]:
                raise CommitRejected(f"tensor {name!r}: shape {value.shape} does not match {self.shapes[name]}")
            if not np.isfinite(value).all():
                raise CommitRejected(f"tensor {name!r}: non-finite values")
            checked[name] = value
        return checked


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class ParameterServer:
    """Serves one :class:`CenterState` over TCP, one thread per connection.

    Malformed, oversized, wrong-version or unauthenticated frames get an ERROR frame and the
    connection is closed; a frame that stalls is cut off after ``io_timeout_s``, an idle connection
    after ``idle_timeout_s`` (a new one whose first frame does not start within ``io_timeout_s``).
    Beyond ``max_connections`` a connection gets a ``busy`` ERROR frame and is closed. Any failure
    while handling a request is answered on its own connection; other clients are unaffected.

    ``secret`` turns on HMAC (an empty one is an error). With a ``checkpoint``, a CHECKPOINT request
    writes it synchronously; without one it is answered ``no_checkpoint``. A connection's first frame
    may be a HELLO naming an encoding (:mod:`pipeline.ps.encoding`; float32 otherwise): its pulls are
    sent in it, an unknown one gets an ``encoding`` ERROR. ``link_bytes_per_s`` holds all
    connections together to that rate each way (:mod:`pipeline.ps.throttle`).

    >>> import numpy as np
    >>> from pipeline.ps.algorithms import UpdateRule
    >>> from pipeline.ps.client import Client
    >>> state = CenterState({"w": np.zeros(3, np.float32)}, UpdateRule())
    >>> with ParameterServer(state) as server, Client(*server.address) as client:
    ...     weights, counter = client.pull()
    ...     client.commit({"w": np.ones(3, np.float32)}).status
    'applied'
    >>> state.pull()
    ({'w': array([1., 1., 1.], dtype=float32)}, 1)
    """

    def __init__(
        self,
        state: CenterState,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: bytes | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        io_timeout_s: float = 60.0,
        idle_timeout_s: float = 600.0,
        max_connections: int = 64,
        checkpoint: Checkpoint | None = None,
        checkpoint_every_updates: int = 200,
        checkpoint_every_s: float = 30.0,
        on_publish: PublishCallback | None = None,
        publish_every_updates: int = 100,
        publish_every_s: float = 20.0,
        link_bytes_per_s: float | None = None,
    ):
        self.state = state
        self._bind = (host, port)
        self._secret = checked_secret(secret)
        self._max_frame_bytes = max_frame_bytes
        self._io_timeout = io_timeout_s
        self._idle_timeout = idle_timeout_s
        self._max_connections = max_connections
        self.metrics = ServerMetrics(self.stats)
        self._periodic: list[Periodic] = []
        self._checkpointing: Periodic | None = None
        if checkpoint is not None:
            self._checkpoint = checkpoint
            self._durable = Checkpointed(state.counter, state.stats()["queries"], written=False)
            self._checkpointing = Periodic(
                "checkpoint",
                state,
                self.metrics.timed("checkpoint", self._save_checkpoint),
                checkpoint_every_updates,
                checkpoint_every_s,
            )
            self._periodic.append(self._checkpointing)
        if on_publish is not None:

            def publish() -> None:  # what on_publish returns is not a counter it covered
                on_publish(*state.publication())

            self._periodic.append(
                Periodic(
                    "publish", state, self.metrics.timed("publish", publish), publish_every_updates, publish_every_s
                )
            )
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._bytes = {"in": 0, "out": 0}
        self._link = {way: TokenBucket(link_bytes_per_s) for way in ("in", "out")} if link_bytes_per_s else None

    @classmethod
    def from_settings(cls, state: CenterState, settings, *, port: int | None = None, **kwargs: Any) -> ParameterServer:
        """A server configured from ``pipeline.settings.Settings`` (``port`` overrides ``ps_port``)."""
        return cls(
            state,
            host=settings.ps_host,
            port=settings.ps_port if port is None else port,
            secret=settings_secret(settings),
            max_frame_bytes=settings.ps_max_frame_bytes,
            io_timeout_s=settings.ps_io_timeout_s,
            idle_timeout_s=settings.ps_idle_timeout_s,
            max_connections=settings.ps_max_connections,
            checkpoint_every_updates=settings.ps_checkpoint_every_updates,
            checkpoint_every_s=settings.ps_checkpoint_every_s,
            publish_every_updates=settings.ps_publish_every_updates,
            publish_every_s=settings.ps_publish_every_s,
            link_bytes_per_s=settings.ps_link_mbps * 1e6 if settings.ps_link_mbps else None,
            **kwargs,
        )

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the server is not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    def start(self) -> ParameterServer:
        listener = socket.create_server(self._bind, backlog=128, reuse_port=False)
        listener.settimeout(0.5)  # a fallback: stop() wakes accept() by shutting the listener down
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"ps-accept-{self.address[1]}", daemon=True
        )
        self._accept_thread.start()
        for periodic in self._periodic:
            periodic.start()
        log.info(
            "parameter server on %s:%d: %d tensors, counter %d, rule %s",
            *self.address,
            len(self.state.shapes),
            self.state.counter,
            self.state.rule.name,
        )
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection, then write the final checkpoint and publication."""
        listener = self._listener
        if self._stopping.is_set() or self._accept_thread is None or listener is None:
            return
        address = self.address
        self._stopping.set()
        _shutdown(listener)
        self._accept_thread.join()
        listener.close()
        with self._lock:
            for conn in self._connections:
                _shutdown(conn)
        for periodic in self._periodic:
            periodic.stop(final=True)
        log.info("parameter server on %s:%d stopped at counter %d", *address, self.state.counter)

    def __enter__(self) -> ParameterServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        stats = self.state.stats()
        with self._lock:
            stats.update(bytes_in=self._bytes["in"], bytes_out=self._bytes["out"], connections=len(self._connections))
        stats.update({p.name: dict(p.info) for p in self._periodic})
        return stats

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None  # start() binds it before starting this thread
        while not self._stopping.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stopping.is_set():
                    log.warning("accepting a connection failed: %s", exc)  # e.g. out of file descriptors
                    time.sleep(0.1)
                continue
            try:
                self._admit(conn, f"{peer[0]}:{peer[1]}")
            except Exception:  # e.g. no thread can be started: drop this one, keep accepting
                log.exception("could not serve a connection from %s:%d", *peer[:2])
                with self._lock:
                    self._connections.discard(conn)
                conn.close()

    def _admit(self, conn: socket.socket, peer: str) -> None:
        with self._lock:
            busy = len(self._connections) >= self._max_connections
            if not busy:
                self._connections.add(conn)
        if busy:
            self.metrics.refused.labels("busy").inc()
            log.warning("%s refused: %d connections already open (ps_max_connections)", peer, self._max_connections)
            try:
                conn.settimeout(1.0)  # a fresh socket's send buffer is empty: this does not block
                self._send(conn, error_frame("busy", f"the server already has {self._max_connections} connections"))
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is gone already
            conn.close()
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=self._serve, args=(conn, peer), name=f"ps-conn-{peer}", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        """One connection's requests until it closes; nothing escapes this thread."""
        try:
            self._converse(conn, peer)
        except OSError as exc:
            log.info("connection with %s lost: %s", peer, exc)
        except Exception:  # a bug must cost this connection only
            log.exception("connection with %s failed", peer)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _converse(self, conn: socket.socket, peer: str) -> None:
        reader = FrameReader(conn, secret=self._secret, max_frame_bytes=self._max_frame_bytes, reuse_buffer=True)
        idle_timeout = min(self._io_timeout, self._idle_timeout)  # a new connection must speak soon
        link = _Link()
        while not self._stopping.is_set():
            try:
                request = reader.read(idle_timeout=idle_timeout, frame_timeout=self._io_timeout)
            except TruncatedFrame:
                self.metrics.refused.labels("truncated").inc()
                log.warning("%s closed the connection in the middle of a frame", peer)
                return
            except ProtocolError as exc:
                self.metrics.refused.labels(exc.code).inc()
                log.warning("%s sent a bad frame (%s); closing the connection", peer, exc)
                self._send(conn, error_frame(exc.code, str(exc)))
                _linger(conn)
                return
            except TimeoutError:
                log.info("%s idle for %gs; closing the connection", peer, idle_timeout)
                return
            if request is None:
                return
            idle_timeout = self._idle_timeout
            with self._lock:
                self._bytes["in"] += reader.last_size
            if self._link:
                self._link["in"].take(reader.last_size)
            reply, keep_open = self._handle(request, peer, link)
            if not self._send(conn, reply) or not keep_open:
                _linger(conn)
                return

    def _handle(self, request: Frame, peer: str, link: _Link) -> tuple[Frame, bool]:
        """The reply to one request, and whether the connection stays open."""
        try:
            if request.type == MsgType.HELLO:
                encoding = request.meta.get("encoding")
                if encoding not in ENCODINGS:
                    raise UnknownEncoding(f"unknown encoding {encoding!r}; this server speaks {', '.join(ENCODINGS)}")
                link.encoding = encoding
                return Frame(MsgType.HELLO_REPLY, counter=self.state.counter, meta={"encoding": encoding}), True
            if request.type == MsgType.PULL:
                wait_s = request.meta.get("wait_s", 0.0)
                if not isinstance(wait_s, (int, float)) or not wait_s >= 0:
                    raise ProtocolError("wait_s must be a non-negative number of seconds")
                weights, counter = self.state.pull(request.worker_id, request.counter, min(wait_s, self._idle_timeout))
                self.metrics.pulls.inc()
                tensors = pull_tensors(weights, link.encoding)
                return Frame(MsgType.WEIGHTS, counter=counter, worker_id=request.worker_id, tensors=tensors), True
            if request.type == MsgType.COMMIT:
                tag = CommitTag(request.query_id, request.batch_id, request.worker_id, request.seq)
                ack = self.state.commit(request.tensors, pulled=request.counter, tag=tag, meta=request.meta)
                if ack.status != "skipped":
                    self.metrics.staleness.observe(ack.staleness)
                return Frame(
                    MsgType.ACK,
                    counter=ack.counter,
                    worker_id=request.worker_id,
                    meta={"status": ack.status, "staleness": ack.staleness},
                ), True
            if request.type == MsgType.STATS:
                return Frame(MsgType.STATS_REPLY, counter=self.state.counter, meta=self.stats()), True
            if request.type == MsgType.CHECKPOINT:
                return self._checkpoint_now(peer), True
            raise ProtocolError(f"a client may not send {request.type.name} frames")
        except ProtocolError as exc:
            self.metrics.refused.labels(exc.code).inc()
            log.warning("%s: %s; closing the connection", peer, exc)
            return error_frame(exc.code, str(exc)), False
        except CommitRejected as exc:
            self.metrics.refused.labels("rejected").inc()
            log.warning("%s: commit rejected: %s", peer, exc)
            return error_frame("rejected", str(exc)), True
        except PullTimeout as exc:
            return error_frame("pull_timeout", str(exc)), True
        except Exception:  # a bug in one request must not take the server down
            self.metrics.refused.labels("internal").inc()
            log.exception("%s: request %s failed", peer, request.type.name)
            return error_frame("internal", "internal server error; see the server log"), False

    def _checkpoint_now(self, peer: str) -> Frame:
        """Write the checkpoint now unless the last one covers every change, and answer with what is durable."""
        if self._checkpointing is None:
            return error_frame("no_checkpoint", "this server has no checkpoint directory")
        try:
            written = self._checkpointing.run_now()
        except Exception as exc:  # the caller must learn that its updates are not durable
            log.exception("%s: checkpoint on request failed", peer)
            return error_frame("checkpoint_failed", f"{type(exc).__name__}: {exc}"[:500])
        durable = self._durable
        return Frame(
            MsgType.CHECKPOINT_REPLY,
            counter=durable.counter,
            meta={"queries": durable.queries, "written": written, "incarnation": self.state.incarnation},
        )

    def _save_checkpoint(self) -> None:
        snapshot = self.state.snapshot()
        self._checkpoint.save(snapshot)
        queries = {query: {k: v for k, v in entry.items() if k != "applied"} for query, entry in snapshot.guard.items()}
        self._durable = Checkpointed(snapshot.counter, queries, written=True)

    def _send(self, conn: socket.socket, frame: Frame) -> bool:
        """Send ``frame``; if it cannot be encoded (a bug: a reply with NaN or a bad dtype), send an
        ``internal`` ERROR frame instead and return False: the connection is to be closed."""
        conn.settimeout(self._io_timeout)
        pace = self._link["out"].take if self._link else None
        try:
            sent, sent_frame = send_frame(conn, frame, self._secret, pace=pace), True  # encodes before sending
        except (TypeError, ValueError):
            log.exception("a %s reply could not be encoded", frame.type.name)
            failed = error_frame("internal", "the reply could not be encoded; see the server log")
            sent, sent_frame = send_frame(conn, failed, self._secret, pace=pace), False
        with self._lock:
            self._bytes["out"] += sent
        return sent_frame


@dataclass
class _Link:
    """What one connection negotiated: the encoding its pulls are sent in."""

    encoding: str = "float32"


def _linger(conn: socket.socket) -> None:
    """Before closing after an error reply: end our side and drain (briefly, boundedly) what the peer
    is still sending, so the kernel does not answer unread bytes with a reset that destroys the reply
    before the peer reads it."""
    deadline = time.monotonic() + 1.0
    drained = 0
    try:
        conn.shutdown(socket.SHUT_WR)
        while drained < 1 << 20 and (remaining := deadline - time.monotonic()) > 0:
            conn.settimeout(remaining)
            chunk = conn.recv(1 << 16)
            if not chunk:
                return
            drained += len(chunk)
    except OSError:
        pass  # the peer is gone; nothing left to protect


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected, or already closed by the peer
