"""Which parameter-server shard holds which tensor.

Tensors are whole units (no tensor is split), so a commit or pull touches each shard once. The plan
is a pure function of names and sizes, so every process that computes it gets the same answer.
"""

from __future__ import annotations

from typing import Mapping


def plan(sizes: Mapping[str, int], shards: int) -> list[list[str]]:
    """Split tensor names over ``shards`` lists balanced by bytes.

    Greedy, largest tensor first (ties broken by name), each to the currently lightest shard (ties to
    the lowest index); within a shard the original order of ``sizes`` is kept.

    >>> plan({"a": 10, "b": 6, "c": 5, "d": 1}, 2)
    [['a', 'd'], ['b', 'c']]
    """
    if shards < 1 or shards > len(sizes):
        raise ValueError(f"cannot split {len(sizes)} tensors over {shards} shards (need 1 <= shards <= tensors)")
    load = [0] * shards
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        target = min(range(shards), key=lambda i: (load[i], i))
        owner[name] = target
        load[target] += sizes[name]
    return [[name for name in sizes if owner[name] == i] for i in range(shards)]


def addresses(host: str, port: int, shards: int) -> list[tuple[str, int]]:
    """Shard ``i`` listens on ``port + i``."""
    return [(host, port + i) for i in range(shards)]
