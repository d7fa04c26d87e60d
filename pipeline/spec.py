"""Model specs: which architecture, which features and classes, which loss and worker optimizer.

A spec is data (``spec.json`` in the registry), never code: the architecture is a name
looked up in :data:`BUILDERS`, whose arguments are validated like any other field, so
reading a spec cannot import or execute anything.

>>> spec = BUILTIN_SPECS["small"]
>>> spec.n_features, spec.n_classes, spec.feature_names[:2]
(10, 2, ['f0', 'f1'])
>>> ModelSpec.model_validate_json(spec.model_dump_json()) == spec
True

A feature is numeric unless ``categorical`` gives its cardinality: then its value is an integer
code in ``0..cardinality-1``, one-hot encoded inside the model (so the encoding travels with the
weights) and never standardised -- a zip-code index is not a magnitude.

>>> stagger = BUILTIN_SPECS["stagger"]
>>> stagger.cardinalities, stagger.n_inputs
((3, 3, 3), 9)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.keras_config import KerasConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Model names become directory names in the registry and Kafka keys: no separators, no dot-dot."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DenseClassifier(_Strict):
    """Dense relu layers, each optionally followed by dropout, then a softmax over the classes.

    numpy runs it (:mod:`pipeline.dense`, which also draws its initial weights for a seed);
    ``build`` is its Keras model, the TensorFlow engine's.
    """

    hidden: list[PositiveInt] = Field(min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    def build(self, x, n_classes: int, seed: int):
        """Add the layers on top of the symbolic tensor ``x``; returns the class probabilities. Kernels
        start at zero: the bundle assigns :func:`pipeline.dense.initial_weights`, the same for both engines."""
        import keras

        for i, width in enumerate(self.hidden):
            x = keras.layers.Dense(width, activation="relu", name=f"hidden_{i}", kernel_initializer="zeros")(x)
            if self.dropout:
                x = keras.layers.Dropout(self.dropout, seed=seed + i, name=f"dropout_{i}")(x)
        return keras.layers.Dense(n_classes, activation="softmax", name="output", kernel_initializer="zeros")(x)

    def weight_shapes(self, n_inputs: int, n_classes: int) -> dict[str, tuple[int, ...]]:
        """The tensors ``build`` makes, by name, in order (so weights can be checked without TensorFlow)."""
        shapes, width = {}, n_inputs
        for name, out in [*((f"hidden_{i}", w) for i, w in enumerate(self.hidden)), ("output", n_classes)]:
            shapes[f"{name}/kernel"], shapes[f"{name}/bias"], width = (width, out), (out,), out
        return shapes


Architecture = DenseClassifier | KerasConfig

BUILDERS: dict[str, type[Architecture]] = {"dense_classifier": DenseClassifier, "keras_config": KerasConfig}
"""The only architectures a spec can name: builder name -> its (validated) arguments and ``build``."""


class OptimizerSpec(_Strict):
    """The worker's local optimizer: SGD, the update the parameter-server algorithms' maths assume."""

    name: Literal["sgd"] = "sgd"
    learning_rate: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False


class Standardisation(_Strict):
    """Per-feature ``(x - mean) / std``; the bundle's first layer, so it travels with the weights."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _usable(self) -> Standardisation:
        if len(self.mean) != len(self.std):
            raise ValueError(f"standardisation has {len(self.mean)} means but {len(self.std)} stds")
        if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError("standardisation means must be finite and stds finite and > 0")
        return self


MAX_CARDINALITY = 10_000
"""A categorical feature's one-hot width is bounded: its codes become that many model inputs."""


class ModelSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    builder: str = "dense_classifier"
    builder_args: dict[str, Any] = Field(default_factory=dict)
    feature_names: list[str] = Field(min_length=1)
    categorical: dict[str, Annotated[int, Field(ge=2, le=MAX_CARDINALITY)]] = Field(default_factory=dict)
    """Categorical feature -> its cardinality (codes ``0..cardinality-1``); every other feature is numeric."""
    classes: list[int | str] = Field(default_factory=lambda: [0, 1], min_length=2)
    """Class labels for display; in events a label is the class's index, 0..n_classes-1."""
    loss: Literal["sparse_categorical_crossentropy"] = "sparse_categorical_crossentropy"
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    standardisation: Standardisation | None = None
    _architecture: Architecture = PrivateAttr()

    @field_validator("feature_names", "classes")
    @classmethod
    def _unique(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError("must be unique")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.builder not in BUILDERS:
            raise ValueError(f"unknown builder {self.builder!r}; known: {sorted(BUILDERS)}")
        try:
            self._architecture = BUILDERS[self.builder].model_validate(self.builder_args)
        except ValidationError as exc:  # named from the spec's top, as the other fields' errors are
            problems = [f"{field_path('builder_args', *e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise ValueError("; ".join(problems)) from None
        if unknown := [name for name in self.categorical if name not in self.feature_names]:
            raise ValueError(f"categorical names {unknown} that are not in feature_names")
        if self.standardisation and len(self.standardisation.mean) != self.n_features:
            raise ValueError(
                f"standardisation has {len(self.standardisation.mean)} entries for {self.n_features} features"
            )
        return self

    @property
    def architecture(self) -> Architecture:
        """The builder named by the spec, its arguments validated when the spec was."""
        return self._architecture

    @property
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model in order, the standardisation statistics first: the names and
        shapes the bundle, the registry and the parameter server agree on."""
        n = self.n_features
        shapes = self.architecture.weight_shapes(self.n_inputs, self.n_classes)
        return {"standardise/mean": (n,), "standardise/std": (n,), **shapes}

    @property
    def cardinalities(self) -> tuple[int | None, ...]:
        """Per feature in order, its cardinality if categorical, else ``None``."""
        return tuple(self.categorical.get(name) for name in self.feature_names)

    @property
    def n_inputs(self) -> int:
        """The width of the first dense layer's input: one per numeric feature, one per category."""
        return sum(k or 1 for k in self.cardinalities)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def field_path(*loc: str | int) -> str:
    """A field's place in a spec as its file spells it: ``builder_args.hidden.0``."""
    return ".".join(str(part) for part in loc)


class SpecFileError(ValueError):
    """A spec file that cannot be read or is not a valid spec; the message names the file and each bad field."""


def spec_from_file(path: str | Path, name: str | None = None) -> ModelSpec:
    """The spec in a YAML or JSON file (JSON is YAML), validated as the built-in ones are; ``name``,
    if given, replaces the file's. YAML is read with the safe loader: plain data, no tags that build objects."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpecFileError(f"{path}: cannot read a YAML or JSON spec: {exc}") from None
    if not isinstance(document, dict):
        raise SpecFileError(f"{path}: a spec is a mapping of fields, got {type(document).__name__}")
    if name is not None:
        document["name"] = name
    try:
        return ModelSpec.model_validate(document)
    except ValidationError as exc:
        problems = [
            ": ".join(filter(None, [field_path(*e["loc"]), e["msg"].removeprefix("Value error, ")]))
            + ("" if e["type"] in ("value_error", "missing") else f" (got {json.dumps(e['input'], default=str)[:60]})")
            for e in exc.errors()
        ]
        raise SpecFileError(f"{path}: not a valid model spec:\n  " + "\n  ".join(problems)) from None


def _features(n: int) -> list[str]:
    return [f"f{i}" for i in range(n)]


BUILTIN_SPECS: dict[str, ModelSpec] = {
    # the dist-keras Kafka notebook's classifier: 30 -> 500 -> 1000 -> 500 -> 2, dropout 0.4 (~1.02 M parameters)
    "higgs": ModelSpec(
        name="higgs",
        builder_args={"hidden": [500, 1000, 500], "dropout": 0.4},
        feature_names=_features(30),
        optimizer=OptimizerSpec(learning_rate=0.01, momentum=0.9),
    ),
    # small and fast, for tests and 10-feature synthetic streams (hyperplane, random RBF)
    "small": ModelSpec(
        name="small",
        builder_args={"hidden": [32]},
        feature_names=_features(10),
        optimizer=OptimizerSpec(learning_rate=0.1),
    ),
    # two wider layers with momentum, for 10-feature streams whose concept moves all the time (random RBF
    # with drifting centroids): tracks them where ``small`` cannot (``python -m bench.training``)
    "wide": ModelSpec(
        name="wide",
        builder_args={"hidden": [128, 128]},
        feature_names=_features(10),
        optimizer=OptimizerSpec(learning_rate=0.1, momentum=0.9),
    ),
    # river's STAGGER stream (``synth:stagger``): size, color and shape, three categories each, one-hot encoded
    "stagger": ModelSpec(
        name="stagger",
        builder_args={"hidden": [16]},
        feature_names=["size", "color", "shape"],
        categorical={"size": 3, "color": 3, "shape": 3},
        optimizer=OptimizerSpec(learning_rate=0.1),
    ),
}
