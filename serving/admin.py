"""Admin endpoints behind a bearer token: promote, roll back, pin a version, reload.

Promote and rollback move the registry's ``champion`` (announced on ``model-updates``, so
every other replica follows); pin and reload act on this server only. Each answers once
this server serves the result, or with the reason it cannot. Without ``admin_token`` set
the endpoints are disabled (403).
"""

# No `from __future__ import annotations`: FastAPI evaluates the route signatures, whose types are local names.

import asyncio
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipeline.registry import Registry, RegistryError
from serving.parts import Host, Models, parts_of
from serving.schemas import AdminResult, Error, PinRequest, PromoteRequest
from serving.swap import ModelHost, UnknownModel

_bearer = HTTPBearer(auto_error=False, description="the server's admin_token (STREAMFIT_ADMIN_TOKEN)")

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "missing or wrong bearer token"},
    403: {"model": Error, "description": "admin disabled: no admin_token configured"},
    404: {"model": Error, "description": "unknown model or version"},
    409: {
        "model": Error,
        "description": "the move is impossible now (no candidate, no previous champion, a version that fails to load)",
    },
}


async def authorised(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Let the request through with the app's ``admin_token`` as bearer token (403 when there is none)."""
    token = parts_of(request).admin_token
    if token is None:
        raise HTTPException(403, "admin endpoints are disabled: start the server with STREAMFIT_ADMIN_TOKEN set")
    if credentials is None or not secrets.compare_digest(
        credentials.credentials.encode(), token.get_secret_value().encode()
    ):
        raise HTTPException(
            401,
            "admin endpoints need 'Authorization: Bearer <admin token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


router = APIRouter(prefix="/admin/models/{model}", tags=["admin"], dependencies=[Depends(authorised)], responses=ERRORS)
"""The ``/admin/models/{model}/...`` routes, acting on the app's host and registry (and guarded by its
admin token)."""

Model = Annotated[str, Path(description="a model this server serves")]


async def _result(host: ModelHost, registry: Registry, model: str, swap) -> AdminResult:
    """Wait for the swap ``swap`` scheduled, then report where ``model`` stands."""
    try:
        await asyncio.wrap_future(swap)
    except RegistryError as exc:
        raise HTTPException(409, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the load failed: the swap thread logged it, the previous version serves
        raise HTTPException(409, f"{exc}; still serving {_version(host, model)}") from None
    champion = await run_in_threadpool(champion_of, registry, model)
    state = host.state(model)
    return AdminResult(
        model=model, serving=state.served.version if state.served else None, champion=champion, pinned=state.pinned
    )


async def _move(host: ModelHost, registry: Registry, model: str, action) -> AdminResult:
    try:
        await run_in_threadpool(action)
    except RegistryError as exc:
        raise HTTPException(409, str(exc)) from None
    return await _result(host, registry, model, host.refresh(model, retry=True))


@router.post("/promote", summary="Make a version champion (default: the candidate)")
async def promote(model: Model, host: Host, registry: Models, body: PromoteRequest | None = None) -> AdminResult:
    _served_here(host, model)
    version = body.version if body else None
    if version is not None:
        try:
            await run_in_threadpool(registry.meta, model, version)
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
    return await _move(host, registry, model, lambda: registry.promote(model, version))


@router.post("/rollback", summary="Move champion back to the previous champion")
async def rollback(model: Model, host: Host, registry: Models) -> AdminResult:
    _served_here(host, model)
    return await _move(host, registry, model, lambda: registry.rollback(model))


@router.put("/pin", summary="Serve one version on this server, ignoring champion moves until unpinned")
async def pin(model: Model, host: Host, registry: Models, body: PinRequest) -> AdminResult:
    _served_here(host, model)
    try:
        swap = await run_in_threadpool(host.pin, model, body.version)
    except RegistryError as exc:
        raise HTTPException(404, str(exc)) from None
    return await _result(host, registry, model, swap)


@router.delete("/pin", summary="Follow the champion again")
async def unpin(model: Model, host: Host, registry: Models) -> AdminResult:
    _served_here(host, model)
    return await _result(host, registry, model, host.unpin(model))


@router.post("/reload", summary="Load the served target again from the registry (champion or pin)")
async def reload(model: Model, host: Host, registry: Models) -> AdminResult:
    _served_here(host, model)
    return await _result(host, registry, model, host.refresh(model, reload=True))


def champion_of(registry: Registry, model: str) -> int | None:
    """The registry's champion version of ``model``, None when it cannot be read."""
    try:
        return registry.resolve(model, "champion")
    except RegistryError:
        return None


def _served_here(host: ModelHost, model: str) -> None:
    try:
        host.current(model)
    except UnknownModel as exc:
        raise HTTPException(404, str(exc)) from None


def _version(host: ModelHost, model: str) -> str:
    served = host.current(model)
    return f"version {served.version}" if served else "nothing"
