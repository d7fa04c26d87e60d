"""Pruned models: global magnitude masks, their round trip through the registry, and a parameter
server that keeps pruned weights exactly zero under online training."""

from __future__ import annotations

import os
import queue
import threading

import httpx
import numpy as np
import pytest

from pipeline.bundle import ModelBundle
from pipeline.cli import main
from pipeline.policies.promotion import BITS_PER_PARAMETER, PromotionGate
from pipeline.pruning import global_masks, masked
from pipeline.ps.algorithms import StalenessScaled
from pipeline.ps.checkpoint import Checkpoint
from pipeline.ps.client import Client
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.ps.shards import InitVersion, serve_shard
from pipeline.publishing import CandidatePublisher
from pipeline.registry import Registry, RegistryError
from pipeline.settings import load_settings
from pipeline.spec import BUILTIN_SPECS
from serving.app import create_app
from tests.test_serving import LiveServer

SPEC = BUILTIN_SPECS["small"]


@pytest.fixture
def weights():
    return ModelBundle(SPEC, seed=3).get_weights()


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95])
def test_global_threshold_prunes_the_requested_fraction_of_kernels_smallest_first(weights, sparsity):
    masks = global_masks(weights, sparsity)
    kernels = [name for name, value in weights.items() if value.ndim >= 2]
    assert sorted(masks) == sorted(kernels)  # biases are never pruned
    total = sum(weights[name].size for name in kernels)
    assert sum(int((masks[name] == 0).sum()) for name in kernels) == round(sparsity * total)
    kept = np.concatenate([np.abs(weights[n])[masks[n] == 1] for n in kernels])
    pruned = np.concatenate([np.abs(weights[n])[masks[n] == 0] for n in kernels])
    assert pruned.max() <= kept.min()  # one threshold over all kernels together


def test_an_iterative_schedule_keeps_what_it_pruned_before(weights):
    first = global_masks(weights, 0.5)
    grown = {name: value + 1.0 for name, value in masked(weights, first).items()}  # pruned ones now largest
    second = global_masks(grown, 0.8, first)
    assert all((second[name] <= first[name]).all() for name in first)


def test_masks_round_trip_through_the_registry_with_the_parameter_counts(tmp_path, weights):
    registry = Registry(tmp_path)
    registry.create_model(SPEC)
    dense = registry.register(SPEC.name, weights)
    masks = global_masks(weights, 0.9)
    pruned = registry.register(SPEC.name, weights, masks=masks)
    assert registry.masks(SPEC.name, dense) == {} and "sparsity" not in registry.meta(SPEC.name, dense)
    loaded = registry.masks(SPEC.name, pruned)
    assert {name: value.dtype for name, value in loaded.items()} == {name: np.uint8 for name in masks}
    assert all(np.array_equal(loaded[name], masks[name]) for name in masks)
    stored = registry.weights(SPEC.name, pruned)[1]
    assert all((stored[name][masks[name] == 0] == 0.0).all() for name in masks)
    meta = registry.meta(SPEC.name, pruned)
    total = sum(value.size for value in weights.values())
    active = total - sum(int((mask == 0).sum()) for mask in masks.values())
    assert (meta["total_parameters"], meta["active_parameters"]) == (total, active)
    assert meta["sparsity"] == round(1 - active / total, 6)
    assert meta["compression_ratio"] == round(total / active, 4)
    (tmp_path / SPEC.name / "versions" / str(pruned) / "masks.safetensors").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="masks file does not match"):
        registry.masks(SPEC.name, pruned)


def test_registry_refuses_masks_that_do_not_fit(tmp_path, weights):
    registry = Registry(tmp_path)
    registry.create_model(SPEC)
    name = next(name for name, value in weights.items() if value.ndim >= 2)
    with pytest.raises(ValueError, match="shape"):
        registry.register(SPEC.name, weights, masks={name: np.ones(3, np.uint8)})
    with pytest.raises(ValueError, match="other than 0 and 1"):
        registry.register(SPEC.name, weights, masks={name: np.full(weights[name].shape, 2, np.uint8)})


def test_pruned_weights_stay_exactly_zero_after_1000_online_updates_over_tcp(tmp_path, weights):
    """Workers' dense deltas (their local weights drift) go through a real server over TCP; the
    center's pruned weights never move, a restart from its checkpoint keeps the masks, and the
    candidate it publishes is pruned the same way."""
    registry = Registry(tmp_path / "registry")
    registry.create_model(SPEC)
    version = registry.register(SPEC.name, weights, masks=global_masks(weights, 0.8))
    registry.set_alias(SPEC.name, "champion", version)
    masks = registry.masks(SPEC.name, version)
    checkpoint = Checkpoint(tmp_path / "ckpt")
    state, resumed = CenterState.resume(
        checkpoint,
        StalenessScaled(),
        lambda: registry.weights(SPEC.name, version)[1],
        lambda: registry.masks(SPEC.name, version),
    )
    assert not resumed
    rng = np.random.default_rng(0)
    with ParameterServer(state, checkpoint=checkpoint) as server, Client(*server.address) as client:
        for _ in range(1000):
            pulled, _ = client.pull()
            client.commit({name: rng.normal(0, 0.01, value.shape).astype(np.float32) for name, value in pulled.items()})
        center, counter = client.pull()
    assert counter == 1000
    for name, mask in masks.items():
        assert (center[name][mask == 0] == 0.0).all()
        assert (center[name][mask == 1] != weights[name][mask == 1]).all()  # the rest did train
    restarted, resumed = CenterState.resume(checkpoint, StalenessScaled(), lambda: pytest.fail("no checkpoint"))
    assert resumed and all(np.array_equal(restarted.masks[name], masks[name]) for name in masks)
    candidate = CandidatePublisher(registry, SPEC.name, algorithm="dynsgd", keep=5)(*restarted.publication())
    assert all(np.array_equal(registry.masks(SPEC.name, candidate)[name], masks[name]) for name in masks)


def test_serving_metadata_shows_a_pruned_versions_parameter_counts(tmp_path, weights):
    settings = load_settings(home=tmp_path, model=SPEC.name)
    registry = Registry(settings.registry_url)
    registry.create_model(SPEC)
    dense = registry.register(SPEC.name, weights)
    pruned = registry.register(SPEC.name, weights, masks=global_masks(weights, 0.9))
    registry.set_alias(SPEC.name, "champion", pruned)
    server = LiveServer(create_app(settings))
    try:
        champion = httpx.get(f"{server.url}/v1/models/{SPEC.name}/metadata").json()["metadata"]
        unpruned = httpx.get(f"{server.url}/v1/models/{SPEC.name}/versions/{dense}/metadata").json()["metadata"]
    finally:
        server.stop()
    meta = registry.meta(SPEC.name, pruned)
    fields = ("total_parameters", "active_parameters", "sparsity", "compression_ratio")
    assert champion["pruning"] == {field: meta[field] for field in fields}
    assert champion["pruning"]["sparsity"] > 0.75 and unpruned["pruning"] is None


def test_models_prune_registers_a_pruned_version_and_prunes_further_from_it(tmp_path, monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("STREAMFIT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("STREAMFIT_HOME", str(tmp_path))
    assert main(["models", "create", "tiny", "--spec", "small"]) == 0
    assert main(["models", "prune", "tiny", "--sparsity", "0.5"]) == 0
    assert main(["models", "prune", "models:/tiny/2", "--sparsity", "0.9", "--tag", "step=2"]) == 0
    assert main(["models", "prune", "tiny", "--sparsity", "1.5"]) == 1
    out = capsys.readouterr()
    assert "tiny version 2: version 1 pruned to" in out.out and "sparsity must be in [0, 1), got 1.5" in out.err
    registry = Registry(tmp_path / "registry")
    half, most = registry.masks("tiny", 2), registry.masks("tiny", 3)
    assert registry.meta("tiny", 3)["parent"] == 2 and registry.meta("tiny", 3)["tags"] == {"step": "2"}
    assert all((most[name] <= half[name]).all() for name in half)  # pruned once, pruned for good
    assert registry.aliases("tiny") == {"champion": 1}


def test_the_gates_description_length_refuses_a_bigger_model_with_equal_loss(tmp_path, weights):
    """The same predictions from a pruned champion and an unpruned candidate (its very weights):
    accuracy alone passes the candidate, the description length holds it back."""
    registry = Registry(tmp_path)
    registry.create_model(SPEC)
    champion = registry.register(SPEC.name, weights, masks=global_masks(weights, 0.5))
    registry.set_alias(SPEC.name, "champion", champion)
    candidate = registry.register(SPEC.name, registry.weights(SPEC.name, champion)[1])
    x = np.random.default_rng(1).normal(size=(300, SPEC.n_features)).astype(np.float32)
    y = np.random.default_rng(2).integers(0, SPEC.n_classes, 300)
    verdicts = {}
    for description_length in (False, True):
        registry.set_alias(SPEC.name, "candidate", candidate)
        gate = PromotionGate(
            registry, SPEC.name, window=300, margin=0.0, auto_promote=False, description_length=description_length
        )
        gate.remember(x, y)
        verdicts[description_length] = gate.review(ModelBundle(SPEC))
    assert verdicts[False]["passed"] and "candidate_bits" not in verdicts[False]
    on = verdicts[True]
    assert on["candidate_accuracy"] == on["champion_accuracy"] and not on["passed"]
    extra = (
        registry.meta(SPEC.name, champion)["total_parameters"] - registry.meta(SPEC.name, champion)["active_parameters"]
    )
    assert on["candidate_bits"] - on["champion_bits"] == pytest.approx(BITS_PER_PARAMETER * extra)


def test_a_shard_started_from_a_pruned_champion_holds_its_masks(tmp_path, weights):
    """``streamfit ps``'s own start: from the registry's pruned version, no checkpoint yet."""
    settings = load_settings(home=tmp_path, model=SPEC.name, ps_port=0, algorithm="downpour")
    registry = Registry(settings.registry_url)
    registry.create_model(SPEC)
    version = registry.register(SPEC.name, weights, masks=global_masks(weights, 0.9))
    masks = registry.masks(SPEC.name, version)
    listening: queue.Queue = queue.Queue()
    stop = threading.Event()
    shard = threading.Thread(
        target=serve_shard,
        args=(settings, 0, None, InitVersion(version), stop),
        kwargs={"publish": False, "on_listening": lambda host, port, counter: listening.put((host, port))},
    )
    shard.start()
    try:
        with Client(*listening.get(timeout=30)) as client:
            client.commit({name: np.ones_like(value) for name, value in weights.items()})
            center, _ = client.pull()
    finally:
        stop.set()
        shard.join(timeout=30)
    assert all((center[name][masks[name] == 0] == 0.0).all() for name in masks)
    assert all((center[name][masks[name] == 1] != 0.0).all() for name in masks)
