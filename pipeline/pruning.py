"""Magnitude pruning: masks that zero a model's smallest weights, chosen by one global threshold.

Only kernels are pruned (tensors of two or more dimensions; biases stay dense: they are few and
shift whole units). The threshold is the ``sparsity`` percentile of ``|w|`` over all kernels together,
so a layer of small weights loses more of them than a layer of large ones. A mask is ``uint8``
(1 keeps, 0 prunes), stored as safetensors beside the version's weights in the registry; the
parameter server multiplies every update by it, so pruned weights stay exactly zero under training.

>>> weights = {"kernel": np.array([[0.1, -2.0], [0.3, 4.0]], np.float32), "bias": np.zeros(2, np.float32)}
>>> masks = global_masks(weights, 0.5)
>>> masks["kernel"].tolist(), sorted(masks)
([[0, 1], [0, 1]], ['kernel'])
>>> summary(weights, masks)
{'total_parameters': 6, 'active_parameters': 4, 'sparsity': 0.333333, 'compression_ratio': 1.5}
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def prunable(weights: Mapping[str, np.ndarray]) -> list[str]:
    """The kernels: tensors of two or more dimensions."""
    return [name for name, value in weights.items() if np.ndim(value) >= 2]


def global_masks(
    weights: Mapping[str, np.ndarray], sparsity: float, masks: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Masks pruning the ``sparsity`` fraction of all kernel weights with the smallest ``|w|``.

    ``masks`` (earlier, lower sparsity: an iterative schedule) stay pruned; ties at the threshold
    are broken by position so the count is exact.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    names = prunable(weights)
    if not names:
        raise ValueError("the model has no kernels (tensors of two or more dimensions) to prune")
    magnitudes = np.concatenate(
        [np.abs(np.asarray(weights[name], np.float64)).ravel() * _mask_of(masks, name, weights) for name in names]
    )
    count = int(round(sparsity * magnitudes.size))
    flat = np.ones(magnitudes.size, np.uint8)
    if count:
        flat[np.argpartition(magnitudes, count - 1)[:count]] = 0
    split = np.cumsum([np.size(weights[name]) for name in names])[:-1]
    return {
        name: part.reshape(np.shape(weights[name])) for name, part in zip(names, np.split(flat, split), strict=True)
    }


def _mask_of(masks: Mapping[str, np.ndarray] | None, name: str, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """``name``'s earlier mask flattened (a pruned weight's magnitude counts as 0), or ones."""
    if masks and name in masks:
        return np.asarray(masks[name], np.float64).ravel()
    return np.ones(np.size(weights[name]))


def checked_masks(weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``masks`` as ``uint8`` if each names a tensor of ``weights``, has its shape and holds only 0 and 1."""
    checked = {}
    for name, mask in masks.items():
        mask = np.asarray(mask)
        if name not in weights:
            raise ValueError(f"mask {name!r} names no tensor of the model")
        if mask.shape != np.shape(weights[name]):
            raise ValueError(f"mask {name!r}: shape {mask.shape} is not its tensor's {np.shape(weights[name])}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"mask {name!r}: values other than 0 and 1")
        checked[name] = mask.astype(np.uint8)
    return checked


def masked(weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` with their pruned entries set to exactly 0."""
    return {
        name: (value * masks[name]).astype(np.asarray(value).dtype) if name in masks else value
        for name, value in weights.items()
    }


def summary(weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> dict[str, int | float]:
    """Total and active (unpruned) parameters, the pruned fraction of all of them, and total / active."""
    total = sum(int(np.size(value)) for value in weights.values())
    active = total - sum(int(np.size(mask) - np.count_nonzero(mask)) for mask in masks.values())
    return {
        "total_parameters": total,
        "active_parameters": active,
        "sparsity": round(1 - active / total, 6),
        "compression_ratio": round(total / max(active, 1), 4),
    }
