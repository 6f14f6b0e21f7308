"""One ASGI middleware for every request: request id, body limits, metrics, JSON log, audit.

It is pure ASGI (not BaseHTTPMiddleware) so uploads keep streaming and the byte count is
enforced while the body arrives, not after.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from miniml.api.errors import problem_response
from miniml.errors import BadRequest, MiniMLError, PayloadTooLarge
from miniml.services import audit

log = logging.getLogger("miniml.api")

_MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
_NOT_AUDITED = {"/api/v1/auth/token"}
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Routes that take file uploads get the upload limit; every other body gets the JSON limit.
_UPLOAD_PATH_RE = re.compile(r"^(/api/v1/projects/[^/]+/(datasets|models/[^/]+/versions)|/datasets/upload)$")
# Room for the multipart envelope around a file at the upload limit.
_MULTIPART_SLACK = 64 * 1024
_BOM = b"\xef\xbb\xbf"


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "miniml_api_requests_total",
            "API requests by route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "miniml_api_request_duration_seconds",
            "API request latency by route template.",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ApiMetrics,
        db: sessionmaker[Session],
        max_json_bytes: int,
        max_upload_bytes: int,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.db = db
        self.max_json = max_json_bytes
        self.max_upload = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        path: str = scope["path"]
        limit = self.max_upload + _MULTIPART_SLACK if _UPLOAD_PATH_RE.match(path) else self.max_json
        status_holder = {"status": 500, "started": False}
        # A body refused while it arrives (too large, or JSON with a byte-order mark).
        refused: dict[str, MiniMLError | None] = {"error": None}
        content_type = headers.get("content-type", "")
        is_json = "json" in content_type or not content_type

        async def send_wrapper(message: Message) -> None:
            if refused["error"] is not None and not status_holder["started"]:
                # The app turned the aborted body into its own error (FastAPI says 400); the
                # client gets ours instead.
                return
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        received = 0

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                if is_json and received == 0 and body[:3] == _BOM:
                    bom = BadRequest(
                        "The JSON body starts with a byte-order mark; send UTF-8 JSON without one (RFC 8259 §8.1)."
                    )
                    refused["error"] = bom
                    raise bom
                received += len(body)
                if received > limit:
                    big = PayloadTooLarge(_too_large(limit))
                    refused["error"] = big
                    raise big
            return message

        declared = headers.get("content-length", "")
        try:
            if declared.isdigit() and int(declared) > limit:
                raise PayloadTooLarge(_too_large(limit))
            await self.app(scope, receive_wrapper, send_wrapper)
            error = refused["error"]
            if error is not None:
                raise error
        except (PayloadTooLarge, BadRequest) as exc:
            refused["error"] = None
            if not status_holder["started"]:
                response = problem_response(exc.status, exc.title, exc.detail, request_id=request_id)
                await response(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id, "path": path})
            if not status_holder["started"]:
                response = problem_response(
                    500,
                    "Internal error",
                    f"Something went wrong on our side; the log has the details under request id {request_id}.",
                    request_id=request_id,
                )
                await response(scope, receive, send_wrapper)
        finally:
            await self._record(scope, start, int(status_holder["status"]), request_id)

    async def _record(self, scope: Scope, start: float, status: int, request_id: str) -> None:
        elapsed = time.perf_counter() - start
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        self.metrics.requests.labels(method, template, str(status)).inc()
        self.metrics.duration.labels(method, template).observe(elapsed)
        key_id = scope.get("state", {}).get("key_id")
        log.info(
            "request",
            extra={
                "method": method,
                "route": template,
                "path": scope["path"],
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
                "key_id": key_id,
                "request_id": request_id,
            },
        )
        if method in _MUTATING and route is not None and template not in _NOT_AUDITED:
            params: dict[str, Any] = scope.get("path_params", {})
            project = params.get("project") or _query_project(scope)
            action = f"{method} {template}"
            try:
                detail = scope.get("state", {}).get("audit_detail")  # a route's why (an approval's note)
                await anyio.to_thread.run_sync(
                    self._audit, key_id, action, project, scope["path"], status, request_id, detail
                )
            except Exception:  # the audit must never turn a served request into an error
                log.warning("audit write failed", extra={"request_id": request_id, "action": action})

    def _audit(
        self,
        key_id: str | None,
        action: str,
        project: str | None,
        target: str,
        status: int,
        request_id: str,
        detail: str | None = None,
    ) -> None:
        with self.db.begin() as session:
            audit.create_event(
                session,
                key_id=key_id,
                action=action,
                project=project,
                target=target,
                status=status,
                request_id=request_id,
                detail=detail,
            )


def _too_large(limit: int) -> str:
    return f"The request body is larger than this route accepts ({limit:,} bytes); send a smaller one."


def _query_project(scope: Scope) -> str | None:
    query = scope.get("query_string", b"").decode("latin-1")
    for part in query.split("&"):
        if part.startswith("project="):
            return part[len("project=") :][:63] or None
    return None
