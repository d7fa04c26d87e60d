"""The registry: versions, aliases, atomicity under concurrent writers, integrity; ``streamfit models``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest

from pipeline.bundle import WeightsError
from pipeline.cli import main
from pipeline.registry import Registry, RegistryError
from pipeline.spec import BUILTIN_SPECS
from tests.helpers import ROOT

SMALL = BUILTIN_SPECS["small"]


def weights(value: float = 0.0) -> dict[str, np.ndarray]:
    """Weights that fit the ``small`` spec without building it (no TensorFlow needed)."""
    return {name: np.full(shape, value, np.float32) for name, shape in SMALL.weight_shapes.items()}


@pytest.fixture
def events() -> list[dict]:
    return []


@pytest.fixture
def registry(tmp_path, events):
    registry = Registry(tmp_path / "registry", on_alias_change=events.append)
    registry.create_model(SMALL)
    return registry


def test_register_load_promote_rollback_and_alias_events(registry, events):
    v1 = registry.register("small", weights(0.1), algorithm="init")
    v2 = registry.register(
        "small",
        weights(0.2),
        parent=v1,
        algorithm="adag",
        updates=10,
        offsets={"events": {"0": 41}},
        metrics={"accuracy": 0.9},
    )
    assert (v1, v2, registry.versions("small"), registry.models()) == (1, 2, [1, 2], ["small"])
    meta = registry.meta("small", v2)
    assert {k: meta[k] for k in ("version", "parent", "algorithm", "updates", "offsets", "metrics")} == {
        "version": 2,
        "parent": 1,
        "algorithm": "adag",
        "updates": 10,
        "offsets": {"events": {"0": 41}},
        "metrics": {"accuracy": 0.9},
    }
    assert len(meta["sha256"]) == 64 and meta["created_at"] > 1.7e12  # epoch ms
    assert registry.spec("small") == SMALL

    registry.set_alias("small", "champion", v1)
    registry.set_alias("small", "candidate", v2)
    registry.promote("small")
    bundle = registry.load("small")  # the champion
    assert bundle.version == 2 and np.all(bundle.get_weights()["hidden_0/kernel"] == np.float32(0.2))
    assert registry.rollback("small")["version"] == 1
    assert registry.aliases("small") == {"champion": 1, "candidate": 2}
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback("small")

    assert [(e["alias"], e["version"]) for e in events] == [
        ("champion", 1),
        ("candidate", 2),
        ("champion", 2),
        ("champion", 1),
    ]
    moved = events[2]
    assert set(moved) == {"model", "version", "alias", "uri", "created_at", "metrics"}
    assert (moved["model"], moved["metrics"], moved["created_at"]) == ("small", {"accuracy": 0.9}, meta["created_at"])
    assert moved["uri"].endswith("registry/small/versions/2")


def test_integrity_and_clear_errors(registry, tmp_path):
    version = registry.register("small", weights())
    weights_file = tmp_path / "registry" / "small" / "versions" / str(version) / "weights.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="does not match its recorded sha256"):
        registry.load("small", version)
    with pytest.raises(RegistryError, match="no model 'nope'"):
        registry.versions("nope")
    with pytest.raises(RegistryError, match="no model '../small'"):
        registry.versions("../small")
    with pytest.raises(RegistryError, match="has no version 9"):
        registry.resolve("small", 9)
    with pytest.raises(RegistryError, match="no 'champion' alias"):
        registry.resolve("small", "champion")
    with pytest.raises(RegistryError, match="bad alias name 'history'"):
        registry.set_alias("small", "history", version)
    with pytest.raises(RegistryError, match="already exists"):
        registry.create_model(SMALL)
    wrong = weights()
    wrong["hidden_0/kernel"] = np.zeros((10, 33), np.float32)
    with pytest.raises(WeightsError, match="'hidden_0/kernel' has shape \\(10, 33\\)"):
        registry.register("small", wrong)
    assert registry.versions("small") == [version]


def test_retention_keeps_aliased_versions_and_rollback_targets(registry):
    for _ in range(7):
        registry.register("small", weights())
    registry.set_alias("small", "champion", 2)
    registry.set_alias("small", "champion", 3)  # 2 is now the rollback target
    registry.set_alias("small", "candidate", 4)
    assert registry.retain("small", keep=2) == [1, 5]
    assert registry.versions("small") == [2, 3, 4, 6, 7]
    assert registry.rollback("small")["version"] == 2


WRITER = """
import sys
import numpy as np
from pipeline.registry import Registry
from pipeline.spec import BUILTIN_SPECS
weights = {n: np.full(s, float(sys.argv[3]), np.float32) for n, s in BUILTIN_SPECS["small"].weight_shapes.items()}
registry = Registry(sys.argv[1])
print(*(registry.register("small", weights) for _ in range(int(sys.argv[2]))))
"""


def test_concurrent_writers_get_distinct_versions_and_readers_never_see_partial(registry, tmp_path):
    stop, seen, problems = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            for version in registry.versions("small")[-3:]:
                try:  # reads, checks the sha256 of and parses every version it lists
                    assert registry.weights("small", version)[0] == version
                    seen.add(version)
                except Exception as exc:  # noqa: BLE001 - a partial version would show up here, whatever it raises
                    problems.append(repr(exc))

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, registry.root, "12", str(i)], cwd=ROOT, stdout=subprocess.PIPE, text=True
            )
            for i in (1, 2)
        ]
        numbers = [int(n) for w in writers for n in w.communicate(timeout=120)[0].split()]
    finally:
        stop.set()
        watcher.join()
    assert all(w.returncode == 0 for w in writers)
    assert sorted(numbers) == list(range(1, 25)) and registry.versions("small") == list(range(1, 25))
    assert not problems and len(seen) > 5
    assert registry.load("small", 24).get_weights()["output/bias"][0] in (1.0, 2.0)
    assert not [p for p in (tmp_path / "registry" / "small" / "versions").iterdir() if p.name.startswith(".")]


def test_fsspec_url_registry():
    fsspec = pytest.importorskip("fsspec")
    root, events = f"registry-{uuid.uuid4().hex}", []
    registry = Registry(f"memory://{root}", on_alias_change=events.append)
    registry.create_model(SMALL)
    first = registry.register("small", weights(0.5))
    second = registry.register("small", weights(0.25), parent=first)
    registry.set_alias("small", "champion", second)
    assert registry.models() == ["small"] and registry.versions("small") == [1, 2]
    assert registry.weights("small")[1]["output/bias"].tolist() == [0.25, 0.25]
    assert events[0]["uri"].startswith("memory://registry-") and events[0]["uri"].endswith("/small/versions/2")
    fsspec.filesystem("memory").pipe(f"/{root}/small/versions/3/weights.safetensors", b"half-written: no meta.json")
    assert registry.versions("small") == [1, 2]
    assert registry.retain("small", keep=1) == [1]


def test_models_cli(tmp_path, monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("STREAMFIT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("STREAMFIT_HOME", str(tmp_path / "home"))

    def streamfit(*args: str, code: int = 0) -> str:
        assert main(["models", *args]) == code
        out, err = capsys.readouterr()
        return out + err

    assert "version 1 is champion" in streamfit("create", "tiny", "--spec", "small", "--seed", "3")
    assert "already exists" in streamfit("create", "tiny", "--spec", "small", code=1)
    assert "exists (champion v1): left as it is" in streamfit("create", "tiny", "--spec", "small", "--exist-ok")
    registry = Registry(tmp_path / "home" / "registry")
    v2 = registry.register(
        "tiny", registry.weights("tiny", 1)[1], parent=1, algorithm="adag", metrics={"accuracy": 0.8}
    )
    registry.set_alias("tiny", "candidate", v2)
    listing = streamfit("list").splitlines()
    assert listing[0].split() == [
        "model",
        "builder",
        "features",
        "classes",
        "versions",
        "latest",
        "champion",
        "candidate",
    ]
    assert listing[1].split() == ["tiny", "dense_classifier", "10", "2", "2", "2", "1", "2"]
    assert '{"accuracy":0.8}' in streamfit("show", "tiny")
    assert "sha256" in streamfit("show", "tiny", "--version", "2")
    assert "tiny: champion 1 -> 2" in streamfit("promote", "tiny")
    assert "tiny: champion 2 -> 1" in streamfit("rollback", "tiny")
    assert "no previous champion" in streamfit("rollback", "tiny", code=1)
    registry.create_model(BUILTIN_SPECS["small"].model_copy(update={"name": "half"}))  # a create cut short: no version
    assert "version 1 is champion" in streamfit("create", "half", "--spec", "small", "--exist-ok")


def test_model_uris_description_tags_and_delete_alias(registry, events):
    v1 = registry.register("small", weights(0.1), description="first cut", tags={"team": "fraud"})
    v2 = registry.register("small", weights(0.2), parent=v1)
    registry.set_alias("small", "champion", v1)
    registry.set_alias("small", "candidate", v2)
    assert registry.locate("models:/small@candidate") == ("small", v2)
    assert registry.locate("models:/small/1") == ("small", v1)
    assert registry.locate("small") == ("small", v1)
    assert registry.resolve("small", "models:/small@champion") == v1
    assert registry.weights("small", "models:/small@candidate")[0] == v2
    for bad, message in [
        ("models:/small", "bad model URI"),
        ("models:/small@Champ", "bad model URI"),
        ("models:/../x@champion", "bad model URI"),
        ("models:/small@nope", "no 'nope' alias"),
        ("models:/small/9", "no version 9"),
        ("models:/other@champion", "no model 'other'"),
    ]:
        with pytest.raises(RegistryError, match=message):
            registry.locate(bad)
    with pytest.raises(RegistryError, match="names model 'other', not 'small'"):
        registry.resolve("small", "models:/other@champion")

    meta = registry.meta("small", v1)
    assert (meta["description"], meta["tags"]) == ("first cut", {"team": "fraud"})
    assert (registry.meta("small", v2)["description"], registry.meta("small", v2)["tags"]) == ("", {})
    sha = meta["sha256"]
    meta = registry.annotate("small", v1, description="retrained", tags={"stage": "prod"}, remove_tags=("team",))
    assert meta == registry.meta("small", v1)
    assert (meta["description"], meta["tags"], meta["sha256"]) == ("retrained", {"stage": "prod"}, sha)
    assert registry.annotate("small", v1, tags={"stage": "qa"})["description"] == "retrained"  # untouched
    for tags, message in [({"a b": "x"}, "bad tag key"), ({"k": "x" * 1001}, "at most 1000"), ({"k": 3}, "string")]:
        with pytest.raises(RegistryError, match=message):
            registry.annotate("small", v1, tags=tags)
    with pytest.raises(RegistryError, match="more than 10000"):
        registry.register("small", weights(), description="x" * 10_001)

    assert registry.delete_alias("small", "candidate") == v2
    assert registry.aliases("small") == {"champion": v1}
    assert events[-1]["alias"] == "candidate" and events[-1]["version"] == v2 and events[-1]["deleted"] is True
    assert "deleted" not in events[-2]  # a move is not marked
    with pytest.raises(RegistryError, match="no 'candidate' alias"):
        registry.delete_alias("small", "candidate")
    with pytest.raises(RegistryError, match="cannot be deleted"):
        registry.delete_alias("small", "champion")
