"""Who may read and write what in MLflow, kept in step with the platform's keys and projects.

MLflow runs its basic-auth app with ``default_permission = NO_PERMISSIONS``: anonymous calls get
401, and a signed-in user sees only what was granted. Each person's API key is an MLflow user
(username: the key id, password: the key itself, so the MLflow UI and client take the same
credential). Viewers and engineers get READ on their projects' experiment and registered models
(only the platform writes: runs, artifacts it signs, aliases); admin keys are MLflow admins. The
platform's own processes use the MLflow admin account. MLflow 3.17 grants exact names only, so
every model a project registers is granted as it appears.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from miniml.tracking import experiment_name

log = logging.getLogger("miniml.tracking")

ADMIN_USERNAME = "miniml"


@dataclass(frozen=True)
class MlflowUser:
    username: str
    admin: bool
    # project -> permission (READ) on its experiment and every model it registered
    projects: dict[str, str]


def admin_password(configured: str | None, data_dir: Path) -> str:
    """The MLflow admin's password: configured, or ``<data_dir>/mlflow.password`` made on first use."""
    return configured or secret_file(data_dir / "mlflow.password")


def secret_file(path: Path) -> str:
    """A random secret kept in ``path`` (0600), made by whichever process needs it first.

    Written whole to a temp file and linked into place, so no process ever reads a half-written
    or empty secret; one shorter than 32 characters is refused rather than used.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first: keep theirs
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    value = path.read_text().strip()
    if len(value) < 32:
        raise RuntimeError(f"{path} holds no usable secret (under 32 characters); remove it to have a new one made.")
    return value


def admin_credentials(configured: str | None, data_dir: Path) -> tuple[str, str]:
    """The MLflow admin account: from MLflow's own variables when set (compose), else ours."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return user, password
    return ADMIN_USERNAME, admin_password(configured, data_dir)


def use_admin_credentials(configured: str | None, data_dir: Path) -> tuple[str, str]:
    """MLflow's client reads these variables: every platform process talks to MLflow as its admin."""
    user, password = admin_credentials(configured, data_dir)
    os.environ["MLFLOW_TRACKING_USERNAME"] = user
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return user, password


def auth_config(data_dir: Path, password: str, database_uri: str | None = None) -> str:
    """The basic-auth app's ini: nothing for anyone until granted."""
    db = database_uri or f"sqlite:///{data_dir / 'mlflow-auth.db'}"
    return (
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {db}\n"
        f"admin_username = {ADMIN_USERNAME}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 30\n"
    )


class MlflowAccess:
    """MLflow's user and permission REST API, as its admin."""

    def __init__(self, uri: str, username: str, password: str) -> None:
        self.http = httpx.Client(base_url=uri.rstrip("/"), auth=(username, password), timeout=10)
        self._experiments: dict[str, str] = {}

    def close(self) -> None:
        self.http.close()

    def _ok(self, response: httpx.Response, *tolerated: str) -> dict[str, Any]:
        if response.status_code == 200:
            return dict(response.json() or {})
        code = ""
        with contextlib.suppress(ValueError):
            code = str(response.json().get("error_code", ""))
        if code in tolerated:
            return {}
        response.raise_for_status()
        raise httpx.HTTPStatusError(
            f"MLflow answered {response.status_code}", request=response.request, response=response
        )

    def create_user(self, username: str, password: str, *, admin: bool) -> None:
        self._ok(
            self.http.post("/api/2.0/mlflow/users/create", json={"username": username, "password": password}),
            "RESOURCE_ALREADY_EXISTS",
        )
        if admin:
            self._ok(
                self.http.patch("/api/2.0/mlflow/users/update-admin", json={"username": username, "is_admin": True})
            )

    def delete_user(self, username: str) -> None:
        self._ok(
            self.http.request("DELETE", "/api/2.0/mlflow/users/delete", json={"username": username}),
            "RESOURCE_DOES_NOT_EXIST",
        )

    def users(self) -> dict[str, bool]:
        """username -> is_admin."""
        found = self._ok(self.http.get("/api/2.0/mlflow/users/list")).get("users", [])
        return {str(u["username"]): bool(u.get("is_admin")) for u in found}

    def experiment_id(self, name: str) -> str:
        """The experiment's id, creating it when missing (grants need the id)."""
        if name in self._experiments:
            return self._experiments[name]
        got = self.http.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
        if got.status_code == 200:
            exp_id = str(got.json()["experiment"]["experiment_id"])
        else:
            created = self._ok(
                self.http.post("/api/2.0/mlflow/experiments/create", json={"name": name}), "RESOURCE_ALREADY_EXISTS"
            )
            exp_id = str(created.get("experiment_id") or self.experiment_id(name))
        self._experiments[name] = exp_id
        return exp_id

    def forget(self, name: str) -> None:
        """Drop a remembered experiment id (its project was deleted: the name gets a new experiment)."""
        self._experiments.pop(name, None)

    def models(self, prefix: str) -> list[str]:
        body: dict[str, str | int] = {"filter": f"name LIKE '{prefix}%'", "max_results": 1000}
        found = self._ok(self.http.get("/api/2.0/mlflow/registered-models/search", params=body))
        return [str(m["name"]) for m in found.get("registered_models", []) if str(m["name"]).startswith(prefix)]

    def granted(self, username: str) -> dict[tuple[str, str], str]:
        """(resource type, id or name) -> permission, for this user's own grants."""
        answer = self._ok(self.http.get("/api/3.0/mlflow/users/permissions/list", params={"username": username}))
        return {
            (str(p["resource_type"]), str(p["resource_pattern"])): str(p["permission"])
            for p in answer.get("permissions", [])
        }

    def revoke(self, username: str, resource_type: str, resource_id: str) -> None:
        body = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
        self._ok(self.http.post("/api/3.0/mlflow/users/permissions/revoke", json=body), "RESOURCE_DOES_NOT_EXIST")

    def grant(self, username: str, resource_type: str, resource_id: str, permission: str) -> None:
        body = {
            "username": username,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "permission": permission,
        }
        self._ok(self.http.post("/api/3.0/mlflow/users/permissions/grant", json=body), "RESOURCE_ALREADY_EXISTS")

    def apply(self, users: list[MlflowUser], *, gone: set[str]) -> int:
        """Make each user's grants exactly what its key allows; delete the users of revoked or expired keys.

        Whatever else a user holds goes: grants of a project the key lost, a level above READ, and
        the MANAGE MLflow gives whoever creates an experiment or model (so a name taken ahead of
        the platform stays out of its taker's hands).
        """
        changes = 0
        models: dict[str, list[str]] = {}
        # Experiment ids are looked up again each round: a deleted project's name may name a new
        # experiment now (another api process may have deleted it).
        self._experiments.clear()
        existing = self.users()
        for name in gone & set(existing):
            self.delete_user(name)
            changes += 1
        for user in users:
            if user.username not in existing:
                continue  # made when its key was created (the password is the key, never stored)
            if user.admin and not existing[user.username]:
                self._ok(
                    self.http.patch(
                        "/api/2.0/mlflow/users/update-admin", json={"username": user.username, "is_admin": True}
                    )
                )
                changes += 1
            have = self.granted(user.username)
            wanted: dict[tuple[str, str], str] = {}
            for project, permission in user.projects.items():
                wanted[("experiment", self.experiment_id(experiment_name(project)))] = permission
                for m in models.setdefault(project, self.models(f"{project}.")):
                    wanted[("registered_model", m)] = permission
            for (resource_type, rid), level in have.items():
                if wanted.get((resource_type, rid)) != level:
                    self.revoke(user.username, resource_type, rid)
                    changes += 1
            for (resource_type, rid), permission in wanted.items():
                if have.get((resource_type, rid)) != permission:
                    self.grant(user.username, resource_type, rid, permission)
                    changes += 1
        return changes
