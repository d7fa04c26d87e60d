"""How commits and pulls travel: the encodings a worker and the parameter server negotiate per
connection (a HELLO frame), and the worker's error feedback.

A commit of the default model is 4 MB of float32. ``float16`` halves it, ``int8`` quarters it (each
with one float32 scale per tensor), and ``topk`` sends only the largest ``topk_fraction`` of each tensor's
entries as indices and values. Every lossy encoding keeps what it did not send -- the residual, the
delta minus what the server will decode -- and adds it to the next delta (error feedback: Seide et
al., "1-bit SGD", Interspeech 2014; Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS
2018), and a worker's run ends by sending what is left exactly (:meth:`Encoder.flush`), so nothing
is lost. Pulls come back as float32 for ``float32`` and as scaled float16 otherwise.

float16's scale is a power of two that brings a tensor's largest value near 2**15: nothing overflows,
and only values 2**-39 below the largest fall into float16's subnormal range, which numpy converts
some 25 times slower (deltas of 1e-5, typical, made plain float16 slower than float32 on the wire).

>>> encoder = Encoder("topk", topk_fraction=0.5)
>>> sent = encoder.encode({"w": np.array([1.0, -4.0, 0.5, 3.0], np.float32)})["w"]
>>> sent.indices, sent.values
(array([1, 3], dtype=uint32), array([-4.,  3.], dtype=float32))
>>> encoder.encode({"w": np.zeros(4, np.float32)})["w"].values   # the residual goes next
array([1. , 0.5], dtype=float32)
>>> encoder.flush()["w"].indices.size   # everything has been sent: an empty sparse tensor
0
>>> encoder.flush() is None   # nothing encoded since
True
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Literal, Mapping, get_args

import numpy as np

from pipeline.ps.protocol import ScaledTensor, SparseTensor, WireTensor

Encoding = Literal["float32", "float16", "int8", "topk"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)
"""What ``ps_encoding`` may name; ``float32`` sends deltas as they are (no residual)."""


class Encoder:
    """One worker connection's commit encoding and its residual (per tensor)."""

    def __init__(self, encoding: str = "float32", *, topk_fraction: float = 0.05):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown parameter-server encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
        if not 0 < topk_fraction <= 1:
            raise ValueError(f"topk_fraction must be in (0, 1], not {topk_fraction}")
        self.encoding = encoding
        self.exact = encoding == "float32"
        self._lossy: Callable[[np.ndarray], tuple[WireTensor, np.ndarray]] = (
            partial(_topk, fraction=topk_fraction) if encoding == "topk" else _int8 if encoding == "int8" else _float16
        )
        self._residual: dict[str, np.ndarray] = {}

    def encode(self, delta: Mapping[str, np.ndarray]) -> dict[str, WireTensor]:
        """What to send for ``delta``: each tensor plus its residual, encoded; the new residual is kept."""
        if self.exact:
            return dict(delta)
        sent: dict[str, WireTensor] = {}
        for name, value in delta.items():
            target = np.asarray(value, np.float32)
            if name in self._residual:
                target = target + self._residual[name]
            sent[name], self._residual[name] = self._lossy(target)
        return sent

    def flush(self) -> dict[str, WireTensor] | None:
        """The residual, exactly (float32, sparse where that is smaller), and forget it; None when
        nothing was encoded since the last flush. After a lossy encode there is always a commit to
        send, an empty sparse tensor at least, so every worker of a synchronous round sends one."""
        if not self._residual:
            return None
        held = {name: value for name, value in self._residual.items() if value.any()}
        first = next(iter(self._residual.items()))
        self._residual = {}
        return {name: _exact(value) for name, value in (held or dict([first])).items()}


def pull_tensors(weights: Mapping[str, np.ndarray], encoding: str) -> dict[str, WireTensor]:
    """What a pull sends over a connection that negotiated ``encoding``."""
    if encoding == "float32":
        return dict(weights)
    return {name: _float16(np.asarray(value, np.float32))[0] for name, value in weights.items()}


def _float16(x: np.ndarray) -> tuple[ScaledTensor, np.ndarray]:
    largest = float(np.abs(x).max()) if x.size else 0.0
    scale = 2.0 ** (math.ceil(math.log2(largest)) - 15) if 0 < largest < math.inf else 1.0
    half = (x / np.float32(scale)).astype(np.float16)  # a power of two: dividing is exact
    return ScaledTensor(half, scale), x - half.astype(np.float32) * np.float32(scale)


def _int8(x: np.ndarray) -> tuple[WireTensor, np.ndarray]:
    largest = float(np.abs(x).max()) if x.size else 0.0
    scale = largest / 127 if largest else 1.0
    quantised = np.clip(np.rint(x / np.float32(scale)), -127, 127).astype(np.int8)
    return ScaledTensor(quantised, scale), x - quantised.astype(np.float32) * np.float32(scale)


def _topk(x: np.ndarray, fraction: float) -> tuple[WireTensor, np.ndarray]:
    flat = x.reshape(-1)
    k = math.ceil(fraction * flat.size)
    if k >= flat.size:
        return x, np.zeros_like(x)
    indices = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]).astype(np.uint32)
    residual = flat.copy()
    residual[indices] = 0
    return SparseTensor(x.shape, indices, flat[indices]), residual.reshape(x.shape)


def _exact(value: np.ndarray) -> WireTensor:
    indices = np.flatnonzero(value)
    if indices.size * 2 >= value.size or value.size > 1 << 32:  # index + value cost twice a dense entry
        return value
    return SparseTensor(value.shape, indices.astype(np.uint32), value.reshape(-1)[indices])
