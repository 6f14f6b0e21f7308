"""The OpenAPI document says what the server does: every operation lists the problem+json errors
it can answer, read from the route itself (its role, its body, its parameters)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from miniml.schemas.common import Problem

PROBLEM_JSON = "application/problem+json"
_WHY = {
    "400": "Malformed request: a broken multipart body, or JSON with a byte-order mark.",
    "401": "No credential, or one that is unknown, revoked, expired or tampered with.",
    "403": "The credential's role may not make this call.",
    "404": "No such object, or it belongs to a project the credential cannot see.",
    "409": "A name is taken, or the object's state does not allow this.",
    "413": "The body is larger than this route accepts.",
    "422": "Well-formed but unusable input; the detail names the field and what to send.",
    "503": "The metadata DB, MLflow, S3, Prefect or Prometheus did not answer; retry (see Retry-After).",
    "507": "The disk the platform writes to is full; nothing of the request was kept.",
}
_MUTATING = {"post", "put", "patch", "delete"}


def _flat_routes(app: FastAPI) -> list[APIRoute]:
    out: list[APIRoute] = []
    for inc in app.routes:
        router = getattr(inc, "original_router", None)  # included routers are kept whole (FastAPI >= 0.150)
        for route in router.routes if router is not None else [inc]:
            if isinstance(route, APIRoute) and route.include_in_schema:
                out.append(route)
    return out


def _needed_role(route: APIRoute) -> Any:
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        role = getattr(dep.call, "needed_role", None)
        if role is not None:
            return role
        stack.extend(dep.dependencies)
    return None


def _errors_of(route: APIRoute, method: str) -> list[str]:
    role = _needed_role(route)
    codes = {"503"}
    has_input = bool(route.dependant.path_params or route.dependant.query_params or route.dependant.body_params)
    if role is not None:
        codes |= {"401", "404"}
        if role != "any":
            codes.add("403")
    elif route.path == "/api/v1/auth/token":
        codes.add("401")
    if has_input or role is not None:
        codes.add("422")
    if method in _MUTATING:
        codes |= {"400", "413", "507"}
        if role is not None:
            codes.add("409")
    return sorted(codes)


def documented_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title, version=app.version, summary=app.summary, description=app.description, routes=app.routes
    )
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for route in _flat_routes(app):
        for method in (m.lower() for m in route.methods or ()):
            operation = doc["paths"].get(route.path, {}).get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            for code in _errors_of(route, method):
                responses[code] = {"description": _WHY[code], "content": problem}
            if route.path == "/readyz":
                responses["503"] = {"description": "Not ready: the checks say which part is missing."}
    # FastAPI's own validation-error schemas are never sent: every 422 is a Problem.
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    app.openapi_schema = doc
    return doc
