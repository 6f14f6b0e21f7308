from __future__ import annotations

import time
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from miniml.cli.context import client, console, fail, show
from miniml.errors import MiniMLError
from miniml.schemas.jobs import JobRead

app = typer.Typer(help="Training jobs: Optuna search, tracked in MLflow, registered on success.", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON for scripts.")
COLUMNS = ["id", "state", "dataset", "dataset_version", "model_name", "model_version", "created_at"]


def _status(job: JobRead, started: float) -> Table:
    p = job.progress
    done, total = p.trials_done, p.trials_total
    rate = done / max(time.monotonic() - started, 1e-6)
    eta = f"{(total - done) / rate:.0f}s" if total and rate > 0 and done else "-"
    best = f"{p.best_score:.4f} ({p.best_family})" if p.best_score is not None else "-"
    table = Table("job", "state", "trials", "best " + str(job.spec.get("metric", "")), "elapsed", "ETA")
    elapsed = f"{p.elapsed_s:.0f}s" if p.elapsed_s is not None else "-"
    table.add_row(str(job.id), job.state.value, f"{done}/{total or '∞'}", best, elapsed, eta)
    return table


def _result(job: JobRead) -> None:
    console.print(f"job {job.id} {job.state.value}" + (f": {job.reason}" if job.reason else ""))
    if job.test_metrics:
        console.print("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in job.test_metrics.items()))
    if job.model_name:
        console.print(f"registered {job.model_name} version {job.model_version}")
    if job.mlflow_run_url:
        console.print(f"MLflow run: {job.mlflow_run_url}")


def _wait(project: str, job_id: int, as_json: bool) -> JobRead:
    c = client()
    started = time.monotonic()
    if as_json:
        return c.jobs.wait(project, job_id)
    with Live(console=console, refresh_per_second=4) as live:
        return c.jobs.wait(project, job_id, progress=lambda j: live.update(_status(j, started)))


@app.command("create")
def create(
    project: str,
    dataset: str = typer.Option(..., help="Dataset name."),
    target: str = typer.Option(..., help="Column to predict."),
    version: int | None = typer.Option(None, help="Dataset version; default the latest."),
    task: str = typer.Option("auto", help="auto, classification or regression."),
    metric: str | None = typer.Option(None),
    family: list[str] = typer.Option([], "--family", help="Model family (repeatable); default all."),
    max_trials: int | None = typer.Option(None),
    timeout_s: float | None = typer.Option(None),
    model_name: str | None = typer.Option(None),
    promote_to: str = typer.Option("staging", help="staging, production or none."),
    seed: int | None = typer.Option(None, help="Seeds the split, the search and the models; default 0."),
    reproducible: bool = typer.Option(
        False, "--reproducible", help="Trials one at a time: the same data and seed give the same leaderboard."
    ),
    cpu: float | None = typer.Option(None, help="CPU cores per flow run (Kubernetes work pool)."),
    memory: str | None = typer.Option(None, help="Memory per flow run, e.g. 4Gi (Kubernetes work pool)."),
    gpu: int = typer.Option(0, help="NVIDIA GPUs per flow run; the PyTorch family trains on CUDA."),
    wait: bool = typer.Option(False, "--wait", help="Follow progress until the job ends."),
    as_json: bool = JSON,
) -> None:
    """Queue a training job (and with --wait, follow it to the end)."""
    resources = {k: v for k, v in {"cpu": cpu, "memory": memory, "gpu": gpu or None}.items() if v is not None}
    spec: dict[str, Any] = {
        "dataset": dataset,
        "target": target,
        "version": version,
        "task": task,
        "metric": metric,
        "families": family or None,
        "max_trials": max_trials,
        "timeout_s": timeout_s,
        "model_name": model_name,
        "promote_to": promote_to,
        "seed": seed,
        "reproducible": reproducible or None,
        "resources": resources or None,
    }
    try:
        job = client().jobs.create(project, **{k: v for k, v in spec.items() if v is not None})
        if wait:
            job = _wait(project, job.id, as_json)
    except MiniMLError as exc:
        fail(exc)
        return
    if as_json:
        show(job, as_json=True)
    elif wait:
        _result(job)
    else:
        console.print(f"queued job {job.id}; follow it with: miniml jobs wait {project} {job.id}")
    if wait and job.state.value != "succeeded":
        raise typer.Exit(1)


@app.command("wait")
def wait_(project: str, job_id: int, as_json: bool = JSON) -> None:
    """Follow a job's progress until it ends."""
    try:
        job = _wait(project, job_id, as_json)
    except MiniMLError as exc:
        fail(exc)
        return
    show(job, as_json=True) if as_json else _result(job)
    if job.state.value != "succeeded":
        raise typer.Exit(1)


@app.command("list")
def list_(project: str, as_json: bool = JSON) -> None:
    """List a project's jobs."""
    try:
        show(client().jobs.list(project), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("get")
def get(project: str, job_id: int, as_json: bool = JSON) -> None:
    """Show a job with its leaderboard."""
    try:
        job = client().jobs.get(project, job_id)
    except MiniMLError as exc:
        fail(exc)
        return
    if as_json:
        show(job, as_json=True)
        return
    _result(job)
    show(job.leaderboard[:10], as_json=False, columns=["number", "family", "score", "state", "duration_s", "worker"])


@app.command("logs")
def logs(project: str, job_id: int) -> None:
    """Print a job's log lines."""
    try:
        for line in client().jobs.logs(project, job_id):
            typer.echo(f"{line.at:%H:%M:%S} {line.level:7} {line.message}")
    except MiniMLError as exc:
        fail(exc)


@app.command("cancel")
def cancel(project: str, job_id: int) -> None:
    """Cancel a job."""
    try:
        job = client().jobs.cancel(project, job_id)
    except MiniMLError as exc:
        fail(exc)
        return
    typer.echo(f"job {job.id}: {job.state.value} (cancel requested)")
