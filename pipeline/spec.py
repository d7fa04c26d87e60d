"""Model specs: which architecture, which features and classes, which loss and worker optimizer.

A spec is data (JSON in the registry), never code: the architecture is named from a
fixed table of builders, so loading a spec cannot execute anything.

>>> spec = BUILTIN_SPECS["small"]
>>> spec.n_features, spec.n_classes
(10, 2)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator


class OptimizerSpec(BaseModel):
    """Plain SGD (optionally with momentum): what the parameter-server algorithms' maths assume."""
    name: Literal["sgd"] = "sgd"
    learning_rate: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False


class ModelSpec(BaseModel):
    name: str
    builder: Literal["dense_classifier"] = "dense_classifier"
    hidden: list[int] = Field(default_factory=lambda: [32])
    dropout: float = Field(0.0, ge=0, lt=1)
    feature_names: list[str]
    classes: list[int | str] = Field(default_factory=lambda: [0, 1])
    loss: Literal["sparse_categorical_crossentropy"] = "sparse_categorical_crossentropy"
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)

    @field_validator("feature_names")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if not names or len(set(names)) != len(names):
            raise ValueError("feature_names must be non-empty and unique")
        return names

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_classes(self) -> int:
        return len(self.classes)


BUILTIN_SPECS = {
    # the dist-keras Kafka notebook's classifier: 30 -> 500 -> 1000 -> 500 -> 2, dropout 0.4 (~1.02 M parameters)
    "higgs": ModelSpec(name="higgs", hidden=[500, 1000, 500], dropout=0.4,
                       feature_names=[f"f{i}" for i in range(30)],
                       optimizer=OptimizerSpec(learning_rate=0.01, momentum=0.9)),
    # small and fast, for tests and 10-feature synthetic streams (hyperplane, random RBF)
    "small": ModelSpec(name="small", hidden=[32], feature_names=[f"f{i}" for i in range(10)],
                       optimizer=OptimizerSpec(learning_rate=0.1)),
}
