"""Training on Kubernetes: `miniml work-pool` against a real Prefect server, and the Job that Prefect's
Kubernetes worker would make for a job, rendered by prefect-kubernetes' own code and validated
against the Kubernetes 1.30 schemas. No cluster runs here; everything up to the Kubernetes API is real."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.templating import find_placeholders
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from miniml.config import Settings
from miniml.orchestration import DEPLOYMENT_NAME, DRIFT_FLOW, EVALUATE_FLOW, FLOW_NAME
from miniml.orchestration.flows import train_job_flow
from miniml.orchestration.kubernetes import ENTRYPOINTS, base_job_template, job_variables
from miniml.orchestration.submit import Orchestrator
from miniml.schemas.jobs import JobResources

IMAGE = "registry.example.com/team/miniml:1.4.0"
POOL = "miniml-k8s-test"


def _variables_referenced(node: Any) -> set[str]:
    if isinstance(node, dict):
        return {name for value in node.values() for name in _variables_referenced(value)}
    if isinstance(node, list):
        return {name for value in node for name in _variables_referenced(value)}
    if isinstance(node, str):
        return {p.name for p in find_placeholders(node)}
    return set()


def test_the_base_job_template_is_one_prefect_accepts() -> None:
    template = base_job_template(image=IMAGE, namespace="ml", service_account="runner")
    # Prefect's own model of a work pool checks the template (every placeholder a variable, and so on).
    pool = WorkPoolCreate(name=POOL, type="kubernetes", base_job_template=template)
    variables = pool.base_job_template["variables"]["properties"]
    assert _variables_referenced(template["job_configuration"]) <= set(variables)
    assert variables["image"]["default"] == IMAGE and variables["namespace"]["default"] == "ml"
    assert variables["service_account_name"]["default"] == "runner"
    assert base_job_template()["variables"]["properties"]["image"]["default"] is None  # nothing baked in


@pytest.mark.parametrize(
    ("resources", "want"),
    [
        (None, {}),
        ({"cpu": 2, "memory": "6Gi", "gpu": 0}, {"cpu_request": "2", "cpu_limit": "2", "memory_request": "6Gi"}),
        ({"cpu": 0.5, "gpu": 2}, {"cpu_request": "0.5", "gpu_limit": 2}),
    ],
)
def test_a_jobs_resources_become_the_templates_variables(
    resources: dict[str, Any] | None, want: dict[str, Any]
) -> None:
    found = job_variables(JobResources.model_validate(resources).model_dump() if resources else None)
    assert want.items() <= found.items()
    assert ("gpu_limit" in found) == bool(resources and resources.get("gpu"))


@pytest.fixture
def prefect(prefect_api: str) -> Iterator[str]:
    """The shared test Prefect, given back as it was: the deployments the process workers of other
    tests serve are removed (each worker makes them again as it starts), and so is the pool."""
    yield prefect_api

    async def clean() -> None:
        async with get_client() as client:
            for flow in (FLOW_NAME, DRIFT_FLOW, EVALUATE_FLOW):
                try:
                    found = await client.read_deployment_by_name(f"{flow}/{DEPLOYMENT_NAME}")
                except ObjectNotFound:
                    continue
                await client.delete_deployment(found.id)
            with contextlib.suppress(ObjectNotFound):
                await client.delete_work_pool(POOL)

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        asyncio.run(clean())


def _render(prefect_api: str, run_id: str) -> dict[str, Any]:
    """The Job manifest Prefect's Kubernetes worker would send to the cluster for this flow run."""

    async def render() -> dict[str, Any]:
        async with get_client() as client:
            run = await client.read_flow_run(run_id)
            assert run.deployment_id is not None
            deployment = await client.read_deployment(run.deployment_id)
            pool = await client.read_work_pool(POOL)
            flow = await client.read_flow(run.flow_id)
            config = await KubernetesWorkerJobConfiguration.from_template_and_values(
                pool.base_job_template,
                {**(deployment.job_variables or {}), **(run.job_variables or {})},
            )
            config.prepare_for_flow_run(run, deployment, flow)
            manifest: dict[str, Any] = config.job_manifest
            return manifest

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        return asyncio.run(render())


def test_work_pool_sends_each_job_to_a_kubernetes_job_of_its_own(prefect: str) -> None:
    env = dict(os.environ, PREFECT_API_URL=prefect, MINIML_PREFECT__API_URL=prefect, MINIML_IMAGE=IMAGE)
    cmd = [sys.executable, "-m", "miniml", "work-pool", "--pool", POOL, "--namespace", "ml"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"created work pool {POOL} (type kubernetes)" in done.stdout
    assert f"deployment {FLOW_NAME}/{DEPLOYMENT_NAME} -> work pool {POOL}" in done.stdout
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)  # idempotent
    assert again.returncode == 0 and "updated work pool" in again.stdout, again.stdout + again.stderr

    async def deployments() -> dict[str, Any]:
        async with get_client() as client:
            return {
                flow: await client.read_deployment_by_name(f"{flow}/{DEPLOYMENT_NAME}")
                for flow in (FLOW_NAME, DRIFT_FLOW, EVALUATE_FLOW)
            }

    with temporary_settings({PREFECT_API_URL: prefect}):
        found = asyncio.run(deployments())
    for flow, deployment in found.items():
        assert deployment.work_pool_name == POOL
        assert deployment.entrypoint == ENTRYPOINTS[flow]
        assert load_flow_from_entrypoint(deployment.entrypoint).name == flow  # what `prefect flow-run execute` does
    assert load_flow_from_entrypoint(ENTRYPOINTS[FLOW_NAME]) is train_job_flow

    # The api's submission, as for a job with resources: Prefect checks the variables against the pool's.
    gpu_image = "registry.example.com/team/miniml-gpu:1.4.0"
    settings = Settings(prefect={"api_url": prefect}, jobs={"gpu_image": gpu_image})
    orchestrator = Orchestrator(settings, db=None)  # type: ignore[arg-type]
    created = time.time()
    gpu_job = JobResources(cpu=2, memory="6Gi", gpu=1).model_dump()
    try:
        with_gpu = orchestrator._run_deployment(7, "demo", 0, created, gpu_job)
        plain = orchestrator._run_deployment(8, "demo", 0, created, None)
    finally:
        orchestrator.close()

    manifest = _render(prefect, with_gpu)
    kubernetes_validate.validate(manifest, "1.30.0", strict=True)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == gpu_image and manifest["metadata"]["namespace"] == "ml"  # PyTorch for CUDA
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "6Gi"},
        "limits": {"cpu": "2", "memory": "6Gi", "nvidia.com/gpu": 1},
    }
    assert container["args"][:3] == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"] == with_gpu
    assert {"configMapRef": {"name": "miniml-config"}} in container["envFrom"]
    secret_keys = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert secret_keys["MINIML_WORKER__API_KEY"] == {"name": "miniml-secrets", "key": "MINIML_WORKER__API_KEY"}
    assert "MINIML_AUTH__ADMIN_KEY" not in secret_keys  # a flow run holds no admin key
    literal = [name for name, value in env.items() if value is not None]
    assert not [n for n in literal if "SECRET" in n or "PASSWORD" in n or "KEY" in n or "DB__URL" in n], literal
    assert pod["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["readOnlyRootFilesystem"]
    assert pod["serviceAccountName"] == "miniml-flow-run" and pod["restartPolicy"] == "Never"
    # The platform's NetworkPolicies let in pods labelled part-of=miniml (Prefect would label it its own).
    assert manifest["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "miniml"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

    plain_manifest = _render(prefect, plain)
    kubernetes_validate.validate(plain_manifest, "1.30.0", strict=True)
    (plain_container,) = plain_manifest["spec"]["template"]["spec"]["containers"]
    assert plain_container["image"] == IMAGE
    plain_pod = plain_manifest["spec"]["template"]
    assert plain_pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "miniml"
    assert not plain_pod["spec"].get("tolerations")  # CPU jobs stay off GPU nodes
    assert "nvidia.com/gpu" not in plain_container["resources"]["limits"]  # no GPU asked, none taken
    assert plain_container["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}  # the pool's defaults
