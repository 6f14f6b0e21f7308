"""Loaded by `st run` (SCHEMATHESIS_HOOKS) in test_openapi: one check of our own."""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.core.failures import Failure

# Valid by the schema, but whether they are accepted depends on stored data no schema can state:
# the bytes of an uploaded file, the columns of the dataset a job or a rule names, the projects a
# key is granted (and its role, for a change of grants) and the model version a seed route names must exist, a cron schedule must parse,
# a traffic split's weights must sum to 100 over distinct versions.
DEPENDS_ON_DATA = {
    "POST /api/v1/keys",
    "PUT /api/v1/keys/{key_id}/projects",
    "POST /deploy",
    "POST /models/promote",
    "POST /api/v1/projects/{project}/deployments",
    "PATCH /api/v1/projects/{project}/deployments/{name}",
    "POST /api/v1/projects/{project}/datasets",
    "POST /datasets/upload",
    "POST /api/v1/projects/{project}/models/{model}/versions",
    "POST /api/v1/projects/{project}/jobs",
    "POST /experiments/train",
    "POST /api/v1/projects/{project}/datasets/{name}/versions/{version}/validate",
    "POST /datasets/validate",
    "PUT /api/v1/projects/{project}/deployments/{name}/monitoring",
}


@schemathesis.check
def no_undeclared_rule(ctx: Any, response: Any, case: Any) -> bool | None:
    """Schema-valid data is not refused with 422, except where validity depends on stored data."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    if f"{case.method.upper()} {case.operation.path}" in DEPENDS_ON_DATA:
        return None
    raise Failure(
        operation=case.operation.label,
        title="Schema-valid request rejected",
        message=f"422 for data the schema allows: {response.text[:300]}",
    )
