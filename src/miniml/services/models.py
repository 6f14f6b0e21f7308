"""Models: a project-scoped view of the MLflow registry, with lineage back to jobs and datasets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from miniml.domain.roles import Role
from miniml.domain.tenancy import Caller
from miniml.errors import Conflict, Forbidden, NotFound
from miniml.schemas.models import ApprovalRead, ApprovalRequest, ModelComparison, ModelRead, ModelVersionRead
from miniml.services.deployments import clear_rollout_errors
from miniml.services.projects import read_project
from miniml.tracking.registry import Registry, registered_name


def _bare(project: str, name: str) -> str:
    return name[len(project) + 1 :]


def to_version_read(project: str, model: str, mv: Any, run: Any, aliases: dict[str, str]) -> ModelVersionRead:
    tags = dict(run.data.tags) if run is not None else {}
    params = dict(run.data.params) if run is not None else {}
    job = tags.get("miniml.job_id")
    dv = tags.get("miniml.dataset_version")
    return ModelVersionRead(
        model=model,
        registered_name=registered_name(project, model),
        version=str(mv.version),
        aliases=sorted(a for a, v in aliases.items() if v == str(mv.version)),
        stage=getattr(mv, "current_stage", None),
        status=getattr(mv, "status", None),
        created_at=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC) if mv.creation_timestamp else None,
        run_id=mv.run_id,
        metrics=dict(run.data.metrics) if run is not None else {},
        params=params,
        family=params.get("best.family"),
        job_id=int(job) if job and job.isdigit() else None,
        dataset=tags.get("miniml.dataset"),
        dataset_version=int(dv) if dv and dv.isdigit() else None,
        dataset_sha256=tags.get("miniml.dataset_sha256"),
        approval=_approval(dict(getattr(mv, "tags", None) or {})),
    )


APPROVAL = "miniml.approval."


def _approval(tags: dict[str, str]) -> ApprovalRead | None:
    found = {k.removeprefix(APPROVAL): v for k, v in tags.items() if k.startswith(APPROVAL)}
    if found.get("status") not in ("pending", "approved", "rejected"):
        return None
    return ApprovalRead.model_validate({k: v or None for k, v in found.items()})


def list_models(session: Session, registry: Registry, caller: Caller, project: str) -> list[ModelRead]:
    read_project(session, caller, project)
    out = []
    for m in registry.list_models(project):
        versions = [int(v.version) for v in (m.latest_versions or [])]
        out.append(
            ModelRead(
                name=_bare(project, m.name),
                registered_name=m.name,
                aliases={str(k): str(v) for k, v in dict(m.aliases or {}).items()},
                latest_version=str(max(versions)) if versions else None,
                description=m.description,
            )
        )
    return out


def read_model(session: Session, registry: Registry, caller: Caller, project: str, model: str) -> ModelRead:
    read_project(session, caller, project)
    m = registry.model(project, model)
    versions = registry.versions(project, model)
    return ModelRead(
        name=model,
        registered_name=m.name,
        aliases={str(k): str(v) for k, v in dict(m.aliases or {}).items()},
        latest_version=versions[-1].version if versions else None,
        description=m.description,
    )


def list_versions(
    session: Session, registry: Registry, caller: Caller, project: str, model: str
) -> list[ModelVersionRead]:
    read_project(session, caller, project)
    aliases = registry.aliases(project, model)
    return [
        to_version_read(project, model, mv, registry.run(mv.run_id), aliases)
        for mv in registry.versions(project, model)
    ]


def read_version(
    session: Session, registry: Registry, caller: Caller, project: str, model: str, version: str
) -> ModelVersionRead:
    read_project(session, caller, project)
    mv = registry.version(project, model, version)
    return to_version_read(project, model, mv, registry.run(mv.run_id), registry.aliases(project, model))


def plots(session: Session, registry: Registry, caller: Caller, project: str, model: str, version: str) -> list[str]:
    """The names of the plots the version's training job logged (confusion matrix or residuals,
    importances, the search's history)."""
    read_project(session, caller, project)
    mv = registry.version(project, model, version)
    return registry.plot_names(mv.run_id) if mv.run_id else []


def plot(
    session: Session, registry: Registry, caller: Caller, project: str, model: str, version: str, name: str
) -> bytes:
    read_project(session, caller, project)
    mv = registry.version(project, model, version)
    if not mv.run_id:
        raise NotFound(f"Version {version} of {model} has no run, so no plots (an imported model).")
    return registry.plot(mv.run_id, name)


def compare(
    session: Session, registry: Registry, caller: Caller, project: str, model: str, a: str, b: str
) -> ModelComparison:
    va = read_version(session, registry, caller, project, model, a)
    vb = read_version(session, registry, caller, project, model, b)
    diffs = {k: vb.metrics[k] - va.metrics[k] for k in sorted(set(va.metrics) & set(vb.metrics))}
    return ModelComparison(model=model, a=va, b=vb, metric_differences=diffs)


def promote(
    session: Session, registry: Registry, caller: Caller, project: str, model: str, version: str, stage: str
) -> ModelVersionRead:
    read_project(session, caller, project)
    if stage == "production" and not caller.role.allows(Role.admin):
        raise Forbidden("Only an admin may promote to production; an engineer may promote to staging.")
    registry.promote(project, model, version, stage)
    clear_rollout_errors(session, read_project(session, caller, project).id, model)
    return read_version(session, registry, caller, project, model, version)


def decide_approval(
    session: Session,
    registry: Registry,
    caller: Caller,
    project: str,
    model: str,
    version: str,
    body: ApprovalRequest,
) -> ModelVersionRead:
    """SageMaker's model approval: an engineer asks for production with a note; an admin approves
    (the version becomes production) or rejects, with a note. Both are kept on the version."""
    read_project(session, caller, project)
    current = read_version(session, registry, caller, project, model, version)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    if body.action == "request":
        if not caller.role.allows(Role.engineer):
            raise Forbidden("Asking for production approval needs an engineer or admin key.")
        if current.approval is not None and current.approval.status == "pending":
            raise Conflict(f"Version {version} of {model} already waits for approval; an admin approves or rejects it.")
        tags = {"status": "pending", "requested_by": caller.key_id, "request_note": body.note, "requested_at": now}
        tags |= {"decided_by": "", "decision_note": "", "decided_at": ""}
    else:
        if not caller.role.allows(Role.admin):
            raise Forbidden("Only an admin approves or rejects a version for production.")
        tags = {
            "status": "approved" if body.action == "approve" else "rejected",
            "decided_by": caller.key_id,
            "decision_note": body.note,
            "decided_at": now,
        }
    registry.set_version_tags(project, model, version, {APPROVAL + k: v for k, v in tags.items()})
    if body.action == "approve":
        registry.promote(project, model, version, "production")
        clear_rollout_errors(session, read_project(session, caller, project).id, model)
    return read_version(session, registry, caller, project, model, version)


def delete_version(
    session: Session,
    registry: Registry,
    caller: Caller,
    project: str,
    model: str,
    version: str,
    served: set[tuple[str, str]],
) -> None:
    read_project(session, caller, project)
    registry.version(project, model, version)
    if (registered_name(project, model), version) in served:
        raise Conflict(f"Version {version} of {model!r} is served by an active deployment; move the deployment first.")
    registry.delete_version(project, model, version)
