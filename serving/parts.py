"""What the routes work with, kept in the app's state and handed to each route as a FastAPI dependency.

:func:`serving.app.create_app` builds the parts once per app and stores them with :func:`store`; the
routes, declared in module-level routers, name the part they use (``host: Host``), so no route is a
closure over a factory's locals and several apps can live in one process.
"""

# No `from __future__ import annotations`: FastAPI evaluates the dependency signatures.

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from pydantic import SecretStr

from pipeline.registry import Registry
from serving.batching import Batcher
from serving.canary import Canary
from serving.metrics import Metrics
from serving.shadow import Shadow
from serving.swap import ModelHost


@dataclass(frozen=True)
class Parts:
    """One app's parts: what it serves, where versions come from, the batcher, the metrics, the admin token
    (None: admin disabled), the canary share and the shadow scorer (None: shadow off)."""

    host: ModelHost
    registry: Registry
    batcher: Batcher
    metrics: Metrics
    admin_token: SecretStr | None
    canary: Canary
    shadow: Shadow | None


def store(app: FastAPI, parts: Parts) -> None:
    app.state.parts = parts


def parts_of(request: Request) -> Parts:
    """The parts of the app ``request`` came to."""
    return request.app.state.parts


def _host(request: Request) -> ModelHost:
    return parts_of(request).host


def _registry(request: Request) -> Registry:
    return parts_of(request).registry


def _metrics(request: Request) -> Metrics:
    return parts_of(request).metrics


All = Annotated[Parts, Depends(parts_of)]
Host = Annotated[ModelHost, Depends(_host)]
Models = Annotated[Registry, Depends(_registry)]
Figures = Annotated[Metrics, Depends(_metrics)]
