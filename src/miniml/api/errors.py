"""The one place where errors become HTTP responses (RFC 9457 problem+json)."""

from __future__ import annotations

import errno
import hmac
import logging
import os
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from miniml.db.engine import is_busy
from miniml.errors import Conflict, InsufficientStorage, MiniMLError, Unauthorized, UpstreamUnavailable

log = logging.getLogger("miniml.api")

PROBLEM_TYPE = "https://miniml.dev/problems/"
RETRY_AFTER_S = "5"
WWW_AUTHENTICATE = 'Bearer realm="miniml", ApiKey realm="miniml", header="X-API-Key"'


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    request_id: str | None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + title.lower().replace(" ", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": request_id,
    }
    if extra:
        body.update(extra)
    hdrs = dict(headers or {})
    if status == 401:  # RFC 9110 §11.6.1: a 401 names the schemes that would work
        hdrs.setdefault("WWW-Authenticate", WWW_AUTHENTICATE)
    if status == 503:
        hdrs.setdefault("Retry-After", RETRY_AFTER_S)
    return Response(orjson.dumps(body), status_code=status, media_type="application/problem+json", headers=hdrs)


def check_metrics_token(request: Request, token: str | None) -> None:
    """/metrics answers only the scrape token, when one is set."""
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("/metrics needs 'Authorization: Bearer <the scrape token>' (monitoring.metrics_token).")


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def from_error(exc: MiniMLError, request_id: str | None) -> Response:
    return problem_response(exc.status, exc.title, exc.detail, request_id=request_id, extra=exc.extra)


def _describe(errors: list[Any]) -> str:
    parts = []
    for err in errors[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "is not a known field; remove it"
        parts.append(f"{loc}: {msg}")
    return "Invalid request: " + "; ".join(parts) + "."


def install(app: FastAPI) -> None:
    async def on_miniml(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MiniMLError)
        return from_error(exc, request_id_of(request))

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return problem_response(
            422, "Invalid input", _describe(errors), request_id=request_id_of(request), extra={"errors": errors}
        )

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        titles = {404: "Not found", 405: "Method not allowed", 401: "Unauthorized", 403: "Forbidden"}
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"No route {request.url.path}; see /docs for the API."
        return problem_response(
            exc.status_code,
            titles.get(exc.status_code, "Error"),
            detail,
            request_id=request_id_of(request),
            headers=dict(exc.headers or {}),
        )

    async def on_db_down(request: Request, exc: Exception) -> Response:
        log.warning("metadata DB unavailable: %s %s", type(exc).__name__, str(exc)[:300])
        # Every wait on the DB ends within db.connect_timeout_s (db/engine.py): the client hears promptly.
        if is_busy(exc):
            err = UpstreamUnavailable(
                "The metadata database is busy: other writes held it for longer than the api waits "
                "(db.connect_timeout_s); retry in a few seconds."
            )
        else:
            err = UpstreamUnavailable("The metadata database is not answering; retry in a few seconds.")
        return from_error(err, request_id_of(request))

    app.add_exception_handler(MiniMLError, on_miniml)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(OperationalError, on_db_down)
    app.add_exception_handler(PoolTimeout, on_db_down)

    async def on_dbapi(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DBAPIError)
        if exc.connection_invalidated:
            return await on_db_down(request, exc)
        raise exc

    app.add_exception_handler(DBAPIError, on_dbapi)

    async def on_os_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OSError)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" ({os.path.dirname(exc.filename)})" if exc.filename else ""
            log.error("disk full", extra={"path": exc.filename, "request_id": request_id_of(request)})
            err = InsufficientStorage(
                f"The platform's disk is full{where}; nothing of this request was kept. "
                "Free space (or ask the operator to), then send it again."
            )
            return from_error(err, request_id_of(request))
        raise exc

    app.add_exception_handler(OSError, on_os_error)

    async def on_integrity(request: Request, exc: Exception) -> Response:
        # Two requests created the same name at once and the DB's unique index kept one: the
        # other is told, never a 500. (Dataset versions retry instead: both uploads are kept.)
        log.info("lost a create race", extra={"error": str(exc)[:200], "request_id": request_id_of(request)})
        err = Conflict("Another request created this at the same moment; read it, or retry with another name.")
        return from_error(err, request_id_of(request))

    app.add_exception_handler(IntegrityError, on_integrity)
