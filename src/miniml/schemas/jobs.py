from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field

from miniml.domain.jobs import JobState
from miniml.domain.limits import MAX_ID, MAX_SEED, MAX_TRIALS
from miniml.domain.tasks import Task
from miniml.schemas.common import ReadModel, StrictModel


class JobResources(StrictModel):
    """What one flow run of the job (each shard of a parallel job) asks of the cluster. On a Kubernetes
    work pool they become the run's Job's requests and limits; a process worker checks only the GPU."""

    cpu: float | None = Field(
        default=None, gt=0, le=256, description="CPU cores, requested and the limit (Kubernetes); e.g. 2 or 0.5."
    )
    memory: str | None = Field(
        default=None,
        pattern=r"^[1-9][0-9]{0,5}(Mi|Gi)$",
        description="Memory, requested and the limit (Kubernetes), in Mi or Gi; e.g. '4Gi'.",
    )
    gpu: int = Field(
        default=0,
        ge=0,
        le=8,
        description="NVIDIA GPUs (Kubernetes: the nvidia.com/gpu limit). The PyTorch family trains on CUDA when the "
        "run sees a GPU; a job that asks for one fails at once on a worker that has none.",
    )


class JobCreate(StrictModel):
    dataset: str | None = Field(default=None, description="Dataset name (with `version`, default the latest).")
    version: int | None = Field(default=None, ge=1, le=MAX_ID)
    dataset_uri: str | None = Field(default=None, description="Or the `uri` an upload returned.")
    target: str = Field(description="The column to predict.")
    task: Task = Task.auto
    metric: str | None = Field(default=None, description="Default f1_macro (classification) or rmse (regression).")
    families: list[str] | None = Field(default=None, description="Model families to search; default all.")
    max_trials: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TRIALS,
        description="Trial budget; default 20 when timeout_s is not set (then the job also gets a default time).",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=7 * 86400,
        description="Time budget in seconds, the final fit included. Default when neither budget is set: 60 s "
        "up to a million cells (rows x columns), growing with the square root of the size, an hour at most; "
        "the job ends at 20 trials or that time, whichever comes first.",
    )
    test_size: float = Field(default=0.2, gt=0.0, lt=0.9)
    cv_folds: int = Field(default=3, ge=2, le=20)
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seeds the split, the search and the models.")
    promote_to: Literal["staging", "production", "none"] = "staging"
    model_name: str | None = Field(default=None, description="Registered model name; default the dataset's name.")
    parallelism: int = Field(default=1, ge=1, le=32, description="Worker processes sharing the study.")
    reproducible: bool = Field(
        default=False,
        description="Run the trials one at a time, each on every core: the same data and seed then give the same "
        "trials, in the same order, with the same scores (trials side by side draw in the order they finish, "
        "which timing decides). Needs parallelism 1; a time budget that ends the search early still ends it "
        "where the time runs out, so set max_trials for a repeatable leaderboard.",
    )
    resources: JobResources | None = Field(
        default=None, description="CPU, memory and GPUs for each of the job's flow runs; default the work pool's."
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": [field], "properties": {field: {"type": "string"}}} for field in ("dataset", "dataset_uri")
            ]
        },
    )


class SeedTrainRequest(StrictModel):
    project: str
    dataset_s3_uri: str
    target: str
    model_name: str
    test_size: float = Field(default=0.2, gt=0.0, lt=0.9)
    max_trials: int | None = Field(default=20, ge=1, le=MAX_TRIALS)


class ImportCreate(StrictModel):
    """Where a model built elsewhere gets its signature: rows of a dataset version of the project."""

    dataset: str = Field(description="A dataset whose columns (less `target`) the model takes as input.")
    version: int | None = Field(default=None, ge=1, le=MAX_ID, description="Its version; default the latest.")
    target: str | None = Field(default=None, max_length=128, description="A column of it the model does not take.")


class BatchCreate(StrictModel):
    dataset: str = Field(description="The dataset to predict for.")
    version: int | None = Field(default=None, ge=1, le=MAX_ID, description="Its version; default the latest.")
    output_name: str | None = Field(
        default=None, description="Dataset the predictions go to; default <dataset>-predictions."
    )


class TrialRead(ReadModel):
    number: int
    family: str
    params: dict[str, Any]
    score: float | None
    duration_s: float
    state: str
    worker: str
    error: str | None = None
    finished_at: datetime | None = None


class Progress(ReadModel):
    trials_done: int
    trials_claimed: int
    trials_total: int | None
    best_score: float | None
    best_family: str | None
    elapsed_s: float | None


class JobRead(ReadModel):
    id: int
    kind: str = Field(default="train", description="train, or batch (predictions for a dataset version).")
    output: dict[str, Any] | None = Field(default=None, description="Batch jobs: the dataset version written.")
    project: str
    state: JobState
    reason: str | None
    dataset: str
    dataset_version: int
    spec: dict[str, Any]
    progress: Progress
    leaderboard: list[TrialRead] = Field(default_factory=list, description="Trials, best first.")
    test_metrics: dict[str, float]
    mlflow_run_id: str | None
    mlflow_run_url: str | None
    model_name: str | None
    model_version: str | None
    worker: str | None
    flow_run_id: str | None
    cancel_requested: bool
    created_at: datetime
    created_by: str | None
    started_at: datetime | None
    finished_at: datetime | None


class JobLogRead(ReadModel):
    at: datetime
    level: str
    message: str


# What workers send back (worker role): the api owns the job's state.
class WorkerHello(StrictModel):
    worker: str = Field(max_length=128)


class WorkerStatus(ReadModel):
    state: JobState
    cancel_requested: bool


class TrialClaim(ReadModel):
    granted: bool


class TrialReport(StrictModel):
    number: int
    family: str
    params: dict[str, Any]
    score: float | None
    duration_s: float
    state: Literal["complete", "pruned", "fail"]
    worker: str = ""
    error: str | None = None


class LogLines(StrictModel):
    lines: list[str] = Field(max_length=1000)
    level: Literal["debug", "info", "warning", "error"] = "info"


class RunReport(StrictModel):
    mlflow_run_id: str = Field(max_length=64)


class JobFinish(StrictModel):
    state: Literal["succeeded", "failed", "cancelled"]
    reason: str | None = Field(default=None, max_length=4000)
    test_metrics: dict[str, float] = Field(default_factory=dict)
    model_name: str | None = None
    model_version: str | None = None
    output: dict[str, Any] | None = None
