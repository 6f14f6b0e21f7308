from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
import httpx
from fastapi import APIRouter, Query, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from miniml.api.errors import check_metrics_token
from miniml.db.engine import is_busy, ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (does not check dependencies)."""
    return {"status": "ok"}


def _check_db(request: Request) -> dict[str, Any]:
    try:
        ping(request.app.state.engine)
    except Exception as exc:
        if is_busy(exc):
            return {"name": "database", "ok": False, "error": "busy: another connection holds it; writes fail now"}
        return {"name": "database", "ok": False, "error": f"not reachable ({type(exc).__name__})"}
    return {"name": "database", "ok": True}


async def _check_http(name: str, url: str) -> dict[str, Any]:
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            response = await client.get(url)
        if response.status_code >= 400:
            return {"name": name, "ok": False, "url": url, "error": f"answered {response.status_code}"}
    except httpx.HTTPError as exc:
        return {"name": name, "ok": False, "url": url, "error": f"not reachable ({type(exc).__name__})"}
    return {"name": name, "ok": True, "url": url}


@router.get("/readyz")
async def readyz(
    request: Request,
    exclude: Annotated[
        list[Literal["database", "mlflow", "prefect", "worker"]],
        Query(
            description="Checks to leave out, as Kubernetes' own /readyz?exclude=: a readiness probe asks "
            "`?exclude=mlflow&exclude=prefect&exclude=worker`, so a pod leaves its Service only when it "
            "cannot reach its database or is draining, not when another part is down."
        ),
    ] = [],  # noqa: B006 - FastAPI copies the default
) -> Response:
    """Ready when the metadata DB, MLflow, Prefect and a training worker answer; lists each check."""
    settings = request.app.state.settings
    if request.app.state.drain.draining:
        return JSONResponse(request.app.state.drain.body(), status_code=503, headers={"Retry-After": "5"})
    checks = []
    if "database" not in exclude:
        checks.append(await anyio.to_thread.run_sync(_check_db, request))
    if "mlflow" not in exclude:
        checks.append(await _check_http("mlflow", settings.mlflow_uri.rstrip("/") + "/health"))
    if "prefect" not in exclude:
        checks.append(await _check_http("prefect", settings.prefect_api_url.rstrip("/") + "/health"))
    if "worker" not in exclude:
        ok, detail = await anyio.to_thread.run_sync(request.app.state.orchestrator.worker_status)
        checks.append({"name": "worker", "ok": ok, "detail": detail})
    ready = all(c["ok"] for c in checks)
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus metrics of this api process."""
    check_metrics_token(request, request.app.state.settings.monitoring.metrics_token)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
