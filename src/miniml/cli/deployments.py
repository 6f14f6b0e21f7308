from __future__ import annotations

import json
from pathlib import Path

import typer

from miniml.cli.context import api_errors, client, console, fail, resolve_login, show
from miniml.errors import MiniMLError

app = typer.Typer(help="Deployments: named endpoints serving a model version, alias or split.", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON for scripts.")
COLUMNS = ["name", "model_name", "target", "desired", "ready", "error", "endpoint"]


@app.command("create")
def create(
    project: str,
    name: str,
    model: str,
    target: str = typer.Option("staging", help="Alias or version."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the inference replicas serve it."),
    as_json: bool = JSON,
) -> None:
    """Deploy a model under an endpoint name."""
    try:
        sdk = client().deployments
        dep = sdk.create(project, name, model, target=target)
        if wait:
            with console.status(f"waiting for the inference replicas to load {name}"):
                dep = sdk.wait_ready(project, name)
        show(dep, as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)
    except TimeoutError as exc:
        fail(MiniMLError(str(exc)))


@app.command("list")
def list_(project: str, as_json: bool = JSON) -> None:
    """List deployments."""
    try:
        show(client().deployments.list(project), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("get")
def get(project: str, name: str, as_json: bool = JSON) -> None:
    """Show a deployment and what each replica serves."""
    try:
        show(client().deployments.get(project, name), as_json=as_json, columns=[*COLUMNS, "replicas"])
    except MiniMLError as exc:
        fail(exc)


@app.command("update")
def update(
    project: str, name: str, target: str = typer.Option(..., help="Alias or version."), as_json: bool = JSON
) -> None:
    """Point a deployment at a new target."""
    try:
        show(client().deployments.update(project, name, target=target), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("rollback")
def rollback(project: str, name: str, as_json: bool = JSON) -> None:
    """Go back to the previous target."""
    try:
        show(client().deployments.rollback(project, name), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("delete")
def delete(project: str, name: str, yes: bool = typer.Option(False, "--yes")) -> None:
    """Stop serving and delete a deployment."""
    if not yes:
        typer.confirm(f"Delete deployment {name!r}?", abort=True)
    try:
        client().deployments.delete(project, name)
    except MiniMLError as exc:
        fail(exc)
        return
    typer.echo(f"deleted {name}")


def predict_command(
    endpoint: str,
    rows: str = typer.Option(..., help='JSON list of rows, or @file.json: [{"col": 1.0, ...}]'),
    probabilities: bool = typer.Option(False, "--probabilities"),
    inference_url: str = typer.Option("http://127.0.0.1:8080", envvar="MINIML_INFERENCE_URL"),
) -> None:
    """Predict with an endpoint of the inference service."""
    data = json.loads(Path(rows[1:]).read_text() if rows.startswith("@") else rows)
    url, key = resolve_login()
    from miniml.sdk.client import Client

    try:
        result = Client(url, api_key=key, inference_url=inference_url).predict(
            endpoint, data, probabilities=probabilities
        )
    except MiniMLError as exc:
        fail(exc)
        return
    typer.echo(json.dumps(result))


# Monitoring: drift, quality, retraining

DRIFT_COLUMNS = ["feature", "kind", "psi", "ks", "ks_p_value", "drifted"]
RETRAIN_COLUMNS = [
    "id",
    "trigger",
    "state",
    "champion_version",
    "challenger_version",
    "metric",
    "champion_score",
    "challenger_score",
    "reason",
]


@app.command("monitoring")
@api_errors
def monitoring(
    project: str,
    name: str,
    drift_interval: int | None = typer.Option(None, help="Seconds between scheduled drift checks; 0 turns them off."),
    drift_window: int | None = typer.Option(None, help="Seconds of captured requests a check reads."),
    retrain_schedule: str | None = typer.Option(None, help="Cron (UTC) for scheduled retraining, e.g. '0 3 * * 1'."),
    retrain_threshold: float | None = typer.Option(None, help="Retrain when a feature's PSI exceeds this."),
    min_improvement: float | None = typer.Option(None, help="Promote a challenger only if better by this much."),
    no_retrain: bool = typer.Option(False, "--no-retrain", help="Remove the retraining policy."),
    as_json: bool = JSON,
) -> None:
    """Show or change the drift schedule and the retraining policy."""
    sdk = client().deployments
    retrain: dict[str, object] | bool | None = False
    if no_retrain:
        retrain = None
    elif retrain_schedule is not None or retrain_threshold is not None or min_improvement is not None:
        current = sdk.monitoring(project, name).retrain
        retrain = (current.model_dump() if current else {}) | {
            k: v
            for k, v in {
                "schedule": retrain_schedule,
                "drift_threshold": retrain_threshold,
                "min_improvement": min_improvement,
            }.items()
            if v is not None
        }
    if drift_interval is None and drift_window is None and retrain is False:
        result = sdk.monitoring(project, name)
    else:
        result = sdk.set_monitoring(
            project, name, drift_interval_s=drift_interval, drift_window_s=drift_window, retrain=retrain
        )
    show(result, as_json=as_json)


@app.command("check-drift")
@api_errors
def check_drift(
    project: str,
    name: str,
    wait: bool = typer.Option(False, "--wait", help="Wait for the report and print it."),
    timeout: float = typer.Option(300, help="Seconds to wait."),
    as_json: bool = JSON,
) -> None:
    """Start a drift check now (a Prefect flow on a worker)."""
    sdk = client().deployments
    report = sdk.check_drift(project, name)
    if wait:
        with console.status(f"drift check {report.id} of {name}: waiting for a worker"):
            report = sdk.wait_drift(project, name, report.id, timeout_s=timeout)
    _show_report(report, as_json=as_json)


def _show_report(report: object, *, as_json: bool) -> None:
    from miniml.schemas.monitoring import DriftReportRead

    assert isinstance(report, DriftReportRead)
    if as_json:
        show(report, as_json=True)
        return
    console.print(
        f"drift check {report.id} of {report.deployment}: [bold]{report.state}[/bold], {report.rows} rows, "
        f"model v{report.model_version or '?'}, max PSI {report.max_psi if report.max_psi is not None else '-'}, "
        f"prediction PSI {report.prediction_psi if report.prediction_psi is not None else '-'}"
        + (f"\n{report.error}" if report.error else "")
    )
    if report.features:
        show(report.features, as_json=False, columns=DRIFT_COLUMNS)


@app.command("drift")
@api_errors
def drift(project: str, name: str, as_json: bool = JSON) -> None:
    """The latest drift report (per-feature PSI and KS) and how many checks ran."""
    reports = client().deployments.drift(project, name)
    if as_json:
        show(reports, as_json=True)
    elif reports.latest is None:
        console.print(f"no finished drift check yet ({len(reports.history)} started)")
    else:
        _show_report(reports.latest, as_json=False)


@app.command("quality")
@api_errors
def quality(
    project: str, name: str, window: int = typer.Option(3600, help="Seconds of feedback."), as_json: bool = JSON
) -> None:
    """Live accuracy/F1 or RMSE/MAE from feedback."""
    show(
        client().deployments.quality(project, name, window_s=window),
        as_json=as_json,
        columns=["deployment", "task", "labelled", "accuracy", "f1_macro", "rmse", "mae"],
    )


@app.command("retrain")
@api_errors
def retrain(project: str, name: str, as_json: bool = JSON) -> None:
    """Retrain now: train a challenger, score it against the champion, promote only if better."""
    show(client().deployments.retrain(project, name), as_json=as_json, columns=RETRAIN_COLUMNS)


@app.command("retrainings")
@api_errors
def retrainings(project: str, name: str, as_json: bool = JSON) -> None:
    """Every retraining with its decision and why, newest first."""
    show(client().deployments.retrainings(project, name), as_json=as_json, columns=RETRAIN_COLUMNS)
