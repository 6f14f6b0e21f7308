"""How the worker starts flow runs: forks of a process that imported their code once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

PROBE = textwrap.dedent(
    """
    import multiprocessing, sys
    from pathlib import Path

    from prefect import flow
    import prefect.flow_engine as engine

    @flow(name="probe")
    def probe(path: str) -> None:
        loaded = "miniml.orchestration.runner" in sys.modules
        Path(path).write_text(f"{loaded} {type(multiprocessing.current_process()).__name__}")

    if __name__ == "__main__":  # a spawned or forked run imports this file again, as __mp_main__
        if sys.argv[2] == "fork":
            from miniml.orchestration.flows import fork_flow_runs

            fork_flow_runs(["miniml.orchestration.runner"])
        process = engine.run_flow_in_subprocess(probe, parameters={"path": sys.argv[1]})
        process.join()
        sys.exit(process.exitcode)
    """
)


def _run_probe(tmp_path: Path, prefect_api: str, mode: str) -> list[str]:
    script, out = tmp_path / f"probe_{mode}.py", tmp_path / f"out_{mode}"
    script.write_text(PROBE)
    env = os.environ | {"PREFECT_API_URL": prefect_api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(
        [sys.executable, str(script), str(out), mode], check=False, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text().split()


def test_a_flow_run_forks_from_a_process_that_imported_the_jobs_code(tmp_path: Path, prefect_api: str) -> None:
    """Prefect's own subprocess start, through the worker's forkserver: the run finds the runner's
    modules already imported (spawned, it would import them again: seconds before a job starts)."""
    assert _run_probe(tmp_path, prefect_api, "fork") == ["True", "ForkServerProcess"]
    # The same flow run as Prefect starts it without the worker's forkserver: a new interpreter.
    assert _run_probe(tmp_path, prefect_api, "spawn") == ["False", "SpawnProcess"]


OUTAGE = textwrap.dedent(
    """
    import sys, time, uuid
    from unittest import mock

    import anyio
    from prefect.client.orchestration import PrefectClient
    from prefect.runner._scheduled_run_poller import ScheduledRunPoller
    from prefect.utilities.services import critical_service_loop

    async def main() -> None:
        if sys.argv[1] == "outlast":
            from miniml.orchestration.flows import outlast_prefect_outages

            outlast_prefect_outages()
        async with PrefectClient(api="http://127.0.0.1:9/api") as client:  # nothing answers there
            registry = mock.Mock()
            registry.get_deployment_ids.return_value = [uuid.uuid4()]
            others = dict.fromkeys(
                ["limit_manager", "resolve_starter", "runs_task_group", "process_manager", "state_proposer",
                 "hook_runner", "cancellation_manager", "get_attempt_conclusion"]
            )
            poller = ScheduledRunPoller(
                query_seconds=0.05, prefetch_seconds=10, client=client, deployment_registry=registry,
                storage_objs=[], **{k: mock.Mock() for k in others},
            )
            outcome = "still polling"
            with anyio.move_on_after(float(sys.argv[2])):  # the runner's own poll loop
                try:
                    await critical_service_loop(workload=poller._get_and_submit_flow_runs, interval=0.05)
                    outcome = "ended"
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:
                    outcome = f"ended: {type(exc).__name__}"
            print(outcome, flush=True)

    anyio.run(main)
    """
)


def test_the_worker_keeps_polling_through_a_prefect_outage(tmp_path: Path) -> None:
    """Prefect's runner polls in a loop that ends after a few failed polls in a row (about 5 s of
    outage), and the worker with it. With ``outlast_prefect_outages`` the same loop, polling a
    Prefect that does not answer, says so and goes on."""
    script = tmp_path / "outage.py"
    script.write_text(OUTAGE)
    env = os.environ | {"PREFECT_CLIENT_MAX_RETRIES": "0"}

    def run(mode: str, seconds: float) -> str:
        done = subprocess.run(
            [sys.executable, str(script), mode, str(seconds)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert "ended: RuntimeError" in run("plain", 30)  # Prefect's own loop gives up well within 30 s
    kept = run("outlast", 10)
    assert "Prefect is unreachable (ConnectError); polling again until it answers." in kept
    assert kept.strip().endswith("still polling"), kept


SERVE = textwrap.dedent(
    """
    from prefect import flow

    from miniml.config import Settings
    from miniml.orchestration.flows import serve_flows

    @flow(name="miniml-outage-probe")
    def probe() -> None:
        pass

    serve_flows(Settings(), (probe,))
    """
)


def test_the_worker_registers_again_when_prefect_goes_away_as_it_starts(tmp_path: Path, prefect_api: str) -> None:
    """Prefect answers the worker's health check, then goes away before the flows are registered
    (``miniml up`` restarting it, compose starting it late): the worker says so, waits, and
    registers once Prefect is back, instead of exiting with a traceback."""
    from tests.tcpproxy import TcpProxy

    url = httpx.URL(prefect_api)
    proxy = TcpProxy(url.host, url.port or 80)
    proxy.refuse_after(1)  # the health check goes through; the registration finds nothing there
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    through = f"http://127.0.0.1:{proxy.port}/api"
    env = os.environ | {
        "PREFECT_API_URL": through,
        "MINIML_PREFECT__API_URL": through,
        "PREFECT_CLIENT_MAX_RETRIES": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    lines: list[str] = []

    def read_until(text: str) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends (and fails below) if the worker exits
            lines.append(line)
            if text in line:
                return
        raise AssertionError(f"the worker exited ({proc.wait()}) before saying {text!r}: {''.join(lines)[-3000:]}")

    try:
        read_until("Prefect went away while the worker registered or ran its flows")
        assert proc.poll() is None
        assert not any("are being served" in line for line in lines)
        proxy.restore()
        read_until("miniml-outage-probe (deployment miniml) are being served")
        deployment = httpx.get(f"{prefect_api}/deployments/name/miniml-outage-probe/miniml", timeout=10)
        assert deployment.status_code == 200, deployment.text
        proc.terminate()  # SIGTERM still stops it (the runner's handler, or the default one before it)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), "".join(lines)[-3000:]
    finally:
        proc.kill()
        proxy.close()


@pytest.mark.parametrize(
    ("error", "unreachable"),
    [
        (httpx.ConnectError("refused"), True),
        (RuntimeError("Runner failed to start"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_an_unreachable_prefect_is_waited_out(error: Exception, unreachable: bool) -> None:
    """What ``serve_flows`` waits out (Prefect not answering, also wrapped or in a group) and what
    it lets end the worker (anything else: a bug is not retried forever)."""
    from miniml.orchestration.flows import prefect_unreachable

    assert prefect_unreachable(error) is unreachable
    try:
        raise RuntimeError("Runner failed to start: client") from error
    except RuntimeError as wrapped:
        assert prefect_unreachable(wrapped) is unreachable
    assert prefect_unreachable(ExceptionGroup("runner", [ValueError("other"), error])) is unreachable
