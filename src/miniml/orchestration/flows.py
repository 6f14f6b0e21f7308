"""The Prefect flow that runs a training job, and the worker that serves it."""

from __future__ import annotations

from prefect import flow, get_run_logger

from miniml import logs
from miniml.config import Settings
from miniml.orchestration import DEPLOYMENT_NAME, FLOW_NAME


def worker_client(settings: Settings) -> object:
    from miniml.sdk.client import Client

    key = settings.worker.api_key
    if not key:
        # The key the api wrote on first start, on the data volume the roles share (miniml up, compose).
        path = settings.data_dir / "admin.key"
        if not path.exists():
            raise RuntimeError("The worker has no API key: set MINIML_WORKER__API_KEY to an engineer (or admin) key.")
        key = path.read_text().strip()
    return Client(settings.api_url, api_key=key, timeout=60)


@flow(name=FLOW_NAME, log_prints=True, retries=0)
def train_job_flow(job_id: int, project: str, shard: int = 0) -> str:
    """Train one job (or one shard of a parallel job); the api owns its state."""
    from miniml.orchestration.runner import run_job
    from miniml.sdk.client import Client

    settings = Settings()  # the flow entry builds its settings from the worker's environment
    logs.configure(settings.log_level)
    client = worker_client(settings)
    assert isinstance(client, Client)
    result = run_job(client, settings, job_id, project, shard=shard)
    state = "skipped (another worker has it)" if result is None else result.state.value
    get_run_logger().info("job %s shard %s: %s", job_id, shard, state)
    return state


def wait_for_prefect(settings: Settings, timeout_s: float = 120) -> None:
    """Compose and `miniml up` may start the worker before Prefect answers: wait instead of dying."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    url = f"{settings.prefect_api_url}/health"
    while True:
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Prefect did not answer at {url} within {timeout_s:.0f}s")
        time.sleep(1)


def serve(settings: Settings) -> None:
    """`miniml worker`: register the deployment and run flow runs as Prefect schedules them."""
    wait_for_prefect(settings)
    train_job_flow.serve(name=DEPLOYMENT_NAME, limit=settings.worker.concurrency, print_starting_message=True)
