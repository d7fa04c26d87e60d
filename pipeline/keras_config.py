"""An architecture given as Keras's own model config (JSON): how a model trained elsewhere joins a spec.

The config is data and is checked as data before Keras sees it: every object it names must be one
of Keras's built-ins (its ``module`` is ``keras`` or ``keras.*``, no registered custom name), and
nothing in it may carry Python code (``Lambda`` layers, marshalled lambdas, ``TFSMLayer``, which
loads a SavedModel's graph). Keras then builds it with ``safe_mode=True`` as a second guard.
``tensors`` are the model's weight shapes by name, recorded when it was imported, so weights can be
checked without TensorFlow and a rebuilt model is known to be the same one.

>>> code_in_config({"module": "keras.layers", "class_name": "Lambda", "config": {"name": "double"}})[:56]
"the model has a 'Lambda' layer 'double': it runs Python "
>>> code_in_config({"module": "keras.layers", "class_name": "Dense", "config": {"activation": "relu"}}) is None
True
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

CODE_CARRYING = {"Lambda", "TFSMLayer", "__lambda__"}
"""Keras classes whose config holds or loads executable code."""
FUNCTION_KEYS = {"activation", "recurrent_activation", "function", "output_shape"}
"""Config fields that name a function: they must be a built-in's name or a built-in Keras object."""


def code_in_config(node: Any, within: str = "the model") -> str | None:
    """Why ``node`` (a Keras config) is refused, naming the layer; None when it names only Keras built-ins."""
    if isinstance(node, list):
        return next((problem for item in node if (problem := code_in_config(item, within))), None)
    if not isinstance(node, dict):
        return None
    class_name = node.get("class_name")
    if class_name is not None and class_name != "__keras_tensor__":
        module, registered, inner = node.get("module"), node.get("registered_name"), node.get("config")
        name = inner.get("name") if isinstance(inner, dict) else None
        place = f"{class_name!r} layer {name!r}" if isinstance(name, str) else f"{class_name!r} in {within}"
        if class_name in CODE_CARRYING:
            return (
                f"the model has a {place}: it runs Python code, which streamfit does not load; "
                "use built-in Keras layers (Dense, Dropout, Normalization, ...) instead"
            )
        if not isinstance(module, str) or not (module == "keras" or module.startswith("keras.")):
            return (
                f"the model has a custom {place} (module {module!r}): only Keras's built-in layers, "
                "activations and initializers are accepted (custom code is not loaded)"
            )
        if isinstance(registered, str) and ">" in registered:
            return f"the model has a registered custom object {registered!r} ({place}): not accepted"
        within = place if isinstance(name, str) else within
    for key, value in node.items():
        if key in FUNCTION_KEYS and not (
            value is None or isinstance(value, str) or (isinstance(value, dict) and "class_name" in value)
        ):
            return f"the model has a Python function as {key!r} of {within}: only built-in names are accepted"
        if problem := code_in_config(value, within):
            return problem
    return None


class KerasConfig(BaseModel):
    """A Keras model config (``model.get_config()`` serialised, or a ``.keras`` file's ``config.json``)
    and the tensors it makes, by name. Its input is the standardised features; its output the class
    probabilities (a softmax)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: dict[str, Any]
    tensors: dict[str, tuple[int, ...]] = Field(min_length=1)

    @field_validator("config")
    @classmethod
    def _only_builtins(cls, config: dict[str, Any]) -> dict[str, Any]:
        if problem := code_in_config(config):
            raise ValueError(problem)
        return config

    def keras_model(self):
        """A fresh Keras model of the config (Keras consumes the dict it is given, so a copy)."""
        import keras

        return keras.saving.deserialize_keras_object(copy.deepcopy(self.config), safe_mode=True)

    def build(self, x, n_classes: int, seed: int):
        """The imported model applied to the symbolic tensor ``x``; its own initial weights (the
        registry's version 1 holds the imported ones). ``seed`` is unused: the config fixes its seeds."""
        return self.keras_model()(x)

    def weight_shapes(self, n_inputs: int, n_classes: int) -> dict[str, tuple[int, ...]]:
        """The tensors ``build`` makes, by name, in order: those recorded at import."""
        return dict(self.tensors)
