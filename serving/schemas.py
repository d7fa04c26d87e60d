"""The REST API's bodies, in TensorFlow Serving's shapes, as pydantic models.

They are the OpenAPI page's schemas and the first check of every request: values must
be JSON numbers (a string or a boolean is refused, not coerced) and finite. What depends
on the model -- how many features, which names -- is checked against its spec by
:mod:`serving.inputs`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _list_or_object(value: Any) -> str:
    """Pick the union branch by the JSON type, so an error names one problem, not one per branch."""
    return "object" if isinstance(value, dict) else "list"


Row = Annotated[
    Annotated[list[Number], Tag("list")] | Annotated[dict[str, Number], Tag("object")],
    Discriminator(_list_or_object),
]
"""One row: its features in the model's order, or ``{feature name: value}``."""

Columns = dict[str, list[Number]]
"""TF Serving's columnar form: ``{feature name: [one value per row]}``."""

RowsOrColumns = Annotated[
    Annotated[list[Row], Tag("list")] | Annotated[Columns, Tag("object")],
    Discriminator(_list_or_object),
]

UNION_TAGS = frozenset({"list", "object"})
"""Discriminator tags that pydantic puts in an error's location; error messages leave them out."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Strict):
    """``instances`` (row form) or ``inputs`` (rows, or columns by feature name): exactly one."""

    signature_name: Literal["serving_default"] = Field("serving_default", description="the only signature")
    instances: list[Row] | None = Field(
        None, min_length=1, description="rows: lists of numbers in feature order, or {feature: number} objects"
    )
    inputs: RowsOrColumns | None = Field(
        None, description="rows like `instances`, or columns: {feature: [a number per row]}"
    )

    @model_validator(mode="after")
    def _one_form(self) -> PredictRequest:
        if (self.instances is None) == (self.inputs is None):
            raise ValueError(
                "give exactly one of 'instances' (rows) or 'inputs' (rows, or {feature: [values]} columns)"
            )
        return self


class PredictResponse(BaseModel):
    """The answer to ``instances`` (TF Serving's row format)."""

    predictions: list[list[float]] = Field(
        description="per row, the probability of each class, in the order of the metadata's classes"
    )
    model_version: int = Field(description="the version that computed every prediction of this answer")


class ColumnarResponse(BaseModel):
    """The answer to ``inputs`` (TF Serving's columnar format: the one output, under ``outputs``)."""

    outputs: list[list[float]] = Field(
        description="per row, the probability of each class, in the order of the metadata's classes"
    )
    model_version: int = Field(description="the version that computed every output of this answer")


class ClassifyRequest(_Strict):
    """TF Serving's ``:classify``: ``examples`` as {feature: value} objects, ``context`` features shared by all."""

    signature_name: Literal["serving_default", "classification"] = Field(
        "serving_default", description="either name selects the one classification signature"
    )
    context: dict[str, Number] = Field(default_factory=dict, description="features every example shares")
    examples: list[dict[str, Number]] = Field(min_length=1, description="rows as {feature: number} objects")


class ClassifyResponse(BaseModel):
    result: list[list[tuple[str, float]]] = Field(
        description="per example, [class label, probability] of every class, in the metadata's class order"
    )
    model_version: int = Field(description="the version that classified every example of this answer")


class Status(BaseModel):
    error_code: Literal["OK", "UNKNOWN"] = "OK"
    error_message: str = ""


class VersionStatus(BaseModel):
    version: str
    state: Literal["LOADING", "AVAILABLE", "END"]
    status: Status = Field(default_factory=Status)


class ModelStatus(BaseModel):
    """TF Serving's ``GET /v1/models/{model}``, plus where the champion alias and the pin stand."""

    model_version_status: list[VersionStatus]
    champion: int | None = Field(description="the registry's champion version (None if it cannot be read)")
    pinned: int | None = Field(description="the version an admin pinned; champion moves are ignored while set")


class ModelSpecRef(BaseModel):
    name: str
    signature_name: Literal["serving_default"] = "serving_default"
    version: str


class TensorInfo(BaseModel):
    dtype: Literal["DT_FLOAT", "DT_STRING"]
    tensor_shape: dict[str, Any] = Field(description="{dim: [{size}], unknown_rank}; size -1 is the batch")
    name: str


class SignatureDef(BaseModel):
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    method_name: str


class SignatureDefMap(BaseModel):
    signature_def: dict[str, SignatureDef]


def signature_def(n_features: int, n_classes: int) -> SignatureDefMap:
    """TF Serving's signatures of a classifier: ``serving_default`` (predict) and ``classification``."""

    def tensor(dtype: Literal["DT_FLOAT", "DT_STRING"], name: str, *sizes: int) -> TensorInfo:
        shape = {"dim": [{"size": str(size), "name": ""} for size in sizes], "unknown_rank": False}
        return TensorInfo(dtype=dtype, tensor_shape=shape, name=name)

    probabilities = tensor("DT_FLOAT", "probabilities:0", -1, n_classes)
    return SignatureDefMap(
        signature_def={
            "serving_default": SignatureDef(
                inputs={"features": tensor("DT_FLOAT", "features:0", -1, n_features)},
                outputs={"probabilities": probabilities},
                method_name="tensorflow/serving/predict",
            ),
            "classification": SignatureDef(
                inputs={"inputs": tensor("DT_STRING", "examples:0", -1)},
                outputs={"classes": tensor("DT_STRING", "classes:0", -1, n_classes), "scores": probabilities},
                method_name="tensorflow/serving/classify",
            ),
        }
    )


class Pruning(BaseModel):
    """A pruned version's parameter counts, as the registry recorded them (:mod:`pipeline.pruning`)."""

    total_parameters: int = Field(description="weights of the model")
    active_parameters: int = Field(description="weights not pruned")
    sparsity: float = Field(description="fraction of the weights pruned (kernels only are pruned)")
    compression_ratio: float = Field(description="total_parameters / active_parameters")


class Signature(BaseModel):
    signature_def: SignatureDefMap = Field(
        description="TF Serving's signature_def: the predict and classify signatures"
    )
    features: list[str] = Field(description="input feature names, in the order list rows use")
    classes: list[int | str] = Field(description="class labels, in the order of each prediction's probabilities")
    n_features: int
    n_classes: int
    parameters: int = Field(description="weights of the model, standardisation statistics included")
    builder: str
    builder_args: dict[str, Any]
    created_at: int = Field(description="when this version was registered, epoch ms")
    parent: int | None
    algorithm: str | None
    updates: int
    metrics: dict[str, Any]
    pruning: Pruning | None = Field(default=None, description="a pruned version's parameter counts; null if not pruned")


class ModelMetadata(BaseModel):
    model_spec: ModelSpecRef
    metadata: Signature


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ModelReadiness(BaseModel):
    version: int | None = Field(description="the version served, None until one is loaded and warmed")
    loading: int | None = Field(description="a version being loaded and warmed now")
    error: str | None = Field(description="why the last load failed, if it did")


class Readiness(BaseModel):
    ready: bool = Field(description="every model this server serves has a warmed version")
    models: dict[str, ModelReadiness]


class Error(BaseModel):
    error: str = Field(description="what was wrong, naming the field or the setting")


class PromoteRequest(_Strict):
    version: int | None = Field(None, ge=1, description="the version to make champion; default: the candidate")


class PinRequest(_Strict):
    version: int = Field(ge=1, description="serve this version, whatever the champion, until unpinned")


class AdminResult(BaseModel):
    model: str
    serving: int | None = Field(description="the version this server answers with now")
    champion: int | None
    pinned: int | None
