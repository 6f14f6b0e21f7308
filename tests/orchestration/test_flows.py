"""How the worker starts flow runs: forks of a process that imported their code once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
