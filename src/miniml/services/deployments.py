"""Deployments: named endpoints that serve a model by alias, version or traffic split."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from miniml.db import tables
from miniml.db.tables import utcnow
from miniml.domain.names import check_slug
from miniml.domain.tenancy import Caller
from miniml.errors import Conflict, InvalidInput, MiniMLError, NotFound
from miniml.schemas.deployments import (
    DeploymentCreate,
    DeploymentEventRead,
    DeploymentRead,
    DeploymentTarget,
    DesiredDeployment,
    ReplicaReport,
    ReplicaView,
    ShadowReport,
    Variant,
)
from miniml.services.projects import read_project
from miniml.tracking.registry import Registry, registered_name

# A replica that has not reported for this long is left out of a deployment's status.
REPLICA_STALE = timedelta(minutes=2)


def target_of(body: DeploymentTarget, current: dict[str, Any] | None = None) -> dict[str, Any]:
    shadow = {"version": str(body.shadow.version), "fraction": body.shadow.fraction} if body.shadow else None
    if body.traffic is None and body.target is None and current is not None:  # only the shadow changes
        return {k: v for k, v in current.items() if k != "shadow"} | ({"shadow": shadow} if shadow else {})
    out: dict[str, Any]
    if body.traffic is not None:
        out = {"kind": "split", "split": [{"version": str(t.version), "weight": t.weight} for t in body.traffic]}
    else:
        target = str(body.target).strip()
        if target.isdigit():
            out = {"kind": "version", "version": target}
        elif not target:
            raise InvalidInput("target is empty; give an alias (staging, production) or a version number.")
        else:
            out = {"kind": "alias", "alias": target.lower()}
    return (
        out
        | ({"shadow": shadow} if shadow else {})
        | ({"allow_schema_change": True} if body.allow_schema_change else {})
    )


def schema_refusal(
    session: Session, registry: Registry, project: str, dep: tables.Deployment, target: dict[str, Any]
) -> str | None:
    """Why ``target`` may not replace what the deployment serves now: a new version needs a column
    no serving version takes (callers do not send it). None when compatible or nothing is known to serve."""
    serving = {v for r in live_replicas(session) for v in (r.status.get(dep.name) or {}).get("versions", [])}
    if not serving:
        try:
            serving = {v.version for v in resolve(registry, project, dep.model_name, dep.target)}
        except InvalidInput:
            return None  # nothing resolvable is live: there is no schema to keep
    taken: set[str] = set()
    for version in serving:
        columns = registry.input_columns(project, dep.model_name, str(version))
        if not columns:
            return None  # a serving version without a signature: its schema is unknown
        taken |= set(columns)
    for v in resolve(registry, project, dep.model_name, target):
        if v.version in serving:
            continue
        needs = [c for c in registry.input_columns(project, dep.model_name, v.version) if c not in taken]
        if needs:
            return (
                f"Version {v.version} of {dep.model_name!r} needs column(s) {', '.join(needs)} that version(s) "
                f"{', '.join(sorted(map(str, serving)))} now serving do not take, so callers do not send them; the old "
                'version keeps serving. Send "allow_schema_change": true to roll it out anyway.'
            )
    return None


def resolve_shadow(registry: Registry, project: str, model: str, target: dict[str, Any]) -> dict[str, Any] | None:
    shadow = target.get("shadow")
    if not shadow:
        return None
    try:
        version = registry.version(project, model, shadow["version"]).version
    except NotFound as exc:
        raise InvalidInput(f"Shadow: {exc.detail}") from None
    return {"version": str(version), "fraction": float(shadow["fraction"])}


def resolve(registry: Registry, project: str, model: str, target: dict[str, Any]) -> list[Variant]:
    """What a target means now: aliases are followed, so a promotion moves what is served."""
    try:
        if target["kind"] == "split":
            return [
                Variant(version=registry.version(project, model, s["version"]).version, weight=int(s["weight"]))
                for s in target["split"]
            ]
        ref = target["version"] if target["kind"] == "version" else target["alias"]
        return [Variant(version=registry.resolve(project, model, ref), weight=100)]
    except NotFound as exc:
        raise InvalidInput(f"{exc.detail} Train or register it first.") from None


def _event(
    session: Session, dep: tables.Deployment, caller: Caller | None, action: str, detail: str | None = None
) -> None:
    session.add(
        tables.DeploymentEvent(
            project_id=dep.project_id,
            deployment=dep.name,
            key_id=caller.key_id if caller else None,
            action=action,
            target=dep.target,
            detail=detail,
        )
    )


def create_deployment(
    session: Session, registry: Registry, caller: Caller, project: str, body: DeploymentCreate
) -> tables.Deployment:
    proj = read_project(session, caller, project)
    name = check_slug(body.name, what="Deployment")
    taken = Conflict(f"A deployment named {name!r} already exists; endpoint names are unique, pick another.")
    if session.scalar(select(tables.Deployment.id).where(tables.Deployment.name == name)) is not None:
        raise taken
    target = target_of(body)
    resolve(registry, project, body.model_name, target)
    resolve_shadow(registry, project, body.model_name, target)
    dep = tables.Deployment(
        project_id=proj.id, name=name, model_name=body.model_name, target=target, created_by=caller.key_id
    )
    session.add(dep)
    try:
        session.flush()
    except IntegrityError:  # created by another request since the check: the unique index decides
        raise taken from None
    _event(session, dep, caller, "create")
    return dep


def read_deployment(session: Session, caller: Caller, project: str, name: str) -> tables.Deployment:
    proj = read_project(session, caller, project)
    dep = session.scalar(select(tables.Deployment).where(tables.Deployment.name == name))
    if dep is None or dep.project_id != proj.id:
        raise NotFound(f"Deployment {name!r} does not exist in project {project!r}.")
    return dep


def list_deployments(session: Session, caller: Caller, project: str) -> list[tables.Deployment]:
    proj = read_project(session, caller, project)
    query = select(tables.Deployment).where(tables.Deployment.project_id == proj.id)
    return list(session.scalars(query.order_by(tables.Deployment.name)))


class RolloutRefused(Conflict):
    """The new target is incompatible with what serves now: nothing switched (the refusal is recorded)."""


def update_deployment(
    session: Session, registry: Registry, caller: Caller, project: str, name: str, body: DeploymentTarget
) -> tuple[tables.Deployment, RolloutRefused | None]:
    """Point the deployment at a new target; or, when that target is refused, record why (on the
    deployment and in its history) and return the refusal for the caller to raise once committed."""
    dep = read_deployment(session, caller, project, name)
    target = target_of(body, dep.target)
    resolve(registry, project, dep.model_name, target)
    resolve_shadow(registry, project, dep.model_name, target)
    why = None if body.allow_schema_change else schema_refusal(session, registry, project, dep, target)
    if why is not None:
        versions = [v.version for v in resolve(registry, project, dep.model_name, target)]
        dep.rollout_error, dep.rollout_version = why, ",".join(versions)[:32]
        _event(session, dep, caller, "rollout_refused", why)
        session.flush()
        return dep, RolloutRefused(why)
    dep.previous_target, dep.target, dep.updated_at = dep.target, target, utcnow()
    dep.rollout_error = dep.rollout_version = None
    dep.allow_schema_change = body.allow_schema_change
    session.flush()
    _event(session, dep, caller, "update")
    return dep, None


def rollback_deployment(session: Session, caller: Caller | None, project: str, name: str) -> tables.Deployment:
    dep = read_deployment(session, caller, project, name) if caller else _by_name(session, name)
    if dep.previous_target is None:
        raise Conflict(f"Deployment {name!r} has no previous target to roll back to.")
    _roll_back(session, dep, caller)
    return dep


def _by_name(session: Session, name: str) -> tables.Deployment:
    dep = session.scalar(select(tables.Deployment).where(tables.Deployment.name == name))
    if dep is None:
        raise NotFound(f"Deployment {name!r} does not exist.")
    return dep


def _roll_back(session: Session, dep: tables.Deployment, caller: Caller | None, detail: str | None = None) -> None:
    dep.previous_target, dep.target, dep.updated_at = dep.target, dep.previous_target or dep.target, utcnow()
    dep.allow_schema_change = True  # what served before is a known state: its schema is allowed again
    if caller is not None:
        dep.rollout_error = dep.rollout_version = None
    session.flush()
    _event(session, dep, caller, "rollback", detail)


def clear_rollout_errors(session: Session, project_id: int, model_name: str) -> None:
    """A promotion moves alias-targeted deployments to another version: their last refusal no longer stands."""
    for dep in session.scalars(
        select(tables.Deployment).where(
            tables.Deployment.project_id == project_id, tables.Deployment.model_name == model_name
        )
    ):
        dep.rollout_error = dep.rollout_version = None


def delete_deployment(session: Session, caller: Caller, project: str, name: str) -> None:
    dep = read_deployment(session, caller, project, name)
    _event(session, dep, caller, "delete")
    session.delete(dep)
    session.flush()


def history(session: Session, caller: Caller, project: str, name: str) -> list[DeploymentEventRead]:
    proj = read_project(session, caller, project)
    rows = session.scalars(
        select(tables.DeploymentEvent)
        .where(tables.DeploymentEvent.project_id == proj.id, tables.DeploymentEvent.deployment == name)
        .order_by(tables.DeploymentEvent.id)
    ).all()
    if not rows:
        raise NotFound(f"Deployment {name!r} does not exist in project {project!r}.")
    return [DeploymentEventRead.model_validate(r) for r in rows]


def desired_state(session: Session, registry: Registry) -> list[DesiredDeployment]:
    out = []
    for dep in session.scalars(select(tables.Deployment).order_by(tables.Deployment.id)):
        project = dep.project.name
        variants: list[Variant] = []
        shadow, error = None, None
        try:
            variants = resolve(registry, project, dep.model_name, dep.target)
            shadow = resolve_shadow(registry, project, dep.model_name, dep.target)
        except MiniMLError as exc:
            error = exc.detail
        out.append(
            DesiredDeployment(
                project=project,
                name=dep.name,
                registered_name=registered_name(project, dep.model_name),
                variants=variants,
                shadow=shadow,
                error=error,
                allow_schema_change=dep.allow_schema_change,
            )
        )
    return out


def served_versions(session: Session, registry: Registry) -> set[tuple[str, str]]:
    return {(d.registered_name, v.version) for d in desired_state(session, registry) for v in d.variants}


def record_replica(session: Session, report: ReplicaReport) -> list[str]:
    """Keep what a replica serves; settle the rollouts it refused. Returns the deployments rolled
    back automatically (the replicas should hear of it now)."""
    row = session.get(tables.InferenceReplica, report.replica)
    if row is None:
        row = tables.InferenceReplica(id=report.replica)
        session.add(row)
    row.url, row.status, row.updated_at = report.url, report.deployments, utcnow()
    rolled_back = []
    for name, status in report.deployments.items():
        failed = status.get("rollout_failed") if isinstance(status, dict) else None
        if isinstance(failed, dict) and _rollout_failed(session, name, str(failed.get("version", ""))[:32], failed):
            rolled_back.append(name)
    session.flush()
    return rolled_back


def _rollout_failed(session: Session, name: str, version: str, failed: dict[str, Any]) -> bool:
    """Record a replica's refusal once; a refused explicit version is rolled back (an alias stays:
    the old version keeps serving until the alias moves). True when it rolled back."""
    from miniml.services import audit

    dep = session.scalar(select(tables.Deployment).where(tables.Deployment.name == name))
    reason = str(failed.get("reason", ""))[:2000]
    if dep is None or (dep.rollout_error == reason and dep.rollout_version == version):
        return False
    target = dep.target
    wanted = (
        [target.get("version")] if target.get("kind") == "version" else [s["version"] for s in target.get("split", [])]
    )
    if target.get("kind") != "alias" and version not in [str(w) for w in wanted]:
        return False  # a report about a target that has changed since
    dep.rollout_error, dep.rollout_version = reason, version
    _event(session, dep, None, "rollout_failed", reason)
    audit.create_event(
        session,
        key_id=None,
        action="deployment.rollout_failed",
        project=dep.project.name,
        target=f"deployments/{dep.name}: version {version}: {reason}"[:500],
        status=409,
        request_id="replica",
    )
    refused = "refused:" in reason
    if refused and target.get("kind") != "alias" and dep.previous_target is not None:
        _roll_back(session, dep, None, f"automatic: version {version} was refused")
        return True
    return False


def live_replicas(session: Session) -> list[tables.InferenceReplica]:
    cutoff = utcnow() - REPLICA_STALE
    return list(session.scalars(select(tables.InferenceReplica).where(tables.InferenceReplica.updated_at >= cutoff)))


def to_read(session: Session, registry: Registry, dep: tables.Deployment, inference_url: str) -> DeploymentRead:
    project = dep.project.name
    try:
        desired, error = resolve(registry, project, dep.model_name, dep.target), None
    except MiniMLError as exc:
        desired, error = [], exc.detail
    replicas = []
    for rep in live_replicas(session):
        status = rep.status.get(dep.name)
        if status is None:
            continue
        replicas.append(
            ReplicaView(
                replica=rep.id,
                versions=[str(v) for v in status.get("versions", [])],
                ready=bool(status.get("ready")),
                error=status.get("error"),
                updated_at=rep.updated_at,
            )
        )
    want = sorted(v.version for v in desired)
    ready = bool(replicas) and all(r.ready and sorted(r.versions) == want for r in replicas)
    state = "failed" if error else "rollout_failed" if dep.rollout_error else "ready" if ready else "rolling_out"
    return DeploymentRead(
        project=project,
        name=dep.name,
        model_name=dep.model_name,
        registered_name=registered_name(project, dep.model_name),
        target=dep.target,
        previous_target=dep.previous_target,
        desired=desired,
        error=error,
        replicas=replicas,
        ready=ready,
        state=state,
        rollout_error=dep.rollout_error,
        endpoint=f"{inference_url}/v1/endpoints/{dep.name}/predict",
        created_at=dep.created_at,
        updated_at=dep.updated_at,
    )


def push(urls: list[str], token: str | None) -> None:
    """Ask every known inference replica to reconcile now (they also do on a timer)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for url in dict.fromkeys(urls):
        try:
            httpx.post(f"{url.rstrip('/')}/admin/reconcile", headers=headers, timeout=2)
        except httpx.HTTPError:
            continue


def shadow_report(session: Session, caller: Caller, project: str, name: str) -> ShadowReport:
    """Agreement and latency of the shadow version, summed over every live replica."""
    dep = read_deployment(session, caller, project, name)
    totals = {"requests": 0, "rows": 0, "agree": 0, "abs_diff": 0.0, "live_s": 0.0, "shadow_s": 0.0}
    records: list[dict[str, Any]] = []
    version = None
    for rep in live_replicas(session):
        stats = (rep.status.get(dep.name) or {}).get("shadow")
        if not stats:
            continue
        version = stats.get("version", version)
        for k in totals:
            totals[k] += stats.get(k, 0)
        records.extend({"replica": rep.id, **r} for r in stats.get("records", []))
    rows, requests = int(totals["rows"]), int(totals["requests"])
    classification = bool(records) and all(isinstance(r.get("live"), str) for r in records[:5])
    return ShadowReport(
        deployment=dep.name,
        shadow_version=version,
        requests=requests,
        rows=rows,
        agreement=totals["agree"] / rows if rows and classification else None,
        mean_abs_difference=totals["abs_diff"] / rows if rows and not classification else None,
        live_latency_ms=1000 * totals["live_s"] / requests if requests else None,
        shadow_latency_ms=1000 * totals["shadow_s"] / requests if requests else None,
        records=records,
    )
