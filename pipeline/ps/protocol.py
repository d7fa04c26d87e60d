"""Binary frames of the parameter-server protocol: no pickle, bounded sizes, optional HMAC.

dist-keras pickled Python objects over unauthenticated sockets; anyone who could reach the port could
run code on the parameter server. A frame here is plain data, and a receiver checks every length
against a bound before it allocates anything. Layout on the wire (version 2)::

    header      HEADER.size bytes, little-endian: magic, version, type, flags, table/meta/data lengths,
                counter, batch id, commit seq, worker id, query id (UTF-8, NUL padded)
    header mac  32 bytes when FLAG_MAC is set: HMAC-SHA256 of the header
    table       per tensor: u16 name length, UTF-8 name, u8 dtype code (| SPARSE | SCALED), u8 ndim,
                ndim x u64 dims, then u64 nnz when SPARSE, then f32 scale when SCALED
    metadata    a JSON object (UTF-8), possibly empty: Kafka offsets, ACK status, stats, error message
    data        each tensor's raw little-endian bytes in table order, each padded to 8 bytes; a SPARSE
                tensor's are nnz u32 flat indices (strictly increasing), then its nnz values
    mac         32 bytes when FLAG_MAC is set: HMAC-SHA256 of everything before it

The header has its own MAC so that a receiver holding the secret checks who sent the lengths before
it reads or allocates the body: a peer without the secret costs it at most one header.

Tensors are sent straight from the arrays' memory (``sendmsg`` scatter list) and received straight into
one buffer that the decoded arrays are views of, so a 4 MB pull costs no copy on either side.

Compressed commits and pulls (:mod:`pipeline.ps.encoding`) use the same frame: int8 and float16
tensors with a per-tensor scale (SCALED, decoded to float32), and sparse tensors (SPARSE: indices and
values, decoded to :class:`SparseTensor`), each held to the same bounds as a dense one.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

MAGIC = b"SFPS"
VERSION = 2  # 2: the header has its own MAC
FLAG_MAC = 0x0001
MAC_SIZE = 32
PREAMBLE = struct.Struct("<4sBBH")  # magic, version, type, flags: enough to reject a stranger
HEADER = struct.Struct("<4sBBHIIQQqQI64s")
MAX_QUERY_ID_BYTES = 64
MAX_TABLE_BYTES = 1 << 20
MAX_META_BYTES = 1 << 20
MAX_NAME_BYTES = 1024
MAX_NDIM = 8
DEFAULT_MAX_FRAME_BYTES = 256 << 20
_ALIGN = 8
_IOV_MAX = 512  # below the kernel's 1024 iovec limit per sendmsg
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("<i8"),
    5: np.dtype("<f2"),
    6: np.dtype("i1"),  # only SCALED
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
SPARSE = 0x80  # dtype code flag: nnz flat indices and nnz values instead of every element
SCALED = 0x40  # dtype code flag: int8 or float16 values, each times the tensor's float32 scale
_INT8_CODE, _FLOAT16_CODE = 6, 5
_INT8 = _DTYPES[_INT8_CODE]
_SCALABLE = (_INT8, _DTYPES[_FLOAT16_CODE])
_INDEX = np.dtype("<u4")
_NAME_LEN = struct.Struct("<H")
_DTYPE_NDIM = struct.Struct("<BB")
_NNZ = struct.Struct("<Q")
_SCALE = struct.Struct("<f")


class MsgType(enum.IntEnum):
    PULL = 1
    WEIGHTS = 2
    COMMIT = 3
    ACK = 4
    STATS = 5
    STATS_REPLY = 6
    ERROR = 7
    CHECKPOINT = 8
    CHECKPOINT_REPLY = 9
    HELLO = 10
    HELLO_REPLY = 11


class ProtocolError(ValueError):
    """The peer sent something that is not a valid frame; the connection cannot continue.

    ``code`` is the error code an ERROR frame carries for it.
    """

    code = "protocol"


class FrameTooLarge(ProtocolError):
    """A length in the header exceeds a bound; raised before anything is allocated."""

    code = "too_large"


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""

    code = "version"


class AuthenticationError(ProtocolError):
    """The frame has no HMAC, or the wrong one, while this side holds a shared secret."""

    code = "auth"


class TruncatedFrame(ProtocolError, ConnectionError):
    """The peer closed the connection in the middle of a frame."""


class FrameTimeout(ProtocolError, TimeoutError):
    """A frame that had started did not arrive completely within the frame timeout."""

    code = "frame_timeout"


class UnknownEncoding(ProtocolError):
    """The peer asked for an encoding this side does not speak."""

    code = "encoding"


@dataclass(frozen=True)
class SparseTensor:
    """A tensor of ``shape`` that is zero except at the flat ``indices`` (uint32, strictly increasing),
    where it holds ``values``: a top-k commit on the wire.

    >>> SparseTensor((2, 2), np.array([1, 2], np.uint32), np.array([5.0, 7.0], np.float32)).dense()
    array([[0., 5.],
           [7., 0.]], dtype=float32)
    """

    shape: tuple[int, ...]
    indices: np.ndarray
    values: np.ndarray

    def dense(self) -> np.ndarray:
        out = np.zeros(math.prod(self.shape), np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)


@dataclass(frozen=True)
class ScaledTensor:
    """int8 or float16 ``values`` standing for ``values * scale``: an int8 or float16 commit (or a
    float16 pull) on the wire; the reader hands the receiver the float32 product."""

    values: np.ndarray
    scale: float


WireTensor = np.ndarray | SparseTensor | ScaledTensor


@dataclass(frozen=True)
class CommitTag:
    """Identifies a commit so that a replayed one is recognised: an empty ``query_id`` means untagged."""

    query_id: str = ""
    batch_id: int = -1
    worker_id: int = 0
    seq: int = 0


@dataclass(frozen=True)
class Ack:
    """The server's answer to a commit: ``applied``, ``pending`` (held for a synchronous round) or ``skipped``."""

    status: str
    counter: int
    staleness: int

    @classmethod
    def combine(cls, acks: list[Ack]) -> Ack:
        """One answer for a commit scattered over shards: applied if any shard applied it."""
        statuses = {a.status for a in acks}
        status = next(s for s in ("applied", "pending", "skipped") if s in statuses)
        return cls(status, min(a.counter for a in acks), max(a.staleness for a in acks))


@dataclass(frozen=True)
class Checkpointed:
    """The server's answer to a checkpoint request, given once the checkpoint is durable: the update
    counter and the per-query records (:class:`~pipeline.ps.meta.QueryRecord` as JSON) it holds, and
    whether this request wrote it (False: nothing had changed since the last one). ``incarnation``
    names the server's in-memory state (new at every start, as in ``stats()``): a caller that saw
    another one before has lost what the server held in between."""

    counter: int
    queries: dict[str, dict[str, Any]]
    written: bool
    incarnation: str = ""

    @classmethod
    def combine(cls, replies: list[Checkpointed]) -> Checkpointed:
        """One answer over shards: what every shard has made durable."""
        from pipeline.ps.meta import least_advanced

        return cls(
            min(r.counter for r in replies),
            least_advanced(r.queries for r in replies),
            any(r.written for r in replies),
            ",".join(r.incarnation for r in replies),
        )


@dataclass
class Frame:
    type: MsgType
    counter: int = 0
    worker_id: int = 0
    query_id: str = ""
    batch_id: int = -1
    seq: int = 0
    tensors: Mapping[str, WireTensor] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


def checked_secret(secret: bytes | None) -> bytes | None:
    """``secret`` if it can authenticate anything: None means HMAC off, an empty one is a mistake."""
    if secret is not None and not secret:
        raise ValueError("the shared secret is empty; pass None to turn HMAC off")
    return secret


def settings_secret(settings) -> bytes | None:
    """The shared HMAC secret of ``pipeline.settings.Settings`` (``ps_secret``), None when it has none."""
    return settings.ps_secret.get_secret_value().encode() if settings.ps_secret else None


def error_frame(code: str, message: str) -> Frame:
    return Frame(MsgType.ERROR, meta={"code": code, "error": message})


def encode(frame: Frame, secret: bytes | None = None) -> list[memoryview]:
    """The frame as a scatter list whose tensor parts are views of the arrays (no copy)."""
    table = bytearray()
    parts: list[memoryview] = []
    data_len = 0
    for name, value in frame.tensors.items():
        raw = name.encode()
        entry, arrays = _table_entry(name, value)
        if len(raw) > MAX_NAME_BYTES:
            raise ValueError(f"tensor {name!r}: name longer than {MAX_NAME_BYTES} bytes")
        table += _NAME_LEN.pack(len(raw)) + raw + entry
        for array in arrays:
            if array.nbytes:
                parts.append(array.reshape(-1).view(np.uint8).data)
            pad = -array.nbytes % _ALIGN
            if pad:
                parts.append(memoryview(bytes(pad)))
            data_len += array.nbytes + pad
    meta = json.dumps(frame.meta, separators=(",", ":"), allow_nan=False).encode() if frame.meta else b""
    query = frame.query_id.encode()
    if len(query) > MAX_QUERY_ID_BYTES:
        raise ValueError(f"query id {frame.query_id!r} is longer than {MAX_QUERY_ID_BYTES} bytes")
    if len(table) > MAX_TABLE_BYTES or len(meta) > MAX_META_BYTES:
        raise ValueError(
            f"tensor table ({len(table)} B) or metadata ({len(meta)} B) exceeds its {MAX_META_BYTES} B bound"
        )
    header = HEADER.pack(
        MAGIC,
        VERSION,
        frame.type,
        FLAG_MAC if secret else 0,
        len(table),
        len(meta),
        data_len,
        frame.counter,
        frame.batch_id,
        frame.seq,
        frame.worker_id,
        query,
    )
    if secret:
        header += hmac.digest(secret, header, "sha256")
    buffers = [memoryview(header + table + meta), *parts]
    if secret:
        mac = hmac.new(secret, digestmod=hashlib.sha256)
        for part in buffers:
            mac.update(part)
        buffers.append(memoryview(mac.digest()))
    return buffers


def _table_entry(name: str, value: WireTensor) -> tuple[bytes, list[np.ndarray]]:
    """A tensor's table entry after its name, and the arrays whose bytes go in the data section."""
    if isinstance(value, SparseTensor):
        values, flags, shape = _sendable(name, value.values), SPARSE, value.shape
        indices = np.asarray(value.indices, dtype=_INDEX, order="C")
        if values.ndim != 1 or indices.shape != values.shape:
            raise ValueError(f"tensor {name!r}: sparse indices and values must be two vectors of one length")
        extra, arrays = _NNZ.pack(len(values)), [indices, values]
    elif isinstance(value, ScaledTensor):
        values, flags = np.asarray(value.values, order="C"), SCALED
        if values.dtype not in _SCALABLE or not math.isfinite(value.scale):
            raise ValueError(f"tensor {name!r}: a scaled tensor is int8 or float16 values and a finite scale")
        shape, extra, arrays = values.shape, _SCALE.pack(value.scale), [values]
    else:
        values, flags = _sendable(name, value), 0
        shape, extra, arrays = values.shape, b"", [values]
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensor {name!r}: more than {MAX_NDIM} dims")
    entry = _DTYPE_NDIM.pack(_CODES[values.dtype] | flags, len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
    return entry + extra, arrays


def _sendable(name: str, value: np.ndarray) -> np.ndarray:
    """``value`` as a little-endian C array of a dtype the protocol carries unscaled."""
    array = np.asarray(value)
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _CODES or dtype == _INT8:
        raise TypeError(
            f"tensor {name!r}: dtype {array.dtype} cannot be sent (float16, float32, float64, int32, int64)"
        )
    return np.asarray(array, dtype=dtype, order="C")


def send_frame(
    sock: socket.socket, frame: Frame, secret: bytes | None = None, *, pace: Callable[[int], None] | None = None
) -> int:
    """Send one frame; returns the bytes written. ``pace`` (a link throttle) is called with the
    frame's size before its first byte is sent."""
    buffers = encode(frame, secret)
    total = sum(len(b) for b in buffers)
    if pace is not None:
        pace(total)
    first = 0
    while first < len(buffers):
        sent = sock.sendmsg(buffers[first : first + _IOV_MAX])
        while sent:
            if sent >= len(buffers[first]):
                sent -= len(buffers[first])
                first += 1
            else:
                buffers[first] = buffers[first][sent:]
                sent = 0
    return total


class FrameReader:
    """Reads frames from one connection, enforcing bounds, deadlines and the HMAC.

    With ``reuse_buffer`` the tensor bytes of successive frames land in one growing buffer (the
    server's case: a commit's arrays are consumed before the next frame is read); without it each
    frame gets a fresh buffer that its arrays own (the client's case: pulled weights outlive the call).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        secret: bytes | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        reuse_buffer: bool = False,
    ):
        self._sock = sock
        self._secret = secret
        self._max = max_frame_bytes
        self._reuse = reuse_buffer
        self._buffer = np.empty(0, np.uint8)
        self.last_size = 0

    def read(self, *, idle_timeout: float | None, frame_timeout: float) -> Frame | None:
        """The next frame, or None if the peer closed cleanly between frames.

        Waiting longer than ``idle_timeout`` for a frame to start raises ``TimeoutError``; a frame that
        has started must be complete within ``frame_timeout`` (``FrameTimeout``).
        """
        preamble = bytearray(HEADER.size)
        view = memoryview(preamble)
        self._sock.settimeout(idle_timeout)
        first = self._sock.recv_into(view, PREAMBLE.size)
        if first == 0:
            return None
        deadline = time.monotonic() + frame_timeout
        self._recv_exact(view[first : PREAMBLE.size], deadline)
        magic, version, kind, flags = PREAMBLE.unpack_from(preamble)
        if magic != MAGIC:
            raise ProtocolError(f"not a streamfit parameter-server frame (magic {bytes(magic)!r})")
        if version != VERSION:
            raise VersionMismatch(f"protocol version {version} is not supported; this side speaks version {VERSION}")
        if flags & ~FLAG_MAC:
            raise ProtocolError(f"unknown flags 0x{flags:04x}")
        self._recv_exact(view[PREAMBLE.size :], deadline)
        (_, _, _, _, table_len, meta_len, data_len, counter, batch_id, seq, worker_id, query) = HEADER.unpack(preamble)
        try:
            kind = MsgType(kind)
        except ValueError:
            raise ProtocolError(f"unknown message type {kind}") from None
        mac_len = MAC_SIZE if flags & FLAG_MAC else 0
        if self._secret and not mac_len:
            raise AuthenticationError("frame is not authenticated but this side requires HMAC (shared secret)")
        header_mac = bytearray(mac_len)
        self._recv_exact(memoryview(header_mac), deadline)
        if self._secret and not hmac.compare_digest(hmac.digest(self._secret, preamble, "sha256"), header_mac):
            raise AuthenticationError("frame header HMAC does not match: wrong shared secret or a corrupted frame")
        size = HEADER.size + table_len + meta_len + data_len + 2 * mac_len
        if table_len > MAX_TABLE_BYTES or meta_len > MAX_META_BYTES or size > self._max:
            raise FrameTooLarge(
                f"frame of {size} bytes (table {table_len}, metadata {meta_len}) exceeds the bounds "
                f"(frame {self._max}, table {MAX_TABLE_BYTES}, metadata {MAX_META_BYTES})"
            )
        table_meta = bytearray(table_len + meta_len)
        self._recv_exact(memoryview(table_meta), deadline)
        data = self._data_buffer(data_len)
        self._recv_exact(data.data, deadline)
        if mac_len:
            mac = bytearray(MAC_SIZE)
            self._recv_exact(memoryview(mac), deadline)
            if self._secret:
                expected = hmac.new(self._secret, digestmod=hashlib.sha256)
                for part in (preamble, header_mac, table_meta, data.data):
                    expected.update(part)
                if not hmac.compare_digest(expected.digest(), mac):
                    raise AuthenticationError("frame HMAC does not match: wrong shared secret or a corrupted frame")
        self.last_size = size
        try:
            query_id = query.rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise ProtocolError("query id is not UTF-8") from None
        return Frame(
            kind,
            counter=counter,
            worker_id=worker_id,
            query_id=query_id,
            batch_id=batch_id,
            seq=seq,
            tensors=_decode_tensors(memoryview(table_meta)[:table_len], data),
            meta=_decode_meta(memoryview(table_meta)[table_len:]),
        )

    def _data_buffer(self, size: int) -> np.ndarray:
        if not self._reuse:
            return np.empty(size, np.uint8)
        if self._buffer.size < size:
            self._buffer = np.empty(size, np.uint8)
        return self._buffer[:size]

    def _recv_exact(self, view: memoryview, deadline: float) -> None:
        got = 0
        while got < len(view):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrameTimeout("the frame did not arrive completely within the frame timeout")
            self._sock.settimeout(remaining)
            try:
                n = self._sock.recv_into(view[got:])
            except TimeoutError:
                raise FrameTimeout("the frame did not arrive completely within the frame timeout") from None
            if n == 0:
                raise TruncatedFrame("the peer closed the connection in the middle of a frame")
            got += n


def _decode_tensors(table: memoryview, data: np.ndarray) -> dict[str, np.ndarray | SparseTensor]:
    tensors: dict[str, np.ndarray | SparseTensor] = {}
    pos = offset = 0
    try:
        while pos < len(table):
            (name_len,) = _NAME_LEN.unpack_from(table, pos)
            if name_len > MAX_NAME_BYTES:
                raise ProtocolError(f"tensor name of {name_len} bytes exceeds {MAX_NAME_BYTES}")
            name = bytes(table[pos + 2 : pos + 2 + name_len]).decode()
            code, ndim = _DTYPE_NDIM.unpack_from(table, pos + 2 + name_len)
            pos += 4 + name_len
            flags, code = code & (SPARSE | SCALED), code & ~(SPARSE | SCALED)
            # int8 only scaled, float16 possibly, and nothing both sparse and scaled
            allowed = {_INT8_CODE: (SCALED,), _FLOAT16_CODE: (0, SPARSE, SCALED)}.get(code, (0, SPARSE))
            if code not in _DTYPES or ndim > MAX_NDIM or flags not in allowed:
                raise ProtocolError(
                    f"tensor {name!r}: unknown dtype code {code} (flags 0x{flags:02x}) or {ndim} dims (max {MAX_NDIM})"
                )
            shape = struct.unpack_from(f"<{ndim}Q", table, pos)
            pos += 8 * ndim
            count = math.prod(shape)
            if flags & SPARSE:
                (count,) = _NNZ.unpack_from(table, pos)
                pos += _NNZ.size
                if count > math.prod(shape) or math.prod(shape) > 1 << 32:
                    raise ProtocolError(f"tensor {name!r}: {count} sparse values for shape {shape}")
            if flags & SCALED:
                (scale,) = _SCALE.unpack_from(table, pos)
                pos += _SCALE.size
                if not math.isfinite(scale):
                    raise ProtocolError(f"tensor {name!r}: scale {scale} is not finite")
            if name in tensors:
                raise ProtocolError(f"tensor {name!r}: duplicate")
            indices = None
            if flags & SPARSE:
                indices, offset = _section(name, data, offset, _INDEX, count)
                if count and (indices[-1] >= math.prod(shape) or (np.diff(indices.astype(np.int64)) <= 0).any()):
                    raise ProtocolError(f"tensor {name!r}: sparse indices out of range or not strictly increasing")
            values, offset = _section(name, data, offset, _DTYPES[code], count)
            if flags & SCALED:
                values = values.astype(np.float32) * np.float32(scale)
            tensors[name] = values.reshape(shape) if indices is None else SparseTensor(shape, indices, values)
    except ProtocolError:
        raise
    except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as exc:  # e.g. dims (0, 2**63): no array
        raise ProtocolError(f"malformed tensor table: {exc}") from None
    if offset != data.size:
        raise ProtocolError(f"data section is {data.size} bytes but the tensor table describes {offset}")
    return tensors


def _section(name: str, data: np.ndarray, offset: int, dtype: np.dtype, count: int) -> tuple[np.ndarray, int]:
    """``count`` items of ``dtype`` at ``offset`` of the data section (a view), and the next offset."""
    nbytes = count * dtype.itemsize
    if offset + nbytes > data.size:
        raise ProtocolError(f"tensor {name!r}: its {nbytes} bytes overrun the data section")
    return data[offset : offset + nbytes].view(dtype), offset + nbytes + (-nbytes % _ALIGN)


def _decode_meta(raw: memoryview) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        meta = json.loads(bytes(raw))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting thousands deep
        raise ProtocolError(f"metadata is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("metadata must be a JSON object")
    return meta
