"""deploy/k8s: every overlay renders with `kubectl kustomize`, each object validates strictly against
the Kubernetes 1.30 schemas, and the rendered objects hold what the platform needs: probes on routes
the code serves, requests and limits, non-root, Secrets by reference only, and the HPA, PDBs,
NetworkPolicies and Ingress pointing at what exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from miniml.config import Settings
from miniml.orchestration.kubernetes import base_job_template

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "production")
VERSION = "1.30.0"
PLATFORM_IMAGE = "miniml"


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # scripts/test puts kubectl 1.30 there
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (scripts/test installs Debian's kubernetes-client)")
    return found


def kustomize(folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def workloads(objects: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    yield from (o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job"))


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def secret_refs(pod: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for c in containers(pod)
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def example_keys(overlay: str) -> set[str]:
    text = (K8S / "secrets.example" / f"{overlay}.env").read_text()
    return {line.split("=", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_renders_and_validates_strictly_against_kubernetes_1_30(overlay: str) -> None:
    objects = rendered(overlay)
    assert len(objects) > 20
    for obj in objects:
        kubernetes_validate.validate(obj, VERSION, strict=True)
        # Namespaced only: an identity with `admin` in the namespace (CI/CD's) can apply it all.
        assert obj["metadata"]["namespace"] == "miniml", obj["metadata"]


def test_a_broken_object_is_caught_by_the_validation() -> None:
    """The check can fail: an unknown field, or a wrong type, is refused."""
    deployment = json.loads(json.dumps(find(rendered("dev"), "Deployment", "miniml-api")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo of 'resources'
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)
    deployment = json.loads(json.dumps(find(rendered("dev"), "Deployment", "miniml-api")[0]))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_with_requests_limits_and_no_privilege(overlay: str) -> None:
    for work in workloads(rendered(overlay)):
        name = work["metadata"]["name"]
        pod = work["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken", True) is False or name == "miniml-prefect-worker", name
        assert work["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "miniml", name
        for c in containers(pod):
            where = f"{name}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), where
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
            assert security["readOnlyRootFilesystem"] is True, where


def _app_paths() -> dict[str, set[str]]:
    """The routes the api and the inference service really serve."""
    from miniml.api.app import create_app
    from miniml.inference.app import create_inference_app as create_inference

    settings = Settings(data_dir=Path(os.environ.get("TMPDIR", "/tmp")) / "miniml-k8s-test")
    found = {}
    for role, app in (("api", create_app(settings)), ("inference", create_inference(settings))):
        flat: list[object] = []
        for route in app.routes:  # included routers are kept whole (FastAPI >= 0.150)
            router = getattr(route, "original_router", None)
            flat.extend(router.routes if router is not None else [route])
        found[role] = {str(getattr(r, "path", "")) for r in flat}
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_role_has_probes_on_routes_it_serves(overlay: str) -> None:
    paths = _app_paths()
    # Routes of the other servers: MLflow's and Prefect's health, the workers' /metrics, Prefect worker's /health.
    served = {
        "api": paths["api"],
        "inference": paths["inference"],
        "worker": {"/metrics"},
        "mlflow": {"/health"},
        "prefect": {"/api/health"},
        "prefect-worker": {"/health"},
        "minio": {"/minio/health/ready", "/minio/health/live"},
    }
    roles = set()
    for work in workloads(rendered(overlay)):
        if work["kind"] == "Job":
            continue
        component = work["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        roles.add(component)
        for c in work["spec"]["template"]["spec"]["containers"]:
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in c, f"{component}: no {probe}"
                http = c[probe].get("httpGet")
                if http is None:
                    assert "exec" in c[probe] and component == "postgres", (component, probe)
                    continue
                assert http["port"] in ports, (component, probe, http)
                assert http["path"].split("?")[0] in served[component], (component, probe, http["path"])
    expected = {"api", "inference", "mlflow", "prefect"} | (
        {"worker", "postgres", "minio"} if overlay == "dev" else {"prefect-worker"}
    )
    assert roles == expected


def test_the_api_readiness_probe_asks_only_for_the_database() -> None:
    """A readiness probe that asked for MLflow, Prefect and a worker would take every api replica
    out of its Service whenever one of them is down; the probe's query is one /readyz knows."""
    (api,) = find(rendered("production"), "Deployment", "miniml-api")
    probe = api["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
    excluded = set(re.findall(r"exclude=(\w+)", probe))
    assert excluded == {"mlflow", "prefect", "worker"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(overlay: str) -> None:
    objects = rendered(overlay)
    assert find(objects, "Secret") == []  # made by hand from secrets.example (deploy/k8s/README.md)
    documented = example_keys(overlay)
    for work in workloads(objects):
        pod = work["spec"]["template"]["spec"]
        for secret, key in secret_refs(pod):
            assert secret == "miniml-secrets" and key in documented, (work["metadata"]["name"], key)
        for c in containers(pod):
            for e in c.get("env", []):
                if "value" in e:
                    assert not re.search(r"PASSWORD|SECRET|_KEY$|API_KEY|DB__URL|DATABASE", e["name"]), e
    for config in find(objects, "ConfigMap", "miniml-config"):
        assert not [k for k in config["data"] if re.search(r"PASSWORD|SECRET|_KEY$|DB__URL", k)]
    for key in documented:  # the example holds no value
        line = next(
            x for x in (K8S / "secrets.example" / f"{overlay}.env").read_text().splitlines() if x.startswith(f"{key}=")
        )
        assert line == f"{key}=", line


def test_each_role_holds_only_the_keys_it_needs() -> None:
    objects = rendered("dev")
    keys = {
        w["metadata"]["name"]: {k for _, k in secret_refs(w["spec"]["template"]["spec"])} for w in workloads(objects)
    }
    assert "MINIML_AUTH__MODEL_SIGNING_KEY" not in keys["miniml-api"]  # only training and inference
    assert "MINIML_AUTH__MODEL_SIGNING_KEY" in keys["miniml-worker"] & keys["miniml-inference"]
    assert all("MINIML_AUTH__ADMIN_KEY" not in held for name, held in keys.items() if name != "miniml-api")
    assert keys["miniml-prefect"] == {"PREFECT_API_DATABASE_CONNECTION_URL"}
    # The flow runs of the Kubernetes work pool: the same keys as a process worker, no more.
    template = base_job_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    flow_run = {key for _, key in secret_refs(template)}
    assert flow_run == keys["miniml-worker"]


def _setting_exists(name: str) -> bool:
    """MINIML_A__B names settings.a.b."""
    parts = name.removeprefix("MINIML_").lower().split("__")
    model: Any = Settings
    for part in parts:
        if not isinstance(model, type) or not issubclass(model, BaseModel) or part not in model.model_fields:
            return False
        model = model.model_fields[part].annotation
        model = getattr(model, "__args__", (model,))[0] if not isinstance(model, type) else model
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_miniml_variable_is_a_setting_the_code_reads(overlay: str) -> None:
    names = set()
    for obj in rendered(overlay):
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "miniml-config":
            names |= set(obj["data"])
    for work in workloads(rendered(overlay)):
        names |= {e["name"] for c in containers(work["spec"]["template"]["spec"]) for e in c.get("env", [])}
    names |= example_keys(overlay)
    unknown = sorted(n for n in names if n.startswith("MINIML_") and n != "MINIML_IMAGE" and not _setting_exists(n))
    assert unknown == []
    assert not _setting_exists("MINIML_API__NO_SUCH_THING")  # the check can fail


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_hpa_pdbs_and_ingress_point_at_what_exists(overlay: str) -> None:
    objects = rendered(overlay)
    pods = {
        w["metadata"]["name"]: (w["spec"]["template"]["metadata"]["labels"], w)
        for w in workloads(objects)
        if w["kind"] != "Job"
    }

    def selected(selector: dict[str, str]) -> list[str]:
        return [name for name, (labels, _) in pods.items() if selector.items() <= labels.items()]

    services = {}
    for service in find(objects, "Service"):
        (target,) = selected(service["spec"]["selector"])
        container_ports = {
            p["name"] for c in pods[target][1]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
        }
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports, service["metadata"]["name"]
        services[service["metadata"]["name"]] = {p["name"] for p in service["spec"]["ports"]}

    (hpa,) = find(objects, "HorizontalPodAutoscaler")
    assert "replicas" not in pods["miniml-inference"][1]["spec"]  # the HPA owns the count; an apply keeps it
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "miniml-inference"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    inference = pods["miniml-inference"][1]["spec"]["template"]["spec"]["containers"][0]
    assert inference["resources"]["requests"]["cpu"]  # a CPU target needs a request

    pdbs = {
        p["metadata"]["name"]: selected(p["spec"]["selector"]["matchLabels"])
        for p in find(objects, "PodDisruptionBudget")
    }
    assert pdbs == {"miniml-api": ["miniml-api"], "miniml-inference": ["miniml-inference"]}

    ingresses = find(objects, "Ingress")
    if overlay == "dev":
        assert ingresses == []  # a laptop has no ingress controller: port-forward
        return
    (ingress,) = ingresses
    routed = set()
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["port"]["name"] in services[backend["name"]], backend
            routed.add((backend["name"], path["path"]))
    assert (
        ("miniml-api", "/ui") in routed and ("miniml-api", "/api") in routed and ("miniml-inference", "/v1") in routed
    )
    assert not any(p in ("/", "/metrics") for _, p in routed)  # /metrics stays inside the cluster
    assert {t["secretName"] for t in ingress["spec"]["tls"]} == {"miniml-tls"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_the_platform_reach_mlflow_prefect_and_the_db(overlay: str) -> None:
    objects = rendered(overlay)
    policies = {p["metadata"]["name"]: p["spec"] for p in find(objects, "NetworkPolicy")}
    assert policies["miniml-default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    guarded = {"mlflow": 5001, "prefect": 4200} | ({"postgres": 5432, "minio": 9000} if overlay == "dev" else {})
    for component, port in guarded.items():
        (spec,) = [
            p
            for p in policies.values()
            if p["podSelector"].get("matchLabels") == {"app.kubernetes.io/component": component}
        ]
        (rule,) = spec["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "miniml"}}}], component
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}], component
    # Every pod that talks to them carries the label those policies let in, the flow runs' Jobs too.
    for work in workloads(objects):
        assert work["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "miniml"
    job = base_job_template()["job_configuration"]["job_manifest"]["spec"]["template"]
    assert job["metadata"]["labels"]["app.kubernetes.io/part-of"] == "miniml"


def test_migrations_run_before_the_api_and_dashboards_ship_as_config_maps() -> None:
    objects = rendered("production")
    (api,) = find(objects, "Deployment", "miniml-api")
    (migrate,) = api["spec"]["template"]["spec"]["initContainers"]
    assert migrate["command"] == ["miniml", "migrate"]
    (mlflow,) = find(objects, "Deployment", "miniml-mlflow")
    (upgrade,) = mlflow["spec"]["template"]["spec"]["initContainers"]  # MLflow refuses an older schema
    assert "mlflow db upgrade" in upgrade["command"][-1]
    assert ("miniml-secrets", "MINIML_DB__URL") in secret_refs(api["spec"]["template"]["spec"])
    (dashboards,) = find(objects, "ConfigMap", "miniml-grafana-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    for name, text in dashboards["data"].items():
        assert text == (ROOT / "deploy" / "grafana" / "dashboards" / name).read_text()
    (rules,) = find(objects, "ConfigMap", "miniml-prometheus-rules")
    assert rules["data"]["alerts.yml"] == (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    for work in workloads(objects):
        annotations = work["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            ports = {
                str(p["containerPort"])
                for c in work["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            assert annotations["prometheus.io/port"] in ports


def test_production_trains_on_a_kubernetes_work_pool_and_dev_on_process_workers() -> None:
    production, dev = rendered("production"), rendered("dev")
    assert find(production, "Deployment", "miniml-worker") == [] and find(dev, "Deployment", "miniml-worker")
    (worker,) = find(production, "Deployment", "miniml-prefect-worker")
    pod = worker["spec"]["template"]["spec"]
    (setup,) = pod["initContainers"]
    assert setup["command"][:2] == ["miniml", "work-pool"]
    (prefect_worker,) = pod["containers"]
    assert prefect_worker["command"][:3] == ["prefect", "worker", "start"] and "kubernetes" in prefect_worker["command"]
    # What the pool's Jobs name exists: their service account, and the Secret and ConfigMap they read.
    variables = base_job_template()["variables"]["properties"]
    assert find(production, "ServiceAccount", variables["service_account_name"]["default"])
    assert find(production, "ConfigMap", variables["config_map_name"]["default"])
    (binding,) = find(production, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "miniml"}]
    (role,) = find(production, "Role")
    assert {"batch"} == {g for r in role["rules"] for g in r["apiGroups"] if "jobs" in r["resources"]}
    assert "secrets" not in {res for r in role["rules"] for res in r["resources"]}


def test_a_release_image_reaches_every_platform_container_and_the_work_pool(tmp_path: Path) -> None:
    """CI/CD sets the image on top of the production overlay, as the workflow does."""
    release = tmp_path / "release"
    release.mkdir()
    image = "ghcr.io/acme/miniml"
    (release / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S / "overlays" / "production", release)],
                "images": [
                    {"name": PLATFORM_IMAGE, "newName": image, "newTag": "v1.4.0"},
                    {"name": "miniml-gpu", "newName": image, "newTag": "v1.4.0-cuda"},
                ],
            }
        )
    )
    objects = kustomize(release)
    platform = [
        c
        for w in workloads(tuple(objects))
        for c in containers(w["spec"]["template"]["spec"])
        if w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] not in ("postgres", "minio")
    ]
    assert platform and {c["image"] for c in platform} == {f"{image}:v1.4.0"}
    (worker,) = find(tuple(objects), "Deployment", "miniml-prefect-worker")
    env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["initContainers"][0]["env"]}
    assert env["MINIML_IMAGE"] == f"{image}:v1.4.0"  # the flow runs' Jobs run the release too
    (config,) = find(tuple(objects), "ConfigMap", "miniml-config")
    assert config["data"]["MINIML_JOBS__GPU_IMAGE"] == f"{image}:v1.4.0-cuda"  # and GPU jobs its CUDA build
