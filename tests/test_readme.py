"""The README's quickstart blocks, run as written against a live `miniml up` on the default ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from miniml.config import Settings
from miniml.processes import port_is_free
from tests.test_up import _read_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def block(name: str) -> str:
    """The fenced block right after ``<!-- quickstart:<name> -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- quickstart:{name} -->\n```\w+\n(.*?)```", text, re.S)
    assert found, f"README has no quickstart:{name} block"
    return found.group(1)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    defaults = Settings()
    ports = [defaults.api.port, defaults.inference.port, defaults.mlflow.port, defaults.prefect.port]
    ports += [defaults.monitoring.prometheus_port, defaults.worker.metrics_port]
    taken = [p for p in ports if not port_is_free(p)]
    if taken:
        pytest.skip(f"the README uses the default ports and {taken} are taken here (is miniml up running?)")
    work = tmp_path_factory.mktemp("readme")
    (work / "data").symlink_to(ROOT / "data")  # the blocks run from a checkout's folder
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIML_")}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "miniml", "up"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _read_until(proc, r"Press Ctrl-C", 180)
        yield work, env
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)


def run(platform: tuple[Path, dict[str, str]], argv: list[str]) -> str:
    work, env = platform
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, f"{argv[:2]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_curl_quickstart(platform: tuple[Path, dict[str, str]]) -> None:
    out = run(platform, ["bash", "-e", "-o", "pipefail", "-c", block("curl")])
    assert '{"preds":["Iris-setosa"]}' in out


def test_the_cli_quickstart(platform: tuple[Path, dict[str, str]]) -> None:
    out = run(platform, ["bash", "-e", "-o", "pipefail", "-c", block("cli")])
    assert "Iris-setosa" in out and re.search(r"drift check \d+ of iris-cli: (done|no_data)", out), out


def test_the_sdk_quickstart(platform: tuple[Path, dict[str, str]]) -> None:
    out = run(platform, [sys.executable, "-c", block("sdk")])
    assert "['Iris-setosa']" in out and out.strip().endswith("1.0"), out
