"""The only package that talks to MLflow."""

import os

# Progress bars are for terminals; every miniml process logs JSON lines instead.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def experiment_name(project: str) -> str:
    """Every project's runs live in one MLflow experiment."""
    return f"miniml/{project}"


# The status a job's MLflow runs end with, by the job's end state.
RUN_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}


def open_trial_runs_filter(run_id: str) -> str:
    """MLflow search filter for a job's trial runs that were never ended."""
    return f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"
