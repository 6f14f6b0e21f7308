"""The MLflow model registry, seen per project. Registered names read ``<project>.<model>``.

The api speaks to MLflow's REST API (``/api/2.0/mlflow/...``) with httpx: importing MLflow's
client would load MLflow with pandas behind it (~70 MB) into the api on its first registry call.
Only reading a model's signature (batch jobs) loads MLflow, which resolves the model's artifacts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import httpx

from miniml.errors import InvalidInput, NotFound, UpstreamUnavailable

# Promotion moves these aliases; the deprecated stages follow so the MLflow UI shows them too.
STAGES = {"staging": "Staging", "production": "Production"}
_API = "api/2.0/mlflow/"


def registered_name(project: str, model_name: str) -> str:
    """Registry names are scoped to the project, so two projects cannot collide."""
    return f"{project}.{model_name}"


@dataclass
class ModelVersion:
    name: str
    version: str
    run_id: str | None = None
    current_stage: str | None = None
    status: str | None = None
    creation_timestamp: int | None = None
    source: str | None = None

    @classmethod
    def of(cls, raw: dict[str, Any]) -> ModelVersion:
        created = raw.get("creation_timestamp")
        return cls(
            name=str(raw["name"]),
            version=str(raw["version"]),
            run_id=raw.get("run_id") or None,
            current_stage=raw.get("current_stage"),
            status=raw.get("status"),
            creation_timestamp=int(created) if created is not None else None,
            source=raw.get("source"),
        )


@dataclass
class RegisteredModel:
    name: str
    description: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    latest_versions: list[ModelVersion] = field(default_factory=list)

    @classmethod
    def of(cls, raw: dict[str, Any]) -> RegisteredModel:
        return cls(
            name=str(raw["name"]),
            description=raw.get("description"),
            aliases={str(a["alias"]): str(a["version"]) for a in raw.get("aliases", [])},
            latest_versions=[ModelVersion.of(v) for v in raw.get("latest_versions", [])],
        )


@dataclass
class RunData:
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]


@dataclass
class Run:
    run_id: str
    data: RunData

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Run:
        data = raw.get("data", {})
        return cls(
            run_id=str(raw.get("info", {}).get("run_id", "")),
            data=RunData(
                metrics={m["key"]: float(m["value"]) for m in data.get("metrics", [])},
                params={p["key"]: str(p.get("value", "")) for p in data.get("params", [])},
                tags={t["key"]: str(t.get("value", "")) for t in data.get("tags", [])},
            ),
        )


class _MlflowError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Registry:
    def __init__(self, tracking_uri: str) -> None:
        self.uri = tracking_uri
        # Registry reads happen inside API requests: fail fast (503) rather than retry for minutes.
        self._http = httpx.Client(
            base_url=tracking_uri.rstrip("/") + "/" + _API,
            timeout=20,
            transport=httpx.HTTPTransport(retries=2),
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        answer = self._http.request(method, path, **kwargs)
        if answer.status_code >= 400:
            try:
                body = answer.json()
            except ValueError:
                body = {}
            raise _MlflowError(
                answer.status_code, str(body.get("error_code", "")), str(body.get("message", answer.text))
            )
        found: dict[str, Any] = answer.json() if answer.content else {}
        return found

    def _call(self, what: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return self._request(method, path, **kwargs)
        except _MlflowError as exc:
            if exc.code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or exc.status == 404:
                raise NotFound(f"{what[0].upper()}{what[1:]} does not exist.") from exc
            if exc.code == "INVALID_PARAMETER_VALUE":
                raise InvalidInput(f"{what}: {exc.message[:300]}") from exc
            raise UpstreamUnavailable(f"MLflow at {self.uri} failed on {what}: {exc.message[:300]}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"MLflow at {self.uri} did not answer ({type(exc).__name__}).") from exc

    def _search(self, what: str, path: str, key: str, filter_: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        token = None
        while True:
            params = {"filter": filter_, "max_results": 1000} | ({"page_token": token} if token else {})
            page = self._call(what, "GET", path, params=params)
            found.extend(page.get(key, []))
            token = page.get("next_page_token")
            if not token:
                return found

    def list_models(self, project: str) -> list[RegisteredModel]:
        prefix = registered_name(project, "")
        found = self._search("model list", "registered-models/search", "registered_models", f"name LIKE '{prefix}%'")
        models = (RegisteredModel.of(m) for m in found)
        return sorted((m for m in models if m.name.startswith(prefix)), key=lambda m: m.name)

    def model(self, project: str, model: str) -> RegisteredModel:
        found = self._call(
            f"model {model!r} in project {project!r}",
            "GET",
            "registered-models/get",
            params={"name": registered_name(project, model)},
        )
        return RegisteredModel.of(found["registered_model"])

    def versions(self, project: str, model: str) -> list[ModelVersion]:
        self.model(project, model)
        name = registered_name(project, model)
        found = self._search(f"versions of {model!r}", "model-versions/search", "model_versions", f"name='{name}'")
        return sorted((ModelVersion.of(v) for v in found), key=lambda v: int(v.version))

    def version(self, project: str, model: str, version: str | int) -> ModelVersion:
        found = self._call(
            f"version {version} of model {model!r}",
            "GET",
            "model-versions/get",
            params={"name": registered_name(project, model), "version": str(version)},
        )
        return ModelVersion.of(found["model_version"])

    def run(self, run_id: str | None) -> Run | None:
        if not run_id:
            return None
        try:
            return Run.of(self._request("GET", "runs/get", params={"run_id": run_id})["run"])
        except (_MlflowError, httpx.HTTPError, KeyError):
            return None

    def resolve(self, project: str, model: str, alias_or_version: str) -> str:
        """The version number a target names: an alias (or stage word) or a number."""
        target = alias_or_version.strip()
        if target.isdigit():
            return str(self.version(project, model, target).version)
        alias = target.lower()
        try:
            found = self._request(
                "GET", "registered-models/alias", params={"name": registered_name(project, model), "alias": alias}
            )
        except _MlflowError as exc:
            self.model(project, model)  # NotFound for an unknown model
            raise InvalidInput(
                f"Model {model!r} has no version with alias {alias!r}; promote one first "
                "(POST …/models/{name}/versions/{v}/promote)."
            ) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"MLflow at {self.uri} did not answer ({type(exc).__name__}).") from exc
        return str(found["model_version"]["version"])

    def set_alias(self, project: str, model: str, alias: str, version: str) -> None:
        body = {"name": registered_name(project, model), "alias": alias, "version": str(version)}
        self._call("promotion", "POST", "registered-models/alias", json=body)

    def promote(self, project: str, model: str, version: str, stage: str) -> None:
        self.version(project, model, version)
        self.set_alias(project, model, stage, version)
        # Stages are deprecated in MLflow; kept so the MLflow UI shows them too.
        body = {
            "name": registered_name(project, model),
            "version": str(version),
            "stage": STAGES[stage],
            "archive_existing_versions": False,
        }
        self._call("promotion", "POST", "model-versions/transition-stage", json=body)

    def delete_version(self, project: str, model: str, version: str) -> None:
        self._call(
            f"version {version} of model {model!r}",
            "DELETE",
            "model-versions/delete",
            json={"name": registered_name(project, model), "version": str(version)},
        )

    def aliases(self, project: str, model: str) -> dict[str, str]:
        return dict(self.model(project, model).aliases)

    def input_columns(self, project: str, model: str, version: str) -> list[str]:
        """The column names a version's signature expects (MLflow reads the model's artifacts)."""
        # Inside an API request: fail fast (503) rather than retry for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow
        from mlflow.exceptions import MlflowException

        uri = f"models:/{registered_name(project, model)}/{version}"
        mlflow.set_tracking_uri(self.uri)
        what = f"signature of version {version} of {model!r}"
        try:
            info = mlflow.models.get_model_info(uri)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise NotFound(f"{what[0].upper()}{what[1:]} does not exist.") from exc
            raise UpstreamUnavailable(f"MLflow at {self.uri} failed on {what}: {exc.message[:300]}") from exc
        except OSError as exc:
            raise UpstreamUnavailable(f"MLflow at {self.uri} did not answer ({type(exc).__name__}).") from exc
        if info.signature is None or info.signature.inputs is None:
            return []
        return [str(c.name) for c in info.signature.inputs.inputs]
