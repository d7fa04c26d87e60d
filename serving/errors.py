"""Every error answer is ``{"error": message}`` (TF Serving's shape), the message naming the problem.

Validation failures are 400 (TF Serving's status for a bad argument), with pydantic's
error locations turned into the paths a client wrote (``instances[2][5]``,
``inputs.f3[0]``) and the offending value shown.

>>> describe([{"type": "float_type", "loc": ("body", "instances", 0, "list", 3),
...            "msg": "Input should be a valid number", "input": "abc"}])
"instances[0][3]: Input should be a valid number, got 'abc'"
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serving.schemas import UNION_TAGS

log = logging.getLogger(__name__)

SHOWN = 3
"""Validation errors spelled out in one message; the rest are counted."""

EMPTY_BODY = 'empty body: send a JSON object with "instances" or "inputs" (Content-Type: application/json)'


def install(app: FastAPI) -> None:
    """Make ``app`` answer validation and HTTP errors as ``{"error": ...}``."""
    # Starlette types a handler as taking any Exception; it calls each with the class it is registered for
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(400, describe(exc.errors()))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail), exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not a bad request: logged with its trace, answered in the same JSON shape."""
    log.exception("%s %s failed", request.method, request.url.path)
    return error(500, f"internal error ({type(exc).__name__}); the server log has the details")


def describe(errors: Sequence[dict[str, Any]]) -> str:
    """One readable line for pydantic/FastAPI validation errors."""
    parts = [_one(e) for e in errors[:SHOWN]]
    more = f" (and {len(errors) - SHOWN} more problems)" if len(errors) > SHOWN else ""
    return "; ".join(parts) + more


def _one(err: dict[str, Any]) -> str:
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "json_invalid":
        return f"body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])} at character {loc[-1]}"
    if loc == ("body",) and kind == "missing":
        return EMPTY_BODY
    if loc == ("body",) and kind in ("model_attributes_type", "dict_type"):
        shown = err.get("input")
        if isinstance(shown, (bytes, bytearray)):
            return 'the body must be a JSON object with "instances" or "inputs", sent as Content-Type: application/json'
        return f'the body must be a JSON object with "instances" or "inputs", got {_short(shown)}'
    where = _path(loc[1:] if loc and loc[0] == "body" else loc)
    message = err["msg"].removeprefix("Value error, ")
    if kind == "list_type" and len(loc) > 1 and loc[-1] == "list":  # the union branch picked for a non-object
        message = (
            "expected rows (a list) or columns (a {feature: [values]} object)"
            if loc[-2] == "inputs"
            else "expected a row: a list of numbers or a {feature: number} object"
        )
    if kind not in ("value_error", "missing", "extra_forbidden") and "input" in err:
        message += f", got {_short(err['input'])}"
    return f"{where}: {message}" if where else message


def _path(loc: Sequence[str | int]) -> str:
    """``("instances", 0, "list", 3)`` -> ``instances[0][3]``: indexes in brackets, union tags dropped."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in UNION_TAGS and i > 0 and (isinstance(loc[i - 1], int) or loc[i - 1] == "inputs"):
            continue
        else:
            out += f".{part}" if out else part
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
