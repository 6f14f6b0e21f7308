"""Job runs in MLflow: one parent run per job, one nested run per trial, the model, its plots."""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from miniml.errors import UpstreamUnavailable
from miniml.tracking import experiment_name, open_trial_runs_filter
from miniml.tracking.signing import sign_version
from miniml.training.families import Family
from miniml.training.search import TrialResult

_BASE_PIP = ("scikit-learn", "pandas", "numpy", "scipy", "cloudpickle")


def _pin(package: str) -> str:
    dist = "xgboost-cpu" if package == "xgboost-cpu" else package
    try:
        return f"{package}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return package


class Tracker:
    def __init__(self, tracking_uri: str) -> None:
        self.uri = tracking_uri
        # Explicit requirements: MLflow would otherwise spend ~20 s inferring them.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            raise UpstreamUnavailable(f"MLflow at {self.uri} failed to {what}: {exc.message[:300]}") from exc

    def experiment_id(self, project: str) -> str:
        name = experiment_name(project)
        exp = self._call("read the experiment", self.client.get_experiment_by_name, name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except MlflowException:  # created meanwhile by another worker
            return str(self._call("read the experiment", self.client.get_experiment_by_name, name).experiment_id)

    def start_job_run(self, project: str, job_id: int, tags: dict[str, str]) -> str:
        run = self._call(
            "create the job run",
            self.client.create_run,
            self.experiment_id(project),
            run_name=f"job-{job_id}",
            tags={"miniml.project": project, "miniml.job_id": str(job_id), **tags},
        )
        return str(run.info.run_id)

    def log_trial(self, parent_run_id: str, experiment_id: str, result: TrialResult, metric: str) -> None:
        run = self.client.create_run(
            experiment_id,
            run_name=f"trial-{result.number}",
            tags={
                "mlflow.parentRunId": parent_run_id,
                "miniml.family": result.family,
                "miniml.state": result.state,
                "miniml.worker": result.worker,
            },
        )
        params = {"family": result.family, **{k: str(v)[:250] for k, v in result.params.items()}}
        metrics = {"duration_s": result.duration_s}
        if result.score is not None:
            metrics[f"cv_{metric}"] = result.score
        self.client.log_batch(
            run.info.run_id,
            params=[mlflow.entities.Param(k, v) for k, v in params.items()],
            metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()],
        )
        status = "FINISHED" if result.state == "complete" else "KILLED" if result.state == "pruned" else "FAILED"
        self.client.set_terminated(run.info.run_id, status=status)

    def log_figures(self, run_id: str, figures: dict[str, Any]) -> None:
        from miniml.training.plots import close

        with tempfile.TemporaryDirectory() as tmp:
            for name, fig in figures.items():
                if fig is None:
                    continue
                path = Path(tmp) / f"{name}.png"
                fig.savefig(path, dpi=110)
                close(fig)
                self._call("store a plot", self.client.log_artifact, run_id, str(path), "plots")

    def log_model(
        self,
        run_id: str,
        pipeline: Any,
        family: Family,
        example: pd.DataFrame,
        *,
        registered: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        signing_key: bytes,
    ) -> str:
        """Log the model with signature and input example, register and sign it; return the new version."""
        self.client.log_batch(
            run_id,
            params=[mlflow.entities.Param(f"best.{k}", str(v)[:250]) for k, v in params.items()],
            metrics=[mlflow.entities.Metric(f"test_{k}", float(v), 0, 0) for k, v in metrics.items()],
        )
        signature = infer_signature(example, pipeline.predict(example))
        pip = [_pin(p) for p in (*_BASE_PIP, *family.pip)]
        if family.serialization == "skops":
            pip.append(_pin("skops"))
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id):
            info = self._call(
                "log the model",
                mlflow.sklearn.log_model,
                pipeline,
                name="model",
                signature=signature,
                input_example=example,
                serialization_format=family.serialization,
                skops_trusted_types=list(family.trusted_types) or None,
                pip_requirements=pip,
                registered_model_name=registered,
            )
        version = str(info.registered_model_version)
        self._call("sign the model", sign_version, self.uri, registered, version, signing_key)
        return version

    def set_alias(self, registered: str, alias: str, version: str) -> None:
        self._call("set the alias", self.client.set_registered_model_alias, registered, alias, version)

    def finish(self, run_id: str, status: str) -> None:
        """End the job's run, and with it any trial run still open (one whose logging was cut short)."""
        parent = self._call("read the job run", self.client.get_run, run_id)
        children = self._call(
            "find the open trial runs",
            self.client.search_runs,
            [parent.info.experiment_id],
            open_trial_runs_filter(run_id),
            max_results=10_000,
        )
        for run in children:
            self._call("close a trial run", self.client.set_terminated, run.info.run_id, status=status)
        self._call("close the run", self.client.set_terminated, run_id, status=status)

    def run_url(self, public_url: str, project: str, run_id: str) -> str:
        exp = self.experiment_id(project)
        return f"{public_url.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
