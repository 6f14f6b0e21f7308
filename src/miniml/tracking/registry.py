"""The MLflow model registry, seen per project. Registered names read ``<project>.<model>``."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import warnings
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miniml.domain.limits import MAX_ID
from miniml.domain.names import NAME_RE
from miniml.errors import InvalidInput, NotFound, UpstreamUnavailable
from miniml.tracking import experiment_name, open_trial_runs_filter

if TYPE_CHECKING:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

# Promotion moves these aliases; the deprecated stages follow so the MLflow UI shows them too.
STAGES = {"staging": "Staging", "production": "Production"}


def retired_name(project: str, experiment: Any) -> str:
    """A deleted project's experiment: no project's name (slugs hold no "@"), kept apart by its id."""
    return f"{experiment_name(project)}@deleted-{experiment.experiment_id}"


def registered_name(project: str, model_name: str) -> str:
    """Registry names are scoped to the project, so two projects cannot collide."""
    return f"{project}.{model_name}"


def _mlflow_error() -> type[MlflowException]:
    from mlflow.exceptions import MlflowException

    return MlflowException


def _plausible_version(version: str | int) -> bool:
    """MLflow numbers versions 1, 2, …: anything else is not asked for (a huge number made MLflow fail)."""
    text = str(version)
    return text.isascii() and text.isdigit() and 1 <= int(text[:12]) <= MAX_ID and len(text) <= 10


def _lookup_name(project: str, model: str) -> str:
    """The registered name of a model to look up; a name no model can have does not exist (MLflow
    would call it an invalid parameter: a 422 for what is a 404)."""
    if not NAME_RE.fullmatch(model) or ".." in model:
        raise NotFound(f"Model {model[:80]!r} does not exist in project {project!r}.")
    return registered_name(project, model)


class Registry:
    def __init__(self, tracking_uri: str) -> None:
        # Registry reads happen inside API requests: fail fast (503) rather than retry for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.uri = tracking_uri
        # Job runs to end, run id -> status: retried by the api's supervisor until MLflow answers.
        self._endings: dict[str, str] = {}
        self._endings_lock = threading.Lock()

    @cached_property
    def client(self) -> MlflowClient:
        # Imported on first use: MLflow (with scikit-learn behind it) is most of an api process's
        # memory, and uploads, jobs and keys never need it.
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _mlflow_error() as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise NotFound(f"{what[0].upper()}{what[1:]} does not exist.") from exc
            if exc.error_code == "INVALID_PARAMETER_VALUE":
                raise InvalidInput(f"{what}: {exc.message[:300]}") from exc
            raise UpstreamUnavailable(f"MLflow at {self.uri} failed on {what}: {exc.message[:300]}") from exc
        except OSError as exc:
            raise UpstreamUnavailable(f"MLflow at {self.uri} did not answer ({type(exc).__name__}).") from exc

    def list_models(self, project: str) -> list[Any]:
        prefix = registered_name(project, "")
        found: list[Any] = []
        token = None
        while True:  # every page: MLflow answers 100 models at a time
            page = self._call(
                "model list",
                self.client.search_registered_models,
                f"name LIKE '{prefix}%'",
                max_results=1_000,
                page_token=token,
            )
            found.extend(page)
            token = page.token
            if not token:
                break
        return sorted((m for m in found if m.name.startswith(prefix)), key=lambda m: m.name)

    def forget_project(self, project: str) -> None:
        """Delete the project's registered models (every version) and retire its experiment, so a
        project made again under the same name starts empty. MLflow keeps a deleted experiment's
        name taken, so the experiment is renamed out of the way first. (MLflow keeps the deleted
        runs' artifacts until ``mlflow gc`` removes them.)"""
        for model in self.list_models(project):
            with contextlib.suppress(NotFound):  # deleted meanwhile
                self._call(f"model {model.name!r}", self.client.delete_registered_model, model.name)
        name = experiment_name(project)
        exp = self._call("read the experiment", self.client.get_experiment_by_name, name)
        if exp is None:
            return
        if exp.lifecycle_stage != "active":  # deleted by hand under its own name: free the name too
            self._call("restore the experiment", self.client.restore_experiment, exp.experiment_id)
        self._call(
            "retire the experiment", self.client.rename_experiment, exp.experiment_id, retired_name(project, exp)
        )
        self._call("retire the experiment", self.client.delete_experiment, exp.experiment_id)

    def model(self, project: str, model: str) -> Any:
        return self._call(
            f"model {model!r} in project {project!r}", self.client.get_registered_model, _lookup_name(project, model)
        )

    def versions(self, project: str, model: str) -> list[Any]:
        self.model(project, model)
        name = _lookup_name(project, model)
        found = self._call(f"versions of {model!r}", self.client.search_model_versions, f"name='{name}'")
        return sorted(found, key=lambda v: int(v.version))

    def version(self, project: str, model: str, version: str | int) -> Any:
        if not _plausible_version(version):
            raise NotFound(f"Version {str(version)[:20]} of model {model!r} does not exist.")
        return self._call(
            f"version {version} of model {model!r}",
            self.client.get_model_version,
            _lookup_name(project, model),
            str(version),
        )

    def run(self, run_id: str | None) -> Any:
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id)
        except _mlflow_error() as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
                return None
            raise UpstreamUnavailable(
                f"MLflow at {self.uri} failed to read run {run_id[:64]}: {exc.message[:200]}"
            ) from exc
        except OSError as exc:
            raise UpstreamUnavailable(f"MLflow at {self.uri} did not answer ({type(exc).__name__}).") from exc

    def set_version_tags(self, project: str, model: str, version: str, tags: dict[str, str]) -> None:
        name = _lookup_name(project, model)
        for key, value in tags.items():
            self._call("tag the version", self.client.set_model_version_tag, name, version, key, value)

    def plot_names(self, run_id: str) -> list[str]:
        """The plots the job logged to its run (``plots/<name>.png``), by name."""
        found = self._call("list the run's plots", self.client.list_artifacts, run_id, "plots")
        return sorted(Path(f.path).stem for f in found if not f.is_dir and f.path.endswith(".png"))

    def plot(self, run_id: str, name: str) -> bytes:
        """One plot's PNG bytes; NotFound when the run has no such plot."""
        names = self.plot_names(run_id)
        if name not in names:
            raise NotFound(f"The run has no plot {name!r}; it has {', '.join(names) or 'none'}.")
        with tempfile.TemporaryDirectory() as tmp:
            path = self._call("read a plot", self.client.download_artifacts, run_id, f"plots/{name}.png", tmp)
            return Path(path).read_bytes()

    def resolve(self, project: str, model: str, alias_or_version: str) -> str:
        """The version number a target names: an alias (or stage word) or a number."""
        target = alias_or_version.strip()
        if target.isdigit():
            return str(self.version(project, model, target).version)
        alias = target.lower()
        try:
            mv = self.client.get_model_version_by_alias(_lookup_name(project, model), alias)
        except _mlflow_error() as exc:
            self.model(project, model)  # NotFound for an unknown model
            raise InvalidInput(
                f"Model {model!r} has no version with alias {alias!r}; promote one first "
                "(POST …/models/{name}/versions/{v}/promote)."
            ) from exc
        return str(mv.version)

    def promote(self, project: str, model: str, version: str, stage: str) -> None:
        name = _lookup_name(project, model)
        self.version(project, model, version)
        self._call("promotion", self.client.set_registered_model_alias, name, stage, version)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stages are deprecated; kept so the MLflow UI shows them
            self._call("promotion", self.client.transition_model_version_stage, name, version, STAGES[stage])

    def delete_version(self, project: str, model: str, version: str) -> None:
        self._call(
            f"version {version} of model {model!r}",
            self.client.delete_model_version,
            _lookup_name(project, model),
            version,
        )

    def aliases(self, project: str, model: str) -> dict[str, str]:
        return {str(k): str(v) for k, v in dict(self.model(project, model).aliases or {}).items()}

    def input_columns(self, project: str, model: str, version: str) -> list[str]:
        """The column names a version's signature expects."""
        import mlflow

        uri = f"models:/{_lookup_name(project, model)}/{version}"
        mlflow.set_tracking_uri(self.uri)
        info = self._call(f"signature of version {version} of {model!r}", mlflow.models.get_model_info, uri)
        if info.signature is None or info.signature.inputs is None:
            return []
        return [str(c.name) for c in info.signature.inputs.inputs]

    def end_runs(self, run_id: str, status: str) -> int:
        """End a job's parent run and its trial runs still RUNNING (a dead worker could not); return how many."""
        parent = self.run(run_id)
        if parent is None:
            return 0
        children = self._call(
            "the job's trial runs",
            self.client.search_runs,
            [parent.info.experiment_id],
            open_trial_runs_filter(run_id),
            max_results=10_000,
        )
        ended = 0
        for run in [*children, parent]:
            if run.info.status == "RUNNING":
                self._call("end a run", self.client.set_terminated, run.info.run_id, status=status)
                ended += 1
        return ended

    def end_runs_soon(self, run_id: str, status: str) -> None:
        """Have ``end_pending_runs`` end a job's runs: a job's end is recorded even while MLflow is away."""
        with self._endings_lock:
            self._endings[run_id] = status

    def end_pending_runs(self) -> list[str]:
        """End the queued jobs' runs still open; return the errors of those left queued for the next round."""
        with self._endings_lock:
            work = dict(self._endings)
        errors = []
        for run_id, status in work.items():
            try:
                self.end_runs(run_id, status)
            except UpstreamUnavailable as exc:
                errors.append(exc.detail)
                continue  # MLflow is away: the next round tries again
            except (NotFound, InvalidInput):
                pass  # no such run (deleted, or MLflow reset): nothing to end
            with self._endings_lock:
                if self._endings.get(run_id) == status:
                    del self._endings[run_id]
        return errors
