"""The registry: versions, aliases, atomicity, integrity; and the bundle it loads."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest

from pipeline.bundle import ModelBundle, WeightsMismatch
from pipeline.registry import Registry, RegistryError
from pipeline.spec import BUILTIN_SPECS


@pytest.fixture(scope="module")
def small():
    return ModelBundle(BUILTIN_SPECS["small"], seed=1)


def test_higgs_spec_size_and_fast_path_matches_the_model():
    bundle = ModelBundle(BUILTIN_SPECS["higgs"])
    assert 1_010_000 < bundle.n_parameters < 1_030_000
    x = np.random.default_rng(0).normal(size=(17, 30)).astype(np.float32)
    assert np.allclose(bundle.predict_proba(x), bundle.model(x, training=False).numpy(), atol=1e-6)


def test_register_load_round_trip_promote_rollback_and_events(tmp_path, small):
    events = []
    registry = Registry(tmp_path, on_alias_change=events.append)
    registry.create_model(BUILTIN_SPECS["small"])
    v1 = registry.register("small", small.get_weights(), algorithm="init")
    shifted = {k: v + 0.5 for k, v in small.get_weights().items()}
    v2 = registry.register("small", shifted, parent=v1, algorithm="adag", updates=10, metrics={"accuracy": 0.9})
    assert (v1, v2) == (1, 2) and registry.versions("small") == [1, 2]
    registry.set_alias("small", "champion", v1)
    registry.set_alias("small", "candidate", v2)
    registry.promote("small")
    loaded = registry.load("small", "champion")
    assert loaded.version == 2
    x = np.random.default_rng(1).normal(size=(5, 10)).astype(np.float32)
    reference = ModelBundle(BUILTIN_SPECS["small"])
    reference.set_weights(shifted)
    assert np.allclose(loaded.predict_proba(x), reference.predict_proba(x))
    registry.rollback("small")
    assert registry.resolve("small", "champion") == 1
    assert [(e["alias"], e["version"]) for e in events] == [("champion", 1), ("candidate", 2), ("champion", 2),
                                                             ("champion", 1)]
    assert set(events[2]) == {"model", "version", "alias", "uri", "created_at", "metrics"}
    assert events[2]["metrics"] == {"accuracy": 0.9}


def test_sha_mismatch_unknown_names_and_bad_shapes(tmp_path, small):
    registry = Registry(tmp_path)
    registry.create_model(BUILTIN_SPECS["small"])
    version = registry.register("small", small.get_weights())
    weights_file = tmp_path / "small" / "versions" / str(version) / "weights.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="sha256"):
        registry.load("small", version)
    with pytest.raises(RegistryError, match="no model 'nope'"):
        registry.versions("nope")
    with pytest.raises(RegistryError, match="no 'champion' alias"):
        registry.resolve("small", "champion")
    bad = small.get_weights()
    bad["output/bias"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsMismatch, match="output/bias"):
        small.set_weights(bad)


def _register_many(root, weights, n, out):
    registry = Registry(root)
    out.extend(registry.register("small", weights) for _ in range(n))


def _register_in_process(root, n, queue):
    weights = ModelBundle(BUILTIN_SPECS["small"]).get_weights()
    queue.put([Registry(root).register("small", weights) for _ in range(n)])


def test_concurrent_writers_get_distinct_versions_and_readers_never_see_partial(tmp_path, small):
    registry = Registry(tmp_path)
    registry.create_model(BUILTIN_SPECS["small"])
    stop, seen, problems = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            for version in registry.versions("small"):
                try:
                    registry.meta("small", version)["sha256"]
                    seen.add(version)
                except Exception as exc:  # a partial version would show up here
                    problems.append(repr(exc))

    watcher = threading.Thread(target=reader)
    watcher.start()
    queue = multiprocessing.get_context("spawn").Queue()
    other = multiprocessing.get_context("spawn").Process(target=_register_in_process, args=(str(tmp_path), 15, queue))
    other.start()
    mine: list[int] = []
    _register_many(tmp_path, small.get_weights(), 15, mine)
    theirs = queue.get(timeout=120)
    other.join()
    stop.set()
    watcher.join()
    assert not problems
    assert sorted(mine + theirs) == list(range(1, 31))


def test_retention_keeps_aliased_versions(tmp_path, small):
    registry = Registry(tmp_path)
    registry.create_model(BUILTIN_SPECS["small"])
    for _ in range(6):
        registry.register("small", small.get_weights())
    registry.set_alias("small", "champion", 2)
    assert registry.retain("small", keep=2) == [1, 3, 4]
    assert registry.versions("small") == [2, 5, 6]
