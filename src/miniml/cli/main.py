"""The ``miniml`` command: process roles (up, api) and one command per SDK verb."""

from __future__ import annotations

import signal
import time
from typing import Any

import typer

from miniml.cli import datasets, deployments, jobs, keys, models, projects
from miniml.cli.context import client, console, err_console, fail, save_login
from miniml.errors import MiniMLError
from miniml.files import secure_data_dir

app = typer.Typer(help="miniml: a small, honest ML platform.", no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(projects.app, name="projects")
app.add_typer(keys.app, name="keys")
app.add_typer(datasets.app, name="datasets")
app.add_typer(jobs.app, name="jobs")
app.add_typer(models.app, name="models")
app.add_typer(deployments.app, name="deployments")
app.command("predict")(deployments.predict_command)
app.command("deploy", help="Deploy a model under an endpoint name (= miniml deployments create).")(deployments.create)


@app.command()
def up() -> None:
    """Start the whole platform on this machine (api, MLflow, Prefect); Ctrl-C stops it all."""
    from miniml.config import Settings
    from miniml.processes import CrashLoop, Supervisor, embedded_services

    settings = Settings()
    secure_data_dir(settings.data_dir)  # before any child starts: they inherit the private umask
    key_file = settings.data_dir / "admin.key"
    had_key = key_file.exists()
    sup = Supervisor(settings, embedded_services(settings))
    stopping = {"now": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["now"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # Also when started in the background of a script (`miniml up &`), which starts it with SIGINT
    # ignored: an interrupt still stops the platform, in order.
    signal.signal(signal.SIGINT, on_signal)
    try:
        console.print(f"miniml: starting in {settings.data_dir.resolve()} ({settings.mode.value} mode)")
        timings = sup.start_all()
        console.print("[green]miniml is up[/green] " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        console.print(f"  console    {settings.api_url}/ui  (sign in with an API key)")
        console.print(f"  api        {settings.api_url}  (OpenAPI: {settings.api_url}/docs)")
        console.print(
            f"  MLflow UI  {settings.mlflow_uri}"
            + ("  (sign in with a key: username its id, password the key)" if settings.mlflow.auth else "")
        )
        console.print(f"  Prefect UI {settings.prefect_api_url.removesuffix('/api')}")
        console.print(f"  inference  {settings.inference_url}  (POST /v1/endpoints/<name>/predict)")
        if "prometheus" in sup.procs:
            console.print(f"  Prometheus http://127.0.0.1:{settings.monitoring.prometheus_port}  (alerts: /alerts)")
        else:
            console.print(
                "  Prometheus not installed (sudo apt-get install prometheus): metrics stay at "
                f"{settings.api_url}/metrics and {settings.inference_url}/metrics"
            )
        console.print(f"  logs       {sup.log_dir}")
        if key_file.exists() and not had_key:
            console.print(f"  admin key  {key_file.read_text().strip()}  (shown once; saved in {key_file})")
        else:
            console.print(f"  admin key  in {key_file}")
        console.print("Press Ctrl-C to stop; `miniml status` shows each process.")
        while not stopping["now"]:
            try:
                for event in sup.supervise():
                    (err_console if "exited" in event else console).print(f"miniml: {event}")
            except CrashLoop as exc:
                err_console.print(f"[red]miniml: {exc.detail}[/red]")
                raise typer.Exit(1) from None
            time.sleep(0.5)
    except MiniMLError as exc:
        fail(exc)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("miniml: stopping...")
        sup.stop_all()
        console.print("miniml: stopped.")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print the raw state as JSON.")) -> None:
    """Show each process of `miniml up` on this data folder: state, pid, restarts, last exit."""
    import json

    from miniml.config import Settings

    settings = Settings()
    path = settings.data_dir.resolve() / "up.json"
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        err_console.print(f"miniml is not running here (no {path}); start it with `miniml up`.")
        raise typer.Exit(1) from None
    alive = body.get("state") == "running" and _pid_alive(int(body.get("pid", 0)))
    if not alive:
        body["state"] = "stopped"
    if as_json:
        typer.echo(json.dumps(body, indent=1))
        raise typer.Exit(0 if alive else 1)
    from rich.table import Table

    now = time.time()
    table = Table("process", "state", "pid", "restarts", "up for", "last exit", "url")
    for child in body.get("children", []):
        state = child["state"] if alive else "stopped"
        up_for = f"{now - child['started_at']:.0f}s" if state in ("running", "starting") else "-"
        last = child.get("last_exit") or "-"
        if child.get("last_exit_at"):
            last += f" ({now - child['last_exit_at']:.0f}s ago)"
        colour = {"running": "green", "starting": "yellow", "restarting": "yellow"}.get(state, "red")
        table.add_row(
            child["name"],
            f"[{colour}]{state}[/{colour}]",
            str(child.get("pid") or "-"),
            str(child.get("restarts", 0)),
            up_for,
            last,
            child.get("url") or "",
        )
    console.print(f"miniml up (pid {body.get('pid')}) in {settings.data_dir.resolve()}: {body['state']}")
    console.print(table)
    raise typer.Exit(0 if alive else 1)


def _pid_alive(pid: int) -> bool:
    import os

    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serve(target: str, *, host: str, port: int, workers: int = 1) -> None:
    """Run uvicorn; on SIGTERM it stops accepting, lets in-flight requests finish, and we exit 0."""
    import uvicorn

    # uvicorn re-raises the signal it caught after shutting down; a no-op handler makes that a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(
        target,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=30,
    )


@app.command()
def api() -> None:
    """Run the control-plane api (port 8000); brings the metadata DB to the newest schema first."""
    import subprocess
    import sys

    from miniml.config import Settings
    from miniml.db.engine import at_head, make_engine

    settings = Settings()
    secure_data_dir(settings.data_dir)
    engine = make_engine(settings.db_url, connect_timeout_s=settings.db.connect_timeout_s)
    try:
        current = at_head(engine)
    finally:
        engine.dispose()
    if not current:
        # In a process of its own: Alembic stays out of the long-running api (~11 MB).
        done = subprocess.run([sys.executable, "-m", "miniml", "migrate"], check=False)
        if done.returncode != 0:
            raise typer.Exit(done.returncode)
    _serve("miniml.api.app:main_app", host=settings.api.host, port=settings.api.port)


@app.command()
def migrate() -> None:
    """Bring the metadata DB to the newest schema (`miniml api` does this on start)."""
    from miniml.config import Settings
    from miniml.db.engine import current_revision, head_revision, make_engine, upgrade

    settings = Settings()
    engine = make_engine(settings.db_url, connect_timeout_s=settings.db.connect_timeout_s)
    try:
        before, head = current_revision(engine), head_revision()
        if before == head:
            console.print(f"miniml: the metadata DB is at the newest schema ({head}).")
            return
        console.print(f"miniml: migrating the metadata DB from {before or 'empty'} to {head}...")
        upgrade(engine)
    except Exception as exc:  # unreachable DB, refused credentials: one line, not a traceback
        err_console.print(f"[red]error:[/red] could not migrate the metadata DB: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    console.print(f"miniml: the metadata DB is at {head}.")


@app.command()
def inference() -> None:
    """Run the inference service (port 8080): serves every deployment."""
    from miniml.config import Settings

    settings = Settings()
    secure_data_dir(settings.data_dir)
    _serve(
        "miniml.inference.app:main_app",
        host=settings.inference.host,
        port=settings.inference.port,
        workers=settings.inference.workers,
    )


@app.command()
def worker() -> None:
    """Run a training worker: serves the Prefect deployment that runs jobs."""
    import os

    from miniml.config import Settings
    from miniml.orchestration.flows import serve

    settings = Settings()
    secure_data_dir(settings.data_dir)
    if settings.mlflow.auth:
        from miniml.tracking.access import use_admin_credentials

        use_admin_credentials(settings.mlflow.admin_password, settings.data_dir)
    os.environ.setdefault("PREFECT_API_URL", settings.prefect_api_url)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from miniml.monitoring.metrics import start_worker_metrics

    start_worker_metrics(settings)
    # SIGTERM stops the worker as Ctrl-C does (Prefect's runner only listens for SIGINT); a flow
    # run in flight is left to the heartbeat reaper or finishes in its own process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve(settings)


@app.command("new-key")
def new_key() -> None:
    """Print a new API key, stored nowhere yet: give it to the platform in a setting
    (MINIML_AUTH__ADMIN_KEY, MINIML_WORKER__API_KEY, MINIML_INFERENCE__API_KEY), e.g. from a
    Kubernetes Secret; the api stores its hash on start."""
    from miniml.services.keys import new_raw_key

    print(new_raw_key())


@app.command("work-pool")
def work_pool(
    image: str = typer.Option(..., envvar="MINIML_IMAGE", help="The miniml image each flow run's Job runs."),
    pool: str = typer.Option("miniml-kubernetes", help="The work pool's name."),
    namespace: str = typer.Option("miniml", help="The namespace the Jobs are made in."),
    service_account: str = typer.Option("miniml-flow-run", help="The service account of the Jobs' pods."),
) -> None:
    """Train on Kubernetes: create a Prefect work pool of type kubernetes and point miniml's flows at it.

    Each job (and each shard of a parallel job) then runs as a Kubernetes Job of its own, made by
    `prefect worker start --pool <pool> --type kubernetes`. Stop any `miniml worker`: the two serve
    the same deployments. Running it again updates the pool's template and the deployments."""
    import asyncio
    import os

    from miniml.config import Settings
    from miniml.orchestration.flows import wait_for_prefect
    from miniml.orchestration.kubernetes import register

    settings = Settings()
    if settings.prefect.api_url is None and os.environ.get("PREFECT_API_URL"):  # Prefect's own setting names it
        settings.prefect.api_url = os.environ["PREFECT_API_URL"]
    os.environ.setdefault("PREFECT_API_URL", settings.prefect_api_url)
    try:
        wait_for_prefect(settings)
        done = asyncio.run(register(pool=pool, image=image, namespace=namespace, service_account=service_account))
    except Exception as exc:
        err_console.print(f"[red]error:[/red] could not set up work pool {pool}: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from exc
    for line in done:
        console.print(f"miniml: {line}")


@app.command()
def login(
    url: str = typer.Option("http://127.0.0.1:8000", help="The api's URL."),
    api_key: str = typer.Option(..., prompt=True, hide_input=True, help="Your API key."),
) -> None:
    """Check a key against the api and store url and key (mode 0600) for later commands."""
    from miniml.sdk.client import Client

    try:
        Client(url, api_key=api_key).keys.token()
    except MiniMLError as exc:
        fail(exc)
    path = save_login(url, api_key)
    typer.echo(f"logged in to {url}; saved in {path}")


@app.command()
def whoami() -> None:
    """Show which api and key the CLI uses."""
    try:
        token = client().keys.token()
    except MiniMLError as exc:
        fail(exc)
        return
    typer.echo(f"token valid for {token.expires_in}s")


def main() -> None:
    app()
