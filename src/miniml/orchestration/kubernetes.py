"""Training on Kubernetes: a Prefect work pool of type ``kubernetes``.

Each flow run (a training job, each shard of a parallel job, a drift check, an evaluation) becomes a
Kubernetes Job of its own, made by Prefect's Kubernetes worker (``prefect worker start --type
kubernetes``) from the base job template in ``kubernetes_job_template.json``. ``miniml work-pool``
creates the pool and the three deployments the api submits to, under the same names the process
worker (``miniml worker``) serves, so the api needs to know nothing of where runs go.

A job's ``resources`` reach the Job through the flow run's job variables: ``cpu``, ``memory`` and
``gpu`` become the container's requests and limits (``nvidia.com/gpu`` for GPUs).
"""

from __future__ import annotations

import json
from importlib import resources as package_files
from typing import Any

from miniml.orchestration import DEPLOYMENT_NAME, DRIFT_FLOW, EVALUATE_FLOW, FLOW_NAME

POOL = "miniml-kubernetes"
TEMPLATE_FILE = "kubernetes_job_template.json"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# The flows as module paths: the image has miniml installed, so Prefect imports them (no storage, no pull).
ENTRYPOINTS = {
    FLOW_NAME: "miniml.orchestration.flows.train_job_flow",
    DRIFT_FLOW: "miniml.orchestration.flows.drift_check_flow",
    EVALUATE_FLOW: "miniml.orchestration.flows.evaluate_flow",
}


def base_job_template(
    *, image: str | None = None, namespace: str | None = None, service_account: str | None = None
) -> dict[str, Any]:
    """The work pool's base job template, with the image, namespace and service account as defaults."""
    text = package_files.files("miniml.orchestration").joinpath(TEMPLATE_FILE).read_text()
    template: dict[str, Any] = json.loads(text)
    variables = template["variables"]["properties"]
    for name, value in (("image", image), ("namespace", namespace), ("service_account_name", service_account)):
        if value:
            variables[name]["default"] = value
    return template


def job_variables(resources: dict[str, Any] | None, *, gpu_image: str | None = None) -> dict[str, Any]:
    """A job's ``resources`` as the template's variables: requests equal limits (a Guaranteed pod);
    a job asking for a GPU runs ``gpu_image`` where one is set (PyTorch built for CUDA)."""
    if not resources:
        return {}
    found: dict[str, Any] = {}
    if resources.get("cpu"):
        found["cpu_request"] = found["cpu_limit"] = f"{float(resources['cpu']):g}"
    if resources.get("memory"):
        found["memory_request"] = found["memory_limit"] = str(resources["memory"])
    if resources.get("gpu"):
        found["gpu_limit"] = int(resources["gpu"])
        # GPU nodes are usually tainted so that only pods asking for a GPU land there.
        found["tolerations"] = [GPU_TOLERATION]
        if gpu_image:
            found["image"] = gpu_image
    return found


async def register(*, pool: str, image: str, namespace: str, service_account: str) -> list[str]:
    """Create (or update) the work pool and the flows' deployments in it; return what was done."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    from miniml.orchestration.flows import drift_check_flow, evaluate_flow, train_job_flow

    template = base_job_template(image=image, namespace=namespace, service_account=service_account)
    done = []
    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes", base_job_template=template))
            done.append(f"created work pool {pool} (type kubernetes)")
        except ObjectAlreadyExists:
            await client.update_work_pool(pool, WorkPoolUpdate(base_job_template=template))
            done.append(f"updated work pool {pool}'s base job template")
        for flow_ in (train_job_flow, drift_check_flow, evaluate_flow):
            flow_id = await client.create_flow_from_name(flow_.name)
            await client.create_deployment(
                flow_id=flow_id,
                name=DEPLOYMENT_NAME,
                work_pool_name=pool,
                entrypoint=ENTRYPOINTS[flow_.name],
                parameter_openapi_schema=flow_.parameters.model_dump(mode="json"),
                tags=["miniml"],
                description=f"miniml's {flow_.name} flow; each run is a Kubernetes Job.",
            )
            done.append(f"deployment {flow_.name}/{DEPLOYMENT_NAME} -> work pool {pool}")
    return done
