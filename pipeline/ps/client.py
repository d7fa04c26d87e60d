"""Clients of the parameter server, all with one API (:class:`ClientApi`): ``pull``, ``commit``, ``flush``,
``stats``, ``checkpoint``.

:class:`Client` talks to one shard over TCP, :class:`ShardedClient` scatters and gathers over
several in parallel, :class:`LocalClient` calls a :class:`~pipeline.ps.server.CenterState` in-process
(examples, tests, single-process runs). Each remembers the counter it last pulled, which a commit
reports unless told otherwise, so the server can measure staleness. A TCP client sends its commits in
the encoding it negotiated (:mod:`pipeline.ps.encoding`) and keeps what a lossy one held back until
``flush``.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Self

import numpy as np

from pipeline.ps.algorithms import UpdateRule, Weights
from pipeline.ps.encoding import Encoder
from pipeline.ps.meta import least_advanced
from pipeline.ps.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    Ack,
    Checkpointed,
    CommitTag,
    Frame,
    FrameReader,
    MsgType,
    ProtocolError,
    WireTensor,
    checked_secret,
    send_frame,
    settings_secret,
)
from pipeline.ps.server import CenterState
from pipeline.ps.sharding import addresses

log = logging.getLogger(__name__)

# error codes after which the server keeps the connection
_KEEPS_CONNECTION = {"rejected", "pull_timeout", "no_checkpoint", "checkpoint_failed"}


class ServerError(RuntimeError):
    """The server answered with an ERROR frame; ``code`` says why (``rejected``, ``pull_timeout``,
    ``no_checkpoint``, ``checkpoint_failed``, ``busy``, ``auth``, ``version``, ``too_large``,
    ``frame_timeout``, ``protocol``, ``internal``)."""

    def __init__(self, code: str, message: str, address: str):
        super().__init__(f"parameter server {address}: {message} ({code})")
        self.code = code


class ClientApi(ABC):
    """The API every client has; each kind implements how it pulls, commits, reports and checkpoints."""

    def pull(
        self, *, worker_id: int = 0, min_counter: int = 0, wait_s: float = 0.0
    ) -> tuple[dict[str, np.ndarray], int]:
        """The weights (fresh arrays the caller owns) and the update counter; waits up to ``wait_s``
        for the counter to reach ``min_counter``."""
        return self._pull(worker_id, min_counter, wait_s)

    def commit(
        self,
        delta: Weights,
        *,
        tag: CommitTag = CommitTag(),
        meta: Mapping[str, Any] | None = None,
        pulled: int | None = None,
    ) -> Ack:
        """Send a delta, counted from the update counter ``pulled`` (default: the last pull's)."""
        return self._commit(delta, tag, meta or {}, pulled)

    @property
    def lossy(self) -> bool:
        """Whether commits go in a lossy encoding, so a run must :meth:`flush` what it held back."""
        return False

    def flush(
        self, *, tag: CommitTag = CommitTag(), meta: Mapping[str, Any] | None = None, pulled: int | None = None
    ) -> Ack | None:
        """Commit exactly what a lossy encoding held back so far (error feedback), as :meth:`commit`
        would; None when nothing is held back."""
        return None

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abstractmethod
    def checkpoint(self) -> Checkpointed: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abstractmethod
    def _pull(self, worker_id: int, min_counter: int, wait_s: float) -> tuple[dict[str, np.ndarray], int]: ...

    @abstractmethod
    def _commit(self, delta: Weights, tag: CommitTag, meta: Mapping[str, Any], pulled: int | None) -> Ack: ...


class Client(ClientApi):
    """A connection to one parameter-server shard. Thread-safe (requests are serialised); reconnects
    on the next request after the server closed an idle connection.

    >>> from pipeline.ps.server import ParameterServer
    >>> with ParameterServer(CenterState({"w": np.zeros(2, np.float32)}, UpdateRule())) as server:
    ...     with Client(*server.address) as client:
    ...         weights, counter = client.pull()
    ...         client.commit({"w": weights["w"] + 1}, meta={"offsets": {"events": {"0": 42}}, "rows": 8})
    ...         client.stats()["queries"]
    Ack(status='applied', counter=1, staleness=0)
    {'': {'offsets': {'events': {'0': 42}}, 'rows': 8, 'batch': -1}}
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5700,
        *,
        secret: bytes | None = None,
        timeout_s: float = 60.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        encoding: str = "float32",
        topk_fraction: float = 0.05,
    ):
        self.address = f"{host}:{port}"
        self._encoder = Encoder(encoding, topk_fraction=topk_fraction)
        self._target = (host, port)
        self._secret = checked_secret(secret)
        self._timeout = timeout_s
        self._max_frame_bytes = max_frame_bytes
        self._sock: socket.socket | None = None
        self._reader: FrameReader | None = None
        self._lock = threading.Lock()
        self.pulled: int | None = None

    def _pull(self, worker_id: int, min_counter: int, wait_s: float) -> tuple[dict[str, np.ndarray], int]:
        request = Frame(
            MsgType.PULL, counter=min_counter, worker_id=worker_id, meta={"wait_s": wait_s} if wait_s else {}
        )
        reply = self._request(request, MsgType.WEIGHTS, wait_s)
        self.pulled = reply.counter
        weights = {}
        for name, value in reply.tensors.items():
            if not isinstance(value, np.ndarray):
                raise ProtocolError(f"parameter server {self.address} sent weights {name!r} as a sparse tensor")
            weights[name] = np.asarray(value, np.float32)  # float16 pulls become float32; float32 is not copied
        return weights, reply.counter

    @property
    def lossy(self) -> bool:
        return not self._encoder.exact

    def flush(
        self, *, tag: CommitTag = CommitTag(), meta: Mapping[str, Any] | None = None, pulled: int | None = None
    ) -> Ack | None:
        held = self._encoder.flush()
        return None if held is None else self._send_commit(held, tag, meta or {}, pulled)

    def _commit(self, delta: Weights, tag: CommitTag, meta: Mapping[str, Any], pulled: int | None) -> Ack:
        return self._send_commit(self._encoder.encode(delta), tag, meta, pulled)

    def _send_commit(
        self, tensors: Mapping[str, WireTensor], tag: CommitTag, meta: Mapping[str, Any], pulled: int | None
    ) -> Ack:
        based_on = (self.pulled or 0) if pulled is None else pulled
        request = Frame(
            MsgType.COMMIT,
            counter=based_on,
            worker_id=tag.worker_id,
            query_id=tag.query_id,
            batch_id=tag.batch_id,
            seq=tag.seq,
            tensors=tensors,
            meta=meta,
        )
        reply = self._request(request, MsgType.ACK)
        return Ack(str(reply.meta.get("status")), reply.counter, int(reply.meta.get("staleness", 0)))

    def stats(self) -> dict[str, Any]:
        return dict(self._request(Frame(MsgType.STATS), MsgType.STATS_REPLY).meta)

    def checkpoint(self) -> Checkpointed:
        """Have the server write its checkpoint now (unless nothing changed since its last one); returns
        once it is durable. Raises :class:`ServerError` ``no_checkpoint`` or ``checkpoint_failed``."""
        reply = self._request(Frame(MsgType.CHECKPOINT), MsgType.CHECKPOINT_REPLY)
        return Checkpointed(
            reply.counter,
            dict(reply.meta.get("queries", {})),
            bool(reply.meta.get("written")),
            str(reply.meta.get("incarnation", "")),
        )

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def _request(self, request: Frame, expect: MsgType, wait_s: float = 0.0) -> Frame:
        with self._lock:
            sock, reader = self._connection()
            try:
                sock.settimeout(self._timeout)
                send_frame(sock, request, self._secret)
                reply = reader.read(idle_timeout=self._timeout + wait_s, frame_timeout=self._timeout + wait_s)
            except (OSError, ProtocolError):
                self._disconnect()
                raise
            if reply is None:
                self._disconnect()
                raise ConnectionError(f"parameter server {self.address} closed the connection")
            if reply.type == MsgType.ERROR:
                code = str(reply.meta.get("code", "unknown"))
                if code not in _KEEPS_CONNECTION:
                    self._disconnect()
                raise ServerError(code, str(reply.meta.get("error", "no message")), self.address)
            if reply.type != expect:
                self._disconnect()
                raise ProtocolError(
                    f"parameter server {self.address} answered {reply.type.name} to {request.type.name}"
                )
            return reply

    def _connection(self) -> tuple[socket.socket, FrameReader]:
        if self._sock is not None and not _still_open(self._sock):
            log.debug("parameter server %s closed the idle connection; reconnecting", self.address)
            self._disconnect()
        if self._sock is None:
            sock = socket.create_connection(self._target, timeout=self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._reader = FrameReader(sock, secret=self._secret, max_frame_bytes=self._max_frame_bytes)
            if not self._encoder.exact:
                self._hello(sock, self._reader)
        assert self._reader is not None  # set and cleared together with _sock
        return self._sock, self._reader

    def _hello(self, sock: socket.socket, reader: FrameReader) -> None:
        """Ask the server for this client's encoding (a float32 client asks nothing: the default)."""
        try:
            send_frame(sock, Frame(MsgType.HELLO, meta={"encoding": self._encoder.encoding}), self._secret)
            reply = reader.read(idle_timeout=self._timeout, frame_timeout=self._timeout)
        except (OSError, ProtocolError):
            self._disconnect()
            raise
        if reply is None or reply.type != MsgType.HELLO_REPLY:
            self._disconnect()
            if reply is not None and reply.type == MsgType.ERROR:
                raise ServerError(str(reply.meta.get("code")), str(reply.meta.get("error")), self.address)
            raise ConnectionError(f"parameter server {self.address} did not accept encoding {self._encoder.encoding}")

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None


def _still_open(sock: socket.socket) -> bool:
    """False if the peer closed (or sent unexpected bytes) while the connection sat idle."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


class ShardedClient(ClientApi):
    """The :class:`Client` API over K shards: one connection per shard, pulls gathered and commits
    scattered in parallel threads. The returned counter is the lowest shard's; each shard is told
    the counter it served at the last pull, so staleness is measured per shard."""

    def __init__(
        self,
        shards: list[tuple[str, int]],
        *,
        secret: bytes | None = None,
        timeout_s: float = 60.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        encoding: str = "float32",
        topk_fraction: float = 0.05,
    ):
        if not shards:
            raise ValueError("a sharded client needs at least one shard address")
        self.clients = [
            Client(
                host,
                port,
                secret=secret,
                timeout_s=timeout_s,
                max_frame_bytes=max_frame_bytes,
                encoding=encoding,
                topk_fraction=topk_fraction,
            )
            for host, port in shards
        ]
        self._pool = ThreadPoolExecutor(max_workers=len(shards), thread_name_prefix="ps-shard")
        self._owner: dict[str, int] | None = None
        self._smallest: list[tuple[str, tuple[int, ...]]] | None = None  # per shard: its smallest tensor

    @property
    def pulled(self) -> int | None:
        counters = [c.pulled for c in self.clients]
        known = [c for c in counters if c is not None]
        return min(known) if len(known) == len(counters) else None

    def _pull(self, worker_id: int, min_counter: int, wait_s: float) -> tuple[dict[str, np.ndarray], int]:
        parts = self._each(lambda c, _: c.pull(worker_id=worker_id, min_counter=min_counter, wait_s=wait_s))
        self._learn_layout([{name: value.shape for name, value in weights.items()} for weights, _ in parts])
        return {name: value for weights, _ in parts for name, value in weights.items()}, min(c for _, c in parts)

    def _commit(self, delta: Weights, tag: CommitTag, meta: Mapping[str, Any], pulled: int | None) -> Ack:
        """Every shard gets a commit so the shards' counters and replay guards move together: its part
        of ``delta``, or when that is empty, zeros for its smallest tensor (a shard refuses empty commits)."""
        if not delta:
            raise ValueError("a commit needs at least one tensor")
        owner = self._layout()
        assert self._smallest is not None  # learnt with the layout
        parts: list[dict[str, np.ndarray]] = [{} for _ in self.clients]
        for name, value in delta.items():
            if name not in owner:
                raise ValueError(f"tensor {name!r} is on no shard")
            parts[owner[name]][name] = value
        for part, (name, shape) in zip(parts, self._smallest):
            if not part:
                part[name] = np.zeros(shape, np.float32)
        acks = self._each(lambda c, i: c.commit(parts[i], tag=tag, meta=meta, pulled=pulled))
        return Ack.combine(acks)

    @property
    def lossy(self) -> bool:
        return self.clients[0].lossy

    def flush(
        self, *, tag: CommitTag = CommitTag(), meta: Mapping[str, Any] | None = None, pulled: int | None = None
    ) -> Ack | None:
        """Every shard commits what it held back (every shard got every commit, so each holds some)."""
        acks = [a for a in self._each(lambda c, _: c.flush(tag=tag, meta=meta, pulled=pulled)) if a is not None]
        return Ack.combine(acks) if acks else None

    def stats(self) -> dict[str, Any]:
        """Totals over the shards, ``queries`` as every shard has them (the least advanced record), and
        each shard's own stats under ``shards``."""
        shards = self._each(lambda c, _: c.stats())
        return {
            "counter": min(s["counter"] for s in shards),
            "incarnation": ",".join(s["incarnation"] for s in shards),
            "bytes_in": sum(s["bytes_in"] for s in shards),
            "bytes_out": sum(s["bytes_out"] for s in shards),
            "queries": least_advanced(s["queries"] for s in shards),
            "shards": shards,
        }

    def checkpoint(self) -> Checkpointed:
        """Every shard checkpoints now (in parallel); the answer is what all of them made durable, or
        the first shard's failure."""
        return Checkpointed.combine(self._each(lambda c, _: c.checkpoint()))

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self._pool.shutdown()

    def _layout(self) -> dict[str, int]:
        if self._owner is None:
            self._learn_layout(
                [
                    {name: tuple(shape) for name, shape in s["tensors"].items()}
                    for s in self._each(lambda c, _: c.stats())
                ]
            )
        assert self._owner is not None  # set by _learn_layout
        return self._owner

    def _learn_layout(self, shapes: list[dict[str, tuple[int, ...]]]) -> None:
        self._owner = {name: i for i, shard in enumerate(shapes) for name in shard}
        self._smallest = [min(shard.items(), key=lambda item: (int(np.prod(item[1])), item[0])) for shard in shapes]

    def _each(self, call: Callable[[Client, int], Any]) -> list:
        """``call(client, shard_index)`` on every shard in parallel; the first failure is raised."""
        futures = [self._pool.submit(call, client, i) for i, client in enumerate(self.clients)]
        return [f.result() for f in futures]


class LocalClient(ClientApi):
    """The client API over an in-process :class:`~pipeline.ps.server.CenterState` (no sockets).
    Pulls return copies, as over the network, so a model can never write into the center."""

    def __init__(self, state: CenterState):
        self.state = state
        self.pulled: int | None = None

    @classmethod
    def serving(cls, weights: Mapping[str, np.ndarray], rule: UpdateRule | None = None) -> LocalClient:
        """A client over a fresh state holding ``weights`` with ``rule`` (default: add deltas)."""
        return cls(CenterState(weights, rule or UpdateRule()))

    def _pull(self, worker_id: int, min_counter: int, wait_s: float) -> tuple[dict[str, np.ndarray], int]:
        weights, counter = self.state.pull(worker_id, min_counter, wait_s)
        self.pulled = counter
        return {name: value.copy() for name, value in weights.items()}, counter

    def _commit(self, delta: Weights, tag: CommitTag, meta: Mapping[str, Any], pulled: int | None) -> Ack:
        return self.state.commit(delta, pulled=(self.pulled or 0) if pulled is None else pulled, tag=tag, meta=meta)

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def checkpoint(self) -> Checkpointed:
        """An in-process state has no checkpoint directory: always ``no_checkpoint``, as from such a server."""
        raise ServerError("no_checkpoint", "an in-process state has no checkpoint directory", "local")

    def close(self) -> None:
        """An in-process state holds no connection."""


def client_for(
    addresses: list[tuple[str, int]],
    *,
    secret: bytes | None = None,
    timeout_s: float = 60.0,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    encoding: str = "float32",
    topk_fraction: float = 0.05,
) -> Client | ShardedClient:
    """A :class:`Client` for one address, a :class:`ShardedClient` over several (shard order)."""
    options: dict[str, Any] = {
        "secret": secret,
        "timeout_s": timeout_s,
        "max_frame_bytes": max_frame_bytes,
        "encoding": encoding,
        "topk_fraction": topk_fraction,
    }
    if len(addresses) == 1:
        return Client(*addresses[0], **options)
    return ShardedClient(addresses, **options)


def connect(
    settings, *, timeout_s: float | None = None, at: list[tuple[str, int]] | None = None
) -> Client | ShardedClient:
    """The client for the parameter server the settings describe (``ps_host``, ``ps_port``,
    ``ps_shards``, ``ps_secret``); ``at`` overrides the addresses (shards bound to free ports)."""
    return client_for(
        addresses(settings.ps_host, settings.ps_port, settings.ps_shards) if at is None else at,
        secret=settings_secret(settings),
        timeout_s=settings.ps_io_timeout_s if timeout_s is None else timeout_s,
        max_frame_bytes=settings.ps_max_frame_bytes,
    )
