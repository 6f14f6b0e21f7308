"""The api's view of the MLflow registry, over MLflow's REST API against a real MLflow server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from miniml.errors import UpstreamUnavailable
from miniml.tracking.registry import Registry


def test_registry_calls_leave_mlflow_unimported(mlflow_uri: str) -> None:
    """Registry reads go over REST: the api never loads MLflow (with pandas, ~70 MB) for them."""
    code = f"""
import json, sys
from miniml.errors import NotFound
from miniml.tracking.registry import Registry
registry = Registry({mlflow_uri!r})
models = registry.list_models("nobody-here")
try:
    registry.versions("nobody-here", "m")
    missing = ""
except NotFound as exc:
    missing = exc.detail
print(json.dumps({{"mlflow": "mlflow" in sys.modules, "models": len(models), "missing": missing,
                  "run": registry.run("0" * 32)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {
        "mlflow": False,
        "models": 0,
        "missing": "Model 'm' in project 'nobody-here' does not exist.",
        "run": None,
    }


def test_an_unreachable_mlflow_is_a_503_that_names_it() -> None:
    registry = Registry("http://127.0.0.1:1")
    with pytest.raises(UpstreamUnavailable, match=r"MLflow at http://127.0.0.1:1 did not answer"):
        registry.list_models("demo")
