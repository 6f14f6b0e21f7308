"""The api's OpenAPI document tells the truth: schemathesis over every operation (all phases but
the destructive ones) finds no server error, no undocumented status or content type, and no
schema-valid request refused for a rule the schema does not state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from miniml.config import Settings
from tests.conftest import LiveApi, free_port

HOOKS = "tests.api.schemathesis_hooks"
ROOT = Path(__file__).resolve().parents[2]


def test_openapi_document_tells_the_truth(tmp_path: Path, mlflow_uri: str) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        api={"port": free_port()},
        prefect={"port": free_port()},
        mlflow={"tracking_uri": mlflow_uri},
    )
    with LiveApi(settings) as api:
        httpx.post(f"{api.url}/api/v1/projects", json={"name": "demo"}, headers=api.headers).raise_for_status()
        st = Path(sys.executable).with_name("st")
        run = subprocess.run(
            [
                str(st),
                "run",
                f"{api.url}/openapi.json",
                "-H",
                f"X-API-Key: {api.key}",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "8",
                "--seed",
                "1",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,no_undeclared_rule",
                # Stateful-destructive calls (revoking the run's own key, deleting what it reads) stay out;
                # /readyz answers 503 by design here (no Prefect worker), as its document says.
                "--exclude-method",
                "DELETE",
                "--exclude-path",
                "/readyz",
                "--no-color",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            env={**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": str(ROOT)},
        )
    summary = run.stdout[run.stdout.rfind("SUMMARY") :]
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-2000:]
    assert "Tested:" in summary and "failures" not in summary.split("\n")[-2], summary
