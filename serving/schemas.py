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
    predictions: list[list[float]] = Field(
        description="per row, the probability of each class, in the order of the metadata's classes"
    )
    model_version: int = Field(description="the version that computed every prediction of this answer")


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


class Signature(BaseModel):
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
