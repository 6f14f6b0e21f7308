"""The inference service: ``create_inference_app(settings)``, port 8080."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import httpx
import orjson
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from miniml import logs
from miniml.api.errors import check_metrics_token, from_error, problem_response
from miniml.config import Settings
from miniml.drain import Drain
from miniml.errors import (
    BadRequest,
    Forbidden,
    InvalidInput,
    MiniMLError,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UpstreamUnavailable,
)
from miniml.inference.batching import Columns
from miniml.inference.capture import Capture
from miniml.inference.feedback import PredictionMemory
from miniml.inference.models import parse_rows
from miniml.inference.state import ApiLink, Served, State
from miniml.monitoring.metrics import InferenceMetrics
from miniml.schemas.monitoring import FeedbackBatch
from miniml.storage import make_store
from miniml.tracking.signing import signing_key

log = logging.getLogger("miniml.inference")


def request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if given.isalnum() and len(given) <= 64 else uuid.uuid4().hex


def inference_key(settings: Settings) -> str:
    from miniml.files import read_key_file

    # Unset: the key the api wrote on start, on the data volume the roles share (miniml up, compose).
    key = settings.inference.api_key or read_key_file(settings.data_dir, "inference")
    if not key:
        raise RuntimeError(
            "The inference service has no API key: set MINIML_INFERENCE__API_KEY to a key of the inference "
            "role (an admin creates one with POST /api/v1/keys {'role': 'inference'})."
        )
    return key


async def json_body(request: Request, limit: int) -> Any:
    """The body as strict JSON (UTF-8, no byte-order mark), read only up to ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(_too_large(limit))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(_too_large(limit))
        chunks.append(chunk)
    raw = b"".join(chunks)
    if raw[:3] == b"\xef\xbb\xbf" or raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise BadRequest("The body starts with a byte-order mark; send UTF-8 JSON without one (RFC 8259 §8.1).")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"The body is not valid JSON ({exc}).") from None


def _too_large(limit: int) -> str:
    return f"The request body is larger than {limit:,} bytes; send fewer rows per request."


class DeclaredBodyLimit:
    """A body declared larger than the limit is refused before any key check or read (413)."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                    response = problem_response(
                        413, "Payload too large", _too_large(self.limit), request_id=uuid.uuid4().hex
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


_OIP_TYPES = {"number": "FP64", "string": "BYTES", "boolean": "BOOL"}


def _flat(data: Any) -> list[Any]:
    """OIP tensors may nest rows ([[x], [y]]); a column is one value per row."""
    if isinstance(data, list) and data and all(isinstance(d, list) and len(d) == 1 for d in data):
        return [d[0] for d in data]
    if not isinstance(data, list):
        raise InvalidInput("Each input's data must be a list.")
    return data


def create_inference_app(settings: Settings) -> FastAPI:
    metrics = InferenceMetrics()
    state = State(
        tracking_uri=settings.mlflow_uri,
        max_batch_rows=settings.inference.max_batch_rows,
        metrics=metrics,
        signing_key=signing_key(settings.auth.model_signing_key, settings.data_dir),
    )
    replica = settings.inference.replica_id or f"{settings.inference.host}:{settings.inference.port}"
    public_url = settings.inference.public_url or settings.inference_url
    wake = asyncio.Event()
    drain = Drain(settings.inference.drain_s)
    store = make_store(settings)
    capture = Capture(
        store,
        replica,
        fraction=settings.inference.capture_fraction,
        max_rows=settings.inference.capture_buffer_rows,
        registry=metrics.registry,
    )

    memory = PredictionMemory(settings.monitoring.prediction_memory_rows)
    max_body = settings.inference.max_body_bytes

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(settings.inference.capture_flush_s)
            await anyio.to_thread.run_sync(capture.flush)

    async def reconcile_forever(link: ApiLink) -> None:
        failing: tuple[float, int] | None = None  # (when last logged, failures since)
        while True:
            try:
                before = {id(m) for m in state.cache.values()}
                await state.apply(await link.desired())
                if {id(m) for m in state.cache.values()} != before:
                    # Models are long-lived: move them out of the collector's sight, so that its
                    # full collections stay short and do not show in the latency tail.
                    gc.collect()
                    gc.freeze()
                await link.report(replica, public_url, state.report())
                if failing is not None:
                    log.info("reconcile works again", extra={"failures": failing[1]})
                    failing = None
            except Exception as exc:  # the api may be restarting: keep serving what we have
                now = time.monotonic()
                # Once when it starts failing, then once a minute: an api that is down for an hour
                # must not fill the log with a line per second.
                if failing is None or now - failing[0] >= 60:
                    count = 1 if failing is None else failing[1] + 1
                    log.warning(
                        "reconcile failed; serving the models already loaded",
                        extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}", "failures": count},
                    )
                    failing = (now, count)
                else:
                    failing = (failing[0], failing[1] + 1)
            wake.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=settings.inference.reconcile_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain.install()
        link = ApiLink(
            settings.api_url,
            inference_key(settings),
            key_cache_s=settings.inference.key_cache_s,
            key_stale_s=settings.inference.key_stale_s,
        )
        app.state.link = link
        await anyio.to_thread.run_sync(store.prepare)
        task = asyncio.get_running_loop().create_task(reconcile_forever(link))
        flusher = asyncio.get_running_loop().create_task(flush_forever())
        yield
        task.cancel()
        flusher.cancel()
        await anyio.to_thread.run_sync(capture.flush)
        for model in state.cache.values():
            model.batcher.close()

    app = FastAPI(title="miniml inference", version="0.1.0", lifespan=lifespan)
    app.state.state = state
    app.state.drain = drain
    app.state.metrics = metrics
    app.state.capture = capture
    app.add_middleware(DeclaredBodyLimit, limit=max_body)  # type: ignore[arg-type]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        """Ready once every deployment loaded; counts only: anonymous callers learn no names."""
        report = state.report()
        failing = sum(1 for d in report.values() if not d["ready"])
        ready = state.ready and not drain.draining
        body = {"ready": ready, "deployments": len(report), "failing": failing} | (
            {"draining": True} if drain.draining else {}
        )
        return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    def metrics_route(request: Request) -> Response:
        try:
            check_metrics_token(request, settings.monitoring.metrics_token)
        except MiniMLError as exc:
            return from_error(exc, request_id(request))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reconcile", status_code=202)
    async def reconcile_now(request: Request) -> Response:
        """Reconcile with the api now (the api calls this after every change); an admin or the inference service."""
        try:
            who = await caller_of(request)
            if who.get("role") not in ("admin", "inference"):
                raise Forbidden(f"Reconciling needs an admin key; key {who.get('key_id')} is {who.get('role')}.")
        except MiniMLError as exc:
            return from_error(exc, request_id(request))
        wake.set()
        return Response(orjson.dumps({"status": "reconciling"}), status_code=202, media_type="application/json")

    async def caller_of(request: Request) -> dict[str, Any]:
        try:
            who = await request.app.state.link.whoami({k.lower(): v for k, v in request.headers.items()})
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"The api could not check your key ({type(exc).__name__}); retry.") from exc
        if who is None:
            raise Unauthorized(
                "Send a valid API key as X-API-Key, or 'Authorization: Bearer <token>' from POST /api/v1/auth/token."
            )
        return dict(who)

    def visible(who: dict[str, Any], served: Served) -> bool:
        return who.get("projects") is None or served.project in who["projects"]

    async def endpoint_for(request: Request, name: str) -> Served:
        """The endpoint, if the caller's key reaches its project; otherwise 404, as if it did not exist."""
        who = await caller_of(request)
        served = state.endpoint(name)
        if not visible(who, served):
            raise NotFound(f"No endpoint {name!r} is served here; deploy a model under that name first.")
        return served

    shadow_tasks: set[asyncio.Task[None]] = set()

    async def run_shadow(served: Served, columns: Columns, rows: int, live: list[Any], live_s: float) -> None:
        """The shadow predicts on a copy, after the live answer left; its result is recorded, never returned."""
        assert served.shadow is not None
        start = time.perf_counter()
        try:
            preds, _ = await served.shadow.model.batcher.predict(columns, rows, False)
        except Exception:
            metrics.errors.labels(served.name, "shadow_error").inc()
            return
        stats = state.shadows.get(served.name)
        if stats is not None:
            stats.add(live, preds.tolist(), live_s, time.perf_counter() - start)

    async def predict(request: Request, served: Served, *, seed: bool = False, body: Any = None) -> Response:
        start = time.perf_counter()
        variant = served.pick()
        model = variant.model
        labels = (served.name, variant.version)
        try:
            if body is None:
                body = await json_body(request, max_body)
            columns, rows, ignored = parse_rows(body, model, max_rows=settings.inference.max_rows)
            want_proba = request.query_params.get("probabilities", "").lower() in ("1", "true", "yes")
            preds, probas = await model.batcher.predict(columns, rows, want_proba and model.classes is not None)
        except MiniMLError as exc:  # bad input: 422, or 400 / 413 for the body itself
            metrics.requests.labels(*labels, str(exc.status)).inc()
            metrics.errors.labels(served.name, "invalid_input").inc()
            return from_error(exc, request_id(request))
        except Exception as exc:
            metrics.requests.labels(*labels, "500").inc()
            metrics.errors.labels(served.name, "model_error").inc()
            log.exception("predict failed", extra={"deployment": served.name, "version": variant.version})
            return problem_response(
                500,
                "Internal error",
                f"The model failed to predict ({type(exc).__name__}).",
                request_id=request_id(request),
            )
        values = preds.tolist()
        capture.add(served.project, served.name, variant.version, columns, values)
        # The seed's route answers exactly {"preds": [...]}: ids (for feedback) come with the others.
        ids = None if seed else memory.remember(served.name, variant.version, values)
        if served.shadow is not None and random.random() < served.shadow_fraction:  # noqa: S311
            shadow_tasks.add(
                task := asyncio.get_running_loop().create_task(
                    run_shadow(served, columns, rows, values, time.perf_counter() - start)
                )
            )
            task.add_done_callback(shadow_tasks.discard)
        out: dict[str, Any] = (
            {"preds": values}
            if seed
            else {"predictions": values, "model_version": variant.version, "deployment": served.name}
        )
        if ids is not None:
            out["prediction_ids"] = ids
        if probas is not None and model.classes is not None:
            out["probabilities"] = [dict(zip(map(str, model.classes), map(float, p), strict=True)) for p in probas]
        metrics.requests.labels(*labels, "200").inc()
        metrics.rows.labels(*labels).inc(rows)
        if model.classes is not None:
            for label, count in Counter(values).items():
                metrics.predictions.labels(*labels, str(label)).inc(count)
        metrics.duration.labels(*labels).observe(time.perf_counter() - start)
        headers = {"X-Model-Version": variant.version}
        if ignored:
            headers["X-Miniml-Ignored-Columns"] = ",".join(ignored)[:1000]
        return Response(orjson.dumps(out), media_type="application/json", headers=headers)

    @app.post("/v1/endpoints/{name}/predict")
    async def predict_endpoint(name: str, request: Request) -> Response:
        """Predict with a deployment: {"rows": [...]} or {"columns": [...], "data": [...]}."""
        try:
            served = await endpoint_for(request, name)
        except MiniMLError as exc:
            return from_error(exc, request_id(request))
        return await predict(request, served)

    @app.post("/v1/endpoints/{name}/feedback")
    async def feedback_endpoint(name: str, request: Request) -> Response:
        """True labels for served predictions: {"prediction_id", "label"} or {"feedback": [...]}; all or nothing."""
        try:
            served = await endpoint_for(request, name)
            body = await json_body(request, max_body)
            items = body.get("feedback", [body]) if isinstance(body, dict) else None
            try:
                batch = FeedbackBatch.model_validate({"feedback": items})
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise InvalidInput(
                    f'Send {{"prediction_id": <id from a prediction response>, "label": <true label>}} or '
                    f'{{"feedback": [...]}} ({where}: {first["msg"]}).'
                ) from None
            records = memory.join(served.name, batch)
            try:
                await request.app.state.link.feedback(records)
            except httpx.HTTPError as exc:
                raise UpstreamUnavailable(f"The api did not take the feedback ({type(exc).__name__}); retry.") from exc
        except MiniMLError as exc:
            return from_error(exc, request_id(request))
        return Response(orjson.dumps({"stored": len(records)}), media_type="application/json")

    # Open Inference Protocol v2 (KServe, Seldon MLServer): one named tensor per column.

    @app.get("/v2/health/ready")
    def oip_ready() -> Response:
        ready = state.ready and not drain.draining
        return Response(
            orjson.dumps({"ready": ready}), status_code=200 if ready else 503, media_type="application/json"
        )

    @app.get("/v2/health/live")
    def oip_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/models/{name}")
    async def oip_metadata(name: str, request: Request) -> Response:
        try:
            served = await endpoint_for(request, name)
        except MiniMLError as exc:
            return from_error(exc, request_id(request))
        model = served.variants[0].model
        body = {
            "name": name,
            "versions": [v.version for v in served.variants],
            "platform": "miniml",
            "inputs": [
                {"name": c.name, "datatype": _OIP_TYPES.get(c.kind, "BYTES"), "shape": [-1]} for c in model.columns
            ],
            "outputs": [{"name": "predict", "datatype": "BYTES" if model.classes else "FP64", "shape": [-1]}],
        }
        return Response(orjson.dumps(body), media_type="application/json")

    @app.post("/v2/models/{name}/infer")
    async def oip_infer(name: str, request: Request) -> Response:
        """OIP v2 inference: {"inputs": [{"name", "shape", "datatype", "data"}, ...]}."""
        try:
            served = await endpoint_for(request, name)
            body = await json_body(request, max_body)
            inputs = body.get("inputs") if isinstance(body, dict) else None
            if (
                not isinstance(inputs, list)
                or not inputs
                or not all(isinstance(t, dict) and "name" in t and "data" in t for t in inputs)
            ):
                raise InvalidInput(
                    'OIP v2 needs "inputs": [{"name": <column>, "shape": [n], "datatype": ..., "data": [...]}].'
                )
            names = [str(t["name"]) for t in inputs]
            data = [list(_flat(t["data"])) for t in inputs]
            if len({len(d) for d in data}) != 1:
                raise InvalidInput("Every input tensor must hold the same number of rows.")
        except MiniMLError as exc:
            return from_error(exc, request_id(request))
        converted = {"columns": names, "data": [list(row) for row in zip(*data, strict=True)]}
        response = await predict(request, served, body=converted)
        if response.status_code != 200:
            return response
        result = orjson.loads(response.body)
        preds = result["predictions"]
        datatype = "BYTES" if preds and isinstance(preds[0], str) else "FP64"
        out = {
            "model_name": name,
            "model_version": result["model_version"],
            "id": body.get("id") or request_id(request),
            "outputs": [{"name": "predict", "shape": [len(preds)], "datatype": datatype, "data": preds}],
        }
        return Response(
            orjson.dumps(out), media_type="application/json", headers={"X-Model-Version": result["model_version"]}
        )

    @app.post("/predict")
    async def predict_seed(request: Request) -> Response:
        """The seed's route: predicts with the caller's single deployment; answers {"preds": [...]}."""
        try:
            who = await caller_of(request)
            mine = [s for s in state.served.values() if s.variants and visible(who, s)]
            if not mine:
                raise NotFound("No deployment is served for your projects; deploy a model first (POST /deploy).")
            if len(mine) > 1:
                names = ", ".join(sorted(s.name for s in mine))
                raise InvalidInput(
                    f"Several deployments are served for your projects ({names}); call /v1/endpoints/<name>/predict."
                )
        except MiniMLError as exc:
            return from_error(exc, request_id(request))
        return await predict(request, mine[0], seed=True)

    return app


def main_app() -> FastAPI:
    import gc

    # Fewer, later collections: a full collection of a large heap is the usual cause of p99 spikes.
    gc.set_threshold(50_000, 50, 100)
    # The predict threads run Python between their GIL-free parts; a shorter switch interval hands
    # the GIL back to the event loop sooner, so answering does not wait behind a model call.
    sys.setswitchinterval(0.001)
    settings = Settings()
    logs.configure(settings.log_level)
    if settings.mlflow.auth:
        from miniml.tracking.access import use_admin_credentials

        use_admin_credentials(settings.mlflow.admin_password, settings.data_dir)
    return create_inference_app(settings)
