"""The console's FastAPI app: five pages (one static page that draws the view its path names) and the
JSON they read, live figures by server-sent events, and the admin actions passed on to serving.

It writes nothing itself: promote, rollback and pin go to serving's admin routes with the bearer token
the browser sends (serving checks it), so the console holds no secret. Every source it reads may be
down; each answer then names which one it could not reach instead of failing.
"""

# No `from __future__ import annotations`: FastAPI evaluates the route signatures.

import asyncio
import socket
import threading
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal

import httpx
import orjson
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from console.catalog import catalog
from console.feeds import TopicFeed
from console.live import LiveView
from pipeline.registry import Registry, RegistryError
from pipeline.settings import Settings
from pipeline.spark.lag import QueryLag

PAGES = ("pipeline", "learning", "models", "dead-letters", "try")
STATIC = resources.files("console") / "static"
RAW_SHOWN = 400
"""Characters of a dead letter's raw event shown (the rest is counted, not sent)."""
KEEP = {"training-metrics": 20_000, "model-updates": 1_000, "dlq": 500}
"""Records kept per topic: about five hours of training micro-batches, the alias moves, the newest dead letters."""


@dataclass(frozen=True)
class Parts:
    settings: Settings
    feed: TopicFeed
    live: LiveView
    registry: Registry
    serving: httpx.AsyncClient


def parts(request: Request) -> Parts:
    return request.app.state.console


Console = Annotated[Parts, Depends(parts)]
router = APIRouter()


class Instances(BaseModel):
    instances: list[dict[str, float] | list[float]] = Field(min_length=1, max_length=100)


class Move(BaseModel):
    version: int | None = Field(None, ge=1)


@router.get("/", include_in_schema=False)
def home() -> RedirectResponse:
    return RedirectResponse("/pipeline")


@router.get("/api/pipeline", summary="The pipeline's latest figures")
def pipeline(console: Console) -> dict:
    return console.live.latest


@router.get("/api/stream", summary="The pipeline's figures as server-sent events, one per sample")
async def stream(request: Request, console: Console) -> StreamingResponse:
    async def samples():
        sent = None
        while not await request.is_disconnected():
            view = console.live.latest
            if view.get("at") != sent:
                sent = view.get("at")
                yield b"data: " + orjson.dumps(view) + b"\n\n"
            await asyncio.sleep(0.25)

    return StreamingResponse(samples(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get(
    "/api/learning", summary="Prequential figures per training micro-batch, drift flags, gate verdicts, alias moves"
)
def learning(console: Console) -> dict:
    s = console.settings
    batches = [
        {
            "at": r.value.get("ts", r.at),
            "events": r.value.get("events"),
            "accuracy": r.value.get("accuracy"),
            "log_loss": r.value.get("log_loss"),
            "window_accuracy": r.value.get("window_accuracy"),
            "drift": bool(r.value.get("drift")),
            "gate": r.value.get("gate"),
            "published": r.value.get("versions_published") or [],
        }
        for r in console.feed.latest(s.topic_training_metrics)
        if r.value and r.value.get("model") == s.model
    ]
    moves = [
        {
            "at": r.at,
            "alias": r.value.get("alias"),
            "version": r.value.get("version"),
            "deleted": bool(r.value.get("deleted")),
        }
        for r in console.feed.latest(s.topic_model_updates)
        if r.value and r.value.get("model") == s.model
    ]
    return {"model": s.model, "batches": batches, "moves": moves, "sources": {"kafka": console.feed.problem}}


@router.get("/api/models", summary="Every model: aliases, versions with lineage, metrics, gate verdicts and weights")
def models(console: Console) -> dict:
    try:
        found, problem = catalog(console.registry), None
    except (RegistryError, OSError) as exc:
        found, problem = [], f"registry: {console.settings.registry_url} ({exc})"
    verdicts = {  # the gate's verdict on each candidate it reviewed, from training-metrics
        (r.value.get("model"), r.value["gate"].get("candidate")): r.value["gate"]
        for r in console.feed.latest(console.settings.topic_training_metrics)
        if r.value and isinstance(r.value.get("gate"), dict)
    }
    for model in found:
        for version in model["versions"]:
            version["gate"] = verdicts.get((model["name"], version["version"]))
    return {
        "models": found,
        "served": console.settings.model,
        "admin": console.settings.admin_token is not None,
        "serving_url": str(console.serving.base_url).rstrip("/"),
        "sources": {"registry": problem},
    }


@router.get("/api/dead-letters", summary="The newest dead letters, their raw events cut to a bounded prefix")
def dead_letters(console: Console) -> dict:
    letters = []
    for r in reversed(console.feed.latest(console.settings.topic_dlq)):
        value = r.value or {"stage": "?", "error": "not a JSON dead letter", "raw": ""}
        raw = str(value.get("raw", ""))
        letters.append(
            {
                "failed_at": value.get("failed_at", r.at),
                "stage": str(value.get("stage", "?")),
                "error": str(value.get("error", "")),
                "where": f"{value.get('topic')}[{value.get('partition')}]@{value.get('offset')}",
                "encoding": value.get("raw_encoding", "utf8"),
                "raw": raw[:RAW_SHOWN],
                "cut": max(0, len(raw) - RAW_SHOWN),
            }
        )
    return {"dead_letters": letters, "sources": {"kafka": console.feed.problem}}


@router.post("/api/predict/{model}", summary="Ask serving for a prediction; its answer and the equivalent curl line")
async def predict(model: str, body: Instances, console: Console) -> dict:
    path = f"/v1/models/{model}:predict"
    payload = body.model_dump()
    curl = (
        f"curl -s -H 'Content-Type: application/json' {str(console.serving.base_url).rstrip('/')}{path} "
        f"-d '{orjson.dumps(payload).decode()}'"
    )
    try:
        answer = await console.serving.post(path, json=payload)
    except httpx.HTTPError as exc:
        return {
            "status": None,
            "answer": None,
            "curl": curl,
            "sources": {"serving": f"serving at {console.serving.base_url}: {exc}"},
        }
    return {"status": answer.status_code, "answer": _json(answer), "curl": curl, "sources": {"serving": None}}


@router.post("/api/admin/{model}/{action}", summary="Promote, roll back, pin or unpin through serving's admin routes")
async def admin(
    model: str,
    action: Literal["promote", "rollback", "pin", "unpin"],
    console: Console,
    body: Move | None = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    method, route = {
        "promote": ("POST", "promote"),
        "rollback": ("POST", "rollback"),
        "pin": ("PUT", "pin"),
        "unpin": ("DELETE", "pin"),
    }[action]
    payload = body.model_dump() if body and body.version is not None and action in ("promote", "pin") else None
    try:
        answer = await console.serving.request(
            method,
            f"/admin/models/{model}/{route}",
            json=payload,
            headers={"Authorization": authorization} if authorization else {},
            timeout=120,
        )
    except httpx.HTTPError as exc:
        return JSONResponse({"error": f"serving at {console.serving.base_url}: {exc}"}, status_code=502)
    return JSONResponse(_json(answer), status_code=answer.status_code)


def _json(answer: httpx.Response) -> Any:
    try:
        return answer.json()
    except ValueError:
        return {"error": answer.text[:500]}


def create_app(settings: Settings, bootstrap: Callable[[], str], lags: Mapping[str, QueryLag] | None = None) -> FastAPI:
    """The console of the pipeline ``settings`` describe; ``bootstrap()`` names its Kafka (asked again after
    a failure); ``lags``: the queries' lag, when this process runs them (``streamfit up``)."""
    s = settings
    serve_url = f"http://{s.serve_host}:{s.serve_port}"
    keep = {
        s.topic_training_metrics: KEEP["training-metrics"],
        s.topic_model_updates: KEEP["model-updates"],
        s.topic_dlq: KEEP["dlq"],
    }
    feed = TopicFeed(bootstrap, keep, s.kafka_timeout_s, s.kafka)

    def history() -> list[dict]:
        return [r.value for r in feed.latest(s.topic_training_metrics) if r.value and "batch_id" in r.value]

    live = LiveView(s, bootstrap, serve_url, history, lambda: feed.problem, lags)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        feed.start()
        live.start()
        async with httpx.AsyncClient(base_url=serve_url, timeout=10) as serving:
            app.state.console = Parts(s, feed, live, Registry(s.registry_url), serving)
            yield
        await asyncio.to_thread(live.stop)
        await asyncio.to_thread(feed.stop)

    app = FastAPI(title="streamfit console", lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    for page in PAGES:
        app.add_api_route(f"/{page}", _page, methods=["GET"], include_in_schema=False)
    return app


def _page() -> FileResponse:
    return FileResponse(str(STATIC / "index.html"), headers={"Cache-Control": "no-cache"})


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or to a free port when that one is taken (its number is in the socket)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.bind((host, 0))
    sock.listen(128)  # connections wait for uvicorn instead of being refused while it starts
    return sock


class ConsoleServer:
    """The console served by uvicorn on ``sock`` in a background thread (``streamfit up`` runs it beside Spark)."""

    def __init__(self, app: FastAPI, sock: socket.socket):
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="console", daemon=True)

    def start(self) -> "ConsoleServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
