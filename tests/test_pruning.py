"""Pruned models: global magnitude masks, their round trip through the registry, and a parameter
server that keeps pruned weights exactly zero under online training."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bundle import ModelBundle
from pipeline.pruning import global_masks, masked
from pipeline.registry import Registry, RegistryError
from pipeline.spec import BUILTIN_SPECS

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
