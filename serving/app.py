"""The FastAPI app: TensorFlow Serving's REST API over hot-swapped, dynamically batched models.

``create_app(settings)`` builds the parts -- :class:`~serving.swap.ModelHost` (what is
served), :class:`~serving.follow.Follower` (champion moves), :class:`~serving.batching.Batcher`
(one forward pass for concurrent requests), the metrics -- and includes the routers: ``router``
here and :mod:`serving.admin`'s, whose routes get the parts as dependencies (:mod:`serving.parts`)
and only delegate. ``run`` serves it with uvicorn, as ``streamfit serve`` does.
"""

# No `from __future__ import annotations`: FastAPI evaluates the route signatures.

import asyncio
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException, Path, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

from pipeline.model_updates import announcing_registry
from pipeline.registry import Registry, RegistryError
from pipeline.settings import Settings
from pipeline.spec import BUILTIN_SPECS
from serving import admin, errors
from serving.admin import champion_of
from serving.batching import Batcher, Overloaded
from serving.canary import Canary
from serving.content_type import JsonBodies
from serving.follow import Follower
from serving.inputs import BadInput, Request, check_answers, to_matrix
from serving.limits import BodyLimit
from serving.metrics import Metrics, RequestMetrics
from serving.parts import All, Figures, Host, Models, Parts, store
from serving.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ColumnarResponse,
    Error,
    Health,
    ModelMetadata,
    ModelReadiness,
    ModelSpecRef,
    ModelStatus,
    PredictRequest,
    PredictResponse,
    Pruning,
    Readiness,
    Signature,
    Status,
    VersionStatus,
    signature_def,
)
from serving.shadow import Shadow
from serving.swap import HostState, ModelHost, NotLoaded, NotReady, Served, UnknownModel

DESCRIPTION = """\
Predictions from the registry's **champion** version of each served model, in TensorFlow
Serving's REST shapes; `/versions/{version}` and `/labels/{label}` (a registry alias: `champion`,
`candidate`, ...) ask for another version, which is loaded once and kept while recently used. With
canary traffic on, a share of `:predict` requests is answered by the candidate; with shadow traffic on,
the candidate also scores, off the request path, what the champion answered. A new champion
(announced on Kafka's `model-updates`, or seen by polling the registry) is loaded and warmed off
the request path, then swapped in: no request fails or waits for it, and every answer names the
version that computed it. Concurrent requests are computed together in one forward pass.

Errors are `{"error": "..."}` naming the problem: 400 for a body that does not fit the model,
404 for an unknown model, version or label, 413 for a body over `max_request_bytes`, 503 with
`Retry-After` while a model has no version loaded yet or while `max_queued_rows` rows already
wait for the model
(overload: retry later rather than queue without end). Admin routes need `Authorization: Bearer <admin token>`.
"""

TAGS = [
    {"name": "predict", "description": "predictions (TF Serving `:predict`)"},
    {"name": "models", "description": "what is served: version status and metadata"},
    {"name": "admin", "description": "move the champion, pin a version, reload (bearer token)"},
    {"name": "health", "description": "liveness, readiness, Prometheus metrics"},
]

Responses = dict[int | str, dict[str, Any]]  # FastAPI's `responses=`
BAD_REQUEST: Responses = {
    400: {"model": Error, "description": "the request does not fit the API or the model"},
    413: {"model": Error, "description": "body over max_request_bytes"},
}
UNKNOWN: Responses = {404: {"model": Error, "description": "this server does not serve the model"}}
NOT_READY: Responses = {503: {"model": Error, "description": "the model has no version loaded yet; retry"}}
OVERLOADED: Responses = {
    503: {
        "model": Error,
        "description": "the model has no version loaded yet, or max_queued_rows rows "
        "already wait for it; retry after Retry-After seconds",
    }
}
RETRY_AFTER_S = 1
"""What a 503 tells clients to wait: about the time a full queue takes to drain at small-model speed."""


router = APIRouter()
"""TF Serving's model routes and the health routes, acting on the app's :mod:`serving.parts`. The ``model``
parameter's examples and the request examples depend on the app; :func:`create_app` adds them to its schema."""

PREDICT = "/v1/models/{model}:predict"
PREDICT_ROUTES = (PREDICT, "/v1/models/{model}/versions/{version}:predict", "/v1/models/{model}/labels/{label}:predict")
Model = Annotated[str, Path(description="the model's name in the registry")]
Version = Annotated[int, Path(ge=1, description="a version number in the registry")]
Label = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_-]*$", description="a registry alias: champion, candidate, ...")]


def create_app(settings: Settings, models: Sequence[str] | None = None) -> FastAPI:
    """The serving app for ``models`` (default: ``settings.model``) from ``settings.registry_url``."""
    models = list(models or [settings.model])
    metrics = Metrics()
    registry, announcer = announcing_registry(settings)
    host = ModelHost(
        registry,
        models,
        metrics,
        warm_rows=settings.max_batch_size,
        max_loaded=settings.max_loaded_versions,
        load_candidate=settings.canary_share > 0 or settings.shadow,
    )
    batcher = Batcher(
        settings.max_batch_size, settings.max_batch_wait_ms / 1000, settings.max_queued_rows, metrics.observe_batch
    )
    metrics.queued_rows.set_function(lambda: batcher.queued_rows)
    follower = Follower(settings, host, metrics)
    shadow = Shadow(host, metrics, settings.max_batch_size, settings.shadow_queued_rows) if settings.shadow else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        if shadow:
            shadow.start()
        follower.start()
        try:
            yield
        finally:
            follower.stop()
            if shadow:
                await shadow.stop()
            await batcher.stop()
            host.close()
            announcer.close()

    app = FastAPI(title="streamfit serving", description=DESCRIPTION, version="1", openapi_tags=TAGS, lifespan=lifespan)
    store(app, Parts(host, registry, batcher, metrics, settings.admin_token, Canary(settings.canary_share), shadow))
    errors.install(app)
    app.add_middleware(JsonBodies)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.include_router(admin.router)
    app.include_router(router)
    _finish_openapi(app, models, _examples(registry, models[0]))
    return app


PREDICTS: dict[str, Any] = {
    "tags": ["predict"],
    "responses": BAD_REQUEST | UNKNOWN | OVERLOADED,
    "response_model": PredictResponse | ColumnarResponse,
}
CLASSIFIES: dict[str, Any] = {"tags": ["predict"], "responses": BAD_REQUEST | UNKNOWN | OVERLOADED}


@router.post(PREDICT, summary="Class probabilities from the champion (or, under canary, the candidate)", **PREDICTS)
async def predict(model: Model, body: PredictRequest, parts: All) -> PredictResponse | ColumnarResponse:
    return _predictions(body, *await _answer(parts, model, body))


@router.post(PREDICT_ROUTES[1], summary="Class probabilities from one version", **PREDICTS)
async def predict_version(
    model: Model, version: Version, body: PredictRequest, parts: All
) -> PredictResponse | ColumnarResponse:
    started = time.perf_counter()
    served = await _lease_version(parts, model, version)
    return _predictions(body, served, (await _compute(parts, served, body, started))[1])


@router.post(PREDICT_ROUTES[2], summary="Class probabilities from the version a registry alias names", **PREDICTS)
async def predict_label(
    model: Model, label: Label, body: PredictRequest, parts: All
) -> PredictResponse | ColumnarResponse:
    started = time.perf_counter()
    served = await _lease_version(parts, model, await _aliased(parts, model, label))
    return _predictions(body, served, (await _compute(parts, served, body, started))[1])


@router.post("/v1/models/{model}:classify", summary="Classes and their scores (TF Serving's classify)", **CLASSIFIES)
async def classify(model: Model, body: ClassifyRequest, parts: All) -> ClassifyResponse:
    return _classes(*await _answer(parts, model, body))


@router.post("/v1/models/{model}/versions/{version}:classify", summary="Classify with one version", **CLASSIFIES)
async def classify_version(model: Model, version: Version, body: ClassifyRequest, parts: All) -> ClassifyResponse:
    started = time.perf_counter()
    served = await _lease_version(parts, model, version)
    return _classes(served, (await _compute(parts, served, body, started))[1])


@router.post("/v1/models/{model}/labels/{label}:classify", summary="Classify with an aliased version", **CLASSIFIES)
async def classify_label(model: Model, label: Label, body: ClassifyRequest, parts: All) -> ClassifyResponse:
    started = time.perf_counter()
    served = await _lease_version(parts, model, await _aliased(parts, model, label))
    return _classes(served, (await _compute(parts, served, body, started))[1])


@router.get("/v1/models/{model}", tags=["models"], responses=UNKNOWN, summary="Version status (TF Serving's)")
async def status(model: Model, host: Host, registry: Models) -> ModelStatus:
    state = _state(host, model)
    versions = []
    if state.loading is not None:
        versions.append(VersionStatus(version=str(state.loading), state="LOADING"))
    if state.served is not None:
        versions.append(VersionStatus(version=str(state.served.version), state="AVAILABLE"))
    versions.extend(VersionStatus(version=str(v), state="AVAILABLE") for v in sorted(state.others))
    if state.failure is not None:
        versions.append(
            VersionStatus(
                version=str(state.failure.version or ""),
                state="END",
                status=Status(error_code="UNKNOWN", error_message=state.failure.reason),
            )
        )
    champion = await run_in_threadpool(champion_of, registry, model)
    return ModelStatus(model_version_status=versions, champion=champion, pinned=state.pinned)


@router.get(
    "/v1/models/{model}/metadata",
    tags=["models"],
    responses=UNKNOWN | NOT_READY,
    summary="Feature schema, classes, version and size of the served version",
)
async def metadata(model: Model, host: Host) -> ModelMetadata:
    """TF Serving's ``signature_def``, and beside it the feature schema, classes and provenance."""
    served = _state(host, model).served
    if served is None:
        raise HTTPException(
            503, f"model {model!r} has no version loaded yet", headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    return _metadata(served)


@router.get(
    "/v1/models/{model}/versions/{version}/metadata",
    tags=["models"],
    responses=UNKNOWN,
    summary="Metadata of one version (loaded to answer, as by its :predict)",
)
async def version_metadata(model: Model, version: Version, parts: All) -> ModelMetadata:
    served = await _lease_version(parts, model, version)
    served.release()
    return _metadata(served)


@router.get(
    "/v1/models/{model}/labels/{label}/metadata",
    tags=["models"],
    responses=UNKNOWN,
    summary="Metadata of the version a registry alias names",
)
async def label_metadata(model: Model, label: Label, parts: All) -> ModelMetadata:
    served = await _lease_version(parts, model, await _aliased(parts, model, label))
    served.release()
    return _metadata(served)


def _metadata(served: Served) -> ModelMetadata:
    spec, meta = served.spec, served.meta
    return ModelMetadata(
        model_spec=ModelSpecRef(name=served.model, version=str(served.version)),
        metadata=Signature(
            signature_def=signature_def(spec.n_features, spec.n_classes),
            features=spec.feature_names,
            classes=spec.classes,
            n_features=spec.n_features,
            n_classes=spec.n_classes,
            parameters=served.bundle.n_parameters,
            builder=spec.builder,
            builder_args=spec.builder_args,
            created_at=meta["created_at"],
            parent=meta["parent"],
            algorithm=meta["algorithm"],
            updates=meta["updates"],
            metrics=meta["metrics"],
            pruning=Pruning.model_validate(meta) if "active_parameters" in meta else None,
        ),
    )


@router.get("/healthz", tags=["health"], summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    tags=["health"],
    responses={503: {"model": Readiness, "description": "not ready"}},
    summary="Readiness: every served model has a loaded, warmed version",
)
async def readyz(response: Response, host: Host) -> Readiness:
    states = {m: host.state(m) for m in host.models}
    ready = all(state.served is not None for state in states.values())
    response.status_code = 200 if ready else 503
    return Readiness(
        ready=ready,
        models={
            m: ModelReadiness(
                version=state.served.version if state.served else None,
                loading=state.loading,
                error=state.failure.reason if state.failure else None,
            )
            for m, state in states.items()
        },
    )


@router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def prometheus(metrics: Figures) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)


def run(app: FastAPI, settings: Settings, *, access_log: bool = False) -> None:
    """Serve ``app`` on ``settings.serve_host:serve_port`` until SIGINT/SIGTERM."""
    uvicorn.run(
        app,
        host=settings.serve_host,
        port=settings.serve_port,
        access_log=access_log,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


def _lease(acquire: Callable[[], Served]) -> Served:
    try:
        return acquire()
    except UnknownModel as exc:
        raise HTTPException(404, str(exc)) from None
    except NotReady as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from None


async def _lease_version(parts: Parts, model: str, version: int) -> Served:
    """Lease ``version``, loading it first (on the swap thread) when it is not loaded."""
    host = parts.host
    for _ in range(3):  # a load can be evicted by others' loads before this request leases it
        try:
            return _lease(lambda: host.acquire(model, version))
        except NotLoaded:
            pass
        try:
            await asyncio.wrap_future(host.load(model, version))
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the version exists but cannot be loaded; the log has the trace
            raise HTTPException(503, f"model {model!r} version {version} could not be loaded: {exc}") from None
    raise HTTPException(
        503, f"model {model!r} version {version} was unloaded for others at once; raise max_loaded_versions"
    )


async def _aliased(parts: Parts, model: str, label: str) -> int:
    """The version ``label`` names: as the swap thread last read it, else from the registry now."""
    try:
        version = parts.host.alias(model, label)
    except UnknownModel as exc:
        raise HTTPException(404, str(exc)) from None
    if version is not None:
        return version
    try:
        return await run_in_threadpool(parts.registry.resolve, model, label)
    except RegistryError as exc:
        raise HTTPException(404, str(exc)) from None


async def _answer(parts: Parts, model: str, body: Request) -> tuple[Served, np.ndarray]:
    """The champion's answer (or, under canary, the candidate's), offered to the shadow candidate."""
    started = time.perf_counter()
    served = _lease(lambda: parts.canary.lease(parts.host, model))
    x, y = await _compute(parts, served, body, started)
    if parts.shadow is not None:
        parts.shadow.offer(served, x, y)
    return served, y


async def _compute(parts: Parts, served: Served, body: Request, started: float) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``body`` and ``served``'s probabilities for them; releases the lease, counts the answer."""
    answered = parts.metrics.version_errors.labels(served.model, str(served.version))
    try:
        x = to_matrix(body, served.spec, served.bundle.standardisation())
    except BadInput as exc:
        served.release()
        answered.inc()
        raise HTTPException(400, str(exc)) from None
    try:
        y = await parts.batcher.predict(served, x)  # releases the lease once computed, or at once when refused
        check_answers(body, y)
    except Overloaded as exc:
        answered.inc()
        parts.metrics.overloaded.labels(served.model).inc()
        raise HTTPException(
            503, f"overloaded: {exc}; retry after {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)}
        ) from None
    except BadInput as exc:
        answered.inc()
        raise HTTPException(400, str(exc)) from None
    except BaseException:
        answered.inc()
        raise
    labels = (served.model, str(served.version))
    parts.metrics.version_requests.labels(*labels).inc()
    parts.metrics.version_latency.labels(*labels).observe(time.perf_counter() - started)
    return x, y


def _predictions(body: PredictRequest, served: Served, y: np.ndarray) -> PredictResponse | ColumnarResponse:
    """TF Serving's answer shape follows the request's: ``instances`` -> ``predictions``, ``inputs`` -> ``outputs``."""
    if body.instances is not None:
        return PredictResponse(predictions=y.tolist(), model_version=served.version)
    return ColumnarResponse(outputs=y.tolist(), model_version=served.version)


def _classes(served: Served, y: np.ndarray) -> ClassifyResponse:
    labels = [str(label) for label in served.spec.classes]
    return ClassifyResponse(result=[list(zip(labels, row)) for row in y.tolist()], model_version=served.version)


def _state(host: ModelHost, model: str) -> HostState:
    try:
        return host.state(model)
    except UnknownModel as exc:
        raise HTTPException(404, str(exc)) from None


def _examples(registry: Registry, model: str) -> dict:
    """Request examples that work as they are against ``model`` (the OpenAPI page's "Try it out")."""
    try:
        names = registry.spec(model).feature_names
    except RegistryError:
        names = BUILTIN_SPECS["higgs"].feature_names
    row = [round(0.1 * (i % 10) - 0.4, 1) for i in range(len(names))]
    return {
        "rows": {"summary": "rows as lists, in feature order", "value": {"instances": [row]}},
        "objects": {"summary": "rows as {feature: value} objects", "value": {"instances": [dict(zip(names, row))]}},
        "columns": {
            "summary": "columns: {feature: [a value per row]}",
            "value": {"inputs": {name: [value, -value] for name, value in zip(names, row)}},
        },
    }


def _finish_openapi(app: FastAPI, models: list[str], examples: dict) -> None:
    """Have ``app``'s schema, built once on first use, say what its routes' declarations cannot."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = app.openapi_schema
        if schema is None:
            schema = build()
            _document_examples(schema, models, examples)
            _document_400_not_422(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema


def _document_examples(schema: dict[str, Any], models: list[str], examples: dict) -> None:
    """This app's model names as examples of the ``model`` parameter, and ``examples`` as predict's bodies."""
    for route in router.routes:
        assert isinstance(route, APIRoute)  # every route declared with @router.get or @router.post is
        for operation in schema["paths"][route.path].values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model":
                    parameter["schema"]["examples"] = models
    for path in PREDICT_ROUTES:
        schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"] = examples


def _document_400_not_422(schema: dict[str, Any]) -> None:
    """Validation errors answer 400 (see :mod:`serving.errors`); the schema should say so, not FastAPI's 422."""
    for path in schema["paths"].values():
        for operation in path.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault(
                    "400",
                    {
                        "description": "the request does not fit the API",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                )
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
